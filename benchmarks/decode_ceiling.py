"""How fast one-token decoding could be on this machine: the matmuls alone against whole `generate()` calls.

A decode step multiplies one new token per sequence with every weight matrix of the model (the q|k|v, attention-output
and two MLP projections of every block, and the LM head). This script times exactly those products, as `torch.addmm`
on the model's own weights with a `(batch, d)` input and nothing else (no norms, no attention, no cache, no Python
around them), and reports the tokens/s that alone would allow, next to transformers' and this package's greedy
`generate()` on the same weights (ours: the default `generate()`, with transformers' `DynamicCache`; with `--compile`
also a static cache and a compiled forward, as benchmarks/bench.py times it). The matmul-only figure is an upper bound
for any fp32 implementation that calls torch's CPU GEMM, so it says which generation targets a machine can meet at all.

    python benchmarks/decode_floor.py                     # tiny and small (iGPT-S), batch 1 and 8
    python benchmarks/decode_floor.py --compile --update_results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from bench import Bench, compiled_generate, cpu_name  # benchmarks/bench.py, next to this script
from results import replace_section
from transformers.models.imagegpt import modeling_imagegpt as hf
from transformers.models.imagegpt.configuration_imagegpt import ImageGPTConfig as HFConfig

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling

SECTION = "## Decode ceiling (CPU)"


def matmul_only_step(model: ImageGPTForCausalImageModeling, batch: int, repeats: int) -> tuple[float, int]:
    """Median seconds of one decode step's matmuls (every projection and the LM head on a `(batch, d)` input), and
    the bytes of the weights they read."""
    weights = []
    for block in model.transformer.h:
        for proj in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            weights.append((proj.bias.detach(), proj.weight.detach()))  # Conv1D: (in, out)
    head = model.lm_head.weight.detach().t()
    inputs = {w.shape[0]: torch.randn(batch, w.shape[0]) for _, w in weights}

    def step():
        for bias, weight in weights:
            torch.addmm(bias, inputs[weight.shape[0]], weight)
        torch.mm(inputs[head.shape[0]], head)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    nbytes = sum(w.numel() * w.element_size() for _, w in weights) + head.numel() * head.element_size()
    return statistics.median(times), nbytes


def tokens_per_s(
    call: Callable[[], torch.Tensor], tokens: int, repeats: int, warmup: Callable[[], object] | None
) -> tuple[float, torch.Tensor]:
    """`tokens` / the median seconds of `call()` (after an untimed `warmup()`, if given), and its last output."""
    if warmup is not None:
        warmup()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return tokens / statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Also time ours with a static cache and a compiled forward (compiles once per model and batch size).",
    )
    parser.add_argument("--update_results", type=Path, default=None, help=f"Write the table as {SECTION!r} here.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    bench = Bench("cpu", quick=False, budget_s=None)
    header = [
        "model",
        "batch",
        "matmuls only (ms/step)",
        "weights streamed (GB/s)",
        "matmul-only ceiling (tok/s)",
        "transformers generate() (tok/s)",
        "ours generate() (tok/s)",
    ]
    header += ["ours static cache + compile (tok/s)"] if args.compile else []
    header += ["ceiling / transformers", "same tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    machine = (
        f"{cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(f"Machine: {machine}\n" + "\n".join(lines), file=sys.stderr, flush=True)  # progress, row by row
    for preset in args.presets:
        config = ImageGPTConfig.from_preset(preset)
        ours = ImageGPTForCausalImageModeling(config).eval()
        fields = HFConfig().to_dict()
        theirs = hf.ImageGPTForCausalImageModeling(
            HFConfig(**{k: v for k, v in config.to_dict().items() if k in fields})
        )
        theirs.load_state_dict(ours.state_dict())
        theirs.eval()
        for batch in args.batches:
            floor, weight_bytes = matmul_only_step(ours, batch, repeats=20)
            ceiling = batch / floor
            start = torch.full((batch, 1), config.sos_token_id)
            options = {
                "max_new_tokens": args.new_tokens,
                "min_new_tokens": args.new_tokens,
                "do_sample": False,
                "pad_token_id": 0,
            }
            tokens = batch * args.new_tokens
            short = {**options, "max_new_tokens": 8, "min_new_tokens": 8}  # a warm-up of the dynamic-cache paths
            reference, ids_theirs = tokens_per_s(
                partial(theirs.generate, start, **options),
                tokens,
                args.repeats,
                partial(theirs.generate, start, **short),
            )
            fast, ids_ours = tokens_per_s(
                partial(ours.generate, start, **options), tokens, args.repeats, partial(ours.generate, start, **short)
            )
            row = [
                preset,
                str(batch),
                f"{floor * 1e3:.2f}",
                f"{weight_bytes / floor / 1e9:.1f}",
                f"{ceiling:,.1f}",
                f"{reference:,.1f}",
                f"{fast:,.1f}",
            ]
            same = torch.equal(ids_ours, ids_theirs)
            if args.compile:
                # Its first call (the compilation) is the warm-up.
                call, _, _ = compiled_generate(bench, ours, start, options, "default")
                compiled, ids_compiled = tokens_per_s(call, tokens, args.repeats, None)
                row.append(f"{compiled:,.1f}")
                same = same and torch.equal(ids_compiled, ids_theirs)
                del call
                torch.compiler.reset()
            row += [f"{ceiling / reference:.2f}x", str(same)]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], file=sys.stderr, flush=True)

    command = "python benchmarks/decode_floor.py " + " ".join(sys.argv[1:])
    text = "\n\n".join(
        [
            f"`{command.strip()}` ({datetime.datetime.now():%Y-%m-%d %H:%M}, {time.perf_counter() - began:.0f} s; "
            f"{args.new_tokens} greedy tokens from SOS, median of {args.repeats} calls after a warm-up).",
            f"Machine: {machine}.",
            "It times one decode step's matmuls alone (every projection and the LM head as `torch.addmm` on the "
            "model's own weights with a `(batch, d)` input, nothing else) and gives the tokens/s that alone would "
            "allow, next to whole `generate()` calls on the same weights"
            + (
                " (ours static cache + compile: a copy of the model with `torch.compile`d forward and "
                '`cache_implementation="static"`, compiled before the timing)'
                if args.compile
                else ""
            )
            + ". A generation target of N times transformers' tokens/s is out of reach in fp32 on this machine "
            "where `ceiling / transformers` is below N; `same tokens`: every path of ours gave transformers' tokens.",
            "\n".join(lines),
        ]
    )
    print(text)
    if args.update_results is not None:
        replace_section(args.update_results, SECTION, text)


if __name__ == "__main__":
    main()
