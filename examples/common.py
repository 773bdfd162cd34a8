"""What the Image GPT example scripts share: arguments, data, the processor and its palette, the Accelerate training
loop with crash-safe resumable checkpoints, logging and saving.

The scripts (`pretrain.py`, `finetune.py`, `linear_probe.py`, `sample.py`) read top to bottom like transformers'
`run_*_no_trainer.py` examples; everything they would otherwise repeat lives here, once.

Data flow: a `datasets` image dataset (a Hub dataset, an imagefolder, or the bundled scikit-learn digits) ->
`ImageGPTCollator` (images -> palette ids through `ImageGPTImageProcessor`, on the fly; random crops for training,
center crops for evaluation) -> `accelerator.prepare`d DataLoaders -> `train()`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from datasets import ClassLabel, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, SchedulerType, get_scheduler

from image_gpt_hf import ImageGPTConfig, ImageGPTImageProcessor, random_bert_mask
from image_gpt_hf.model_card import write_model_card
from image_gpt_hf.palette import fit_palette, load_sklearn_digits

logger = get_logger(__name__)

# The default dataset: scikit-learn's 1,797 handwritten digits (8x8 gray scans, 10 classes). They ship inside
# scikit-learn, so every script runs offline out of the box.
DIGITS = "sklearn-digits"
DIGITS_TEST_SIZE = 360  # a fixed, stratified 1,437 / 360 train / test split
DIGITS_N_PX = 8  # the scans' own resolution
DIGITS_PALETTE_SIZE = 16  # the scans have 17 gray levels
PAPER_N_PX = 32
PAPER_PALETTE_SIZE = 512

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
# Written last into a checkpoint: a checkpoint folder without it is incomplete and never resumed from.
STATE_FILE = "training_state.json"
RESULTS_FILE = "all_results.json"


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=DIGITS,
        help=f"A `datasets` image dataset (Hub id or local path, e.g. uoft-cs/cifar10), or {DIGITS!r} (default): "
        "scikit-learn's bundled 8x8 handwritten digits, which need no download.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset configuration name.")
    group.add_argument(
        "--train_dir", type=str, default=None, help="An imagefolder of training images (class subfolders)."
    )
    group.add_argument("--validation_dir", type=str, default=None, help="An imagefolder of evaluation images.")
    group.add_argument(
        "--image_column_name",
        type=str,
        default=None,
        help="The column holding the images (default: the first column of `Image` type).",
    )
    group.add_argument(
        "--label_column_name",
        type=str,
        default=None,
        help="The column holding the class labels (default: the first `ClassLabel` column, else 'label' or 'labels').",
    )
    group.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of the training split held out for evaluation when the dataset has no validation/test split.",
    )
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training split (debugging).")
    group.add_argument("--max_eval_samples", type=int, default=None, help="Truncate the evaluation split (debugging).")
    group.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")


def add_processor_arguments(parser: argparse.ArgumentParser, *, fit_palette: bool, augment: bool = True) -> None:
    group = parser.add_argument_group("image processing")
    group.add_argument(
        "--n_px",
        type=int,
        default=None,
        help=f"Input resolution (n_px x n_px pixels, n_px**2 tokens). Default: the model's; for a new model "
        f"{PAPER_N_PX} (the paper's smallest), or {DIGITS_N_PX} on the bundled digits.",
    )
    group.add_argument(
        "--processor_name_or_path",
        type=str,
        default=None,
        help="A folder or Hub id with a preprocessor_config.json holding a palette ('clusters'), e.g. "
        "openai/imagegpt-small for OpenAI's 512 colors. Default: the model's.",
    )
    if fit_palette:
        group.add_argument(
            "--palette_size",
            type=int,
            default=None,
            help=f"Colors of the palette fitted by k-means when no processor is given. Default: the config's, else "
            f"{PAPER_PALETTE_SIZE} (the paper's), or {DIGITS_PALETTE_SIZE} on the bundled gray digits.",
        )
        group.add_argument(
            "--palette_max_pixels", type=int, default=1_000_000, help="Pixels sampled for the palette fit."
        )
    if not augment:
        return
    group.add_argument(
        "--random_crop_scale",
        type=float,
        nargs=2,
        default=(0.5, 1.0),
        metavar=("MIN", "MAX"),
        help="Training augmentation: crop a random region of this fraction of the image area (RandomResizedCrop "
        "recipe) before resizing to n_px. Default (0.5, 1): small images lose their content under torchvision's "
        "(0.08, 1).",
    )
    group.add_argument("--no_random_crop", action="store_true", help="Train on whole images (no random crops).")


def add_training_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, num_train_epochs: int) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, required=True, help="Where to write checkpoints and the model.")
    group.add_argument("--seed", type=int, default=42, help="Seeds the model init, data order, crops and masks.")
    group.add_argument("--per_device_train_batch_size", type=int, default=64, help="Batch size per device.")
    group.add_argument("--per_device_eval_batch_size", type=int, default=128, help="Evaluation batch size per device.")
    group.add_argument("--learning_rate", type=float, default=learning_rate, help="Peak learning rate (AdamW).")
    group.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases or norms).")
    group.add_argument(
        "--adam_beta2",
        type=float,
        default=0.95,
        help="AdamW beta2 (0.95, the usual choice for transformer pretraining).",
    )
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables it).")
    group.add_argument("--num_train_epochs", type=int, default=num_train_epochs, help="Training epochs.")
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    group.add_argument(
        "--lr_scheduler_type",
        type=SchedulerType,
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after warmup.",
    )
    group.add_argument("--num_warmup_steps", type=int, default=0, help="Linear warmup steps.")
    group.add_argument("--logging_steps", type=int, default=10, help="Log the training loss every this many steps.")
    group.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help="Evaluate every n steps and at the end (default: at the end of every epoch).",
    )
    group.add_argument(
        "--checkpointing_steps",
        type=str,
        default=None,
        help="Save a resumable checkpoint every n steps (an integer) or at the end of every epoch ('epoch').",
    )
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest n checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint folder, or 'latest': the newest complete one under output_dir/checkpoints (training "
        "starts from scratch when there is none yet, so a preempted job can always be relaunched with 'latest').",
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides the mixed precision of `accelerate config` / `accelerate launch`.",
    )
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    group.add_argument("--with_tracking", action="store_true", help="Log metrics to experiment trackers.")
    group.add_argument(
        "--report_to",
        type=str,
        default="all",
        help="Trackers for --with_tracking: 'tensorboard', 'wandb', 'comet_ml', 'mlflow', ... or 'all' installed.",
    )
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final model folder to the Hub.")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository id (default: output_dir's name)."
    )
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")


def check_training_arguments(args: argparse.Namespace) -> None:
    """Argument errors that argparse cannot see, raised before anything is loaded."""
    positive = [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    ]
    if args.eval_steps is not None:
        positive.append("eval_steps")
    for name in positive + ["num_train_epochs"]:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}.")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            raise ValueError(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}."
            )
    low, high = args.random_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"--random_crop_scale must satisfy 0 < MIN <= MAX <= 1, got {low} {high}.")


# ---------------------------------------------------------------------------------------------------------------------
# Accelerator and logging
# ---------------------------------------------------------------------------------------------------------------------


def create_accelerator(args: argparse.Namespace, *, with_training: bool = True) -> Accelerator:
    """An Accelerator for `accelerate launch` (or plain `python`), with transformers' example logging set up."""
    kwargs: dict[str, Any] = {
        # Seeded samplers: the same data order on every process and after a resume.
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    }
    if with_training:
        kwargs["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        if args.mixed_precision is not None:
            kwargs["mixed_precision"] = args.mixed_precision
        if args.with_tracking:
            kwargs["log_with"] = args.report_to
            kwargs["project_dir"] = args.output_dir
    # `accelerate launch` starts several processes through torchrun, but on a machine without GPUs Accelerate only
    # joins them into one run (gloo) when told to use the CPU; without that they would train side by side, unaware of
    # each other, and overwrite each other's files.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        kwargs["cpu"] = True
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    accelerator = Accelerator(**kwargs)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def progress_bar(accelerator: Accelerator, **kwargs) -> tqdm:
    """tqdm on the local main process only."""
    return tqdm(disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits as an image-classification `DatasetDict` with a fixed split.

    `image`: 8x8 gray PIL images (the scans' 0..16 counts scaled to 0..255); `label`: `ClassLabel` "0".."9".
    The train / test split (1,437 / 360) is stratified by class and fixed (random_state=0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images = load_sklearn_digits()
    labels = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])}
    )

    def split(indices: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": [int(labels[i]) for i in indices]}, features=features
        )

    return DatasetDict({"train": split(train_idx), "test": split(test_idx)})


def load_image_dataset(args: argparse.Namespace) -> DatasetDict:
    """The dataset of `--dataset_name` / `--train_dir` / `--validation_dir` with a "train" and a "validation" split.

    A dataset without a validation split uses its test split, else holds out `--train_val_split` of train.
    """
    if args.train_dir is not None or args.validation_dir is not None:
        if args.train_dir is None:
            raise ValueError("--validation_dir needs a --train_dir to go with it.")
        data_files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir is not None:
            data_files["validation"] = os.path.join(args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=args.cache_dir)
        source = args.train_dir
    elif args.dataset_name == DIGITS:
        dataset = load_digits_dataset()
        source = "scikit-learn's bundled digits"
    else:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        source = args.dataset_name
    if "train" not in dataset:
        raise ValueError(f"The dataset {source} has no 'train' split; its splits are {list(dataset)}.")

    args.eval_split_name = "validation"
    if "validation" not in dataset:
        if "test" in dataset:
            dataset["validation"] = dataset.pop("test")
            args.eval_split_name = "test"
        elif args.train_val_split > 0:
            split = dataset["train"].train_test_split(args.train_val_split, seed=args.seed)
            dataset["train"], dataset["validation"] = split["train"], split["test"]
            args.eval_split_name = f"{args.train_val_split:.0%} of train held out"
        else:
            raise ValueError(f"The dataset {source} has no validation or test split and --train_val_split is 0.")
    dataset = DatasetDict({"train": dataset["train"], "validation": dataset["validation"]})
    if args.max_train_samples is not None:
        dataset["train"] = (
            dataset["train"].shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset["train"]))))
        )
    if args.max_eval_samples is not None:
        dataset["validation"] = (
            dataset["validation"]
            .shuffle(seed=args.seed)
            .select(range(min(args.max_eval_samples, len(dataset["validation"]))))
        )
    logger.info(
        f"Dataset {source}: {len(dataset['train'])} training images, {len(dataset['validation'])} evaluation images "
        f"({args.eval_split_name} split)"
    )
    return dataset


def find_image_column(dataset: DatasetDict, requested: str | None) -> str:
    """The image column: `requested` (which must exist), else the first column of `Image` type."""
    columns = dataset["train"].column_names
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"--image_column_name {requested!r} is not a column of the dataset; its columns are {columns}."
            )
        return requested
    for name, feature in dataset["train"].features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"The dataset has no column of `Image` type among {columns}; pass --image_column_name.")


def find_label_column(dataset: DatasetDict, requested: str | None, *, required: bool) -> str | None:
    """The label column: `requested` (which must exist), else the first `ClassLabel` column, else 'label(s)'."""
    columns = dataset["train"].column_names
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"--label_column_name {requested!r} is not a column of the dataset; its columns are {columns}."
            )
        return requested
    for name, feature in dataset["train"].features.items():
        if isinstance(feature, ClassLabel):
            return name
    for name in ("label", "labels"):
        if name in columns:
            return name
    if required:
        raise ValueError(
            f"This script needs class labels, but the dataset has no label column (columns: {columns}). Pass "
            "--label_column_name, or give --train_dir an imagefolder with one subfolder per class."
        )
    return None


def label_names(dataset: DatasetDict, label_column: str) -> tuple[list[str], dict[Any, int] | None]:
    """Class names, and the map from raw label values to class ids when the column is not a `ClassLabel`."""
    feature = dataset["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    values = sorted(set(dataset["train"][label_column]) | set(dataset["validation"][label_column]))
    if len(values) < 2:
        raise ValueError(f"The label column {label_column!r} holds {len(values)} distinct value(s); need at least 2.")
    return [str(value) for value in values], {value: index for index, value in enumerate(values)}


class IndexedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` whose examples come with their index, which seeds their random crop and BERT mask."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, dict]]:
        return list(zip(indices, self.dataset.__getitems__(indices)))


def example_seed(*values: int) -> int:
    """A 32-bit seed from non-negative integers, the same on every machine and Python run."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class ImageGPTCollator:
    """Turns `(index, example)` pairs into model inputs: `input_ids` (+ `labels`, + `bool_masked_pos`).

    Training batches get random crops (`ImageGPTImageProcessor(do_random_crop=True)`), evaluation batches the center
    crop. Both crops and BERT masks are drawn from seeds of (seed, epoch, example indices), not from the global RNG,
    so a resumed run (or a DataLoader worker) draws exactly what an uninterrupted one does.
    """

    def __init__(
        self,
        processor: ImageGPTImageProcessor,
        image_column: str,
        label_column: str | None = None,
        label_map: dict[Any, int] | None = None,
        *,
        train: bool,
        random_crop_scale: tuple[float, float] | None = None,
        mask_prob: float | None = None,
        seed: int = 0,
        pixel_values: bool = False,
    ):
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.label_map = label_map
        self.train = train
        self.random_crop_scale = random_crop_scale
        self.mask_prob = mask_prob
        self.seed = seed
        self.pixel_values = pixel_values
        self.epoch = 0
        n_px = processor_n_px(processor)
        # Evaluation: shortest edge to n_px, then the center n_px x n_px (the plain resize on square images).
        self.eval_geometry = {
            "size": {"shortest_edge": n_px},
            "do_center_crop": True,
            "crop_size": {"height": n_px, "width": n_px},
        }

    def __call__(self, examples: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        indices = [index for index, _ in examples]
        images = [example[self.image_column] for _, example in examples]
        epoch = self.epoch if self.train else 0
        batch_seed = example_seed(self.seed, int(self.train), epoch, *indices)
        if self.train and self.random_crop_scale is not None:
            # The processor draws crops from torch's global RNG: fork it, so training randomness elsewhere is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(batch_seed)
                input_ids = self.processor(
                    images, return_tensors="pt", do_random_crop=True, random_crop_scale=self.random_crop_scale
                )["input_ids"]
        elif self.pixel_values:
            # The raw-pixel baseline of the linear probe: normalized RGB values instead of palette ids.
            pixels = self.processor(images, return_tensors="pt", do_color_quantize=False, **self.eval_geometry)
            return self._add_labels({"pixel_values": pixels["pixel_values"].float()}, examples)
        else:
            input_ids = self.processor(images, return_tensors="pt", **self.eval_geometry)["input_ids"]
        batch = self._add_labels({"input_ids": input_ids.long()}, examples)
        if self.mask_prob is not None:
            generator = torch.Generator().manual_seed(batch_seed + 1)
            batch["bool_masked_pos"] = random_bert_mask(input_ids.shape, self.mask_prob, generator=generator)
        return batch

    def _add_labels(self, batch: dict[str, torch.Tensor], examples: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        if self.label_column is not None:
            labels = [example[self.label_column] for _, example in examples]
            if self.label_map is not None:
                labels = [self.label_map[label] for label in labels]
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def make_dataloaders(
    args: argparse.Namespace,
    dataset: DatasetDict,
    processor: ImageGPTImageProcessor,
    image_column: str,
    label_column: str | None = None,
    label_map: dict[Any, int] | None = None,
    *,
    mask_prob: float | None = None,
    eval_mask_prob: float | None = None,
    train_augment: bool = True,
) -> tuple[DataLoader, DataLoader, ImageGPTCollator]:
    """Training (shuffled, random crops) and evaluation (in order, center crops) DataLoaders, and the train collator."""
    columns = [image_column] + ([label_column] if label_column is not None else [])
    train_collator = ImageGPTCollator(
        processor,
        image_column,
        label_column,
        label_map,
        train=True,
        random_crop_scale=None if args.no_random_crop or not train_augment else tuple(args.random_crop_scale),
        mask_prob=mask_prob,
        seed=args.seed,
    )
    train_dataloader = DataLoader(
        IndexedDataset(dataset["train"].select_columns(columns)),
        shuffle=True,
        collate_fn=train_collator,
        batch_size=args.per_device_train_batch_size,
        num_workers=args.dataloader_num_workers,
        # Only seeds worker processes; it keeps the iterator from drawing on the global RNG (see resume).
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dataloader = ordered_dataloader(
        args, dataset["validation"], processor, image_column, label_column, label_map, mask_prob=eval_mask_prob
    )
    return train_dataloader, eval_dataloader, train_collator


def ordered_dataloader(
    args: argparse.Namespace,
    split: datasets.Dataset,
    processor: ImageGPTImageProcessor,
    image_column: str,
    label_column: str | None = None,
    label_map: dict[Any, int] | None = None,
    *,
    mask_prob: float | None = None,
    pixel_values: bool = False,
) -> DataLoader:
    """A DataLoader over `split` in order, center-cropped: for evaluation and feature extraction."""
    columns = [image_column] + ([label_column] if label_column is not None else [])
    collator = ImageGPTCollator(
        processor,
        image_column,
        label_column,
        label_map,
        train=False,
        mask_prob=mask_prob,
        seed=args.seed,
        pixel_values=pixel_values,
    )
    return DataLoader(
        IndexedDataset(split.select_columns(columns)),
        collate_fn=collator,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Models, processors and palettes
# ---------------------------------------------------------------------------------------------------------------------


def load_imagegpt_config(model_name_or_path: str, **kwargs) -> ImageGPTConfig:
    """The config of an Image GPT checkpoint; a clear error for anything else (a GPT-2, a ViT, a missing folder)."""
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load a model config from {model_name_or_path!r}: {err}") from err
    if not isinstance(config, ImageGPTConfig):
        raise ValueError(
            f"{model_name_or_path!r} is a {config.model_type!r} checkpoint ({type(config).__name__}); these examples "
            "need an Image GPT checkpoint (model_type 'imagegpt'), e.g. one written by examples/pretrain.py or "
            "openai/imagegpt-small."
        )
    return config


def processor_n_px(processor: ImageGPTImageProcessor) -> int:
    size = processor.size
    side = size.get("height") or size.get("shortest_edge")
    if not side or (size.get("width") and size["width"] != side):
        raise ValueError(f"The processor's size {dict(size)} is not a square n_px x n_px.")
    return int(side)


def check_n_px(n_px: int, config: ImageGPTConfig, source: str) -> None:
    """n_px must fit the model's learned positions; a smaller raster would read them in the wrong places."""
    if n_px < 1:
        raise ValueError(f"--n_px must be positive, got {n_px}.")
    if n_px * n_px > config.n_positions:
        raise ValueError(
            f"--n_px {n_px} needs {n_px * n_px} positions but the model ({source}) has n_positions="
            f"{config.n_positions} (n_px {math.isqrt(config.n_positions)}). Use --n_px <= {math.isqrt(config.n_positions)}."
        )
    if n_px * n_px < config.n_positions:
        logger.warning(
            f"--n_px {n_px} is smaller than the model's {math.isqrt(config.n_positions)}: rows of {n_px} pixels will "
            "sit on positions learned for longer rows."
        )


def load_processor(name_or_path: str) -> ImageGPTImageProcessor | None:
    """The processor saved with a checkpoint, or None when it has none / it holds no palette."""
    try:
        processor = ImageGPTImageProcessor.from_pretrained(name_or_path)
    except OSError:
        return None
    return processor if processor.clusters is not None else None


def resize_processor(processor: ImageGPTImageProcessor, n_px: int) -> ImageGPTImageProcessor:
    if processor_n_px(processor) != n_px:
        processor.size = {"height": n_px, "width": n_px}
        processor.do_center_crop = False
    return processor


def checkpoint_processor(
    args: argparse.Namespace, model_name_or_path: str, config: ImageGPTConfig
) -> ImageGPTImageProcessor:
    """The processor of a trained model (its palette defines the model's token ids), at `--n_px` or the model's."""
    source = args.processor_name_or_path or model_name_or_path
    processor = load_processor(source)
    if processor is None:
        raise ValueError(
            f"{source!r} has no preprocessor_config.json with a palette ('clusters'). The model's token ids index "
            "the palette it was trained with; pass the processor it was trained with as --processor_name_or_path."
        )
    if len(processor.clusters) != config.palette_size:
        raise ValueError(
            f"The processor from {source!r} has {len(processor.clusters)} colors but the model predicts "
            f"{config.palette_size}: they do not belong together."
        )
    n_px = args.n_px if args.n_px is not None else config.n_px
    check_n_px(n_px, config, model_name_or_path)
    return resize_processor(processor, n_px)


def fitted_processor(
    args: argparse.Namespace,
    accelerator: Accelerator,
    train_dataset: datasets.Dataset,
    image_column: str,
    n_px: int,
    palette_size: int,
) -> ImageGPTImageProcessor:
    """A processor with a palette fitted by k-means to the training images (on the main process, then shared)."""
    palette = [None]
    if accelerator.is_main_process:
        logger.info(f"Fitting a {palette_size}-color palette by k-means to the training images at {n_px}x{n_px}")
        palette[0] = fit_palette(
            train_dataset,
            num_colors=palette_size,
            n_px=n_px,
            max_pixels=args.palette_max_pixels,
            seed=args.seed,
            image_column=image_column,
        )
    if accelerator.num_processes > 1:
        broadcast_object_list(palette)
    return ImageGPTImageProcessor(clusters=palette[0], size={"height": n_px, "width": n_px})


# ---------------------------------------------------------------------------------------------------------------------
# Training loop and checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def optimizer_and_scheduler(
    args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, train_dataloader: DataLoader
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on biases and norms) and the schedule; sets `args.max_train_steps`/`num_train_epochs`.

    Call with the *prepared* training DataLoader, whose length is the per-process number of batches.
    """
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, args.adam_beta2),
    )
    # A prepared scheduler steps once per process for every optimizer step.
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first, as (step, path)."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        step = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(step), path))
    return sorted(found)


def resolve_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names: a folder, or 'latest' (None when there is none yet)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(args.output_dir)
        if not found:
            logger.warning(
                f"--resume_from_checkpoint latest: no complete checkpoint under {args.output_dir}; starting from scratch"
            )
            return None
        return found[-1][1]
    path = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {STATE_FILE}); complete ones are "
            f"{[p for _, p in checkpoint_dirs(args.output_dir)] or 'none'}."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    args: argparse.Namespace,
    state: dict[str, Any],
    save_extra: Callable[[str], None] | None = None,
) -> str:
    """`accelerator.save_state` into a temporary folder, then an atomic rename to `checkpoints/step_N`.

    A crash while writing leaves only the temporary folder, which is never resumed from and is cleared next time.
    """
    root = os.path.join(args.output_dir, CHECKPOINTS_DIR)
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{state['completed_steps']}")
    tmp = os.path.join(root, f".tmp-{CHECKPOINT_PREFIX}{state['completed_steps']}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if save_extra is not None:
            save_extra(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if args.checkpoints_total_limit is not None:
            for _, old in checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}")
    return final


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    train_dataloader: DataLoader,
    train_collator: ImageGPTCollator,
    *,
    compute_loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    evaluate: Callable[[], dict[str, float]],
    resume_checkpoint: str | None = None,
    save_extra: Callable[[str], None] | None = None,
    project_name: str = "image_gpt",
) -> dict[str, float]:
    """The training loop shared by pretraining and fine-tuning. Returns the last evaluation's metrics.

    `compute_loss(model, batch)` gives the loss to minimise; `evaluate()` runs the evaluation and returns metrics.
    With `resume_checkpoint`, the run continues from it at the same step and on the same data (skipped batches are
    not even loaded), so that it ends where an uninterrupted run would have.
    """
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)
    run_config = {
        "num_processes": accelerator.num_processes,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_train_steps": args.max_train_steps,
        "seed": args.seed,
    }

    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    if resume_checkpoint is not None:
        with open(os.path.join(resume_checkpoint, STATE_FILE)) as f:
            state = json.load(f)
        changed = {k: (state["config"][k], v) for k, v in run_config.items() if state["config"].get(k) != v}
        if changed:
            raise ValueError(
                f"Cannot resume from {resume_checkpoint}: it was written by a run with different settings "
                f"({', '.join(f'{k}: {old} then, {new} now' for k, (old, new) in changed.items())}); the data order "
                "and schedule would not continue where they stopped."
            )
        accelerator.load_state(resume_checkpoint)
        completed_steps, starting_epoch, skip_batches = (
            state["completed_steps"],
            state["epoch"],
            state["batches_in_epoch"],
        )
        if skip_batches >= len(train_dataloader):
            starting_epoch, skip_batches = starting_epoch + 1, 0
        logger.info(f"Resumed from checkpoint {resume_checkpoint} at step {completed_steps} (epoch {starting_epoch})")

    if args.with_tracking:
        tracked = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()}
        tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in tracked.items()}
        accelerator.init_trackers(project_name, tracked)

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataloader.dataset)}")
    logger.info(f"  Num epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")

    def run_evaluation(epoch: int) -> dict[str, float]:
        metrics = evaluate()
        metrics_text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        logger.info(f"epoch {epoch} (step {completed_steps}): {metrics_text}")
        if args.with_tracking:
            accelerator.log({**metrics, "epoch": epoch}, step=completed_steps)
        return metrics

    bar = progress_bar(accelerator, total=args.max_train_steps, initial=completed_steps, desc="train")
    metrics: dict[str, float] = {}
    running_loss, running_count = torch.zeros((), device=accelerator.device), 0
    epoch = starting_epoch
    for epoch in range(starting_epoch, args.num_train_epochs):
        if completed_steps >= args.max_train_steps:  # resumed from the last step
            break
        model.train()
        train_collator.epoch = epoch
        train_dataloader.set_epoch(epoch)
        batches_in_epoch = skip_batches if epoch == starting_epoch else 0
        if batches_in_epoch:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, batches_in_epoch)
        else:
            active_dataloader = train_dataloader
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            batches_in_epoch += 1
            running_loss += loss.detach().float()
            running_count += 1
            if not accelerator.sync_gradients:
                continue

            completed_steps += 1
            bar.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                train_loss = accelerator.reduce(running_loss, "mean").item() / running_count
                running_loss.zero_()
                running_count = 0
                lr = lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
                logger.info(f"step {completed_steps}: train_loss {train_loss:.4f}, lr {lr:.3e}")
                if args.with_tracking:
                    accelerator.log({"train_loss": train_loss, "lr": lr, "epoch": epoch}, step=completed_steps)
            if args.eval_steps is not None and (
                completed_steps % args.eval_steps == 0 or completed_steps >= args.max_train_steps
            ):
                metrics = run_evaluation(epoch)
            if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                state = {
                    "completed_steps": completed_steps,
                    "epoch": epoch,
                    "batches_in_epoch": batches_in_epoch,
                    "config": run_config,
                }
                save_checkpoint(accelerator, args, state, save_extra)
            if completed_steps >= args.max_train_steps:
                break

        if args.eval_steps is None:
            metrics = run_evaluation(epoch)
        if checkpointing_steps == "epoch":
            state = {
                "completed_steps": completed_steps,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "config": run_config,
            }
            save_checkpoint(accelerator, args, state, save_extra)
        if completed_steps >= args.max_train_steps:
            break
    bar.close()
    if not metrics:  # resumed from a checkpoint of the last step
        metrics = run_evaluation(epoch)
    if args.with_tracking:
        accelerator.end_training()
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------


def dataset_facts(args: argparse.Namespace) -> tuple[str, list[str]]:
    """A human-readable name of the training data, and the Hub dataset ids to list in the model card."""
    if args.train_dir is not None:
        return f"the imagefolder {args.train_dir}", []
    if args.dataset_name == DIGITS:
        return "scikit-learn handwritten digits (8x8 scans)", []
    return args.dataset_name, [args.dataset_name]


def save_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor: ImageGPTImageProcessor,
    args: argparse.Namespace,
    *,
    facts: dict[str, Any],
    results: dict[str, Any],
) -> None:
    """The final model folder: weights + config (+ remote code), processor, model card, all_results.json; then the
    Hub upload with `--push_to_hub`. It loads with `AutoModel*.from_pretrained` and `AutoImageProcessor`."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP) weights
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)
        card = write_model_card(args.output_dir, unwrapped, processor=processor, facts=facts)
        with open(os.path.join(args.output_dir, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
        logger.info(
            f"Saved the model to {args.output_dir} (model card {card}, results {os.path.join(args.output_dir, RESULTS_FILE)})"
        )
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
            api.upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=[f"{CHECKPOINTS_DIR}/*", "runs/*"],
            )
            logger.info(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
