"""The paper's evaluation protocol in the examples: probes on concatenated layers, BERT mask ensembles, low-data label
subsets, and features on disk (examples/linear_probe.py, examples/finetune.py, examples/feature_store.py).

The scripts run as `python examples/<script>.py ...` (in this process, so that a refusal is the exception it raises;
in subprocesses where a run is killed or launched on two processes) and are judged by what they write: the results,
the model card, and the features of a --feature_dir, read back as the plain .npy files the store documents.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import EXAMPLES, ROOT, launch, refusal, run_in_process, run_script, script_env
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from image_gpt_hf import (
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
    run_in_process(script, *map(str, args))
    output = Path(args[list(args).index("--output_dir") + 1])
    return json.loads((output / "probe_results.json").read_text()) if script == "linear_probe.py" else None


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
    """Every part of a feature store, read back: {"set/part/feature": array}, the shards' rows in rank order."""
    found = {}
    for part in sorted(p for p in root.glob("*/*") if p.is_dir()):
        shards = sorted(part.iterdir(), key=lambda shard: int(shard.name.split("-")[1]))
        for name in sorted(p.stem for p in shards[0].glob("*.npy")):
            arrays = [np.load(shard / f"{name}.npy") for shard in shards if (shard / f"{name}.npy").exists()]
            found[f"{part.parent.name}/{part.name}/{name}"] = np.concatenate(arrays)
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
        stored = store_arrays(tmp_path / name)
        assert np.bincount(stored["raw_pixels/train/labels"], minlength=10).tolist() == [n] * 10
        return {tuple(row) for row in stored["raw_pixels/train/pixels"]}

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
# The feature store: reused only for the same images and settings, damage named
# ---------------------------------------------------------------------------------------------------------------------


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


def test_a_store_of_other_weights_is_refused_and_a_damaged_one_is_named(ar_model, tmp_path):
    args = ["--model_name_or_path", ar_model, *SMALL, "--probe_c", "1", "--layers", "1", "--no_baselines"]
    store = ["--feature_dir", tmp_path / "features"]
    run("linear_probe.py", *args, *store, "--output_dir", tmp_path / "a")
    other = tmp_path / "other"  # the same model, other weights
    shutil.copytree(ar_model, other)
    model = ImageGPTForCausalImageModeling.from_pretrained(other)
    torch.nn.init.normal_(model.transformer.h[0].mlp.c_fc.weight)
    model.save_pretrained(other)
    message = refusal("linear_probe.py", *map(str, [*args[:1], other, *args[2:], *store, "--output_dir", tmp_path / "b"]))  # fmt: skip
    assert "holds pretrained features of other settings (their model, weights differ" in message

    shard = tmp_path / "features" / "pretrained" / "train" / "shard-0-of-1"
    data = (shard / "layer1.npy").read_bytes()
    (shard / "layer1.npy").write_bytes(data[: len(data) // 2])  # cut short
    message = refusal("linear_probe.py", *map(str, [*args, *store, "--output_dir", tmp_path / "c"]))
    assert f"{shard / 'layer1.npy'} is shorter than its rows: delete {shard} and run again" in message
    (shard / "layer1.npy").write_bytes(data)
    (shard / "progress.json").write_text('{"start": 0, "rows": 8')  # garbled
    message = refusal("linear_probe.py", *map(str, [*args, *store, "--output_dir", tmp_path / "c"]))
    assert f"{shard / 'progress.json'} is damaged" in message and f"delete {shard} and run again" in message
    shutil.rmtree(shard)  # as the message says: the rows are extracted again, the same as before
    again = run("linear_probe.py", *args, *store, "--output_dir", tmp_path / "c")
    assert again["pretrained"] == run("linear_probe.py", *args, "--output_dir", tmp_path / "d")["pretrained"]
    assert (shard / "layer1.npy").read_bytes() == data


# ---------------------------------------------------------------------------------------------------------------------
# Bad input is refused before any model is loaded (the `unloadable` model would fail loudly if it were)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num_eval_masks", "4"], "--num_eval_masks 4 needs --eval_mask_prob > 0"),
        (["--num_labels_per_class", "0"], "--num_labels_per_class must be at least 1"),
        (["--num_labels_per_class", "500"], "--num_labels_per_class 500: the class '0' has only 14[0-9] training"),
        (["--eval_mask_prob", "0.15"], "masks pixels for BERT models, but .* is an AR model"),
        (["--layers", "0", "1", "--concat_layers", "1", "2"], r"--concat_layers \[2\] are not among the probed"),
        (["--concat_window", "4"], "--concat_window 4 is more than the 3 probed layers"),
        (["--num_labels_per_class", "1"], "needs 2 images of every class .* Pass a single --probe_c value"),
        (["--num_labels_per_class", "2", "--probe_holdout", "0.1"], "here 2 are held out"),
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
        stored = store_arrays(tmp_path / "features")
        np.testing.assert_allclose(stored[f"pretrained/{part}/layer1"], features[part], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(stored[f"pretrained/{part}/labels"], labels[part])
    probe = sklearn_probe(1.0, features["train"], labels["train"])
    assert results["pretrained"]["1"]["accuracy"] == pytest.approx(probe.score(features["validation"], labels["validation"]))  # fmt: skip


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
    three, again, one = (json.loads((tmp_path / n / "all_results.json").read_text()) for n in ("three", "again", "one"))  # fmt: skip
    assert set(three) >= {"eval_accuracy", "eval_loss", "eval_ensemble_accuracy", "eval_ensemble_loss"}
    assert three == again
    assert one["eval_accuracy"] == three["eval_accuracy"] and "eval_ensemble_accuracy" not in one
    card = (tmp_path / "three" / "README.md").read_text()
    assert "3 labelled images per class" in card and "3-mask ensemble" in card


# ---------------------------------------------------------------------------------------------------------------------
# End to end: resumed after a kill, two processes
# ---------------------------------------------------------------------------------------------------------------------


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Each shard file's inode and modification time: a file written again (even with the same bytes) changes them."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.glob("*/*/*/*")) if p.is_file()}


@pytest.mark.slow
def test_killed_extraction_resumes_and_the_disk_probe_matches_the_memory_probe(ar_model, tmp_path):
    base = ["--model_name_or_path", str(ar_model), "--per_device_eval_batch_size", "200", "--probe", "torch"]
    base += ["--concat_window", "2"]
    reference = run("linear_probe.py", *base, "--feature_dir", tmp_path / "ref", "--output_dir", tmp_path / "a")

    # Killed (SIGKILL) as soon as the random-init training features have a batch on disk, before they are complete.
    command = [sys.executable, str(EXAMPLES / "linear_probe.py"), *base, "--feature_dir", str(tmp_path / "cut")]
    process = subprocess.Popen([*command, "--output_dir", str(tmp_path / "b")], env=script_env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    progress = tmp_path / "cut" / "random_init" / "train" / "shard-0-of-1" / "progress.json"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if progress.is_file() and json.loads(progress.read_text())["done"] > 0:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait() == -signal.SIGKILL
    done = json.loads(progress.read_text())["done"]
    assert 0 < done < 1437 and not (tmp_path / "b" / "probe_results.json").exists()

    output = run_script("linear_probe.py", *base, "--feature_dir", str(tmp_path / "cut"), "--output_dir",
                        str(tmp_path / "b"))  # fmt: skip
    assert f"random_init train: resuming after {done} of 1437 rows" in output  # the batches on disk were skipped
    resumed = json.loads((tmp_path / "b" / "probe_results.json").read_text())
    expected, found = store_arrays(tmp_path / "ref"), store_arrays(tmp_path / "cut")
    assert expected.keys() == found.keys() and len(expected) == 20
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)
    assert {k: v for k, v in resumed.items() if k != "feature_dir"} == {
        k: v for k, v in reference.items() if k != "feature_dir"
    }

    # A rerun of the same settings reuses the features (no file written again); the in-memory scikit-learn probe
    # agrees within 1 point.
    before = stamps(tmp_path / "cut")
    again = run("linear_probe.py", *base, "--feature_dir", tmp_path / "cut", "--output_dir", tmp_path / "c")
    assert stamps(tmp_path / "cut") == before and again["pretrained"] == reference["pretrained"]
    memory = run("linear_probe.py", "--model_name_or_path", ar_model, "--concat_window", "2",
                 "--output_dir", tmp_path / "d")  # fmt: skip
    for name in ("pretrained", "random_init"):
        for layer in ("0", "1", "2"):
            assert abs(reference[name][layer]["accuracy"] - memory[name][layer]["accuracy"]) <= 0.01, (name, layer)
    assert abs(reference["raw_pixels"]["accuracy"] - memory["raw_pixels"]["accuracy"]) <= 0.01
    assert reference["concat"][0]["layers"] == memory["concat"][0]["layers"]
    assert abs(reference["concat"][0]["pretrained"]["accuracy"] - memory["concat"][0]["pretrained"]["accuracy"]) <= 0.01  # fmt: skip


@pytest.mark.slow
def test_two_processes_extract_the_same_features_as_one(bert_model, tmp_path):
    """Two CPU processes (accelerate launch, gloo), one shard each, BERT mask views seeded per image."""
    base = ["--model_name_or_path", str(bert_model), "--max_train_samples", "101", "--max_eval_samples", "37"]
    base += ["--per_device_eval_batch_size", "16", "--num_eval_masks", "2", "--eval_mask_prob", "0.15"]
    base += ["--probe_c", "1", "--probe", "torch"]
    log = launch("multi_cpu.yaml", "linear_probe.py", *base, "--feature_dir", str(tmp_path / "two"), "--output_dir",
                 str(tmp_path / "a"), num_processes=2)  # fmt: skip
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
