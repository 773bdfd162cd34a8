"""The feature store of linear_probe.py and its torch probe: features on disk, written as batches arrive and resumable
after a kill, and a logistic-regression probe in torch that reads them in chunks.

    python examples/linear_probe.py --model_name_or_path igpt-l --feature_dir features/ --probe torch ...

The store (`--feature_dir`) is one folder:

    features.json                            what the features are: the data (splits, sizes, labels, a digest of the
                                             images' contents, palette, masks) and, per feature set, the model (a
                                             digest of its weights) and the layers; a store is reused only by runs of
                                             the same settings on the same pixels
    <set>/<part>/shard-<r>-of-<P>/           process r of P: the rows [r*N/P, (r+1)*N/P) of the part, in dataset order
        layer<l>.npy | pixels.npy            (rows, width) float32, one file per layer (or the raw pixels)
        labels.npy                           (rows,) int64
        progress.json                        the rows written so far: written after them, so a process killed at any
                                             point resumes after its last complete batch

`<set>` is `pretrained`, `random_init` or `raw_pixels`; `<part>` is `train`, `validation` or `validation-mask<k>`
(the k-th view of a BERT mask ensemble). Rows are written with plain file writes, not memory maps, so a process holds
one batch of features whatever the size of the dataset, and reads them back a chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from image_gpt_hf.safe_io import atomic_file

logger = get_logger(__name__)

SETTINGS_FILE = "features.json"
PROGRESS_FILE = "progress.json"
SHARD = re.compile(r"shard-(\d+)-of-(\d+)")
Compute = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # a batch -> {feature name: (B, width)}


def digest(arrays: Iterable[np.ndarray | torch.Tensor]) -> str:
    """A short content hash of arrays, tensors or bytes (model weights, labels, a palette, image files)."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()
        h.update(array if isinstance(array, bytes) else np.ascontiguousarray(array).view(np.uint8).data)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    """A file of the store, or an error that names it and says how to recover (a kill can leave nothing half-written,
    but a disk or a hand can)."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(
            f"{path} is damaged ({err}): delete {path.parent} and run again to extract it anew."
        ) from None


def write_json(path: Path, value: Any) -> None:
    """Whole or not at all (`safe_io.atomic_file`: staged beside the target, renamed over it)."""
    with atomic_file(path, overwrite=True, arg=str(path)) as tmp:
        tmp.write_text(json.dumps(value, indent=2))


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


class FeatureStore:
    """A feature folder. Every process opens it with the same settings and takes the same decisions; only the main
    process writes `features.json` or deletes, and the caller waits for every process after `prepare`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def prepare(self, data: dict[str, Any], sets: dict[str, dict[str, Any]], *, overwrite: bool, main: bool) -> None:
        """Refuses a store of other data, or a feature set of other settings, unless `overwrite` (which replaces the
        store, or that set alone), and records the settings of what is new. A store of the same settings is reused
        as it stands, complete or not: it holds what this run would compute."""
        path = self.root / SETTINGS_FILE
        recorded = read_json(path) if path.is_file() else None
        entries = set(os.listdir(self.root)) if self.root.is_dir() else set()
        foreign = entries - {SETTINGS_FILE} - set(recorded["sets"] if recorded else ())
        if recorded is not None and recorded["data"] != data:
            changed = sorted(k for k in set(data) | set(recorded["data"]) if recorded["data"].get(k) != data.get(k))
            if not overwrite:
                raise ValueError(
                    f"--feature_dir {self.root} holds features of other data (their {', '.join(changed)} differ "
                    "from this run's). Choose another --feature_dir, or pass --overwrite to replace them."
                )
            recorded, foreign = None, entries
        if foreign:  # not a store, or another one: check_output_path refused it already unless --overwrite
            if not overwrite:
                raise ValueError(f"--feature_dir {self.root} holds {sorted(foreign)}, which are not features.")
            if main:
                for entry in entries:
                    remove(self.root / entry)
            recorded = None
        recorded = recorded or {"data": data, "sets": {}}
        for name, settings in sets.items():
            before = recorded["sets"].get(name)
            if before is not None and before != settings:
                changed = sorted(k for k in set(settings) | set(before) if before.get(k) != settings.get(k))
                if not overwrite:
                    raise ValueError(
                        f"--feature_dir {self.root} holds {name} features of other settings (their "
                        f"{', '.join(changed)} differ from this run's). Choose another --feature_dir, or pass "
                        "--overwrite to replace them."
                    )
                if main:
                    remove(self.root / name)
            recorded["sets"][name] = settings
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(path, recorded)

    def part(self, name: str, part: str) -> Path:
        return self.root / name / part

    def shard_counts(self, name: str, part: str) -> set[int]:
        """The numbers of processes that have written shards of a part."""
        folder = self.part(name, part)
        found = [SHARD.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
        return {int(m.group(2)) for m in found if m}

    def complete(self, name: str, part: str) -> bool:
        counts = self.shard_counts(name, part)
        if len(counts) != 1:
            return False
        count = counts.pop()
        shards = [self.part(name, part) / f"shard-{rank}-of-{count}" for rank in range(count)]
        return all(ShardWriter.progress(shard) == ShardWriter.capacity(shard) for shard in shards)

    def writer(self, name: str, part: str, num_rows: int, rank: int, num_processes: int) -> ShardWriter:
        """This process's shard of a part: the rows [rank*N/P, (rank+1)*N/P); resumed where it stopped."""
        start, stop = num_rows * rank // num_processes, num_rows * (rank + 1) // num_processes
        return ShardWriter(self.part(name, part) / f"shard-{rank}-of-{num_processes}", start, stop)

    def features(self, name: str, part: str) -> DiskFeatures:
        return DiskFeatures(self.part(name, part))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except ValueError as err:
            raise ValueError(
                f"{path} is damaged ({err}): delete {path.parent} and run again to extract it anew."
            ) from None
        return shape, dtype, f.tell()


class ShardWriter:
    """One process's rows of one part: `write` puts a batch after the rows already there; `done` says how many."""

    def __init__(self, folder: Path, start: int, stop: int):
        self.folder, self.start, self.rows = folder, start, stop - start
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / PROGRESS_FILE).is_file():
            write_json(folder / PROGRESS_FILE, {"start": start, "rows": self.rows, "done": 0})
        recorded = read_json(folder / PROGRESS_FILE)
        if (recorded["start"], recorded["rows"]) != (start, self.rows):
            raise ValueError(f"{folder} holds rows {recorded['start']}.. of another split of the data.")
        self.done = recorded["done"]
        self.files: dict[str, Any] = {}

    @staticmethod
    def progress(folder: Path) -> int:
        path = folder / PROGRESS_FILE
        return read_json(path)["done"] if path.is_file() else -1

    @staticmethod
    def capacity(folder: Path) -> int:
        path = folder / PROGRESS_FILE
        return read_json(path)["rows"] if path.is_file() else -2

    def _file(self, name: str, array: np.ndarray) -> tuple[Any, int]:
        if name not in self.files:
            path = self.folder / f"{name}.npy"
            shape = (self.rows, *array.shape[1:])
            if not path.is_file():  # the header of the whole shard, then rows as they come (a sparse file)
                with open(path, "wb") as f:
                    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
                    np.lib.format.write_array_header_1_0(f, {**header, "shape": shape})
                    f.truncate(f.tell() + math.prod(shape) * array.dtype.itemsize)
            found, dtype, offset = npy_header(path)
            if found != shape or dtype != array.dtype:
                raise ValueError(f"{path} holds {dtype} {found}, not {array.dtype} {shape}: another store's file.")
            self.files[name] = (open(path, "r+b"), offset)
        return self.files[name]

    def write(self, features: dict[str, np.ndarray], labels: np.ndarray) -> None:
        arrays = {**{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in features.items()}}
        arrays["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
        count = len(arrays["labels"])
        if self.done + count > self.rows:
            raise ValueError(f"{self.folder}: {self.done} + {count} rows is more than the shard's {self.rows}.")
        for name, array in arrays.items():
            f, offset = self._file(name, array)
            f.seek(offset + self.done * (array.nbytes // count))
            f.write(array.data)
            f.flush()  # to the operating system before the progress says so: a killed process loses no counted row
        self.done += count
        write_json(self.folder / PROGRESS_FILE, {"start": self.start, "rows": self.rows, "done": self.done})

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()
        self.files.clear()


@torch.no_grad()
def features_to_disk(
    accelerator: Accelerator, store: FeatureStore, name: str, part: str, dataset: Dataset, compute: Compute, *,
    collate_fn: Callable[[list], dict[str, torch.Tensor]], batch_size: int, num_workers: int = 0, overwrite: bool = False
) -> DiskFeatures | None:  # fmt: skip
    """Streams `compute(batch)` (`{feature name: (B, width)}`) of this process's rows of `dataset` (batched by
    `collate_fn`, which gives `labels`) to its shard of `store/name/part`, after the rows already there; returns the
    whole part on the main process."""
    rank, processes = accelerator.process_index, accelerator.num_processes
    if not store.complete(name, part):
        others = store.shard_counts(name, part) - {processes}
        if others:  # begun by another number of processes: its shards cover other rows
            if not overwrite:
                raise ValueError(
                    f"{store.part(name, part)} was begun by {others.pop()} processes; finish it with as many, or "
                    "pass --overwrite to extract it anew."
                )
            if accelerator.is_main_process:
                remove(store.part(name, part))
            accelerator.wait_for_everyone()
        writer = store.writer(name, part, len(dataset), rank, processes)
        if writer.done:
            logger.info(
                f"{name} {part}: resuming after {writer.done} of {writer.rows} rows on disk (process {rank})",
                main_process_only=False,
            )
        rows = Subset(dataset, range(writer.start + writer.done, writer.start + writer.rows))
        loader = DataLoader(rows, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)
        for batch in tqdm(loader, desc=f"{name} ({part})", leave=False, disable=not accelerator.is_local_main_process):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            features = {key: value.float().cpu().numpy() for key, value in compute(batch).items()}
            writer.write(features, batch["labels"].cpu().numpy())
        writer.close()
    accelerator.wait_for_everyone()
    return store.features(name, part) if accelerator.is_main_process else None


@torch.no_grad()
def features_in_memory(
    accelerator: Accelerator, desc: str, dataset: Dataset, compute: Compute, **loader
) -> ArrayFeatures:
    """`compute(batch)` of every row of `dataset` (DataLoader options `loader`), gathered from every process."""
    found: dict[str, list[np.ndarray]] = {}
    batches = accelerator.prepare(DataLoader(dataset, **loader))
    for batch in tqdm(batches, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        batch = accelerator.gather_for_metrics({**compute(batch), "labels": batch["labels"]})
        for key, value in batch.items():
            found.setdefault(key, []).append(value.cpu().numpy())
    arrays = {key: np.concatenate(values) for key, values in found.items()}
    return ArrayFeatures(arrays, arrays.pop("labels"))


# ---------------------------------------------------------------------------------------------------------------------
# Reading: features in memory or on disk, by chunks of rows
# ---------------------------------------------------------------------------------------------------------------------


class ArrayFeatures:
    """Features held in memory: `arrays[name]` is `(N, width)`, `labels` is `(N,)`."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray):
        self.arrays, self.labels = arrays, np.asarray(labels)

    def load(self, names: Sequence[str]) -> np.ndarray:
        """`(N, sum of widths)`: the named features side by side (the array itself for one name)."""
        if len(names) == 1:
            return self.arrays[names[0]]
        return np.concatenate([self.arrays[name] for name in names], axis=1)

    def chunks(self, names: Sequence[str], chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """`(first row, (rows, sum of widths))` for consecutive chunks of at most `chunk_size` rows."""
        for start in range(0, len(self.labels), chunk_size):
            yield start, np.concatenate([self.arrays[n][start : start + chunk_size] for n in names], axis=1)


class DiskFeatures:
    """A complete part of a feature store, read a chunk of rows at a time (in dataset order)."""

    def __init__(self, folder: Path):
        shards = [(SHARD.fullmatch(p.name), p) for p in folder.iterdir()] if folder.is_dir() else []
        shards = sorted((int(m.group(1)), int(m.group(2)), p) for m, p in shards if m)
        counts = {count for _, count, _ in shards}
        if len(counts) != 1 or [rank for rank, _, _ in shards] != list(range(counts.pop())):
            raise ValueError(f"{folder} does not hold one complete set of shards: {[p.name for *_, p in shards]}")
        for *_, shard in shards:
            if ShardWriter.progress(shard) != ShardWriter.capacity(shard):
                raise ValueError(f"{shard} is incomplete: run the extraction again to finish it.")
        self.shards = [shard for *_, shard in shards if ShardWriter.capacity(shard) > 0]  # more processes than rows
        self.headers: dict[Path, tuple[tuple[int, ...], np.dtype, int]] = {}
        self.labels = np.concatenate([self._rows(shard, "labels", 0, None) for shard in self.shards])

    def _rows(self, shard: Path, name: str, start: int, stop: int | None) -> np.ndarray:
        path = shard / f"{name}.npy"
        if path not in self.headers:
            self.headers[path] = npy_header(path)
        shape, dtype, offset = self.headers[path]
        stop = shape[0] if stop is None else min(stop, shape[0])
        width = math.prod(shape[1:])
        with open(path, "rb") as f:
            f.seek(offset + start * width * dtype.itemsize)
            data = np.fromfile(f, dtype=dtype, count=(stop - start) * width)
        if data.size != (stop - start) * width:  # cut short after it was complete
            raise ValueError(f"{path} is shorter than its rows: delete {shard} and run again to extract it anew.")
        return data.reshape(stop - start, *shape[1:])

    def load(self, names: Sequence[str]) -> np.ndarray:
        return np.concatenate([chunk for _, chunk in self.chunks(names, len(self.labels) or 1)])

    def chunks(self, names: Sequence[str], chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
        first = 0
        for shard in self.shards:
            rows = ShardWriter.capacity(shard)
            for start in range(0, rows, chunk_size):
                parts = [self._rows(shard, name, start, start + chunk_size) for name in names]
                yield first + start, np.concatenate(parts, axis=1)
            first += rows


# ---------------------------------------------------------------------------------------------------------------------
# The probe in torch: multinomial logistic regression with L2, full-batch L-BFGS over chunks
# ---------------------------------------------------------------------------------------------------------------------


class TorchProbe:
    """scikit-learn's `make_pipeline(StandardScaler(), LogisticRegression(C=c))` (lbfgs, multinomial), computed in
    torch over chunks of rows, so that memory holds one chunk and the weights, on `device` (a GPU when there is one).

    The objective is scikit-learn's: the mean cross-entropy plus `||W||^2 / (2 C n)` (no penalty on the bias), on
    features standardized with the mean and (population) standard deviation of the rows fitted on.
    """

    def __init__(self, features, names: Sequence[str], chunk_size: int, device: torch.device | str):
        self.features, self.names, self.chunk_size, self.device = features, list(names), chunk_size, device
        self.classes = np.unique(features.labels)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def _chunks(self, features, rows: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """`(x on the device, row numbers)`, only the rows in `rows` (a bool mask) when given. A source that fits
        in one chunk is read once and kept on the device."""
        for start, x in self._read(features):
            index = np.arange(start, start + len(x))
            if rows is not None:
                keep = rows[index]
                x, index = x[torch.as_tensor(keep, device=x.device)], index[keep]
            yield x, index

    def _read(self, features) -> Iterator[tuple[int, torch.Tensor]]:
        key = (id(features), len(features.labels))
        if key in self.cache:
            yield 0, self.cache[key]
            return
        for start, x in features.chunks(self.names, self.chunk_size):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            if len(x) == len(features.labels):
                self.cache[key] = x
            yield start, x

    def _standardizer(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the selected rows (chunks combined exactly, in float64)."""
        count, mean, m2 = 0, None, None
        for x, _ in self._chunks(self.features, rows):
            x = x.double()
            n, chunk_mean = len(x), x.mean(0)
            chunk_m2 = ((x - chunk_mean) ** 2).sum(0)
            if mean is None:
                count, mean, m2 = n, chunk_mean, chunk_m2
            elif n:
                delta = chunk_mean - mean
                mean = mean + delta * n / (count + n)
                m2 = m2 + chunk_m2 + delta**2 * count * n / (count + n)
                count += n
        scale = (m2 / count).sqrt()
        scale[scale == 0] = 1.0  # as StandardScaler: constant features are centered, not scaled
        return mean.float(), scale.float()

    def fit(self, c: float, rows: np.ndarray, max_iter: int) -> bool:
        """Fits on the selected rows with inverse L2 strength `c`; returns whether L-BFGS converged."""
        labels = torch.as_tensor(np.searchsorted(self.classes, self.features.labels), device=self.device)
        n = int(rows.sum())
        self.mean, self.scale = self._standardizer(rows)
        width = len(self.mean)
        self.weight = torch.zeros(width, len(self.classes), device=self.device, requires_grad=True)
        self.bias = torch.zeros(len(self.classes), device=self.device, requires_grad=True)
        options = {
            "tolerance_grad": 1e-5,
            "tolerance_change": 1e-10,
            "history_size": 10,
            "line_search_fn": "strong_wolfe",
        }
        optimizer = torch.optim.LBFGS([self.weight, self.bias], lr=1, max_iter=max_iter, **options)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            total = torch.zeros((), device=self.device)
            for x, index in self._chunks(self.features, rows):
                logits = ((x - self.mean) / self.scale) @ self.weight + self.bias
                loss = F.cross_entropy(logits, labels[torch.as_tensor(index, device=self.device)], reduction="sum") / n
                loss.backward()
                total += loss.detach()
            penalty = (self.weight**2).sum() / (2 * c * n)
            penalty.backward()
            return total + penalty.detach()

        optimizer.step(closure)
        state = optimizer.state[self.weight]
        return state["n_iter"] < max_iter and state["func_evals"] < optimizer.defaults["max_eval"]

    @torch.no_grad()
    def predict_proba(self, features, rows: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities `(rows, classes)` of the selected rows of `features` (all by default)."""
        probabilities = []
        for x, _ in self._chunks(features, rows):
            logits = ((x - self.mean) / self.scale) @ self.weight + self.bias
            probabilities.append(logits.softmax(-1).cpu().numpy())
        return np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.classes)))


def accuracy(probabilities: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> float:
    return float((classes[probabilities.argmax(1)] == labels).mean())


def fit_torch_probe(
    train, eval_views: Sequence[Any], names: Sequence[str], *, c_values: Sequence[float], holdout: float, seed: int,
    max_iter: int, chunk_size: int, device: torch.device | str
) -> dict[str, Any]:  # fmt: skip
    """linear_probe.py's probe, in torch: C chosen on a stratified hold-out of train (the rows scikit-learn's
    `train_test_split` holds out with the same seed), refit on all of train, scored on `eval_views[0]`; with several
    views (BERT masks), also the accuracy of their averaged class probabilities."""
    probe = TorchProbe(train, names, chunk_size, device)
    every = np.ones(len(train.labels), dtype=bool)
    holdout_accuracy = {}
    if len(c_values) > 1:
        _, held = train_test_split(
            np.arange(len(train.labels)), test_size=holdout, stratify=train.labels, random_state=seed
        )
        held_rows = np.zeros(len(train.labels), dtype=bool)
        held_rows[held] = True
        for c in c_values:
            probe.fit(c, ~held_rows, max_iter)
            probabilities = probe.predict_proba(train, held_rows)
            holdout_accuracy[c] = accuracy(probabilities, probe.classes, train.labels[held_rows])
        best_c = max(c_values, key=lambda c: (holdout_accuracy[c], -c))  # ties: the stronger regularisation
    else:
        best_c = c_values[0]
    converged = probe.fit(best_c, every, max_iter)
    probabilities = [probe.predict_proba(view) for view in eval_views]
    labels = eval_views[0].labels
    result = {"accuracy": accuracy(probabilities[0], probe.classes, labels), "C": best_c}
    result |= {"holdout_accuracy": holdout_accuracy, "converged": converged}
    if len(eval_views) > 1:
        result["ensemble_accuracy"] = accuracy(np.mean(probabilities, axis=0), probe.classes, labels)
    return result
