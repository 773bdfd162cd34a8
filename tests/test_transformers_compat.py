"""Each touchpoint that depends on the transformers release (image_gpt_hf/transformers_compat.py), checked against
the installed release: CI runs this file on the lowest supported release and on the newest one."""

import dataclasses
import inspect
import warnings

import pytest
import torch
from conftest import TINY_DIMS
from transformers import DynamicCache, GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as transformers_logging

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.transformers_compat import (
    CACHE_OUTPUT_FIELD,
    MASK_CACHE_ARGUMENT,
    cache_output,
    mask_cache_argument,
    output_cache,
)

DIMS = {**TINY_DIMS, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}


def test_cache_output_field_is_the_releases():
    fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    assert CACHE_OUTPUT_FIELD in fields
    assert {"cache", "past_key_values"} & fields == {CACHE_OUTPUT_FIELD}
    cache = DynamicCache()
    out = CausalLMOutputWithPast(logits=torch.zeros(1), **cache_output(cache))
    assert output_cache(out) is cache
    assert output_cache(CausalLMOutputWithPast(logits=torch.zeros(1))) is None


def test_generate_feeds_the_cache_under_the_output_field_name():
    # generate() carries the cache from one step's outputs into the next step's inputs under one name.
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert CACHE_OUTPUT_FIELD in parameters


@pytest.mark.parametrize("create_mask", [create_causal_mask, create_bidirectional_mask])
def test_masking_utilities_take_the_cache_without_a_warning(create_mask):
    assert MASK_CACHE_ARGUMENT in inspect.signature(create_mask).parameters
    config = ImageGPTConfig(**DIMS, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning for the cache keyword fails the test
        mask = create_mask(
            config=config,
            inputs_embeds=torch.zeros(1, 3, 16),
            attention_mask=torch.tensor([[0, 1, 1]]),
            **mask_cache_argument(None),
        )
    assert mask.shape[-2:] == (3, 3) and bool((mask[0, 0, :, 0] < 0).all())  # the padded key is masked everywhere


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_model_takes_the_cache_under_both_names_and_returns_it_under_the_releases(name):
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval()
    x = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(0))
    full = model(x, use_cache=False).logits
    first = model(x[:, :6], use_cache=True)
    cache = output_cache(first)
    assert cache is not None and cache.get_seq_length() == 6
    # The old name warns where the installed release has renamed it, as transformers' own models do; else nothing.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = model(x[:, 6:], use_cache=True, **{name: cache})
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    if name == "past_key_values" and CACHE_OUTPUT_FIELD == "cache":
        assert len(future) == 1 and "`past_key_values` is deprecated" in future[0]
    else:
        assert future == []
    assert output_cache(step) is cache and cache.get_seq_length() == 10
    assert (torch.cat([first.logits, step.logits], 1) - full).abs().max() < 1e-5


def test_no_deprecation_message_from_this_packages_use_of_transformers(tmp_path, capfd):
    """Forward with and without a cache, generate() with a dynamic and a static cache, save and load, on whichever
    release is installed: transformers prints no deprecation notice (its `warning_once` messages go to stderr)."""
    transformers_logging.warning_once.cache_clear()  # a notice printed earlier in the session would not repeat
    config = ImageGPTConfig(**DIMS)
    model = ImageGPTForCausalImageModeling(config).eval()
    start = torch.full((2, 1), config.sos_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model(torch.randint(0, 16, (2, 5)), use_cache=True)
        model(torch.randint(0, 16, (2, 1)), cache=output_cache(out), use_cache=True, output_hidden_states=True)
        model.generate(start, max_new_tokens=6, do_sample=False)
        model.generate(start, max_new_tokens=6, do_sample=False, cache_implementation="static")
        model.save_pretrained(tmp_path)
        ImageGPTForCausalImageModeling.from_pretrained(tmp_path)(start)
    err = capfd.readouterr().err.lower()
    assert "deprecat" not in err and "will be removed" not in err, err
