"""What lower-precision decoding weights cost in quality: bits per pixel, and completions side by side.

Trains a small Image GPT for a few hundred steps on scikit-learn's digits (8x8, 16 gray levels), then measures the
bits per pixel of the held-out digits with its float32 weights and with the bfloat16 and int8 weight-only copies that
`image_gpt_hf.fast_decoding` decodes with, and writes a grid: each row one held-out digit, its top half kept, then the
original and the greedy completions with float32, bfloat16 and int8 weights (enlarged 8x).

    python benchmarks/precision_quality.py --output_dir precision_quality   # writes completions.png, prints a table
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from image_gpt_hf import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402
from image_gpt_hf.fast_decoding import fast_generate, lower_precision_copy  # noqa: E402

PRECISIONS = (None, "bfloat16", "int8")


def bits_per_pixel(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(input_ids=chunk, labels=chunk, prepend_sos=True).loss.float() for chunk in ids.split(64)]
    return float(torch.stack(losses).mean()) / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("precision_quality"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rows", type=int, default=8, help="held-out digits in the grid")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    ids = (torch.as_tensor(load_digits().images).reshape(-1, 64) * 15 / 16).round().long()  # 16 gray levels
    train_ids, test_ids = ids[:1437], ids[1437:]
    model = ImageGPTForCausalImageModeling(
        ImageGPTConfig(vocab_size=17, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.steps):
        chunk = train_ids[torch.randint(0, len(train_ids), (64,))]
        model(input_ids=chunk, labels=chunk, prepend_sos=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    reference = bits_per_pixel(model, test_ids)
    print("| weights | bits per pixel (held-out digits) | vs float32 |\n|---|---|---|")
    for precision in PRECISIONS:
        bpp = reference if precision is None else bits_per_pixel(lower_precision_copy(model, precision), test_ids)
        print(f"| {precision or 'float32'} | {bpp:.4f} | {bpp - reference:+.4f} |")

    primer = torch.cat([torch.full((args.rows, 1), 16), test_ids[: args.rows, :32]], dim=1)  # SOS + top 4 rows
    columns = [test_ids[: args.rows]]
    for precision in PRECISIONS:
        out = fast_generate(model, primer, compile=False, precision=precision, max_new_tokens=32, do_sample=False)
        columns.append(out[:, 1:])
    gray = torch.stack(columns, dim=1).reshape(args.rows, len(columns), 8, 8).float() * 255 / 15  # (rows, cols, 8, 8)
    grid = gray.permute(0, 2, 1, 3).reshape(args.rows * 8, len(columns) * 8).numpy().astype(np.uint8)
    path = args.output_dir / "completions.png"
    PIL.Image.fromarray(grid).resize((grid.shape[1] * 8, grid.shape[0] * 8), PIL.Image.NEAREST).save(path)
    print(f"\n{path}: columns original, float32, bfloat16, int8; top half of each digit kept, the rest greedy.")


if __name__ == "__main__":
    main()
