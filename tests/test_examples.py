"""The training scripts (examples/pretrain.py, finetune.py, demo.py), run as users run them, judged by what they
write: the model folder and its card, all_results.json, checkpoints, logs and error messages.

Training runs go through subprocesses (`python examples/<script>.py`, `accelerate launch`) and are marked slow. Runs
that must be refused are run in this process (`runpy`, as `python examples/<script>.py` runs them, with the imports
already loaded), since they fail in seconds; nothing here imports a script's functions.
"""

import json
import math
import os
import re
import resource
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
from conftest import EXAMPLES, ROOT, launch, launch_command, refusal, run_in_process, run_script, script_env, snapshot
from filelock import FileLock
from safetensors.torch import load_file, save_file

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor, load_digits

# A 2-layer, 32-wide model on 4x4 digits: a script run takes seconds.
TINY_MODEL = ["--n_px", "4", "--config_overrides", "n_layer=2,n_embd=32,n_head=2"]
SMALL_DATA = ["--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_eval_batch_size", "32"]
TRAIN = ["--per_device_train_batch_size", "8", "--logging_steps", "1"]
# Enough data and steps to learn something: 256 digits, batches of 16.
LEARN = ["--max_train_samples", "256", "--max_eval_samples", "128", "--per_device_eval_batch_size", "64"]
LEARN += ["--per_device_train_batch_size", "16", "--logging_steps", "10", "--learning_rate", "3e-3"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def eval_images(count: int) -> list[PIL.Image.Image]:
    """The evaluation images a script reads with `--max_eval_samples count` (seed 42) on the digits."""
    return list(load_digits()["test"].shuffle(seed=42).select(range(count))["image"])


def classifier_accuracy(folder: Path, count: int) -> float:
    """The accuracy of a saved classifier on the evaluation digits of `--max_eval_samples count`, in this process."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    test = load_digits()["test"].shuffle(seed=42).select(range(count))
    with torch.no_grad():
        ids = AutoImageProcessor.from_pretrained(folder)(list(test["image"]), return_tensors="pt")["input_ids"]
        predictions = model(input_ids=ids).logits.argmax(-1)
    return (predictions == torch.tensor(test["label"])).float().mean().item()


def image_folder(path: Path, classes: int = 2, per_class: int = 12, offset: int = 0, size: int = 8) -> Path:
    """An imagefolder of digits, one subfolder per class ("0", "1", ...)."""
    digits = load_digits()["train"]
    for index in range(classes * per_class):
        folder = path / str(index % classes)
        folder.mkdir(parents=True, exist_ok=True)
        digits[offset + index]["image"].resize((size, size)).save(folder / f"{index}.png")
    return path


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


@pytest.fixture
def gpt2_checkpoint(tmp_path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(path)
    return path


# The run every resume test starts from: 2 steps on an imagefolder, checkpointed at steps 1 and 2.
RESUMABLE = [*TINY_MODEL, "--palette_size", "4", "--per_device_train_batch_size", "8", "--max_train_steps", "2"]
RESUMABLE += ["--checkpointing_steps", "1", "--train_val_split", "0.25"]


@pytest.fixture(scope="module")
def resumable(tmp_path_factory) -> tuple[Path, Path]:
    """(the training folder, the checkpoints folder) of a finished 2-step run of `RESUMABLE` (its model beside it)."""
    data = image_folder(tmp_path_factory.mktemp("images") / "a")
    out = tmp_path_factory.mktemp("resumable") / "run"
    run_script("pretrain.py", *RESUMABLE, "--train_dir", str(data), "--output_dir", str(out))
    return data, out / "checkpoints"


def kill_at_first_checkpoint(command: list[str], out: Path, seconds: int, **options) -> list[int]:
    """Runs `command` until `out` holds a complete checkpoint, kills it (its process group) with SIGKILL; returns the
    numbers of the complete checkpoints it left."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, **options)
    deadline = time.monotonic() + seconds
    while not (out / "checkpoints" / "checkpoint_0" / "custom_checkpoint_0.pkl").is_file():
        assert process.poll() is None, "pretraining ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {seconds} s"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    return [int(p.parent.name[11:]) for p in (out / "checkpoints").glob("checkpoint_*/custom_*.pkl")]


def resume_refusal(resumable, tmp_path, *changes: str, train_dir: Path | None = None) -> str:
    """Resumes the `resumable` run's checkpoint in a fresh folder with `changes`; returns the refusal."""
    data, checkpoints = resumable
    out = tmp_path / "resumed"
    shutil.copytree(checkpoints, out / "checkpoints")
    run = [*RESUMABLE, "--train_dir", str(train_dir or data), "--output_dir", str(out)]
    message = refusal("pretrain.py", *run, "--resume_from_checkpoint", "latest", *changes)
    assert "To continue that run, pass its settings again" in message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # refused before anything was written
    return message


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training starts, and nothing of the user's lost
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--config_overrides", "n_layer=abc"], r"--config_overrides 'n_layer=abc' is not a valid override"),
        (["--config_overrides", "n_lyr=3"], r"--config_overrides 'n_lyr=3' is not a valid override"),
        (["--config_overrides", "vocab_size=9"], "vocab_size follows from the images and the palette"),
        (["--num_warmup_steps", "50", "--max_train_steps", "10"], "the peak would never come"),
        (["--checkpointing_steps", "²"], "--checkpointing_steps must be 'epoch' or a number of steps"),
        (["--checkpointing_steps", "epochs"], "--checkpointing_steps must be 'epoch' or a number of steps"),
        (["--checkpointing_steps", "50", "--max_train_steps", "10"], "a number of steps <= --max_train_steps"),
        (["--validation_dir", "images"], "--validation_dir needs a --train_dir"),
    ],
)
def test_argument_errors_before_anything_is_loaded(arguments, message, tmp_path):
    assert re.search(message, refusal("pretrain.py", *arguments, "--output_dir", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_config_overrides_that_contradict_a_flag_are_refused_with_both_values(tmp_path):
    out = str(tmp_path / "out")
    message = refusal("pretrain.py", "--objective", "ar", "--config_overrides", "objective=bert", "--output_dir", out)
    assert "--config_overrides objective=bert contradicts --objective ar" in message
    message = refusal("pretrain.py", "--config_overrides", "n_layer=2,prepend_sos=false", "--output_dir", out)
    assert "--config_overrides prepend_sos=False contradicts the objective 'ar' (--objective ar)" in message
    message = refusal("pretrain.py", "--objective", "bert", "--config_overrides", "prepend_sos=true", "--output_dir", out)  # fmt: skip
    assert "prepend_sos=True contradicts the objective 'bert'" in message
    assert not (tmp_path / "out").exists()


def test_fsdp_on_a_machine_without_gpus_is_refused(monkeypatch, tmp_path):
    """Accelerate shards only on GPU-type devices; on CPUs an FSDP config would quietly become plain DDP."""
    if torch.accelerator.is_available():
        pytest.skip("FSDP runs on this machine's accelerator")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    message = refusal("pretrain.py", *TINY_MODEL, "--output_dir", str(tmp_path / "out"))
    assert "FSDP config, but this machine has no GPU" in message and "multi_cpu.yaml" in message
    assert not (tmp_path / "out").exists()


def test_missing_image_column(tmp_path):
    message = refusal("pretrain.py", *TINY_MODEL, "--image_column_name", "photo", "--output_dir", str(tmp_path / "o"))
    assert "--image_column_name 'photo' is not a column; the columns: ['image', 'label']" in message
    assert not (tmp_path / "o").exists()


def test_label_column_that_is_missing_or_holds_no_labels(tiny_checkpoint, tmp_path):
    base = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out")]
    message = refusal("finetune.py", *base, "--label_column_name", "digit")
    assert "--label_column_name 'digit' is not a column; the columns" in message
    message = refusal("finetune.py", *base, "--label_column_name", "image")
    assert "--label_column_name 'image' holds Image values, not class labels" in message
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_labels_or_with_one_class(tiny_checkpoint, tmp_path):
    images = tmp_path / "unlabeled"  # an imagefolder without class subfolders: no label column
    images.mkdir()
    for i, digit in enumerate(load_digits()["train"].select(range(8))["image"]):
        digit.save(images / f"{i}.png")
    base = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out")]
    one_class = image_folder(tmp_path / "sevens", classes=1)
    for folder in (images, one_class):
        message = refusal("finetune.py", *base, "--train_dir", str(folder), "--train_val_split", "0.25")
        assert "needs class labels, but the dataset has no label column" in message
        assert "an imagefolder with one subfolder per class (two at least)" in message
    assert not (tmp_path / "out").exists()
    # Pretraining needs no labels: the same unlabeled folder trains.
    out = tmp_path / "pretrained"
    run_in_process(
        "pretrain.py", *TINY_MODEL, "--palette_size", "4", "--train_dir", str(images), "--train_val_split", "0.25",
        "--max_train_steps", "1", "--output_dir", str(out),
    )  # fmt: skip
    assert (out / "model.safetensors").is_file() and (out / "all_results.json").is_file()


def test_a_truncated_image_is_named(tiny_checkpoint, tmp_path):
    """One unreadable file in --train_dir: the error names it (in the training loop, or in the palette fit)."""
    train_dir = image_folder(tmp_path / "images", per_class=8, size=16)
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
    for source, out in ((["--processor_name_or_path", str(tiny_checkpoint)], "a"), (["--palette_size", "4"], "b")):
        message = refusal("pretrain.py", *run, *source, "--output_dir", str(tmp_path / out))
        assert f"Cannot read the image {broken}" in message and "Remove or replace that file" in message
        assert not (tmp_path / out / "model.safetensors").exists()


def test_lora_flags_without_a_rank_or_out_of_range(tiny_checkpoint, tmp_path):
    base = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out")]
    assert "--merge_lora needs --lora_r" in refusal("finetune.py", *base, "--merge_lora")
    assert "--lora_dropout needs --lora_r" in refusal("finetune.py", *base, "--lora_dropout", "0.1")
    assert "--lora_dropout needs --lora_r" in refusal("finetune.py", *base, "--lora_dropout", "0.0")
    assert not (tmp_path / "out").exists()


def test_lora_target_modules_that_match_no_projection_are_refused_with_the_valid_names(tiny_checkpoint, tmp_path):
    pytest.importorskip("peft")
    run = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out"), "--lora_r", "2"]
    for wrong in (["attn.c_attn", "nonsense.proj"], ["score"]):
        message = refusal("finetune.py", *run, "--lora_target_modules", *wrong)
        assert f"LoRA target modules {wrong[-1:]} name no projection of this model" in message
        assert "['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']" in message
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_architecture(gpt2_checkpoint, tmp_path):
    message = refusal("finetune.py", "--model_name_or_path", str(gpt2_checkpoint), "--output_dir", str(tmp_path / "o"))
    assert "is a 'gpt2' checkpoint (GPT2Config), not an Image GPT one" in message
    message = refusal("pretrain.py", "--config_name", str(gpt2_checkpoint), "--output_dir", str(tmp_path / "o"))
    assert "is a 'gpt2' checkpoint (GPT2Config), not Image GPT" in message


def test_flags_without_effect_are_refused(tiny_checkpoint, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    for flag in ("--config_name", "--model_name_or_path"):
        message = refusal("pretrain.py", flag, str(tiny_checkpoint), "--model_size", "small", *out)
        assert f"--model_size small is a preset for a new model; {flag} brings its own config" in message
        message = refusal("pretrain.py", flag, str(tiny_checkpoint), "--n_px", "8", *out)  # 8x8 on 16 positions
        assert "--n_px 8 differs from the config's n_px 4" in message and "n_positions=16" in message
    message = refusal("pretrain.py", *TINY_MODEL, "--mask_prob", "0.3", *out)
    assert "--mask_prob 0.3 masks pixels for the BERT objective, but this run's objective is 'ar'" in message
    message = refusal("pretrain.py", *TINY_MODEL, "--class_dropout", "0.3", *out)
    assert "--class_dropout 0.3 drops the class of --class_conditional runs: drop it" in message
    message = refusal("finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--mask_prob", "0.3", *out)
    assert "--mask_prob 0.3 masks pixels for a BERT model's generative loss, but this run is an AR model" in message
    bert = tmp_path / "bert"
    ImageGPTConfig.from_pretrained(tiny_checkpoint, objective="bert", prepend_sos=False).save_pretrained(bert)
    shutil.copy(tiny_checkpoint / "preprocessor_config.json", bert)
    message = refusal("finetune.py", "--model_name_or_path", str(bert), "--mask_prob", "0.3", "--gen_loss_weight", "0", *out)  # fmt: skip
    assert "but this run is trained with --gen_loss_weight 0: it has no effect" in message
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tiny_checkpoint, tmp_path):
    """A folder the user made is refused before any work, unchanged; the model folder is never written into while
    it is read, whatever --overwrite says."""
    user = tmp_path / "user_model"
    user.mkdir()
    files = {"README.md": "my notes", "config.json": "{}", "model-00001-of-00002.safetensors": "shard"}
    for name, text in files.items():
        (user / name).write_text(text)
    message = refusal("pretrain.py", *TINY_MODEL, "--output_dir", str(user))
    assert f"--output_dir {user} exists and is not empty" in message and "--overwrite" in message
    assert {p.name: p.read_text() for p in user.iterdir()} == files
    for overwrite in ([], ["--overwrite"]):
        message = refusal("finetune.py", "--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(tiny_checkpoint), *overwrite)  # fmt: skip
        assert f"--output_dir {tiny_checkpoint} is the input {tiny_checkpoint}" in message
    message = refusal("demo.py", "--output_dir", str(user))
    assert f"--output_dir {user} exists and is not empty" in message
    # Checkpoints of an earlier run are content too: resumed with --resume_from_checkpoint, or replaced with
    # --overwrite.
    (tmp_path / "run" / "checkpoints" / "checkpoint_3").mkdir(parents=True)
    message = refusal("pretrain.py", *TINY_MODEL, "--output_dir", str(tmp_path / "run"))
    assert "holds checkpoints). Choose another path, or pass --overwrite" in message


def test_demo_argument_errors(tmp_path):
    message = refusal("demo.py", "--num_processes", "0", "--output_dir", str(tmp_path / "a"))
    assert "--num_processes must be at least 1 and divide the batch of 64 images, got 0" in message
    # The sampling stage's --upscale_model, refused before pretraining.
    message = refusal("demo.py", "--upscale_model", "0", "--output_dir", str(tmp_path / "b"))
    assert "--upscale_model as a factor must be at least 1, got 0" in message
    missing = str(tmp_path / "no_such_model")
    message = refusal("demo.py", "--upscale_model", missing, "--output_dir", str(tmp_path / "c"))
    assert f"--upscale_model {missing!r} is neither an integer factor" in message
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    """One writer per output folder: while a run holds the folder's lock, another run there stops at its start."""
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / ".lock", timeout=0):  # a run in progress
        message = refusal("pretrain.py", *TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "1", "--output_dir", str(out))  # fmt: skip
    assert f"Another run is writing to --output_dir {out}" in message and "wait for it to end" in message
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, nothing of the other run's touched


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: damaged ones, and resumes that differ from the run that wrote them
# ---------------------------------------------------------------------------------------------------------------------


def test_checkpoints_that_cannot_be_resumed_as_they_were_are_refused_naming_why(resumable, tmp_path):
    data, checkpoints = resumable
    run = [*RESUMABLE, "--train_dir", str(data)]

    def resume(name: str, damage) -> tuple[Path, str]:
        out = tmp_path / name
        shutil.copytree(checkpoints, out / "checkpoints")
        damage(out / "checkpoints" / "checkpoint_1")
        message = refusal("pretrain.py", *run, "--output_dir", str(out), "--resume_from_checkpoint", "latest")
        return out / "checkpoints" / "checkpoint_1", message

    # Without its random states a resume would go on with other dropout; without its weights accelerate would name
    # a pytorch_model.bin.
    for file in ("random_states_0.pkl", "model.safetensors"):
        newest, message = resume(file, lambda checkpoint, file=file: (checkpoint / file).unlink())
        assert f"Cannot resume from {newest}: its {file} is missing" in message
    newest, message = resume("damaged", lambda checkpoint: (checkpoint / "optimizer.bin").write_bytes(b"damaged"))
    assert f"Cannot resume from the checkpoint {newest}: loading it failed" in message
    # The folder of the checkpoints: those it holds, and how to name one.
    out = ["--output_dir", str(tmp_path / "new")]
    message = refusal("pretrain.py", *run, *out, "--resume_from_checkpoint", str(checkpoints))
    held = [str(checkpoints / "checkpoint_0"), str(checkpoints / "checkpoint_1")]
    assert f"it holds {held}: name one, e.g. --resume_from_checkpoint {held[1]}" in message
    # A checkpoint of the other script.
    finetune = ["--model_name_or_path", str(checkpoints.parent), "--train_dir", str(data), "--train_val_split", "0.25"]
    message = refusal("finetune.py", *finetune, *out, "--resume_from_checkpoint", held[1])
    assert f"{held[1]} is a checkpoint of pretrain.py: resume it with that script" in message


def test_the_checkpoint_resumed_is_an_input_no_output_dir_may_replace(resumable, tmp_path):
    """--output_dir at the checkpoint, or at the folder holding it, is refused whatever --overwrite says."""
    data, checkpoints = resumable
    shutil.copytree(checkpoints, tmp_path / "run" / "checkpoints")
    before, checkpoint = snapshot(tmp_path / "run"), tmp_path / "run" / "checkpoints" / "checkpoint_0"
    for output_dir in (checkpoint, checkpoint.parent):
        resume = ["--output_dir", str(output_dir), "--overwrite", "--resume_from_checkpoint", str(checkpoint)]
        message = refusal("pretrain.py", *RESUMABLE, "--train_dir", str(data), *resume)
        assert f"--output_dir {output_dir}" in message and f"the input {checkpoint}" in message
    assert snapshot(tmp_path / "run") == before


def test_a_diverged_run_stops_at_once_and_writes_no_model(tmp_path):
    out = tmp_path / "out"
    run = [*TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "4", "--checkpointing_steps", "1"]
    with pytest.raises(FloatingPointError, match=r"Training diverged: the loss is nan at step 2 \(--learning_rate 1e\+30\)"):  # fmt: skip
        run_in_process("pretrain.py", *run, "--learning_rate", "1e30", "--output_dir", str(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0"]  # step 1's, kept
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_resume_at_an_epoch_end_and_other_evaluation_steps_end_with_the_same_weights(script, tiny_checkpoint, tmp_path):  # fmt: skip
    """3 epochs of 4 batches, dropout on (the config's 0.1), evaluation every epoch: a resume from the first epoch's
    checkpoint (its input folders spelled otherwise), and a run that evaluates at every step, end with the
    uninterrupted run's weights, bit for bit."""
    data = ["--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "8"]
    data += ["--num_train_epochs", "3", "--checkpointing_steps", "epoch"]
    model = {"pretrain.py": TINY_MODEL, "finetune.py": ["--model_name_or_path", str(tiny_checkpoint)]}[script]
    for name, extra in (("whole", []), ("eval_steps", ["--eval_steps", "1"])):
        run_in_process(script, *model, *data, *extra, "--output_dir", str(tmp_path / name))
    first = tmp_path / "whole" / "checkpoints" / "checkpoint_0"
    shutil.copytree(first, tmp_path / "resumed" / "checkpoints" / "checkpoint_0")
    if script == "finetune.py":  # the same folder, spelled another way
        model = ["--model_name_or_path", os.path.relpath(tiny_checkpoint) + "/"]
    resume = ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"]
    run_in_process(script, *model, *data, *resume)
    assert any(not torch.equal(weights(first)[k], v) for k, v in weights(tmp_path / "whole").items())  # it trained on
    whole = weights(tmp_path / "whole")
    for name in ("eval_steps", "resumed"):
        other = weights(tmp_path / name)
        assert all(torch.equal(whole[key], other[key]) for key in whole), name


@pytest.mark.parametrize(
    "changes, differences",
    [
        (["--learning_rate", "0.5"], ["--learning_rate: 0.001 then, 0.5 now"]),
        (["--per_device_train_batch_size", "4"], ["--per_device_train_batch_size: 8 then, 4 now"]),
        (["--num_warmup_steps", "1"], ["--num_warmup_steps: 0 then, 1 now"]),
        (["--objective", "bert"], ["config.objective: 'ar' then, 'bert' now", "--mask_prob: None then, 0.15 now"]),
        (["--config_overrides", "n_layer=3,n_embd=32,n_head=2"], ["config.n_layer: 2 then, 3 now"]),
        (["--n_px", "3"], ["config.n_positions: 16 then, 9 now"]),
    ],
)
def test_resume_refuses_another_run_naming_each_difference(resumable, tmp_path, changes, differences):
    message = resume_refusal(resumable, tmp_path, *changes)
    assert all(difference in message for difference in differences)


def test_resume_refuses_other_training_images(resumable, tmp_path):
    data, _ = resumable
    other = image_folder(tmp_path / "other", offset=100)
    message = resume_refusal(resumable, tmp_path / "a", train_dir=other)
    assert f"--train_dir: {os.path.realpath(data)!r} then, {os.path.realpath(other)!r} now" in message
    assert "training data (fingerprint of its bytes)" in message
    # The same folder with its images replaced in place, under the same names.
    saved = {path: path.read_bytes() for path in data.rglob("*.png")}
    try:
        image_folder(data, offset=200)
        message = resume_refusal(resumable, tmp_path / "b")
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
    assert "training data (fingerprint of its bytes)" in message and "--train_dir" not in message


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_names_the_file_and_the_free_space(tmp_path):
    """The optimizer state does not fit (a file-size limit stands in for a full disk: the same failed write inside
    torch's writer): the error names the file and the space left, and no partial checkpoint stays behind."""
    model = ImageGPTForCausalImageModeling(ImageGPTConfig.from_preset("tiny", n_px=4, palette_size=16, n_layer=2, n_embd=32, n_head=2))  # fmt: skip
    limit = int(model.num_parameters() * 4 * 1.5)  # the weights fit; the optimizer's two moments do not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    run = [*TINY_MODEL, *SMALL_DATA, *TRAIN, "--max_train_steps", "2", "--checkpointing_steps", "2"]
    log = run_script("pretrain.py", *run, "--output_dir", str(out), check=False, preexec_fn=limit_file_size)
    assert f"Saving the checkpoint {out / 'checkpoints' / 'checkpoint_0'} failed while writing optimizer.bin" in log
    assert "MiB free on that disk" in log and "--resume_from_checkpoint latest" in log
    assert not list(out.rglob("checkpoint_0")) and not (out / "model.safetensors").exists()  # no partial checkpoint


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
    assert config.vocab_size == 16 + 1
    assert isinstance(AutoModel.from_pretrained(out), ImageGPTModel)
    processor = AutoImageProcessor.from_pretrained(out)
    assert isinstance(processor, ImageGPTImageProcessor) and len(processor.clusters) == 16
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
    results = json.loads((out / "all_results.json").read_text())
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
    assert math.isfinite(json.loads((out / "all_results.json").read_text())["eval_bpd"])


@pytest.mark.slow
def test_finetune_on_the_joint_loss_learns_the_digits(ar_checkpoint, tmp_path):
    from transformers import AutoModelForImageClassification

    from image_gpt_hf import ImageGPTForImageClassification

    pretrained, _ = ar_checkpoint
    log = run_script(
        "finetune.py", "--model_name_or_path", str(pretrained), "--gen_loss_weight", "0.5", *LEARN,
        "--max_train_steps", "120", "--output_dir", str(tmp_path),
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
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["eval_accuracy"] > 0.2 and results["eval_loss"] < math.log(10)
    assert math.isclose(classifier_accuracy(tmp_path, 128), results["eval_accuracy"], abs_tol=1e-6)


@pytest.mark.slow
def test_finetune_lora_writes_a_small_adapter_that_loads_on_the_base_and_merges(ar_checkpoint, tmp_path):
    """--lora_r 8 --merge_lora: the adapter loads with peft on the base checkpoint and computes what the merged model
    computes (to 1e-5: the merge adds B @ A to each weight, a float32 rounding apart); the accuracy reported is the
    merged model's; a resume with other LoRA settings, or on a base replaced in place, is refused."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForImageClassification

    pretrained = shutil.copytree(ar_checkpoint[0], tmp_path / "base", ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "lora"
    run = ["--model_name_or_path", str(pretrained), *SMALL_DATA, *TRAIN, "--max_train_steps", "4"]
    run += ["--checkpointing_steps", "4", "--lora_r", "8"]
    log = run_script("finetune.py", *run, "--merge_lora", "--output_dir", str(out))
    shares = re.search(r"LoRA r=8: ([0-9,]+) of ([0-9,]+) parameters train", log).groups()
    trainable, total = (int(count.replace(",", "")) for count in shares)
    assert 0 < trainable < total / 2
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base = AutoModelForImageClassification.from_pretrained(pretrained, config=AutoConfig.from_pretrained(out))
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForImageClassification.from_pretrained(out / "merged").eval()
    ids = ImageGPTImageProcessor.from_pretrained(out)(eval_images(32), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
    # The adapter trained the decoder (LoRA's B starts at zero) and the new classifier.
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(weights(pretrained)[key], weights(out / "merged")[key])
    results = json.loads((out / "all_results.json").read_text())
    assert math.isclose(classifier_accuracy(out / "merged", 32), results["eval_accuracy"], abs_tol=1e-6)
    # At width 32 a rank of 8 is a quarter of the width, so the adapter is a third of the model (iGPT-S: 2%).
    assert (out / "adapter_model.safetensors").stat().st_size < 0.4 * (out / "merged" / "model.safetensors").stat().st_size  # fmt: skip
    assert "LoRA adapter (r=8, alpha 16" in (out / "README.md").read_text()
    assert "`PeftModel.from_pretrained(base, this_folder)`" in (out / "README.md").read_text()  # how to load it

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints", resumed / "checkpoints")
    resume = ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
    message = refusal("finetune.py", *run[:-1], "4", *resume)
    assert "--lora_r: 8 then, 4 now" in message and "--lora_alpha: 16.0 then, 8.0 now" in message
    # The base replaced in place (same config and palette, other weights): the adapter would not be the one evaluated.
    ImageGPTForCausalImageModeling(ImageGPTConfig.from_pretrained(pretrained)).save_pretrained(pretrained)
    reordered = ["--lora_target_modules", "mlp.c_proj", "mlp.c_fc", "attn.c_proj", "attn.c_attn"]  # the same ones
    message = refusal("finetune.py", *run, *reordered, *resume)
    assert "base weights (fingerprint)" in message and "--lora" not in message


@pytest.mark.slow
def test_finetune_bert_draws_masks_for_its_generative_loss(bert_checkpoint, tmp_path):
    pretrained, _ = bert_checkpoint
    losses = []
    for mask_prob in ("0.15", "0.5"):  # the same run but its masks: the generative loss sees other pixels
        out = tmp_path / mask_prob
        log = run_script(
            "finetune.py", "--model_name_or_path", str(pretrained), "--gen_loss_weight", "1", *SMALL_DATA, *TRAIN,
            "--max_train_steps", "1", "--mask_prob", mask_prob, "--output_dir", str(out),
        )  # fmt: skip
        losses.append(float(re.search(r"step 1: train_loss ([0-9.]+)", log).group(1)))
        config = json.loads((out / "config.json").read_text())
        assert config["objective"] == "bert" and config["gen_loss_weight"] == 1
    assert losses[0] != losses[1], losses  # without masks both runs would compute the same loss


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
    # Upscaled by default with nearest-neighbour pixels, 128 pixels a side (4x4 digits, 32 times), beside the
    # originals.
    assert "--upscale_model 32" in log
    for name in ("samples", "completions"):
        with (
            PIL.Image.open(out / "samples" / f"{name}.png") as plain,
            PIL.Image.open(out / "samples" / f"{name}_upscaled.png") as large,
        ):
            assert large.width > plain.width
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
    results = json.loads((finetuned / "all_results.json").read_text())
    assert math.isclose(classifier_accuracy(finetuned, 31), results["eval_accuracy"], abs_tol=1e-6)

    # A LoRA adapter under DistributedDataParallel: the model card counts its parameters, the adapter is saved.
    adapter = tmp_path / "adapter"
    launch(
        "multi_cpu.yaml", "finetune.py", "--model_name_or_path", str(pretrained), *small_data, *TRAIN,
        "--max_train_steps", "1", "--lora_r", "2", "--output_dir", str(adapter),
    )  # fmt: skip
    assert (adapter / "adapter_model.safetensors").is_file() and "LoRA adapter (r=2" in (adapter / "README.md").read_text()  # fmt: skip


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

    command = [sys.executable, str(EXAMPLES / "pretrain.py"), *run, "--output_dir", str(interrupted)]
    complete = kill_at_first_checkpoint(command, interrupted, 240, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    assert complete and 4 * (max(complete) + 1) < 24  # a checkpoint every 4 steps

    log = run_script("pretrain.py", *run, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest")
    newest = interrupted / "checkpoints" / f"checkpoint_{max(complete)}"
    assert f"Resumed from checkpoint {newest} at step {4 * (max(complete) + 1)}" in log
    expected, resumed = weights(reference), weights(interrupted)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    reference_results = json.loads((reference / "all_results.json").read_text())
    assert json.loads((interrupted / "all_results.json").read_text()) == pytest.approx(reference_results, abs=1e-6)


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
    kill_at_first_checkpoint(command, sharded, 300, env=env)
    assert list((sharded / "checkpoints" / "checkpoint_0").glob("pytorch_model_fsdp_0/*.distcp"))  # sharded  # fmt: skip

    resume = ["--output_dir", str(sharded), "--resume_from_checkpoint", "latest"]
    log = launch("fsdp.yaml", "pretrain.py", *run, *resume, env=env, num_processes=gpus)
    assert "Resumed from checkpoint" in log and "DistributedType.FSDP" in log
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
