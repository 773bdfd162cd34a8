"""Check a converted iGPT folder against OpenAI's forward pass, and optionally measure its test loss.

    python conversion/verify.py igpt-s-ar-32px --checkpoint downloads/igpt-s/1000000/model.ckpt-1000000 \
        [--eval_npy downloads/imagenet_teX.npy --num_images 50000 --batch_size 64 --device cuda]

1. The folder is loaded with the transformers Auto classes (`import image_gpt_hf` registers them) and run on random
   palette ids, and so is `openai_reference.openai_forward` (NumPy, float64) on the TensorFlow checkpoint's arrays.
   The maximum absolute difference is printed for every head the folder has (causal / masked logits and
   generative loss, classification logits). The command exits with status 1 if one is above the tolerance.

   Tolerances. The model always runs in float32 here. For a float32 folder every difference must be <= 1e-4
   (`--atol`). For a float16 or bfloat16 folder the reference is run twice: on the checkpoint's arrays rounded to
   that dtype, where the same 1e-4 applies (it checks the mapping of every weight exactly), and on the exact arrays,
   where the difference is the price of the smaller dtype and must stay within `rtol * max(1, max |reference|)`,
   with rtol 1e-2 for float16 and 5e-2 for bfloat16 (bfloat16 keeps 8 significant bits, float16 11).

2. With `--eval_npy` (OpenAI's color-quantized evaluation set, e.g. `imagenet_teX.npy`, shape (N, n_px * n_px)) it
   prints the generative loss over the first `--num_images` images in nats per token, bits per token and bits per
   sub-pixel dimension. AR models: OpenAI's loss, each pixel predicted from the ones before it. BERT models: the loss
   on a random 15% mask (seeded by `--seed`), so it varies a little with the seed. For the released 1M-step AR models
   at 32x32 OpenAI reports 2.0895 (S), 2.0614 (M) and 2.0466 (L) nats per token on ImageNet; they are printed next
   to the measured value when the model has one of those shapes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm  # a dependency of transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

if __package__ in (None, ""):  # run as a file (python conversion/verify.py): find `conversion`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.openai_checkpoint import ConversionError, read_openai_checkpoint  # noqa: E402
from conversion.openai_reference import openai_forward  # noqa: E402
from image_gpt_hf import random_bert_mask  # noqa: E402  (importing image_gpt_hf registers the Auto classes)

ATOL = 1e-4
# Allowed difference between a 16-bit folder and the exact float32 weights, relative to the logits' scale.
PRECISION_RTOL = {"float16": 1e-2, "bfloat16": 5e-2}
# Test generative loss (nats per token) of the 1M-step AR models on ImageNet 32x32, from OpenAI's README.
OPENAI_TEST_LOSS = {"s": 2.0895, "m": 2.0614, "l": 2.0466}
BERT_MASK_PROB = 0.15


@dataclass
class Check:
    """One compared output: its largest absolute difference from the reference, and the most that is allowed."""

    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        return (
            f"{self.name}: max abs diff {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e}) "
            f"{'OK' if self.ok else 'FAILED'}"
        )


def _max_abs_diff(ours: torch.Tensor | float, reference: np.ndarray | float) -> float:
    ours = ours.detach().float().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    reference = np.asarray(reference)
    if ours.shape != reference.shape:
        return math.inf  # a folder and a checkpoint of different shapes: not the same model
    return float(np.max(np.abs(ours.astype(np.float64) - reference)))


def random_inputs(n_ctx: int, palette_size: int, num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random palette ids `(num_images, n_ctx)` and a BERT keep-mask (OpenAI's M, ~15% False, >= 1 per image)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, palette_size, size=(num_images, n_ctx))
    keep = rng.random((num_images, n_ctx)) > BERT_MASK_PROB
    # OpenAI's BERT loss is 0/0 for an image with nothing masked; make sure every image has a masked position.
    keep[np.arange(num_images), rng.integers(0, n_ctx, size=num_images)] = False
    return tokens, keep


def stored_dtype(config) -> str:
    """The dtype name the folder's weights were saved in ("float32", "float16" or "bfloat16")."""
    dtype = getattr(config, "dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def round_weights(weights: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The checkpoint's arrays rounded to `dtype` (as the converter stores them) and back to float32."""
    torch_dtype = getattr(torch, dtype)
    return {k: torch.from_numpy(np.asarray(v)).to(torch_dtype).float().numpy() for k, v in weights.items()}


def compare_with_reference(
    folder: str | Path,
    weights: Mapping[str, np.ndarray],
    num_images: int = 2,
    seed: int = 0,
    atol: float = ATOL,
    device: str | torch.device = "cpu",
) -> list[Check]:
    """Run every head of the converted `folder` and OpenAI's forward pass on `weights` (the TF checkpoint's arrays,
    by TF name) on the same random tokens; return one `Check` per compared output."""
    config = AutoConfig.from_pretrained(folder)
    dtype = stored_dtype(config)
    palette_size = config.vocab_size - 1
    bert = config.objective == "bert"
    tokens, keep = random_inputs(config.n_positions, palette_size, num_images, seed)
    references = {"": openai_forward(weights, tokens, keep if bert else None)}
    if dtype != "float32":
        # First the exact mapping (same rounded weights on both sides), then the cost of storing in 16 bits.
        references = {
            "": openai_forward(round_weights(weights, dtype), tokens, keep if bert else None),
            f" ({dtype} weights vs float32 checkpoint)": references[""],
        }

    input_ids = torch.from_numpy(tokens).to(device)
    masked_pos = torch.from_numpy(~keep).to(device)
    inputs = {"input_ids": input_ids, **({"bool_masked_pos": masked_pos} if bert else {"prepend_sos": True})}
    heads = {("masked" if bert else "causal"): AutoModelForMaskedImageModeling if bert else AutoModelForCausalLM}
    if "ImageGPTForImageClassification" in (config.architectures or []):
        heads["classification"] = AutoModelForImageClassification
    outputs = {}
    with torch.no_grad():
        for head, auto_class in heads.items():  # one model in memory at a time
            model = auto_class.from_pretrained(folder, dtype=torch.float32).to(device).eval()
            out = model(**inputs) if head == "classification" else model(**inputs, labels=input_ids)
            outputs[head] = (out.logits, None if head == "classification" else out.loss)
            del model

    checks = []
    for suffix, ref in references.items():
        for head, (logits, loss) in outputs.items():
            ref_logits = ref.clf_logits if head == "classification" else ref.gen_logits
            if ref_logits is None:
                raise ValueError(f"{folder} has a classification head but the checkpoint has no model/clf/wclf.")
            tolerance = atol
            if suffix:
                tolerance = PRECISION_RTOL[dtype] * max(1.0, float(np.abs(ref_logits).max()))
            checks.append(Check(f"{head} logits{suffix}", _max_abs_diff(logits, ref_logits), tolerance))
            if loss is not None:
                checks.append(Check(f"{head} gen_loss{suffix}", _max_abs_diff(loss, ref.gen_loss), tolerance))
    return checks


def evaluate_gen_loss(
    folder: str | Path,
    eval_npy: str | Path,
    num_images: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> float:
    """Mean generative loss (nats per token) of the converted model over OpenAI's quantized images `eval_npy`.

    AR: mean cross-entropy of every pixel given the ones before it. BERT: per image, the mean over a random 15% mask,
    then the mean over images (OpenAI's definition).
    """
    config = AutoConfig.from_pretrained(folder)
    data = np.load(eval_npy, mmap_mode="r")
    if data.ndim != 2 or data.shape[1] != config.n_positions:
        raise ValueError(
            f"{eval_npy} has shape {data.shape}; this model needs (N, {config.n_positions}) palette ids "
            f"({config.n_px}x{config.n_px} images)."
        )
    num_images = len(data) if num_images is None else min(num_images, len(data))
    bert = config.objective == "bert"
    model_class = AutoModelForMaskedImageModeling if bert else AutoModelForCausalLM
    model = model_class.from_pretrained(folder, dtype=dtype).to(device).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in tqdm(range(0, num_images, batch_size), desc="eval", unit="batch"):
            ids = torch.from_numpy(np.asarray(data[start : start + batch_size], dtype=np.int64)).to(device)
            if ids.min() < 0 or ids.max() >= config.vocab_size - 1:
                raise ValueError(f"{eval_npy} holds ids outside the palette [0, {config.vocab_size - 1}).")
            if bert:
                mask = random_bert_mask(ids.shape, BERT_MASK_PROB, generator=generator).to(device)
                loss = model(input_ids=ids, bool_masked_pos=mask, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids, prepend_sos=True).loss
            # Both losses are means over the images of the batch (AR: over its equal-length sequences).
            total += float(loss) * len(ids)
    return total / num_images


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the converted checkpoint folder")
    parser.add_argument("--checkpoint", required=True, help="the OpenAI TF checkpoint it was converted from")
    parser.add_argument("--num_random_images", type=int, default=2, help="random token images for the comparison")
    parser.add_argument("--atol", type=float, default=ATOL, help="tolerance of the exact-weights comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_npy", help="OpenAI's quantized evaluation set, e.g. imagenet_teX.npy")
    parser.add_argument("--num_images", type=int, help="evaluate the first N images (default: all)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--eval_dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype of the eval run"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ckpt = read_openai_checkpoint(args.checkpoint)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{ckpt.title} from {ckpt.prefix}")
    config = AutoConfig.from_pretrained(args.folder)
    ours = (config.n_layer, config.n_embd, config.n_head, config.n_positions, config.vocab_size - 1, config.objective)
    theirs = (ckpt.n_layer, ckpt.n_embd, ckpt.n_head, ckpt.n_ctx, ckpt.palette_size, ckpt.objective)
    if ours != theirs:
        fields = "(layers, width, heads, positions, palette, objective)"
        print(
            f"error: {args.folder} {ours} was not converted from this checkpoint {theirs} {fields}.", file=sys.stderr
        )
        return 1
    checks = compare_with_reference(
        args.folder, ckpt.weights, args.num_random_images, args.seed, args.atol, args.device
    )
    for check in checks:
        print(check)
    failed = [c for c in checks if not c.ok]
    ckpt.weights.clear()  # the evaluation below needs only the converted model

    if args.eval_npy:
        options = (args.num_images, args.batch_size, args.device, getattr(torch, args.eval_dtype), args.seed)
        loss = evaluate_gen_loss(args.folder, args.eval_npy, *options)
        bits = loss / math.log(2)
        print(
            f"test generative loss on {args.eval_npy}: {loss:.4f} nats/token, {bits:.4f} bits/token, "
            f"{bits / 3:.4f} bits/dim (per RGB sub-pixel of the palette-quantized image)"
        )
        size = ckpt.size
        if ckpt.objective == "ar" and size and ckpt.n_px == 32 and ckpt.palette_size == 512:
            step_note = "" if ckpt.step == 1_000_000 else f"; this checkpoint is step {ckpt.step}"
            print(
                f"OpenAI reports {OPENAI_TEST_LOSS[size]:.4f} nats/token for the 1,000,000-step iGPT-{size.upper()} "
                f"on ImageNet 32x32 test{step_note}."
            )
    if failed:
        print(f"FAILED: {len(failed)} of {len(checks)} outputs differ from OpenAI's forward pass.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
