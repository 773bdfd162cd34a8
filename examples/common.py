"""The boring parts the example scripts share: argument groups, the Accelerator, the bundled digits, images ->
palette ids, the paper's low-data label subsets and BERT evaluation masks, checkpoints (find, check, save, resume)
with the bookkeeping of a training loop, and the model folder.

Each script (`pretrain.py`, `finetune.py`, `linear_probe.py`, `sample.py`) holds its own data preparation, model,
training loop, evaluation and saving in `main()`, like transformers' `run_*_no_trainer.py`; copy one script and this
module to adapt it. Nothing here writes to a script's arguments. Files are written by the project's one rule,
`image_gpt_hf.safe_io`: refused early, staged, renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import accelerate
import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from datasets import ClassLabel, DatasetDict, load_dataset
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, SchedulerType, get_scheduler

from image_gpt_hf import ImageGPTConfig, ImageGPTForImageClassification, ImageGPTImageProcessor, random_bert_mask
from image_gpt_hf.generation import openai_generation_config
from image_gpt_hf.model_card import write_model_card
from image_gpt_hf.palette import load_sklearn_digits
from image_gpt_hf.safe_io import check_output_path, staged_dir, staging_path

logger = get_logger(__name__)

# The default dataset: scikit-learn's 1,797 handwritten digits (8x8 gray scans, 10 classes), bundled with it, so that
# every script runs offline out of the box.
DIGITS = "sklearn-digits"
DIGITS_TEST_SIZE = 360  # a fixed, stratified 1,437 / 360 train / test split
DIGITS_N_PX = 8  # the scans' own resolution
DIGITS_PALETTE_SIZE = 16  # the scans have 17 gray levels
PAPER_N_PX = 32
PAPER_PALETTE_SIZE = 512

CHECKPOINTS_DIR = "checkpoints"  # output_dir/checkpoints/step_N
STATE_FILE = "training_state.json"  # written last: a checkpoint without it is incomplete and never resumed from
RESULTS_FILE = "all_results.json"


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        default=DIGITS,
        help=f"A `datasets` image dataset (Hub id or local path, e.g. uoft-cs/cifar10), or {DIGITS!r} (default): "
        "scikit-learn's bundled 8x8 handwritten digits, which need no download.",
    )
    group.add_argument("--dataset_config_name", default=None, help="The dataset configuration name.")
    group.add_argument("--train_dir", default=None, help="An imagefolder of training images (class subfolders).")
    group.add_argument("--validation_dir", default=None, help="An imagefolder of evaluation images.")
    group.add_argument("--image_column_name", default=None, help="Default: the first column of `Image` type.")
    group.add_argument(
        "--label_column_name", default=None, help="Default: the first `ClassLabel` column, else 'label' or 'labels'."
    )
    group.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of train held out for evaluation when the dataset has no validation or test split.",
    )
    group.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training split.")
    group.add_argument("--max_eval_samples", type=int, default=None, help="Truncate the evaluation split.")
    group.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    group.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")


def add_processor_arguments(parser: argparse.ArgumentParser, *, augment: bool = True) -> Any:
    """--n_px, --processor_name_or_path (+ the training crops with `augment`); returns the group."""
    group = parser.add_argument_group("image processing")
    group.add_argument(
        "--n_px",
        type=int,
        default=None,
        help=f"Input resolution (n_px x n_px pixels). Default: the model's; for a new model {PAPER_N_PX} (the "
        f"paper's smallest), or {DIGITS_N_PX} on the bundled digits.",
    )
    group.add_argument(
        "--processor_name_or_path",
        default=None,
        help="A processor with a palette ('clusters'), e.g. openai/imagegpt-small for OpenAI's 512 colors. "
        "Default: the model's.",
    )
    if augment:
        group.add_argument(
            "--random_crop_scale",
            type=float,
            nargs=2,
            default=(0.5, 1.0),
            metavar=("MIN", "MAX"),
            help="Training crops of this fraction of the image area, resized to n_px (RandomResizedCrop); small "
            "images lose their content under torchvision's (0.08, 1).",
        )
        group.add_argument("--no_random_crop", action="store_true", help="Train on whole images (no random crops).")
    return group


def add_output_arguments(parser: Any, *, what: str) -> None:
    """--output_dir and --overwrite, on a parser or an argument group."""
    parser.add_argument("--output_dir", required=True, help=f"Where to write {what}.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace what is in --output_dir (by default nothing is replaced)."
    )


def add_training_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, num_train_epochs: int) -> None:
    group = parser.add_argument_group("training")
    add_output_arguments(group, what="checkpoints and the model")
    group.add_argument("--seed", type=int, default=42, help="Seeds the model init, data order, crops and masks.")
    group.add_argument("--per_device_train_batch_size", type=int, default=64, help="Batch size per device.")
    group.add_argument("--per_device_eval_batch_size", type=int, default=128, help="Evaluation batch size per device.")
    group.add_argument("--learning_rate", type=float, default=learning_rate, help="Peak learning rate (AdamW).")
    group.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases or norms).")
    group.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2 (0.95 suits transformers).")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables it).")
    group.add_argument("--num_train_epochs", type=int, default=num_train_epochs, help="Training epochs.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    group.add_argument(
        "--lr_scheduler_type",
        type=SchedulerType,
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after warmup.",
    )
    group.add_argument("--num_warmup_steps", type=int, default=0, help="Linear warmup steps.")
    group.add_argument("--logging_steps", type=int, default=10, help="Log the training loss every n steps.")
    group.add_argument("--eval_steps", type=int, default=None, help="Evaluate every n steps (default: every epoch).")
    group.add_argument(
        "--checkpointing_steps", default=None, help="Save a resumable checkpoint every n steps, or 'epoch'."
    )
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep the newest n checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest': the newest under output_dir/checkpoints (a fresh start when there is "
        "none yet, so that a preempted job can always be relaunched with 'latest').",
    )
    group.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Overrides Accelerate's."
    )
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    group.add_argument("--with_tracking", action="store_true", help="Log metrics to experiment trackers.")
    group.add_argument("--report_to", default="all", help="Trackers for --with_tracking: tensorboard, wandb, ... all.")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final model folder to the Hub.")
    group.add_argument("--hub_model_id", default=None, help="Hub repository id (default: output_dir's name).")
    group.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")


def check_data_arguments(args: argparse.Namespace) -> None:
    """Data-argument errors that argparse cannot see, raised before anything is loaded."""
    if not 0.0 <= args.train_val_split < 1.0:
        raise ValueError(
            f"--train_val_split is the fraction of the training split held out for evaluation and must be in [0, 1), "
            f"got {args.train_val_split}."
        )
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.validation_dir is not None and args.train_dir is None:
        raise ValueError("--validation_dir needs a --train_dir to go with it.")
    for name in ("train_dir", "validation_dir"):
        if getattr(args, name) is not None and not os.path.isdir(getattr(args, name)):
            raise ValueError(f"--{name} {getattr(args, name)!r} is not a folder of images.")
    low, high = getattr(args, "random_crop_scale", (1.0, 1.0))
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"--random_crop_scale must satisfy 0 < MIN <= MAX <= 1, got {low} {high}.")


def check_training_arguments(args: argparse.Namespace) -> None:
    """Training-argument errors that argparse cannot see, raised before anything is loaded."""
    check_data_arguments(args)
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
    positive += ["logging_steps", "num_train_epochs", "eval_steps", "checkpoints_total_limit", "max_train_steps"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("num_warmup_steps", "seed", "weight_decay", "max_grad_norm"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.learning_rate <= 0 or not 0.0 <= args.adam_beta2 < 1.0:
        raise ValueError(
            f"Need --learning_rate > 0 and 0 <= --adam_beta2 < 1, got {args.learning_rate}, {args.adam_beta2}."
        )
    if args.max_train_steps is not None and args.num_warmup_steps > args.max_train_steps:
        raise ValueError(
            f"--num_warmup_steps {args.num_warmup_steps} is more than --max_train_steps {args.max_train_steps}: the "
            "learning rate would never reach --learning_rate."
        )
    every = args.checkpointing_steps
    if every is not None and every != "epoch":
        if not re.fullmatch(r"[0-9]+", every) or int(every) < 1:
            raise ValueError(
                f"--checkpointing_steps must be a positive whole number of steps or 'epoch', got {every!r}."
            )
        if args.max_train_steps is not None and int(every) > args.max_train_steps:
            raise ValueError(
                f"--checkpointing_steps {every} is more than --max_train_steps {args.max_train_steps}: no checkpoint "
                "would ever be written. Pass a smaller number, or 'epoch'."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Accelerator
# ---------------------------------------------------------------------------------------------------------------------


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator for `accelerate launch` (or plain `python`), with transformers' example logging set up.

    Training scripts' arguments also set the accumulation, mixed precision and trackers (in --output_dir).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.accelerator.is_available():
        raise ValueError(
            "This run was launched with an FSDP config, but this machine has no GPU: Accelerate "
            f"{accelerate.__version__} shards a model only on GPU-type devices, and on CPUs it would quietly run plain "
            "data parallel instead (every process holding the whole model, unsharded checkpoints). On CPUs, launch "
            "with examples/accelerate_configs/multi_cpu.yaml; run the FSDP config on a machine with GPUs."
        )
    # Seeded samplers: the same data order on every process and after a resume.
    kwargs: dict[str, Any] = {
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed)
    }
    if hasattr(args, "gradient_accumulation_steps"):
        kwargs["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        kwargs["mixed_precision"] = args.mixed_precision
        if args.with_tracking:
            kwargs.update(log_with=args.report_to, project_dir=args.output_dir)
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
    verbosity = "warning" if accelerator.is_local_main_process else "error"
    datasets.utils.logging.set_verbosity(datasets.utils.logging.log_levels[verbosity])
    transformers.utils.logging.set_verbosity(transformers.utils.logging.log_levels[verbosity])
    return accelerator


def progress_bar(accelerator: Accelerator, **kwargs) -> tqdm:
    """tqdm on the local main process only."""
    return tqdm(disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits as an image-classification `DatasetDict`: 8x8 gray PIL `image`s (the
    scans' 0..16 counts scaled to 0..255), `ClassLabel` "0".."9", a fixed split (1,437 / 360, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_sklearn_digits(), load_digits().target
    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0)
    features = datasets.Features({"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices: np.ndarray) -> datasets.Dataset:
        columns = {"image": [images[i] for i in indices], "label": [int(labels[i]) for i in indices]}
        return datasets.Dataset.from_dict(columns, features=features)

    return DatasetDict({"train": split(train), "test": split(test)})


def load_image_dataset(args: argparse.Namespace) -> tuple[DatasetDict, str]:
    """The dataset of --dataset_name / --train_dir (+ --validation_dir) as "train" and "validation" splits, and the
    name of the split evaluated on: validation, else test, else --train_val_split of train held out."""
    if args.train_dir is not None:
        data_files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir is not None:
            data_files["validation"] = os.path.join(args.validation_dir, "**")
        dataset, source = load_dataset("imagefolder", data_files=data_files, cache_dir=args.cache_dir), args.train_dir
    elif args.dataset_name == DIGITS:
        dataset, source = load_digits_dataset(), "scikit-learn's bundled digits"
    else:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        source = args.dataset_name
    if "train" not in dataset:
        raise ValueError(f"The dataset {source} has no 'train' split; its splits are {list(dataset)}.")
    eval_split = "validation" if "validation" in dataset else "test"
    if eval_split not in dataset:
        if args.train_val_split == 0:
            raise ValueError(
                f"The dataset {source} has no validation or test split; pass --train_val_split > 0 (e.g. 0.15) to "
                "hold out part of train, or --validation_dir."
            )
        dataset = dataset["train"].train_test_split(args.train_val_split, seed=args.seed)
        eval_split = f"{args.train_val_split:.0%} of train held out"
    dataset = DatasetDict(
        {"train": dataset["train"], "validation": dataset["validation" if "validation" in dataset else "test"]}
    )
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=args.seed).select(range(min(limit, len(dataset[split]))))
    logger.info(
        f"Dataset {source}: {len(dataset['train'])} training, {len(dataset['validation'])} {eval_split} images"
    )
    return dataset, eval_split


def find_image_column(dataset: DatasetDict, requested: str | None) -> str:
    """The image column: `requested` (which must exist), else the first column of `Image` type."""
    features = dataset["train"].features
    if requested is not None and requested not in features:
        raise ValueError(
            f"--image_column_name {requested!r} is not a column of the dataset; its columns are {list(features)}."
        )
    found = requested or next((name for name, f in features.items() if isinstance(f, datasets.Image)), None)
    if found is None:
        raise ValueError(
            f"The dataset has no column of `Image` type among {list(features)}; pass --image_column_name."
        )
    return found


def find_label_column(dataset: DatasetDict, requested: str | None, *, required: bool) -> str | None:
    """The label column: `requested` (which must hold labels), else the first `ClassLabel` column, else
    'label(s)'. Labels are `ClassLabel`s, integers or strings."""
    features = dataset["train"].features

    def holds_labels(name: str) -> bool:
        feature = features[name]
        is_value = isinstance(feature, datasets.Value) and re.fullmatch(
            r"u?int\d+|bool|(large_)?string", feature.dtype
        )
        return isinstance(feature, ClassLabel) or bool(is_value)

    if requested is not None:
        if requested not in features:
            raise ValueError(
                f"--label_column_name {requested!r} is not a column of the dataset; its columns are {list(features)}."
            )
        if not holds_labels(requested):
            raise ValueError(
                f"--label_column_name {requested!r} holds {type(features[requested]).__name__} values, not class "
                f"labels; pass a column of class labels (ClassLabel, integers or strings) among {list(features)}."
            )
        return requested
    candidates = [n for n, f in features.items() if isinstance(f, ClassLabel)] + ["label", "labels"]
    found = next((name for name in candidates if name in features and holds_labels(name)), None)
    if found is None and required:
        raise ValueError(
            f"This script needs class labels, but the dataset has no label column (columns: {list(features)}). Pass "
            "--label_column_name, or give --train_dir an imagefolder with one subfolder per class."
        )
    return found


def label_names(dataset: DatasetDict, label_column: str) -> tuple[list[str], dict[Any, int] | None]:
    """Class names, and the map from raw label values to class ids when the column is not a `ClassLabel`."""
    feature = dataset["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    values = sorted(set(dataset["train"][label_column]) | set(dataset["validation"][label_column]))
    if len(values) < 2:
        raise ValueError(f"The label column {label_column!r} holds {len(values)} distinct value(s); need at least 2.")
    return [str(value) for value in values], {value: index for index, value in enumerate(values)}


class ImageDataset(torch.utils.data.Dataset):
    """One split as `(index, example)` pairs for `ImageGPTCollator`; the index seeds the example's crop and mask.

    Images are decoded here rather than inside `datasets`, so that an unreadable file (truncated, not an image) fails
    with its name and the fix, not with a bare PIL error in the middle of training.
    """

    def __init__(self, split: datasets.Dataset, image_column: str, columns: Sequence[str] | None = None):
        self.image_column, self.feature = image_column, split.features[image_column]
        split = split.select_columns(list(columns)) if columns is not None else split
        self.split = split.cast_column(image_column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, dict]]:
        rows = self.split[indices]  # {column: [values]}
        examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
        for index, example in zip(indices, examples):
            value = example[self.image_column]
            try:
                example[self.image_column] = self.feature.decode_example(value)
            except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
                raise ValueError(
                    f"Cannot read the image {value.get('path') or ''} (example {index} of the split): {err}. Remove or "
                    "replace that file, or leave it out of the dataset."
                ) from err
        return list(zip(indices, examples))


@dataclasses.dataclass
class ImageGPTCollator:
    """`(index, example)` pairs -> model inputs: `input_ids` (+ `labels`, + `bool_masked_pos`), or the normalized
    `pixel_values` (the raw-pixel baseline of the linear probe).

    Training batches get random crops of `random_crop_scale` (`ImageGPTImageProcessor(do_random_crop=True)`), the
    others the center crop. Crops and BERT masks are drawn from seeds of (seed, epoch, example indices), not from the
    global RNG, so a resumed run (or a DataLoader worker) draws exactly what an uninterrupted one does.
    """

    processor: ImageGPTImageProcessor
    image_column: str
    label_column: str | None = None
    label_map: dict[Any, int] | None = None  # raw label values -> class ids, for columns that are not `ClassLabel`s
    train: bool = False
    random_crop_scale: tuple[float, float] | None = None
    mask_prob: float | None = None
    seed: int = 0
    pixel_values: bool = False
    epoch: int = 0  # set it every epoch: new crops and masks
    indices: bool = False  # also return the examples' `indices` (what evaluation masks are seeded by)

    def __call__(self, examples: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        indices = [index for index, _ in examples]
        images = [example[self.image_column] for _, example in examples]
        seed = int(
            np.random.SeedSequence([self.seed, int(self.train), self.epoch * self.train, *indices]).generate_state(1)[
                0
            ]
        )
        batch = {"indices": torch.tensor(indices)} if self.indices else {}
        if self.label_column is not None:
            labels = [example[self.label_column] for _, example in examples]
            batch["labels"] = torch.tensor([self.label_map[x] for x in labels] if self.label_map else labels)
        n_px = processor_n_px(self.processor)
        # Shortest edge to n_px, then the center n_px x n_px (the plain resize on square images).
        center = {
            "size": {"shortest_edge": n_px},
            "do_center_crop": True,
            "crop_size": {"height": n_px, "width": n_px},
        }
        if self.pixel_values:
            pixels = self.processor(images, return_tensors="pt", do_color_quantize=False, **center)
            return {"pixel_values": pixels["pixel_values"].float(), **batch}
        if self.train and self.random_crop_scale is not None:
            # The processor draws crops from torch's global RNG: fork it, so training randomness elsewhere is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                crops = {"do_random_crop": True, "random_crop_scale": self.random_crop_scale}
                batch["input_ids"] = self.processor(images, return_tensors="pt", **crops)["input_ids"].long()
        else:
            batch["input_ids"] = self.processor(images, return_tensors="pt", **center)["input_ids"].long()
        if self.mask_prob is not None:
            generator = torch.Generator().manual_seed(seed + 1)
            batch["bool_masked_pos"] = random_bert_mask(batch["input_ids"].shape, self.mask_prob, generator=generator)
        return batch


def dataloader(
    split: datasets.Dataset, collator: ImageGPTCollator, args: argparse.Namespace, *, train: bool
) -> DataLoader:
    """Training: shuffled (seeded), --per_device_train_batch_size; else in order, --per_device_eval_batch_size."""
    columns = [c for c in (collator.image_column, collator.label_column) if c is not None]
    return DataLoader(
        ImageDataset(split, collator.image_column, columns),
        batch_size=args.per_device_train_batch_size if train else args.per_device_eval_batch_size,
        shuffle=train,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        # Only seeds worker processes; it keeps the iterator from drawing on the global RNG (see resume).
        generator=torch.Generator().manual_seed(args.seed) if train else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The paper's evaluation protocol: low-data label subsets and BERT mask ensembles (linear_probe.py, finetune.py)
# ---------------------------------------------------------------------------------------------------------------------


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation protocol")
    group.add_argument(
        "--num_labels_per_class",
        type=int,
        default=None,
        help="Train on N labelled images of every class, drawn by --seed (the paper's low-data subsets: CIFAR-10's "
        "40, 250 and 4,000 labels are 4, 25 and 400 per class). Default: the whole training split.",
    )
    group.add_argument(
        "--num_eval_masks",
        type=int,
        default=1,
        help="BERT models: evaluate every image under K random masks (--eval_mask_prob) and average the class "
        "probabilities; both the single-mask and the K-mask accuracy are reported. Default 1.",
    )
    group.add_argument(
        "--eval_mask_prob",
        type=float,
        default=0.0,
        help="BERT models: probability that a pixel is masked in each evaluation view (the paper's 0.15, the masked "
        "input distribution the model was trained on). Default 0: whole, unmasked images.",
    )


def check_evaluation_arguments(args: argparse.Namespace) -> None:
    if args.num_labels_per_class is not None and args.num_labels_per_class < 1:
        raise ValueError(f"--num_labels_per_class must be at least 1, got {args.num_labels_per_class}.")
    if args.num_eval_masks < 1:
        raise ValueError(f"--num_eval_masks must be at least 1, got {args.num_eval_masks}.")
    if not 0.0 <= args.eval_mask_prob < 1.0:
        raise ValueError(f"--eval_mask_prob must be in [0, 1), got {args.eval_mask_prob}.")
    if args.num_eval_masks > 1 and args.eval_mask_prob == 0:
        raise ValueError(
            f"--num_eval_masks {args.num_eval_masks} needs --eval_mask_prob > 0 (the paper's is 0.15): without "
            "masks every view is the same image."
        )


def check_eval_masks(args: argparse.Namespace, config: ImageGPTConfig) -> None:
    """Evaluation masks are for BERT models: an AR model never saw a masked pixel."""
    if args.eval_mask_prob > 0 and config.objective != "bert":
        raise ValueError(
            f"--eval_mask_prob {args.eval_mask_prob} masks pixels for BERT models, but {args.model_name_or_path} is "
            f"an {config.objective.upper()} model, trained on whole images; leave --eval_mask_prob at 0."
        )


def class_balanced_subset(
    split: datasets.Dataset,
    label_column: str,
    names: Sequence[str],
    label_map: dict[Any, int] | None,
    per_class: int,
    seed: int,
) -> datasets.Dataset:
    """`per_class` examples of every class of `split`, in the split's order: the first `per_class` of each class in
    one permutation drawn by `seed`, so that the subsets of one seed are nested (the 4 per class are among the 25)."""
    labels = split[label_column]
    labels = np.asarray([label_map[x] for x in labels] if label_map else labels, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen = []
    for class_id, name in enumerate(names):
        members = order[labels[order] == class_id]
        if len(members) < per_class:
            raise ValueError(
                f"--num_labels_per_class {per_class}: the class {name!r} has only {len(members)} training images. "
                "Pass a smaller --num_labels_per_class."
            )
        chosen.append(members[:per_class])
    return split.select(np.sort(np.concatenate(chosen)))


def evaluation_masks(indices: torch.Tensor, length: int, mask_prob: float, seed: int, view: int) -> torch.Tensor:
    """The `view`-th evaluation mask of each example, `(len(indices), length)`: drawn from a seed of (seed, view, the
    example's index), so that it is the same whatever the batch, the process or the run."""
    masks = []
    for index in indices.tolist():
        state = int(np.random.SeedSequence([seed, view, index]).generate_state(1)[0])
        masks.append(random_bert_mask((length,), mask_prob, generator=torch.Generator().manual_seed(state)))
    return torch.stack(masks)


def data_name(args: argparse.Namespace) -> str:
    """A human-readable name of the data."""
    if args.train_dir is not None:
        return f"the imagefolder {args.train_dir}"
    return "scikit-learn handwritten digits (8x8 scans)" if args.dataset_name == DIGITS else args.dataset_name


# ---------------------------------------------------------------------------------------------------------------------
# Trained models: config, processor, generation defaults
# ---------------------------------------------------------------------------------------------------------------------


def load_imagegpt_config(model_name_or_path: str) -> ImageGPTConfig:
    """The config of an Image GPT checkpoint; a clear error for anything else (a GPT-2, a ViT, a missing folder)."""
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
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
    side = processor.size.get("height") or processor.size.get("shortest_edge")
    if not side or processor.size.get("width", side) != side:
        raise ValueError(f"The processor's size {dict(processor.size)} is not a square n_px x n_px.")
    return int(side)


def check_n_px(n_px: int, config: ImageGPTConfig, source: str) -> None:
    """n_px must fit the model's learned positions; a smaller raster would read them in the wrong places."""
    if n_px < 1 or n_px > config.n_px:
        raise ValueError(
            f"--n_px {n_px} needs {n_px * n_px} positions but the model ({source}) has n_positions="
            f"{config.n_positions} (n_px {config.n_px}). Use 1 <= --n_px <= {config.n_px}."
        )
    if n_px < config.n_px:
        logger.warning(
            f"--n_px {n_px} < the model's {config.n_px}: rows will sit on positions learned for longer rows."
        )


def load_processor(name_or_path: str, n_px: int) -> ImageGPTImageProcessor | None:
    """The processor saved with a checkpoint (at `n_px`), or None when it has none or it holds no palette."""
    try:
        processor = ImageGPTImageProcessor.from_pretrained(name_or_path)
    except OSError:
        return None
    if processor.clusters is not None and processor_n_px(processor) != n_px:
        processor.size, processor.do_center_crop = {"height": n_px, "width": n_px}, False
    return processor if processor.clusters is not None else None


def checkpoint_processor(
    model_name_or_path: str, config: ImageGPTConfig, processor_name_or_path: str | None, n_px: int | None
) -> ImageGPTImageProcessor:
    """The processor of a trained model (its palette defines the model's token ids), at `n_px` or the model's."""
    source = processor_name_or_path or model_name_or_path
    n_px = config.n_px if n_px is None else n_px
    check_n_px(n_px, config, model_name_or_path)
    processor = load_processor(source, n_px)
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
    return processor


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------------


def optimizer_and_scheduler(
    args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, train_dataloader: DataLoader
) -> tuple[torch.optim.Optimizer, Any, int]:
    """AdamW (no weight decay on biases and norms), the --lr_scheduler_type schedule, and the number of optimizer
    steps: --max_train_steps, else --num_train_epochs of the *prepared* (per-process) training DataLoader."""
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch(args, train_dataloader)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2))
    # A prepared scheduler steps once per process for every optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler, max_train_steps


def steps_per_epoch(args: argparse.Namespace, train_dataloader: DataLoader) -> int:
    return -(-len(train_dataloader) // args.gradient_accumulation_steps)


def optimizer_step(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, clip: float
) -> None:
    """Clip the gradients to norm `clip` (unless 0), step, schedule, zero the gradients. Inside
    `accelerator.accumulate`, the prepared optimizer and scheduler skip the batches that only accumulate."""
    if accelerator.sync_gradients and clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and the bookkeeping of a training loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Position:
    """Where a training run stands: what a checkpoint records, and where a resumed run continues."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` consumed


def run_settings(args: argparse.Namespace, accelerator: Accelerator, script: str) -> dict[str, Any]:
    """What fixes a run's data order and schedule: a checkpoint resumes only into a run of the same settings."""
    names = ["per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs"]
    settings = {name: getattr(args, name) for name in names + ["max_train_samples", "seed"]}
    if hasattr(args, "num_labels_per_class"):  # a label subset is other data
        settings["num_labels_per_class"] = args.num_labels_per_class
    return {"script": script, "num_processes": accelerator.num_processes, **settings}


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (with their state file) under `output_dir/checkpoints`, oldest first, as (step, path)."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    names = [name for name in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"step_[0-9]+", name)]
    found = [(int(name[5:]), os.path.join(root, name)) for name in names]
    return sorted((step, path) for step, path in found if os.path.isfile(os.path.join(path, STATE_FILE)))


def read_checkpoint(path: str) -> tuple[Position, dict[str, Any]]:
    """A checkpoint's position and settings, once its files are found whole (cheaply: headers and zip directories).

    Raises ValueError naming what is broken: a state file that is not JSON or lacks fields, a truncated safetensors or
    torch file, a sharded (FSDP) folder without its metadata, no model weights at all.
    """
    try:
        state = json.loads(Path(path, STATE_FILE).read_text())
        position = Position(**{k: int(state[k]) for k in ("completed_steps", "epoch", "batches_in_epoch")})
        settings = dict(state["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"its {STATE_FILE} is unreadable ({type(err).__name__}: {err})") from None
    weights = False
    for folder, _, files in os.walk(path):
        if any(name.endswith(".distcp") for name in files) and ".metadata" not in files:
            raise ValueError(f"the sharded state {folder} has no .metadata file")
        for name in files:
            weights |= name.startswith(("model", "pytorch_model")) or name.endswith(".distcp")
            try:
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(folder, name), "pt"):
                        pass
                elif name.endswith((".bin", ".pkl", ".pt", ".pth")):  # torch.save's zip archives
                    zipfile.ZipFile(os.path.join(folder, name)).close()
            except Exception as err:  # safetensors raises its own error type
                raise ValueError(f"{os.path.join(folder, name)} is damaged ({type(err).__name__}: {err})") from None
    if not weights:
        raise ValueError("it holds no model weights")
    return position, settings


def find_checkpoint(args: argparse.Namespace, accelerator: Accelerator, script: str) -> tuple[str, Position] | None:
    """The checkpoint --resume_from_checkpoint names (a folder, or 'latest'), checked before anything is loaded;
    None for 'latest' when there is none yet. One that is broken (then the newest intact one before it is named),
    was written by another script or with other settings is refused."""
    if not args.resume_from_checkpoint:
        return None
    complete = checkpoint_dirs(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        if not complete:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet; starting anew")
            return None
        path = complete[-1][1]
    else:
        path = args.resume_from_checkpoint
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise ValueError(
                f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {STATE_FILE}); complete ones "
                f"are {[p for _, p in complete] or 'none'}."
            )
    try:
        position, settings = read_checkpoint(path)
    except ValueError as err:
        intact = None
        for _, earlier in reversed([c for c in complete if os.path.abspath(c[1]) != os.path.abspath(path)]):
            with contextlib.suppress(ValueError):
                intact = (read_checkpoint(earlier), earlier)[1]
                break
        offer = (
            f"The newest intact checkpoint before it is {intact}: resume from it with --resume_from_checkpoint "
            f"{intact}, and delete {path} so that 'latest' skips it."
            if intact
            else "No intact checkpoint precedes it: delete it to start anew."
        )
        raise ValueError(f"Cannot resume from the checkpoint {path}: {err}. {offer}") from None
    if settings.get("script") != script:
        raise ValueError(
            f"Cannot resume from {path}: it was written by {settings.get('script') or 'another script'}, not {script}; "
            "its weights and optimizer do not fit this script's model. To start this script from a trained model, "
            "pass the model's folder as --model_name_or_path and choose a new --output_dir."
        )
    changed = {
        k: (settings.get(k), v) for k, v in run_settings(args, accelerator, script).items() if settings.get(k) != v
    }
    if changed:
        raise ValueError(
            f"Cannot resume from {path}: it was written by a run with different settings "
            f"({', '.join(f'{k}: {then} then, {now} now' for k, (then, now) in changed.items())}); the data order "
            "and schedule would not continue where they stopped."
        )
    return path, position


class TrainingProgress:
    """The bookkeeping of a script's training loop, so that the loop itself stays in the script:

        progress = common.TrainingProgress(accelerator, args, SCRIPT, train_dataloader, max_train_steps, checkpoint)
        model.train()
        for batch in progress.batches(train_collator):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                common.optimizer_step(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm)
            if progress.step(lr_scheduler, train_loss=loss):  # True when an evaluation is due
                metrics = evaluate(...)
                progress.log(metrics)
        progress.close()

    It loads `checkpoint` (from `find_checkpoint`; create it once everything is prepared), hands out the batches of
    every epoch from where the run stands (a resumed run skips, without loading them, those it has seen), counts
    optimizer steps, logs the running training metrics every --logging_steps, saves a checkpoint when
    --checkpointing_steps falls due (with `save_also(folder)`, e.g. the processor), and says when --eval_steps (or,
    without it, the end of an epoch) asks for an evaluation.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        args: argparse.Namespace,
        script: str,
        train_dataloader: DataLoader,
        max_train_steps: int,
        checkpoint: tuple[str, Position] | None,
        save_also: Callable[[Path], Any] | None = None,
    ):
        self.accelerator, self.args, self.script, self.save_also = accelerator, args, script, save_also
        self.dataloader, self.max_train_steps = train_dataloader, max_train_steps
        self.num_train_epochs = -(-max_train_steps // steps_per_epoch(args, train_dataloader))
        self.running: dict[str, list[torch.Tensor]] = {}  # training metrics since the last log line
        self.position = Position()
        if checkpoint is not None:
            path, self.position = checkpoint
            try:
                accelerator.load_state(path)
            except Exception as err:  # whatever a damaged or foreign checkpoint raises inside Accelerate or torch
                raise ValueError(
                    f"Cannot resume from the checkpoint {path}: loading it failed ({type(err).__name__}: {err}). "
                    "Resume from an earlier checkpoint with --resume_from_checkpoint PATH, or delete it to start anew."
                ) from err
            logger.info(f"Resumed from checkpoint {path} at step {self.position.completed_steps}")
        if args.with_tracking:
            tracked = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()}
            tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in tracked.items()}
            accelerator.init_trackers(own_entries(script)[1], tracked)
        total = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(
            f"***** Running training: {len(train_dataloader.dataset)} examples, {self.num_train_epochs} epochs"
        )
        logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total}")
        logger.info(f"  Total optimization steps = {max_train_steps}")
        self.bar = progress_bar(
            accelerator, total=max_train_steps, initial=self.position.completed_steps, desc="train"
        )

    @property
    def finished(self) -> bool:
        return self.position.completed_steps >= self.max_train_steps

    def batches(self, collator: ImageGPTCollator) -> Iterator[dict[str, torch.Tensor]]:
        """Every batch from where the run stands to --max_train_steps, epoch after epoch."""
        start = self.position
        if start.batches_in_epoch >= len(self.dataloader):  # saved at the end of an epoch
            start = Position(start.completed_steps, start.epoch + 1, 0)
        for epoch in range(start.epoch, self.num_train_epochs):
            if self.finished:
                return
            collator.epoch = epoch  # new crops and masks every epoch, the same ones after a resume
            self.dataloader.set_epoch(epoch)
            seen = start.batches_in_epoch if epoch == start.epoch else 0
            self.position = Position(self.position.completed_steps, epoch, seen)
            for batch in self.accelerator.skip_first_batches(self.dataloader, seen) if seen else self.dataloader:
                self.position.batches_in_epoch += 1
                yield batch
                if self.finished:
                    return

    def step(self, lr_scheduler: Any, **metrics: torch.Tensor) -> bool:
        """After every batch, with its training metrics: counts an optimizer step (none while gradients accumulate),
        logs and checkpoints when due; returns whether an evaluation is due."""
        for name, value in metrics.items():
            self.running.setdefault(name, []).append(value.detach().float())
        if not self.accelerator.sync_gradients:
            return False
        self.position.completed_steps += 1
        step, every = self.position.completed_steps, self.args.checkpointing_steps
        self.bar.update(1)
        if step % self.args.logging_steps == 0 or self.finished:
            logged = {
                k: self.accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in self.running.items()
            }
            self.running.clear()
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in logged.items()})
            self.log({**logged, "lr": lr_scheduler.get_last_lr()[0], "epoch": self.position.epoch})
        end_of_epoch = self.position.batches_in_epoch >= len(self.dataloader) or self.finished
        if (every == "epoch" and end_of_epoch) or (every not in (None, "epoch") and step % int(every) == 0):
            self.save_checkpoint()
        if self.args.eval_steps is None:
            return end_of_epoch
        return step % self.args.eval_steps == 0 or self.finished

    def log(self, metrics: dict[str, float]) -> None:
        """Metrics to the log (and the trackers), at the current step."""
        step = self.position.completed_steps
        logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self.args.with_tracking:
            self.accelerator.log(metrics, step=step)

    def save_checkpoint(self) -> None:
        """`accelerator.save_state` (+ `save_also`, then the state file) to `output_dir/checkpoints/step_N`: staged
        and renamed into place when complete, so a crash never leaves a broken `step_N`. Then checkpoints of later
        steps (from before a resume to an earlier one) and those over --checkpoints_total_limit are removed."""
        accelerator, args, step = self.accelerator, self.args, self.position.completed_steps
        final = os.path.join(args.output_dir, CHECKPOINTS_DIR, f"step_{step}")
        staging = [str(staging_path(final)) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(staging)  # every process writes its part of the state into the same folder
        writing = staged_dir(final, overwrite=True, staging=staging[0])
        with writing if accelerator.is_main_process else contextlib.nullcontext(Path(staging[0])) as tmp:
            accelerator.wait_for_everyone()  # the staging folder exists
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if self.save_also is not None:
                    self.save_also(tmp)
                state = {**dataclasses.asdict(self.position), "config": run_settings(args, accelerator, self.script)}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if accelerator.is_main_process:
            found = checkpoint_dirs(args.output_dir)
            stale = [path for s, path in found if s > step]
            if args.checkpoints_total_limit is not None:
                stale += [path for s, path in found if s <= step][: -args.checkpoints_total_limit]
            for path in stale:
                shutil.rmtree(path)
        accelerator.wait_for_everyone()
        logger.info(f"Saved checkpoint {final}")

    def close(self) -> None:
        self.bar.close()
        if self.args.with_tracking:
            self.accelerator.end_training()


# ---------------------------------------------------------------------------------------------------------------------
# The output folder of a training run: checked before any work, written at the end
# ---------------------------------------------------------------------------------------------------------------------


def inputs(args: argparse.Namespace) -> list[str | None]:
    """What a script reads, which its output may not be, hold or lie in (a Hub id is not a path and is skipped)."""
    names = (
        "model_name_or_path",
        "config_name",
        "processor_name_or_path",
        "train_dir",
        "validation_dir",
        "dataset_name",
    )
    return [getattr(args, name, None) for name in names]


def own_entries(script: str) -> list[str]:
    """What a training run keeps in its --output_dir besides the model: checkpoints, tracker logs (--with_tracking)."""
    return [CHECKPOINTS_DIR, f"image_gpt_{script.removesuffix('.py')}"]


def check_output_dir(accelerator: Accelerator, args: argparse.Namespace, script: str) -> None:
    """Refuse, before any work, an --output_dir that is, holds or lies in one of the script's inputs, or that holds
    anything but this run's checkpoints (unless --overwrite). With --overwrite and no resume, an earlier run's
    checkpoints are cleared, so that they never mix with this run's."""
    resuming = args.resume_from_checkpoint is not None
    keep = own_entries(script) if resuming else ()
    check_output_path(args.output_dir, inputs=inputs(args), overwrite=args.overwrite, keep=keep)
    accelerator.wait_for_everyone()
    if args.overwrite and not resuming and accelerator.is_main_process:
        for name in own_entries(script):
            if os.path.isdir(os.path.join(args.output_dir, name)):
                logger.warning(f"--overwrite: deleting {os.path.join(args.output_dir, name)} of an earlier run")
                shutil.rmtree(os.path.join(args.output_dir, name))
    accelerator.wait_for_everyone()


def save_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor: ImageGPTImageProcessor,
    args: argparse.Namespace,
    script: str,
    *,
    trained: str,
    split: str,
    result: dict[str, Any],
    results: dict[str, float],
) -> None:
    """The final model folder: weights + config (+ remote code), processor, generation config (models with an AR
    head), model card and all_results.json (`results`), staged and renamed into --output_dir (its checkpoints stay);
    then the Hub upload with --push_to_hub. It loads with `AutoModel*.from_pretrained` and `AutoImageProcessor`.

    The model card says how it was `trained` ("Pretrained from scratch with ..., 300 steps") and its measured
    `result` (metric, name, value) on the evaluation `split`.
    """
    config, dataset = (
        accelerator.unwrap_model(model).config,
        args.dataset_name if args.train_dir is None else "imagefolder",
    )
    if isinstance(accelerator.unwrap_model(model), ImageGPTForImageClassification):
        task = "image-classification"
    else:
        task = "unconditional-image-generation" if config.objective == "ar" else "masked-image-modeling"
    batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    facts = {
        "training": f"{trained} on {data_name(args)} in batches of {batch_size} images, AdamW at peak learning rate "
        f"{args.learning_rate:g} ({args.lr_scheduler_type.value} schedule), seed {args.seed}.",
        "datasets": [args.dataset_name] if dataset not in (DIGITS, "imagefolder") else [],
        "results": [
            {
                "task": task,
                "dataset": dataset,
                "dataset_name": data_name(args),
                "split": split,
                **result,
                "value": round(result["value"], 4),
            }
        ],
    }
    if args.model_name_or_path is None:
        facts["license"] = "mit"
    elif not os.path.isdir(args.model_name_or_path):
        facts["base_model"] = args.model_name_or_path
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every process: gathers sharded (FSDP) weights
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with staged_dir(
            args.output_dir, overwrite=args.overwrite, keep=own_entries(script), inputs=inputs(args)
        ) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            if unwrapped.config.objective == "ar" and hasattr(unwrapped, "lm_head"):
                openai_generation_config(unwrapped.config).save_pretrained(tmp)
            write_model_card(tmp, unwrapped, processor=processor, facts=facts)
            (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        logger.info(f"Saved the model to {args.output_dir}")
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
            ignore = [f"{name}/*" for name in own_entries(script)] + [".*"]
            api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=ignore)
            logger.info(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
