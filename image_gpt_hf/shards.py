"""Tokenized shards, written once by examples/tokenize_images.py, read map-style or streamed.

A shards folder holds `train/shard-00000-of-000NN.parquet` (and `validation/...`: columns `input_ids`, `index` (the
example's position in its source split) and `label` where there are labels), the processor whose palette the ids
index (`preprocessor_config.json`), and `manifest.json` (palette digest and size, n_px, vocab_size, source
fingerprint; per shard its rows, bytes and sha256). `datasets.load_dataset("parquet", ...)` reads and streams it and
the Hub hosts it as it is; `load_shards` reads it once it has checked that it is the model's and intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


def palette_digest(processor) -> str:
    """The digest that names a palette (a processor's colors as float32) in manifests and run contracts."""
    return hashlib.sha256(np.asarray(processor.clusters, np.float32).tobytes()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def shard_problem(root: Path, shard: dict, checksum: bool = False) -> str | None:
    """What is wrong with a shard of the manifest, or None: its size always (free), its sha256 with `checksum`."""
    path = root / shard["file"]
    if not path.is_file():
        return f"The shard {path} is missing"
    if path.stat().st_size != shard["bytes"]:
        return f"The shard {path} has {path.stat().st_size} bytes, not the manifest's {shard['bytes']}"
    if checksum and file_sha256(path) != shard["sha256"]:
        return f"The shard {path} does not match its sha256 in the manifest"
    return None


def load_shards(path, config=None, processor=None, *, split="train", streaming=False, checksum=False):
    """The `split` of the shards folder `path`: a `datasets.Dataset`, or with `streaming` an `IterableDataset` of one
    shard per file. A ValueError names what is wrong: another palette than `processor`'s, n_px or vocab_size than
    `config`'s; an unfinished folder; a shard missing or of another size (or sha256, with `checksum`: after a copy)."""
    import datasets

    root = Path(path)
    manifest = json.loads((root / MANIFEST).read_text())
    fix = f"rerun examples/tokenize_images.py with the same arguments into {root}: it rewrites what is missing"
    if not manifest.get("complete"):
        raise ValueError(f"The tokenization into {root} did not finish; {fix}.")
    if split not in manifest["splits"]:
        raise ValueError(f"The shards in {root} have no {split!r} split; they have {sorted(manifest['splits'])}.")
    model = {"palette": palette_digest(processor)} if processor is not None else {}
    model |= {"n_px": config.n_px, "vocab_size": config.vocab_size} if config is not None else {}
    wrong = [f"{key} {manifest[key]} (the model's: {value})" for key, value in model.items() if manifest[key] != value]
    if wrong:
        raise ValueError(
            f"The shards in {root} were tokenized for another model: their {', '.join(wrong)}. Tokenize the images "
            "with the model's processor and n_px (examples/tokenize_images.py --processor_name_or_path MODEL --n_px "
            "N), or train a model of the shards' palette, n_px and vocab_size."
        )
    shards = manifest["splits"][split]["shards"]
    if problem := next(filter(None, (shard_problem(root, shard, checksum) for shard in shards)), None):
        raise ValueError(f"{problem}: {fix} or damaged.")
    files = [str(root / shard["file"]) for shard in shards]
    return datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)


def plan_processes(num_shards: int, world_size: int, allow_reread: bool = False) -> str:
    """How `num_shards` files divide over `world_size` processes under `datasets.distributed.split_dataset_by_node`,
    as a sentence to log; refused (ValueError) when there are more processes than shards and not `allow_reread`."""
    if num_shards % world_size == 0:
        return f"{num_shards} shards over {world_size} processes: each reads {num_shards // world_size} of its own."
    note = (
        f"{num_shards} shards do not divide over {world_size} processes: every process reads every shard and keeps "
        f"one example in {world_size} (each example still once, but {world_size} times the reading)"
    )
    if num_shards < world_size and not allow_reread:
        raise ValueError(
            f"More processes than shards: {note}. Tokenize into a multiple of {world_size} shards "
            "(examples/tokenize_images.py --num_shards), or allow the extra reading (--allow_shard_reread)."
        )
    return note + "."
