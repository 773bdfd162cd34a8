"""image_gpt_hf.fast_decoding: the compiled static-cache path gives the default path's tokens, falls back with a logged
reason, and the lower-precision weights cost less than 0.01 bits per pixel; sample() and complete() go through it."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
from conftest import TINY_DIMS
from transformers.generation.streamers import BaseStreamer
from transformers.pytorch_utils import Conv1D

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf import fast_decoding as fd

GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.fixture
def model():
    return ImageGPTForCausalImageModeling(ImageGPTConfig(**TINY_DIMS)).eval()


@pytest.fixture
def logs(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()  # transformers' loggers do not reach caplog otherwise
    caplog.set_level(logging.INFO, logger="image_gpt_hf.fast_decoding")
    yield caplog
    hf_logging.disable_propagation()


@pytest.fixture
def compiles(monkeypatch):
    """The calls of torch.compile (which still compiles): `len(compiles)` is how many graphs were asked for."""
    calls, compile = [], torch.compile

    def counted(*args, **kwargs):
        calls.append(args)
        return compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counted)
    return calls


def sos(model, batch):
    return torch.full((batch, 1), model.config.vocab_size - 1)


def test_auto_leaves_small_models_eager_and_says_why(model, logs, compiles):
    out = fd.fast_generate(model, sos(model, 1), max_new_tokens=8, **GREEDY)
    assert torch.equal(out, model.generate(sos(model, 1), max_new_tokens=8, **GREEDY))
    assert "decodes faster eagerly than it compiles" in logs.text
    assert not compiles


def test_fallback_when_compile_is_unavailable_is_logged_and_gives_the_same_tokens(model, logs, monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", unavailable)
    prompt = torch.cat([sos(model, 2), torch.randint(0, 16, (2, 20))], dim=1)
    out = fd.fast_generate(model, prompt, compile=True, max_new_tokens=44, **GREEDY)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=44, **GREEDY))
    assert "compiling the decode step failed" in logs.text and "not supported here" in logs.text
    fd.forget(model)


def test_a_failing_compiled_step_falls_back_mid_generation(model, logs, monkeypatch):
    def broken(function, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor could not build the kernel")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = fd.fast_generate(model, sos(model, 3), compile=True, max_new_tokens=64, **GREEDY)
    assert torch.equal(out, model.generate(sos(model, 3), max_new_tokens=64, **GREEDY))
    assert logs.text.count("compiling the decode step failed") == 1  # once; the next steps run eagerly
    fd.forget(model)


def test_calls_with_their_own_cache_run_as_given(model, logs):
    out = fd.fast_generate(
        model, sos(model, 1), compile=True, cache_implementation="dynamic", max_new_tokens=8, **GREEDY
    )
    assert torch.equal(out, model.generate(sos(model, 1), max_new_tokens=8, **GREEDY))
    assert "the call or its generation config sets cache_implementation itself" in logs.text


def test_a_generation_config_set_after_the_first_call_is_honoured(model, logs):
    from transformers import GenerationConfig

    first = fd.fast_generate(model, sos(model, 1), precision="bfloat16", compile=False, max_new_tokens=8, **GREEDY)
    banned = int(first[0, 2])  # a token the first call chose
    model.generation_config = GenerationConfig(bad_words_ids=[[banned]], pad_token_id=0)
    again = fd.fast_generate(model, sos(model, 1), precision="bfloat16", compile=False, max_new_tokens=8, **GREEDY)
    assert banned not in again[0, 1:].tolist()
    # A cache chosen in the generation config keeps the call on the default path.
    model.generation_config = GenerationConfig(cache_implementation="dynamic", pad_token_id=0)
    fd.fast_generate(model, sos(model, 1), compile=True, max_new_tokens=4, **GREEDY)
    assert "its generation config sets cache_implementation itself" in logs.text
    fd.forget(model)


def test_a_copy_follows_the_models_weights_and_mode(model):
    low = fd.lower_precision_copy(model, "bfloat16")
    assert fd.lower_precision_copy(model, "bfloat16") is low  # unchanged weights: reused
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1)  # an in-place update, as an optimizer step makes
    fresh = fd.lower_precision_copy(model, "bfloat16")
    assert fresh is not low
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight.bfloat16())
    model.train()
    assert fd.lower_precision_copy(model, "bfloat16").training
    model.eval()
    assert not fd.lower_precision_copy(model, "bfloat16").training
    fd.forget(model)


def test_peft_models_are_refused_lower_precision_and_say_why_they_run_eagerly(model, logs):
    peft = pytest.importorskip("peft")
    from image_gpt_hf import lora_config

    adapted = peft.get_peft_model(model, lora_config(model, r=2)).eval()
    with pytest.raises(ValueError, match="merge the adapter first"):
        fd.fast_generate(adapted, sos(model, 1), precision="int8", max_new_tokens=4, **GREEDY)
    out = fd.fast_generate(adapted, sos(model, 1), compile=True, max_new_tokens=4, **GREEDY)
    assert torch.equal(out, adapted.generate(input_ids=sos(model, 1), max_new_tokens=4, **GREEDY))
    assert "a peft model's generate() calls its base model's own forward" in logs.text


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="precision"):
        fd.fast_generate(model, sos(model, 1), precision="fp8", max_new_tokens=2)
    with pytest.raises(ValueError, match="compile"):
        fd.fast_generate(model, sos(model, 1), compile="yes", max_new_tokens=2)


def test_int8_linear_matches_the_conv1d_it_replaces():
    conv = Conv1D(48, 32)
    torch.nn.init.normal_(conv.weight, std=0.2)
    torch.nn.init.normal_(conv.bias, std=0.1)
    holder = torch.nn.Sequential(conv)
    fd.quantize_int8_weight_only(holder)
    layer = holder[0]
    assert isinstance(layer, fd.Int8WeightOnlyLinear) and layer.weight.dtype == torch.int8
    assert layer.weight.shape == (48, 32) and layer.weight.is_contiguous()  # (out, in), the kernel's layout
    x = torch.randn(5, 32)
    exact = conv(x)
    approx = layer(x.bfloat16()).float()
    # int8 (half a step of max|w|/127 per weight) and bfloat16 activations: about 1% of the output's scale.
    assert (approx - exact).abs().max() < 0.03 * exact.abs().max()
    assert not torch.equal(layer.weight.float() * layer.scale.float()[:, None], conv.weight.t())  # it is quantized


def test_lower_precision_copies_leave_the_model_alone_and_are_reused(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    low = fd.lower_precision_copy(model, "int8")
    assert low is fd.lower_precision_copy(model, "int8") and low is not model
    assert isinstance(low.lm_head, fd.Int8WeightOnlyLinear) and low.transformer.wte.weight.dtype == torch.bfloat16
    assert fd.lower_precision_copy(model, "bfloat16").dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fd.forget(model)
    assert fd.lower_precision_copy(model, "int8") is not low  # forgotten: made anew


def test_a_copy_is_remade_when_rows_are_permuted(model):
    """An edit that keeps every parameter's sum (rows of the LM head swapped: each color's logit moves to another
    color) is seen: the copy decodes what a copy of the edited model decodes."""
    with torch.no_grad():  # multiples of 1/64: every float sum of the head's weights is exact, in any order
        model.lm_head.weight.copy_((model.lm_head.weight * 64).round() / 64)
    for precision in ("bfloat16", "int8"):
        before = fd.fast_generate(model, sos(model, 2), precision=precision, max_new_tokens=16, **GREEDY)
        with torch.no_grad():
            model.lm_head.weight.copy_(model.lm_head.weight.roll(1, dims=0))
        after = fd.fast_generate(model, sos(model, 2), precision=precision, max_new_tokens=16, **GREEDY)
        fresh = copy.deepcopy(model)  # another model: its own copy, made from the edited weights
        expected = fd.fast_generate(fresh, sos(model, 2), precision=precision, max_new_tokens=16, **GREEDY)
        assert torch.equal(after, expected) and not torch.equal(after, before)


def test_int8_of_an_offloaded_model_says_what_to_do(tmp_path):
    from transformers import AutoModelForCausalLM

    ImageGPTForCausalImageModeling(ImageGPTConfig(**TINY_DIMS)).save_pretrained(tmp_path / "model")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map={"": "disk"}, offload_folder=tmp_path / "offload"
    ).eval()
    with pytest.raises(ValueError, match="offloaded .* precision=None"):
        fd.fast_generate(offloaded, sos(offloaded, 1), precision="int8", max_new_tokens=2, **GREEDY)


@pytest.mark.slow
def test_compiled_path_gives_the_default_tokens_and_is_reused(model, logs, compiles):
    """float32 greedy: sampling from SOS (the step serves the first position too) and completing a primer (eager
    prefill, then the same compiled step), twice: the second call compiles nothing."""
    start = sos(model, 2)
    expected = model.generate(start, max_new_tokens=64, **GREEDY)
    assert torch.equal(fd.fast_generate(model, start, compile=True, max_new_tokens=64, **GREEDY), expected)
    prompt = expected[:, :25]
    completed = fd.fast_generate(model, prompt, compile=True, max_new_tokens=40, **GREEDY)
    assert torch.equal(completed, model.generate(prompt, max_new_tokens=40, **GREEDY))
    assert len(compiles) == 1 and "compiling the decode step failed" not in logs.text
    fd.forget(model)


# ------------------------------------------------------------------------- quality of the lower-precision weights


def bits_per_pixel(model, ids: torch.Tensor) -> float:
    """Mean negative log-likelihood of the pixels (SOS prepended), in bits."""
    with torch.no_grad():
        losses = [model(input_ids=chunk, labels=chunk, prepend_sos=True).loss.float() for chunk in ids.split(64)]
    return float(torch.stack(losses).mean()) / math.log(2)


def train(config: ImageGPTConfig, ids: torch.Tensor, steps: int, batch: int) -> ImageGPTForCausalImageModeling:
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        chunk = ids[torch.randint(0, len(ids), (batch,))]
        model(input_ids=chunk, labels=chunk, prepend_sos=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    """A small model trained for a few steps on scikit-learn's digits (16 gray levels, 8x8), and the test digits."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images).reshape(-1, 64)  # counts 0..16
    ids = (images * 15 / 16).round().long()  # 16 gray levels
    train_ids, test_ids = ids[:1437], ids[1437:]
    config = ImageGPTConfig(vocab_size=17, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return train(config, train_ids, steps=150, batch=64), test_ids


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_precision_costs_under_a_hundredth_of_a_bit_on_digits(digits, precision):
    model, test_ids = digits
    reference = bits_per_pixel(model, test_ids)
    assert reference < 0.9 * math.log2(16)  # it learned something: below a uniform guess over 16 levels
    low = bits_per_pixel(fd.lower_precision_copy(model, precision), test_ids)
    assert abs(low - reference) < 0.01, (precision, reference, low)
    fd.forget(model)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_precision_costs_under_a_hundredth_of_a_bit_on_photo_crops(precision):
    """Random 32x32 crops of scikit-image's photos, a 16-color palette, a small 32x32 model trained a few steps."""
    from skimage import data

    from image_gpt_hf import ImageGPTImageProcessor

    rng = np.random.default_rng(0)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for i in range(160):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        crops.append(photo[top : top + 32, left : left + 32])
    pixels = np.concatenate([c.reshape(-1, 3) for c in crops]).astype(np.float32) / 127.5 - 1
    palette = pixels[rng.choice(len(pixels), 16, replace=False)]
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": 32, "width": 32})
    ids = processor(crops, return_tensors="pt")["input_ids"].long()
    config = ImageGPTConfig(vocab_size=17, n_positions=1024, n_embd=32, n_layer=2, n_head=4)
    model = train(config, ids[:128], steps=40, batch=8)
    reference = bits_per_pixel(model, ids[128:])
    assert reference < 0.9 * math.log2(16)
    low = bits_per_pixel(fd.lower_precision_copy(model, precision), ids[128:])
    assert abs(low - reference) < 0.01, (precision, reference, low)


# --------------------------------------------------------------------------------- through sample() and complete()


@pytest.mark.slow
def test_hook_sample_and_complete_compiled_give_the_default_tokens(model, logs, compiles):
    from image_gpt_hf.generation import complete, sample

    class Count(BaseStreamer):  # a user's streamer (the app's, for one) on the compiled path
        calls = 0

        def put(self, value):
            self.calls += 1

        def end(self):
            pass

    options = {"do_sample": False, "output_type": "ids", "progress": False}
    expected = sample(model, 2, compile=False, **options)
    streamer = Count()
    assert torch.equal(sample(model, 2, compile=True, streamer=streamer, **options), expected)
    assert streamer.calls == 64 + 1  # the prompt, then every step
    halves = complete(model, expected, primer_rows=3, compile=False, **options)
    assert torch.equal(complete(model, expected, primer_rows=3, compile=True, **options), halves)
    assert len(compiles) == 1 and "compiling the decode step failed" not in logs.text  # one graph, which ran
    fd.forget(model)


def test_hook_sample_with_compile_false_never_compiles(model, monkeypatch):
    from image_gpt_hf.generation import sample

    asked = []  # what torch.compile was asked to compile; it returns the function as it is (eager, fast)
    monkeypatch.setattr(torch, "compile", lambda function, **options: asked.append(function) or function)
    options = {"do_sample": False, "output_type": "ids", "progress": False}
    ids = sample(model, 1, compile=False, **options)
    assert ids.shape == (1, 64) and not asked
    assert torch.equal(sample(model, 1, compile=True, **options), ids) and len(asked) == 1  # the probe sees a compile
    fd.forget(model)
