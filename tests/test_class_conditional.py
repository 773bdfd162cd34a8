"""Class-conditional sampling and classifier-free guidance through `sample` / `complete`, and a class-conditional
checkpoint from pretrain.py."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_DIMS, refusal, run_script, run_without_package

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling, load_digits
from image_gpt_hf.generation import complete, sample

PALETTE, N_PX = TINY_DIMS["vocab_size"] - 1, 4
CLASSES = {0: "cat", 1: "dog", 2: "bird"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset(
        "tiny", n_px=N_PX, palette_size=PALETTE, n_layer=2, n_embd=32, n_head=2, class_conditional=True,
        id2label=CLASSES, prepend_sos=True,
    )  # fmt: skip
    return ImageGPTForCausalImageModeling(config).eval()


def generated(model, starts, **kwargs):
    """generate() by hand from the given first ids (B, T), greedy, to a whole image; SOS / class token dropped."""
    length = N_PX * N_PX + 1
    return model.generate(starts, max_length=length, min_length=length, do_sample=False, **kwargs)[:, 1:]


def test_one_model_samples_with_and_without_a_class(model):
    config = model.config
    greedy = dict(do_sample=False, output_type="ids", progress=False)
    by_name = sample(model, 3, class_labels=["bird", "cat", None], **greedy)
    starts = torch.tensor([[config.class_token_id(2)], [config.class_token_id(0)], [config.sos_token_id]])
    assert torch.equal(by_name, generated(model, starts))
    assert torch.equal(sample(model, 3, class_labels=[2, 0, None], **greedy), by_name)  # ids or names
    dogs = generated(model, torch.full((2, 1), config.class_token_id(1)))
    assert torch.equal(sample(model, 2, class_labels="dog", **greedy), dogs)  # one label for all
    unconditional = sample(model, 1, **greedy)
    assert torch.equal(unconditional, by_name[2:]) and not torch.equal(unconditional, by_name[:1])
    # complete(): the class token, then the kept rows; one label per image, repeated over its completions.
    images = torch.randint(0, PALETTE, (2, N_PX * N_PX), generator=torch.Generator().manual_seed(1))
    done = complete(model, images, class_labels=[1, "bird"], num_completions=2, primer_rows=1, **greedy)
    starts = torch.tensor([[config.class_token_id(c)] for c in (1, 1, 2, 2)])
    prompts = torch.cat([starts, images.repeat_interleave(2, 0)[:, :N_PX]], 1)
    assert torch.equal(done, generated(model, prompts))


def test_guidance_goes_through_generate_and_scale_one_is_unguided(model):
    config, sampled = model.config, dict(output_type="ids", progress=False, seed=0, top_k=None)
    unguided = sample(model, 4, class_labels="dog", **sampled)
    assert torch.equal(sample(model, 4, class_labels="dog", guidance_scale=1.0, **sampled), unguided)
    guided = sample(model, 4, class_labels="dog", guidance_scale=3.0, **sampled)
    assert not torch.equal(guided, unguided)
    start, sos = torch.full((4, 1), config.class_token_id("dog")), torch.full((4, 1), config.sos_token_id)
    torch.manual_seed(0)
    length = N_PX * N_PX + 1
    by_hand = model.generate(start, max_length=length, min_length=length, do_sample=True, top_k=None,
                             guidance_scale=3.0, negative_prompt_ids=sos)[:, 1:]  # fmt: skip
    assert torch.equal(guided, by_hand)
    # complete(): the unconditional pass sees the kept rows too (its prompt is SOS + the same primer).
    images = torch.randint(0, PALETTE, (2, N_PX * N_PX), generator=torch.Generator().manual_seed(2))
    done = complete(model, images, class_labels="cat", guidance_scale=2.0, do_sample=False, output_type="ids",
                    progress=False)  # fmt: skip
    primer = images[:, : 2 * N_PX]
    negative = torch.cat([sos[:2], primer], 1)
    start = torch.cat([torch.full((2, 1), config.class_token_id("cat")), primer], 1)
    assert torch.equal(done, generated(model, start, guidance_scale=2.0, negative_prompt_ids=negative))


def test_guided_sampling_takes_the_default_path_and_says_why(model, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    caplog.set_level(logging.INFO, logger="image_gpt_hf.fast_decoding")
    try:
        options = dict(class_labels=1, guidance_scale=2.0, do_sample=False, output_type="ids", progress=False)
        assert torch.equal(sample(model, 2, compile=True, **options), sample(model, 2, compile=False, **options))
    finally:
        hf_logging.disable_propagation()
    assert "not compiled: classifier-free guidance (guidance_scale)" in caplog.text
    low = sample(model, 2, precision="bfloat16", **options)  # lower precision still applies
    assert low.shape == (2, N_PX * N_PX)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": 3}, r"Unknown class 3: this model's classes are"),
        ({"class_labels": "fish"}, "Unknown class 'fish'"),
        ({"class_labels": [0, 1, 2]}, "`class_labels` holds 3 labels for 2 images"),
        ({"class_labels": 0, "guidance_scale": float("nan")}, "`guidance_scale` must be a finite number >= 0"),
        ({"class_labels": 0, "guidance_scale": -1.0}, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_scale": 3.0}, "`guidance_scale` guides towards `class_labels`"),
    ],
)
def test_bad_class_input_is_refused_by_name(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(model, 2, output_type="ids", progress=False, **kwargs)
    images = torch.zeros(2, N_PX * N_PX, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        complete(model, images, output_type="ids", progress=False, **kwargs)


@pytest.mark.parametrize("kwargs", [{"class_labels": 0}, {"guidance_scale": 2.0}])
def test_an_unconditional_model_takes_no_class_nor_guidance(kwargs):
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**TINY_DIMS)).eval()
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} need a class-conditional model"):
        sample(model, 1, output_type="ids", progress=False, **kwargs)


@pytest.mark.slow
def test_a_checkpoint_of_pretrain_reloads_with_the_same_logits(tmp_path):
    """pretrain.py --class_conditional on the digits for a few steps: id2label from the dataset's ClassLabel, bits per
    pixel with and without the class; the folder loads through the Auto classes and as remote code alike."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM

    out = tmp_path / "run"
    run_script(
        "pretrain.py",
        "--class_conditional",
        "--class_dropout",
        "0.5",
        "--max_train_steps",
        "3",
        "--per_device_train_batch_size",
        "16",
        "--config_overrides",
        "n_layer=2",
        "--output_dir",
        str(out),
    )
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_bpd", "eval_bpd_conditional"} <= results.keys()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.class_conditional and model.config.id2label == {i: str(i) for i in range(10)}
    ids = AutoImageProcessor.from_pretrained(out)(load_digits()["test"][:2]["image"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids, class_labels=torch.tensor([7, -100])).logits
    np.save(tmp_path / "ids.npy", ids.numpy())
    run_without_package(
        """
        import sys, numpy as np, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(np.load("ids.npy")), class_labels=torch.tensor([7, -100])).logits
        np.save("remote.npy", logits.numpy())
        """,
        str(out),
        cwd=tmp_path,
    )
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "remote.npy")), logits)


def test_pretrain_refuses_a_class_conditional_bert_model(tmp_path):
    error = refusal("pretrain.py", "--class_conditional", "--objective", "bert", "--output_dir", str(tmp_path / "o"))
    assert "--class_conditional trains a new AR model from a preset" in error
