"""Fast generation (default, static cache, static cache + torch.compile) and the `sample` / `complete` helpers."""

import collections

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig
from transformers.models.imagegpt import modeling_imagegpt as hf
from transformers.models.imagegpt.configuration_imagegpt import ImageGPTConfig as HFConfig

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
)
from image_gpt_hf.generation import complete, sample

N_PX = 8
DIMS = {"vocab_size": 17, "n_positions": N_PX * N_PX, "n_embd": 32, "n_layer": 2, "n_head": 4}
PALETTE = DIMS["vocab_size"] - 1
SOS = DIMS["vocab_size"] - 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval()


@pytest.fixture(scope="module")
def processor():
    palette = np.random.default_rng(0).uniform(-1, 1, (PALETTE, 3))
    return ImageGPTImageProcessor(clusters=palette, size={"height": N_PX, "width": N_PX})


def greedy(model, batch=2, **kwargs):
    start = torch.full((batch, 1), SOS)
    return model.generate(start, max_new_tokens=N_PX * N_PX, min_new_tokens=N_PX * N_PX, do_sample=False, **kwargs)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- fast paths, greedy


def test_greedy_fast_paths_give_transformers_tokens(model):
    theirs = hf.ImageGPTForCausalImageModeling(HFConfig(**DIMS)).eval()
    theirs.load_state_dict(model.state_dict())
    reference = greedy(theirs)
    assert reference.shape == (2, 1 + N_PX * N_PX)
    assert torch.equal(greedy(model), reference)
    assert torch.equal(greedy(model, cache_implementation="static"), reference)


def test_static_cache_with_torch_compile_gives_the_same_tokens(model):
    # The documented fast path: generate() compiles the decode step when the cache is static. On CPU that needs
    # CompileConfig's `_compile_all_devices` (generate only auto-compiles on accelerators); inductor really compiles.
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True
    expected = greedy(model)
    compiled = greedy(model, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(compiled, expected)
    assert hasattr(model, "_compiled_call")  # the decode steps did run compiled
    again = greedy(model, batch=2, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(again, expected)


def test_decode_loop_skips_input_checks_but_prefill_and_later_calls_keep_them(model):
    with CountOps() as ops:
        greedy(model, batch=1)
    assert ops.counts["aminmax"] == 1  # the prefill's id check; none in the 64 decode steps
    assert not model.transformer._inputs_from_decode_loop
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[0, 99]]))


def test_decode_step_builds_no_pooler_output(model):
    out = model.transformer(torch.full((1, 3), SOS), return_pooler_output=False)
    assert out.pooler_output is None
    assert model.transformer(torch.full((1, 3), SOS)).pooler_output.shape == (1, DIMS["n_embd"])


# ---------------------------------------------------------------------------------------------------------- sample


def test_sample_shapes_and_output_types(model, processor):
    images = sample(model, 3, processor=processor, batch_size=2, seed=0, progress=False)
    assert len(images) == 3 and all(isinstance(image, PIL.Image.Image) for image in images)
    assert images[0].size == (N_PX, N_PX)
    arrays = sample(model, 3, processor=processor, batch_size=2, seed=0, output_type="np", progress=False)
    assert arrays.shape == (3, N_PX, N_PX, 3) and arrays.dtype == np.uint8
    assert np.array_equal(arrays[0], np.asarray(images[0]))
    ids = sample(model, 3, batch_size=2, seed=0, output_type="ids", progress=False)
    assert ids.shape == (3, N_PX * N_PX) and ids.min() >= 0 and ids.max() < PALETTE
    assert np.array_equal(processor.batch_decode(ids, output_type="np"), arrays)


def test_sample_seed_reproduces_and_leaves_global_rng_alone(model):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample(model, 2, seed=7, output_type="ids", progress=False, top_k=8, temperature=1.5)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample(model, 2, seed=7, output_type="ids", progress=False, top_k=8, temperature=1.5)
    c = sample(model, 2, seed=8, output_type="ids", progress=False, top_k=8, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_sample_is_greedy_generate(model):
    ids = sample(model, 2, do_sample=False, output_type="ids", progress=False)
    assert torch.equal(ids, greedy(model)[:, 1:])


def test_sample_with_progress_bar_and_generate_options(model, capsys):
    ids = sample(model, 2, seed=0, output_type="ids", progress=True, cache_implementation="static")
    assert ids.shape == (2, N_PX * N_PX)
    assert "px" in capsys.readouterr().err  # tqdm wrote its bar


# -------------------------------------------------------------------------------------------------------- complete


def test_complete_keeps_primer_rows_of_images(model, processor):
    images = sample(model, 2, processor=processor, seed=1, progress=False)
    ids = processor(images, return_tensors="pt")["input_ids"]
    out = complete(model, images, processor=processor, num_completions=3, seed=0, output_type="np", progress=False)
    assert out.shape == (6, N_PX, N_PX, 3)
    originals = processor.batch_decode(ids, output_type="np")
    for i in range(6):
        assert np.array_equal(out[i, : N_PX // 2], originals[i // 3, : N_PX // 2])  # top half kept, image-major
    pil = complete(model, images[0], processor=processor, primer_rows=5, seed=0, progress=False)
    assert len(pil) == 1 and np.array_equal(np.asarray(pil[0])[:5], originals[0, :5])


def test_complete_from_ids(model):
    ids = sample(model, 2, seed=3, output_type="ids", progress=False)
    out = complete(model, ids, primer_rows=3, num_completions=2, seed=0, output_type="ids", progress=False)
    assert out.shape == (4, N_PX * N_PX)
    assert torch.equal(out[:, : 3 * N_PX], ids.repeat_interleave(2, dim=0)[:, : 3 * N_PX])
    # Greedy completion of a greedy image reproduces it; one sequence given as 1-D works too.
    full = greedy(model, batch=1)[0, 1:]
    assert torch.equal(complete(model, full, do_sample=False, output_type="ids", progress=False)[0], full)
    # primer_rows=0 is plain sampling from SOS.
    assert torch.equal(
        complete(model, ids, primer_rows=0, seed=5, output_type="ids", progress=False),
        sample(model, 2, seed=5, output_type="ids", progress=False),
    )


def test_complete_seed_reproduces(model):
    ids = sample(model, 1, seed=3, output_type="ids", progress=False)
    a = complete(model, ids, num_completions=2, seed=11, output_type="ids", progress=False)
    b = complete(model, ids, num_completions=2, seed=11, output_type="ids", progress=False)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: complete(m, torch.zeros(1, 64, dtype=torch.long), primer_rows=N_PX), r"primer_rows.*\[0, 8\)"),
        (lambda m, p: complete(m, torch.zeros(1, 64, dtype=torch.long), primer_rows=-1), "primer_rows"),
        (lambda m, p: complete(m, torch.zeros(1, 63, dtype=torch.long), output_type="ids"), r"shape \(64,\)"),
        (lambda m, p: complete(m, torch.full((1, 64), SOS), output_type="ids"), "drop the SOS"),
        (lambda m, p: complete(m, torch.zeros(1, 64, dtype=torch.long), num_completions=0), "num_completions"),
        (lambda m, p: sample(m, 0), "num_images"),
        (lambda m, p: sample(m, 2, batch_size=0, output_type="ids"), "batch_size"),
        (lambda m, p: sample(m, 1, output_type="jpeg"), "output_type"),
        (lambda m, p: sample(m, 1, output_type="ids", max_new_tokens=3), "max_new_tokens"),
        (lambda m, p: sample(m, 1), "needs the image processor"),
        (lambda m, p: complete(m, [PIL.Image.new("RGB", (4, 4))], output_type="ids"), "needs the image processor"),
        (
            lambda m, p: complete(
                m, PIL.Image.new("RGB", (4, 4)), processor=ImageGPTImageProcessor(clusters=p.clusters)
            ),
            "size=",
        ),
    ],
)
def test_bad_input_raises_value_error(model, processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(model, processor)


def test_bert_and_foreign_models_are_refused(processor):
    bert = ImageGPTForMaskedImageModeling(ImageGPTConfig(**DIMS, objective="bert")).eval()
    with pytest.raises(ValueError, match="autoregressive"):
        sample(bert, 1, processor=processor)
    with pytest.raises(ValueError, match="Image GPT"):
        sample(torch.nn.Linear(2, 2), 1)


def test_beam_search_and_a_users_streamer_go_without_the_progress_bar(model):
    class Count:
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1

        def end(self):
            pass

    streamer = Count()
    ids = sample(model, 1, output_type="ids", do_sample=False, streamer=streamer)
    assert ids.shape == (1, N_PX * N_PX) and streamer.calls == N_PX * N_PX + 1  # the prompt, then every token
    beams = sample(model, 2, output_type="ids", do_sample=False, num_beams=2)  # progress=True by default
    assert beams.shape == (2, N_PX * N_PX)
