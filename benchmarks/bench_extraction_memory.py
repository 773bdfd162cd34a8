"""Peak memory of examples/linear_probe.py as the dataset grows: features held in memory (the default) against
features streamed to disk (`--feature_dir`) and probed from there in chunks (`--probe torch`).

The data is scikit-learn's digits (1,437 training and 360 test scans, the examples' split) repeated k times, written
as a local parquet dataset; the model is a randomly initialised preset (`tiny` by default: 6 layers, width 128) at
8x8 pixels with a 16-gray palette. Each run is `python examples/linear_probe.py ...` in a fresh process (one torch
thread), every layer probed with one L2 strength (`--probe_c 1`, no baselines), and its peak resident memory is the
kernel's count for that process (`ru_maxrss` from `os.wait4`).

    python benchmarks/bench_extraction_memory.py                      # k = 2 and 8
    python benchmarks/bench_extraction_memory.py --multipliers 1 2 8 32 --model_size small

Prints a markdown table: images, mode, peak RSS, wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from results import LOAD_NOTE, load, load_note, table

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor, load_digits

ROOT = Path(__file__).resolve().parent.parent

MODES = {
    "in memory, scikit-learn (default)": [],
    "--feature_dir, --probe torch": ["--feature_dir", "{features}", "--probe", "torch"],
}


def make_data(folder: Path, multiplier: int) -> Path:
    """The digits' training and test splits, each repeated `multiplier` times, as train.parquet and test.parquet."""
    digits = load_digits()
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        datasets.concatenate_datasets([digits[split]] * multiplier).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def make_model(folder: Path, model_size: str) -> Path:
    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset(model_size, n_px=8, palette_size=16)
    ImageGPTForCausalImageModeling(config).save_pretrained(folder)
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    ImageGPTImageProcessor(clusters=palette, size={"height": 8, "width": 8}).save_pretrained(folder)
    return folder


def peak_rss(command: list[str], log: Path) -> tuple[float, float, str]:
    """Runs `command` in a fresh process; returns its peak resident memory (MiB), wall time (s) and load cell."""
    before = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed; its log: {log}\n{log.read_text()[-3000:]}")
    # ru_maxrss is in KiB on Linux
    return usage.ru_maxrss / 1024, time.perf_counter() - start, load((before, os.getloadavg()[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multipliers", type=int, nargs="+", default=[2, 8], help="Copies of the digits.")
    parser.add_argument("--model_size", default="tiny", help="The preset of the random model.")
    parser.add_argument("--batch_size", type=int, default=128, help="--per_device_eval_batch_size of the runs.")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_extraction_memory_") as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.model_size)
        config = ImageGPTConfig.from_pretrained(model)
        rows = []
        probe_import = "import sys; sys.path.insert(0, 'examples'); import linear_probe"
        floor, *_ = peak_rss([sys.executable, "-c", probe_import], tmp / "import.log")
        for k in args.multipliers:
            data = make_data(tmp / f"digits_x{k}", k)
            for mode, extra in MODES.items():
                run = tmp / f"run_x{k}_{len(rows)}"
                command = [
                    sys.executable,
                    str(ROOT / "examples" / "linear_probe.py"),
                    "--model_name_or_path",
                    str(model),
                ]
                command += ["--dataset_name", str(data), "--cache_dir", str(tmp / "cache"), "--output_dir", str(run)]
                command += ["--no_baselines", "--probe_c", "1", "--per_device_eval_batch_size", str(args.batch_size)]
                command += [value.format(features=run / "features") for value in extra]
                rss, seconds, load_cell = peak_rss(command, tmp / f"x{k}_{len(rows)}.log")
                rows.append([f"x{k}", f"{1797 * k:,}", mode, f"{rss:.0f}", f"{seconds:.0f}", load_cell])
                print(f"x{k}: {mode}: {rss:.0f} MiB, {seconds:.0f} s", file=sys.stderr, flush=True)
    width = (config.n_layer + 1) * config.n_embd
    print(
        f"Random `{args.model_size}` model ({config.n_layer} layers, width {config.n_embd}: {width} feature values "
        f"per image over its {config.n_layer + 1} layers), 8x8 digits, batches of {args.batch_size}, "
        f"{torch.__version__}, one torch thread; {load_note(load_at_start)}. Importing the script's modules alone "
        f"peaks at {floor:.0f} MiB. {LOAD_NOTE}\n"
    )
    print(table(["digits", "images", "features", "peak RSS (MiB)", "wall (s)", "load"], rows))


if __name__ == "__main__":
    main()
