"""What pretrain.py and finetune.py share (copy it with the script you adapt): the Accelerator, with accelerate's own
numbered checkpoints (`output_dir/checkpoints/checkpoint_N`, `save_state` / `load_state`) that carry a `Run` (position,
run contract, palette); the checkpoint to resume, refused unless it matches this run; one writer per output folder."""

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import datasets
import PIL.Image
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list
from filelock import FileLock, Timeout

from image_gpt_hf import load_digits
from image_gpt_hf.safe_io import check_output_path

DIGITS = "sklearn-digits"  # scikit-learn's 1,797 8x8 handwritten digits (image_gpt_hf.load_digits): no download
STATE, LOCK = "custom_checkpoint_0.pkl", ".lock"  # STATE: the Run, the last file that `save_state` writes
RUN_FLAGS = ["model_name_or_path", "learning_rate", "weight_decay", "adam_beta2", "max_grad_norm", "lr_scheduler_type"]
RUN_FLAGS += ["num_warmup_steps", "max_train_steps", "num_train_epochs", "per_device_train_batch_size", "seed"]
RUN_FLAGS += ["gradient_accumulation_steps", "dataset_name", "dataset_config_name", "train_dir", "train_val_split"]
RUN_FLAGS += ["max_train_samples", "random_crop_scale", "no_random_crop"]


class Run(dict):
    """Registered for checkpointing: completed_steps, epoch, seen (batches of that epoch), contract, palette."""

    state_dict, load_state_dict = dict.copy, dict.update


def training_parser(description: str, learning_rate: float, epochs: int) -> argparse.ArgumentParser:
    """The flags both scripts take: data, output, optimization, checkpoints, tracking."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--dataset_name", default=DIGITS, help=f"A `datasets` image dataset, or {DIGITS!r}.")
    add("--dataset_config_name", default=None)
    add("--train_dir", default=None, help="An imagefolder of training images (finetune.py: a subfolder per class).")
    add("--validation_dir", default=None, help="An imagefolder of evaluation images.")
    add("--image_column_name", default=None, help="Default: the first column of `Image` type.")
    add("--train_val_split", type=float, default=0.15, help="Held out when there is no evaluation split.")
    add("--max_train_samples", type=int, default=None)
    add("--max_eval_samples", type=int, default=None)
    add("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    add("--dataloader_num_workers", type=int, default=0)
    add("--random_crop_scale", type=float, nargs=2, default=(0.5, 1.0), metavar=("MIN", "MAX"))
    add("--no_random_crop", action="store_true", help="Train on whole images.")
    add("--output_dir", required=True)
    add("--overwrite", action="store_true", help="Replace what is in --output_dir.")
    add("--seed", type=int, default=42, help="Seeds the init, data order, crops and masks.")
    add("--per_device_train_batch_size", type=int, default=64)
    add("--per_device_eval_batch_size", type=int, default=128)
    add("--learning_rate", type=float, default=learning_rate)
    add("--weight_decay", type=float, default=0.0)
    add("--adam_beta2", type=float, default=0.95)
    add("--max_grad_norm", type=float, default=1.0)
    add("--num_train_epochs", type=int, default=epochs)
    add("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    add("--gradient_accumulation_steps", type=int, default=1)
    schedules = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
    add("--lr_scheduler_type", type=transformers.SchedulerType, default="cosine", choices=schedules)
    add("--num_warmup_steps", type=int, default=0)
    add("--logging_steps", type=int, default=10)
    add("--eval_steps", type=int, default=None, help="Default: every epoch (may change on a resume).")
    add("--checkpointing_steps", default=None, help="Save a checkpoint every n steps, or 'epoch'.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep the newest n.")
    add("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    add("--gradient_checkpointing", action="store_true")
    add("--with_tracking", action="store_true")
    add("--report_to", default="all")
    return parser


def load_data(args, accelerator):
    """The "train" and "validation" splits (a held-out share of train where the dataset has neither validation nor
    test), limited by --max_*_samples; the name of the evaluation split; the image column; `decode(batch)`, the
    batch's images, an unreadable file named."""
    digits, source = args.dataset_name == DIGITS and args.train_dir is None, args.train_dir or args.dataset_name
    with accelerator.main_process_first():
        if args.train_dir is not None:
            files = {"train": args.train_dir, "validation": args.validation_dir}
            files = {split: os.path.join(folder, "**") for split, folder in files.items() if folder}
            dataset = datasets.load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)
        else:
            name, config_name = args.dataset_name, args.dataset_config_name
            dataset = load_digits() if digits else datasets.load_dataset(name, config_name, cache_dir=args.cache_dir)
    if "train" not in dataset:
        raise ValueError(f"The dataset {source} has no 'train' split; its splits are {list(dataset)}.")
    eval_split = "validation" if "validation" in dataset else "test"
    if eval_split not in dataset:
        if args.train_val_split == 0:
            raise ValueError(f"The dataset {source} has no evaluation split; pass --train_val_split > 0.")
        dataset = dataset["train"].train_test_split(args.train_val_split, seed=args.seed)
        eval_split = f"{args.train_val_split:.0%} of train held out"
    held_out = dataset["validation" if "validation" in dataset else "test"]
    dataset = datasets.DatasetDict({"train": dataset["train"], "validation": held_out})
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=args.seed).select(range(min(limit, len(dataset[split]))))
    logging.getLogger(__name__).info(
        f"Dataset {source}: {len(dataset['train'])} training, {len(dataset['validation'])} {eval_split} images"
    )
    features = dataset["train"].features
    if args.image_column_name not in (None, *features):
        raise ValueError(
            f"--image_column_name {args.image_column_name!r} is not a column; the columns: {list(features)}."
        )
    images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    if not (image_column := args.image_column_name or next(iter(images), None)):
        raise ValueError(f"The dataset has no `Image` column among {list(features)}; pass --image_column_name.")

    def decode(batch: dict) -> list[PIL.Image.Image]:
        images = []
        for value in batch[image_column]:
            try:
                images.append(datasets.Image().decode_example(value))
            except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
                raise ValueError(
                    f"Cannot read the image {value.get('path') or ''}: {err}. Remove or replace that file."
                ) from err
        return images

    return dataset, eval_split, image_column, decode


def make_accelerator(args) -> Accelerator:
    """Seeded samplers (one data order on every process and after a resume), CPU processes joined into one run (gloo),
    numbered checkpoints in --output_dir; an FSDP launch refused where it cannot shard."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.accelerator.is_available():
        raise ValueError(
            "This run was launched with an FSDP config, but this machine has no GPU: Accelerate shards only on GPUs, "
            "on CPUs it would quietly run plain data parallel. On CPUs, launch with accelerate_configs/multi_cpu.yaml."
        )
    every, steps = args.checkpointing_steps, args.max_train_steps
    if every not in (None, "epoch") and (not every.isdecimal() or int(every) < 1 or steps and int(every) > steps):
        raise ValueError(
            f"--checkpointing_steps must be 'epoch' or a number of steps <= --max_train_steps, got {every}."
        )
    if steps and args.num_warmup_steps > steps:
        raise ValueError(f"--num_warmup_steps {args.num_warmup_steps} > --max_train_steps: the peak would never come.")
    if args.validation_dir and not args.train_dir:
        raise ValueError("--validation_dir needs a --train_dir to go with it.")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available(),
        project_config=ProjectConfiguration(args.output_dir, None, True, args.checkpoints_total_limit),
        log_with=args.report_to if args.with_tracking else None,
    )
    get_logger(__name__).info(accelerator.state, main_process_only=False)
    for library in (datasets, transformers):
        library.utils.logging.set_verbosity(logging.WARNING if accelerator.is_local_main_process else logging.ERROR)
    return accelerator


def checkpoints(folder: str, complete: bool = True) -> list[str]:
    """The (complete) checkpoints in `folder`, oldest first."""
    names = [n for n in os.listdir(folder) if re.fullmatch(r"checkpoint_[0-9]+", n)] if os.path.isdir(folder) else []
    paths = [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[11:]))]
    return [path for path in paths if os.path.isfile(os.path.join(path, STATE)) or not complete]


def find_checkpoint(args, inputs: list, keep: list[str]) -> str | None:
    """The checkpoint to resume (a folder, or the newest complete one for 'latest'), after --output_dir is checked:
    refused when it is, holds or lies in an input (the checkpoint too, unless one of its own) or holds user files."""
    path = args.resume_from_checkpoint
    if path == "latest":
        path = next(reversed(checkpoints(os.path.join(args.output_dir, "checkpoints"))), None)
    elif path and not os.path.isfile(os.path.join(path, STATE)):
        held = checkpoints(path)
        name_one = f"; it holds {held}: name one, e.g. --resume_from_checkpoint {held[-1]}" if held else ""
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE}){name_one}.")
    own = os.path.realpath(os.path.join(args.output_dir, "checkpoints"))
    inputs.extend([path] if path and os.path.realpath(Path(path).absolute().parent) != own else [])
    check_output_path(args.output_dir, inputs=inputs, overwrite=args.overwrite, keep=keep if path else [LOCK])
    return path


def contract_of(script: str, accelerator, config, processor, args, flags: list[str], data=None, **more) -> dict:
    """What defines a run, for a resume to match: the script, the config, `flags` (paths resolved), `more`, the
    precision, the process count, the palette, and a digest of every training example's bytes (`data`: the split and
    its columns, the images first), read once when the run checkpoints or resumes."""
    skip = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")
    contract = {"script": script} | {f"config.{k}": v for k, v in config.to_dict().items() if k not in skip}
    for name, value in ((name, getattr(args, name)) for name in flags):
        contract[f"--{name}"] = os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value
    contract |= more | {"mixed precision": accelerator.mixed_precision, "processes": accelerator.num_processes}
    contract["palette"] = hashlib.sha256(torch.tensor(processor.clusters).float().numpy().tobytes()).hexdigest()[:16]
    found = [None]
    if data and accelerator.is_main_process and (args.resume_from_checkpoint or args.checkpointing_steps):
        (split, columns), digest = data, hashlib.sha256()
        split = split.select_columns(columns).cast_column(columns[0], datasets.Image(decode=False))
        for batch in split.iter(batch_size=256):
            for image in batch[columns[0]]:
                digest.update(hashlib.sha256(image["bytes"] or Path(image["path"]).read_bytes()).digest())
            digest.update(json.dumps([batch[column] for column in columns[1:]], default=str).encode())
        found = [digest.hexdigest()[:16]]
    contract["training data (fingerprint of its bytes)"] = broadcast_object_list(found)[0] if data else None
    return json.loads(json.dumps(contract, default=str))


def begin(accelerator, args, checkpoint: str | None, run: Run, tracker_dir: str) -> FileLock | None:
    """Refuses a checkpoint of the other script, of another run (each difference named) or with files missing; then
    takes the lock of --output_dir (held by the caller to the end: one run per folder) and, with --overwrite and no
    resume, deletes an earlier run's checkpoints and logs. `run` is registered for checkpointing."""
    accelerator.register_for_checkpointing(run)
    if checkpoint is not None:
        then, now = torch.load(os.path.join(checkpoint, STATE), weights_only=True)["contract"], run["contract"]
        if then["script"] != now["script"]:
            raise ValueError(f"{checkpoint} is a checkpoint of {then['script']}: resume it with that script.")
        differ = [
            f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(then | now) if then.get(k) != now.get(k)
        ]
        if changed := "; ".join(differ):
            raise ValueError(
                f"Cannot resume from {checkpoint}: this run differs from the one that wrote it in {changed}. To "
                "continue that run, pass its settings again; to train with the new ones, start a new run (another "
                "--output_dir, or --overwrite without --resume_from_checkpoint, which deletes its checkpoints)."
            )
        needed = [f"random_states_{i}.pkl" for i in range(accelerator.num_processes)]
        needed += [] if Path(checkpoint, "pytorch_model_fsdp_0").is_dir() else ["model.safetensors"]  # FSDP: shards
        if missing := [name for name in needed if not Path(checkpoint, name).is_file()]:
            raise ValueError(
                f"Cannot resume from {checkpoint}: its {', '.join(missing)} is missing, and without it the run would "
                "not go on as it was. Resume from another checkpoint, or start anew."
            )
    lock = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        try:
            (lock := FileLock(os.path.join(args.output_dir, LOCK))).acquire(timeout=0)
        except Timeout:
            raise ValueError(
                f"Another run is writing to --output_dir {args.output_dir}: wait for it to end."
            ) from None
        for name in ("checkpoints", tracker_dir) if args.overwrite and not checkpoint else ():
            shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return lock


def load_checkpoint(accelerator, checkpoint: str | None, run: Run, batches_per_epoch: int) -> None:
    """`load_state`: the weights, optimizer, schedule, random states and the position in `run`; checkpoints numbered
    after it (from before this resume) are replaced by this run's."""
    if checkpoint is not None:
        try:
            accelerator.load_state(checkpoint)
        except Exception as err:  # whatever a damaged checkpoint raises inside accelerate or torch
            raise ValueError(f"Cannot resume from the checkpoint {checkpoint}: loading it failed ({err}).") from err
        number = re.findall(r"\d+", Path(checkpoint).name)  # the next checkpoint's, after accelerate's naming
        accelerator.project_configuration.iteration = int(number[-1]) + 1 if number else 0
        if run["seen"] >= batches_per_epoch:  # saved at the end of an epoch
            run.update(epoch=run["epoch"] + 1, seen=0)
        logging.getLogger(__name__).info(f"Resumed from checkpoint {checkpoint} at step {run['completed_steps']}")


def save_checkpoint(accelerator, args, run: Run, **position) -> None:
    """`save_state` into the next checkpoint_N (an earlier one of that number or later, from before a resume or cut
    short, goes first); a full disk is reported with the file being written and the space left."""
    root = Path(args.output_dir, "checkpoints")
    folder = root / f"checkpoint_{accelerator.save_iteration}"
    for stale in checkpoints(root, complete=False) if accelerator.is_main_process else []:
        if int(Path(stale).name[11:]) >= accelerator.save_iteration:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    run.update(position)
    try:
        accelerator.save_state()
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its writer
        newest = max(folder.rglob("*"), key=lambda p: p.stat().st_mtime_ns, default=folder).name
        free = shutil.disk_usage(root).free / 2**20
        shutil.rmtree(folder, ignore_errors=True)
        raise OSError(
            f"Saving the checkpoint {folder} failed while writing {newest}, with {free:.1f} MiB free on that disk "
            f"({err}). Free some space or choose another --output_dir, and resume with --resume_from_checkpoint latest."
        ) from err


def check_finite(accelerator, args, loss, step: int) -> None:
    """Stops a diverged run at once (no model is written; the checkpoints before it stay)."""
    if not torch.isfinite(accelerator.reduce(loss.detach().float(), "sum")):
        raise FloatingPointError(
            f"Training diverged: the loss is {loss.item()} at step {step} (--learning_rate {args.learning_rate:g}). No "
            f"model was written; the checkpoints before it stay in {args.output_dir}. Lower --learning_rate and start anew."
        )
