"""Feature-extraction throughput of an ONNX export in onnxruntime against the PyTorch model, on CPU.

For each case a random-weight model of a preset is exported with `image_gpt_hf.onnx_export.export_onnx`
(`feature-extraction`: `last_hidden_state` and `pooler_output`), then both run the same ids: PyTorch as
`model(input_ids)` in eval mode under `torch.no_grad()` (what the `image-feature-extraction` pipeline runs), onnxruntime
as `session.run` on the CPU provider, each with the same number of threads (`--threads`, default torch's). The timed
calls alternate between the two, after one warm-up call each; images/s = batch / median time. The script checks that
both give the same outputs (largest absolute difference over both outputs) and prints a markdown table.

    python benchmarks/bench_onnx.py
    python benchmarks/bench_onnx.py --threads 1 2 --update_results benchmarks/RESULTS.md   # replaces its own section
    python benchmarks/bench_onnx.py --presets tiny --repeats 1                               # a quick check

Needs the `onnx` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch
from results import LOAD_NOTE, alternate, load, load_note, machine, replace_section, table

from image_gpt_hf import ImageGPTConfig, ImageGPTModel
from image_gpt_hf.onnx_export import ONNX_FILE, export_onnx

SECTION = "## ONNX Runtime (CPU)"
# (preset, n_px, batch): the tiny demo model at a data-loader batch, and iGPT-S's size one image at a time.
CASES = (("tiny", 32, 8), ("small", 32, 1))


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_case(preset: str, n_px: int, batch_size: int, repeats: int, folder: Path, threads: list[int]) -> list[dict]:
    """Export a random-weight `preset` model, then time PyTorch and onnxruntime on the same ids, alternating, with
    each thread count (torch's threads and onnxruntime's intra-op threads alike); one row per thread count."""
    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset(preset, n_px=n_px)
    model = ImageGPTModel(config).eval()
    start = time.perf_counter()
    export = export_onnx(model, folder / preset, "feature-extraction")
    export_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.palette_size, (batch_size, config.n_positions), generator=generator)
    rows = []
    for count in threads:
        session = _session(folder / preset / ONNX_FILE, count)
        feeds = {"input_ids": ids.numpy()}

        def run_torch():
            with torch.no_grad():
                outputs = model(ids)
            return outputs.last_hidden_state, outputs.pooler_output

        def run_onnx(session=session, feeds=feeds):
            return session.run(["last_hidden_state", "pooler_output"], feeds)

        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            run = alternate({"torch": run_torch, "onnx": run_onnx}, repeats)
        finally:
            torch.set_num_threads(previous)
        torch_s, onnx_s = run.seconds["torch"], run.seconds["onnx"]
        reference, ours = run.outputs["torch"], run.outputs["onnx"]
        rows.append(
            {
                "model": f"{preset} ({config.n_layer} layers, width {config.n_embd}, "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)",
                "tokens": config.n_positions,
                "batch": batch_size,
                "threads": count,
                "torch_images_per_s": batch_size / torch_s,
                "onnx_images_per_s": batch_size / onnx_s,
                "ratio": torch_s / onnx_s,
                "max_abs_diff": max(float(np.abs(o - r.numpy()).max()) for o, r in zip(ours, reference)),
                "export_check_diff": export.max_abs_diff,
                "export_s": export_s,
                "opset": export.opset,
                "model_mb": sum(f.stat().st_size for f in (folder / preset).glob(f"{ONNX_FILE}*")) / 2**20,
                "load": run.load,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["model", "tokens", "batch", "threads", "PyTorch (images/s)", "onnxruntime (images/s)"]
    header += ["onnxruntime / PyTorch", "max abs diff", "export (s)", "model.onnx (MiB)", "load"]
    return table(
        header,
        [
            [r["model"], r["tokens"], r["batch"], r["threads"], f"{r['torch_images_per_s']:.2f}"]
            + [
                f"{r['onnx_images_per_s']:.2f}",
                f"{r['ratio']:.2f}x",
                f"{r['max_abs_diff']:.1e}",
                f"{r['export_s']:.0f}",
            ]
            + [f"{r['model_mb']:.1f}", load(r["load"])]
            for r in rows
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per runtime (the median is reported).")
    threads_help = "Thread counts to run with, torch's and onnxruntime's intra-op threads alike (default: torch's)."
    parser.add_argument("--threads", type=int, nargs="+", help=threads_help)
    presets = [case[0] for case in CASES]
    parser.add_argument("--presets", nargs="+", default=presets, choices=presets, help="The cases to run.")
    parser.add_argument("--update_results", type=Path, default=None, help="Write the table into this RESULTS.md.")
    args = parser.parse_args()
    threads = args.threads or [torch.get_num_threads()]
    load_at_start = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            row
            for case in CASES
            if case[0] in args.presets
            for row in run_case(*case, args.repeats, Path(folder), threads)
        ]
    command = " ".join(["python benchmarks/bench_onnx.py", *sys.argv[1:]])
    versions = (f"{module.__name__} {module.__version__}" for module in (onnxruntime, onnx, onnxscript))
    text = "\n\n".join(
        [
            f"`{command}`, {started}: random-weight models of the presets at 32x32 exported with "
            "`image_gpt_hf.onnx_export` (`--task feature-extraction`, opset "
            f"{', '.join(sorted({str(row['opset']) for row in rows}))}); PyTorch `model(input_ids)` (eval, "
            "`torch.no_grad()`, sdpa attention) against onnxruntime's CPU provider on the same ids, "
            f"{args.repeats} timed calls each, alternating, after a warm-up; images/s = batch / median time; threads: "
            "torch's threads and onnxruntime's intra-op threads alike.",
            f"Machine: {machine(*versions)}; {load_note(load_at_start)}. {LOAD_NOTE} The machine is shared with "
            "other jobs: the ratio of the two columns, measured side by side, is the figure to read, not the absolute rates. When the load average reaches the "
            "number of cores, threads of either runtime wait on peers that another job has taken the core from: "
            "compare rows of the same thread count, and trust the 1-thread rows most.",
            markdown(rows),
            "max abs diff: the largest difference between the two runtimes' `last_hidden_state` and `pooler_output` "
            "on the timed ids (the export's own check, batch sizes 1 and 3: "
            + ", ".join(f"{row['export_check_diff']:.1e}" for row in rows if row["threads"] == threads[0])
            + "). export: `export_onnx` wall time, its onnxruntime check included.",
        ]
    )
    print(text)
    if args.update_results is not None:
        replace_section(args.update_results, SECTION, text)


if __name__ == "__main__":
    main()
