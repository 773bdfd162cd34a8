"""A training run of pretrain.py and finetune.py, apart from its data, model and loop: the checked values of its flags,
its Accelerator, its one writer per output folder, its checkpoints (written, found, checked, loaded) and the run
contract a resume must match.

    from training_run import find_checkpoint, save_checkpoint, ...   # as the scripts import it, from examples/

Both training scripts import it (`python examples/<script>.py` and `accelerate launch` put examples/ on the path); to
adapt a script, copy it with this file. A checkpoint is `<output_dir>/checkpoints/step_N/`: Accelerate's `save_state`,
the processor, and `training_state.json`, which holds the position (completed steps, epoch, batches of that epoch seen)
and the run contract: everything that defines the run (model config, optimizer and schedule flags, data source and a
fingerprint of the training data's bytes, palette, seed, batch and process counts). A resume that differs in any of it
is refused before training, each difference named.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from filelock import FileLock, Timeout
from safetensors import safe_open

from image_gpt_hf.safe_io import staged_dir, staging_path

logger = get_logger(__name__)
CHECKPOINTS, STATE_FILE, LOCK_FILE = "checkpoints", "training_state.json", ".lock"
POSITION = ("completed_steps", "epoch", "batches_in_epoch")


# The flags' values: argparse types, and the checks argparse cannot make.


def checked(kind, rule, description):
    """An argparse type: a `kind` value that satisfies `rule`, else the error "must be <description>"."""

    def parse(text: str):
        if not rule(value := kind(text)):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    return parse


POSITIVE, NON_NEGATIVE = checked(int, lambda v: v >= 1, "at least 1"), checked(int, lambda v: v >= 0, ">= 0")
FRACTION, BELOW_ONE = (
    checked(float, lambda v: 0 < v < 1, "in (0, 1)"),
    checked(float, lambda v: 0 <= v < 1, "in [0, 1)"),
)
SCALE, NON_NEGATIVE_FLOAT = checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), checked(float, lambda v: v >= 0, ">= 0")
POSITIVE_FLOAT = checked(float, lambda v: v > 0, "> 0")


def check_training_flags(args: argparse.Namespace) -> None:
    """The errors in the flags both scripts share that argparse cannot see, raised before anything is loaded."""
    if args.random_crop_scale[0] > args.random_crop_scale[1]:
        raise ValueError(f"--random_crop_scale must satisfy MIN <= MAX, got {args.random_crop_scale}.")
    if args.validation_dir is not None and args.train_dir is None:
        raise ValueError("--validation_dir needs a --train_dir to go with it.")
    for name in ("train_dir", "validation_dir"):
        if getattr(args, name) is not None and not os.path.isdir(getattr(args, name)):
            raise ValueError(f"--{name} {getattr(args, name)!r} is not a folder of images.")
    if args.max_train_steps is not None and args.num_warmup_steps > args.max_train_steps:
        raise ValueError(
            f"--num_warmup_steps {args.num_warmup_steps} is more than --max_train_steps {args.max_train_steps}: the "
            "learning rate would never reach --learning_rate."
        )
    if (every := args.checkpointing_steps) not in (None, "epoch"):
        if not re.fullmatch(r"[0-9]+", every) or int(every) < 1:
            raise ValueError(
                f"--checkpointing_steps must be a positive whole number of steps or 'epoch', got {every!r}."
            )
        if args.max_train_steps is not None and int(every) > args.max_train_steps:
            raise ValueError(
                f"--checkpointing_steps {every} is more than --max_train_steps {args.max_train_steps}: no checkpoint "
                "would ever be written. Pass a smaller number, or 'epoch'."
            )


# The run's Accelerator.


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator of a run under `accelerate launch` or plain python: seeded samplers (the same data order on every
    process and after a resume), CPU processes joined into one run, an FSDP launch refused where it cannot shard; with
    transformers' example logging."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.accelerator.is_available():
        raise ValueError(
            "This run was launched with an FSDP config, but this machine has no GPU: Accelerate shards a model only "
            "on GPU-type devices, and on CPUs it would quietly run plain data parallel instead. On CPUs, launch with "
            "examples/accelerate_configs/multi_cpu.yaml; run the FSDP config on a machine with GPUs."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # Seeded samplers: the same data order on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Without GPUs, processes of `accelerate launch` join one run (gloo) only when told to use the CPU.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available(),
        **({"log_with": args.report_to, "project_dir": args.output_dir} if args.with_tracking else {}),
    )
    logger.info(accelerator.state, main_process_only=False)
    verbosity = "warning" if accelerator.is_local_main_process else "error"
    datasets.utils.logging.set_verbosity(datasets.utils.logging.log_levels[verbosity])
    transformers.utils.logging.set_verbosity(transformers.utils.logging.log_levels[verbosity])
    return accelerator


# One writer per output folder.


def lock_output_dir(accelerator: Accelerator, args: argparse.Namespace, checkpoint: str | None, tracker_dir: str):
    """Takes the lock inside --output_dir, to be held to the end (the caller keeps what this returns): a second run on
    the folder is refused here, before work. With --overwrite and no resume, an earlier run's checkpoints and tracker
    logs go now, so that they never mix with this run's."""
    lock = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        lock = FileLock(os.path.join(args.output_dir, LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ValueError(
                f"Another run is writing to --output_dir {args.output_dir} (it holds {lock.lock_file}); wait for it "
                "to end, or choose another folder."
            ) from None
        for path in [Path(args.output_dir, CHECKPOINTS), Path(args.output_dir, tracker_dir)]:
            if args.overwrite and not checkpoint and path.is_dir():
                logger.warning(f"--overwrite: deleting {path} of an earlier run")
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return lock


# Checkpoints: found and checked before anything is loaded, written staged, loaded with their position.


def checkpoint_problem(path: str) -> str | None:
    """What is broken in a checkpoint (read cheaply: its state file, safetensors headers, zip directories), or None."""
    try:
        state = json.loads(Path(path, STATE_FILE).read_text())
        [int(state[key]) for key in POSITION] and dict(state["run"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {STATE_FILE} is unreadable ({type(err).__name__}: {err})"
    for file in (Path(folder, name) for folder, _, names in os.walk(path) for name in names):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix in (".bin", ".pkl", ".pt", ".pth"):  # torch.save's zip archives
                zipfile.ZipFile(file).close()
        except Exception as err:  # safetensors raises its own error type
            return f"{file} is damaged ({type(err).__name__}: {err})"
    return None


def find_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint --resume_from_checkpoint names (a folder, or 'latest': the newest complete one, or None when
    there is none yet), refused when broken, with the newest intact one before it named."""
    root = Path(args.output_dir, CHECKPOINTS)
    names = [n for n in (os.listdir(root) if root.is_dir() else []) if re.fullmatch(r"step_[0-9]+", n)]
    complete = [str(root / n) for n in sorted(names, key=lambda n: int(n[5:])) if (root / n / STATE_FILE).is_file()]
    path = args.resume_from_checkpoint
    if path == "latest" and not complete:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet; starting anew")
        return None
    path = complete[-1] if path == "latest" else path
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {STATE_FILE}); complete ones are "
            f"{complete or 'none'}."
        )
    if (problem := checkpoint_problem(path)) is not None:
        earlier = [p for p in complete if os.path.abspath(p) != os.path.abspath(path)]
        intact = next((p for p in reversed(earlier) if checkpoint_problem(p) is None), None)
        offer = (
            f"The newest intact checkpoint before it is {intact}: resume from it with --resume_from_checkpoint "
            f"{intact}, and delete {path} so that 'latest' skips it."
            if intact
            else "No intact checkpoint precedes it: delete it to start anew."
        )
        raise ValueError(f"Cannot resume from the checkpoint {path}: {problem}. {offer}")
    return path


def save_checkpoint(accelerator, args, processor, contract: dict, completed_steps: int, epoch: int, seen: int) -> None:
    """`save_state` + the processor + the state file (position and run contract) into checkpoints/step_N, staged
    and renamed into place when complete; then later steps (from before a resume) and those over
    --checkpoints_total_limit go. A full disk is reported with the file being written and the space left."""
    final = Path(args.output_dir, CHECKPOINTS, f"step_{completed_steps}")
    staging = [str(staging_path(final)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(staging)  # every process writes its part of the state into the same folder
    writing = staged_dir(final, overwrite=True, staging=staging[0])
    with writing if accelerator.is_main_process else contextlib.nullcontext(Path(staging[0])) as tmp:
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                processor.save_pretrained(tmp)
                state = dict(zip(POSITION, (completed_steps, epoch, seen)))
                (tmp / STATE_FILE).write_text(json.dumps({**state, "run": contract}, indent=2))
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its writer
            files = [p for p in tmp.rglob("*") if p.is_file()]
            newest = max(files, key=lambda p: p.stat().st_mtime_ns).name if files else "its first file"
            raise OSError(
                f"Saving the checkpoint {final} failed while writing {newest}, with "
                f"{shutil.disk_usage(tmp).free / 2**20:.1f} MiB free on that disk ({type(err).__name__}: {err}). "
                "Free some space, or choose an --output_dir on a disk with room, and resume with "
                "--resume_from_checkpoint latest."
            ) from err
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        steps = sorted(int(n[5:]) for n in os.listdir(final.parent) if re.fullmatch(r"step_[0-9]+", n))
        stale = [s for s in steps if s > completed_steps]
        if args.checkpoints_total_limit is not None:
            stale += [s for s in steps if s <= completed_steps][: -args.checkpoints_total_limit]
        for step in stale:
            shutil.rmtree(final.parent / f"step_{step}")
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}")


def load_checkpoint(accelerator: Accelerator, checkpoint: str | None, batches_per_epoch: int) -> tuple[int, int, int]:
    """`load_state` of the checkpoint; returns where training goes on: (completed steps, epoch, batches of that epoch
    already seen, to skip), (0, 0, 0) without a checkpoint."""
    if checkpoint is None:
        return 0, 0, 0
    try:
        accelerator.load_state(checkpoint)
    except Exception as err:  # whatever a damaged or foreign checkpoint raises inside Accelerate or torch
        raise ValueError(
            f"Cannot resume from the checkpoint {checkpoint}: loading it failed ({type(err).__name__}: {err})."
        ) from err
    state = json.loads(Path(checkpoint, STATE_FILE).read_text())
    completed_steps, epoch, seen = (state[k] for k in POSITION)
    if seen >= batches_per_epoch:  # saved at the end of an epoch
        epoch, seen = epoch + 1, 0
    logger.info(f"Resumed from checkpoint {checkpoint} at step {completed_steps}")
    return completed_steps, epoch, seen


# The run contract: what defines a run, recorded in every checkpoint; a resume must match it.

# The flags of both scripts that define a run (a script adds its own).
RUN_FLAGS = ["model_name_or_path", "learning_rate", "weight_decay", "adam_beta2", "max_grad_norm", "lr_scheduler_type"]
RUN_FLAGS += ["num_warmup_steps", "max_train_steps", "num_train_epochs", "per_device_train_batch_size", "seed"]
RUN_FLAGS += ["gradient_accumulation_steps", "dataset_name", "dataset_config_name", "train_dir", "train_val_split"]
RUN_FLAGS += ["max_train_samples", "random_crop_scale", "no_random_crop"]


def run_contract(accelerator, config, processor, args, flags: list[str], columns: dict[str, str]) -> dict:
    """The model config, the values of `flags`, the data's `columns` (flag -> column), the precision, the process
    count and a digest of the palette."""
    skip = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")
    contract = {f"config.{k}": v for k, v in config.to_dict().items() if k not in skip}
    contract |= {f"--{name}": getattr(args, name) for name in flags} | columns
    contract |= {"mixed precision": accelerator.mixed_precision, "processes": accelerator.num_processes}
    contract["palette"] = hashlib.sha256(np.asarray(processor.clusters, np.float32).tobytes()).hexdigest()[:16]
    return contract


def fingerprint(accelerator: Accelerator, split: datasets.Dataset, columns: list[str]) -> str:
    """A digest of the training examples, read once on the main process: every image's bytes (read from its file when
    not embedded; the image column is `columns[0]`) and the other `columns`, in order."""
    found = [None]
    if accelerator.is_main_process:
        digest = hashlib.sha256()
        split = split.select_columns(columns).cast_column(columns[0], datasets.Image(decode=False))
        for batch in split.iter(batch_size=256):
            for image in batch[columns[0]]:
                digest.update(hashlib.sha256(image["bytes"] or Path(image["path"]).read_bytes()).digest())
            digest.update(json.dumps([batch[column] for column in columns[1:]], default=str).encode())
        found[0] = digest.hexdigest()[:16]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    return found[0]


def check_contract(contract: dict, checkpoint: str | None) -> dict:
    """The contract as JSON stores it; when resuming, refused if it differs from the checkpoint's, each difference
    named with what to do."""
    contract = json.loads(json.dumps(contract, default=str))
    if checkpoint is not None:
        then = json.loads(Path(checkpoint, STATE_FILE).read_text())["run"]
        keys = sorted(then.keys() | contract.keys())
        differ = [k for k in keys if then.get(k) != contract.get(k)]
        if changed := "; ".join(f"{k}: {then.get(k)!r} then, {contract.get(k)!r} now" for k in differ):
            raise ValueError(
                f"Cannot resume from {checkpoint}: this run differs from the one that wrote it in {changed}. "
                "To continue that run, pass its settings again. To train with the new ones, start a new run: another "
                "--output_dir, or --overwrite without --resume_from_checkpoint (which deletes its checkpoints)."
            )
    return contract
