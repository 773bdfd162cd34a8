"""The example scripts (examples/), run as users run them: a few steps each on the bundled digits, with tiny models.

Script runs go through subprocesses (`python examples/<script>.py`, `accelerate launch`); the checks of bad input
call the scripts' `main(argv)` in-process, since they must fail before any training starts.
"""

import json
import math
import os
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
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import finetune  # noqa: E402
import linear_probe  # noqa: E402
import pretrain  # noqa: E402

# A 2-layer, 32-wide model on 4x4 digits: a script run takes seconds.
TINY_MODEL = ["--n_px", "4", "--config_overrides", "n_layer=2,n_embd=32,n_head=2"]
SMALL_DATA = ["--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_eval_batch_size", "32"]
TRAIN = ["--per_device_train_batch_size", "8", "--logging_steps", "1"]


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


def launch(config: str, script: str, *args: str, timeout: int = 300) -> str:
    """`accelerate launch --config_file examples/accelerate_configs/<config> examples/<script> args...`."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(EXAMPLES / "accelerate_configs" / config), str(EXAMPLES / script), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"accelerate launch {script} failed:\n{output[-6000:]}"
    return output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pretrain_ar")
    log = run_script(
        "pretrain.py", "--objective", "ar", *TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "3",
        "--checkpointing_steps", "3", "--output_dir", str(out),
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
    dataset = common.load_digits_dataset()["train"]
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    processor = common.ImageGPTImageProcessor(clusters=palette, size={"height": 8, "width": 8})
    examples = [(i, dataset[i]) for i in range(16)]

    def collate(seed=0, epoch=0, train=True, mask_prob=None):
        collator = common.ImageGPTCollator(
            processor, "image", "label", train=train, random_crop_scale=(0.3, 1.0), mask_prob=mask_prob, seed=seed
        )
        collator.epoch = epoch
        return collator(examples)

    rng_before = torch.get_rng_state()
    first = collate(mask_prob=0.15)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training randomness elsewhere is untouched
    assert first["input_ids"].shape == (16, 64) and first["labels"].tolist() == list(dataset["label"][:16])
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
    root = tmp_path / common.CHECKPOINTS_DIR
    for name, complete in [("step_2", True), ("step_10", True), ("step_12", False), (".tmp-step_14", True)]:
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"partial")
        if complete:
            (root / name / common.STATE_FILE).write_text("{}")
    assert [step for step, _ in common.checkpoint_dirs(str(tmp_path))] == [2, 10]

    from accelerate import PartialState

    PartialState()  # the scripts' logger needs Accelerate's state
    args = pretrain.parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert common.resolve_checkpoint(args) == str(root / "step_10")
    args.resume_from_checkpoint = str(root / "step_12")  # a crash while it was written
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        common.resolve_checkpoint(args)
    args.resume_from_checkpoint = "latest"
    args.output_dir = str(tmp_path / "fresh")
    assert common.resolve_checkpoint(args) is None  # nothing yet: start from scratch


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
# The scripts, a few steps each
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_ar_writes_a_loadable_checkpoint(ar_checkpoint):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM

    from image_gpt_hf import ImageGPTForCausalImageModeling, ImageGPTImageProcessor, ImageGPTModel

    out, log = ar_checkpoint
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, ImageGPTForCausalImageModeling)
    assert model.config.objective == "ar" and model.config.prepend_sos and model.config.n_positions == 16
    assert model.config.vocab_size == common.DIGITS_PALETTE_SIZE + 1
    assert isinstance(AutoModel.from_pretrained(out), ImageGPTModel)
    processor = AutoImageProcessor.from_pretrained(out)
    assert isinstance(processor, ImageGPTImageProcessor) and len(processor.clusters) == common.DIGITS_PALETTE_SIZE

    results = json.loads((out / common.RESULTS_FILE).read_text())
    assert math.isclose(results["eval_bpd"], results["eval_loss"] / math.log(2), rel_tol=1e-6)
    assert 0 < results["eval_bpd"] < math.log2(common.DIGITS_PALETTE_SIZE) + 0.5  # about uniform after 3 steps
    # The reported number is OpenAI's loss (all pixels, SOS first) on the evaluation images, recomputed here.
    images = list(common.load_digits_dataset()["test"].shuffle(seed=42).select(range(32))["image"])
    ids = processor(images, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model.eval()(input_ids=ids, labels=ids).loss
    assert math.isclose(loss.item(), results["eval_loss"], rel_tol=1e-4)

    card = (out / "README.md").read_text()
    assert "bits per dimension" in card and "examples/pretrain.py" in card
    assert "Total optimization steps = 3" in log and f"Saved the model to {out}" in log


@pytest.mark.slow
def test_pretrain_bert(bert_checkpoint):
    from transformers import AutoModelForMaskedImageModeling

    from image_gpt_hf import ImageGPTForMaskedImageModeling

    out, log = bert_checkpoint
    model = AutoModelForMaskedImageModeling.from_pretrained(out)
    assert isinstance(model, ImageGPTForMaskedImageModeling) and model.config.objective == "bert"
    assert not model.config.prepend_sos
    assert math.isfinite(json.loads((out / common.RESULTS_FILE).read_text())["eval_bpd"])
    assert "eval_bpd" in log


@pytest.mark.slow
def test_finetune_on_the_joint_loss(ar_checkpoint, tmp_path):
    from transformers import AutoModelForImageClassification

    from image_gpt_hf import ImageGPTForImageClassification

    pretrained, _ = ar_checkpoint
    log = run_script(
        "finetune.py", "--model_name_or_path", str(pretrained), "--gen_loss_weight", "0.5", *SMALL_DATA, *TRAIN,
        "--max_train_steps", "3", "--output_dir", str(tmp_path),
    )  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(model, ImageGPTForImageClassification)
    assert model.config.id2label == {i: str(i) for i in range(10)} and model.config.gen_loss_weight == 0.5
    assert model.config.prepend_sos and hasattr(model, "lm_head")
    # The decoder was trained on from the pretrained weights, not replaced.
    before, after = weights(pretrained), weights(tmp_path)
    assert before["transformer.wpe.weight"].shape == after["transformer.wpe.weight"].shape
    assert not torch.equal(before["transformer.wpe.weight"], after["transformer.wpe.weight"])
    assert torch.allclose(before["transformer.wpe.weight"], after["transformer.wpe.weight"], atol=0.05)
    results = json.loads((tmp_path / common.RESULTS_FILE).read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_accuracy" in log
    assert "Newly initialised: ['score.weight']" in log


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
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["C"] in (0.1, 1.0) for r in results[name].values())
    assert results["raw_pixels"]["accuracy"] > 0.5  # 4x4 digits are far from chance (0.1) for a linear model
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
    processor = common.load_processor(str(pretrained))
    dataset = common.load_digits_dataset()["test"].select(range(10))
    args = linear_probe.parse_args(["--model_name_or_path", str(pretrained), "--output_dir", "unused"])
    loader = common.ordered_dataloader(args, dataset, processor, "image", "label")

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
def test_sample_refuses_a_bert_model(bert_checkpoint, tmp_path):
    import sample

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
    for path in ("samples/completions.png", "probe/probe_accuracy.png", "finetuned"):
        assert str(out / path) in summary
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

    log = launch(
        "multi_cpu.yaml", "finetune.py", "--model_name_or_path", str(pretrained), *SMALL_DATA, *TRAIN,
        "--max_train_steps", "2", "--output_dir", str(finetuned),
    )  # fmt: skip
    assert "[RANK 1] Distributed environment: DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    results = json.loads((finetuned / common.RESULTS_FILE).read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0


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
def test_resume_refuses_a_checkpoint_of_other_settings(ar_checkpoint, tmp_path):
    pretrained, _ = ar_checkpoint
    shutil.copytree(pretrained / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="per_device_train_batch_size: 8 then, 4 now"):
        pretrain.main(
            [*TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "3", "--per_device_train_batch_size", "4",
             "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"]
        )  # fmt: skip
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training starts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a script reaches its training loop or builds its optimizer."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(common, "train", forbidden)
    monkeypatch.setattr(common, "optimizer_and_scheduler", forbidden)


@pytest.fixture
def gpt2_checkpoint(tmp_path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(path)
    return path


def test_missing_image_column(no_training, tmp_path):
    with pytest.raises(ValueError, match=r"--image_column_name 'photo' is not a column.*\['image', 'label'\]"):
        pretrain.main([*TINY_MODEL, "--image_column_name", "photo", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
def test_missing_label_column(no_training, ar_checkpoint, tmp_path):
    pretrained, _ = ar_checkpoint
    with pytest.raises(ValueError, match=r"--label_column_name 'digit' is not a column"):
        finetune.main(
            ["--model_name_or_path", str(pretrained), "--label_column_name", "digit", "--output_dir", str(tmp_path)]
        )


@pytest.mark.slow
def test_finetune_on_a_dataset_without_labels(no_training, ar_checkpoint, tmp_path):
    pretrained, _ = ar_checkpoint
    images = tmp_path / "unlabeled"  # an imagefolder without class subfolders: no label column
    images.mkdir()
    for i, digit in enumerate(list(common.load_digits_dataset()["train"].select(range(6))["image"])):
        digit.save(images / f"{i}.png")
    with pytest.raises(ValueError, match="needs class labels, but the dataset has no label column"):
        finetune.main(
            [
                "--model_name_or_path",
                str(pretrained),
                "--train_dir",
                str(images),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    with pytest.raises(ValueError, match="needs class labels"):
        linear_probe.main(
            [
                "--model_name_or_path",
                str(pretrained),
                "--train_dir",
                str(images),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    # Pretraining needs no labels: the same folder is fine there (checked up to the training loop).
    with pytest.raises(AssertionError, match="training started"):
        pretrain.main(
            [*TINY_MODEL, "--palette_size", "4", "--train_dir", str(images), "--output_dir", str(tmp_path / "pt")]
        )


def test_checkpoint_of_another_architecture(no_training, gpt2_checkpoint, tmp_path):
    for script in (finetune, linear_probe):
        with pytest.raises(
            ValueError, match=r"is a 'gpt2' checkpoint \(GPT2Config\); these examples need an Image GPT"
        ):
            script.main(["--model_name_or_path", str(gpt2_checkpoint), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="is a 'gpt2' checkpoint"):
        pretrain.main(["--config_name", str(gpt2_checkpoint), "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_n_px_larger_than_the_models_positions(no_training, ar_checkpoint, tmp_path):
    pretrained, _ = ar_checkpoint  # 4x4: 16 positions
    for script in (finetune, linear_probe):
        with pytest.raises(ValueError, match=r"--n_px 8 needs 64 positions but the model .* has n_positions=16"):
            script.main(["--model_name_or_path", str(pretrained), "--n_px", "8", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--n_px 8 needs 64 positions"):
        pretrain.main(["--config_name", str(pretrained), "--n_px", "8", "--output_dir", str(tmp_path)])


def test_argument_errors_before_anything_is_loaded(tmp_path):
    with pytest.raises(ValueError, match="--checkpoints_total_limit must be at least 1, got 0"):
        pretrain.main([*TINY_MODEL, "--checkpoints_total_limit", "0", "--output_dir", str(tmp_path)])
    import demo

    with pytest.raises(
        ValueError, match="--num_processes must be at least 1 and divide the batch of 64 images, got 0"
    ):
        demo.parse_args(["--num_processes", "0"])
