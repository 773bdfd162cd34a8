"""Sample from an autoregressive Image GPT: new images from nothing, and completions of held-out images from their top
half, as in the paper's completions figure.

    python examples/sample.py --model_name_or_path igpt-tiny-digits --output_dir samples-digits --top_k 8

Writes completions.png (one row per held-out image: the image as the model sees it | the rows it is given | its
completions) and samples.png (unconditional samples), both magnified with nearest-neighbour pixels.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
from accelerate.utils import set_seed

import common
from common import logger
from image_gpt_hf import ImageGPTForCausalImageModeling
from image_gpt_hf.generation import complete, sample
from image_gpt_hf.safe_io import atomic_file, check_output_path

GAP = 2  # pixels between grid cells
HEADER = 14  # height of the column titles


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Unconditional samples and completions from an AR Image GPT.")
    parser.add_argument("--model_name_or_path", type=str, required=True, help="An AR Image GPT checkpoint.")
    parser.add_argument(
        "--processor_name_or_path", type=str, default=None, help="Its processor (palette), if not saved with it."
    )
    common.add_output_arguments(parser, what="the PNG grids (completions.png, samples.png)")
    parser.add_argument("--num_samples", type=int, default=16, help="Unconditional samples (0: none).")
    parser.add_argument("--num_images", type=int, default=8, help="Held-out images to complete (0: none).")
    parser.add_argument("--num_completions", type=int, default=4, help="Completions per held-out image.")
    parser.add_argument(
        "--primer_rows", type=int, default=None, help="Rows given to the model (default: the top half)."
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    parser.add_argument("--top_k", type=int, default=None, help="Sample among the k most likely colors.")
    parser.add_argument("--top_p", type=float, default=None, help="Nucleus sampling: the smallest set of mass p.")
    parser.add_argument("--batch_size", type=int, default=None, help="Sequences generated together (default: all).")
    parser.add_argument(
        "--upscale", type=int, default=None, help="Magnification of the grids (default: cells >= 64 px)."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seeds the choice of held-out images and the sampling.")
    common.add_data_arguments(parser)
    args = parser.parse_args(argv)
    common.check_data_arguments(args)
    for name in ("num_samples", "num_images"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.num_completions < 1:
        raise ValueError(f"--num_completions must be at least 1, got {args.num_completions}.")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {args.top_k}.")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}.")
    for name in ("batch_size", "upscale"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    return args


def grid(rows: list[list[np.ndarray]], upscale: int, titles: list[str] | None = None) -> PIL.Image.Image:
    """One PNG from rows of `(n, n, 3)` uint8 images, magnified `upscale` times, white gaps, optional column titles."""
    side = rows[0][0].shape[0] * upscale
    columns = max(len(row) for row in rows)
    top = HEADER if titles else 0
    canvas = PIL.Image.new("RGB", (columns * (side + GAP) + GAP, top + len(rows) * (side + GAP) + GAP), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            cell = PIL.Image.fromarray(image).resize((side, side), PIL.Image.Resampling.NEAREST)
            canvas.paste(cell, (GAP + c * (side + GAP), top + GAP + r * (side + GAP)))
    if titles:
        draw = PIL.ImageDraw.Draw(canvas)
        for c, title in enumerate(titles):
            draw.text((GAP + c * (side + GAP), 1), title, fill="black")
    return canvas


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    accelerator = common.create_accelerator(args)
    set_seed(args.seed)
    # Existing grids are kept unless --overwrite, refused before any work.
    names = {"completions": args.num_images > 0, "samples": args.num_samples > 0}
    paths = {name: os.path.join(args.output_dir, f"{name}.png") for name, wanted in names.items() if wanted}
    for path in paths.values():
        check_output_path(
            path, kind="file", inputs=common.inputs(args), overwrite=args.overwrite, arg="the output file"
        )

    config = common.load_imagegpt_config(args.model_name_or_path)
    if config.objective != "ar":
        raise ValueError(
            f"{args.model_name_or_path} is a BERT-objective model: it predicts masked pixels, not the next one, so it "
            "cannot generate images pixel by pixel. Sample from an AR checkpoint (pretrain.py --objective ar)."
        )
    processor = common.checkpoint_processor(args.model_name_or_path, config, args.processor_name_or_path, None)
    n_px = config.n_px  # sampling happens at the model's own resolution
    if args.primer_rows is not None and not 0 <= args.primer_rows < n_px:
        raise ValueError(f"--primer_rows must be in [0, {n_px}) for this {n_px}x{n_px} model, got {args.primer_rows}.")
    primer_rows = n_px // 2 if args.primer_rows is None else args.primer_rows
    if args.num_images > 0:
        with accelerator.main_process_first():
            dataset, _ = common.load_image_dataset(args)
        image_column = common.find_image_column(dataset, args.image_column_name)
        count = min(args.num_images, len(dataset["validation"]))
        held_out = common.ImageDataset(dataset["validation"].shuffle(seed=args.seed), image_column, [image_column])
        # The held-out images as the model sees them (center crop, palette colors): what it is asked to continue.
        collate = common.ImageGPTCollator(processor, image_column, train=False, seed=args.seed)
        ids = collate(held_out.__getitems__(list(range(count))))["input_ids"]
    model = ImageGPTForCausalImageModeling.from_pretrained(args.model_name_or_path).eval().to(accelerator.device)

    if accelerator.is_main_process:
        upscale = args.upscale or max(1, math.ceil(64 / n_px))
        options = {
            "processor": processor,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "batch_size": args.batch_size,
            "output_type": "np",
            "progress": accelerator.is_local_main_process,
        }
        if args.num_images > 0:
            originals = processor.batch_decode(ids, output_type="np")
            logger.info(
                f"Completing {len(ids)} held-out images from their top {primer_rows} of {n_px} rows, "
                f"{args.num_completions} completions each"
            )
            completions = complete(
                model, ids, primer_rows=primer_rows, num_completions=args.num_completions, seed=args.seed, **options
            ).reshape(len(ids), args.num_completions, n_px, n_px, 3)
            rows = []
            for original, image_completions in zip(originals, completions):
                primer = original.copy()
                primer[primer_rows:] = 128  # the rows the model does not see
                rows.append([original, primer, *image_completions])
            titles = ["original", "given"] + [f"sample {i + 1}" for i in range(args.num_completions)]
            with atomic_file(paths["completions"], overwrite=args.overwrite, arg="the output file") as tmp:
                grid(rows, upscale, titles if upscale * n_px >= 48 else None).save(tmp)
        if args.num_samples > 0:
            logger.info(f"Sampling {args.num_samples} images from scratch")
            samples = sample(model, args.num_samples, seed=args.seed + 1, **options)
            per_row = min(8, args.num_samples)
            rows = [list(samples[i : i + per_row]) for i in range(0, len(samples), per_row)]
            with atomic_file(paths["samples"], overwrite=args.overwrite, arg="the output file") as tmp:
                grid(rows, upscale).save(tmp)
        for name, path in paths.items():
            logger.info(f"Wrote {name}: {path}")
    accelerator.wait_for_everyone()
    return paths


if __name__ == "__main__":
    main()
