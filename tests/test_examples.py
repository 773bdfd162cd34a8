"""The example scripts (examples/), run as users run them: on the bundled digits, with tiny models.

Script runs go through subprocesses (`python examples/<script>.py`, `accelerate launch`) and are marked slow; the
checks of bad input call the scripts' `main(argv)` in-process, since they must fail before any training starts.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import finetune  # noqa: E402
import linear_probe  # noqa: E402
import pretrain  # noqa: E402
import sample  # noqa: E402
from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor  # noqa: E402
from image_gpt_hf.generation import upscale_images  # noqa: E402

# A 2-layer, 32-wide model on 4x4 digits: a script run takes seconds.
TINY_MODEL = ["--n_px", "4", "--config_overrides", "n_layer=2,n_embd=32,n_head=2"]
SMALL_DATA = ["--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_eval_batch_size", "32"]
TRAIN = ["--per_device_train_batch_size", "8", "--logging_steps", "1"]
# Enough data and steps to learn something: 256 digits, batches of 16.
LEARN = ["--max_train_samples", "256", "--max_eval_samples", "128", "--per_device_eval_batch_size", "64"]
LEARN += ["--per_device_train_batch_size", "16", "--logging_steps", "10", "--learning_rate", "3e-3"]


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        # MKL's results may depend on memory alignment; this makes a run's arithmetic repeatable bit for bit.
        MKL_CBWR="AUTO,STRICT",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # CPU runs, also on a machine with GPUs
    )
    return env


def run_script(script: str, *args: str, timeout: int = 300) -> str:
    """Runs `python examples/<script> args...`; returns its output (stdout + stderr), failing with it on error."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} failed:\n{output[-6000:]}"
    return output


def launch_command(config: str, script: str, *args: str, num_processes: int | None = None) -> list[str]:
    """`accelerate launch --config_file examples/accelerate_configs/<config> examples/<script> args...`."""
    launcher = ["--config_file", str(EXAMPLES / "accelerate_configs" / config)]
    launcher += ["--num_processes", str(num_processes)] if num_processes else []
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(EXAMPLES / script), *args]


def launch(config: str, script: str, *args: str, timeout: int = 300, **options) -> str:
    """Runs `launch_command(config, script, *args, num_processes=...)` (with `env=...`); returns its output."""
    env = options.pop("env", None) or script_env()
    command = launch_command(config, script, *args, **options)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"accelerate launch {script} failed:\n{output[-6000:]}"
    return output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def eval_images(count: int) -> list[PIL.Image.Image]:
    """The evaluation images a script reads with `--max_eval_samples count` (seed 42) on the digits."""
    return list(common.load_digits_dataset()["test"].shuffle(seed=42).select(range(count))["image"])


def classifier_accuracy(folder: Path, count: int) -> float:
    """The accuracy of a saved classifier on the evaluation digits of `--max_eval_samples count`, in this process."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    test = common.load_digits_dataset()["test"].shuffle(seed=42).select(range(count))
    with torch.no_grad():
        ids = AutoImageProcessor.from_pretrained(folder)(list(test["image"]), return_tensors="pt")["input_ids"]
        predictions = model(input_ids=ids).logits.argmax(-1)
    return (predictions == torch.tensor(test["label"])).float().mean().item()


PLANTED_LINK = "config.json"  # where pretraining writes a file of its own: a link there must not be followed


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """30 steps of AR pretraining, written with --overwrite over a folder of an earlier, sharded model that also
    holds a link to a file of the user's elsewhere (`PLANTED_LINK`): the link goes, the file it points to stays."""
    out = tmp_path_factory.mktemp("pretrain_ar")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        save_file({"w": torch.zeros(2)}, out / name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002"}}))
    (out / "README.md").write_text("An earlier model.")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "config.json"
    elsewhere.write_text("the user's own config")
    (out / PLANTED_LINK).symlink_to(elsewhere)
    log = run_script(
        "pretrain.py", "--objective", "ar", *TINY_MODEL, *LEARN, "--max_train_steps", "30",
        "--checkpointing_steps", "30", "--output_dir", str(out), "--overwrite",
    )  # fmt: skip
    return out, log


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pretrain_bert")
    log = run_script(
        "pretrain.py", "--objective", "bert", *TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "2",
        "--output_dir", str(out),
    )  # fmt: skip
    return out, log


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random (untrained) 4x4 AR model with a 16-color palette, as a saved folder: for the checks of bad input."""
    path = tmp_path_factory.mktemp("tiny")
    config = ImageGPTConfig.from_preset("tiny", n_px=4, palette_size=16, n_layer=2, n_embd=32, n_head=2)
    ImageGPTForCausalImageModeling(config).save_pretrained(path)
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    ImageGPTImageProcessor(clusters=palette, size={"height": 4, "width": 4}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def swin2sr_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Swin2SR x2 super-resolution checkpoint with its image processor, saved locally (no download)."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessorPil

    path = tmp_path_factory.mktemp("swin2sr")
    config = Swin2SRConfig(
        image_size=8, patch_size=1, embed_dim=8, depths=[1], num_heads=[1], window_size=4, upscale=2, mlp_ratio=1.0
    )
    torch.manual_seed(0)
    Swin2SRForImageSuperResolution(config).save_pretrained(path)
    Swin2SRImageProcessorPil(size_divisor=4).save_pretrained(path)
    return path


def grid_cells(path: Path, side: int, rows: int, columns: int, titled: bool = False) -> list[list[np.ndarray]]:
    """The `side`-pixel cells of a grid PNG that sample.py wrote, row by row, after checking the grid's size."""
    with PIL.Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    top, gap = (sample.HEADER if titled else 0) + sample.GAP, sample.GAP
    assert pixels.shape == (top + rows * (side + gap), gap + columns * (side + gap), 3), path.name
    return [
        [pixels[top + r * (side + gap) :][:side, gap + c * (side + gap) :][:, :side] for c in range(columns)]
        for r in range(rows)
    ]


def fake_checkpoint(output_dir: Path, step: int, script: str = "pretrain.py", **settings) -> Path:
    """A checkpoint folder with the files `accelerator.save_state` writes (tiny stand-ins) and a state file."""
    path = output_dir / common.CHECKPOINTS_DIR / f"step_{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    torch.save({"state": {}}, path / "optimizer.bin")
    config = {"script": script, "num_processes": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    config |= {"max_train_steps": 3, "num_train_epochs": 10, "max_train_samples": 64, "seed": 42, **settings}
    state = {"completed_steps": step, "epoch": 0, "batches_in_epoch": step, "config": config}
    (path / common.STATE_FILE).write_text(json.dumps(state))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


def test_digits_dataset_is_a_fixed_stratified_split():
    dataset = common.load_digits_dataset()
    assert (len(dataset["train"]), len(dataset["test"])) == (1437, 360)
    assert dataset["train"].features["label"].names == [str(d) for d in range(10)]
    image = dataset["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    counts = np.bincount(dataset["test"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    again = common.load_digits_dataset()
    assert list(again["test"]["label"]) == list(dataset["test"]["label"])
    assert np.array_equal(np.asarray(again["test"][5]["image"]), np.asarray(dataset["test"][5]["image"]))


def test_collator_draws_crops_and_masks_from_seeds_not_the_global_rng():
    dataset = common.ImageDataset(common.load_digits_dataset()["train"], "image")
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": 8, "width": 8})
    examples = dataset.__getitems__(list(range(16)))

    def collate(seed=0, epoch=0, train=True, mask_prob=None):
        collator = common.ImageGPTCollator(
            processor, "image", "label", train=train, random_crop_scale=(0.3, 1.0), mask_prob=mask_prob, seed=seed
        )
        collator.epoch = epoch
        return collator(examples)

    rng_before = torch.get_rng_state()
    first = collate(mask_prob=0.15)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training randomness elsewhere is untouched
    assert first["input_ids"].shape == (16, 64) and first["labels"].tolist() == [e["label"] for _, e in examples]
    assert torch.equal(first["input_ids"], collate(mask_prob=0.15)["input_ids"])
    assert torch.equal(first["bool_masked_pos"], collate(mask_prob=0.15)["bool_masked_pos"])
    assert 0.05 < first["bool_masked_pos"].float().mean() < 0.3
    assert not torch.equal(first["input_ids"], collate(epoch=1)["input_ids"])  # new crops every epoch
    assert not torch.equal(first["input_ids"], collate(seed=1)["input_ids"])
    # Evaluation: the center (here: the whole 8x8 scan), identical whatever the seed.
    plain = processor([example["image"] for _, example in examples], return_tensors="pt")["input_ids"]
    assert torch.equal(collate(train=False)["input_ids"], plain)
    assert torch.equal(collate(train=False, seed=5, epoch=3)["input_ids"], plain)


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    from accelerate import PartialState

    state = PartialState()  # the scripts' logger needs Accelerate's state
    for step in (2, 10):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 12).joinpath(common.STATE_FILE).unlink()  # a crash while it was written
    fake_checkpoint(tmp_path, 14).rename(tmp_path / common.CHECKPOINTS_DIR / ".step_14.tmp-host-1-0123abcd")
    root = tmp_path / common.CHECKPOINTS_DIR
    assert [step for step, _ in common.checkpoint_dirs(str(tmp_path))] == [2, 10]

    args = pretrain.parse_args([*SMALL_DATA, *TRAIN, "--max_train_steps", "3", "--output_dir", str(tmp_path)])
    args.resume_from_checkpoint = "latest"
    path, position = common.find_checkpoint(args, state, "pretrain.py")
    assert path == str(root / "step_10") and position == common.Position(10, 0, 10)
    args.resume_from_checkpoint = str(root / "step_12")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        common.find_checkpoint(args, state, "pretrain.py")
    args.resume_from_checkpoint, args.output_dir = "latest", str(tmp_path / "fresh")
    assert common.find_checkpoint(args, state, "pretrain.py") is None  # nothing yet: start from scratch


def test_accelerate_configs_parse_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "cpu.yaml": (DistributedType.NO, 1, True),
        "multi_cpu.yaml": (DistributedType.MULTI_GPU, 2, True),  # torchrun; the scripts join on gloo (see file)
        "gpu.yaml": (DistributedType.NO, 1, False),
        "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, False),
        "fsdp.yaml": (DistributedType.FSDP, 8, False),
    }
    found = sorted(p.name for p in (EXAMPLES / "accelerate_configs").glob("*.yaml"))
    assert found == sorted(expected)
    for name, (distributed_type, num_processes, use_cpu) in expected.items():
        config = load_config_from_file(str(EXAMPLES / "accelerate_configs" / name))
        assert (config.distributed_type, config.num_processes, config.use_cpu) == (
            distributed_type,
            num_processes,
            use_cpu,
        )
    fsdp = load_config_from_file(str(EXAMPLES / "accelerate_configs" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "ImageGPTBlock"
    from image_gpt_hf import ImageGPTPreTrainedModel

    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in ImageGPTPreTrainedModel._no_split_modules


# ---------------------------------------------------------------------------------------------------------------------
# The scripts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_ar_learns_and_writes_a_model_that_generates(ar_checkpoint):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM

    from image_gpt_hf import ImageGPTModel

    out, log = ar_checkpoint
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    config = model.config
    assert isinstance(model, ImageGPTForCausalImageModeling)
    assert config.objective == "ar" and config.prepend_sos and config.n_positions == 16
    assert config.vocab_size == common.DIGITS_PALETTE_SIZE + 1
    assert isinstance(AutoModel.from_pretrained(out), ImageGPTModel)
    processor = AutoImageProcessor.from_pretrained(out)
    assert isinstance(processor, ImageGPTImageProcessor) and len(processor.clusters) == common.DIGITS_PALETTE_SIZE
    # --overwrite replaced the earlier model: none of its shards or its index is left to be read with the new one.
    assert not list(out.glob("model-0000*")) and not (out / "model.safetensors.index.json").exists()
    # The planted link was replaced by the model's own config, and the file it pointed to is untouched.
    assert not (out / PLANTED_LINK).is_symlink() and json.loads((out / PLANTED_LINK).read_text())["n_layer"] == 2
    elsewhere = next(out.parent.glob("elsewhere*")) / "config.json"
    assert elsewhere.read_text() == "the user's own config"
    assert "An earlier model." not in (out / "README.md").read_text()

    # A plain generate() draws a whole image from SOS: the saved generation config starts and sizes it.
    for options in ({}, {"do_sample": False}):
        ids = model.generate(**options)
        assert ids.shape == (1, config.n_positions + 1) and ids[0, 0] == config.sos_token_id
        assert (ids[0, 1:] < config.palette_size).all()

    # The reported number is OpenAI's loss (all pixels, SOS first) on the evaluation images, recomputed here; the
    # training lowered it well below that of the same model untrained.
    results = json.loads((out / common.RESULTS_FILE).read_text())
    assert math.isclose(results["eval_bpd"], results["eval_loss"] / math.log(2), rel_tol=1e-6)
    ids = processor(eval_images(128), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
        untrained = ImageGPTForCausalImageModeling(config).eval()(input_ids=ids, labels=ids).loss.item()
    assert math.isclose(loss, results["eval_loss"], rel_tol=1e-4)
    assert loss < untrained - 0.2, (loss, untrained)

    card = (out / "README.md").read_text()
    assert "bits per dimension" in card and "examples/pretrain.py" in card
    assert "Total optimization steps = 30" in log


@pytest.mark.slow
def test_pretrain_bert(bert_checkpoint):
    from transformers import AutoModelForMaskedImageModeling

    from image_gpt_hf import ImageGPTForMaskedImageModeling

    out, _ = bert_checkpoint
    model = AutoModelForMaskedImageModeling.from_pretrained(out)
    assert isinstance(model, ImageGPTForMaskedImageModeling) and model.config.objective == "bert"
    assert not model.config.prepend_sos
    assert not (out / "generation_config.json").exists()  # a BERT model does not generate
    assert math.isfinite(json.loads((out / common.RESULTS_FILE).read_text())["eval_bpd"])


@pytest.mark.slow
def test_finetune_on_the_joint_loss_learns_the_digits(ar_checkpoint, tmp_path):
    from transformers import AutoModelForImageClassification

    from image_gpt_hf import ImageGPTForImageClassification

    pretrained, _ = ar_checkpoint
    log = run_script(
        "finetune.py", "--model_name_or_path", str(pretrained), "--gen_loss_weight", "0.5", *LEARN,
        "--max_train_steps", "60", "--output_dir", str(tmp_path),
    )  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(model, ImageGPTForImageClassification)
    assert model.config.id2label == {i: str(i) for i in range(10)} and model.config.gen_loss_weight == 0.5
    assert model.config.prepend_sos and hasattr(model, "lm_head")
    # The decoder was trained on from the pretrained weights, not replaced.
    before, after = weights(pretrained), weights(tmp_path)
    assert before["transformer.wpe.weight"].shape == after["transformer.wpe.weight"].shape
    assert not torch.equal(before["transformer.wpe.weight"], after["transformer.wpe.weight"])
    assert torch.allclose(before["transformer.wpe.weight"], after["transformer.wpe.weight"], atol=0.1)
    assert "Newly initialised: ['score.weight']" in log
    # Above chance (0.1) on the held-out digits, and the reported accuracy is the model's, recomputed here.
    results = json.loads((tmp_path / common.RESULTS_FILE).read_text())
    assert results["eval_accuracy"] > 0.2 and results["eval_loss"] < math.log(10)
    assert math.isclose(classifier_accuracy(tmp_path, 128), results["eval_accuracy"], abs_tol=1e-6)


@pytest.mark.slow
def test_finetune_bert_draws_masks_for_its_generative_loss(bert_checkpoint, tmp_path):
    pretrained, _ = bert_checkpoint
    run_script(
        "finetune.py", "--model_name_or_path", str(pretrained), "--gen_loss_weight", "1", *SMALL_DATA, *TRAIN,
        "--max_train_steps", "2", "--output_dir", str(tmp_path),
    )  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["objective"] == "bert" and config["gen_loss_weight"] == 1


@pytest.mark.slow
def test_linear_probe_every_layer_with_baselines(ar_checkpoint, tmp_path):
    pretrained, _ = ar_checkpoint
    log = run_script(
        "linear_probe.py", "--model_name_or_path", str(pretrained), "--max_train_samples", "100",
        "--max_eval_samples", "50", "--probe_c", "0.1", "1", "--output_dir", str(tmp_path),
    )  # fmt: skip
    results = json.loads((tmp_path / "probe_results.json").read_text())
    assert results["layers"] == [0, 1, 2] and (results["num_train"], results["num_eval"]) == (100, 50)
    for name in ("pretrained", "random_init"):
        assert sorted(results[name]) == ["0", "1", "2"]
        assert all(r["C"] in (0.1, 1.0) for r in results[name].values())
    # Linear probes separate the digits far better than chance (0.1), from the features as from the raw pixels.
    assert results["best_accuracy"] > 0.3 and results["raw_pixels"]["accuracy"] > 0.5
    best = max(results["layers"], key=lambda layer: results["pretrained"][str(layer)]["accuracy"])
    assert results["best_layer"] == best
    assert results["best_accuracy"] == results["pretrained"][str(best)]["accuracy"]
    table = (tmp_path / "probe_results.md").read_text()
    assert "| Layer | Pretrained | Random init |" in table and "**(best)**" in table
    with PIL.Image.open(tmp_path / "probe_accuracy.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    assert str(tmp_path / "probe_accuracy.png") in log


@pytest.mark.slow
def test_linear_probe_features_match_extract_features(ar_checkpoint):
    """The probe reads the paper's n^l of every layer in one pass, on OpenAI's [SOS, x_1..x_{n-1}] input."""
    from image_gpt_hf import ImageGPTModel

    pretrained, _ = ar_checkpoint
    model = ImageGPTModel.from_pretrained(pretrained).eval()
    processor = common.load_processor(str(pretrained), 4)
    dataset = common.load_digits_dataset()["test"].select(range(10))
    args = linear_probe.parse_args(["--model_name_or_path", str(pretrained), "--output_dir", "unused"])
    collator = common.ImageGPTCollator(processor, "image", "label", train=False)
    loader = common.dataloader(dataset, collator, args, train=False)

    class Single:  # the bits of Accelerator that model_features uses, for one process
        is_local_main_process = False

        @staticmethod
        def gather_for_metrics(x):
            return x

    features, labels = linear_probe.model_features(Single(), model, loader, [0, 1, 2], "test")
    assert features.shape == (3, 10, 32) and labels.tolist() == list(dataset["label"])
    ids = processor(list(dataset["image"]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, prepend_sos=True, output_hidden_states=True).hidden_states
    with torch.no_grad():
        expected = model.h[1].ln_1(hidden[1]).mean(dim=1)  # n^1: layer 1 through the norm that reads it
    np.testing.assert_allclose(features[1], expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sample_completes_held_out_images_from_their_top_half(ar_checkpoint, tmp_path):
    pretrained, _ = ar_checkpoint
    log = run_script(
        "sample.py", "--model_name_or_path", str(pretrained), "--num_images", "3", "--num_completions", "2",
        "--num_samples", "4", "--upscale", "4", "--top_k", "8", "--output_dir", str(tmp_path),
    )  # fmt: skip
    cell, gap = 4 * 4, 2  # 4x4 images magnified 4 times, 2-pixel gaps
    with PIL.Image.open(tmp_path / "completions.png") as image:
        completions = np.asarray(image.convert("RGB"))
    # 3 rows of: original | given (top half) | 2 completions.
    assert completions.shape == (gap + 3 * (cell + gap), gap + 4 * (cell + gap), 3)

    def cells(row):
        top = gap + row * (cell + gap)
        return [completions[top : top + cell, gap + c * (cell + gap) :][:, :cell] for c in range(4)]

    for row in range(3):
        original, given, *generated = cells(row)
        assert np.array_equal(given[: cell // 2], original[: cell // 2])  # the given rows are the original's
        assert (given[cell // 2 :] == 128).all()  # the rest is hidden
        for completion in generated:
            assert np.array_equal(completion[: cell // 2], original[: cell // 2])  # kept, then continued
    with PIL.Image.open(tmp_path / "samples.png") as image:
        assert image.size == (gap + 4 * (cell + gap), gap + cell + gap)
    assert f"Wrote completions: {tmp_path / 'completions.png'}" in log


@pytest.mark.slow
def test_sample_writes_nearest_neighbour_upscaled_grids_beside_the_originals(tiny_checkpoint, tmp_path):
    log = run_script(
        "sample.py", "--model_name_or_path", str(tiny_checkpoint), "--num_images", "2", "--num_completions", "2",
        "--num_samples", "3", "--upscale", "4", "--upscale_model", "12", "--output_dir", str(tmp_path),
    )  # fmt: skip
    for name in ("completions", "completions_upscaled", "samples", "samples_upscaled"):
        assert f"Wrote {name}: {tmp_path / name}.png" in log
    # The plain grids: 4x4 images at 4x, 16-pixel cells (too narrow for titles); the upscaled ones: the same images
    # 12 times larger, 48-pixel cells, titled. Rows of original | given (top half) | 2 completions.
    plain = grid_cells(tmp_path / "completions.png", 16, rows=2, columns=4)
    upscaled = grid_cells(tmp_path / "completions_upscaled.png", 48, rows=2, columns=4, titled=True)
    plain += grid_cells(tmp_path / "samples.png", 16, rows=1, columns=3)
    upscaled += grid_cells(tmp_path / "samples_upscaled.png", 48, rows=1, columns=3)
    for plain_row, upscaled_row in zip(plain, upscaled):
        for small, large in zip(plain_row, upscaled_row):
            assert np.array_equal(large, small[::4, ::4].repeat(12, axis=0).repeat(12, axis=1))
    for original, given, *_ in upscaled[:2]:
        assert np.array_equal(given[:24], original[:24]) and (given[24:] == 128).all()


@pytest.mark.slow
def test_sample_upscales_with_a_super_resolution_checkpoint(tiny_checkpoint, swin2sr_checkpoint, tmp_path):
    run_script(
        "sample.py", "--model_name_or_path", str(tiny_checkpoint), "--num_images", "1", "--num_completions", "2",
        "--num_samples", "2", "--upscale_model", str(swin2sr_checkpoint), "--output_dir", str(tmp_path),
    )  # fmt: skip
    # The plain grids keep their default magnification (16x: 64-pixel cells); the upscaled ones show the model's x2
    # output at its own size (8-pixel cells, no titles), the given cell cut from the upscaled original.
    plain = grid_cells(tmp_path / "samples.png", 64, rows=1, columns=2)
    plain += grid_cells(tmp_path / "completions.png", 64, rows=1, columns=4, titled=True)
    upscaled = grid_cells(tmp_path / "samples_upscaled.png", 8, rows=1, columns=2)
    upscaled += grid_cells(tmp_path / "completions_upscaled.png", 8, rows=1, columns=4)
    images = [PIL.Image.fromarray(np.ascontiguousarray(cell[::16, ::16])) for cell in plain[0] + plain[1][::2]]
    expected = [np.asarray(image) for image in upscale_images(images, str(swin2sr_checkpoint))]
    for cell, image in zip(upscaled[0] + upscaled[1][::2], expected, strict=True):
        assert np.abs(cell.astype(int) - image).max() <= 1  # the model's output (up to rounding across processes)
    nearest = np.asarray(images[0]).repeat(2, axis=0).repeat(2, axis=1)
    assert np.abs(upscaled[0][0].astype(int) - nearest).max() > 8  # not a nearest-neighbour enlargement
    original, given = upscaled[1][:2]
    assert np.array_equal(given[:4], original[:4]) and (given[4:] == 128).all()


@pytest.mark.slow
def test_sample_refuses_a_bert_model(bert_checkpoint, tmp_path):
    pretrained, _ = bert_checkpoint
    with pytest.raises(ValueError, match="BERT-objective model: it predicts masked pixels"):
        sample.main(["--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_demo_runs_every_stage_and_names_every_artifact(tmp_path):
    out = tmp_path / "demo"
    log = run_script(
        "demo.py", "--output_dir", str(out), "--n_px", "4", "--config_overrides", "n_layer=2,n_embd=32,n_head=2",
        "--pretrain_steps", "4", "--finetune_steps", "2", "--num_images", "2", "--num_completions", "2",
        "--num_samples", "2", "--num_processes", "2", timeout=600,
    )  # fmt: skip
    summary = (out / "SUMMARY.md").read_text()
    # Two processes for pretraining, probing and fine-tuning; one for sampling.
    launch = "$ accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml --num_processes 2"
    for stage in ("pretrain", "linear_probe", "finetune"):
        assert f"{launch} examples/{stage}.py" in log
    assert "$ python examples/sample.py" in log
    assert "[RANK 1] Distributed environment: DistributedType.MULTI_CPU" in (out / "logs" / "pretrain.log").read_text()
    for path in ("pretrained/model.safetensors", "pretrained/README.md", "samples/completions.png",
                 "samples/samples.png", "probe/probe_results.md", "probe/probe_accuracy.png",
                 "finetuned/model.safetensors", "logs/pretrain.log"):  # fmt: skip
        assert (out / path).is_file(), path
    for path in ("samples/completions.png", "samples/completions_upscaled.png", "samples/samples_upscaled.png",
                 "probe/probe_accuracy.png", "finetuned"):  # fmt: skip
        assert str(out / path) in summary
    # Upscaled by default with nearest-neighbour pixels, 128 pixels a side (4x4 digits, 32 times), beside the originals.
    assert "--upscale_model 32" in log
    samples = grid_cells(out / "samples" / "samples.png", 64, rows=1, columns=2)
    upscaled = grid_cells(out / "samples" / "samples_upscaled.png", 128, rows=1, columns=2)
    for small, large in zip(samples[0], upscaled[0]):
        assert np.array_equal(large, small[::16, ::16].repeat(32, axis=0).repeat(32, axis=1))
    grid_cells(out / "samples" / "completions_upscaled.png", 128, rows=2, columns=4, titled=True)
    assert "| Layer | Pretrained | Random init |" in summary and "Raw pixels" in summary
    assert "Wall time:" in log and str(out / "SUMMARY.md") in log


# ---------------------------------------------------------------------------------------------------------------------
# Two processes, and resuming after a crash
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_on_cpu_pretrain_and_finetune(tmp_path):

    pretrained, finetuned = tmp_path / "pretrained", tmp_path / "finetuned"
    log = launch(
        "multi_cpu.yaml", "pretrain.py", *TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "2",
        "--output_dir", str(pretrained),
    )  # fmt: skip
    for rank in (0, 1):
        assert f"[RANK {rank}] Distributed environment: DistributedType.MULTI_CPU  Backend: gloo" in log
        assert f"Process index: {rank}" in log
    assert "Num processes: 2" in log
    # 2 processes x 8 images per step.
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in log
    assert (pretrained / "model.safetensors").is_file()

    # 31 evaluation images: the two processes get 16 each, one of them padded; the padding must not be counted.
    small_data = ["--max_train_samples", "64", "--max_eval_samples", "31", "--per_device_eval_batch_size", "8"]
    log = launch(
        "multi_cpu.yaml", "finetune.py", "--model_name_or_path", str(pretrained), *small_data, *TRAIN,
        "--max_train_steps", "2", "--output_dir", str(finetuned),
    )  # fmt: skip
    assert "[RANK 1] Distributed environment: DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    results = json.loads((finetuned / common.RESULTS_FILE).read_text())
    assert math.isclose(classifier_accuracy(finetuned, 31), results["eval_accuracy"], abs_tol=1e-6)


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    """SIGKILL once a checkpoint exists, resume from 'latest': the weights equal an uninterrupted run's.

    40 images in batches of 8, 2 batches per step: steps end mid-epoch and at epoch ends with a partial
    accumulation, so resuming must restore the data order, crops, dropout and the accumulation state.
    """
    run = [
        *TINY_MODEL, "--max_train_samples", "40", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--max_train_steps", "24", "--checkpointing_steps", "4",
        "--num_warmup_steps", "2",
    ]  # fmt: skip
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_script("pretrain.py", *run, "--output_dir", str(reference))

    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "pretrain.py"), *run, "--output_dir", str(interrupted)],
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 240
    while not (interrupted / "checkpoints" / "step_4").is_dir():
        assert process.poll() is None, "pretraining ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model.safetensors").exists(), "the run finished before it was killed"
    steps = [step for step, _ in common.checkpoint_dirs(str(interrupted))]
    assert steps and max(steps) < 24

    log = run_script("pretrain.py", *run, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest")
    assert f"Resumed from checkpoint {interrupted / 'checkpoints' / f'step_{max(steps)}'} at step {max(steps)}" in log
    expected, resumed = weights(reference), weights(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    reference_results = json.loads((reference / common.RESULTS_FILE).read_text())
    assert json.loads((interrupted / common.RESULTS_FILE).read_text()) == pytest.approx(reference_results, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate runs FSDP on GPUs only (examples/README.md)")
def test_fsdp_pretraining_resumes_and_matches_data_parallel(tmp_path):
    """fsdp.yaml on every GPU of the machine, in float32: sharded checkpoints, a SIGKILL once one exists and a resume
    from 'latest'; the gathered final model loads with from_pretrained and equals the data-parallel run's (same
    processes, same batches) within float32 noise."""
    from transformers import AutoModelForCausalLM

    gpus = torch.cuda.device_count()
    env = {**script_env(), "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    no_dropout = "n_layer=2,n_embd=32,n_head=2,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"
    run = [
        "--n_px", "4", "--config_overrides", no_dropout, "--mixed_precision", "no", "--max_train_samples", "64",
        "--max_eval_samples", "16", "--per_device_train_batch_size", "4", "--max_train_steps", "16",
        "--checkpointing_steps", "4",
    ]  # fmt: skip
    reference, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    launch("multi_gpu.yaml", "pretrain.py", *run, "--output_dir", str(reference), env=env, num_processes=gpus)

    command = launch_command("fsdp.yaml", "pretrain.py", *run, "--output_dir", str(sharded), num_processes=gpus)
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True)  # its own group: kill them all
    deadline = time.monotonic() + 300
    while not (sharded / "checkpoints" / "step_4").is_dir():
        assert process.poll() is None, "pretraining ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (sharded / "model.safetensors").exists(), "the run finished before it was killed"
    assert list((sharded / "checkpoints" / "step_4").glob("pytorch_model_fsdp_0/*.distcp"))  # sharded, not gathered

    resume = ["--output_dir", str(sharded), "--resume_from_checkpoint", "latest"]
    log = launch("fsdp.yaml", "pretrain.py", *run, *resume, env=env, num_processes=gpus)
    assert "Resumed from checkpoint" in log and "DistributedType.FSDP" in log
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_on_a_machine_without_gpus_is_refused(monkeypatch, tmp_path):
    """Accelerate shards only on GPU-type devices; on CPUs an FSDP config would quietly become plain DDP."""
    if torch.accelerator.is_available():
        pytest.skip("FSDP runs on this machine's accelerator")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(ValueError, match="FSDP config, but this machine has no GPU.*multi_cpu.yaml"):
        pretrain.main([*TINY_MODEL, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training starts, and nothing of the user's lost
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a script builds its optimizer (which comes right before training)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(common, "optimizer_and_scheduler", forbidden)


@pytest.fixture
def gpt2_checkpoint(tmp_path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(path)
    return path


def test_missing_image_column(no_training, tmp_path):
    with pytest.raises(ValueError, match=r"--image_column_name 'photo' is not a column.*\['image', 'label'\]"):
        pretrain.main([*TINY_MODEL, "--image_column_name", "photo", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_label_column_that_is_missing_or_holds_no_labels(no_training, tiny_checkpoint, tmp_path):
    base = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out")]
    for script in (finetune, linear_probe):
        with pytest.raises(ValueError, match=r"--label_column_name 'digit' is not a column"):
            script.main([*base, "--label_column_name", "digit"])
        with pytest.raises(ValueError, match=r"--label_column_name 'image' holds Image values, not class labels"):
            script.main([*base, "--label_column_name", "image"])


def test_a_dataset_without_labels(no_training, tiny_checkpoint, tmp_path):
    images = tmp_path / "unlabeled"  # an imagefolder without class subfolders: no label column
    images.mkdir()
    for i, digit in enumerate(list(common.load_digits_dataset()["train"].select(range(6))["image"])):
        digit.save(images / f"{i}.png")
    base = ["--model_name_or_path", str(tiny_checkpoint), "--train_dir", str(images)]
    for script in (finetune, linear_probe):
        with pytest.raises(ValueError, match="needs class labels, but the dataset has no label column"):
            script.main([*base, "--output_dir", str(tmp_path / "out")])
    # Pretraining needs no labels: the same folder is fine there (checked up to the training loop).
    with pytest.raises(AssertionError, match="training started"):
        pretrain.main(
            [*TINY_MODEL, "--palette_size", "4", "--train_dir", str(images), "--output_dir", str(tmp_path / "pt")]
        )


def test_a_truncated_image_is_named(tiny_checkpoint, tmp_path):
    """One unreadable file in --train_dir: the error names it (in the training loop, or in the palette fit)."""
    train_dir = tmp_path / "images"
    for i, digit in enumerate(list(common.load_digits_dataset()["train"].select(range(16))["image"])):
        (train_dir / str(i % 2)).mkdir(parents=True, exist_ok=True)
        digit.resize((16, 16)).save(train_dir / str(i % 2) / f"{i}.png")
    broken = train_dir / "1" / "7.png"
    broken.write_bytes(broken.read_bytes()[:-30])
    run = [
        *TINY_MODEL,
        "--train_dir",
        str(train_dir),
        "--train_val_split",
        "0.25",
        "--per_device_train_batch_size",
        "4",
    ]
    with pytest.raises(
        ValueError, match=rf"Cannot read the image {broken}.*image file is truncated.*Remove or replace"
    ):
        pretrain.main([*run, "--processor_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ValueError, match=rf"Cannot read the image {broken}"):
        pretrain.main([*run, "--palette_size", "4", "--output_dir", str(tmp_path / "b")])


def test_checkpoint_of_another_architecture(no_training, gpt2_checkpoint, tmp_path):
    for script in (finetune, linear_probe):
        with pytest.raises(
            ValueError, match=r"is a 'gpt2' checkpoint \(GPT2Config\); these examples need an Image GPT"
        ):
            script.main(["--model_name_or_path", str(gpt2_checkpoint), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="is a 'gpt2' checkpoint"):
        pretrain.main(["--config_name", str(gpt2_checkpoint), "--output_dir", str(tmp_path / "out")])


def test_n_px_larger_than_the_models_positions(no_training, tiny_checkpoint, tmp_path):
    for script in (finetune, linear_probe):  # 4x4: 16 positions
        with pytest.raises(ValueError, match=r"--n_px 8 needs 64 positions but the model .* has n_positions=16"):
            script.main(["--model_name_or_path", str(tiny_checkpoint), "--n_px", "8", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--n_px 8 needs 64 positions"):
        pretrain.main(["--config_name", str(tiny_checkpoint), "--n_px", "8", "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1, got 0"),
        (["--train_val_split", "-0.5"], r"--train_val_split .* must be in \[0, 1\), got -0.5"),
        (["--train_val_split", "1"], r"--train_val_split .* must be in \[0, 1\), got 1.0"),
        (["--config_overrides", "n_layer=abc"], r"--config_overrides 'n_layer=abc' is not a valid override"),
        (["--config_overrides", "n_lyr=3"], r"--config_overrides 'n_lyr=3' is not a valid override"),
        (["--config_overrides", "vocab_size=9"], "vocab_size follows from the images and the palette"),
        (["--num_warmup_steps", "-1"], "--num_warmup_steps must be >= 0, got -1"),
        (["--num_warmup_steps", "50", "--max_train_steps", "10"], "would never reach --learning_rate"),
        (["--checkpointing_steps", "²"], "--checkpointing_steps must be a positive whole number of steps or 'epoch'"),
        (["--checkpointing_steps", "epochs"], "--checkpointing_steps must be a positive whole number"),
        (["--checkpointing_steps", "50", "--max_train_steps", "10"], "no checkpoint would ever be written"),
        (["--train_dir", "no/such/folder"], "--train_dir 'no/such/folder' is not a folder"),
    ],
)
def test_argument_errors_before_anything_is_loaded(arguments, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        pretrain.parse_args([*arguments, "--output_dir", str(tmp_path)])


def test_demo_argument_errors(tmp_path):
    import demo

    with pytest.raises(
        ValueError, match="--num_processes must be at least 1 and divide the batch of 64 images, got 0"
    ):
        demo.parse_args(["--num_processes", "0"])
    # The sampling stage's --upscale_model, refused before pretraining.
    with pytest.raises(ValueError, match="--upscale_model as a factor must be at least 1, got 0"):
        demo.parse_args(["--upscale_model", "0"])
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match=rf"--upscale_model '{re.escape(missing)}' is neither an integer factor"):
        demo.parse_args(["--upscale_model", missing])


@pytest.mark.parametrize("value", ["0", "-2"])
def test_sample_refuses_an_upscale_factor_below_one(value, tmp_path):
    with pytest.raises(ValueError, match=f"--upscale_model as a factor must be at least 1, got {value}"):
        sample.parse_args(["--model_name_or_path", "unused", "--output_dir", str(tmp_path), "--upscale_model", value])


def test_sample_refuses_a_bad_upscale_model_before_generating(monkeypatch, tiny_checkpoint, gpt2_checkpoint, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("generation started despite a bad --upscale_model")

    monkeypatch.setattr(sample, "sample", forbidden)
    monkeypatch.setattr(sample, "complete", forbidden)
    out = tmp_path / "out"
    run = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(out)]
    # An Image GPT, a GPT-2 and a folder that does not exist: none is a super-resolution checkpoint.
    for value in (str(tiny_checkpoint), str(gpt2_checkpoint), str(tmp_path / "no_such_model")):
        with pytest.raises(
            ValueError,
            match=rf"--upscale_model '{re.escape(value)}' is neither an integer factor nor an image super-resolution",
        ):
            sample.main([*run, "--upscale_model", value])
    assert not out.exists()
    # The checkpoint is an input: grids are never written inside it.
    upscaler = tmp_path / "upscaler"
    upscaler.mkdir()
    with pytest.raises(ValueError, match=rf"{upscaler / 'grids' / 'completions.png'} is inside the input {upscaler}"):
        sample.main([*run[:-1], str(upscaler / "grids"), "--upscale_model", str(upscaler)])
    assert list(upscaler.iterdir()) == []


def test_a_broken_newest_checkpoint_is_named_with_the_intact_one_before_it(no_training, tmp_path):
    run = [*TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    damages = {
        "truncated weights": ("model.safetensors", lambda data: data[:-5]),
        "truncated state": (common.STATE_FILE, lambda data: data[:20]),
        "state without fields": (common.STATE_FILE, lambda data: b'{"completed_steps": 4, "epoch": 0}'),
        "truncated optimizer": ("optimizer.bin", lambda data: data[: len(data) // 2]),
    }
    for name, (file, damage) in damages.items():
        output_dir = tmp_path / name.replace(" ", "_")
        fake_checkpoint(output_dir, 2)
        newest = fake_checkpoint(output_dir, 4)
        (newest / file).write_bytes(damage((newest / file).read_bytes()))
        with pytest.raises(
            ValueError, match=rf"Cannot resume from the checkpoint {newest}: .*{file}.*step_2"
        ) as error:
            pretrain.main([*run, "--output_dir", str(output_dir)])
        assert f"--resume_from_checkpoint {output_dir / 'checkpoints' / 'step_2'}" in str(error.value), name


def test_resume_refuses_a_checkpoint_of_another_script_or_other_settings(no_training, tiny_checkpoint, tmp_path):
    fake_checkpoint(tmp_path, 3)
    run = [*SMALL_DATA, *TRAIN, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match="per_device_train_batch_size: 8 then, 4 now"):
        pretrain.main([*TINY_MODEL, *run, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path)])
    # Fine-tuning in the folder of a pretraining run: its checkpoints hold a model of another head.
    with pytest.raises(ValueError, match="written by pretrain.py, not finetune.py"):
        finetune.main(["--model_name_or_path", str(tiny_checkpoint), *run, "--output_dir", str(tmp_path)])
    assert not (tmp_path / "model.safetensors").exists()


def test_existing_output_is_kept_unless_overwrite(tiny_checkpoint, tmp_path):
    """A folder or a file the user made is refused before any work, unchanged; the model folder is never written
    into while it is read, whatever --overwrite says."""
    user = tmp_path / "user_model"
    user.mkdir()
    files = {"README.md": "my notes", "config.json": "{}", "model-00001-of-00002.safetensors": "shard"}
    for name, text in files.items():
        (user / name).write_text(text)
    with pytest.raises(ValueError, match=rf"--output_dir {user} exists and is not empty.*--overwrite"):
        pretrain.main([*TINY_MODEL, "--output_dir", str(user)])
    assert {p.name: p.read_text() for p in user.iterdir()} == files

    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match=rf"--output_dir {tiny_checkpoint} is the input {tiny_checkpoint}"):
            finetune.main(
                ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tiny_checkpoint), *overwrite]
            )
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "samples.png").write_bytes(b"my samples")
    with pytest.raises(ValueError, match=rf"{samples / 'samples.png'} exists.*--overwrite"):
        sample.main(["--model_name_or_path", str(tiny_checkpoint), "--num_images", "0", "--output_dir", str(samples)])
    assert (samples / "samples.png").read_bytes() == b"my samples"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "samples.png").symlink_to(samples / "samples.png")  # a link out of the output folder
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="symbolic link"):
            sample.main(
                ["--model_name_or_path", str(tiny_checkpoint), "--num_images", "0", "--output_dir", str(linked)]
                + overwrite
            )
    assert (samples / "samples.png").read_bytes() == b"my samples"
    (samples / "probe_results.md").write_text("my table")
    with pytest.raises(ValueError, match=rf"{samples / 'probe_results.md'} exists.*--overwrite"):
        linear_probe.main(["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(samples)])
    import demo

    with pytest.raises(ValueError, match=rf"--output_dir {samples} exists and is not empty"):
        demo.main(["--output_dir", str(samples)])
    assert sorted(p.name for p in samples.iterdir()) == ["probe_results.md", "samples.png"]
    # Checkpoints of an earlier run are content too: resumed with --resume_from_checkpoint, or replaced with --overwrite.
    fake_checkpoint(tmp_path / "run", 3)
    with pytest.raises(ValueError, match=r"holds checkpoints\). Choose another folder, or pass --overwrite"):
        pretrain.main([*TINY_MODEL, "--output_dir", str(tmp_path / "run")])
