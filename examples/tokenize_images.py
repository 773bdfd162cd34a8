"""Tokenize images once into Parquet shards of palette ids, for pretraining at scale (`image_gpt_hf.shards`).

    python examples/tokenize_images.py --output_dir shards/digits                  # the bundled digits at 8x8
    accelerate launch --num_processes 8 examples/tokenize_images.py --train_dir photos/train \
        --validation_dir photos/val --n_px 32 --processor_name_or_path PALETTE --num_shards 64 --output_dir shards/photos
    python examples/tokenize_images.py --npy_ids imagenet_trX.npy --validation_npy_ids imagenet_vaX.npy \
        --processor_name_or_path openai/imagegpt-small --output_dir shards/imagenet32   # OpenAI's released ids

Sources: an imagefolder (class subfolders become labels), a `datasets` dataset, or OpenAI's `.npy` arrays of palette
ids (N, n_px * n_px), already quantized; their labels come from the `*Y.npy` file beside each `*X.npy`, one-hot or
ints. Images are center-cropped to n_px x n_px and quantized by the processor saved in the output
(preprocessor_config.json: --processor_name_or_path's palette, or one fitted by k-means to the training images), so
the shards hold exactly its ids; random-crop augmentation is gone once tokenized, as in OpenAI's arrays. The order is
shuffled with --seed before sharding, so that a streamed shuffle buffer mixes classes; `index` keeps each example's
position in its source.

Processes: under `accelerate launch` process r writes shards r, r + world_size, ...: the launcher that trains also
tokenizes, on one machine or many sharing a file system, each shard written once (datasets' `map(num_proc=...)`
would stay on one machine and first write an Arrow copy of everything into its cache). Resumable: a shard is written
under a hidden temporary name and renamed when complete; a rerun with the same arguments keeps the shards that are
complete and intact, and a rerun with others into the same folder is refused unless --overwrite.
"""

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import datasets
import numpy as np
from accelerate import PartialState
from tqdm.auto import tqdm

from image_gpt_hf import ImageGPTImageProcessor, load_digits
from image_gpt_hf.palette import fit_palette
from image_gpt_hf.safe_io import atomic_file, check_output_path, staged_dir
from image_gpt_hf.shards import MANIFEST, file_sha256, palette_digest, shard_problem

DIGITS = "sklearn-digits"
OWN = [MANIFEST, "preprocessor_config.json", "train", "validation"]
SHARD_SIZE = 10_000  # examples per shard when --num_shards is not given


def parse_args():
    parser = argparse.ArgumentParser(description="Tokenize images once into Parquet shards of palette ids.")
    add = parser.add_argument
    add("--dataset_name", default=DIGITS, help=f"A `datasets` image dataset, or {DIGITS!r} (bundled).")
    add("--dataset_config_name", default=None)
    add("--train_dir", default=None, help="An imagefolder of training images (class subfolders: labels).")
    add("--validation_dir", default=None)
    add("--npy_ids", default=None, help="OpenAI's palette ids, e.g. cifar10_trX.npy (labels: cifar10_trY.npy).")
    add("--validation_npy_ids", default=None, help="e.g. cifar10_vaX.npy")
    add("--image_column_name", default=None, help="Default: the first column of `Image` type.")
    add("--cache_dir", default=None)
    add("--processor_name_or_path", default=None, help="The palette; needed with --npy_ids. Default: fitted.")
    add("--palette_size", type=int, default=None, help="Colors of a fitted palette (16 on the digits, else 512).")
    add("--palette_max_pixels", type=int, default=1_000_000, help="Pixels sampled for the palette's k-means.")
    add("--n_px", type=int, default=None, help="Image side (8 on the digits, else 32; --npy_ids: the ids').")
    add("--num_shards", type=int, default=None, help=f"Training shards (default: one per {SHARD_SIZE} images).")
    add("--seed", type=int, default=0, help="Seeds the shuffle before sharding and the palette's k-means.")
    add("--batch_size", type=int, default=256, help="Images per call of the processor.")
    add("--output_dir", required=True)
    add("--overwrite", action="store_true", help="Replace what is in --output_dir.")
    return parser.parse_args()


def fingerprint(description, paths) -> str:
    """A digest of the source: its description and every file's path, size and modification time (cheap; it changes
    when a file is added, removed or rewritten)."""
    files = sorted(f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([description, stats], default=str).encode()).hexdigest()[:16]


def load_source(args):
    """{output split: (rows, source split name)}, the labels (column, ClassLabel) or None, the image column (None for
    ids), and a description of the source with its fingerprint."""
    if args.npy_ids:
        files = {s: f for s, f in (("train", args.npy_ids), ("validation", args.validation_npy_ids)) if f}
        splits, paths = {}, list(files.values())
        for split, file in files.items():
            ids, labels_file = np.load(file, mmap_mode="r"), Path(file[: -len("X.npy")] + "Y.npy")
            labels = np.load(labels_file) if file.endswith("X.npy") and labels_file.is_file() else None
            labels = labels.argmax(1) if labels is not None and labels.ndim == 2 else labels  # one-hot (N, C)
            paths += [labels_file] if labels is not None else []
            square = ids.ndim == 2 and math.isqrt(ids.shape[1]) ** 2 == ids.shape[1]
            if not square or len(ids if labels is None else labels) != len(ids):
                raise ValueError(f"{file} must hold (N, n_px * n_px) ids, its labels N rows; got {ids.shape}.")
            splits[split] = ({"ids": ids, "labels": labels}, file)
        classes = splits["train"][0]["labels"]
        label = None if classes is None else ("labels", datasets.ClassLabel(num_classes=int(classes.max()) + 1))
        return splits, label, None, {"npy": files, "fingerprint": fingerprint(files, paths)}
    if args.train_dir:
        dirs = {"train": args.train_dir, "validation": args.validation_dir}
        files = {split: os.path.join(folder, "**") for split, folder in dirs.items() if folder}
        dataset = datasets.load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)
        description, paths = {"imagefolder": dirs}, [d for d in dirs.values() if d]
    else:
        digits = args.dataset_name == DIGITS
        name, config_name = args.dataset_name, args.dataset_config_name
        dataset = load_digits() if digits else datasets.load_dataset(name, config_name, cache_dir=args.cache_dir)
        description = {"dataset": args.dataset_name, "config": args.dataset_config_name}
        paths = [f["filename"] for split in dataset.values() for f in split.cache_files]
    held_out = next((name for name in ("validation", "test") if name in dataset), None)
    names = {"train": "train", "validation": held_out} if held_out else {"train": "train"}
    splits = {split: (dataset[name], name) for split, name in names.items()}
    features = dataset["train"].features
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not (image_column := args.image_column_name or next(iter(images), None)) or image_column not in features:
        raise ValueError(f"Pass --image_column_name, one of the dataset's columns {list(features)}.")
    label = next(((n, f) for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    description |= {"rows": {s: len(rows) for s, (rows, _) in splits.items()}}
    digest = fingerprint({**description, "features": features.to_dict()}, paths)
    return splits, label, image_column, {**description, "fingerprint": digest}


def settings(manifest: dict) -> dict:
    """What a rerun into the same folder must repeat: the manifest less its results (palette digest, checksums)."""
    kept = {key: value for key, value in manifest.items() if key not in ("palette", "complete")}
    kept["splits"] = {
        split: {**entry, "shards": [{k: shard[k] for k in ("file", "num_examples")} for shard in entry["shards"]]}
        for split, entry in manifest["splits"].items()
    }
    return json.loads(json.dumps(kept))


def main():
    args = parse_args()
    output = Path(args.output_dir)
    inputs = [args.train_dir, args.validation_dir, args.npy_ids, args.validation_npy_ids, args.processor_name_or_path]
    ours = (output / MANIFEST).is_file()  # an earlier run's folder: resumed when the settings are the same
    check_output_path(output, inputs=inputs + [args.dataset_name], overwrite=args.overwrite, keep=OWN if ours else ())
    if args.npy_ids and not args.processor_name_or_path:
        raise ValueError("--npy_ids needs --processor_name_or_path: the processor whose palette the ids index.")
    state = PartialState(cpu=True)  # tokenizing runs on CPUs; under `accelerate launch` the processes join (gloo)
    datasets.disable_progress_bars()
    with state.main_process_first():
        splits, label, image_column, source = load_source(args)
    digits = args.dataset_name == DIGITS and not (args.train_dir or args.npy_ids)
    processor = args.processor_name_or_path and ImageGPTImageProcessor.from_pretrained(args.processor_name_or_path)
    palette_size = len(processor.clusters) if processor else args.palette_size or (16 if digits else 512)
    lengths = {split: len(rows["ids"] if image_column is None else rows) for split, (rows, _) in splits.items()}
    n_px = args.n_px or (8 if digits else 32)
    n_px = math.isqrt(splits["train"][0]["ids"].shape[1]) if image_column is None else n_px  # the ids' own
    request = {"processor": args.processor_name_or_path, "palette": palette_digest(processor)} if processor else {}
    shard_size = math.ceil(lengths["train"] / (args.num_shards or math.ceil(lengths["train"] / SHARD_SIZE)))
    manifest = {
        "format": "image_gpt_hf shards 1",
        "source": source,
        "palette_from": request or {"k-means": [palette_size, args.palette_max_pixels, args.seed]},
        "palette_size": palette_size,
        "n_px": n_px,
        "vocab_size": palette_size + 1,  # the model's: the palette and SOS
        "sequence_length": n_px * n_px,
        "id_dtype": "uint16" if palette_size <= 1 << 16 else "int32",
        "seed": args.seed,
        "label_names": label[1].names if label else None,
        "splits": {},
    }
    for split, (_, name) in splits.items():
        count = math.ceil(lengths[split] / shard_size)
        shards = [f"{split}/shard-{i:05d}-of-{count:05d}.parquet" for i in range(count)]
        sizes = [len(part) for part in np.array_split(np.arange(lengths[split]), count)]
        entries = [{"file": file, "num_examples": size} for file, size in zip(shards, sizes)]
        manifest["splits"][split] = {"from": name, "num_examples": lengths[split], "shards": entries}
    old = json.loads((output / MANIFEST).read_text()) if ours and not args.overwrite else None
    if old is not None and settings(old) != settings(manifest):
        differences = [key for key, value in settings(manifest).items() if settings(old).get(key) != value]
        raise ValueError(
            f"{output} holds shards tokenized with other settings ({', '.join(differences)} differ). Pass the same "
            "arguments to finish or check it, --overwrite to replace it, or another --output_dir."
        )

    # The main process lays out the folder: the plan (manifest without results) first, then the processor.
    if state.is_main_process:
        if old is None:
            with staged_dir(output, overwrite=args.overwrite, inputs=inputs):
                pass  # an empty folder, replacing what was there with --overwrite
            with atomic_file(output / MANIFEST, overwrite=True, arg="--output_dir") as tmp:
                tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        if not (output / "preprocessor_config.json").is_file():
            if processor is None:
                train = splits["train"][0]
                palette = fit_palette(train, palette_size, n_px, args.palette_max_pixels, args.seed, image_column)
                processor = ImageGPTImageProcessor(clusters=palette)
            crop = {"height": n_px, "width": n_px}
            processor.size, processor.do_center_crop, processor.crop_size = {"shortest_edge": n_px}, True, crop
            with atomic_file(output / "preprocessor_config.json", overwrite=True, arg="--output_dir") as tmp:
                processor.to_json_file(tmp)
    state.wait_for_everyone()
    start, processor = time.perf_counter(), ImageGPTImageProcessor.from_pretrained(output)
    manifest = json.loads((output / MANIFEST).read_text())  # the plan, or the earlier run's with its checksums

    # Each process writes every num_processes-th shard: a seeded permutation of each split, cut in contiguous runs.
    features = {"input_ids": datasets.Sequence(datasets.Value(manifest["id_dtype"]), length=n_px * n_px)}
    features |= {"index": datasets.Value("int64")} | ({"label": label[1]} if label else {})
    work = []
    for number, (split, entry) in enumerate(manifest["splits"].items()):
        order = np.random.default_rng([args.seed, number]).permutation(entry["num_examples"])
        starts = np.cumsum([0] + [shard["num_examples"] for shard in entry["shards"]])
        work += [(split, shard, order[a:b]) for shard, a, b in zip(entry["shards"], starts, starts[1:])]
    mine = work[state.process_index :: state.num_processes]

    def complete(shard):  # renamed into place when complete; a checksum in the manifest must match too
        return (output / shard["file"]).is_file() and ("sha256" not in shard or not shard_problem(output, shard, True))

    todo = [(split, shard, indices) for split, shard, indices in mine if not complete(shard)]
    bar = tqdm(total=sum(len(i) for *_, i in todo), unit="img", disable=not state.is_local_main_process)
    for split, shard, indices in todo:
        rows = splits[split][0]
        if image_column is None:
            ids, labels = rows["ids"][indices], None if rows["labels"] is None else rows["labels"][indices]
            bar.update(len(indices))
            if ids.max() >= palette_size:
                raise ValueError(
                    f"{splits[split][1]} holds id {ids.max()}, past the {palette_size}-color palette of "
                    f"{args.processor_name_or_path}: pass the processor whose palette these ids index."
                )
        else:
            part, ids = rows.select(indices), []
            for batch in part.iter(args.batch_size):
                ids.append(processor(batch[image_column], return_tensors="np")["input_ids"])
                bar.update(len(ids[-1]))
            ids, labels = np.concatenate(ids), part[label[0]] if label else None
        columns = {"input_ids": ids.astype(manifest["id_dtype"]), "index": indices}
        columns |= {"label": labels} if label else {}
        with atomic_file(output / shard["file"], overwrite=True, arg="--output_dir") as tmp:
            datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(tmp))
    bar.close()

    # When every shard is in place, the main process completes the manifest with each shard's size and checksum.
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    if state.is_main_process:
        for entry in manifest["splits"].values():
            for shard in entry["shards"]:
                path = output / shard["file"]
                shard |= {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        manifest |= {"palette": palette_digest(processor), "complete": True}
        splits_done = manifest["splits"].items()
        with atomic_file(output / MANIFEST, overwrite=True, arg="--output_dir") as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        counts = [f"{entry['num_examples']} {split} in {len(entry['shards'])}" for split, entry in splits_done]
        print(f"Tokenized {', '.join(counts)} shards into {output} in {seconds:.1f} s; {len(todo)} shards written by "
              "the main process.")  # fmt: skip


if __name__ == "__main__":
    main()
