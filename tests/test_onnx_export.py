"""ONNX export (image_gpt_hf/onnx_export.py): onnxruntime against PyTorch for features, classification and greedy
decoding, AR and BERT checkpoints, batch sizes 1 and 3; and the refusals, which leave nothing behind.

Every export takes a few seconds (torch.export, then the ONNX translation): those tests are slow and share one
export per checkpoint and task. The fast tier checks the refusals, which come before any export.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import TINY_DIMS  # noqa: E402
from transformers import GPT2Config, pipeline  # noqa: E402

from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
    ImageGPTModel,
)
from image_gpt_hf.onnx_export import ONNX_FILE, export_onnx, greedy_generate, main  # noqa: E402

DIMS = {**TINY_DIMS, "n_layer": 2, "n_head": 2}
TOL = 1e-4
BATCH_SIZES = (1, 3)
PRETRAINED = {"ar": ImageGPTForCausalImageModeling, "bert": ImageGPTForMaskedImageModeling}


def make_processor():
    palette = np.random.default_rng(0).uniform(-1, 1, (DIMS["vocab_size"] - 1, 3))
    return ImageGPTImageProcessor(clusters=palette, size={"height": 8, "width": 8})


def save(model, folder, processor=True):
    model.save_pretrained(folder)
    if processor:
        make_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved tiny random checkpoints: AR (OpenAI's `prepend_sos` inputs, pooled feature of layer 1), BERT, and a
    classifier of each (AR on the final layer, BERT on layer 1)."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    ar = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS, prepend_sos=True, feature_layer=1)).eval()
    bert = ImageGPTForMaskedImageModeling(ImageGPTConfig(**DIMS, objective="bert")).eval()
    classifiers = {}
    for objective, layer in (("ar", None), ("bert", 1)):
        config = ImageGPTConfig(**DIMS, objective=objective, num_labels=3, classifier_layer=layer)
        classifiers[objective] = ImageGPTForImageClassification(config).eval()
        with torch.no_grad():  # logits of order 1, so that the tolerance means something
            classifiers[objective].score.weight.normal_(0, 1)
    return {
        "ar": save(ar, root / "ar"),
        "bert": save(bert, root / "bert"),
        "ar-clf": save(classifiers["ar"], root / "ar-clf"),
        "bert-clf": save(classifiers["bert"], root / "bert-clf", processor=False),
    }


def ids_for(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, DIMS["vocab_size"] - 1, (batch_size, DIMS["n_positions"]), generator=generator)


def run(folder, ids):
    session = ort.InferenceSession(os.fspath(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input_ids": ids.numpy()})))


def assert_close(ours, reference):
    assert ours.shape == tuple(reference.shape)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------ exports (slow)


@pytest.fixture(scope="module")
def feature_exports(checkpoints, tmp_path_factory):
    """Feature-extraction exports of the AR checkpoint (through the command line, with two extra layers) and of the
    BERT checkpoint (through the library)."""
    root = tmp_path_factory.mktemp("onnx_features")
    main(["--model_name_or_path", os.fspath(checkpoints["ar"]), "--output_dir", os.fspath(root / "ar")]
         + ["--task", "feature-extraction", "--layers", "0", "-1"])  # fmt: skip
    export_onnx(checkpoints["bert"], root / "bert", "feature-extraction", layers=[1])
    return {"ar": (root / "ar", [0, 2]), "bert": (root / "bert", [1])}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "bert"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_features_match_pytorch(checkpoints, feature_exports, objective, batch_size):
    folder, layers = feature_exports[objective]
    model = PRETRAINED[objective].from_pretrained(checkpoints[objective]).transformer.eval()
    ids = ids_for(batch_size, seed=batch_size)
    ours = run(folder, ids)
    with torch.no_grad():
        outputs = model(ids)
        assert_close(ours["last_hidden_state"], outputs.last_hidden_state)
        assert_close(ours["pooler_output"], outputs.pooler_output)
        for layer in layers:
            assert_close(ours[f"features.{layer}"], model.extract_features(ids, layers=[layer], pool=False)[0])
            assert_close(ours[f"pooled_features.{layer}"], model.extract_features(ids, layers=[layer], pool=True)[0])
    assert set(ours) == {"last_hidden_state", "pooler_output"} | {
        f"{kind}.{layer}" for layer in layers for kind in ("features", "pooled_features")
    }


@pytest.mark.slow
def test_features_are_the_pipelines_from_the_exported_folder(checkpoints, feature_exports):
    """The folder carries the checkpoint's processor and config: images -> ids -> onnxruntime gives what
    `pipeline("image-feature-extraction")` gives on the PyTorch checkpoint, per pixel and pooled."""
    folder, _ = feature_exports["ar"]
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(3)]
    processor = ImageGPTImageProcessor.from_pretrained(folder)
    config = ImageGPTConfig.from_pretrained(folder)
    assert (
        config.prepend_sos
        and config.feature_layer == 1
        and "auto_map" not in json.loads((folder / "config.json").read_text())
    )
    ours = run(folder, processor(images, return_tensors="pt")["input_ids"])
    extractor = pipeline("image-feature-extraction", model=os.fspath(checkpoints["ar"]))
    pooled = torch.cat(extractor(images, pool=True, return_tensors=True))
    np.testing.assert_allclose(ours["pooler_output"], pooled, rtol=0, atol=TOL)
    per_pixel = torch.cat(extractor(images, return_tensors=True))
    np.testing.assert_allclose(ours["last_hidden_state"], per_pixel, rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def classifier_exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_classifiers")
    for objective in ("ar", "bert"):
        export_onnx(checkpoints[f"{objective}-clf"], root / objective, "image-classification")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "bert"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_classifier_matches_pytorch(checkpoints, classifier_exports, objective, batch_size):
    model = ImageGPTForImageClassification.from_pretrained(checkpoints[f"{objective}-clf"]).eval()
    ids = ids_for(batch_size, seed=10 + batch_size)
    ours = run(classifier_exports / objective, ids)
    with torch.no_grad():
        reference = model(ids).logits
    assert list(ours) == ["logits"] and reference.abs().max() > 0.1
    assert_close(ours["logits"], reference)


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    """A causal-lm export of an in-memory AR model (training mode, which the export must not bake in)."""
    torch.manual_seed(1)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS))
    with torch.no_grad():  # sharper next-pixel distributions: greedy choices far from ties
        model.lm_head.weight.mul_(20)
    folder = tmp_path_factory.mktemp("onnx_lm") / "lm"
    result = export_onnx(model, folder, "causal-lm")
    assert model.training  # the model is handed back as it came
    return model.eval(), folder, result


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_greedy_tokens_equal_generate(lm_export, batch_size):
    model, folder, result = lm_export
    assert result.inputs == ["input_ids", "past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    sos = torch.full((batch_size, 1), model.config.sos_token_id)
    reference = model.generate(sos, do_sample=False, max_length=model.config.n_positions + 1)
    ours = greedy_generate(folder, sos)
    assert ours.shape == (batch_size, model.config.n_positions + 1)
    np.testing.assert_array_equal(ours, reference.numpy())
    assert len({tuple(row) for row in ours[:, 1:].tolist()}) == 1  # from SOS alone every row is the same image


@pytest.mark.slow
def test_greedy_completions_equal_generate(lm_export):
    """A prompt of SOS and the top rows of images, completed to part of the image, as `generate` completes it."""
    model, folder, _ = lm_export
    prompt = torch.cat([torch.full((3, 1), model.config.sos_token_id), ids_for(3, seed=5)[:, :16]], dim=1)
    session = ort.InferenceSession(os.fspath(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    ours = greedy_generate(session, prompt.numpy(), max_length=40)
    reference = model.generate(prompt, do_sample=False, max_length=40)
    np.testing.assert_array_equal(ours, reference.numpy())
    assert len({tuple(row) for row in ours[:, 17:].tolist()}) > 1  # different prompts, different completions


@pytest.mark.slow
def test_greedy_generate_refuses_what_it_cannot_decode(lm_export, feature_exports):
    model, folder, _ = lm_export
    sos = np.full((2, 1), model.config.sos_token_id)
    with pytest.raises(ValueError, match="max_length.*n_positions \\+ 1 = 65"):
        greedy_generate(folder, sos, max_length=66)
    with pytest.raises(ValueError, match="'feature-extraction' export.*--task causal-lm"):
        greedy_generate(feature_exports["bert"][0], sos)


@pytest.mark.slow
@pytest.mark.parametrize("bad_id", [-1, -5, DIMS["vocab_size"]])
def test_exported_graphs_refuse_ids_outside_the_vocabulary(feature_exports, classifier_exports, lm_export, bad_id):
    """ONNX's Gather reads -1 from the end of the table (it gave SOS's output); every exported graph refuses it."""
    ids = ids_for(1, seed=3)
    ids[0, 10] = bad_id
    with pytest.raises(Exception, match="out of data bounds"):
        run(feature_exports["bert"][0], ids)
    with pytest.raises(Exception, match="out of data bounds"):
        run(classifier_exports / "ar", ids)
    model, folder, _ = lm_export
    session = ort.InferenceSession(os.fspath(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    head_dim = DIMS["n_embd"] // DIMS["n_head"]
    past = {spec.name: np.zeros((1, DIMS["n_head"], 0, head_dim), np.float32) for spec in session.get_inputs()[1:]}
    prompt = np.array([[model.config.sos_token_id, 3, bad_id]])
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(None, {"input_ids": prompt, **past})
    assert session.run(None, {"input_ids": prompt[:, :2], **past})[0].shape == (1, 2, DIMS["vocab_size"] - 1)


@pytest.mark.slow
def test_a_failed_check_writes_nothing(checkpoints, tmp_path):
    """The onnxruntime check runs before the folder is put in place: a mismatch leaves no output, no staging."""
    with pytest.raises(ValueError, match="differs from PyTorch's"):
        export_onnx(checkpoints["bert"], tmp_path / "out", "feature-extraction", atol=1e-12)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ refusals (fast)


def test_other_model_type_is_refused(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' checkpoint, not an Image GPT one"):
        export_onnx(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_the_tasks_head_is_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="no classification head.*score.weight.*random ones"):
        export_onnx(checkpoints["ar"], tmp_path / "out", "image-classification")
    with pytest.raises(ValueError, match="causal-lm needs an autoregressive checkpoint.*objective='bert'"):
        export_onnx(checkpoints["bert"], tmp_path / "out", "causal-lm")
    assert not (tmp_path / "out").exists()


def test_in_memory_models_are_checked():
    model = ImageGPTModel(ImageGPTConfig(**DIMS))
    with pytest.raises(ValueError, match="needs an ImageGPTForImageClassification, got ImageGPTModel"):
        export_onnx(model, "unused", "image-classification")
    with pytest.raises(ValueError, match="torch.bfloat16.*model.float\\(\\)"):
        export_onnx(model.to(torch.bfloat16), "unused")
    assert not os.path.exists("unused")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task": "masked-im"}, "--task 'masked-im' is not one of"),
        ({"task": "causal-lm", "layers": [1]}, "--layers .* feature-extraction, not"),
        ({"layers": [3]}, "Layer 3 is not a hidden-state index of a 2-layer model"),
    ],
)
def test_unsupported_options_are_refused(checkpoints, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(checkpoints["ar"], tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_opset_the_exporter_cannot_write_is_refused(checkpoints, tmp_path):
    """The exporter falls back to another opset than the one asked for (a warning, not an error): refused."""
    with pytest.raises(ValueError, match="wrote opset .* instead of the requested --opset 17"):
        export_onnx(checkpoints["ar"], tmp_path / "out", opset=17)
    assert not (tmp_path / "out").exists()


def test_cli_keeps_an_existing_folder(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--model_name_or_path", os.fspath(checkpoints["ar"]), "--output_dir", os.fspath(out)]
    with pytest.raises(SystemExit, match="igpt-export-onnx: --output_dir .* is not empty.*--overwrite"):
        main(argv)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="is the input"):  # never into its own input, whatever --overwrite says
        main(["--model_name_or_path", os.fspath(checkpoints["ar"]), "--output_dir", os.fspath(checkpoints["ar"])])


def test_cli_reports_a_bad_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="igpt-export-onnx: .*config.json"):
        main(["--model_name_or_path", os.fspath(tmp_path / "empty"), "--output_dir", os.fspath(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
