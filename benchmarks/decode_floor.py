"""How fast one-token decoding could be on this machine: the matmuls alone against whole `generate()` calls.

A decode step multiplies one new token per sequence with every weight matrix of the model (the q|k|v, attention-output
and two MLP projections of every block, and the LM head). This script times exactly those products, as `torch.addmm`
on the model's own weights with a `(batch, d)` input and nothing else (no norms, no attention, no cache, no Python
around them), and reports the tokens/s that alone would allow, next to transformers' and this package's greedy
`generate()` on the same weights. The matmul-only figure is an upper bound for any fp32 implementation that calls
torch's CPU GEMM, so it says which generation targets a machine can meet at all.

    python benchmarks/decode_floor.py                     # tiny and small (iGPT-S), batch 1 and 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from bench import cpu_name  # benchmarks/bench.py, next to this script
from transformers.models.imagegpt import modeling_imagegpt as hf
from transformers.models.imagegpt.configuration_imagegpt import ImageGPTConfig as HFConfig

from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling


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


def generate_tokens_per_s(model, batch: int, new_tokens: int, sos: int, repeats: int) -> tuple[float, torch.Tensor]:
    start_ids = torch.full((batch, 1), sos)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    model.generate(start_ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(start_ids, **kwargs)
        times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    print(
        f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}\n"
    )
    print(
        "| model | batch | matmuls only (ms/step) | weights streamed (GB/s) | matmul-only ceiling (tok/s) "
        "| transformers generate() (tok/s) | ours generate() (tok/s) | ceiling / transformers | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
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
            reference, ids_theirs = generate_tokens_per_s(
                theirs, batch, args.new_tokens, config.sos_token_id, args.repeats
            )
            fast, ids_ours = generate_tokens_per_s(ours, batch, args.new_tokens, config.sos_token_id, args.repeats)
            print(
                f"| {preset} | {batch} | {floor * 1e3:.2f} | {weight_bytes / floor / 1e9:.1f} | {ceiling:,.1f} "
                f"| {reference:,.1f} | {fast:,.1f} | {ceiling / reference:.2f}x | {torch.equal(ids_ours, ids_theirs)} |"
            )


if __name__ == "__main__":
    main()
