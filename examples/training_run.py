"""What pretrain.py and finetune.py share (copy it with the script you adapt): their flags, the Accelerator (with
accelerate's numbered checkpoints in --output_dir/checkpoints) and the stop of a diverged run."""

import argparse
import logging
import os

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from image_gpt_hf.training import DIGITS

RUN_FLAGS = ["model_name_or_path", "learning_rate", "weight_decay", "adam_beta2", "max_grad_norm", "lr_scheduler_type"]
RUN_FLAGS += ["num_warmup_steps", "max_train_steps", "num_train_epochs", "per_device_train_batch_size", "seed"]
RUN_FLAGS += ["gradient_accumulation_steps", "dataset_name", "dataset_config_name", "train_dir", "train_val_split"]
RUN_FLAGS += ["max_train_samples", "random_crop_scale", "no_random_crop"]


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
    add("--max_train_samples", type=int)
    add("--max_eval_samples", type=int)
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
        raise ValueError(f"--checkpointing_steps must be 'epoch' or a number of steps <= --max_train_steps: {every}.")
    if steps and args.num_warmup_steps > steps:
        raise ValueError(f"--num_warmup_steps {args.num_warmup_steps} > --max_train_steps: the peak would never come.")
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


def check_finite(accelerator, args, loss, step: int) -> None:  # a diverged run stops at once, writing no model
    if not torch.isfinite(accelerator.reduce(loss.detach().float(), "sum")):
        raise FloatingPointError(
            f"Training diverged: the loss is {loss.item()} at step {step} (--learning_rate {args.learning_rate:g}). No "
            f"model was written; the checkpoints before it stay in {args.output_dir}. Lower --learning_rate and start anew."
        )
