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
import functools
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from results import cpu_name, replace_section

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling
from image_gpt_hf.fast_decoding import _DECODERS, fast_generate, forget
from image_gpt_hf.transformers_compat import builtin_imagegpt

hf, hf_configuration = builtin_imagegpt("modeling_imagegpt"), builtin_imagegpt("configuration_imagegpt")
if hf is None or hf_configuration is None:  # the ceiling is read against transformers' generate()
    raise SystemExit(f"transformers {transformers.__version__} has no built-in ImageGPT to compare with: skipped.")
HFConfig = hf_configuration.ImageGPTConfig

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


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict]:
    """The median seconds of each call and its last output, timed in rounds (every call once per round, in turn), so
    that a change in the machine's load falls on all of them alike."""
    times, outputs = {name: [] for name in calls}, {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            outputs[name] = call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def seconds_in_the_step(model, batch: int, call: Callable[[], object]) -> tuple[float, float]:
    """Seconds of one `call()` of the compiled float32 path, and of them the seconds inside the model's forward (the
    eager prefill and the compiled decode steps); the rest is generate()'s own work around each step."""
    decoder = _DECODERS[model][(batch, None, torch.float32, model.device)].model
    inner, inside = decoder.forward, []

    @functools.wraps(inner)  # generate() reads the forward's signature
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        inside.append(time.perf_counter() - start)
        return out

    decoder.forward = timed
    start = time.perf_counter()
    call()
    total = time.perf_counter() - start
    decoder.forward = inner
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
    began = time.perf_counter()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    paths = ["transformers generate()", "ours generate()", "ours fast_generate() (auto)"]
    paths += [f"compiled, {p}" for p in args.precisions] if args.compile else []
    header = ["model", "batch", "matmuls only (ms/step)", "weights streamed (GB/s)", "ceiling (tok/s)"]
    header += [f"{p} (tok/s)" for p in paths] + ["first call (s)", "same tokens (fp32)", "tokens as fp32 (bf16, int8)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    steps = ["| model | batch | whole generate() | in the forward | around it |", "|---|---|---|---|---|"]
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
            matmuls, weight_bytes = matmul_only_steps(ours, batch)
            start = torch.full((batch, 1), config.sos_token_id)
            options = {
                "max_new_tokens": args.new_tokens,
                "min_new_tokens": args.new_tokens,
                "do_sample": False,
                "pad_token_id": 0,
            }
            tokens = batch * args.new_tokens
            short = {**options, "max_new_tokens": 8, "min_new_tokens": 8}  # a warm-up of the eager paths
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
            seconds, outputs = median_seconds(
                {n: partial(call, **options) for n, (call, _) in calls.items()}, args.repeats
            )
            if "compiled, float32" in calls:
                total, inside = seconds_in_the_step(ours, batch, partial(calls["compiled, float32"][0], **options))
                ms = [1e3 * x / args.new_tokens for x in (total, inside, total - inside)]
                share = f"{1 - inside / total:.1%}"
                steps.append(f"| {preset} | {batch} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} ({share}) |")
            forget(ours)
            torch.compiler.reset()
            rates = {name: tokens / s for name, s in seconds.items()}
            ceiling, base = rates.pop("ceiling"), rates["transformers generate()"]
            reference = outputs["transformers generate()"]
            fp32 = [n for n in rates if "bfloat16" not in n and "int8" not in n]
            low = [n for n in rates if "bfloat16" in n or "int8" in n]
            step = seconds["ceiling"] / args.new_tokens
            row = [preset, str(batch), f"{step * 1e3:.2f}", f"{weight_bytes / step / 1e9:.1f}", f"{ceiling:,.1f}"]
            row += [f"{rates[n]:,.1f} ({rates[n] / ceiling:.0%} of ceiling, {rates[n] / base:.2f}x)" for n in rates]
            row += [", ".join(first_call_s), str(all(torch.equal(outputs[n], reference) for n in fp32))]
            row += [", ".join(f"{(outputs[n] == reference).float().mean():.0%}" for n in low)]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], file=sys.stderr, flush=True)

    command = "python benchmarks/decode_ceiling.py " + " ".join(sys.argv[1:])
    text = "\n\n".join(
        [
            f"`{command.strip()}` ({datetime.datetime.now():%Y-%m-%d %H:%M}, {time.perf_counter() - began:.0f} s; "
            f"{args.new_tokens} greedy tokens from SOS, median of {args.repeats} calls after a warm-up, timed in "
            "rounds: every path, the ceiling's matmuls included, once per round in turn).",
            f"Machine: {machine}.",
            "ceiling: decode steps' matmuls alone (every projection and the LM head as `torch.addmm` on the "
            "model's own fp32 weights with a `(batch, d)` input, nothing else), as tokens/s. Each path: tokens/s (its "
            "fraction of the ceiling, its multiple of transformers'). ours generate(): the default, transformers' "
            "`DynamicCache`; fast_generate() (auto): what sample()/complete() run (compiles models of 20M parameters "
            "and more); compiled: `fast_generate(compile=True, precision=...)`, a static cache and a decode step "
            "compiled with `torch.compile(fullgraph=True, dynamic=False)`; bfloat16 weights and activations; int8 "
            "weight-only quantized projections and LM head with bfloat16 activations. first call: the seconds of the "
            "first, untimed call of each fast_generate() path in the order of the columns, its compilation included "
            "(auto compiles the float32 step that compiled float32 then reuses). same tokens: every fp32 path gave "
            "transformers' tokens; the last column: the share of bf16 and int8 tokens equal to transformers' (greedy "
            "decoding of random weights amplifies any rounding; benchmarks/precision_quality.py measures their cost "
            "in bits per pixel).",
            "\n".join(lines),
        ]
        + (
            [
                "Where a step's time goes on the compiled float32 path, in ms per step, from one more call after the "
                "timed ones (under a load that may differ from theirs: compare its parts with each other): the whole "
                "generate() call, the model's forward in it (the compiled decode step with its matmuls, norms, "
                "attention and cache writes), and generate()'s own work around each step (logits processing, stopping "
                "criteria, cache and input bookkeeping; its share of the call).",
                "\n".join(steps),
            ]
            if len(steps) > 2
            else []
        )
    )
    print(text)
    if args.update_results is not None:
        replace_section(args.update_results, SECTION, text)


if __name__ == "__main__":
    main()
