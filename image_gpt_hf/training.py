"""What training and evaluation scripts built on Accelerate reuse (needs the `examples` extra: accelerate, datasets):
`load_image_dataset` (an image dataset with a held-out split), `class_labels` and `class_balanced_subset` (the paper's
low-data subsets), and `TrainingRun` (the resumable state of a run: its position and the contract a resume must
match, in accelerate's own numbered checkpoints)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from .data import load_digits

DIGITS = "sklearn-digits"  # scikit-learn's 1,797 8x8 handwritten digits (image_gpt_hf.load_digits): no download
STATE = "custom_checkpoint_0.pkl"  # the TrainingRun, the last file that `save_state` writes
logger = logging.getLogger(__name__)


def load_image_dataset(
    dataset_name: str = DIGITS,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    *,
    train_val_split: float = 0.15,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    image_column_name: str | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, str, str]:
    """Loads a `datasets` image dataset, an imagefolder (`train_dir`, `validation_dir`) or the bundled digits
    (`DIGITS`), and returns its "train" and "validation" splits (the dataset's validation or test split, else
    `train_val_split` of train held out, drawn by `seed`), each limited to `max_*_samples` seeded examples; the name of
    the evaluation split; and the image column (default: the first of `Image` type). Decode with `decode_images`.
    The parameters are named as the scripts' flags: `load_image_dataset(**flags)`."""
    source = train_dir or dataset_name
    if validation_dir and not train_dir:
        raise ValueError("--validation_dir needs a --train_dir to go with it.")
    if train_dir is not None:
        files = {"train": train_dir, "validation": validation_dir}
        files = {split: os.path.join(folder, "**") for split, folder in files.items() if folder}
        dataset = datasets.load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
    elif dataset_name == DIGITS:
        dataset = load_digits()
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if "train" not in dataset:
        raise ValueError(f"The dataset {source} has no 'train' split; its splits are {list(dataset)}.")
    eval_split = next((name for name in ("validation", "test") if name in dataset), None)
    if eval_split is None:
        if train_val_split == 0:
            raise ValueError(f"The dataset {source} has no evaluation split; pass --train_val_split > 0.")
        dataset = dataset["train"].train_test_split(train_val_split, seed=seed)
        held_out, eval_split = dataset["test"], f"{train_val_split:.0%} of train held out"
    else:
        held_out = dataset[eval_split]
    dataset = datasets.DatasetDict({"train": dataset["train"], "validation": held_out})
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(min(limit, len(dataset[split]))))
    logger.info(
        f"Dataset {source}: {len(dataset['train'])} training, {len(dataset['validation'])} {eval_split} images"
    )
    features = dataset["train"].features
    if image_column_name not in (None, *features):
        raise ValueError(f"--image_column_name {image_column_name!r} is not a column; the columns: {list(features)}.")
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not (image_column := image_column_name or next(iter(images), None)):
        raise ValueError(f"The dataset has no `Image` column among {list(features)}; pass --image_column_name.")
    return dataset, eval_split, image_column


def decode_images(values: list) -> list[PIL.Image.Image]:
    """The images of an undecoded `Image` column's values (`cast_column(name, Image(decode=False))`), an unreadable
    file named."""
    images = []
    for value in values:
        try:
            images.append(datasets.Image().decode_example(value))
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
            path = value.get("path") or ""
            raise ValueError(f"Cannot read the image {path}: {err}. Remove or replace that file.") from err
    return images


def dataset_fingerprint(split: datasets.Dataset, columns: list[str]) -> str:
    """A digest of every example's bytes: the image files of `columns[0]`, then the values of the other columns."""
    split, digest = (
        split.select_columns(columns).cast_column(columns[0], datasets.Image(decode=False)),
        hashlib.sha256(),
    )
    for batch in split.iter(batch_size=256):
        for image in batch[columns[0]]:
            digest.update(hashlib.sha256(image["bytes"] or Path(image["path"]).read_bytes()).digest())
        digest.update(json.dumps([batch[column] for column in columns[1:]], default=str).encode())
    return digest.hexdigest()[:16]


def checkpoints(folder: str | Path, complete: bool = True) -> list[str]:
    """The (complete) `checkpoint_N` folders that accelerate's automatic naming wrote in `folder`, oldest first."""
    names = [n for n in os.listdir(folder) if re.fullmatch(r"checkpoint_[0-9]+", n)] if os.path.isdir(folder) else []
    paths = [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[11:]))]
    return [path for path in paths if os.path.isfile(os.path.join(path, STATE)) or not complete]


class TrainingRun(dict):
    """The resumable state of a run: `completed_steps`, `epoch`, `seen` (batches of that epoch), the `contract` (what
    defines the run, which a resume must match) and any `extra` values; it registers itself with
    `accelerator.register_for_checkpointing`, so `save_state` / `load_state` carry it.

    The contract holds `script`, the `config` (but for names and versions), `flags`, the precision, the process count,
    the `processor`'s palette and, with `fingerprint=True` (a run that checkpoints or resumes), `dataset_fingerprint`
    of `data` (a split and its columns, the images first), read on the main process."""

    state_dict, load_state_dict = dict.copy, dict.update

    def __init__(
        self, accelerator, script: str, config, processor, flags: dict, data=None, fingerprint=False, **extra
    ):
        skip = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")
        contract = {"script": script} | {f"config.{k}": v for k, v in config.to_dict().items() if k not in skip}
        for name, value in flags.items():
            contract[name] = os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value
        contract |= {"mixed precision": accelerator.mixed_precision, "processes": accelerator.num_processes}
        contract["palette"] = hashlib.sha256(torch.tensor(processor.clusters).float().numpy().tobytes()).hexdigest()[
            :16
        ]
        found = [dataset_fingerprint(*data) if data and fingerprint and accelerator.is_main_process else None]
        contract["training data (fingerprint of its bytes)"] = broadcast_object_list(found)[0] if data else None
        contract = json.loads(json.dumps(contract, default=str))
        super().__init__(contract=contract, completed_steps=0, epoch=0, seen=0, **extra)
        self.accelerator = accelerator
        accelerator.register_for_checkpointing(self)

    @staticmethod
    def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str, inputs: list) -> str | None:
        """The checkpoint to resume: a complete checkpoint folder, or for 'latest' the newest in output_dir; appended
        to `inputs` (the paths that output_dir may not replace) unless it is one of output_dir's own."""
        path = resume_from_checkpoint
        if path == "latest":
            return next(reversed(checkpoints(os.path.join(output_dir, "checkpoints"))), None)
        if path and not os.path.isfile(os.path.join(path, STATE)):
            held = checkpoints(path)
            name_one = f"; it holds {held}: name one, e.g. --resume_from_checkpoint {held[-1]}" if held else ""
            raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {STATE}){name_one}.")
        own = os.path.realpath(os.path.join(output_dir, "checkpoints"))
        inputs.extend([path] if path and os.path.realpath(Path(path).absolute().parent) != own else [])
        return path

    @staticmethod
    def saved(checkpoint: str) -> dict:
        """The TrainingRun that `checkpoint` holds, as a dict."""
        return torch.load(os.path.join(checkpoint, STATE), weights_only=True)

    def start(self, output_dir: str, checkpoint: str | None, overwrite: bool, clear: tuple[str, ...] = ()) -> FileLock:
        """Refuses a checkpoint of another script, of another run (each difference named) or with files missing;
        then takes the lock of `output_dir` (hold it to the end: one run per folder) and, with `overwrite` and no
        checkpoint, deletes the earlier run's checkpoints and the folders in `clear`."""
        if checkpoint is not None:
            then, now = self.saved(checkpoint)["contract"], self["contract"]
            if then["script"] != now["script"]:
                raise ValueError(f"{checkpoint} is a checkpoint of {then['script']}: resume it with that script.")
            differ = [
                f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                for k in sorted(then | now)
                if then.get(k) != now.get(k)
            ]
            if differ:
                raise ValueError(
                    f"Cannot resume from {checkpoint}: this run differs from the one that wrote it in {'; '.join(differ)}. "
                    "To continue that run, pass its settings again; to train with the new ones, start a new run (another "
                    "--output_dir, or --overwrite without --resume_from_checkpoint, which deletes its checkpoints)."
                )
            needed = [f"random_states_{i}.pkl" for i in range(self.accelerator.num_processes)]
            needed += (
                [] if Path(checkpoint, "pytorch_model_fsdp_0").is_dir() else ["model.safetensors"]
            )  # FSDP: shards
            if missing := [name for name in needed if not Path(checkpoint, name).is_file()]:
                raise ValueError(
                    f"Cannot resume from {checkpoint}: its {', '.join(missing)} is missing, and without it the run would "
                    "not go on as it was. Resume from another checkpoint, or start anew."
                )
        lock = FileLock(os.path.join(output_dir, ".lock"))
        if self.accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ValueError(f"Another run is writing to --output_dir {output_dir}: wait for it to end.") from None
            for name in ("checkpoints", *clear) if overwrite and not checkpoint else ():
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return lock

    def resume(self, checkpoint: str | None, batches_per_epoch: int) -> None:
        """`load_state`: weights, optimizer, schedule, random states and this run's position; checkpoints numbered
        after it (from before this resume) are replaced by this run's."""
        if checkpoint is None:
            return
        try:
            self.accelerator.load_state(checkpoint)
        except Exception as err:  # whatever a damaged checkpoint raises inside accelerate or torch
            raise ValueError(f"Cannot resume from the checkpoint {checkpoint}: loading it failed ({err}).") from err
        number = re.findall(r"\d+", Path(checkpoint).name)  # the next checkpoint's, after accelerate's naming
        self.accelerator.project_configuration.iteration = int(number[-1]) + 1 if number else 0
        if self["seen"] >= batches_per_epoch:  # saved at the end of an epoch
            self.update(epoch=self["epoch"] + 1, seen=0)
        logger.info(f"Resumed from checkpoint {checkpoint} at step {self['completed_steps']}")

    def save(self, **position) -> None:
        """`save_state` into the next checkpoint_N (one of that number or later, from before a resume or cut short,
        goes first), with `position`; a full disk is reported with the file being written and the space left."""
        accelerator = self.accelerator
        root = Path(accelerator.project_configuration.project_dir, "checkpoints")
        folder = root / f"checkpoint_{accelerator.save_iteration}"
        for stale in checkpoints(root, complete=False) if accelerator.is_main_process else []:
            if int(Path(stale).name[11:]) >= accelerator.save_iteration:
                shutil.rmtree(stale)
        accelerator.wait_for_everyone()
        self.update(position)
        try:
            accelerator.save_state()
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its writer
            newest = max(folder.rglob("*"), key=lambda p: p.stat().st_mtime_ns, default=folder).name
            free = shutil.disk_usage(root).free / 2**20
            shutil.rmtree(folder, ignore_errors=True)
            raise OSError(
                f"Saving the checkpoint {folder} failed while writing {newest}, with {free:.1f} MiB free on that disk "
                f"({err}). Free some space or choose another --output_dir, and resume with --resume_from_checkpoint "
                "latest."
            ) from err


def class_labels(dataset: datasets.DatasetDict, label_column_name: str | None = None) -> tuple[str, list, dict | None]:
    """The label column of `dataset` (default: the first `ClassLabel`, else "label" or "labels"), its class names, and
    the map from raw values (integers or strings) to class ids (None for a `ClassLabel`, whose values are the ids)."""
    features = dataset["train"].features
    if label_column_name not in (None, *features):
        raise ValueError(f"--label_column_name {label_column_name!r} is not a column; the columns: {list(features)}.")
    labelled = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if (
        column := label_column_name or next((n for n in [*labelled, "label", "labels"] if n in features), None)
    ) is None:
        raise ValueError(  # (as for an imagefolder of a single class subfolder)
            f"This script needs class labels, but the dataset has no label column (columns: {list(features)}). Pass "
            "--label_column_name, or give --train_dir an imagefolder with one subfolder per class (two at least)."
        )
    if isinstance(feature := features[column], datasets.ClassLabel):
        names, ids = list(feature.names), None
    elif isinstance(feature, datasets.Value) and re.fullmatch(r"u?int\d+|bool|(large_)?string", feature.dtype):
        values = sorted(set().union(*(split[column] for split in dataset.values())))
        names, ids = [str(value) for value in values], {value: index for index, value in enumerate(values)}
    else:
        raise ValueError(
            f"--label_column_name {column!r} holds {type(feature).__name__} values, not class labels; pass a column of "
            f"class labels (ClassLabel, integers or strings) among {list(features)}."
        )
    if len(set(dataset["train"][column])) < 2:
        raise ValueError("The training data hold one class: a classifier needs at least two (--label_column_name).")
    return column, names, ids


def class_balanced_subset(labels: np.ndarray, names: list[str], n: int, seed: int) -> np.ndarray:
    """The rows of n examples of every class (class ids `labels`, class `names`), in the split's order: the first n
    of each class in one permutation drawn by `seed`, so that the subsets of one seed are nested (4 per class are
    among the 25), as in the paper's low-data evaluation."""
    order, chosen = np.random.default_rng(seed).permutation(len(labels)), []
    for class_id, name in enumerate(names):
        if len(members := order[labels[order] == class_id]) < n:
            raise ValueError(
                f"--num_labels_per_class {n}: the class {name!r} has only {len(members)} training images. Pass a "
                "smaller --num_labels_per_class."
            )
        chosen.append(members[:n])
    return np.sort(np.concatenate(chosen))
