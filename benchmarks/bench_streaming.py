"""Tokenized shards at scale: tokenization throughput with 1 and 2 processes (examples/tokenize_images.py on crops of
the bundled photos), reading throughput map-style against streamed (examples/s through a DataLoader, batch 64), and
the peak memory of streaming 10,000 against 200,000 rows (it must not grow with the data), and pretraining throughput
(examples/pretrain.py --shards_dir, map-style against --streaming, from the same shards of the digits).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_streaming.py [--images 2000] [--rows 10000 200000]

Prints a Markdown table (append it to benchmarks/RESULTS.md with `--results benchmarks/RESULTS.md`).
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from skimage import data as skdata
from torch.utils.data import DataLoader

from image_gpt_hf import ImageGPTDataCollator, ImageGPTImageProcessor

ROOT = Path(__file__).resolve().parents[1]


def write_rows(folder: Path, rows: int, seq_len: int) -> list[str]:
    """`rows` examples of random palette ids (16 colors), as tokenize_images.py lays them out by default: shards of
    10,000 rows in row groups of 1,000."""
    rng, files, shards = np.random.default_rng(0), [], max(1, rows // 10_000)
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        ids = rng.integers(0, 16, (len(part), seq_len), dtype=np.uint16)
        column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len)
        files.append(str(folder / f"shard-{i:05d}-of-{shards:05d}.parquet"))
        pq.write_table(pa.table({"input_ids": column, "index": pa.array(part)}), files[-1], row_group_size=1000)
    return files


def read_rate(files: list[str], streaming: bool) -> tuple[float, int]:
    """examples/s through a DataLoader (batch 64, the library's collator), and the examples read. Each in its fastest
    format: numpy rows map-style, plain rows streamed (numpy costs a streamed dataset half its speed)."""
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    start, seen = time.perf_counter(), 0
    dataset = dataset if streaming else dataset.with_format("numpy")
    for batch in DataLoader(dataset, batch_size=64, collate_fn=ImageGPTDataCollator()):
        seen += len(batch["input_ids"])
    return seen / (time.perf_counter() - start), seen


def tokenize_rate(images: Path, palette: Path, processes: int, output: Path) -> float:
    script = [str(ROOT / "examples" / "tokenize_images.py"), "--train_dir", str(images), "--n_px", "32"]
    script += ["--processor_name_or_path", str(palette), "--num_shards", "4", "--output_dir", str(output)]
    launcher = ["-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(ROOT / "examples" / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", str(processes)]
    run = [sys.executable, *(launcher if processes > 1 else []), *script]
    seconds = re.search(r" in ([\d.]+) s;", subprocess.run(run, check=True, capture_output=True, text=True).stdout)
    return sum(1 for _ in images.rglob("*.png")) / float(seconds[1])


def pretrain_rate(shards: Path, streaming: bool, output: Path) -> float:
    """images/s of examples/pretrain.py on `shards` over steps 21-40 (its logged rate), a tiny model, batch 32."""
    run = [sys.executable, str(ROOT / "examples" / "pretrain.py"), "--shards_dir", str(shards), "--max_train_steps"]
    run += ["40", "--config_overrides", "n_layer=2,n_embd=32,n_head=2", "--per_device_train_batch_size", "32"]
    run += ["--logging_steps", "20", "--max_eval_samples", "32", "--output_dir", str(output)]
    run += ["--streaming"] if streaming else []
    log = subprocess.run(run, check=True, capture_output=True, text=True)
    return float(re.findall(r"images_per_s ([\d.e+]+)", log.stdout + log.stderr)[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="Photo crops to tokenize.")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000], help="Rows streamed for memory.")
    parser.add_argument("--seq_len", type=int, default=1024, help="Ids per row (1024: 32x32).")
    parser.add_argument("--results", default=None, help="Append the table to this file.")
    parser.add_argument("--peak_rss_of", default=None, help=argparse.SUPPRESS)  # a child run: stream this folder
    args = parser.parse_args()
    if args.peak_rss_of:  # a fresh process per size, so that its peak memory is that of streaming alone
        rate, seen = read_rate(sorted(map(str, Path(args.peak_rss_of).glob("*.parquet"))), streaming=True)
        print(seen, rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    table = ["| measurement | value |", "|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng, photos = np.random.default_rng(0), [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
        for i in range(args.images):  # random 64x64 crops of the photos, in 3 class folders
            photo = photos[i % 3]
            top, left = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
            (tmp / "images" / str(i % 3)).mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(photo[top : top + 64, left : left + 64]).save(tmp / "images" / str(i % 3) / f"{i}.png")
        ImageGPTImageProcessor(clusters=rng.uniform(-1, 1, (512, 3))).save_pretrained(tmp / "palette")
        for processes in (1, 2):
            rate = tokenize_rate(tmp / "images", tmp / "palette", processes, tmp / f"shards{processes}")
            table.append(f"| tokenize {args.images} photo crops at 32x32, {processes} process(es) | "
                         f"{rate:,.0f} images/s |")  # fmt: skip
        (tmp / "rows").mkdir()
        files = write_rows(tmp / "rows", 20_000, args.seq_len)
        for streaming in (False, True):
            rate, _ = read_rate(files, streaming)
            table.append(f"| read 20,000 rows, {'streamed' if streaming else 'map-style'}, batch 64 | "
                         f"{rate:,.0f} examples/s |")  # fmt: skip
        digits = tmp / "digits"
        tokenize = [sys.executable, str(ROOT / "examples" / "tokenize_images.py"), "--output_dir", str(digits)]
        subprocess.run(tokenize, check=True, capture_output=True)
        for streaming in (False, True):  # (the rate of steps 21-40: startup and evaluation left out)
            rate, load = pretrain_rate(digits, streaming, tmp / f"run{streaming}"), os.getloadavg()[0]
            how = "streamed" if streaming else "map-style"
            row = f"| pretrain 2 layers on the digits' shards (8x8, batch 32), {how} |"
            table.append(f"{row} {rate:,.0f} images/s, load average {load:.1f} |")
        for rows in args.rows:
            (tmp / f"rows{rows}").mkdir()
            write_rows(tmp / f"rows{rows}", rows, args.seq_len)
            child = [sys.executable, __file__, "--peak_rss_of", str(tmp / f"rows{rows}")]
            seen, rate, peak = subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-3:]
            assert int(seen) == rows
            table.append(f"| stream {rows:,} rows: peak RSS, rate | {float(peak):,.0f} MiB, {float(rate):,.0f} ex/s |")
    print("\n".join(table))
    if args.results:
        with open(args.results, "a") as file:
            file.write("\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
