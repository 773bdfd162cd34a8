"""transformers pipelines on this package's checkpoints: feature extraction (built-in and with `layer`), image
classification, and both again in a process where `image_gpt_hf` cannot be imported (remote code)."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_DIMS, run_without_package
from transformers import ImageFeatureExtractionPipeline, pipeline
from transformers.dynamic_module_utils import get_imports
from transformers.utils import logging as transformers_logging

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTImageProcessor,
    ImageGPTModel,
)
from image_gpt_hf.pipelines import ImageGPTFeatureExtractionPipeline

DIMS = {**TINY_DIMS, "n_layer": 4}
LABELS = {0: "ant", 1: "bee", 2: "cat"}
TOL = 1e-5


def make_processor(seed=0):
    palette = np.random.default_rng(seed).uniform(-1, 1, (DIMS["vocab_size"] - 1, 3))
    return ImageGPTImageProcessor(clusters=palette, size={"height": 8, "width": 8})


def make_images(folder, count=2):
    """PNG files (paths work in every process) and the PIL images they hold."""
    rng = np.random.default_rng(1)
    paths, images = [], []
    for i in range(count):
        image = PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        path = os.path.join(folder, f"image_{i}.png")
        image.save(path)
        paths.append(path)
        images.append(PIL.Image.open(path).convert("RGB"))
    return paths, images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved base model + processor, the model, the processor, images and their ids."""
    folder = tmp_path_factory.mktemp("igpt")
    torch.manual_seed(0)
    model = ImageGPTModel(ImageGPTConfig(**DIMS)).eval()
    processor = make_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    paths, images = make_images(str(folder))
    ids = processor(images, return_tensors="pt")["input_ids"]
    return folder, model, processor, paths, ids


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("igpt_clf")
    torch.manual_seed(1)
    config = ImageGPTConfig(**DIMS, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = ImageGPTForImageClassification(config).eval()
    with torch.no_grad():  # spread the logits so that the ranking is not a tie
        model.score.weight.normal_(0, 1)
    model.save_pretrained(folder)
    make_processor().save_pretrained(folder)
    return folder, model


def layer_features(model, ids, layer):
    return model.extract_features(ids, layers=[layer], pool=False)[0]


# ------------------------------------------------------------------------------------------ built-in pipeline


def test_builtin_pipeline_gives_last_layer_per_pixel_and_paper_feature_pooled(checkpoint):
    folder, model, _, paths, ids = checkpoint
    extractor = pipeline("image-feature-extraction", model=str(folder))
    assert type(extractor) is ImageFeatureExtractionPipeline
    assert type(extractor.model) is ImageGPTModel and isinstance(extractor.image_processor, ImageGPTImageProcessor)

    per_pixel = extractor(paths[0], return_tensors=True)
    assert per_pixel.shape == (1, 64, DIMS["n_embd"])
    torch.testing.assert_close(per_pixel[0], layer_features(model, ids, DIMS["n_layer"])[0], atol=TOL, rtol=0)

    pooled = extractor(paths[0], pool=True, return_tensors=True)
    middle = DIMS["n_layer"] // 2
    assert pooled.shape == (1, DIMS["n_embd"])
    torch.testing.assert_close(pooled[0], model.extract_features(ids, layers=[middle])[0, 0], atol=TOL, rtol=0)
    # The paper's feature is not the mean of the last layer.
    assert not torch.allclose(pooled[0], per_pixel[0].mean(0), atol=1e-3)

    as_lists = extractor(paths, pool=True)
    assert len(as_lists) == 2 and np.asarray(as_lists[1]).shape == (1, DIMS["n_embd"])
    np.testing.assert_allclose(
        np.asarray(as_lists[1])[0], model.extract_features(ids, layers=[middle])[0, 1].numpy(), atol=TOL
    )


@pytest.mark.parametrize("feature_layer", [1, -1])
def test_builtin_pipeline_pools_the_layer_the_config_names(checkpoint, feature_layer):
    folder, model, _, paths, ids = checkpoint
    extractor = pipeline("image-feature-extraction", model=str(folder), model_kwargs={"feature_layer": feature_layer})
    pooled = extractor(paths[0], pool=True, return_tensors=True)
    expected = model.extract_features(ids, layers=[feature_layer])[0, 0]
    torch.testing.assert_close(pooled[0], expected, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------- ImageGPTFeatureExtractionPipeline


@pytest.fixture(scope="module")
def layer_extractor(checkpoint):
    folder = checkpoint[0]
    return pipeline("image-feature-extraction", model=str(folder), pipeline_class=ImageGPTFeatureExtractionPipeline)


@pytest.mark.parametrize("layer", [0, 1, 4, -2])
def test_layer_argument_gives_that_layer_per_pixel_and_pooled(checkpoint, layer_extractor, layer):
    _, model, _, paths, ids = checkpoint
    assert type(layer_extractor) is ImageGPTFeatureExtractionPipeline
    expected = layer_features(model, ids, layer)  # (2, 64, d)
    per_pixel = layer_extractor(paths[1], layer=layer, return_tensors=True)
    torch.testing.assert_close(per_pixel[0], expected[1], atol=TOL, rtol=0)
    pooled = layer_extractor(paths[1], layer=layer, pool=True, return_tensors=True)
    torch.testing.assert_close(pooled[0], expected[1].mean(0), atol=TOL, rtol=0)
    batched = layer_extractor(paths, layer=layer, pool=True, return_tensors=True, batch_size=2)
    torch.testing.assert_close(torch.cat(batched), expected.mean(1), atol=TOL, rtol=0)


def test_layer_chosen_per_call_overrides_the_pipeline_default(checkpoint):
    folder, model, _, paths, ids = checkpoint
    extractor = pipeline(
        "image-feature-extraction", model=str(folder), pipeline_class=ImageGPTFeatureExtractionPipeline, layer=1
    )
    at_three = extractor(paths[0], layer=3, return_tensors=True)
    torch.testing.assert_close(at_three[0], layer_features(model, ids, 3)[0], atol=TOL, rtol=0)
    again = extractor(paths[0], return_tensors=True)  # back to the pipeline's own layer
    torch.testing.assert_close(again[0], layer_features(model, ids, 1)[0], atol=TOL, rtol=0)


def test_without_layer_the_subclass_returns_what_the_builtin_returns(checkpoint, layer_extractor):
    folder, *_, paths, _ = checkpoint
    builtin = pipeline("image-feature-extraction", model=str(folder))
    for pool in (False, True):
        assert layer_extractor(paths[0], pool=pool) == builtin(paths[0], pool=pool)


def test_head_models_give_the_features_of_their_decoder(checkpoint):
    _, _, processor, paths, ids = checkpoint
    lm = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval()
    extractor = ImageGPTFeatureExtractionPipeline(model=lm, image_processor=processor, layer=2)
    torch.testing.assert_close(
        extractor(paths[0], return_tensors=True)[0], layer_features(lm.transformer, ids, 2)[0], atol=TOL, rtol=0
    )


@pytest.mark.parametrize("layer", [None, 2])
def test_an_image_of_another_size_is_pooled_as_given_with_a_warning(checkpoint, layer, caplog):
    _, model, processor, _, _ = checkpoint
    small = PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (4, 4, 3), dtype=np.uint8))
    extractor = ImageGPTFeatureExtractionPipeline(
        model=model, image_processor=processor, layer=layer, image_processor_kwargs={"do_resize": False}
    )
    ids = processor(small, do_resize=False, return_tensors="pt")["input_ids"]  # (1, 16)
    expected = model(ids).last_hidden_state if layer is None else layer_features(model, ids, layer)
    torch.testing.assert_close(extractor(small, return_tensors=True), expected, atol=TOL, rtol=0)
    transformers_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        pooled = extractor(small, pool=True, return_tensors=True)
    assert "Pooling 16 positions, not a whole image of n_positions=64" in caplog.text
    middle = layer_features(model, ids, DIMS["n_layer"] // 2 if layer is None else layer)
    torch.testing.assert_close(pooled, middle.mean(1), atol=TOL, rtol=0)


@pytest.mark.parametrize("layer", [5, -6, "2", 1.0])
def test_invalid_layers_are_refused_before_any_forward_pass(checkpoint, layer):
    folder, model, processor, paths, _ = checkpoint
    error = ValueError if isinstance(layer, int) else TypeError
    with pytest.raises(error, match="layer|integer"):
        ImageGPTFeatureExtractionPipeline(model=model, image_processor=processor, layer=layer)
    extractor = ImageGPTFeatureExtractionPipeline(model=model, image_processor=processor)
    with pytest.raises(error, match="layer|integer"):
        extractor(paths[0], layer=layer)


def test_save_pretrained_ships_the_pipeline_as_remote_code(checkpoint, tmp_path):
    folder, model, processor, paths, ids = checkpoint
    extractor = ImageGPTFeatureExtractionPipeline(model=model, image_processor=processor, layer=1)
    extractor.save_pretrained(tmp_path)

    files = set(os.listdir(tmp_path))
    sources = {"pipelines.py", "modeling_imagegpt.py", "configuration_imagegpt.py", "image_processing_imagegpt.py"}
    assert sources | {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    entry = {"impl": "pipelines.ImageGPTFeatureExtractionPipeline", "pt": ["AutoModel"], "type": "image"}
    assert config["custom_pipelines"] == {"image-feature-extraction": entry}
    assert config["auto_map"]["AutoModel"] == "modeling_imagegpt.ImageGPTModel"
    # Remote code may import only what any transformers user has (besides the standard library).
    assert set(get_imports(tmp_path / "pipelines.py")) - set(sys.stdlib_module_names) == {"torch", "transformers"}
    # The in-memory model does not carry the entry into folders it saves itself.
    assert not hasattr(model.config, "custom_pipelines")
    model.save_pretrained(tmp_path / "plain")
    assert "custom_pipelines" not in json.loads((tmp_path / "plain" / "config.json").read_text())

    # With the package installed, transformers wants trust_remote_code for a task the config names ...
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("image-feature-extraction", model=str(tmp_path))
    # ... or the class itself, which runs this package's code, not the folder's.
    again = pipeline(
        "image-feature-extraction", model=str(tmp_path), pipeline_class=ImageGPTFeatureExtractionPipeline, layer=1
    )
    assert type(again) is ImageGPTFeatureExtractionPipeline and type(again.model) is ImageGPTModel
    torch.testing.assert_close(
        again(paths[0], return_tensors=True)[0], layer_features(model, ids, 1)[0], atol=TOL, rtol=0
    )


# -------------------------------------------------------------------------------------------- image classification


def test_image_classification_pipeline_uses_id2label(checkpoint, classifier_checkpoint):
    folder, model = classifier_checkpoint
    paths, ids = checkpoint[3], checkpoint[4]
    classifier = pipeline("image-classification", model=str(folder))
    assert type(classifier.model) is ImageGPTForImageClassification

    predictions = classifier(paths[0])
    probabilities = model(ids[:1]).logits.softmax(-1)[0]
    expected = sorted(
        ({"label": LABELS[i], "score": p.item()} for i, p in enumerate(probabilities)), key=lambda x: -x["score"]
    )
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    np.testing.assert_allclose([p["score"] for p in predictions], [e["score"] for e in expected], atol=1e-5)
    assert [p["label"] for p in classifier(paths[0], top_k=1)] == [expected[0]["label"]]


# ------------------------------------------------------------------------------ remote code, package not importable

REMOTE_SCRIPT = """
import sys
import torch
from transformers import pipeline

plain, saved_pipeline, classifier_folder, out, *paths = sys.argv[1:]
results = {}

extractor = pipeline("image-feature-extraction", model=plain, trust_remote_code=True)
assert type(extractor.model).__module__.startswith("transformers_modules"), type(extractor.model).__module__
assert type(extractor.image_processor).__module__.startswith("transformers_modules")
results["builtin_per_pixel"] = extractor(paths[0], return_tensors=True)
results["builtin_pooled"] = extractor(paths[0], pool=True, return_tensors=True)
by_config = pipeline(
    "image-feature-extraction", model=plain, trust_remote_code=True, model_kwargs={"feature_layer": 1}
)
results["config_layer_1_pooled"] = by_config(paths[0], pool=True, return_tensors=True)

# The task and the pipeline class come from the folder's config.json and pipelines.py.
custom = pipeline(model=saved_pipeline, trust_remote_code=True, layer=3)
assert type(custom).__name__ == "ImageGPTFeatureExtractionPipeline", type(custom)
assert type(custom).__module__.startswith("transformers_modules"), type(custom).__module__
assert custom.task == "image-feature-extraction"
results["layer_3_per_pixel"] = custom(paths[0], return_tensors=True)
results["layer_1_pooled"] = custom(paths[0], layer=1, pool=True, return_tensors=True)

classifier = pipeline("image-classification", model=classifier_folder, trust_remote_code=True)
assert type(classifier.model).__module__.startswith("transformers_modules")
results["labels"] = [p["label"] for p in classifier(paths[0])]
results["scores"] = torch.tensor([p["score"] for p in classifier(paths[0])])
torch.save(results, out)
"""


def test_pipelines_with_remote_code_where_the_package_cannot_be_imported(checkpoint, classifier_checkpoint, tmp_path):
    folder, model, processor, paths, ids = checkpoint
    classifier_folder, classifier = classifier_checkpoint
    saved_pipeline = tmp_path / "with_pipeline"
    ImageGPTFeatureExtractionPipeline(model=model, image_processor=processor).save_pretrained(saved_pipeline)

    out = tmp_path / "results.pt"
    run_without_package(
        REMOTE_SCRIPT, str(folder), str(saved_pipeline), str(classifier_folder), str(out), *paths, cwd=tmp_path
    )
    results = torch.load(out)

    first = ids[:1]
    torch.testing.assert_close(results["builtin_per_pixel"], layer_features(model, first, -1), atol=TOL, rtol=0)
    torch.testing.assert_close(results["builtin_pooled"], model(first).pooler_output, atol=TOL, rtol=0)
    torch.testing.assert_close(
        results["config_layer_1_pooled"], model.extract_features(first, layers=[1])[0], atol=TOL, rtol=0
    )
    torch.testing.assert_close(results["layer_3_per_pixel"], layer_features(model, first, 3), atol=TOL, rtol=0)
    torch.testing.assert_close(results["layer_1_pooled"], layer_features(model, first, 1).mean(1), atol=TOL, rtol=0)
    probabilities = classifier(first).logits.softmax(-1)[0]
    order = probabilities.argsort(descending=True)
    assert results["labels"] == [LABELS[int(i)] for i in order]
    torch.testing.assert_close(results["scores"], probabilities[order], atol=1e-5, rtol=0)


def test_a_16_bit_png_gives_the_same_features_as_a_path_and_as_a_pil_image(checkpoint, tmp_path):
    """The pipeline hands paths to the processor's own reader: transformers' `load_image` would make this file white."""
    folder, model, *_ = checkpoint
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(12, axis=0).repeat(4, axis=1)  # 12x12, 3 grays
    PIL.Image.fromarray(levels).save(tmp_path / "gray16.png")
    extractor = pipeline(
        "image-feature-extraction", model=str(folder), pipeline_class=ImageGPTFeatureExtractionPipeline
    )
    from_path = extractor(str(tmp_path / "gray16.png"), return_tensors=True)
    with PIL.Image.open(tmp_path / "gray16.png") as opened:
        from_image = extractor(opened, return_tensors=True)
        ids = extractor.image_processor(opened, return_tensors="pt")["input_ids"]
    assert ids.unique().numel() > 1  # not all white
    assert torch.equal(from_path, from_image)
    assert (from_path - model(ids).last_hidden_state).abs().max() < TOL
