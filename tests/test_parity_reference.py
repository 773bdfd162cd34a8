"""Parity with transformers' built-in ImageGPT against a stored reference, so that it holds in a release without it.

tests/fixtures/parity_reference/ holds what the built-in computed on fixed tiny weights (its own `save_pretrained`
folders, and its numbers in reference.safetensors; tests/fixtures/make_parity_reference.py wrote them). This package
loads those folders and must give the stored numbers always; where the built-in still imports, it is run live on the
same folders too, and must still give them.
"""

from pathlib import Path

import pytest
import torch
from conftest import builtin
from safetensors.torch import load_file

from image_gpt_hf import ImageGPTForCausalImageModeling, ImageGPTForImageClassification

FIXTURE = Path(__file__).parent / "fixtures" / "parity_reference"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "reference.safetensors")


def causal_outputs(model, reference) -> dict[str, torch.Tensor]:
    ids = reference["input_ids"]
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        sos = torch.full((2, 1), model.config.vocab_size - 1)
        generated = model.generate(sos, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    return {
        "logits": out.logits,
        "loss": out.loss,
        "hidden_states": torch.stack(out.hidden_states),
        "pooled_features": out.hidden_states[-1].mean(1),
        "generated_ids": generated,
    }


def classifier_outputs(model, reference) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(reference["input_ids"], labels=reference["class_labels"])
    return {"classifier_logits": out.logits, "classifier_loss": out.loss}


def assert_matches(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    for name, value in outputs.items():
        expected = reference[name]
        if expected.is_floating_point():
            torch.testing.assert_close(value, expected, atol=TOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(value, expected), name


def test_reference_is_discriminating(reference):
    """The stored weights move every output: the logits are far from uniform and greedy decoding is not constant."""
    assert reference["logits"].std() > 0.5
    assert len(reference["generated_ids"][0, 1:].unique()) > 3


def test_this_package_computes_the_stored_numbers(reference):
    causal = ImageGPTForCausalImageModeling.from_pretrained(FIXTURE / "causal").eval()
    assert_matches(causal_outputs(causal, reference), reference)
    features = causal.transformer.extract_features(reference["input_ids"], layers=[-1])[0]
    torch.testing.assert_close(features, reference["pooled_features"], atol=TOL, rtol=0)
    classifier = ImageGPTForImageClassification.from_pretrained(FIXTURE / "classifier").eval()
    assert_matches(classifier_outputs(classifier, reference), reference)


def test_the_built_in_still_computes_the_stored_numbers(reference):
    hf = builtin("modeling_imagegpt")
    causal = hf.ImageGPTForCausalImageModeling.from_pretrained(FIXTURE / "causal").eval()
    assert_matches(causal_outputs(causal, reference), reference)
    classifier = hf.ImageGPTForImageClassification.from_pretrained(FIXTURE / "classifier").eval()
    assert_matches(classifier_outputs(classifier, reference), reference)
