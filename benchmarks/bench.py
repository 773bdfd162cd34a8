"""Side-by-side benchmark of this package's Image GPT against transformers' ImageGPT, on the same weights.

One run measures, for both implementations: forward images/s (1,024 and 4,096 tokens) and how close the forward runs
to the machine's matmul rate, the peak memory of a forward, the time of a training step with the defaults a user gets
(the presets' dropout, the default attention; forward + backward + AdamW), greedy generation tokens/s (`generate()`,
a static cache, `fast_generate(compile=True)` and `fast_generate()` as sample()/complete() run it; batch 1 and 8;
tokens checked identical) and the image processor's images/s (benchmarks/bench_processor.py). On CUDA it adds bf16 and
the model FLOPs utilization of an iGPT-S training step. Every figure has the machine's load average beside it. It
prints markdown and, with `--output`, writes it into RESULTS.md, replacing only this device's section.

    python benchmarks/bench.py --device cpu [--quick] [--threads N] [--output benchmarks/RESULTS.md]
    python benchmarks/bench.py --device cuda --output benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from results import LOAD_NOTE, alternate, load, load_note, machine, replace_section, table, transformers_twin

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.fast_decoding import fast_generate, forget

HERE = Path(__file__).resolve().parent
HEADER = """# Benchmarks

This package's Image GPT against transformers' `ImageGPT` (`transformers.models.imagegpt`), measured side by side
in one run of `benchmarks/bench.py` on the same weights and inputs; see benchmarks/README.md for how to run it and
for the fast generation paths. Every figure below comes from the run whose command heads its section, with the
machine's 1-minute load average before / after its timed calls beside it; a run that started at a load average of 1 or
more says "under load". `tiny` and `small` are the presets of `ImageGPTConfig.from_preset` (tiny: 6 layers, 128
wide, 4 heads; small = iGPT-S: 24 layers, 512 wide, 8 heads, 76M parameters); 32x32 images are 1,024 tokens, 64x64
are 4,096.

Method. Timings are medians of repeats that alternate between the implementations, after a warm-up. Forward: eval
mode, `torch.no_grad()`, `use_cache=False`, images/s = batch / median time. Training step: what a user gets by default
(train mode, the presets' dropout 0.1 unless stated, the default attention, which on CPU with attention dropout is
the model's blockwise attention), `model(x, labels=x)`, backward, `AdamW.step()`, `zero_grad()`. Generation: greedy,
from the SOS token, `min_new_tokens = max_new_tokens`; tokens/s = batch x new tokens / median wall time of a whole
call; every path's tokens are compared with transformers'. Peak memory on CPU: each forward runs in a fresh
subprocess, which resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs one forward and reports
`VmHWM` minus the RSS just before it; on CUDA, `torch.cuda.max_memory_allocated()` over the forward minus the memory
allocated before it. FLOPs: matmuls `2 x tokens x (12 d^2 L + d V)` (V = 512 palette outputs) plus causal attention
`2 x L x T^2 x d` per sequence (QK^T and PV over the causal half); a training step is 3x its forward. The "large
matmul" reference is a square product measured in the same run (the best of 5, at the start and at the end).
"""
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity).
BF16_PEAKS = {
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H200": 989.4e12,
    "A100": 312e12,
}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.device, self.quick, self.budget_s = torch.device(args.device), args.quick, args.budget_s
        self.sync = torch.cuda.synchronize if args.device == "cuda" else None
        self.start, self.skipped = time.perf_counter(), []

    def time(self, calls: dict, repeats: int, warmup: int = 1):
        return alternate(calls, repeats, warmup, sync=self.sync)

    def each(self, name: str, cases: list[tuple], measure):
        """`measure(*case)` for each case; those begun after the time budget is spent are skipped (and noted)."""
        for case in cases:
            if self.budget_s is not None and time.perf_counter() - self.start > self.budget_s:
                self.skipped.append(f"{name} {case}")
            else:
                yield measure(*case)

    def matmul_rate(self, dtype: torch.dtype, size: int) -> float:
        """FLOP/s of a square matrix product, the best of 5: on a shared machine the least disturbed is closest to
        the hardware."""
        a, b = (torch.randn(size, size, device=self.device, dtype=dtype) for _ in range(2))
        return 2 * size**3 / alternate({"mm": partial(torch.mm, a, b)}, 5, 2, pick=min, sync=self.sync).seconds["mm"]


def pair(preset: str, n_px: int, device: torch.device, dropout: float | None = None):
    """(ours, transformers') causal models of a preset (every dropout `dropout`; None: the preset's) with the same
    random weights, in eval mode."""
    drops = {} if dropout is None else dict.fromkeys(("attn_pdrop", "resid_pdrop", "embd_pdrop"), dropout)
    torch.manual_seed(0)
    ours = ImageGPTForCausalImageModeling(ImageGPTConfig.from_preset(preset, n_px, **drops)).to(device).eval()
    return ours, transformers_twin(ours)


def pixels(batch: int, length: int, device: torch.device) -> torch.LongTensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)


def forward_flops(config: ImageGPTConfig, batch: int, tokens: int) -> float:
    """Matmul FLOPs of one forward plus causal attention (see the method note)."""
    d, layers, inner = config.n_embd, config.n_layer, config.n_inner or 4 * config.n_embd
    dense = 2 * batch * tokens * (layers * (4 * d * d + 2 * d * inner) + d * (config.vocab_size - 1))
    return float(dense + 2 * layers * batch * tokens * tokens * d)


def case_name(preset: str, tokens: int, batch: int, *more: str) -> str:
    return ", ".join([preset, f"{tokens:,} tokens", f"batch {batch}", *more])


# --------------------------------------------------------------------------------------------------- measurements


def forward(bench: Bench, preset: str, n_px: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    ours, theirs = (model.to(dtype) for model in pair(preset, n_px, bench.device))
    x = pixels(batch, n_px * n_px, bench.device)
    with torch.no_grad():
        run = bench.time(
            {name: partial(m, x, use_cache=False) for name, m in (("ours", ours), ("hf", theirs))}, repeats
        )
    logits = [run.outputs[name].logits.float() for name in ("ours", "hf")]
    return {
        "case": case_name(preset, n_px * n_px, batch, str(dtype).replace("torch.", "")),
        "batch": batch,
        **{f"{name}_s": seconds for name, seconds in run.seconds.items()},
        "max_abs_logit_diff": float((logits[0] - logits[1]).abs().max()),
        "flops": forward_flops(ours.config, batch, n_px * n_px),
        "bf16": dtype == torch.bfloat16,
        "load": run.load,
    }


def train_step(model, x: torch.Tensor, autocast: torch.dtype | None = None):
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=1e-4, fused=x.is_cuda)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training(bench: Bench, preset: str, n_px: int, batch: int, dropout: float | None, repeats: int, autocast=None):
    """Training-step seconds of ours and transformers' on the same weights, each with its default attention."""
    ours, theirs = pair(preset, n_px, bench.device, dropout)
    x = pixels(batch, n_px * n_px, bench.device)
    run = bench.time({"ours": train_step(ours, x, autocast), "hf": train_step(theirs, x, autocast)}, repeats)
    precision = "fp32" if autocast is None else f"{str(autocast).replace('torch.', '')} autocast"
    return {
        "case": case_name(preset, n_px * n_px, batch, precision, f"dropout {ours.config.attn_pdrop}"),
        **{f"{name}_s": seconds for name, seconds in run.seconds.items()},
        "flops": 3 * forward_flops(ours.config, batch, n_px * n_px),
        "load": run.load,
    }


GENERATION_PATHS = {
    "ours": "ours generate()",
    "static": "ours static cache",
    "compiled": "ours fast_generate(compile=True)",
    "auto": "ours fast_generate() (sample/complete)",
}


def generation(bench: Bench, preset: str, batch: int, new_tokens: int, with_compile: bool, repeats: int) -> dict:
    """Greedy tokens/s of transformers' generate() and of ours' paths, and the seconds of each path's first call."""
    ours, theirs = pair(preset, 32, bench.device)
    start = torch.full((batch, 1), ours.config.sos_token_id, device=bench.device)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    calls = {
        "hf": partial(theirs.generate, start, **options),
        "ours": partial(ours.generate, start, **options),
        # disable_compile: on an accelerator generate() compiles a static-cache decode step by itself.
        "static": partial(ours.generate, start, cache_implementation="static", disable_compile=True, **options),
        "compiled": partial(fast_generate, ours, start, compile=True, **options),
        "auto": partial(fast_generate, ours, start, **options),
    }
    if not with_compile:
        del calls["compiled"]
    first = {}
    with torch.no_grad():
        for name, call in calls.items():  # the warm-up; for a compiled path, its compilation
            begin = time.perf_counter()
            call()
            bench.sync and bench.sync()
            first[name] = time.perf_counter() - begin
        run = bench.time(calls, repeats, warmup=0)
    forget(ours)
    torch.compiler.reset()
    return {
        "case": f"{preset}, batch {batch}, {new_tokens} tokens",
        **{f"{name}_tok_s": batch * new_tokens / seconds for name, seconds in run.seconds.items()},
        **{f"{name}_identical": bool(torch.equal(out, run.outputs["hf"])) for name, out in run.outputs.items()},
        "first_call_s": {name: first[name] for name in ("compiled", "auto") if name in first},
        "load": run.load,
    }


MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
from results import transformers_twin
from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
torch.set_num_threads({threads})
ours = ImageGPTForCausalImageModeling(ImageGPTConfig.from_preset({preset!r}, {n_px})).eval()
model = ours if {which!r} == "ours" else transformers_twin(ours)
x = torch.randint(0, 512, ({batch}, {n_px} ** 2))
def rss(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets the peak-RSS counter (VmHWM) to the current RSS
before = rss("VmRSS:")
with torch.no_grad():
    model(x, use_cache=False)
print(rss("VmHWM:") - before)
"""


def memory(bench: Bench, preset: str, n_px: int, batch: int) -> dict:
    """Peak bytes of one forward above what was held before it: on CPU in a fresh process each, on CUDA in this one."""
    row, before = {"case": case_name(preset, n_px * n_px, batch)}, os.getloadavg()[0]
    for name, model in zip(("ours", "hf"), pair(preset, n_px, bench.device) if bench.device.type == "cuda" else ()):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        try:
            with torch.no_grad():
                model(pixels(batch, n_px * n_px, bench.device), use_cache=False)
            row[f"{name}_bytes"] = torch.cuda.max_memory_allocated() - held
        except torch.OutOfMemoryError:  # transformers' eager attention at large batches
            row[f"{name}_bytes"] = float("nan")
        del model
        torch.cuda.empty_cache()
    for name in ("ours", "hf") if bench.device.type == "cpu" else ():
        code = MEMORY_CHILD.format(
            here=str(HERE), threads=torch.get_num_threads(), preset=preset, n_px=n_px, which=name, batch=batch
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"the {name} memory child failed:\n{child.stderr[-2000:]}")
        row[f"{name}_bytes"] = int(child.stdout.split()[-1])
    return {**row, "load": (before, os.getloadavg()[0])}


def mfu(bench: Bench, batch: int, repeats: int) -> list[dict]:
    """bf16 (autocast) training step of iGPT-S at 32x32: ours eager and torch.compile'd."""
    rows = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = ImageGPTForCausalImageModeling(ImageGPTConfig.from_preset("small", 32)).to(bench.device)
        flops = 3 * forward_flops(model.config, batch, 1024)
        step = train_step(
            torch.compile(model) if compiled else model, pixels(batch, 1024, bench.device), torch.bfloat16
        )
        run = bench.time({"step": step}, repeats, warmup=2)
        rows.append({"compiled": compiled, "batch": batch, "s": run.seconds["step"], "flops": flops, "load": run.load})
        del model, step
        torch.compiler.reset()
    return rows


def processor(bench: Bench) -> list[dict]:
    from bench_processor import run  # benchmarks/bench_processor.py, next to this script

    return run(num_images=64 if bench.quick else 256, repeats=1 if bench.quick else 3)


# -------------------------------------------------------------------------------------------------------- report


def speedup(base: float, ours: float) -> str:
    return f"**{base / ours:.2f}x**"


def render(bench: Bench, results: dict, command: str) -> str:
    peak = results["matmul"]
    share = lambda r: f"**{r['flops'] / r['ours_s'] / peak['bf16' if r['bf16'] else 'fp32']:.0%}**"  # noqa: E731
    out = [
        f"`{command}`, {results['date']}, {time.perf_counter() - bench.start:.0f} s.",
        f"Machine: {results['machine']}; {load_note(results['load_at_start'])}.",
        f"Large matmul ({results['matmul_size']}^3): "
        + ", ".join(f"{rate / 1e9:,.1f} GFLOP/s {name}" for name, rate in peak.items())
        + f". {LOAD_NOTE}",
    ]

    def section(title: str, header: list[str], rows: list[list], *notes: str) -> None:
        if rows:
            out.extend([f"### {title}", table(header, rows), *notes])

    section(
        "Forward (eval, no grad)",
        ["case", "ours (img/s)", "transformers (img/s)", "speedup", "max logit diff", "ours GFLOP/s (of large matmul)"]
        + ["load"],
        [
            [
                r["case"],
                f"{r['batch'] / r['ours_s']:.2f}",
                f"{r['batch'] / r['hf_s']:.2f}",
                speedup(r["hf_s"], r["ours_s"]),
            ]
            + [
                f"{r['max_abs_logit_diff']:.1e}",
                f"{r['flops'] / r['ours_s'] / 1e9:,.1f} ({share(r)})",
                load(r["load"]),
            ]
            for r in results["forward"]
        ],
    )
    section(
        "Peak memory of one forward (eval, no grad)",
        ["case", "ours (MiB)", "transformers (MiB)", "ours / transformers", "load"],
        [
            [r["case"], f"{r['ours_bytes'] / 2**20:,.0f}", f"{r['hf_bytes'] / 2**20:,.0f}"]
            + [f"**{r['ours_bytes'] / r['hf_bytes']:.3f}**", load(r["load"])]
            for r in results["memory"]
        ],
    )
    section(
        "Training step (forward + backward + AdamW), the defaults a user gets",
        ["case", "ours (s)", "transformers (s)", "speedup", "load"],
        [
            [r["case"], f"{r['ours_s']:.3f}", f"{r['hf_s']:.3f}", speedup(r["hf_s"], r["ours_s"]), load(r["load"])]
            for r in results["training"]
        ],
        "Each model with its default attention: ours sdpa, except in CPU training with attention dropout, where the "
        "model runs its blockwise attention (it skips the masked half of sdpa's CPU dropout path); transformers' eager.",
    )
    section(
        "Greedy generation from SOS (tokens/s)",
        ["case", "transformers generate()", *GENERATION_PATHS.values(), "first call (s)", "load"],
        [
            [r["case"], f"{r['hf_tok_s']:,.1f}"]
            + [
                f"{r[f'{p}_tok_s']:,.1f} ({speedup(r[f'{p}_tok_s'], r['hf_tok_s'])})"
                + ("" if r[f"{p}_identical"] else " (tokens differ!)")
                if f"{p}_tok_s" in r
                else "not run"
                for p in GENERATION_PATHS
            ]
            + [", ".join(f"{p} {s:.0f}" for p, s in r["first_call_s"].items()), load(r["load"])]
            for r in results["generation"]
        ],
        "Speedups against transformers' `generate()` on the same weights; every path gave transformers' tokens unless "
        'marked. ours generate(): transformers\' `DynamicCache`; static cache: `cache_implementation="static"`, eager; '
        "`fast_generate(compile=True)`: a static cache and a compiled decode step (CUDA graphs on CUDA); "
        "`fast_generate()`: what sample() and complete() run (compiled from 20M parameters, eager below). first call: "
        "its untimed warm-up, the compilation included. benchmarks/decode_ceiling.py puts the paths against the matmul "
        "ceiling, with bfloat16 and int8 weights.",
    )
    section(
        "Model FLOPs utilization: iGPT-S training step at 32x32, bf16 autocast",
        ["run", "batch", "step (ms)", "TFLOP/s", "MFU vs datasheet peak", "vs measured bf16 matmul", "load"],
        [
            [f"ours, {'`torch.compile(model)`' if r['compiled'] else 'eager'}", r["batch"], f"{r['s'] * 1e3:.1f}"]
            + [f"{r['flops'] / r['s'] / 1e12:.1f}", f"**{r['flops'] / r['s'] / results.get('peak_bf16', 1):.1%}**"]
            + [f"{r['flops'] / r['s'] / peak.get('bf16', 1):.1%}", load(r["load"])]
            for r in results["mfu"]
        ],
        f"Peak: {results.get('peak_source')}.",
    )
    section(
        "Image processor throughput",
        ["case", "images", "ours (img/s)", "transformers (img/s)", "speedup", "ids identical", "load"],
        [
            [r["case"], r["images"], f"{r['ours_images_per_s']:,.0f}", f"{r['transformers_images_per_s']:,.0f}"]
            + [f"**{r['speedup']:.1f}x**", f"{r['ids_agree']:.2%}", load(r["load"])]
            for r in results["processor"]
        ],
        "From `run()` of benchmarks/bench_processor.py (CPU work; see its own section).",
    )
    if bench.skipped:
        out.append(f"Skipped (time budget spent): {', '.join(bench.skipped)}.")
    out += [f"Failed in this run: {error}" for error in results["errors"]]
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------- main


def plan(bench: Bench) -> list[tuple]:
    """What a run measures, in order: (results key, cases, measure). iGPT-S at 4,096 tokens is only in the CPU memory
    measurement: transformers needs minutes per forward there on CPU. On CUDA the most important comes first (a
    `--budget_s` cuts the tail)."""
    quick, fp32, bf16 = bench.quick, torch.float32, torch.bfloat16
    repeats = 1 if quick else 3
    fewer = max(1, repeats - 1)
    if bench.device.type == "cuda":
        forwards = [("small", 32, 64, dtype, repeats) for dtype in (fp32, bf16)]
        forwards += [("small", 64, 8, dtype, repeats) for dtype in (fp32, bf16)]
        trainings = [("small", 32, 16, None, repeats, autocast) for autocast in (None, bf16)]
        generations = [("small", batch, 256, True, 2) for batch in (1, 8)]
        memories, mfus = [("small", 64, 1), ("small", 64, 8)], [(64, repeats)]
    else:
        forwards = [("tiny", 32, 4, fp32, repeats), ("tiny", 64, 1, fp32, repeats)]
        forwards += [] if quick else [("small", 32, 1, fp32, repeats)]
        memories = [("tiny", 64, 1)] + ([] if quick else [("small", 64, 1)])
        trainings = [("tiny", 32, 4, dropout, fewer) for dropout in (None, 0.0)]
        trainings += [] if quick else [("small", 32, 1, dropout, fewer) for dropout in (None, 0.0)]
        generations = [("tiny", 1, 64, True, fewer), ("tiny", 8, 64, False, fewer)]
        if not quick:
            generations = [("tiny", 1, 1024), ("tiny", 8, 512), ("small", 1, 128), ("small", 8, 128)]
            generations = [(*case, True, fewer) for case in generations]
        mfus = []
    cases = {"forward": forwards, "memory": memories, "training": trainings, "generation": generations}
    cases.update(mfu=mfus, processor=[()])
    order = ["forward", "memory", "training", "generation", "processor"]  # on CPU the quick figures first
    if bench.device.type == "cuda":
        order = ["generation", "mfu", "forward", "training", "memory", "processor"]
    return [(key, cases[key], partial(globals()[key], bench)) for key in order]  # each key names its function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="Tiny model and short runs only: checks the script.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--output", type=Path, default=None, help="RESULTS.md to write this device's section into.")
    parser.add_argument("--budget_s", type=float, default=None, help="Skip measurements once this many s have passed.")
    parser.add_argument("--json", type=Path, default=None, help="Also dump the raw numbers here.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    bench, cuda = Bench(args), args.device == "cuda"
    results: dict = {"date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "load_at_start": os.getloadavg()[0]}
    results["machine"] = machine()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
        props = torch.cuda.get_device_properties(0)
        results["machine"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB); host: {results['machine']}"
    sizes = {"fp32": (torch.float32, 8192 if cuda else 1024 if bench.quick else 2048)}
    sizes.update({"bf16": (torch.bfloat16, 8192)} if cuda else {})
    results["matmul"] = {name: bench.matmul_rate(*size) for name, size in sizes.items()}
    results["matmul_size"] = sizes["fp32"][1]
    if cuda:
        key = next((k for k in BF16_PEAKS if k in torch.cuda.get_device_name()), None)
        results["peak_bf16"] = BF16_PEAKS[key] if key else results["matmul"]["bf16"]
        results["peak_source"] = (
            f"{results['peak_bf16'] / 1e12:.0f} TFLOP/s, NVIDIA's dense bf16 datasheet figure for {key}"
            if key
            else "no datasheet figure known for this GPU: the measured bf16 matmul rate"
        )
    results.update({key: [] for key in ("forward", "memory", "training", "generation", "mfu", "processor", "errors")})
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    heading = "## CUDA" if cuda else "## CPU"

    def emit() -> str:
        section = render(bench, results, command)
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        if args.output is not None:
            replace_section(args.output, heading, section, preamble=HEADER, arg="--output")
        return section

    # Each step is independent: one that fails is reported and the run goes on; results are written after each.
    for name, cases, measure in plan(bench):
        print(f"[bench] {time.perf_counter() - bench.start:6.0f} s: {name}", file=sys.stderr)
        try:
            for row in bench.each(name, cases, measure):
                results[name] += row if isinstance(row, list) else [row]
        except Exception as error:  # noqa: BLE001 (a benchmark reports what broke and carries on)
            results["errors"].append(f"{name}: {type(error).__name__}: {str(error)[:300]}")
            print(f"[bench] {name} failed: {error!r}", file=sys.stderr)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        emit()
    # The matmul rate again at the end of the run; the better of the two measurements is kept.
    results["matmul"] = {name: max(rate, bench.matmul_rate(*sizes[name])) for name, rate in results["matmul"].items()}
    print(f"{heading}\n\n{emit()}")


if __name__ == "__main__":
    main()
