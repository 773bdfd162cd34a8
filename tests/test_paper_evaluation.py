"""The paper's evaluation protocol in the examples: probes on concatenated layers, BERT mask ensembles, low-data label
subsets, and features on disk (examples/linear_probe.py, examples/finetune.py, examples/probe_data.py).

Fast tests call the building blocks and the scripts' `main(argv)` in-process on tiny random models; runs that kill a
process or launch two are marked slow.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import finetune  # noqa: E402
import linear_probe  # noqa: E402
import probe_data  # noqa: E402
from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
    ImageGPTModel,
)

SMALL = ["--max_train_samples", "80", "--max_eval_samples", "30", "--per_device_eval_batch_size", "16"]


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(MKL_CBWR="AUTO,STRICT", CUDA_VISIBLE_DEVICES="")  # repeatable CPU arithmetic, also beside GPUs
    return env


class Single:
    """The bits of Accelerator that the scripts' feature and evaluation loops use, for one process."""

    is_local_main_process = False

    @staticmethod
    def gather_for_metrics(x):
        return x


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


def digits_pixels() -> tuple[probe_data.ArrayFeatures, probe_data.ArrayFeatures]:
    """The digits' 64 gray values, split as the examples split them (1,437 / 360, stratified, seed 0)."""
    digits = load_digits()
    train, test = train_test_split(
        np.arange(len(digits.target)), test_size=360, stratify=digits.target, random_state=0
    )
    x = digits.data.astype(np.float32)
    return tuple(probe_data.ArrayFeatures({"pixels": x[rows]}, digits.target[rows]) for rows in (train, test))


def probe_args(*extra: str):
    return linear_probe.parse_args(["--model_name_or_path", "unused", "--output_dir", "unused", *extra])


def store_arrays(root: Path) -> dict[str, np.ndarray]:
    """Every complete part of a feature store, read back: {"set/part/feature": array}."""
    found = {}
    for part in sorted(p for p in root.glob("*/*") if p.is_dir()):
        features = probe_data.DiskFeatures(part)
        names = sorted(p.stem for p in features.shards[0].glob("*.npy") if p.stem != "labels")
        for name in names:
            found[f"{part.parent.name}/{part.name}/{name}"] = features.load([name])
        found[f"{part.parent.name}/{part.name}/labels"] = features.labels
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Label subsets and evaluation masks
# ---------------------------------------------------------------------------------------------------------------------


def test_label_subsets_are_class_balanced_seeded_and_nested():
    train = common.load_digits_dataset()["train"]
    names = [str(d) for d in range(10)]

    def subset(n, seed=0):
        return common.class_balanced_subset(train, "label", names, None, n, seed)

    four, again, other, many = subset(4), subset(4), subset(4, seed=1), subset(25)
    assert np.bincount(four["label"], minlength=10).tolist() == [4] * 10
    assert np.bincount(many["label"], minlength=10).tolist() == [25] * 10
    rows = {tuple(np.asarray(image).ravel()) for image in four["image"]}
    assert rows == {tuple(np.asarray(image).ravel()) for image in again["image"]}  # seeded
    assert rows != {tuple(np.asarray(image).ravel()) for image in other["image"]}
    assert rows <= {tuple(np.asarray(image).ravel()) for image in many["image"]}  # nested
    smallest = int(np.bincount(train["label"]).min())
    with pytest.raises(ValueError, match=rf"--num_labels_per_class {smallest + 1}: the class '\d' has only"):
        subset(smallest + 1)
    # String labels (not a ClassLabel) go through the label map.
    strings = train.cast_column("label", datasets.Value("string"))
    mapped = common.class_balanced_subset(strings, "label", names, {n: i for i, n in enumerate(names)}, 4, 0)
    assert sorted(mapped["label"]) == sorted(str(label) for label in four["label"])


def test_evaluation_masks_depend_on_the_image_and_view_not_on_the_batch():
    before = torch.get_rng_state()
    batch = common.evaluation_masks(torch.tensor([3, 7, 9]), 64, 0.15, 42, 0)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    alone = torch.cat([common.evaluation_masks(torch.tensor([i]), 64, 0.15, 42, 0) for i in (9, 3, 7)])
    assert torch.equal(batch, alone[[1, 2, 0]])
    assert batch.dtype == torch.bool and batch.shape == (3, 64)
    assert not torch.equal(batch, common.evaluation_masks(torch.tensor([3, 7, 9]), 64, 0.15, 42, 1))  # view
    assert not torch.equal(batch, common.evaluation_masks(torch.tensor([3, 7, 9]), 64, 0.15, 43, 0))  # seed
    many = common.evaluation_masks(torch.arange(200), 64, 0.15, 0, 0).float().mean().item()
    assert 0.13 < many < 0.17


# ---------------------------------------------------------------------------------------------------------------------
# The feature store and the torch probe
# ---------------------------------------------------------------------------------------------------------------------


def test_torch_probe_matches_scikit_learn_on_the_digits(tmp_path):
    train, test = digits_pixels()
    args = probe_args("--probe_c", "0.01", "0.1", "1")
    expected = linear_probe.fit_probe(train.arrays["pixels"], train.labels, test.arrays["pixels"], test.labels, args)
    common_args = dict(c_values=args.probe_c, holdout=0.2, seed=args.seed, max_iter=2000, device="cpu")
    in_memory = probe_data.fit_torch_probe(train, [test], ["pixels"], chunk_size=5000, **common_args)
    assert in_memory["C"] == expected["C"] and in_memory["converged"]
    assert abs(in_memory["accuracy"] - expected["accuracy"]) <= 0.01
    for c, accuracy in expected["holdout_accuracy"].items():
        assert abs(in_memory["holdout_accuracy"][c] - accuracy) <= 0.01

    # From disk, over two shards, in chunks of 500 rows: the same probe (at the C chosen above).
    store = probe_data.FeatureStore(tmp_path)
    for name, source in (("train", train), ("test", test)):
        for rank in (0, 1):
            writer = store.writer("raw", name, len(source.labels), rank, 2)
            rows = slice(writer.start, writer.start + writer.rows)
            writer.write({"pixels": source.arrays["pixels"][rows]}, source.labels[rows])
            writer.close()
    on_disk = probe_data.fit_torch_probe(
        store.features("raw", "train"),
        [store.features("raw", "test")],
        ["pixels"],
        chunk_size=500,
        **{**common_args, "c_values": [in_memory["C"]]},
    )
    assert abs(on_disk["accuracy"] - in_memory["accuracy"]) <= 1 / len(test.labels)


def test_feature_store_resumes_after_the_last_complete_batch_and_reads_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)).astype(np.float32), rng.integers(0, 3, 23)
    store = probe_data.FeatureStore(tmp_path)
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
    store = probe_data.FeatureStore(tmp_path / "features")
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
    assert os.listdir(tmp_path / "features") == [probe_data.SETTINGS_FILE]
    assert json.loads((tmp_path / "features" / probe_data.SETTINGS_FILE).read_text())["data"]["seed"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# The scripts: bad input is refused before any model is loaded
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr(linear_probe.ImageGPTModel, "from_pretrained", forbidden)
    monkeypatch.setattr(finetune.ImageGPTForImageClassification, "from_pretrained", forbidden)


@pytest.mark.parametrize("script", ["linear_probe", "finetune"])
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num_eval_masks", "4"], "--num_eval_masks 4 needs --eval_mask_prob > 0"),
        (["--eval_mask_prob", "1.5"], r"--eval_mask_prob must be in \[0, 1\)"),
        (["--num_eval_masks", "0"], "--num_eval_masks must be at least 1"),
        (["--num_labels_per_class", "0"], "--num_labels_per_class must be at least 1"),
        (["--num_labels_per_class", "500"], "--num_labels_per_class 500: the class '0' has only 14[0-9] training"),
        (["--eval_mask_prob", "0.15"], "masks pixels for BERT models, but .* is an AR model"),
    ],
)
def test_bad_evaluation_arguments(no_model, ar_model, tmp_path, script, arguments, message):
    run = ["--model_name_or_path", str(ar_model), "--output_dir", str(tmp_path / "out"), *arguments]
    with pytest.raises(ValueError, match=message):
        {"linear_probe": linear_probe, "finetune": finetune}[script].main(run)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--layers", "0", "1", "--concat_layers", "1", "2"], r"--concat_layers \[2\] are not among the probed"),
        (["--concat_layers", "1", "1"], "--concat_layers needs at least 2 different layers"),
        (["--concat_window", "4"], "--concat_window 4 is more than the 3 probed layers"),
        (["--num_labels_per_class", "1"], "needs 2 images of every class .* Pass a single --probe_c value"),
        (["--num_labels_per_class", "2", "--probe_holdout", "0.1"], "here 2 are held out"),
        (["--probe_chunk_size", "0"], "--probe_chunk_size must be at least 1"),
    ],
)
def test_bad_probe_arguments(no_model, ar_model, tmp_path, arguments, message):
    run = ["--model_name_or_path", str(ar_model), "--output_dir", str(tmp_path / "out"), *arguments]
    with pytest.raises(ValueError, match=message):
        linear_probe.main(run)


def test_a_feature_dir_holding_other_files_is_refused(no_model, ar_model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    run = ["--model_name_or_path", str(ar_model), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"--feature_dir .*mine exists and is not empty \(it holds notes.txt\)"):
        linear_probe.main([*run, "--feature_dir", str(tmp_path / "mine")])
    with pytest.raises(ValueError, match="--feature_dir .* is inside the input"):
        linear_probe.main([*run, "--feature_dir", str(ar_model / "features")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------------
# The scripts: concatenated layers, mask ensembles, one mask = the unmasked result of before
# ---------------------------------------------------------------------------------------------------------------------


def test_default_probe_of_a_bert_model_reads_whole_images(bert_model, tmp_path, monkeypatch):
    """K=1 without --eval_mask_prob is the probe of before: unmasked features, the same scikit-learn probe."""
    calls = []
    original = ImageGPTModel.extract_features

    def recorded(self, input_ids, **kwargs):
        calls.append(kwargs)
        return original(self, input_ids, **kwargs)

    monkeypatch.setattr(ImageGPTModel, "extract_features", recorded)
    run = ["--model_name_or_path", str(bert_model), *SMALL, "--no_baselines", "--probe_c", "1"]
    results = linear_probe.main([*run, "--output_dir", str(tmp_path / "default")])
    assert calls and not any("bool_masked_pos" in kwargs for kwargs in calls)
    assert "ensemble_accuracy" not in results["pretrained"]["1"]

    # The same probe, by hand, on features of whole images in the script's batches of 16.
    monkeypatch.setattr(ImageGPTModel, "extract_features", original)
    dataset, _ = common.load_image_dataset(probe_args(*SMALL))
    model = ImageGPTModel.from_pretrained(bert_model).eval()
    processor = common.load_processor(str(bert_model), 4)
    features = {}
    for split in ("train", "validation"):
        ids = processor(list(dataset[split]["image"]), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            features[split] = torch.cat([model.extract_features(b, layers=[1])[0] for b in ids.split(16)]).numpy()
    labels = {split: np.asarray(dataset[split]["label"]) for split in features}
    expected = linear_probe.fit_probe(
        features["train"], labels["train"], features["validation"], labels["validation"], probe_args("--probe_c", "1")
    )
    assert results["pretrained"]["1"]["accuracy"] == expected["accuracy"]


def test_bert_mask_ensembles_are_seeded_and_reported_next_to_one_mask(bert_model, tmp_path):
    run = ["--model_name_or_path", str(bert_model), *SMALL, "--no_baselines", "--probe_c", "0.1"]
    run += ["--eval_mask_prob", "0.15", "--concat_layers", "0", "2"]
    first = linear_probe.main([*run, "--num_eval_masks", "3", "--output_dir", str(tmp_path / "a")])
    again = linear_probe.main([*run, "--num_eval_masks", "3", "--output_dir", str(tmp_path / "b")])
    single = linear_probe.main([*run, "--output_dir", str(tmp_path / "c")])
    assert first["pretrained"] == again["pretrained"] and first["concat"] == again["concat"]  # deterministic
    for layer in ("0", "1", "2"):
        # One probe, fitted on the training images under mask 0: its single-mask accuracy is the K=1 run's.
        assert first["pretrained"][layer]["accuracy"] == single["pretrained"][layer]["accuracy"]
        assert 0 <= first["pretrained"][layer]["ensemble_accuracy"] <= 1
        assert "ensemble_accuracy" not in single["pretrained"][layer]
    assert first["concat"][0]["layers"] == [0, 2] and "ensemble_accuracy" in first["concat"][0]["pretrained"]
    table = (tmp_path / "a" / "probe_results.md").read_text()
    assert "| Layer | Pretrained (1 mask) | Pretrained, 3-mask ensemble |" in table
    assert "| 0 + 2 (concatenated) |" in table


def test_finetune_evaluation_under_mask_ensembles(bert_model):
    """finetune.evaluate: K=1 without masks is the unmasked accuracy; K masks are seeded; the ensemble averages
    the class probabilities of the K masked views."""
    config = ImageGPTConfig.from_pretrained(bert_model)
    config.num_labels = 10
    model = ImageGPTForImageClassification.from_pretrained(bert_model, config=config).eval()
    processor = common.load_processor(str(bert_model), 4)
    test = common.load_digits_dataset()["test"].select(range(40))
    collator = common.ImageGPTCollator(processor, "image", "label", indices=True)
    loader = common.dataloader(test, collator, probe_args("--per_device_eval_batch_size", "16"), train=False)

    def evaluate(*extra):
        args = finetune.parse_args(["--model_name_or_path", "unused", "--output_dir", "unused", *extra])
        return finetune.evaluate(Single(), model, loader, args)

    ids = processor(list(test["image"]), return_tensors="pt")["input_ids"]
    labels = torch.tensor(test["label"])
    with torch.no_grad():
        whole = model(input_ids=ids).logits
    assert evaluate() == pytest.approx(
        {"eval_accuracy": (whole.argmax(-1) == labels).float().mean().item(), "eval_loss": torch.nn.functional.cross_entropy(whole, labels).item()}
    )  # fmt: skip
    three = evaluate("--num_eval_masks", "3", "--eval_mask_prob", "0.15")
    assert three == evaluate("--num_eval_masks", "3", "--eval_mask_prob", "0.15")
    one = evaluate("--eval_mask_prob", "0.15")
    assert three["eval_accuracy"] == one["eval_accuracy"] and "eval_ensemble_accuracy" not in one
    model.eval()  # evaluate() leaves the model in training mode, as the training loop wants it
    with torch.no_grad():
        views = [
            model(input_ids=ids, bool_masked_pos=common.evaluation_masks(torch.arange(40), 16, 0.15, 42, k)).logits
            for k in range(3)
        ]
    assert not torch.allclose(views[0], whole)
    probabilities = torch.stack([v.softmax(-1) for v in views]).mean(0)
    expected = (probabilities.argmax(-1) == labels).float().mean().item()
    assert three["eval_ensemble_accuracy"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: on disk, resumed after a kill, two processes, fine-tuning on a label subset
# ---------------------------------------------------------------------------------------------------------------------


KILLER = """
import os, signal, sys
sys.path.insert(0, {examples!r})
import linear_probe, probe_data

write, count = probe_data.ShardWriter.write, [0]


def write_then_die(self, *args, **kwargs):
    write(self, *args, **kwargs)
    count[0] += 1
    if count[0] == {after}:
        os.kill(os.getpid(), signal.SIGKILL)


probe_data.ShardWriter.write = write_then_die
linear_probe.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_extraction_resumes_and_the_disk_probe_matches_the_memory_probe(ar_model, tmp_path, monkeypatch):
    writes = []
    original = probe_data.ShardWriter.write

    def counted(self, *args, **kwargs):
        writes.append(self.folder)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(probe_data.ShardWriter, "write", counted)
    run = ["--model_name_or_path", str(ar_model), "--per_device_eval_batch_size", "200", "--probe", "torch"]
    run += ["--concat_window", "2"]
    reference = linear_probe.main([*run, "--feature_dir", str(tmp_path / "ref"), "--output_dir", str(tmp_path / "a")])
    total = len(writes)
    assert total == 8 + 2 + 8 + 2 + 8 + 2  # three feature sets, 1,437 + 360 digits in batches of 200

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(examples=str(EXAMPLES), after=11))  # inside the random-init training features
    command = [sys.executable, str(killer), *run, "--feature_dir", str(tmp_path / "cut"), "--output_dir"]
    process = subprocess.run([*command, str(tmp_path / "b")], env=script_env(), cwd=ROOT, capture_output=True)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-3000:]
    assert not (tmp_path / "b" / "probe_results.json").exists()
    shard = tmp_path / "cut" / "random_init" / "train" / "shard-0-of-1"
    assert probe_data.ShardWriter.progress(shard) == 200  # one batch of it was on disk

    writes.clear()
    resumed = linear_probe.main([*run, "--feature_dir", str(tmp_path / "cut"), "--output_dir", str(tmp_path / "b")])
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
    again = linear_probe.main([*run, "--feature_dir", str(tmp_path / "cut"), "--output_dir", str(tmp_path / "c")])
    assert not writes and again["pretrained"] == reference["pretrained"]
    memory = linear_probe.main(
        ["--model_name_or_path", str(ar_model), "--concat_window", "2", "--output_dir", str(tmp_path / "d")]
    )
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
    run = ["--model_name_or_path", str(bert_model), "--max_train_samples", "101", "--max_eval_samples", "37"]
    run += ["--per_device_eval_batch_size", "16", "--num_eval_masks", "2", "--eval_mask_prob", "0.15"]
    run += ["--probe_c", "1", "--probe", "torch"]
    config = EXAMPLES / "accelerate_configs" / "multi_cpu.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", "2", str(EXAMPLES / "linear_probe.py"), *run]
    command += ["--feature_dir", str(tmp_path / "two"), "--output_dir", str(tmp_path / "a")]
    result = subprocess.run(command, env=script_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Num processes: 2" in log
    one = linear_probe.main([*run, "--feature_dir", str(tmp_path / "one"), "--output_dir", str(tmp_path / "b")])
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


def test_finetune_on_a_label_subset_with_a_mask_ensemble(bert_model, tmp_path, monkeypatch):
    subsets = []
    original = common.class_balanced_subset
    monkeypatch.setattr(common, "class_balanced_subset", lambda *a: subsets.append(original(*a)) or subsets[-1])
    out = tmp_path / "clf"
    metrics = finetune.main(
        [
            "--model_name_or_path", str(bert_model), "--num_labels_per_class", "3", "--num_eval_masks", "3",
            "--eval_mask_prob", "0.15", "--max_eval_samples", "40", "--per_device_train_batch_size", "10",
            "--max_train_steps", "3", "--output_dir", str(out),
        ]
    )  # fmt: skip
    assert [np.bincount(s["label"], minlength=10).tolist() for s in subsets] == [[3] * 10]
    assert set(metrics) == {"eval_accuracy", "eval_loss", "eval_ensemble_accuracy", "eval_ensemble_loss"}
    assert math.isfinite(metrics["eval_ensemble_loss"])
    assert json.loads((out / common.RESULTS_FILE).read_text()) == metrics
    card = (out / "README.md").read_text()
    assert "3 labelled images per class" in card and "3-mask ensemble" in card
