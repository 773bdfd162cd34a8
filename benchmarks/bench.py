"""Side-by-side benchmark of this package's Image GPT against transformers' ImageGPT, on the same weights.

One run measures, for both implementations: forward images/s (1,024 and 4,096 tokens), peak memory of a forward,
the time of a training step (forward + backward + AdamW; on CPU with dropout, ours also with the opt-in blockwise
attention), greedy generation tokens/s (default `generate()`, static cache, static cache + torch.compile; batch 1 and
8; tokens checked identical), the image processor's images/s (from benchmarks/bench_processor.py), and how close the
forward runs to the machine's matmul rate. On CUDA it adds bf16 and the model FLOPs utilization of an iGPT-S training
step. On CPU it also compares its speedups with those of an earlier run (`PREVIOUS_CPU`). It prints markdown and,
with `--output`, writes it into RESULTS.md, replacing only this device's section.

    python benchmarks/bench.py --device cpu [--quick] [--threads N] [--output benchmarks/RESULTS.md]
    python benchmarks/bench.py --device cuda --output benchmarks/RESULTS.md

Both models are built from one config and carry the same random weights (transformers' loads ours' state dict); both
get the same inputs. Timings are medians over repeats that alternate between the two implementations, after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from results import cpu_name  # noqa: E402  (benchmarks/results.py; the other scripts import it from here too)

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402
from image_gpt_hf.fast_decoding import fast_generate, forget  # noqa: E402
from image_gpt_hf.modeling_imagegpt import BLOCKWISE_SDPA  # noqa: E402
from image_gpt_hf.safe_io import atomic_file  # noqa: E402
from image_gpt_hf.transformers_compat import builtin_imagegpt  # noqa: E402

hf, hf_configuration = builtin_imagegpt("modeling_imagegpt"), builtin_imagegpt("configuration_imagegpt")
if hf is None or hf_configuration is None:  # every figure here is a comparison with it
    raise SystemExit(f"transformers {transformers.__version__} has no built-in ImageGPT to compare with: skipped.")
HFConfig = hf_configuration.ImageGPTConfig

PROCESSOR_SECTION = "## Image processor"
HEADER = """# Benchmarks

This package's Image GPT against transformers' `ImageGPT` (`transformers.models.imagegpt`), measured side by side
in one run of `benchmarks/bench.py` on the same weights and inputs; see benchmarks/README.md for how to run it and
for the fast generation paths. Every figure below comes from the run whose command heads its section. `tiny` and
`small` are the presets of `ImageGPTConfig.from_preset` (tiny: 6 layers, 128 wide, 4 heads; small = iGPT-S: 24
layers, 512 wide, 8 heads, 76M parameters); 32x32 images are 1,024 tokens, 64x64 are 4,096.

Method. Forward: eval mode, `torch.no_grad()`, `use_cache=False`, images/s = batch / median time. Training step:
train mode (the configs' default dropout 0.1 unless stated), `model(x, labels=x)`, backward, `AdamW.step()`,
`zero_grad()`; ours with its default attention (sdpa) and, on CPU with dropout, also with the opt-in blockwise
attention (`attn_implementation="imagegpt_blockwise_sdpa"`) on the same weights. Generation: greedy, from the SOS
token, `min_new_tokens = max_new_tokens`; tokens/s = batch x new tokens / median wall time of a whole `generate()`
call; "identical" means each path's tokens equal transformers'. Static cache + compile: on CUDA `generate()` compiles
its decode step itself (`compile_config=CompileConfig(fullgraph=True, dynamic=False, mode=...)`); on CPU, where it
does not, a copy of the model whose `forward` is `torch.compile(forward, fullgraph=True, dynamic=False, mode=...)`
generates with `cache_implementation="static"`; the one-time compilation is timed apart and left out.
Timed repeats alternate between the implementations. Peak memory on CPU: each forward runs in a fresh subprocess
that loads the shared weights, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs one forward and
reports `VmHWM` minus the RSS just before the forward; on CUDA, `torch.cuda.max_memory_allocated()` over the
forward minus the memory allocated before it. FLOPs: matmuls `2 x tokens x (12 d^2 L + d V)` (V = 512 palette
outputs) plus causal attention `2 x L x T^2 x d` per sequence (QK^T and PV, each `2 T^2 d`, counted for the
causal half); a training step is 3x its forward. The "large matmul" reference is a square product measured in the
same run.
"""

# Speedups over transformers' ImageGPT in the CPU run of benchmarks/RESULTS.md at commit 826ec07 (AMD EPYC, 2 cores,
# 2 torch threads, torch 2.13.0, transformers 5.23.0; `python benchmarks/bench.py --device cpu --output
# benchmarks/RESULTS.md`), made with the fast paths PREVIOUS_CPU_CODE describes. The CPU section compares this run
# with them, case by case (a case of this run that the previous one did not measure is left out).
PREVIOUS_CPU = {
    "commit": "826ec07",
    # (preset, tokens, batch): forward speedup, fp32
    "forward": {("tiny", 1024, 4): 4.95, ("tiny", 4096, 1): 8.89, ("small", 1024, 1): 2.10},
    # (preset, tokens, batch): peak memory of a forward, ours / transformers
    "memory": {("tiny", 4096, 1): 0.055, ("small", 4096, 1): 0.073},
    # (preset, batch, dropout): training-step speedup, fp32 (with dropout, the blockwise attention was used by itself)
    "training": {("tiny", 4, 0.1): 2.30, ("tiny", 4, 0.0): 2.44, ("small", 1, 0.1): 2.13, ("small", 1, 0.0): 1.47},
    # (preset, batch, new tokens): greedy tokens/s speedups of default generate(), static cache, static cache + compile
    "generation": {
        ("tiny", 1, 1024): (1.57, 1.23, 2.10),
        ("tiny", 8, 512): (1.36, 1.13, 1.52),
        ("small", 1, 128): (1.30, 1.13, 1.49),
        ("small", 8, 128): (1.21, 1.19, 1.38),
    },
}
PREVIOUS_CPU_CODE = (
    "The previous run's model computed its projections from their weights directly (one `addmm`, no module call), "
    "fused the quick-gelu MLP into one elementwise kernel, wrote `generate()`'s KV cache in place (buffers that "
    "doubled when full) and ran a lean one-token decode step, and used the blockwise attention by itself for CPU "
    "training with dropout; its compiled generation was `generate()`'s own compile of the decode step. Those paths "
    "are gone: every module runs its own `forward`, `generate()` uses transformers' `DynamicCache` (which "
    "concatenates at every token), the blockwise attention is opt-in, and on CPU the compiled path compiles the "
    "forward of a copy of the model."
)


# ------------------------------------------------------------------------------------------------------- machinery


class Bench:
    def __init__(self, device: str, quick: bool, budget_s: float | None):
        self.device = torch.device(device)
        self.quick = quick
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.skipped: list[str] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def over_budget(self, what: str) -> bool:
        """True (and noted) when the run's time budget is spent, so that later measurements are skipped."""
        if self.budget_s is not None and time.perf_counter() - self.start > self.budget_s:
            self.skipped.append(what)
            return True
        return False

    def compare(self, functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
        """Median seconds of each function; the timed repeats alternate between the functions."""
        for function in functions.values():
            for _ in range(warmup):
                function()
        times: dict[str, list[float]] = {name: [] for name in functions}
        for _ in range(repeats):
            for name, function in functions.items():
                gc.collect()
                self.sync()
                start = time.perf_counter()
                function()
                self.sync()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(values) for name, values in times.items()}


def bench_config(preset: str, n_px: int, dropout: float | None = None, **fields) -> ImageGPTConfig:
    """The config of a preset, with every dropout set to `dropout` (None: the preset's default)."""
    overrides = {} if dropout is None else {"attn_pdrop": dropout, "resid_pdrop": dropout, "embd_pdrop": dropout}
    return ImageGPTConfig.from_preset(preset, n_px, **overrides, **fields)


def build_pair(preset: str, n_px: int, device: torch.device, dropout: float | None = None, seed: int = 0):
    """(ours, transformers') causal models of one preset with the same random weights, in eval mode."""
    config = bench_config(preset, n_px, dropout)
    torch.manual_seed(seed)
    ours = ImageGPTForCausalImageModeling(config).to(device).eval()
    hf_fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "attn_pdrop", "resid_pdrop", "embd_pdrop")
    theirs = hf.ImageGPTForCausalImageModeling(HFConfig(**{k: getattr(config, k) for k in hf_fields}))
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys  # unexpected: only transformers 4's mask buffers
    return ours, theirs.to(device).eval()


def pixels(batch: int, length: int, device: torch.device, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def forward_flops(config: ImageGPTConfig, batch: int, tokens: int) -> float:
    """Matmul FLOPs of one forward plus causal attention (see the method note)."""
    d, layers, inner = config.n_embd, config.n_layer, config.n_inner or 4 * config.n_embd
    dense = 2 * batch * tokens * (layers * (4 * d * d + 2 * d * inner) + d * (config.vocab_size - 1))
    attention = 2 * layers * batch * tokens * tokens * d
    return float(dense + attention)


def matmul_rate(bench: Bench, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a square `size` matrix product: the best of `repeats` after warm-up, the machine's practical peak
    (the best, not the median: on a shared machine the least disturbed repeat is the closest to the hardware)."""
    a = torch.randn(size, size, device=bench.device, dtype=dtype)
    b = torch.randn(size, size, device=bench.device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        bench.sync()
        start = time.perf_counter()
        torch.mm(a, b)
        bench.sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def since_previous(what: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """The "since the previous run" note under a CPU table: `what` for the cases both runs measured."""
    commit = PREVIOUS_CPU["commit"]
    if not rows:
        return ["", f"Since the previous run (`{commit}`): it measured none of these cases."]
    return ["", f"Since the previous run (`{commit}` -> this run): {what}.", "", table(header, rows)]


def change(before: float, now: float, digits: int = 2, unit: str = "x") -> str:
    return f"{before:.{digits}f}{unit} -> **{now:.{digits}f}{unit}**"


# --------------------------------------------------------------------------------------------------- measurements


def bench_forward(bench: Bench, cases: list[tuple[str, int, int]], dtype: torch.dtype, repeats: int) -> list[dict]:
    return [
        forward_case(bench, preset, n_px, batch, dtype, repeats)
        for preset, n_px, batch in cases
        if not bench.over_budget(f"forward {preset} {n_px}x{n_px} {dtype}")
    ]


def forward_case(bench: Bench, preset: str, n_px: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    ours, theirs = build_pair(preset, n_px, bench.device)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = pixels(batch, n_px * n_px, bench.device)
    with torch.no_grad():
        diff = (ours(x, use_cache=False).logits.float() - theirs(x, use_cache=False).logits.float()).abs().max()
        seconds = bench.compare(
            {"ours": lambda: ours(x, use_cache=False), "transformers": lambda: theirs(x, use_cache=False)}, repeats
        )
    return {
        "preset": preset,
        "tokens": n_px * n_px,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "ours_s": seconds["ours"],
        "transformers_s": seconds["transformers"],
        "max_abs_logit_diff": float(diff),
        "flops": forward_flops(ours.config, batch, n_px * n_px),
    }


def bench_training(
    bench: Bench, cases: list[tuple[str, int, int, float | None]], repeats: int, autocast: torch.dtype | None = None
) -> list[dict]:
    """Training-step seconds of transformers' model and ours (default attention); on CPU with attention dropout,
    also of ours with the opt-in blockwise attention, on the same weights."""
    rows = []
    for preset, n_px, batch, dropout in cases:
        if bench.over_budget(f"training {preset} batch {batch}"):
            continue
        ours, theirs = build_pair(preset, n_px, bench.device, dropout=dropout)
        x = pixels(batch, n_px * n_px, bench.device)
        models = {"ours": ours, "transformers": theirs}
        if bench.device.type == "cpu" and ours.config.attn_pdrop > 0:
            blockwise_config = bench_config(preset, n_px, dropout, attn_implementation=BLOCKWISE_SDPA)
            models["ours_blockwise"] = blockwise_copy(ours, blockwise_config, x)
        steps = {name: make_train_step(model.train(), x, bench.device, autocast) for name, model in models.items()}
        try:
            seconds = bench.compare(steps, repeats)
        except torch.OutOfMemoryError as error:  # transformers' eager attention at large batches
            rows.append({"preset": preset, "batch": batch, "error": f"out of memory: {str(error)[:80]}"})
            continue
        finally:
            del ours, theirs, models, steps
            gc.collect()
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(
            {
                "preset": preset,
                "tokens": n_px * n_px,
                "batch": batch,
                "dropout": 0.1 if dropout is None else dropout,
                "precision": "fp32" if autocast is None else f"{autocast} autocast".replace("torch.", ""),
                **{f"{name}_s": value for name, value in seconds.items()},
                "flops": 3 * forward_flops(ImageGPTConfig.from_preset(preset, n_px), batch, n_px * n_px),
            }
        )
    return rows


def blockwise_copy(ours: ImageGPTForCausalImageModeling, config: ImageGPTConfig, x: torch.Tensor):
    """A model of `config` (ours' config with `attn_implementation=BLOCKWISE_SDPA`) carrying ours' weights.

    Checked in effect: in train mode its attention dropout draws differ from sdpa's, so under one seed the logits of
    the two must differ (with the same attention they would be equal)."""
    model = ImageGPTForCausalImageModeling(config)
    model.load_state_dict(ours.state_dict())
    model.to(x.device).train()
    ours.train()
    logits = []
    with torch.no_grad():
        for candidate in (ours, model):
            torch.manual_seed(0)
            logits.append(candidate(x, use_cache=False).logits)
    if torch.equal(logits[0], logits[1]):
        raise RuntimeError(f"attn_implementation={BLOCKWISE_SDPA!r} is not in effect: it computed what sdpa computes.")
    return model


def make_train_step(model, x: torch.Tensor, device: torch.device, autocast: torch.dtype | None) -> Callable[[], None]:
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_generation(
    bench: Bench,
    cases: list[tuple[str, int, int, bool]],
    repeats: int,
    compile_mode: str,
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """Greedy tokens/s of transformers' default generate() and of ours: default, static cache, static + compile."""
    rows = []
    for preset, batch, new_tokens, with_compile in cases:
        if bench.over_budget(f"generation {preset} batch {batch}"):
            continue
        rows.append(generation_case(bench, preset, batch, new_tokens, with_compile, repeats, compile_mode, dtype))
        torch.compiler.reset()
    return rows


def generation_case(
    bench: Bench,
    preset: str,
    batch: int,
    new_tokens: int,
    with_compile: bool,
    repeats: int,
    compile_mode: str,
    dtype: torch.dtype,
) -> dict:
    ours, theirs = build_pair(preset, 32, bench.device)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    start = torch.full((batch, 1), ours.config.vocab_size - 1, device=bench.device)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    paths = {
        "transformers": lambda: theirs.generate(start, **options),
        "ours_default": lambda: ours.generate(start, **options),
        # disable_compile: on an accelerator generate() compiles a static-cache decode step by itself.
        "ours_static": lambda: ours.generate(start, cache_implementation="static", disable_compile=True, **options),
        # What sample()/complete() run: compiled for models of 20M parameters and more (its first call compiles).
        "ours_auto": lambda: fast_generate(ours, start, **options),
    }
    row = {"preset": preset, "batch": batch, "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", "")}
    if with_compile:
        compiled, row["compile_mode"], row["compile_s"] = compiled_generate(bench, ours, start, options, compile_mode)
        paths["ours_static_compile"] = compiled
    with torch.no_grad():
        outputs = {name: path() for name, path in paths.items()}  # also the warm-up
        seconds = bench.compare(paths, repeats, warmup=0)
    for name in paths:
        row[f"{name}_tok_s"] = batch * new_tokens / seconds[name]
        row[f"{name}_identical"] = bool(torch.equal(outputs[name], outputs["transformers"]))
    forget(ours)
    return row


def compiled_generate(bench: Bench, model, start: torch.Tensor, options: dict, mode: str):
    """Greedy generation with a static cache and a compiled forward: compiles it (timed) and returns the call, the
    mode that compiled and the seconds the compilation took. Falls back to mode "default" if `mode` fails (e.g. CUDA
    graphs).

    On CUDA, `generate()` compiles its decode step itself when the cache is static; the `CompileConfig` says how.
    On CPU it does not compile, so a copy of the model gets a compiled `forward` (which then serves the prefill as
    well as the decode steps: two graphs, both in the timed compilation); `model` itself stays eager."""
    for attempt in dict.fromkeys([mode, "default"]):
        if bench.device.type == "cuda":
            compile_config = CompileConfig(fullgraph=True, dynamic=False, mode=attempt)

            def call(compile_config=compile_config):
                return model.generate(start, cache_implementation="static", compile_config=compile_config, **options)

        else:
            compiled = copy.deepcopy(model)
            compiled.forward = torch.compile(compiled.forward, fullgraph=True, dynamic=False, mode=attempt)

            def call(compiled=compiled):
                # disable_compile: the forward is compiled already; generate() must not wrap it in another compile.
                return compiled.generate(start, cache_implementation="static", disable_compile=True, **options)

        try:
            bench.sync()
            begin = time.perf_counter()
            with torch.no_grad():
                call()
            bench.sync()
            return call, attempt, time.perf_counter() - begin
        except Exception as error:  # noqa: BLE001
            print(f"[bench] compile mode {attempt!r} failed: {error!r}", file=sys.stderr)
            torch.compiler.reset()
    raise RuntimeError("torch.compile failed in every mode tried")


MEMORY_CHILD = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.transformers_compat import builtin_imagegpt
hf = builtin_imagegpt("modeling_imagegpt")
HFConfig = builtin_imagegpt("configuration_imagegpt").ImageGPTConfig
torch.set_num_threads({threads})
config = ImageGPTConfig.from_preset({preset!r}, {n_px})
if {which!r} == "ours":
    model = ImageGPTForCausalImageModeling(config)
else:
    fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    model = hf.ImageGPTForCausalImageModeling(HFConfig(**{{k: getattr(config, k) for k in fields}}))
model.load_state_dict(torch.load({weights!r}), strict=False)
model.eval()
x = torch.randint(0, 512, ({batch}, {n_px} * {n_px}), generator=torch.Generator().manual_seed(1))
def rss(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
before = rss("VmRSS:")
with torch.no_grad():
    model(x, use_cache=False)
print(json.dumps({{"peak_bytes": rss("VmHWM:") - before}}))
"""


def bench_memory(bench: Bench, cases: list[tuple[str, int, int]], threads: int) -> list[dict]:
    rows = []
    for preset, n_px, batch in cases:
        if bench.over_budget(f"memory {preset} {n_px}x{n_px}"):
            continue
        row = {"preset": preset, "tokens": n_px * n_px, "batch": batch}
        if bench.device.type == "cuda":
            x = pixels(batch, n_px * n_px, bench.device)
            for name, model in zip(("ours", "transformers"), build_pair(preset, n_px, bench.device)):
                try:
                    row[f"{name}_bytes"] = cuda_peak(model, x)
                except torch.OutOfMemoryError:
                    row[f"{name}_bytes"] = float("nan")
                del model
                torch.cuda.empty_cache()
        else:
            ours, _ = build_pair(preset, n_px, torch.device("cpu"))
            with tempfile.TemporaryDirectory() as tmp:
                weights = os.path.join(tmp, "weights.pt")
                torch.save(ours.state_dict(), weights)
                del ours
                for name in ("ours", "transformers"):
                    code = MEMORY_CHILD.format(
                        repo=str(Path(__file__).resolve().parents[1]),
                        threads=threads,
                        preset=preset,
                        n_px=n_px,
                        which=name,
                        weights=weights,
                        batch=batch,
                    )
                    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                    if result.returncode != 0:
                        raise RuntimeError(f"memory child failed:\n{result.stderr[-2000:]}")
                    row[f"{name}_bytes"] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
        rows.append(row)
    return rows


def cuda_peak(model, x: torch.Tensor) -> int:
    """Peak bytes allocated by one forward, above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(x, use_cache=False)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_processor(bench: Bench) -> tuple[list[dict], str]:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_processor import run
    except ImportError as error:
        return [], f"not measured: benchmarks/bench_processor.py could not be imported ({error})"
    if bench.over_budget("processor"):
        return [], "not measured: time budget spent"
    return run(num_images=64 if bench.quick else 256, repeats=1 if bench.quick else 3), ""


def bench_mfu(bench: Bench, batch: int, repeats: int) -> dict:
    """bf16 (autocast) training step of iGPT-S at 32x32: ours eager and torch.compile'd."""
    result = {"batch": batch}
    for name in ("eager", "compiled"):
        if bench.over_budget(f"mfu {name}"):
            continue
        ours, theirs = build_pair("small", 32, bench.device)
        del theirs
        model = ours.train()
        if name == "compiled":
            model = torch.compile(model)
        x = pixels(batch, 1024, bench.device)
        step = make_train_step(model, x, bench.device, torch.bfloat16)
        begin = time.perf_counter()
        step()
        bench.sync()
        result[f"{name}_first_step_s"] = time.perf_counter() - begin
        result[f"{name}_s"] = bench.compare({"step": step}, repeats, warmup=2)["step"]
        result["flops"] = 3 * forward_flops(ours.config, batch, 1024)
        del ours, model, step
        gc.collect()
        torch.cuda.empty_cache()
        torch.compiler.reset()
    return result


# -------------------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> str:
    text = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs); host: {text}"
    try:
        text += f"; load average at start {os.getloadavg()[0]:.1f}"
    except OSError:
        pass
    return (
        f"{text}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def render(bench: Bench, results: dict, command: str) -> str:
    device = bench.device.type
    out = [f"## {'CUDA' if device == 'cuda' else 'CPU'}", ""]
    out.append(f"`{command}`, {results['date']}, {results['elapsed_s']:.0f} s.")
    out.append(f"Machine: {results['machine']}.")
    peak = results["matmul"]
    size = results["matmul_size"]
    out.append(
        f"Large matmul ({size}x{size}x{size}, best of 5, measured at the start and at the end of the run, the "
        "better kept): " + ", ".join(f"{fmt(rate / 1e9)} GFLOP/s {name}" for name, rate in peak.items()) + "."
    )
    cpu = device == "cpu"
    if cpu:
        out += [
            "",
            f"Since the previous run (`{PREVIOUS_CPU['commit']}`, the CPU figures this section replaces): "
            + PREVIOUS_CPU_CODE
            + " A note under each table puts the previous run's figures next to this run's, for the cases both "
            "runs measured.",
        ]
    if results["forward"]:
        out += ["", "### Forward (eval, no grad)", ""]
        rows = []
        for r in results["forward"]:
            rows.append(
                [
                    r["preset"],
                    f"{r['tokens']:,}",
                    str(r["batch"]),
                    r["dtype"],
                    fmt(r["batch"] / r["ours_s"], 2),
                    fmt(r["batch"] / r["transformers_s"], 2),
                    f"**{r['transformers_s'] / r['ours_s']:.2f}x**",
                    f"{r['max_abs_logit_diff']:.1e}",
                ]
            )
        out.append(
            table(
                [
                    "model",
                    "tokens",
                    "batch",
                    "dtype",
                    "ours (img/s)",
                    "transformers (img/s)",
                    "speedup",
                    "max logit diff",
                ],
                rows,
            )
        )
        if cpu:
            previous = PREVIOUS_CPU["forward"]
            rows = [
                [
                    f"{r['preset']}, {r['tokens']:,} tokens, batch {r['batch']}",
                    change(before, r["transformers_s"] / r["ours_s"]),
                ]
                for r in results["forward"]
                if r["dtype"] == "float32" and (before := previous.get((r["preset"], r["tokens"], r["batch"])))
            ]
            out += since_previous("forward speedup over transformers", ["case", "speedup"], rows)
    if results["memory"]:
        out += ["", "### Peak memory of one forward (eval, no grad)", ""]
        rows = []
        for r in results["memory"]:
            ratio = r["ours_bytes"] / r["transformers_bytes"] if r["transformers_bytes"] else float("nan")
            rows.append(
                [
                    r["preset"],
                    f"{r['tokens']:,}",
                    str(r["batch"]),
                    fmt(r["ours_bytes"] / 2**20, 0),
                    fmt(r["transformers_bytes"] / 2**20, 0),
                    f"**{fmt(ratio, 3)}**",
                ]
            )
        out.append(
            table(["model", "tokens", "batch", "ours (MiB)", "transformers (MiB)", "ours / transformers"], rows)
        )
        if cpu:
            previous = PREVIOUS_CPU["memory"]
            rows = [
                [
                    f"{r['preset']}, {r['tokens']:,} tokens, batch {r['batch']}",
                    change(before, r["ours_bytes"] / r["transformers_bytes"], 3, ""),
                ]
                for r in results["memory"]
                if r["transformers_bytes"] and (before := previous.get((r["preset"], r["tokens"], r["batch"])))
            ]
            out += since_previous("peak memory, ours / transformers", ["case", "ours / transformers"], rows)
    if results["training"]:
        out += ["", "### Training step (forward + backward + AdamW)", ""]
        blockwise = any("ours_blockwise_s" in r for r in results["training"])
        header = ["model", "tokens", "batch", "precision", "dropout", "ours, sdpa (s)", "transformers (s)", "speedup"]
        header += ["ours, blockwise attention (s)", "speedup"] if blockwise else []
        rows = []
        for r in results["training"]:
            if "error" in r:
                rows.append([r["preset"], "", str(r["batch"]), "", "", r["error"]] + [""] * (len(header) - 6))
                continue
            row = [
                r["preset"],
                f"{r['tokens']:,}",
                str(r["batch"]),
                r["precision"],
                str(r["dropout"]),
                fmt(r["ours_s"], 3),
                fmt(r["transformers_s"], 3),
                f"**{r['transformers_s'] / r['ours_s']:.2f}x**",
            ]
            if blockwise and "ours_blockwise_s" in r:
                row += [fmt(r["ours_blockwise_s"], 3), f"**{r['transformers_s'] / r['ours_blockwise_s']:.2f}x**"]
            elif blockwise:
                row += ["n/a (no dropout: it is sdpa)", ""]
            rows.append(row)
        out.append(table(header, rows))
        out.append(
            "\nours, sdpa: the default attention. "
            + (
                "ours, blockwise attention: the same weights with the opt-in "
                '`attn_implementation="imagegpt_blockwise_sdpa"` (see README.md), which skips the masked half of '
                "CPU sdpa's dropout path; without dropout it hands over to sdpa, so it is measured with dropout only. "
                if blockwise
                else ""
            )
            + "Speedups are transformers' seconds over ours."
        )
        if cpu:
            previous = PREVIOUS_CPU["training"]
            rows = [
                [
                    f"{r['preset']}, batch {r['batch']}, dropout {r['dropout']}",
                    change(before, r["transformers_s"] / r["ours_s"]),
                    change(before, r["transformers_s"] / r["ours_blockwise_s"]) if "ours_blockwise_s" in r else "",
                ]
                for r in results["training"]
                if r.get("precision") == "fp32" and (before := previous.get((r["preset"], r["batch"], r["dropout"])))
            ]
            out += since_previous(
                "training-step speedup over transformers; with dropout, the previous run used the blockwise "
                "attention by itself",
                ["case", "ours, sdpa", "ours, blockwise attention"],
                rows,
            )
    if results["generation"]:
        out += ["", "### Greedy generation from SOS (tokens/s)", ""]
        rows = []
        paths = ("ours_default", "ours_static", "ours_static_compile", "ours_auto")
        for r in results["generation"]:
            base = r["transformers_tok_s"]

            def cell(name: str, r=r, base=base) -> str:
                key = f"{name}_tok_s"
                if key not in r:
                    return "not run"
                same = "" if r[f"{name}_identical"] else " (tokens differ!)"
                return f"{fmt(r[key])} (**{r[key] / base:.2f}x**){same}"

            compile_note = f"{r['compile_s']:.0f} s (mode {r['compile_mode']!r})" if "compile_s" in r else ""
            rows.append(
                [r["preset"], str(r["batch"]), str(r["new_tokens"]), r["dtype"], fmt(base)]
                + [cell(name) for name in paths]
                + [compile_note]
            )
        out.append(
            table(
                [
                    "model",
                    "batch",
                    "new tokens",
                    "dtype",
                    "transformers generate()",
                    "ours generate()",
                    "ours static cache",
                    "ours static cache + compile",
                    "ours fast_generate() (sample/complete)",
                    "compile time",
                ],
                rows,
            )
        )
        if device == "cuda":
            compiled_path = (
                '`generate(..., cache_implementation="static", compile_config=CompileConfig(fullgraph=True, '
                "dynamic=False, mode=...))`, with which `generate()` compiles its decode step itself"
            )
        else:
            compiled_path = (
                "a copy of the model whose `forward` is `torch.compile(model.forward, fullgraph=True, dynamic=False, "
                'mode=...)`, then `generate(..., cache_implementation="static")` (on CPU `generate()` does not compile '
                "by itself; this compiles the prefill and the decode step)"
            )
        out.append(
            "\nSpeedups are against transformers' default `generate()` on the same weights; all paths are greedy and "
            "gave the same tokens as transformers unless marked. ours generate(): the default, with transformers' "
            '`DynamicCache`; static cache: `cache_implementation="static"`, eager. The compiled path is '
            f"{compiled_path}, with the mode in the last column (see README.md); its one-time compilation is not in "
            "the timings. fast_generate(): `image_gpt_hf.fast_decoding.fast_generate`, the path sample() and "
            "complete() take (a static cache and a compiled decode step for models of 20M parameters and more, "
            "eager below; compiled in its warm-up call). benchmarks/decode_ceiling.py puts every path against the "
            "matmul ceiling, with bfloat16 and int8 weights."
        )
        if cpu:
            previous = PREVIOUS_CPU["generation"]
            rows = [
                [f"{r['preset']}, batch {r['batch']}, {r['new_tokens']} tokens"]
                + [
                    change(before, r[f"{name}_tok_s"] / r["transformers_tok_s"]) if f"{name}_tok_s" in r else "not run"
                    for name, before in zip(paths, befores)
                ]
                for r in results["generation"]
                if r["dtype"] == "float32" and (befores := previous.get((r["preset"], r["batch"], r["new_tokens"])))
            ]
            out += since_previous(
                "greedy tokens/s speedup over transformers",
                ["case", "ours generate()", "ours static cache", "ours static cache + compile"],
                rows,
            )
    if "mfu" in results and results["mfu"]:
        m = results["mfu"]
        peak_bf16 = results["peak_bf16_flops"]
        out += ["", "### Model FLOPs utilization: iGPT-S training step at 32x32, bf16 autocast", ""]
        rows = []
        for name in ("eager", "compiled"):
            if f"{name}_s" not in m:
                continue
            achieved = m["flops"] / m[f"{name}_s"]
            rows.append(
                [
                    f"ours, {name}" + (" (`torch.compile(model)`)" if name == "compiled" else ""),
                    str(m["batch"]),
                    fmt(m[f"{name}_s"] * 1e3),
                    fmt(achieved / 1e12),
                    f"**{achieved / peak_bf16:.1%}**",
                    f"{achieved / peak['bf16']:.1%}",
                ]
            )
        out.append(
            table(
                [
                    "run",
                    "batch",
                    "step (ms)",
                    "achieved TFLOP/s",
                    f"MFU vs {peak_bf16 / 1e12:.0f} TFLOP/s peak",
                    "vs measured bf16 matmul",
                ],
                rows,
            )
        )
        out.append(
            f"\nPeak: {results['peak_bf16_source']}. FLOPs per step: {m['flops'] / 1e12:.2f} TFLOP "
            "(3x the forward count of the method note)."
        )
    if results["forward"]:
        out += ["", "### How close the forward runs to the machine's matmul rate", ""]
        rows = []
        for r in results["forward"]:
            reference = peak["bf16"] if r["dtype"] == "bfloat16" else peak["fp32"]
            achieved = r["flops"] / r["ours_s"]
            rows.append(
                [
                    f"{r['preset']}, {r['tokens']:,} tokens, batch {r['batch']}, {r['dtype']}",
                    fmt(r["flops"] / 1e9),
                    fmt(achieved / 1e9),
                    fmt(r["flops"] / r["transformers_s"] / 1e9),
                    f"**{achieved / reference:.0%}**",
                ]
            )
        out.append(
            table(
                ["forward", "GFLOP", "ours (GFLOP/s)", "transformers (GFLOP/s)", "ours / large matmul"],
                rows,
            )
        )
    if any(results.get(key) for key in ("forward", "memory", "training", "generation", "mfu")):
        out += ["", "### Targets", "", table(["target", "case", "measured", "met"], target_rows(results, device))]
    out += ["", "### Image processor throughput", ""]
    if results["processor"]:
        rows = [
            [
                r["case"],
                str(r["images"]),
                fmt(r["ours_images_per_s"], 0),
                fmt(r["transformers_images_per_s"], 0),
                f"**{r['speedup']:.1f}x**",
                f"{r['ids_agree']:.2%}",
            ]
            for r in results["processor"]
        ]
        out.append(table(["case", "images", "ours (img/s)", "transformers (img/s)", "speedup", "ids identical"], rows))
        out.append("\nFrom `run()` of benchmarks/bench_processor.py (CPU work; see its own section below).")
    else:
        out.append(results["processor_note"])
    if bench.skipped:
        out += ["", f"Skipped (time budget spent): {', '.join(bench.skipped)}."]
    if results.get("errors"):
        out += ["", "Failed in this run:", ""] + [f"- {error}" for error in results["errors"]]
    return "\n".join(out) + "\n"


def target_rows(results: dict, device: str) -> list[list[str]]:
    """The project's targets against this run's figures."""
    rows = []

    def add(target: str, case: str, value: float, goal: float, unit: str = "x", lower_is_better: bool = False):
        met = value <= goal if lower_is_better else value >= goal
        shown = f"{value:.0%}" if unit == "%" else f"{value:.3f}" if unit == "" else f"{value:.2f}x"
        rows.append([target, case, shown, "yes" if met else "**no**"])

    cpu = device == "cpu"
    for r in results.get("forward", []):
        case = f"{r['preset']}, {r['tokens']:,} tokens, batch {r['batch']}, {r['dtype']}"
        if cpu and r["tokens"] == 1024:
            add("forward >= 3x transformers", case, r["transformers_s"] / r["ours_s"], 3.0)
            add(
                "forward >= 50% of a large matmul's FLOP/s",
                case,
                r["flops"] / r["ours_s"] / results["matmul"]["fp32"],
                0.5,
                "%",
            )
    if cpu:
        for r in results.get("training", []):
            if "error" not in r:
                case = f"{r['preset']}, batch {r['batch']}, dropout {r['dropout']}"
                add("training step >= 2x transformers", f"{case}, sdpa", r["transformers_s"] / r["ours_s"], 2.0)
                if "ours_blockwise_s" in r:
                    speedup = r["transformers_s"] / r["ours_blockwise_s"]
                    add("training step >= 2x transformers", f"{case}, blockwise attention", speedup, 2.0)
        for r in results.get("memory", []):
            if r["tokens"] == 4096:
                case = f"{r['preset']}, batch {r['batch']}"
                add(
                    "peak memory at 4,096 tokens <= 1/4",
                    case,
                    r["ours_bytes"] / r["transformers_bytes"],
                    0.25,
                    "",
                    True,
                )
    for r in results.get("generation", []):
        case = f"{r['preset']}, batch {r['batch']}, {r['new_tokens']} tokens"
        base = r["transformers_tok_s"]
        paths = [
            name
            for name in ("ours_default", "ours_static", "ours_static_compile", "ours_auto")
            if f"{name}_tok_s" in r
        ]
        best = max(r[f"{name}_tok_s"] for name in paths) / base
        identical = all(r[f"{name}_identical"] for name in paths)
        if cpu:
            add("default generate() >= 2x transformers (greedy)", case, r["ours_default_tok_s"] / base, 2.0)
            if "ours_auto_tok_s" in r:
                add("default sample() path >= 1.5x transformers (greedy)", case, r["ours_auto_tok_s"] / base, 1.5)
            add("fastest documented path >= 3x (greedy)", case, best, 3.0)
        else:
            add("fastest documented path >= 5x (greedy)", case, best, 5.0)
        rows.append(["identical greedy tokens", case, "yes" if identical else "no", "yes" if identical else "**no**"])
    mfu = results.get("mfu") or {}
    for name in ("eager", "compiled"):
        if f"{name}_s" in mfu:
            value = mfu["flops"] / mfu[f"{name}_s"] / results["peak_bf16_flops"]
            add("iGPT-S bf16 training step >= 40% of peak bf16", f"ours {name}, batch {mfu['batch']}", value, 0.4, "%")
    return rows


def write_results(path: Path, section: str, device: str) -> None:
    """Put this device's section into RESULTS.md, keeping the other device's and the image processor's sections."""
    content = path.read_text() if path.exists() else ""
    sections = {}
    for match in re.finditer(r"^(## .+?)\n(.*?)(?=^## |\Z)", content, flags=re.MULTILINE | re.DOTALL):
        sections[match.group(1).strip()] = match.group(0).rstrip() + "\n"
    sections["## CUDA" if device == "cuda" else "## CPU"] = section.rstrip() + "\n"
    order = ["## CPU", "## CUDA", PROCESSOR_SECTION]
    body = [sections[name] for name in order if name in sections]
    body += [text for name, text in sections.items() if name not in order]
    with atomic_file(path, overwrite=True, arg="--output") as staged:
        staged.write_text(HEADER + "\n" + "\n".join(body))


# ---------------------------------------------------------------------------------------------------------- main


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

    bench = Bench(args.device, args.quick, args.budget_s)
    cuda, quick = args.device == "cuda", args.quick
    results: dict = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(bench.device),
    }
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
        results["matmul"] = {
            "fp32": matmul_rate(bench, torch.float32, 8192),
            "bf16": matmul_rate(bench, torch.bfloat16, 8192),
        }
        name = torch.cuda.get_device_name()
        # Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity).
        peaks = {
            "H100 SXM": 989.4e12,
            "H100 80GB HBM3": 989.4e12,
            "H100 PCIe": 756.0e12,
            "H200": 989.4e12,
            "A100": 312e12,
        }
        key = next((k for k in peaks if k in name), None)
        results["peak_bf16_flops"] = peaks[key] if key else results["matmul"]["bf16"]
        results["peak_bf16_source"] = (
            f"{results['peak_bf16_flops'] / 1e12:.0f} TFLOP/s, NVIDIA's dense bf16 datasheet figure for {key}"
            if key
            else "no datasheet figure known for this GPU: the measured bf16 matmul rate"
        )
    else:
        results["matmul"] = {"fp32": matmul_rate(bench, torch.float32, 1024 if quick else 2048)}
    results["matmul_size"] = 8192 if cuda else 1024 if quick else 2048

    repeats = 1 if quick else 3
    if cuda:
        plan = cuda_plan(bench, repeats)
    else:
        plan = cpu_plan(bench, repeats, quick)
    for key in ("forward", "memory", "training", "generation", "processor"):
        results.setdefault(key, [])
    results["processor_note"] = ""
    results["errors"] = []

    def emit() -> str:
        results["elapsed_s"] = time.perf_counter() - bench.start
        section = render(bench, results, command)
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        if args.output is not None:
            write_results(args.output, section, args.device)
        return section

    # Each step is independent: one that fails is reported and the run goes on; results are written after each.
    for name, step in plan:
        print(f"[bench] {time.perf_counter() - bench.start:6.0f} s: {name}", file=sys.stderr)
        try:
            step(results)
        except Exception as error:  # noqa: BLE001 (a benchmark reports what broke and carries on)
            results["errors"].append(f"{name}: {type(error).__name__}: {str(error)[:300]}")
            print(f"[bench] {name} failed: {error!r}", file=sys.stderr)
        emit()
    print(emit())


def cpu_plan(bench: Bench, repeats: int, quick: bool) -> list[tuple[str, Callable[[dict], None]]]:
    """What the CPU run measures, in order. iGPT-S at 4,096 tokens is only in the memory measurement: transformers
    needs minutes per forward there on CPU."""
    forward = [("tiny", 32, 4), ("tiny", 64, 1)] + ([] if quick else [("small", 32, 1)])
    memory = [("tiny", 64, 1)] + ([] if quick else [("small", 64, 1)])
    training = [("tiny", 32, 4, None), ("tiny", 32, 4, 0.0)] + (
        [] if quick else [("small", 32, 1, None), ("small", 32, 1, 0.0)]
    )
    if quick:
        generation = [("tiny", 1, 64, True), ("tiny", 8, 64, False)]
    else:
        generation = [
            ("tiny", 1, 1024, True),
            ("tiny", 8, 512, True),
            ("small", 1, 128, True),
            ("small", 8, 128, True),
        ]
    fewer = max(1, repeats - 1)
    return [
        ("forward", lambda r: r["forward"].extend(bench_forward(bench, forward, torch.float32, repeats))),
        ("memory", lambda r: r["memory"].extend(bench_memory(bench, memory, torch.get_num_threads()))),
        ("training", lambda r: r["training"].extend(bench_training(bench, training, fewer))),
        ("generation", lambda r: r["generation"].extend(bench_generation(bench, generation, fewer, "default"))),
        ("processor", lambda r: run_processor(bench, r)),
        ("matmul again", lambda r: remeasure_matmul(bench, r, {"fp32": (torch.float32, 1024 if quick else 2048)})),
    ]


def cuda_plan(bench: Bench, repeats: int) -> list[tuple[str, Callable[[dict], None]]]:
    """What the CUDA run measures, most important first (a `--budget_s` cuts the tail)."""
    generation = [("small", 1, 256, True), ("small", 8, 256, True)]
    forward = [("small", 32, 64), ("small", 64, 8)]
    training = [("small", 32, 16, None)]
    return [
        ("generation", lambda r: r["generation"].extend(bench_generation(bench, generation, 2, "reduce-overhead"))),
        ("mfu", lambda r: r.__setitem__("mfu", bench_mfu(bench, batch=64, repeats=repeats))),
        ("forward fp32", lambda r: r["forward"].extend(bench_forward(bench, forward, torch.float32, repeats))),
        ("forward bf16", lambda r: r["forward"].extend(bench_forward(bench, forward, torch.bfloat16, repeats))),
        ("training fp32", lambda r: r["training"].extend(bench_training(bench, training, repeats))),
        (
            "training bf16",
            lambda r: r["training"].extend(bench_training(bench, training, repeats, autocast=torch.bfloat16)),
        ),
        ("memory", lambda r: r["memory"].extend(bench_memory(bench, [("small", 64, 1), ("small", 64, 8)], 0))),
        ("processor", lambda r: run_processor(bench, r)),
        (
            "matmul again",
            lambda r: remeasure_matmul(bench, r, {"fp32": (torch.float32, 8192), "bf16": (torch.bfloat16, 8192)}),
        ),
    ]


def remeasure_matmul(bench: Bench, results: dict, cases: dict[str, tuple[torch.dtype, int]]) -> None:
    """The matmul rate again at the end of the run; the better of the two measurements is kept."""
    for name, (dtype, size) in cases.items():
        results["matmul"][name] = max(results["matmul"][name], matmul_rate(bench, dtype, size))


def run_processor(bench: Bench, results: dict) -> None:
    results["processor"], results["processor_note"] = bench_processor(bench)


if __name__ == "__main__":
    main()
