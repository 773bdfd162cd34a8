"""A model larger than the memory it may use: `from_pretrained(..., device_map="auto", max_memory=..., offload_folder=...)`
(accelerate's big-model inference) keeps what fits in memory and pages the remaining blocks in from disk, and
computes exactly what the plain load computes: logits, pooled features, greedy tokens.

Run with `-s` to see the time per image of the offloaded and the plain model (the README's estimate for iGPT-L
scales it).
"""

import time

import pytest
import torch
from conftest import TINY_DIMS
from transformers import AutoModelForCausalLM

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling

DIMS = {**TINY_DIMS, "n_layer": 4}
SOS = DIMS["vocab_size"] - 1
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The same checkpoint loaded plainly and with a memory budget of a third of its size, the rest on disk."""
    root = tmp_path_factory.mktemp("big_model")
    torch.manual_seed(0)
    ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).save_pretrained(root / "model")
    plain = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    offloaded = AutoModelForCausalLM.from_pretrained(
        root / "model",
        device_map="auto",
        max_memory={"cpu": plain.get_memory_footprint() // 3},
        offload_folder=root / "offload",
    ).eval()
    return plain, offloaded, root / "offload"


def test_blocks_are_offloaded_to_disk(loaded):
    plain, offloaded, _ = loaded
    placement = offloaded.hf_device_map
    on_disk = [name for name, device in placement.items() if device == "disk"]
    # Decoder blocks go to disk whole (`_no_split_modules`): in memory they are placeholders on the meta device, read
    # from disk (the checkpoint's safetensors, or files in the offload folder) at each forward.
    assert any(name.startswith("transformer.h") for name in on_disk), placement
    assert offloaded.transformer.h[-1].attn.c_attn.weight.device == torch.device("meta")
    assert plain.transformer.h[-1].attn.c_attn.weight.device == torch.device("cpu")


def test_offloaded_model_computes_what_the_plain_load_computes(loaded):
    plain, offloaded, _ = loaded
    x = torch.randint(0, SOS, (2, DIMS["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = plain(x, output_hidden_states=True), offloaded(x, output_hidden_states=True)
        assert torch.equal(got.logits, expected.logits)
        for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(mine, theirs)
        assert torch.equal(offloaded.transformer(x).pooler_output, plain.transformer(x).pooler_output)
        layers = [1, -1]
        assert torch.equal(
            offloaded.transformer.extract_features(x, layers=layers),
            plain.transformer.extract_features(x, layers=layers),
        )


def test_offloaded_greedy_generation_gives_the_same_tokens(loaded):
    plain, offloaded, _ = loaded
    start = torch.full((2, 1), SOS)
    steps = 16  # a quarter of an 8x8 image
    timings, tokens = {}, {}
    for name, model in (("plain", plain), ("offloaded", offloaded)):
        begin = time.perf_counter()
        tokens[name] = model.generate(start, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        timings[name] = (time.perf_counter() - begin) / (len(start) * steps)
    assert tokens["offloaded"].shape == (2, steps + 1)
    assert torch.equal(tokens["offloaded"], tokens["plain"])
    print(
        f"\ngreedy decoding, {DIMS['n_layer']} blocks, placement {dict(offloaded.hf_device_map)}: "
        f"{timings['plain'] * 1e3:.1f} ms plain, {timings['offloaded'] * 1e3:.1f} ms offloaded per token and image"
    )
