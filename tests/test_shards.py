"""examples/tokenize_images.py and image_gpt_hf.shards: shards hold the processor's ids (or OpenAI's, from .npy), the
manifest counts them, a rerun finishes a killed run, two processes write what one does, and shards that are not the
model's or not intact are refused by name."""

import json
import os
import re
import shutil
import subprocess

import datasets
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
from conftest import TINY_DIMS, launch, refusal, run_script, snapshot
from datasets.distributed import split_dataset_by_node
from skimage import data as skdata

from image_gpt_hf import ImageGPTConfig, ImageGPTImageProcessor, load_digits
from image_gpt_hf.safe_io import staging_path
from image_gpt_hf.shards import load_shards, palette_digest, plan_processes

pytestmark = pytest.mark.slow  # every test runs examples/tokenize_images.py


def tokenize(output, *args, check=True):
    return run_script("tokenize_images.py", "--output_dir", str(output), *args, check=check)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    output = tmp_path_factory.mktemp("shards") / "digits"
    tokenize(output, "--num_shards", "4")
    return output


@pytest.fixture(scope="module")
def palette(tmp_path_factory):
    folder = tmp_path_factory.mktemp("palette")
    ImageGPTImageProcessor(clusters=np.random.default_rng(0).uniform(-1, 1, (16, 3))).save_pretrained(folder)
    return folder


def in_source_order(dataset):
    order = np.argsort(dataset["index"])
    assert np.array_equal(np.sort(dataset["index"]), np.arange(len(dataset)))  # every example once
    return np.asarray(dataset["input_ids"])[order], np.asarray(dataset["label"])[order]


def test_digits_shards_hold_the_processors_ids_and_labels(digits):
    processor, source = ImageGPTImageProcessor.from_pretrained(digits), load_digits()
    manifest = json.loads((digits / "manifest.json").read_text())
    assert (manifest["n_px"], manifest["vocab_size"], manifest["sequence_length"]) == (8, 17, 64)
    for split, name in (("train", "train"), ("validation", "test")):
        shards = load_shards(digits, split=split)
        ids, labels = in_source_order(shards)
        np.testing.assert_array_equal(ids, processor(source[name]["image"], return_tensors="np")["input_ids"])
        assert labels.tolist() == source[name]["label"]
        entry = manifest["splits"][split]
        assert entry["num_examples"] == len(shards) == len(source[name])
        assert [pq.ParquetFile(digits / s["file"]).metadata.num_rows for s in entry["shards"]] == [
            s["num_examples"] for s in entry["shards"]
        ]
    assert shards.features["input_ids"].feature.dtype == "uint16"
    assert len(manifest["splits"]["train"]["shards"]) == 4 and manifest["palette"] == palette_digest(processor)
    # Streamed: one shard per file, so two processes read disjoint files and together every example once.
    streamed = datasets.load_dataset("parquet", data_files=str(digits / "train" / "*.parquet"), streaming=True)
    assert streamed["train"].num_shards == 4
    seen = [[row["index"] for row in split_dataset_by_node(load_shards(digits, streaming=True), r, 2)] for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(1437))


def test_image_folder_shards_hold_the_given_processors_ids(tmp_path, palette):
    photos = {"cats": [skdata.chelsea(), skdata.coffee()], "space": [skdata.astronaut(), skdata.rocket()]}
    for label, images in photos.items():
        (tmp_path / "images" / label).mkdir(parents=True)
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(tmp_path / "images" / label / f"{i}.png")
    output = tmp_path / "shards"
    tokenize(output, "--train_dir", str(tmp_path / "images"), "--processor_name_or_path", str(palette), "--n_px", "8")
    processor = ImageGPTImageProcessor.from_pretrained(output)
    assert palette_digest(processor) == palette_digest(ImageGPTImageProcessor.from_pretrained(palette))
    shards = load_shards(output)
    expected = {(label, tuple(processor(image, return_tensors="np")["input_ids"][0])) for label, images in
                enumerate(photos.values()) for image in images}  # fmt: skip
    assert {(row["label"], tuple(row["input_ids"])) for row in shards} == expected
    assert shards.features["label"].names == ["cats", "space"]


def test_npy_ids_as_openai_lays_them_out(tmp_path, palette):
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 16, (50, 64), dtype=np.uint8), rng.integers(0, 10, 50)
    np.save(tmp_path / "cifar10_trX.npy", ids)
    np.save(tmp_path / "cifar10_trY.npy", np.eye(10)[labels])  # one-hot, as OpenAI's
    np.save(tmp_path / "cifar10_vaX.npy", ids[:7])
    np.save(tmp_path / "cifar10_vaY.npy", labels[:7])  # ints
    output = tmp_path / "shards"
    files = ["--npy_ids", str(tmp_path / "cifar10_trX.npy"), "--validation_npy_ids", str(tmp_path / "cifar10_vaX.npy")]
    tokenize(output, *files, "--processor_name_or_path", str(palette), "--num_shards", "3")
    for split, count in (("train", 50), ("validation", 7)):
        found_ids, found_labels = in_source_order(load_shards(output, split=split))
        np.testing.assert_array_equal(found_ids, ids[:count])
        assert found_labels.tolist() == labels[:count].tolist()
    assert json.loads((output / "manifest.json").read_text())["n_px"] == 8
    np.save(tmp_path / "cifar10_trX.npy", ids + 16)  # ids past the 16 colors: not this palette's
    assert "past the 16-color palette" in tokenize(tmp_path / "other", *files, "--processor_name_or_path",
                                                   str(palette), check=False)  # fmt: skip


def test_rerun_after_a_kill_finishes_as_a_clean_run(digits, tmp_path):
    output = tmp_path / "digits"
    shutil.copytree(digits, output)
    manifest = json.loads((output / "manifest.json").read_text())  # as a killed run leaves it: the plan, no results
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["bytes"], shard["sha256"]
    del manifest["complete"], manifest["palette"]
    (output / "manifest.json").write_text(json.dumps(manifest))
    (output / "train" / "shard-00001-of-00004.parquet").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = staging_path(output / "train" / "shard-00002-of-00004.parquet")
    (partial.parent / partial.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")).write_bytes(b"PAR1 half")
    (output / "train" / "shard-00002-of-00004.parquet").unlink()
    with pytest.raises(ValueError, match="did not finish; rerun examples/tokenize_images.py with the same arguments"):
        load_shards(output)
    assert "2 shards written by the main process" in tokenize(output, "--num_shards", "4")
    assert snapshot(output) == snapshot(digits)
    refused = tokenize(output, "--num_shards", "2", check=False)
    assert "other settings (splits differ)" in refused and "--overwrite" in refused
    assert snapshot(output) == snapshot(digits)
    tokenize(output, "--num_shards", "2", "--overwrite")
    assert load_shards(output, streaming=True).num_shards == 2 and len(os.listdir(output / "train")) == 2


def test_two_processes_write_the_shards_of_one(digits, tmp_path):
    launch("multi_cpu.yaml", "tokenize_images.py", "--output_dir", str(tmp_path / "two"), "--num_shards", "4")
    assert snapshot(tmp_path / "two") == snapshot(digits)


def test_shards_that_are_not_the_models_or_not_intact_are_refused(digits, tmp_path, palette):
    config = ImageGPTConfig(**TINY_DIMS)
    processor = ImageGPTImageProcessor.from_pretrained(digits)
    assert len(load_shards(digits, config, processor, checksum=True)) == 1437
    with pytest.raises(ValueError, match=r"no 'test' split; they have \['train', 'validation'\]"):
        load_shards(digits, split="test")
    cases = {
        "palette": (config, ImageGPTImageProcessor.from_pretrained(palette)),
        "n_px 8 (the model's: 16)": (ImageGPTConfig(**TINY_DIMS | {"n_positions": 256}), processor),
        "vocab_size 17 (the model's: 33)": (ImageGPTConfig(**TINY_DIMS | {"vocab_size": 33}), None),
    }
    for name, (model_config, model_processor) in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"another model: their {name}")):
            load_shards(digits, model_config, model_processor)
    broken = tmp_path / "broken"
    shutil.copytree(digits, broken)
    shard = broken / "train" / "shard-00002-of-00004.parquet"
    shard.write_bytes(shard.read_bytes()[:100] + bytes(1) + shard.read_bytes()[101:])  # one byte changed: same size
    with pytest.raises(ValueError, match=rf"shard {re.escape(str(shard))} does not match its sha256"):
        load_shards(broken, checksum=True)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"shard {re.escape(str(shard))} has \d+ bytes, not the manifest's"):
        load_shards(broken)
    shard.unlink()
    with pytest.raises(ValueError, match=rf"shard {re.escape(str(shard))} is missing"):
        load_shards(broken)
    assert "each reads 2" in plan_processes(4, 2)
    assert "every process reads every shard" in plan_processes(5, 2)
    with pytest.raises(ValueError, match="More processes than shards"):
        plan_processes(4, 8)
    assert "8 times the reading" in plan_processes(4, 8, allow_reread=True)
    no_palette = refusal("tokenize_images.py", "--npy_ids", "x_trX.npy", "--output_dir", str(tmp_path / "out"))
    assert "--npy_ids needs --processor_name_or_path" in no_palette
