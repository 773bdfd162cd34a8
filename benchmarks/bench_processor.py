"""Throughput of `ImageGPTImageProcessor` against transformers' `ImageGPTImageProcessorPil` on CPU.

Both processors tokenize the same 256 real images with the same 512-color palette, in one call each (a batch, as a
data loader hands it over); the script checks that they give the same ids and prints a markdown table, each row with
the machine's load average before and after its timed calls.

The images are made from scikit-image's bundled photos (astronaut, coffee, chelsea, rocket, immunohistochemistry,
hubble_deep_field, retina, cat), with a seeded RNG: a random crop covering 5-100% of a photo's area at an aspect ratio
in [3/4, 4/3], rescaled (PIL, Lanczos) so its longer side is 32-512 px. A second case is random 224x224 crops of the
same photos (the size of a typical dataset's images), a third the first images already at n_px x n_px (the CIFAR /
pre-resized data-loader case), a fourth scikit-learn's 8x8 gray digits (the demo's data) upsampled to n_px x n_px.
The palette is uniform random in [-1, 1] (seed 0).

    python benchmarks/bench_processor.py
    python benchmarks/bench_processor.py --torch_threads 2 1 --update_results benchmarks/RESULTS.md

`run(num_images=256, n_px=32)` returns the rows (dicts), for an all-in-one benchmark to import.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import torch
import transformers
from results import LOAD_NOTE, alternate, load, load_note, machine, replace_section, table
from skimage import data as skdata

from image_gpt_hf import ImageGPTImageProcessor
from image_gpt_hf.palette import load_sklearn_digits
from image_gpt_hf.transformers_compat import builtin_imagegpt

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")
SECTION = "## Image processor"


def make_images(num_images: int = 256, seed: int = 0) -> list[PIL.Image.Image]:
    """`num_images` varied real RGB images: seeded random crops of the bundled photos, rescaled to 32-512 px."""
    photos = [getattr(skdata, name)() for name in PHOTOS]
    rng = np.random.default_rng(seed)
    images = []
    for index in range(num_images):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        area = height * width * rng.uniform(0.05, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        crop = PIL.Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
        longer = int(rng.integers(32, 513))
        scale = longer / max(crop_w, crop_h)
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        images.append(crop.resize(size, PIL.Image.Resampling.LANCZOS))
    return images


def make_crops(num_images: int = 256, side: int = 224, seed: int = 0) -> list[PIL.Image.Image]:
    """`num_images` seeded random `side` x `side` crops of the bundled photos (each at least `side` px each way)."""
    photos, rng = [getattr(skdata, name)() for name in PHOTOS], np.random.default_rng(seed)
    crops = []
    for index in range(num_images):
        photo = photos[index % len(photos)]
        top, left = (int(rng.integers(0, extent - side + 1)) for extent in photo.shape[:2])
        crops.append(PIL.Image.fromarray(photo[top : top + side, left : left + side]))
    return crops


def _compare(case: str, images: list, ours, reference, repeats: int) -> dict:
    """Images/s of both processors on the same call (the best of `repeats` timed calls each, alternating, after a
    warm-up: on a shared machine the least disturbed call), and the fraction of ids that agree."""
    calls = {
        name: partial(processor, images, return_tensors="np")
        for name, processor in (("ours", ours), ("hf", reference))
    }
    run = alternate(calls, repeats, pick=min)
    ids = [np.asarray(run.outputs[name]["input_ids"]) for name in ("ours", "hf")]
    return {
        "case": case,
        "images": len(images),
        "ours_images_per_s": len(images) / run.seconds["ours"],
        "transformers_images_per_s": len(images) / run.seconds["hf"],
        "speedup": run.seconds["hf"] / run.seconds["ours"],
        "ids_agree": float((ids[0] == ids[1]).mean()),
        "load": run.load,
    }


def run(num_images: int = 256, n_px: int = 32, repeats: int = 5, torch_threads: int | None = None) -> list[dict]:
    """Images/s of both processors on the same images and palette, and the fraction of ids that agree.

    `torch_threads` sets `torch.set_num_threads` for the run (and restores it); it bounds our processor's torch work,
    while transformers' processor runs on numpy (with its BLAS threads) either way.
    """
    reference_module = builtin_imagegpt("image_processing_pil_imagegpt")
    if reference_module is None:
        print(f"transformers {transformers.__version__} has no built-in ImageGPT processor: comparison skipped.")
        return []
    ImageGPTImageProcessorPil = reference_module.ImageGPTImageProcessorPil
    palette = np.random.default_rng(0).uniform(-1, 1, size=(512, 3))
    size = {"height": n_px, "width": n_px}
    ours = ImageGPTImageProcessor(clusters=palette, size=size)
    reference = ImageGPTImageProcessorPil(clusters=palette.tolist(), size=size)
    gray_reference = ImageGPTImageProcessorPil(clusters=palette.tolist(), size=size, do_convert_rgb=True)
    images, crops = make_images(num_images), make_crops(num_images)
    at_n_px = [image.resize((n_px, n_px), PIL.Image.Resampling.BILINEAR) for image in images]
    digits = [PIL.Image.fromarray(digit) for digit in load_sklearn_digits()[:num_images]]
    sizes = [max(image.size) for image in images]
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads or threads)
    try:
        rows = [
            _compare(f"photos, longer side {min(sizes)}-{max(sizes)} px, resized", images, ours, reference, repeats),
            _compare(f"random 224x224 photo crops to {n_px}x{n_px}", crops, ours, reference, repeats),
            _compare(f"the first row's images already {n_px}x{n_px}", at_n_px, ours, reference, repeats),
            _compare(f"scikit-learn digits, 8x8 gray to {n_px}x{n_px}", digits, ours, gray_reference, repeats),
        ]
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        row["torch_threads"] = torch_threads or threads
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["case", "images", "torch threads", "ours (images/s)", "transformers (images/s)", "speedup"]
    rates = [(r["ours_images_per_s"], r["transformers_images_per_s"], r["speedup"]) for r in rows]
    return table(
        header + ["ids identical", "load"],
        [
            [r["case"], r["images"], r["torch_threads"], f"{ours:.0f}", f"{theirs:.0f}", f"{speedup:.1f}x"]
            + [f"{r['ids_agree']:.2%}", load(r["load"])]
            for r, (ours, theirs, speedup) in zip(rows, rates)
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--n_px", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per processor (the best is reported).")
    parser.add_argument(
        "--torch_threads", type=int, nargs="+", help="Run once per torch thread count (default: torch's)."
    )
    parser.add_argument("--update_results", type=Path, default=None, help="Write the table into this RESULTS.md.")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    rows = [
        row
        for threads in args.torch_threads or [None]
        for row in run(args.num_images, args.n_px, args.repeats, threads)
    ]
    command = " ".join(["python benchmarks/bench_processor.py", *sys.argv[1:]])
    text = "\n\n".join(
        [
            f"`{command}` ({args.num_images} images to {args.n_px}x{args.n_px} ids, one batched call per processor, "
            f"best of {args.repeats} timed calls after a warm-up; 512-color random palette).",
            f"Machine: {machine(f'numpy {np.__version__}, Pillow {PIL.__version__}')}; {load_note(load_at_start)}. "
            + LOAD_NOTE,
            markdown(rows),
            "Images: seeded random crops (5-100% of the area, aspect 3/4-4/3) of scikit-image's bundled photos "
            f"({', '.join(PHOTOS)}), rescaled with PIL so the longer side is 32-512 px; seeded random 224x224 crops of "
            "the same photos; the first of scikit-learn's 1,797 digits as 8-bit gray PIL images (transformers' "
            "processor converts them to RGB with `do_convert_rgb=True`).",
        ]
    )
    print(text)
    if args.update_results is not None:
        replace_section(args.update_results, SECTION, text)


if __name__ == "__main__":
    main()
