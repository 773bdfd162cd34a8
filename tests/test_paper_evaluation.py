"""The paper's evaluation protocol in the examples: probes on concatenated layers, BERT mask ensembles, low-data label
subsets, and features on disk (examples/linear_probe.py, examples/finetune.py, examples/feature_store.py).

The scripts run as `python examples/<script>.py ...` (in this process, so that a refusal is the exception it raises;
in subprocesses where a run is killed or launched on two processes) and are judged by what they write: the results,
the model card, and the features of a --feature_dir, read back with examples/feature_store.py, the store's documented
reader. The store and its torch probe are also tested directly.
"""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import feature_store  # noqa: E402
from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
    ImageGPTModel,
    load_digits,
)

SMALL = ["--max_train_samples", "80", "--max_eval_samples", "30", "--per_device_eval_batch_size", "16"]


def run(script: str, *args) -> dict | None:
    """`python examples/<script> args...` in this process; linear_probe.py's probe_results.json when it wrote one."""
    argv = sys.argv
    sys.argv = [str(EXAMPLES / script), *map(str, args)]
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv = argv
    output = Path(args[list(args).index("--output_dir") + 1])
    return json.loads((output / "probe_results.json").read_text()) if script == "linear_probe.py" else None


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(MKL_CBWR="AUTO,STRICT", CUDA_VISIBLE_DEVICES="")  # repeatable CPU arithmetic, also beside GPUs
    return env


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the script runs of the tests have (script_env): the probes' many small products crawl
    when two threads share two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(path: Path, objective: str) -> Path:
    """A random 2-layer, 32-wide model on 4x4 pixels with a 16-gray palette, saved with its processor."""
    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset("tiny", n_px=4, palette_size=16, n_layer=2, n_embd=32, n_head=2)
    config.objective = objective
    model = ImageGPTForCausalImageModeling(config) if objective == "ar" else ImageGPTForMaskedImageModeling(config)
    model.save_pretrained(path)
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    ImageGPTImageProcessor(clusters=palette, size={"height": 4, "width": 4}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ar_model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("ar"), "ar")


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def unloadable(ar_model, tmp_path_factory) -> Path:
    """The AR model with damaged weights: a script that got as far as loading them would fail with their error, so a
    refusal with its own message came before any model was loaded."""
    path = Path(shutil.copytree(ar_model, tmp_path_factory.mktemp("damaged") / "model"))
    (path / "model.safetensors").write_bytes(b"not weights")
    return path


def store_arrays(root: Path) -> dict[str, np.ndarray]:
    """Every complete part of a feature store, read back: {"set/part/feature": array}."""
    found = {}
    for part in sorted(p for p in root.glob("*/*") if p.is_dir()):
        features = feature_store.DiskFeatures(part)
        names = sorted(p.stem for p in features.shards[0].glob("*.npy") if p.stem != "labels")
        for name in names:
            found[f"{part.parent.name}/{part.name}/{name}"] = features.load([name])
        found[f"{part.parent.name}/{part.name}/labels"] = features.labels
    return found


def sklearn_probe(c: float, train_x, train_y):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(train_x, train_y)


# ---------------------------------------------------------------------------------------------------------------------
# Label subsets and evaluation masks, read from the features the script stored
# ---------------------------------------------------------------------------------------------------------------------


def test_label_subsets_are_class_balanced_seeded_and_nested(ar_model, tmp_path):
    def subset(n: int, seed: int = 0) -> set[tuple]:
        name = f"n{n}-seed{seed}-{len(list(tmp_path.iterdir()))}"
        run(
            "linear_probe.py", "--model_name_or_path", ar_model, "--num_labels_per_class", n, "--seed", seed,
            "--layers", 0, "--probe_c", 1, "--max_eval_samples", 20, "--feature_dir", tmp_path / name,
            "--output_dir", tmp_path / f"{name}-results",
        )  # fmt: skip
        stored = feature_store.DiskFeatures(tmp_path / name / "raw_pixels" / "train")
        assert np.bincount(stored.labels, minlength=10).tolist() == [n] * 10
        return {tuple(row) for row in stored.load(["pixels"])}

    four = subset(4)
    assert len(four) == 40
    assert four == subset(4)  # seeded
    assert four != subset(4, seed=1)
    assert four <= subset(25)  # nested
    smallest = int(np.bincount(load_digits()["train"]["label"]).min())
    with pytest.raises(ValueError, match=rf"--num_labels_per_class {smallest + 1}: the class '\d' has only"):
        run("linear_probe.py", "--model_name_or_path", ar_model, "--num_labels_per_class", smallest + 1,
            "--output_dir", tmp_path / "too-many")  # fmt: skip


def test_evaluation_masks_depend_on_the_image_and_view_not_on_the_batch(bert_model, tmp_path):
    base = ["--model_name_or_path", bert_model, *SMALL[:4], "--no_baselines", "--probe_c", "1", "--layers", "2"]
    masks = ["--eval_mask_prob", "0.15", "--num_eval_masks", "2"]

    def features(name: str, *extra) -> dict[str, np.ndarray]:
        run("linear_probe.py", *base, *extra, "--feature_dir", tmp_path / name, "--output_dir", tmp_path / f"{name}-r")
        return store_arrays(tmp_path / name)

    by16 = features("by16", *masks, "--per_device_eval_batch_size", "16")
    by7 = features("by7", *masks, "--per_device_eval_batch_size", "7")
    whole = features("whole", "--per_device_eval_batch_size", "16")
    other_seed = features("seed1", *masks, "--per_device_eval_batch_size", "16", "--seed", "1")
    assert by16.keys() == by7.keys() and "pretrained/validation-mask1/layer2" in by16
    for key in by16:  # the same masks whatever the batch
        np.testing.assert_allclose(by16[key], by7[key], rtol=1e-5, atol=1e-6, err_msg=key)
    mask0, mask1 = by16["pretrained/validation/layer2"], by16["pretrained/validation-mask1/layer2"]
    assert not np.allclose(mask0, mask1)  # each view its own mask
    assert not np.allclose(mask0, whole["pretrained/validation/layer2"])  # masked at all
    assert not np.allclose(mask0, other_seed["pretrained/validation/layer2"])  # seeded


# ---------------------------------------------------------------------------------------------------------------------
# The feature store and the torch probe (examples/feature_store.py)
# ---------------------------------------------------------------------------------------------------------------------


def digits_pixels() -> tuple[feature_store.ArrayFeatures, feature_store.ArrayFeatures]:
    """The digits' 64 gray values, split as the examples split them (1,437 / 360, stratified, seed 0)."""
    digits = sklearn_digits()
    train, test = train_test_split(
        np.arange(len(digits.target)), test_size=360, stratify=digits.target, random_state=0
    )
    x = digits.data.astype(np.float32)
    return tuple(feature_store.ArrayFeatures({"pixels": x[rows]}, digits.target[rows]) for rows in (train, test))


def test_torch_probe_matches_scikit_learn_on_the_digits(tmp_path):
    train, test = digits_pixels()
    c_values = [0.01, 0.1, 1.0]
    # scikit-learn's pipeline, C chosen on the stratified 20% hold-out of seed 42, refit on all of train.
    fit_x, held_x, fit_y, held_y = train_test_split(
        train.arrays["pixels"], train.labels, test_size=0.2, stratify=train.labels, random_state=42
    )
    holdout = {c: sklearn_probe(c, fit_x, fit_y).score(held_x, held_y) for c in c_values}
    best_c = max(c_values, key=lambda c: (holdout[c], -c))
    expected = sklearn_probe(best_c, train.arrays["pixels"], train.labels).score(test.arrays["pixels"], test.labels)
    options = dict(holdout=0.2, seed=42, max_iter=2000, device="cpu")
    in_memory = feature_store.fit_torch_probe(train, [test], ["pixels"], c_values=c_values, chunk_size=5000, **options)
    assert in_memory["C"] == best_c and in_memory["converged"]
    assert abs(in_memory["accuracy"] - expected) <= 0.01
    for c, accuracy in holdout.items():
        assert abs(in_memory["holdout_accuracy"][c] - accuracy) <= 0.01

    # From disk, over two shards, in chunks of 500 rows: the same probe (at the C chosen above).
    store = feature_store.FeatureStore(tmp_path)
    for name, source in (("train", train), ("test", test)):
        for rank in (0, 1):
            writer = store.writer("raw", name, len(source.labels), rank, 2)
            rows = slice(writer.start, writer.start + writer.rows)
            writer.write({"pixels": source.arrays["pixels"][rows]}, source.labels[rows])
            writer.close()
    on_disk = feature_store.fit_torch_probe(
        store.features("raw", "train"), [store.features("raw", "test")], ["pixels"], c_values=[best_c],
        chunk_size=500, **options,
    )  # fmt: skip
    assert abs(on_disk["accuracy"] - in_memory["accuracy"]) <= 1 / len(test.labels)


def test_feature_store_resumes_after_the_last_complete_batch_and_reads_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)).astype(np.float32), rng.integers(0, 3, 23)
    store = feature_store.FeatureStore(tmp_path)
    writer = store.writer("pretrained", "train", 23, 0, 1)
    writer.write({"layer1": x[:8]}, y[:8])
    writer.write({"layer1": x[8:16]}, y[8:16])
    # Killed while writing the third batch: bytes past the recorded rows, and no progress for them.
    writer.files["layer1"][0].write(b"\xff" * 40)
    writer.files["layer1"][0].flush()
    assert not store.complete("pretrained", "train")
    with pytest.raises(ValueError, match="incomplete: run the extraction again"):
        store.features("pretrained", "train")

    resumed = store.writer("pretrained", "train", 23, 0, 1)
    assert (resumed.done, resumed.rows) == (16, 23)
    resumed.write({"layer1": x[16:]}, y[16:])
    resumed.close()
    assert store.complete("pretrained", "train")
    features = store.features("pretrained", "train")
    np.testing.assert_array_equal(features.load(["layer1"]), x)
    np.testing.assert_array_equal(features.labels, y)
    chunks = list(features.chunks(["layer1", "layer1"], 10))
    assert [start for start, _ in chunks] == [0, 10, 20]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), np.concatenate([x, x], axis=1))
    with pytest.raises(ValueError, match="more than the shard's 23"):
        resumed.write({"layer1": x[:1]}, y[:1])


def test_feature_store_refuses_other_settings_unless_overwrite(tmp_path):
    store = feature_store.FeatureStore(tmp_path / "features")
    data, sets = {"rows": {"train": 10}, "seed": 42}, {"pretrained": {"weights": "a"}, "raw_pixels": {}}
    store.prepare(data, sets, overwrite=False, main=True)
    (tmp_path / "features" / "pretrained").mkdir()
    (tmp_path / "features" / "raw_pixels").mkdir()
    store.prepare(data, sets, overwrite=False, main=True)  # the same settings: reused
    with pytest.raises(ValueError, match=r"holds features of other data \(their seed differ"):
        store.prepare({**data, "seed": 1}, sets, overwrite=False, main=True)
    with pytest.raises(ValueError, match=r"holds pretrained features of other settings \(their weights differ"):
        store.prepare(data, {**sets, "pretrained": {"weights": "b"}}, overwrite=False, main=True)
    assert (tmp_path / "features" / "pretrained").is_dir()
    # --overwrite replaces the set of other settings alone, then the whole store for other data.
    store.prepare(data, {**sets, "pretrained": {"weights": "b"}}, overwrite=True, main=True)
    assert not (tmp_path / "features" / "pretrained").exists() and (tmp_path / "features" / "raw_pixels").is_dir()
    store.prepare({**data, "seed": 1}, sets, overwrite=True, main=True)
    assert os.listdir(tmp_path / "features") == [feature_store.SETTINGS_FILE]
    assert json.loads((tmp_path / "features" / feature_store.SETTINGS_FILE).read_text())["data"]["seed"] == 1


def write_folder(root: Path, kind: str) -> None:
    """Two classes of 8x8 color images under the same file names: random noise, or dark vs light ones."""
    rng = np.random.default_rng(0 if kind == "noise" else 1)
    for split, count in (("train", 20), ("validation", 10)):
        for label, name in enumerate(("dark", "light")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3)) if kind == "noise" else rng.integers(0, 100, (8, 8, 3))
                pixels = pixels if kind == "noise" else pixels + 155 * label
                PIL.Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


def test_a_store_of_images_replaced_in_place_is_not_reused(ar_model, tmp_path):
    """Same file names, same labels, other pixels: the stored features are not the new images' features."""
    images = tmp_path / "images"
    write_folder(images, "noise")
    run_args = ["--model_name_or_path", ar_model, "--train_dir", images / "train", "--validation_dir"]
    run_args += [images / "validation", "--probe_c", "1", "--layers", "0", "--cache_dir", tmp_path / "cache"]
    store = ["--feature_dir", tmp_path / "features"]
    before = run("linear_probe.py", *run_args, *store, "--output_dir", tmp_path / "before")
    write_folder(images, "dark-light")
    with pytest.raises(ValueError, match=r"holds features of other data \(their images differ"):
        run("linear_probe.py", *run_args, *store, "--output_dir", tmp_path / "after")
    after = run("linear_probe.py", *run_args, *store, "--output_dir", tmp_path / "after", "--overwrite")
    fresh = run("linear_probe.py", *run_args, "--feature_dir", tmp_path / "new", "--output_dir", tmp_path / "fresh")
    for name in ("pretrained", "random_init", "raw_pixels"):
        assert after[name] == fresh[name], name
    assert fresh["raw_pixels"]["accuracy"] == 1.0 and before["raw_pixels"]["accuracy"] < 0.8


# ---------------------------------------------------------------------------------------------------------------------
# Bad input is refused before any model is loaded (the `unloadable` model would fail loudly if it were)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num_eval_masks", "4"], "--num_eval_masks 4 needs --eval_mask_prob > 0"),
        (["--eval_mask_prob", "1.5"], r"--eval_mask_prob is a fraction and must be in \[0, 1\)"),
        (["--num_eval_masks", "0"], "--num_eval_masks must be at least 1"),
        (["--num_labels_per_class", "0"], "--num_labels_per_class must be at least 1"),
        (["--num_labels_per_class", "500"], "--num_labels_per_class 500: the class '0' has only 14[0-9] training"),
        (["--eval_mask_prob", "0.15"], "masks pixels for BERT models, but .* is an AR model"),
        (["--layers", "0", "1", "--concat_layers", "1", "2"], r"--concat_layers \[2\] are not among the probed"),
        (["--concat_layers", "1", "1"], "--concat_layers needs at least 2 different layers"),
        (["--concat_window", "4"], "--concat_window 4 is more than the 3 probed layers"),
        (["--num_labels_per_class", "1"], "needs 2 images of every class .* Pass a single --probe_c value"),
        (["--num_labels_per_class", "2", "--probe_holdout", "0.1"], "here 2 are held out"),
        (["--probe_chunk_size", "0"], "--probe_chunk_size must be at least 1"),
    ],
)
def test_bad_probe_arguments(unloadable, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        run("linear_probe.py", "--model_name_or_path", unloadable, "--output_dir", tmp_path / "out", *arguments)
    assert not (tmp_path / "out").exists()


def test_a_feature_dir_holding_other_files_is_refused(unloadable, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    base = ["linear_probe.py", "--model_name_or_path", unloadable, "--output_dir", tmp_path / "out"]
    with pytest.raises(ValueError, match=r"--feature_dir .*mine exists and is not empty \(it holds notes.txt\)"):
        run(*base, "--feature_dir", tmp_path / "mine")
    with pytest.raises(ValueError, match="--feature_dir .* is inside the input"):
        run(*base, "--feature_dir", unloadable / "features")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------------
# Concatenated layers, mask ensembles, and the default probe of a BERT model
# ---------------------------------------------------------------------------------------------------------------------


def test_default_probe_of_a_bert_model_reads_whole_images(bert_model, tmp_path):
    """K=1 without --eval_mask_prob: the features of whole images, and scikit-learn's probe on them."""
    results = run(
        "linear_probe.py", "--model_name_or_path", bert_model, "--no_baselines", "--probe_c", "1", "--layers", "1",
        "--feature_dir", tmp_path / "features", "--output_dir", tmp_path / "default",
    )  # fmt: skip
    assert "ensemble_accuracy" not in results["pretrained"]["1"]
    digits = load_digits()
    model = ImageGPTModel.from_pretrained(bert_model).eval()
    processor = ImageGPTImageProcessor.from_pretrained(bert_model)
    features, labels = {}, {}
    for split, part in (("train", "train"), ("test", "validation")):
        ids = processor(list(digits[split]["image"]), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            features[part] = torch.cat([model.extract_features(b, layers=[1])[0] for b in ids.split(128)]).numpy()
        labels[part] = np.asarray(digits[split]["label"])
        stored = feature_store.DiskFeatures(tmp_path / "features" / "pretrained" / part)
        np.testing.assert_allclose(stored.load(["layer1"]), features[part], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(stored.labels, labels[part])
    probe = sklearn_probe(1.0, features["train"], labels["train"])
    assert results["pretrained"]["1"]["accuracy"] == pytest.approx(
        probe.score(features["validation"], labels["validation"])
    )


def test_bert_mask_ensembles_average_one_probes_probabilities_over_the_masks(bert_model, tmp_path):
    base = ["--model_name_or_path", bert_model, *SMALL, "--no_baselines", "--probe_c", "0.1"]
    base += ["--eval_mask_prob", "0.15", "--concat_layers", "0", "2"]
    first = run("linear_probe.py", *base, "--num_eval_masks", "3", "--feature_dir", tmp_path / "store",
                "--output_dir", tmp_path / "a")  # fmt: skip
    again = run("linear_probe.py", *base, "--num_eval_masks", "3", "--output_dir", tmp_path / "b")
    single = run("linear_probe.py", *base, "--output_dir", tmp_path / "c")
    assert first["pretrained"] == again["pretrained"] and first["concat"] == again["concat"]  # deterministic
    stored = store_arrays(tmp_path / "store")
    for layer in ("0", "1", "2"):
        # One probe, fitted on the training images under mask 0: its single-mask accuracy is the K=1 run's ...
        assert first["pretrained"][layer]["accuracy"] == single["pretrained"][layer]["accuracy"]
        assert "ensemble_accuracy" not in single["pretrained"][layer]
        # ... and the ensemble is the accuracy of its class probabilities averaged over the 3 masked views.
        probe = sklearn_probe(0.1, stored[f"pretrained/train/layer{layer}"], stored["pretrained/train/labels"])
        views = [f"pretrained/validation{suffix}/layer{layer}" for suffix in ("", "-mask1", "-mask2")]
        probabilities = np.mean([probe.predict_proba(stored[view]) for view in views], axis=0)
        expected = (probe.classes_[probabilities.argmax(1)] == stored["pretrained/validation/labels"]).mean()
        assert first["pretrained"][layer]["ensemble_accuracy"] == pytest.approx(expected)
    assert first["concat"][0]["layers"] == [0, 2] and "ensemble_accuracy" in first["concat"][0]["pretrained"]
    table = (tmp_path / "a" / "probe_results.md").read_text()
    assert "| Layer | Pretrained (1 mask) | Pretrained, 3-mask ensemble |" in table
    assert "| 0 + 2 (concatenated) |" in table


def test_finetune_on_a_label_subset_with_a_mask_ensemble(bert_model, tmp_path):
    """finetune.py's side of the protocol, judged by its all_results.json and model card: deterministic, and its
    single-mask accuracy is that of the first of the K masks."""
    base = ["--model_name_or_path", bert_model, "--num_labels_per_class", "3", "--max_eval_samples", "40"]
    base += ["--per_device_train_batch_size", "10", "--max_train_steps", "3", "--eval_mask_prob", "0.15"]
    for name, extra in (("three", ["--num_eval_masks", "3"]), ("again", ["--num_eval_masks", "3"]), ("one", [])):
        run("finetune.py", *base, *extra, "--output_dir", tmp_path / name)
    three, again, one = (
        json.loads((tmp_path / n / "all_results.json").read_text()) for n in ("three", "again", "one")
    )
    assert set(three) >= {"eval_accuracy", "eval_loss", "eval_ensemble_accuracy", "eval_ensemble_loss"}
    assert three == again
    assert one["eval_accuracy"] == three["eval_accuracy"] and "eval_ensemble_accuracy" not in one
    card = (tmp_path / "three" / "README.md").read_text()
    assert "3 labelled images per class" in card and "3-mask ensemble" in card


# ---------------------------------------------------------------------------------------------------------------------
# End to end: resumed after a kill, two processes
# ---------------------------------------------------------------------------------------------------------------------


KILLER = """
import os, runpy, signal, sys
sys.path.insert(0, {examples!r})
import feature_store

write, count = feature_store.ShardWriter.write, [0]


def write_then_die(self, *args, **kwargs):
    write(self, *args, **kwargs)
    count[0] += 1
    if count[0] == {after}:
        os.kill(os.getpid(), signal.SIGKILL)


feature_store.ShardWriter.write = write_then_die
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_killed_extraction_resumes_and_the_disk_probe_matches_the_memory_probe(ar_model, tmp_path, monkeypatch):
    writes = []
    original = feature_store.ShardWriter.write

    def counted(self, *args, **kwargs):
        writes.append(self.folder)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(feature_store.ShardWriter, "write", counted)
    base = ["--model_name_or_path", str(ar_model), "--per_device_eval_batch_size", "200", "--probe", "torch"]
    base += ["--concat_window", "2"]
    reference = run("linear_probe.py", *base, "--feature_dir", tmp_path / "ref", "--output_dir", tmp_path / "a")
    total = len(writes)
    assert total == 8 + 2 + 8 + 2 + 8 + 2  # three feature sets, 1,437 + 360 digits in batches of 200

    killer = tmp_path / "killer.py"
    script = str(EXAMPLES / "linear_probe.py")
    killer.write_text(KILLER.format(examples=str(EXAMPLES), script=script, after=11))  # in random-init training
    command = [sys.executable, str(killer), *base, "--feature_dir", str(tmp_path / "cut"), "--output_dir"]
    process = subprocess.run([*command, str(tmp_path / "b")], env=script_env(), cwd=ROOT, capture_output=True)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-3000:]
    assert not (tmp_path / "b" / "probe_results.json").exists()
    shard = tmp_path / "cut" / "random_init" / "train" / "shard-0-of-1"
    assert feature_store.ShardWriter.progress(shard) == 200  # one batch of it was on disk

    writes.clear()
    resumed = run("linear_probe.py", *base, "--feature_dir", tmp_path / "cut", "--output_dir", tmp_path / "b")
    assert len(writes) == total - 11  # the batches on disk were skipped
    expected, found = store_arrays(tmp_path / "ref"), store_arrays(tmp_path / "cut")
    assert expected.keys() == found.keys() and len(expected) == 20
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)
    assert {k: v for k, v in resumed.items() if k != "feature_dir"} == {
        k: v for k, v in reference.items() if k != "feature_dir"
    }

    # A rerun of the same settings reuses the features; the in-memory scikit-learn probe agrees within 1 point.
    writes.clear()
    again = run("linear_probe.py", *base, "--feature_dir", tmp_path / "cut", "--output_dir", tmp_path / "c")
    assert not writes and again["pretrained"] == reference["pretrained"]
    memory = run("linear_probe.py", "--model_name_or_path", ar_model, "--concat_window", "2",
                 "--output_dir", tmp_path / "d")  # fmt: skip
    for name in ("pretrained", "random_init"):
        for layer in ("0", "1", "2"):
            assert abs(reference[name][layer]["accuracy"] - memory[name][layer]["accuracy"]) <= 0.01, (name, layer)
    assert abs(reference["raw_pixels"]["accuracy"] - memory["raw_pixels"]["accuracy"]) <= 0.01
    assert reference["concat"][0]["layers"] == memory["concat"][0]["layers"]
    assert (
        abs(reference["concat"][0]["pretrained"]["accuracy"] - memory["concat"][0]["pretrained"]["accuracy"]) <= 0.01
    )


@pytest.mark.slow
def test_two_processes_extract_the_same_features_as_one(bert_model, tmp_path):
    """Two CPU processes (accelerate launch, gloo), one shard each, BERT mask views seeded per image."""
    base = ["--model_name_or_path", str(bert_model), "--max_train_samples", "101", "--max_eval_samples", "37"]
    base += ["--per_device_eval_batch_size", "16", "--num_eval_masks", "2", "--eval_mask_prob", "0.15"]
    base += ["--probe_c", "1", "--probe", "torch"]
    config = EXAMPLES / "accelerate_configs" / "multi_cpu.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", "2", str(EXAMPLES / "linear_probe.py"), *base]
    command += ["--feature_dir", str(tmp_path / "two"), "--output_dir", str(tmp_path / "a")]
    result = subprocess.run(command, env=script_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Num processes: 2" in log
    one = run("linear_probe.py", *base, "--feature_dir", tmp_path / "one", "--output_dir", tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "two" / "pretrained" / "train").iterdir()) == [
        "shard-0-of-2",
        "shard-1-of-2",
    ]
    expected, found = store_arrays(tmp_path / "one"), store_arrays(tmp_path / "two")
    assert expected.keys() == found.keys()
    assert "pretrained/validation-mask1/layer2" in expected and "raw_pixels/validation-mask1/pixels" not in expected
    for key in expected:
        np.testing.assert_allclose(found[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)
    two = json.loads((tmp_path / "a" / "probe_results.json").read_text())
    assert (two["num_train"], two["num_eval"]) == (one["num_train"], one["num_eval"]) == (101, 37)
