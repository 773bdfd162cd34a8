"""conversion/: OpenAI's TF checkpoints and Hub-layout folders become image_gpt_hf checkpoints, verified.

The OpenAI checkpoints here are written with TensorFlow in OpenAI's exact layout (tf.compat.v1 variables under scope
`model/`, Adam slots, `global_step`, tf.compat.v1.train.Saver, one of them sharded over several devices), tiny enough
for CPU. The converted folders are compared with `conversion/openai_reference.py`, a NumPy re-implementation of
OpenAI's forward pass run on the TF arrays. Tests that need TensorFlow are marked `slow` and `conversion`; the Hub
converter, the palette checks and the output-path refusals run without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from safetensors.numpy import load_file as load_safetensors_numpy
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

import image_gpt_hf  # noqa: F401  (registers the Auto classes)
from conversion import cli, openai_checkpoint, verify
from conversion import convert_hub_checkpoint as hub
from conversion import convert_openai_checkpoint as convert
from conversion.openai_checkpoint import ConversionError
from conversion.openai_reference import openai_forward
from image_gpt_hf import ImageGPTForCausalImageModeling, random_bert_mask
from image_gpt_hf.image_processing_imagegpt import ImageGPTImageProcessor

# conversion/ holds scripts, not an installed package; pytest's `pythonpath = ["."]` (pyproject.toml) finds it.
from tests.conftest import run_without_package, snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]


def tensorflow_test(function):
    """Needs TensorFlow, to write and read checkpoints: slow."""
    return pytest.mark.slow(pytest.mark.conversion(function))


# Every size differs from the others, so a mapping that confuses two axes fails on shapes or values.
N_LAYER, N_EMBD, N_HEAD, N_PX, PALETTE, N_CLASSES = 2, 32, 4, 5, 24, 3
N_CTX = N_PX * N_PX
STEP = 1000
ATOL = 1e-4
KINDS = ("ar", "ar_clf", "bert", "bert_clf")


# ------------------------------------------------------------------------------------------------ TF checkpoints


def openai_variables(n_layer=N_LAYER, bert=False, num_classes=None, seed=0, skip_layers=(), reshape=None):
    """Random values for exactly the variables OpenAI's model() creates, by name under `model/`.

    Scales are chosen so that logits are O(1-10) and every weight visibly matters.
    """
    rng = np.random.default_rng(seed)
    d, head_dim = N_EMBD, N_EMBD // N_HEAD
    spec = {"wte": ((PALETTE, d), 1.0), "wtet": ((PALETTE, d), 0.3), "wpe": ((N_CTX, d), 0.5), "ln_f/g": ((d,), None)}
    if not bert:
        spec["sos"] = ((d,), 1.0)
    if num_classes:
        spec["clf/wclf"] = ((num_classes, d), 0.3)
    for i in (i for i in range(n_layer) if i not in skip_layers):
        spec[f"h{i}/ln_1/g"] = spec[f"h{i}/ln_2/g"] = ((d,), None)
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            spec[f"h{i}/attn/{name}"] = ((N_HEAD, head_dim, d), d**-0.5)
        spec[f"h{i}/mlp/c_fc/w"] = ((d, 4 * d), d**-0.5)
        spec[f"h{i}/mlp/c_proj/w"] = ((4 * d, d), (4 * d) ** -0.5)
    for name, shape in (reshape or {}).items():
        spec[name] = (shape, 0.1)
    return {
        name: (1 + 0.2 * rng.standard_normal(shape) if std is None else std * rng.standard_normal(shape)).astype(
            np.float32
        )
        for name, (shape, std) in spec.items()
    }


def write_openai_checkpoint(
    directory: Path, values: dict[str, np.ndarray], num_devices: int = 1, optimizer: bool = True
) -> str:
    """Save `values` as OpenAI's training saved them: graph-mode variables under `model/`, one Adam step taken (so the
    `/Adam`, `/Adam_1` slots, `beta1_power`, `beta2_power` and `global_step` exist and hold values), and a sharded
    tf.compat.v1 Saver. Variables spread over `num_devices` CPU devices give one data shard per device.
    `optimizer=False` saves the model variables alone (building Adam's graph is most of the time taken here)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        variables = []
        with tf.compat.v1.variable_scope("model"):
            for k, (name, value) in enumerate(values.items()):
                *scopes, leaf = name.split("/")
                with contextlib.ExitStack() as stack:
                    for scope in scopes:
                        stack.enter_context(tf.compat.v1.variable_scope(scope))
                    with tf.device(f"/cpu:{k % num_devices}"):
                        variables.append(tf.compat.v1.get_variable(leaf, initializer=tf.constant(value)))
        if optimizer:
            global_step = tf.compat.v1.train.get_or_create_global_step()
            loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
            train = tf.compat.v1.train.AdamOptimizer(1e-3).minimize(loss, global_step=global_step)
        saver = tf.compat.v1.train.Saver(sharded=True)
        session_config = tf.compat.v1.ConfigProto(device_count={"CPU": num_devices})
        with tf.compat.v1.Session(graph=graph, config=session_config) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            if optimizer:
                session.run(train)
            directory.mkdir(parents=True, exist_ok=True)
            return saver.save(session, str(directory / "model.ckpt"), global_step=STEP)


def read_tf_weights(prefix: str) -> dict[str, np.ndarray]:
    """The model weights as TensorFlow reads them back (Adam changed them a little), without optimizer state."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    names = reader.get_variable_to_shape_map()
    return {
        n: reader.get_tensor(n)
        for n in names
        if n.startswith("model/") and not n.rsplit("/", 1)[-1].startswith("Adam")
    }


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip(
        "tensorflow", reason="TensorFlow is not installed: `pip install image_gpt_hf[conversion]` to run these tests"
    )


@pytest.fixture(scope="module")
def palette_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("palette") / "kmeans_centers.npy"
    np.save(path, np.random.default_rng(1).uniform(-1, 1, (PALETTE, 3)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def checkpoints(tf, tmp_path_factory) -> dict[str, str]:
    """One checkpoint per kind; the AR one is spread over 3 devices, so it is written as 4 data shards."""
    root = tmp_path_factory.mktemp("openai")
    return {
        "ar": write_openai_checkpoint(root / "ar", openai_variables(seed=2), num_devices=3),
        "ar_clf": write_openai_checkpoint(root / "ar_clf", openai_variables(num_classes=N_CLASSES, seed=3)),
        "bert": write_openai_checkpoint(root / "bert", openai_variables(bert=True, seed=4)),
        "bert_clf": write_openai_checkpoint(
            root / "bert_clf", openai_variables(bert=True, num_classes=N_CLASSES, seed=5)
        ),
    }


@pytest.fixture(scope="module")
def converted(checkpoints, palette_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for kind, prefix in checkpoints.items():
        folders[kind] = root / kind
        argv = ["--checkpoint", prefix, "--clusters", str(palette_file), "--output_dir", str(folders[kind])]
        assert convert.main(argv) == 0
    return folders


def random_tokens(batch=3, seed=7):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, PALETTE, (batch, N_CTX))
    keep = rng.random((batch, N_CTX)) > 0.15
    keep[:, 3] = False  # every image has a masked position
    return tokens, keep


def max_diff(ours: torch.Tensor, reference: np.ndarray | float) -> float:
    return float(np.max(np.abs(ours.detach().double().numpy() - np.asarray(reference))))


def tree(path: Path) -> list[str]:
    """Everything below `path` (names relative to it), to check that a failed conversion left nothing behind."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def run_cli(main, argv, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level("ERROR"):
        status = main([str(a) for a in argv])
    return status, caplog.text


# -------------------------------------------------------------------------------------------- the reference itself


def test_reference_follows_openai_semantics():
    """Causality, BERT masking, sos and the two losses, checked on the reference alone (no converter involved)."""
    weights = {f"model/{k}": v for k, v in openai_variables(num_classes=N_CLASSES).items()}
    tokens, _ = random_tokens(batch=2)
    out = openai_forward(weights, tokens)
    changed = tokens.copy()
    changed[:, 10] = (changed[:, 10] + 1) % PALETTE
    out2 = openai_forward(weights, changed)
    # Token t is input at position t + 1 only: logits up to t do not see it, the ones after do.
    np.testing.assert_array_equal(out.gen_logits[:, :11], out2.gen_logits[:, :11])
    assert np.abs(out.gen_logits[:, 11:] - out2.gen_logits[:, 11:]).min() > 0
    log_probs = out.gen_logits - np.log(np.exp(out.gen_logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, tokens[..., None], -1).mean()
    assert out.gen_loss == pytest.approx(expected, abs=1e-12)
    assert out.clf_logits.shape == (2, N_CLASSES)
    np.testing.assert_allclose(out.clf_logits, out.hidden_states.mean(1) @ weights["model/clf/wclf"].T, atol=1e-12)

    bert = {f"model/{k}": v for k, v in openai_variables(bert=True).items()}
    keep = np.ones_like(tokens, dtype=bool)
    keep[0, [2, 5]] = keep[1, 7] = False
    out = openai_forward(bert, tokens, keep)
    # A masked token's identity is invisible: only its position embedding enters the model.
    out2 = openai_forward(bert, np.where(keep, tokens, (tokens + 3) % PALETTE), keep)
    np.testing.assert_allclose(out.gen_logits, out2.gen_logits, atol=1e-12)
    token_loss = -np.take_along_axis(
        out.gen_logits - np.log(np.exp(out.gen_logits).sum(-1, keepdims=True)), tokens[..., None], -1
    )[..., 0]
    expected = np.mean([token_loss[0, [2, 5]].mean(), token_loss[1, 7]])
    assert out.gen_loss == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="pass `keep`"):
        openai_forward(bert, tokens)


def test_tensorflow_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"image_gpt_hf\[conversion\]"):
        openai_checkpoint.import_tensorflow()


# ------------------------------------------------------------------------------------------ OpenAI checkpoints


@tensorflow_test
def test_checkpoints_have_openais_layout(checkpoints, tf):
    names = dict(tf.train.list_variables(checkpoints["ar"]))
    assert names["model/h0/attn/q_proj"] == [N_HEAD, N_EMBD // N_HEAD, N_EMBD]
    assert names["model/wte"] == [PALETTE, N_EMBD] and names["model/sos"] == [N_EMBD]
    assert {"global_step", "beta1_power", "model/wte/Adam", "model/wte/Adam_1"} <= set(names)
    assert "model/sos" not in dict(tf.train.list_variables(checkpoints["bert"]))
    shards = sorted(Path(checkpoints["ar"]).parent.glob("model.ckpt-1000.data-*"))
    assert [p.name.split(".")[-1] for p in shards] == [f"data-{i:05d}-of-00004" for i in range(4)]


@pytest.mark.parametrize("kind", KINDS)
@tensorflow_test
def test_converted_folder_contents(kind, converted, checkpoints, palette_file):
    folder = converted[kind]
    bert, clf = kind.startswith("bert"), kind.endswith("clf")
    config = json.loads((folder / "config.json").read_text())
    shape = [config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "objective")]
    assert shape == [PALETTE + 1, N_CTX, N_EMBD, N_LAYER, N_HEAD, "bert" if bert else "ar"]
    assert config["prepend_sos"] is (not bert) and config["activation_function"] == "quick_gelu"
    assert config["resid_pdrop"] == config["attn_pdrop"] == config["embd_pdrop"] == 0.0
    head = "ImageClassification" if clf else "MaskedImageModeling" if bert else "CausalImageModeling"
    assert config["architectures"] == [f"ImageGPTFor{head}"]
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM", "AutoModelForMaskedImageModeling"}
    for source in ("configuration_imagegpt.py", "modeling_imagegpt.py", "image_processing_imagegpt.py"):
        assert (folder / source).is_file()
    if clf:
        assert len(config["id2label"]) == N_CLASSES and config["gen_loss_weight"] == 1.0

    weights = load_safetensors_numpy(folder / "model.safetensors")
    tf_weights = read_tf_weights(checkpoints[kind])
    sos_row = weights["transformer.wte.weight"][-1]
    np.testing.assert_array_equal(sos_row, np.zeros(N_EMBD) if bert else tf_weights["model/sos"])
    assert all(not v.any() for k, v in weights.items() if k.endswith(".bias"))
    assert ("score.weight" in weights) is clf

    processor = ImageGPTImageProcessor.from_pretrained(folder)
    np.testing.assert_allclose(np.asarray(processor.clusters), np.load(palette_file), atol=1e-7)
    assert processor.size["height"] == processor.size["width"] == N_PX

    generation = folder / "generation_config.json"
    assert generation.is_file() is not bert
    if not bert:
        generation = json.loads(generation.read_text())
        assert generation["bos_token_id"] == PALETTE and generation["max_length"] == N_CTX + 1
        assert generation["do_sample"] is True

    card = (folder / "README.md").read_text()
    objective = "BERT" if bert else "AR"
    assert f"# iGPT ({N_LAYER} layers, width {N_EMBD}) {objective} {N_PX}x{N_PX}" in card
    assert f"{objective} objective, {STEP:,} training steps (TensorFlow checkpoint `model.ckpt-{STEP}`)" in card
    assert "Verified at conversion" in card and ("masked logits" if bert else "causal logits") in card
    assert ("SOS row" in card) is bert
    assert not list(folder.parent.glob(".*tmp-*"))


@pytest.mark.parametrize("kind", KINDS)
@tensorflow_test
def test_heads_match_openai_reference(kind, converted, checkpoints):
    folder, bert = converted[kind], kind.startswith("bert")
    reference_weights = read_tf_weights(checkpoints[kind])
    tokens, keep = random_tokens()
    ref = openai_forward(reference_weights, tokens, keep if bert else None)
    ids, masked = torch.from_numpy(tokens), torch.from_numpy(~keep)

    with torch.no_grad():
        if bert:
            model = AutoModelForMaskedImageModeling.from_pretrained(folder)
            out = model(input_ids=ids, bool_masked_pos=masked, labels=ids)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
            out = model(input_ids=ids, labels=ids)  # prepend_sos comes from the converted config
        assert type(model).__module__ == "image_gpt_hf.modeling_imagegpt"
        assert max_diff(out.logits, ref.gen_logits) < ATOL
        assert abs(out.loss.item() - ref.gen_loss) < ATOL
        if kind.endswith("clf"):
            model = AutoModelForImageClassification.from_pretrained(folder)
            out = model(input_ids=ids, bool_masked_pos=masked) if bert else model(input_ids=ids)
            assert max_diff(out.logits, ref.clf_logits) < ATOL
        if kind == "ar":
            # A third implementation: transformers' own ImageGPT, fed [SOS, x_1..x_{n-1}] explicitly.
            theirs = transformers.ImageGPTForCausalImageModeling.from_pretrained(folder).eval()
            with_sos = torch.cat([torch.full_like(ids[:, :1], PALETTE), ids[:, :-1]], dim=1)
            assert max_diff(theirs(input_ids=with_sos).logits, ref.gen_logits) < ATOL


@tensorflow_test
def test_classifier_gen_loss_matches_openai(converted, checkpoints):
    """The clf checkpoints' classification model returns OpenAI's gen_loss (AR and BERT) next to the logits."""
    tokens, keep = random_tokens()
    ids, labels = torch.from_numpy(tokens), torch.tensor([0, 2, 1])
    for kind in ("ar_clf", "bert_clf"):
        bert = kind.startswith("bert")
        ref = openai_forward(read_tf_weights(checkpoints[kind]), tokens, keep if bert else None)
        model = AutoModelForImageClassification.from_pretrained(converted[kind])
        with torch.no_grad():
            kwargs = {"bool_masked_pos": torch.from_numpy(~keep)} if bert else {}
            out = model(input_ids=ids, labels=labels, **kwargs)
        assert abs(out.gen_loss.item() - ref.gen_loss) < ATOL
        clf_loss = torch.nn.functional.cross_entropy(torch.from_numpy(ref.clf_logits), labels).item()
        assert abs(out.loss.item() - (clf_loss + ref.gen_loss)) < ATOL


REMOTE_CODE_SCRIPT = """
    import numpy as np, torch
    from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForMaskedImageModeling)

    data = np.load(sys.argv[1])
    ids, masked = torch.from_numpy(data["tokens"]), torch.from_numpy(~data["keep"])
    results = {}
    for kind, folder in zip(sys.argv[3::2], sys.argv[4::2]):
        bert = kind.startswith("bert")
        with torch.no_grad():
            if bert:
                model = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True)
                out = model(input_ids=ids, bool_masked_pos=masked, labels=ids)
            else:
                model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
                out = model(input_ids=ids, labels=ids)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            results[kind + "/gen_logits"], results[kind + "/gen_loss"] = out.logits.numpy(), out.loss.numpy()
            if kind.endswith("clf"):
                model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
                out = model(input_ids=ids, bool_masked_pos=masked) if bert else model(input_ids=ids)
                results[kind + "/clf_logits"] = out.logits.numpy()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        results[kind + "/clusters"] = np.asarray(processor.clusters)
    np.savez(sys.argv[2], **results)
    """


@tensorflow_test
def test_trust_remote_code_without_the_package(converted, checkpoints, palette_file, tmp_path):
    tokens, keep = random_tokens()
    np.savez(tmp_path / "inputs.npz", tokens=tokens, keep=keep)
    argv = [str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")]
    for kind, folder in converted.items():
        argv += [kind, str(folder)]
    run_without_package(REMOTE_CODE_SCRIPT, *argv, cwd=tmp_path)
    outputs = np.load(tmp_path / "outputs.npz")
    for kind in KINDS:
        bert = kind.startswith("bert")
        ref = openai_forward(read_tf_weights(checkpoints[kind]), tokens, keep if bert else None)
        assert np.abs(outputs[kind + "/gen_logits"] - ref.gen_logits).max() < ATOL
        assert abs(float(outputs[kind + "/gen_loss"]) - ref.gen_loss) < ATOL
        if kind.endswith("clf"):
            assert np.abs(outputs[kind + "/clf_logits"] - ref.clf_logits).max() < ATOL
        np.testing.assert_allclose(outputs[kind + "/clusters"], np.load(palette_file), atol=1e-7)


@tensorflow_test
def test_sharded_safetensors(checkpoints, palette_file, tmp_path):
    out = tmp_path / "sharded"
    argv = ["--checkpoint", checkpoints["ar"], "--clusters", str(palette_file), "--output_dir", str(out)]
    assert convert.main([*argv, "--max_shard_size", "30KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    tokens, _ = random_tokens()
    ref = openai_forward(read_tf_weights(checkpoints["ar"]), tokens)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=torch.from_numpy(tokens)).logits
    assert max_diff(logits, ref.gen_logits) < ATOL


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@tensorflow_test
def test_half_precision_output(dtype, checkpoints, palette_file, tmp_path, capsys):
    out = tmp_path / dtype
    argv = ["--checkpoint", checkpoints["bert"], "--clusters", str(palette_file), "--output_dir", str(out)]
    assert convert.main([*argv, "--dtype", dtype]) == 0
    weights = load_safetensors(out / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {getattr(torch, dtype)}
    assert AutoConfig.from_pretrained(out).dtype == getattr(torch, dtype)
    assert f"| Weights dtype | {dtype} |" in (out / "README.md").read_text()
    assert verify.main([str(out), "--checkpoint", checkpoints["bert"]]) == 0
    printed = capsys.readouterr().out
    # The exact check (same rounded weights) and the cost of 16 bits (against the float32 checkpoint) are both shown.
    assert "masked logits: max abs diff" in printed and f"masked logits ({dtype} weights vs float32" in printed


@tensorflow_test
def test_verify_cli_and_eval_loss(converted, checkpoints, tmp_path, capsys):
    rng = np.random.default_rng(3)
    images = rng.integers(0, PALETTE, (5, N_CTX)).astype(np.uint16)  # OpenAI's *_teX.npy hold ids like these
    np.save(tmp_path / "toy_teX.npy", images)
    argv = [
        str(converted["ar_clf"]),
        "--checkpoint",
        checkpoints["ar_clf"],
        "--eval_npy",
        str(tmp_path / "toy_teX.npy"),
    ]
    assert verify.main([*argv, "--batch_size", "2"]) == 0
    printed = capsys.readouterr().out
    for head in ("causal logits", "causal gen_loss", "classification logits"):
        assert f"{head}: max abs diff" in printed
    ref = openai_forward(read_tf_weights(checkpoints["ar_clf"]), images.astype(np.int64))
    loss = float(printed.split("test generative loss on")[1].split(":")[1].split("nats")[0])
    assert loss == pytest.approx(ref.gen_loss, abs=1e-4)
    assert "OpenAI reports" not in printed  # a toy model has none of the released shapes

    # BERT: the loss on the 15% mask drawn from --seed, per image over its masked positions, then over images.
    loss = verify.evaluate_gen_loss(converted["bert"], tmp_path / "toy_teX.npy", batch_size=len(images), seed=3)
    masked = random_bert_mask(images.shape, 0.15, generator=torch.Generator().manual_seed(3)).numpy()
    assert masked.any(axis=1).all()  # OpenAI's loss is NaN for an image with nothing masked; this seed has none
    ref = openai_forward(read_tf_weights(checkpoints["bert"]), images.astype(np.int64), keep=~masked)
    assert loss == pytest.approx(ref.gen_loss, abs=1e-5)

    # A folder checked against a checkpoint it was not converted from is refused, not compared.
    assert verify.main([str(converted["ar"]), "--checkpoint", checkpoints["bert"]]) == 1
    assert "was not converted from this checkpoint" in capsys.readouterr().err


@tensorflow_test
def test_verify_detects_a_wrong_mapping(converted, checkpoints, tmp_path, capsys):
    """Swap two heads' query columns in the saved weights: verify.py must fail on exactly that."""
    folder = tmp_path / "tampered"
    shutil.copytree(converted["bert"], folder)
    weights = load_safetensors(folder / "model.safetensors")
    c_attn = weights["transformer.h.1.attn.c_attn.weight"]
    head_dim = N_EMBD // N_HEAD
    c_attn[:, : 2 * head_dim] = c_attn[:, : 2 * head_dim].roll(head_dim, dims=1)
    save_safetensors(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert verify.main([str(folder), "--checkpoint", checkpoints["bert"]]) == 1
    assert "masked logits: max abs diff" in capsys.readouterr().out


@tensorflow_test
def test_converter_refuses_a_model_that_does_not_match(checkpoints, palette_file, tmp_path, monkeypatch):
    """The converter's own check runs before the folder is published: a wrong mapping leaves nothing behind."""
    real = convert.convert_state_dict

    def transposed_c_proj(ckpt):
        state_dict = real(ckpt)
        state_dict["transformer.h.0.attn.c_proj.weight"] = state_dict["transformer.h.0.attn.c_proj.weight"].T.clone()
        return state_dict

    monkeypatch.setattr(convert, "convert_state_dict", transposed_c_proj)
    with pytest.raises(
        ConversionError, match="does not match an independent NumPy implementation of OpenAI's forward pass"
    ):
        convert.convert_openai_checkpoint(checkpoints["ar"], palette_file, tmp_path / "out")
    assert tree(tmp_path) == []


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture()
def ar_copy(checkpoints, tmp_path) -> Path:
    """A private copy of the 4-shard AR checkpoint that a test may damage."""
    src = Path(checkpoints["ar"])
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for path in src.parent.glob(src.name + ".*"):
        shutil.copy(path, dst / path.name)
    return dst / src.name


def run_failing_conversion(prefix, palette, out: Path, caplog, *extra) -> str:
    """Run the CLI, expect exit status 1; return the logged error."""
    argv = ["--checkpoint", str(prefix), "--clusters", str(palette), "--output_dir", str(out), *extra]
    with caplog.at_level("ERROR"):
        assert convert.main(argv) == 1
    return caplog.text


@tensorflow_test
def test_truncated_data_file(ar_copy, palette_file, tmp_path, caplog):
    largest = max(ar_copy.parent.glob("*.data-*"), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    before = tree(tmp_path)
    message = run_failing_conversion(ar_copy, palette_file, tmp_path / "out", caplog)
    assert "truncated or corrupt" in message and "Cannot read model/" in message
    assert tree(tmp_path) == before


@pytest.fixture()
def fake_checkpoint(tmp_path) -> Path:
    """Empty files named like a 4-shard checkpoint: enough for what the converter checks before TensorFlow reads."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    prefix = folder / "model.ckpt-1000"
    for suffix in (".index", ".meta", *(f".data-{i:05d}-of-00004" for i in range(4))):
        Path(f"{prefix}{suffix}").write_bytes(b"")
    return prefix


def test_missing_shard_or_index(fake_checkpoint, palette_file, tmp_path, caplog):
    Path(f"{fake_checkpoint}.data-00002-of-00004").unlink()
    before = tree(tmp_path)
    message = run_failing_conversion(fake_checkpoint, palette_file, tmp_path / "out", caplog)
    assert "incomplete" in message and "model.ckpt-1000.data-00002-of-00004" in message
    Path(f"{fake_checkpoint}.index").unlink()
    message = run_failing_conversion(fake_checkpoint, palette_file, tmp_path / "out", caplog)
    assert "model.ckpt-1000.index does not exist" in message
    assert tree(tmp_path) == [p for p in before if not p.endswith((".index", ".data-00002-of-00004"))]


def test_checkpoint_path_forms(fake_checkpoint):
    prefix = str(fake_checkpoint)
    assert openai_checkpoint.resolve_checkpoint_prefix(fake_checkpoint.parent) == prefix
    assert openai_checkpoint.resolve_checkpoint_prefix(prefix + ".index") == prefix
    assert openai_checkpoint.resolve_checkpoint_prefix(prefix + ".data-00001-of-00004") == prefix
    Path(f"{fake_checkpoint.parent}/model.ckpt-2000.index").write_bytes(b"")
    with pytest.raises(ConversionError, match="found model.ckpt-1000.index, model.ckpt-2000.index"):
        openai_checkpoint.resolve_checkpoint_prefix(fake_checkpoint.parent)


@pytest.mark.parametrize(
    "palette, message",
    [
        (np.zeros((PALETTE - 8, 3)), f"has {PALETTE - 8} colors but the checkpoint has {PALETTE}"),
        (np.full((PALETTE, 3), np.nan), "values in \\[nan, nan\\]"),  # the image processor's rule, applied
        (np.full((PALETTE, 3), 0.5 + 0.25j, dtype=np.complex64), "complex64 values"),
    ],
)
def test_bad_palette(palette, message, tmp_path):
    path = tmp_path / "clusters.npy"
    np.save(path, palette)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused outright: no ComplexWarning about a dropped imaginary part
        with pytest.raises(ConversionError, match=message):
            convert.load_palette(path, PALETTE)


def test_palette_files_other_than_npy(tmp_path):
    colors = np.random.default_rng(0).uniform(-1, 1, (PALETTE, 3)).astype(np.float32)
    np.savez(tmp_path / "one.npz", kmeans_centers=colors)
    np.testing.assert_array_equal(convert.load_palette(tmp_path / "one.npz", PALETTE), colors)  # its one array
    np.savez(tmp_path / "two.npz", a=colors, b=colors)
    with pytest.raises(ConversionError, match=r"\.npz archive of 2 arrays \(a, b\); expected one"):
        convert.load_palette(tmp_path / "two.npz", PALETTE)
    np.save(tmp_path / "objects.npy", np.full((PALETTE, 3), None), allow_pickle=True)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3")
    for name in ("objects.npy", "text.npy", "missing.npy"):
        with pytest.raises(ConversionError, match=f"Cannot read the palette .*{name}"):
            convert.load_palette(tmp_path / name, PALETTE)


def test_output_paths_refused_before_reading(fake_checkpoint, palette_file, tmp_path, caplog):
    """The output is, holds or lies in an input, or is a link: refused whatever --overwrite says, before anything is
    read (these checkpoint files are empty; reading them would fail differently)."""
    palette = shutil.copy(palette_file, tmp_path / "kmeans_centers.npy")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    index = Path(f"{fake_checkpoint}.index")
    before = snapshot(tmp_path)
    cases = [
        (fake_checkpoint, tmp_path, "contains the input"),
        (fake_checkpoint, fake_checkpoint.parent, "contains the input"),
        (fake_checkpoint, palette, "is the input"),
        (fake_checkpoint, index, "is the input"),
        (fake_checkpoint, index / "sub", "is inside the input"),
        (fake_checkpoint.parent, fake_checkpoint.parent / "converted", "is inside the input"),
        (fake_checkpoint, tmp_path / "link", "is a symbolic link"),
    ]
    for checkpoint, output, message in cases:
        argv = ["--checkpoint", checkpoint, "--clusters", palette, "--output_dir", output, "--overwrite"]
        status, logged = run_cli(convert.main, argv, caplog)
        assert status == 1 and message in logged and str(output) in logged, (output, logged)
    argv = ["--checkpoint", fake_checkpoint, "--clusters", palette, "--output_dir", tmp_path / "out"]
    status, logged = run_cli(convert.main, [*argv, "--max_shard_size", "5 gigs"], caplog)
    assert status == 1 and "--max_shard_size '5 gigs' is not a size such as 5GB" in logged
    assert snapshot(tmp_path) == before


@tensorflow_test
def test_openai_converter_keeps_user_files(checkpoints, palette_file, arena, caplog):
    """Its inputs, the user's files and a planted link's target are byte-identical after every run, refused or not."""
    user, outside = arena
    (user / "igpt").mkdir()
    source = Path(checkpoints["bert"])
    for path in source.parent.glob(source.name + ".*"):
        shutil.copy(path, user / "igpt" / path.name)
    shutil.copy(palette_file, user / "kmeans_centers.npy")
    out = user / "converted"
    out.mkdir()
    (out / "README.md").symlink_to(outside / "secret")  # planted where the model card goes
    argv = ["--checkpoint", user / "igpt" / source.name, "--clusters", user / "kmeans_centers.npy"]
    argv.append("--skip_verification")
    before, outside_before = snapshot(user), snapshot(outside)

    for output in (user, user / "igpt", user / "linkdir"):  # holds the inputs; the checkpoint's folder; a link out
        status, logged = run_cli(convert.main, [*argv, "--output_dir", output, "--overwrite"], caplog)
        assert status == 1 and str(output) in logged
    status, logged = run_cli(convert.main, [*argv, "--output_dir", user / "notes"], caplog)
    assert status == 1 and "pass --overwrite" in logged
    assert snapshot(user) == before

    assert run_cli(convert.main, [*argv, "--output_dir", out, "--overwrite"], caplog)[0] == 0
    assert (out / "config.json").is_file() and not (out / "README.md").is_symlink()
    assert snapshot(outside) == outside_before
    unchanged = {k: v for k, v in snapshot(user).items() if not k.startswith("converted")}
    assert unchanged == {k: v for k, v in before.items() if not k.startswith("converted")}
    assert [p.name for p in user.iterdir() if p.name.startswith(".")] == []  # no staging left


@tensorflow_test
def test_incomplete_and_inconsistent_checkpoints(tf, palette_file, tmp_path):
    # Layers h0 and h2 but no h1: a checkpoint that lost a layer, not a 1-layer model.
    gap = write_openai_checkpoint(tmp_path / "gap", openai_variables(n_layer=3, skip_layers=(1,)), optimizer=False)
    with pytest.raises(ConversionError, match="incomplete: model/h1/ln_1/g is missing"):
        convert.convert_openai_checkpoint(gap, palette_file, tmp_path / "out")
    odd = openai_variables(reshape={"h1/attn/k_proj": (N_HEAD, N_EMBD // N_HEAD, N_EMBD - 1)})
    odd_prefix = write_openai_checkpoint(tmp_path / "odd", odd, optimizer=False)
    with pytest.raises(ConversionError, match=r"model/h1/attn/k_proj has shape \[4, 8, 31\]"):
        convert.convert_openai_checkpoint(odd_prefix, palette_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@tensorflow_test
def test_push_to_hub_uses_hfapi(checkpoints, palette_file, tmp_path):
    out = tmp_path / "out"
    with mock.patch.object(cli, "HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = mock.Mock(repo_id="someone/igpt-tiny")
        argv = ["--checkpoint", checkpoints["bert"], "--clusters", str(palette_file), "--output_dir", str(out)]
        assert convert.main([*argv, "--push_to_hub", "someone/igpt-tiny", "--private", "--skip_verification"]) == 0
    api.create_repo.assert_called_once_with(
        repo_id="someone/igpt-tiny", repo_type="model", private=True, exist_ok=True
    )
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "someone/igpt-tiny" and Path(kwargs["folder_path"]) == out
    assert 'from_pretrained("someone/igpt-tiny")' in (out / "README.md").read_text()


@tensorflow_test
def test_failed_upload_keeps_the_folder(checkpoints, palette_file, tmp_path, caplog):
    out = tmp_path / "out"
    with mock.patch.object(cli, "HfApi") as api_class:
        api_class.return_value.upload_folder.side_effect = OSError("connection refused")
        argv = ["--checkpoint", checkpoints["bert"], "--clusters", str(palette_file), "--output_dir", str(out)]
        with caplog.at_level("ERROR"):
            assert convert.main([*argv, "--push_to_hub", "someone/igpt-tiny", "--skip_verification"]) == 1
    assert "connection refused" in caplog.text and "hf upload someone/igpt-tiny" in caplog.text
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


# ------------------------------------------------------------------------------------- Hub-layout checkpoints


def write_hub_folder(folder: Path, classifier: bool = False, layout: str = "pytorch_model.bin") -> torch.nn.Module:
    """A transformers ImageGPT folder (its own model, random weights) with the palette; returns the model.

    `layout` "save_pretrained": written by transformers' model and image processor themselves. "pytorch_model.bin" or
    "model.safetensors": as transformers 4 wrote openai/imagegpt-*, with the old attention buffers in the state dict
    and a feature-extractor style preprocessor_config.json.
    """
    config = transformers.ImageGPTConfig(
        vocab_size=PALETTE + 1, n_positions=N_CTX, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD, num_labels=N_CLASSES
    )
    model_class = (
        transformers.ImageGPTForImageClassification if classifier else transformers.ImageGPTForCausalImageModeling
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    palette = np.random.default_rng(1).uniform(-1, 1, (PALETTE, 3))
    if layout == "save_pretrained":
        model.save_pretrained(folder)
        size = {"height": N_PX, "width": N_PX}
        transformers.ImageGPTImageProcessor(clusters=palette, size=size).save_pretrained(folder)
        return model
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    for i in range(N_LAYER):
        state_dict[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(N_CTX, N_CTX, dtype=torch.bool))[None, None]
        state_dict[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    folder.mkdir(parents=True)
    config.architectures = [model_class.__name__]
    (folder / "config.json").write_text(config.to_json_string())
    if layout == "model.safetensors":
        save_safetensors(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(state_dict, folder / "pytorch_model.bin")
    preprocessor = {"clusters": palette.tolist(), "do_normalize": True, "do_resize": True, "resample": 2, "size": N_PX}
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**preprocessor, "feature_extractor_type": "ImageGPTFeatureExtractor"})
    )
    return model


def assert_computes_like(folder: Path, theirs: torch.nn.Module) -> None:
    """The re-saved `folder`, called as a user calls it on the processor's ids of images, computes what transformers'
    `theirs` computed: a classifier on those same ids, a causal model (`prepend_sos`) what `theirs` gives on
    `[SOS, x_1, ..., x_{n-1}]`."""
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (N_PX, N_PX, 3), dtype=np.uint8)) for _ in range(3)]
    ids = AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt")["input_ids"]
    if isinstance(theirs, transformers.ImageGPTForImageClassification):
        ours, their_ids = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32), ids
    else:
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        their_ids = torch.cat([torch.full_like(ids[:, :1], PALETTE), ids[:, :-1]], dim=1)
    with torch.no_grad():
        diff = float((ours(input_ids=ids).logits - theirs(input_ids=their_ids).logits).abs().max())
    assert diff < 1e-5, f"max abs logit difference {diff:.2e}"


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "model.safetensors", "save_pretrained"])
def test_hub_checkpoint_causal(layout, tmp_path):
    theirs = write_hub_folder(tmp_path / "imagegpt-tiny", layout=layout)
    out = tmp_path / "out"
    argv = [str(tmp_path / "imagegpt-tiny"), "--output_dir", str(out), "--base_model", "someone/imagegpt-tiny"]
    assert hub.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (
        config["prepend_sos"] is True and config["objective"] == "ar" and "AutoModelForCausalLM" in config["auto_map"]
    )
    assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == PALETTE
    assert not any(
        k.endswith((".attn.bias", ".attn.masked_bias")) for k in load_safetensors(out / "model.safetensors")
    )
    processor = ImageGPTImageProcessor.from_pretrained(out)
    assert processor.size["height"] == N_PX
    np.testing.assert_allclose(
        np.asarray(processor.clusters), np.random.default_rng(1).uniform(-1, 1, (PALETTE, 3)), atol=1e-6
    )
    card = (out / "README.md").read_text()
    assert "base_model: someone/imagegpt-tiny" in card and "Verified at conversion" in card and "causal logits" in card

    assert_computes_like(out, theirs)
    # transformers' convention, SOS given by the caller, on the same ids.
    ours = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(ours, ImageGPTForCausalImageModeling)
    with_sos = torch.cat([torch.full((2, 1), PALETTE), torch.randint(0, PALETTE, (2, N_CTX - 1))], dim=1)
    with torch.no_grad():
        diff = ours(input_ids=with_sos, prepend_sos=False).logits - theirs(input_ids=with_sos).logits
    assert diff.abs().max() < 1e-5


@pytest.mark.parametrize("layout, dtype", [("save_pretrained", "float32"), ("pytorch_model.bin", "bfloat16")])
def test_hub_classifier_computes_what_it_computed(layout, dtype, tmp_path):
    """A classifier was trained on the processor's pixel ids as they are: re-saved, it gives the same logits on the
    same ids (no SOS added), and stays a config transformers' own ImageGPT loads."""
    theirs = write_hub_folder(tmp_path / "clf", classifier=True, layout=layout)
    out = tmp_path / "out"
    assert hub.main([str(tmp_path / "clf"), "--output_dir", str(out), "--dtype", dtype]) == 0
    assert_computes_like(out, theirs.to(getattr(torch, dtype)).float())
    config = json.loads((out / "config.json").read_text())
    assert config["prepend_sos"] is False and config["model_type"] == "imagegpt"
    assert "on the same pixel ids" in (out / "README.md").read_text()
    assert not (out / "generation_config.json").exists()  # no LM head, nothing to generate with


def test_hub_checkpoint_errors(tmp_path, caplog):
    src = tmp_path / "src"
    write_hub_folder(src)
    preprocessor = json.loads((src / "preprocessor_config.json").read_text())
    (src / "preprocessor_config.json").write_text(
        json.dumps({**preprocessor, "clusters": preprocessor["clusters"][:-1]})
    )
    with caplog.at_level("ERROR"):
        assert hub.main([str(src), "--output_dir", str(tmp_path / "out")]) == 1
    assert f"expected shape ({PALETTE}, 3)" in caplog.text and not (tmp_path / "out").exists()

    state_dict = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state_dict["transformer.h.1.mlp.c_fc.weight"]
    torch.save(state_dict, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="transformer.h.1.mlp.c_fc.weight"):
        hub.convert_hub_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    # A config.json that is not JSON, or describes no square image, is reported, not raised.
    (src / "config.json").write_text("{not json")
    status, logged = run_cli(hub.main, [src, "--output_dir", tmp_path / "out"], caplog)
    assert status == 1 and "Cannot read" in logged and "config.json" in logged
    config = transformers.ImageGPTConfig(vocab_size=PALETTE + 1, n_positions=N_CTX + 1, n_embd=N_EMBD, n_layer=1)
    (src / "config.json").write_text(config.to_json_string())
    status, logged = run_cli(hub.main, [src, "--output_dir", tmp_path / "out"], caplog)
    assert status == 1 and f"n_positions={N_CTX + 1} is not a square" in logged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_hub_converter_keeps_user_files(arena, caplog):
    """Its input, the user's files and a planted link's target are byte-identical after every run, refused or not."""
    user, outside = arena
    src = user / "imagegpt-tiny"
    theirs = write_hub_folder(src)
    out = user / "converted"
    out.mkdir()
    (out / "model.safetensors").symlink_to(outside / "secret")  # planted where the weights go
    before, outside_before = snapshot(user), snapshot(outside)

    for output, message in [
        (user, "contains the input"),
        (src, "is the input"),
        (src / "converted", "is inside the input"),
        (user / "linkdir", "is a symbolic link"),
    ]:
        status, logged = run_cli(hub.main, [src, "--output_dir", output, "--overwrite"], caplog)
        assert status == 1 and message in logged and str(output) in logged
    status, logged = run_cli(hub.main, [src, "--output_dir", user / "notes"], caplog)
    assert status == 1 and "pass --overwrite" in logged
    assert snapshot(user) == before

    assert run_cli(hub.main, [src, "--output_dir", out, "--overwrite"], caplog)[0] == 0
    assert not (out / "model.safetensors").is_symlink()
    assert_computes_like(out, theirs)  # the replaced folder holds the converted model, not the old one's parts
    assert snapshot(outside) == outside_before
    unchanged = {k: v for k, v in snapshot(user).items() if not k.startswith("converted")}
    assert unchanged == {k: v for k, v in before.items() if not k.startswith("converted")}
    assert [p.name for p in user.iterdir() if p.name.startswith(".")] == []  # no staging left
