"""How fast one-token decoding could be on this machine: the matmuls alone against every generation path.

A decode step multiplies one new token per sequence with every weight matrix of the model (the q|k|v, attention-output
and two MLP projections of every block, and the LM head). This script times exactly those products, as `torch.addmm`
on the model's own fp32 weights with a `(batch, d)` input and nothing else (no norms, no attention, no cache, no Python
around them), and reports the tokens/s that alone would allow: the ceiling for any fp32 implementation that calls
torch's CPU GEMM. Next to it, on the same weights, greedy tokens/s of transformers' `generate()` and of this package's
paths, each as a fraction of the ceiling and as a multiple of transformers': the default `generate()`
(transformers' `DynamicCache`), `fast_generate()` as sample()/complete() call it (auto: compiled for iGPT-S, eager for
the tiny model) and, with `--compile`, `fast_generate(compile=True)` (static cache + compiled decode step) in float32,
bfloat16 and int8 weight-only (`--precisions`). Lower-precision weights read fewer bytes than the fp32 ceiling assumes,
so they can pass it.

    python benchmarks/decode_ceiling.py                     # tiny and small (iGPT-S), batch 1 and 8
    python benchmarks/decode_ceiling.py --compile --update_results benchmarks/RESULTS.md
    python benchmarks/decode_ceiling.py --presets small --new_tokens 32 --threads 1 --compile  # shorter, shared

Timed calls alternate between the paths, round by round. On a machine shared with other jobs, `--threads 1`: torch's
CPU threads that outnumber the free cores wait for each other at every matmul.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from results import LOAD_NOTE, alternate, load, load_note, machine, replace_section, table, transformers_twin

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.fast_decoding import fast_generate, forget

SECTION = "## Decode ceiling (CPU)"


def matmul_only_steps(model: ImageGPTForCausalImageModeling, batch: int) -> tuple[Callable[..., None], int]:
    """A function running `max_new_tokens` decode steps' matmuls (every projection and the LM head on a `(batch, d)`
    input; it takes generate()'s options), and the bytes of the weights one step reads."""
    weights = []
    for block in model.transformer.h:
        for proj in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            weights.append((proj.bias.detach(), proj.weight.detach()))  # Conv1D: (in, out)
    head = model.lm_head.weight.detach().t()
    inputs = {w.shape[0]: torch.randn(batch, w.shape[0]) for _, w in weights}

    def steps(max_new_tokens: int, **generate_options) -> None:
        for _ in range(max_new_tokens):
            for bias, weight in weights:
                torch.addmm(bias, inputs[weight.shape[0]], weight)
            torch.mm(inputs[head.shape[0]], head)

    nbytes = sum(w.numel() * w.element_size() for _, w in weights) + head.numel() * head.element_size()
    return steps, nbytes


def seconds_in_the_forward(model: ImageGPTForCausalImageModeling, call: Callable[[], object]) -> tuple[float, float]:
    """Seconds of one `call()`, and of them the seconds inside the model's forward (the prefill and every decode
    step), timed by forward hooks on the model, which fire around each forward generate() runs, compiled or not; the
    rest is generate()'s own work around each step."""
    inside, begun = [], []
    hooks = [
        model.register_forward_pre_hook(lambda *_: begun.append(time.perf_counter())),
        model.register_forward_hook(lambda *_: inside.append(time.perf_counter() - begun[-1])),
    ]
    start = time.perf_counter()
    call()
    total = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    if not inside:
        raise RuntimeError("generate() ran no forward of the model with its hooks: the split cannot be measured.")
    return total, sum(inside)


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
        help="Also time fast_generate(compile=True) in each of --precisions (compiles once per model and batch size).",
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["float32", "bfloat16", "int8"], choices=["float32", "bfloat16", "int8"]
    )
    parser.add_argument("--update_results", type=Path, default=None, help=f"Write the table as {SECTION!r} here.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began, load_at_start = time.perf_counter(), os.getloadavg()[0]
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    paths = ["transformers generate()", "ours generate()", "ours fast_generate() (auto)"]
    paths += [f"compiled, {p}" for p in args.precisions] if args.compile else []
    header = ["model", "batch", "matmuls only (ms/step)", "weights streamed (GB/s)", "ceiling (tok/s)"]
    header += [f"{p} (tok/s)" for p in paths] + ["first call (s)", "same tokens (fp32)", "tokens as fp32 (bf16, int8)"]
    rows, steps = [], []
    print(f"Machine: {machine()}\n" + " | ".join(header), file=sys.stderr, flush=True)  # progress, row by row
    options = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    short = {**options, "max_new_tokens": 8, "min_new_tokens": 8}  # a warm-up of the eager paths
    for preset in args.presets:
        ours = ImageGPTForCausalImageModeling(ImageGPTConfig.from_preset(preset)).eval()
        theirs = transformers_twin(ours)
        for batch in args.batches:
            matmuls, weight_bytes = matmul_only_steps(ours, batch)
            start = torch.full((batch, 1), ours.config.sos_token_id)
            calls = {
                "ceiling": (matmuls, True),
                "transformers generate()": (partial(theirs.generate, start), True),
                "ours generate()": (partial(ours.generate, start), True),
                "ours fast_generate() (auto)": (partial(fast_generate, ours, start), False),
            }
            for precision in args.precisions if args.compile else []:
                low = None if precision == "float32" else precision
                calls[f"compiled, {precision}"] = (
                    partial(fast_generate, ours, start, compile=True, precision=low),
                    False,
                )
            first_call_s = []
            for call, short_warmup in calls.values():
                begin = time.perf_counter()
                call(**(short if short_warmup else options))  # the warm-up; for a compiled path, its compilation
                if not short_warmup:
                    first_call_s.append(f"{time.perf_counter() - begin:.0f}")
            run = alternate({n: partial(call, **options) for n, (call, _) in calls.items()}, args.repeats, warmup=0)
            if "compiled, float32" in calls:
                total, inside = seconds_in_the_forward(ours, partial(calls["compiled, float32"][0], **options))
                ms = [f"{1e3 * x / args.new_tokens:.2f}" for x in (total, inside, total - inside)]
                steps.append([preset, batch, ms[0], ms[1], f"{ms[2]} ({1 - inside / total:.1%})"])
            forget(ours)
            torch.compiler.reset()
            rates = {name: batch * args.new_tokens / s for name, s in run.seconds.items()}
            ceiling, base = rates.pop("ceiling"), rates["transformers generate()"]
            reference = run.outputs["transformers generate()"]
            low = [n for n in rates if "bfloat16" in n or "int8" in n]
            step = run.seconds["ceiling"] / args.new_tokens
            row = [preset, batch, f"{step * 1e3:.2f}", f"{weight_bytes / step / 1e9:.1f}", f"{ceiling:,.1f}"]
            row += [f"{rates[n]:,.1f} ({rates[n] / ceiling:.0%} of ceiling, {rates[n] / base:.2f}x)" for n in rates]
            row += [", ".join(first_call_s)]
            row += [all(torch.equal(run.outputs[n], reference) for n in rates if n not in low)]
            row += [", ".join(f"{(run.outputs[n] == reference).float().mean():.0%}" for n in low), load(run.load)]
            rows.append(row)
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)

    command = "python benchmarks/decode_ceiling.py " + " ".join(sys.argv[1:])
    text = [
        f"`{command.strip()}` ({datetime.datetime.now():%Y-%m-%d %H:%M}, {time.perf_counter() - began:.0f} s; "
        f"{args.new_tokens} greedy tokens from SOS, median of {args.repeats} calls after a warm-up, timed in "
        "rounds: every path, the ceiling's matmuls included, once per round in turn).",
        f"Machine: {machine()}; {load_note(load_at_start)}.",
        "ceiling: decode steps' matmuls alone (every projection and the LM head as `torch.addmm` on the "
        "model's own fp32 weights with a `(batch, d)` input, nothing else), as tokens/s. Each path: tokens/s (its "
        "fraction of the ceiling, its multiple of transformers'). ours generate(): the default, transformers' "
        "`DynamicCache`; fast_generate() (auto): what sample()/complete() run (compiles models of 20M parameters "
        "and more); compiled: `fast_generate(compile=True, precision=...)`, a static cache and a decode step "
        "compiled with `torch.compile(fullgraph=True, dynamic=False)`; bfloat16 weights and activations; int8 "
        "weight-only quantized projections and LM head with bfloat16 activations. first call: the seconds of the "
        "first, untimed call of each fast_generate() path in the order of the columns, its compilation included "
        "(auto compiles the float32 step that compiled float32 then reuses). same tokens: every fp32 path gave "
        "transformers' tokens; the next column: the share of bf16 and int8 tokens equal to transformers' (greedy "
        "decoding of random weights amplifies any rounding; benchmarks/precision_quality.py measures their cost "
        f"in bits per pixel). {LOAD_NOTE}",
        table(header + ["load"], rows),
    ]
    if steps:
        text.append(
            "Where a step's time goes on the compiled float32 path, in ms per step, from one more call after the "
            "timed ones (under a load that may differ from theirs: compare its parts with each other): the whole "
            "generate() call, the model's forward in it (timed by forward hooks on the model: the eager prefill and "
            "the compiled decode steps with their matmuls, norms, attention and cache writes), and generate()'s own "
            "work around each step (logits processing, stopping criteria, cache and input bookkeeping; its share of "
            "the call)."
        )
        text.append(table(["model", "batch", "whole generate()", "in the forward", "around it"], steps))
    print("\n\n".join(text))
    if args.update_results is not None:
        replace_section(args.update_results, SECTION, "\n\n".join(text))


if __name__ == "__main__":
    main()
