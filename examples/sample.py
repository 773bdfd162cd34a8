"""Sample from an autoregressive Image GPT: new images from nothing, and completions of held-out images from their top
half, as in the paper's completions figure.

    python examples/sample.py --model_name_or_path igpt-tiny-digits --output_dir samples-digits --top_k 8

Writes completions.png (one row per held-out image: the image as the model sees it | the rows it is given | its
completions) and samples.png (unconditional samples), magnified with nearest-neighbour pixels (`--magnification`).
With `--upscale_model` (an integer factor, or an image super-resolution checkpoint such as a Swin2SR model) it also writes
completions_upscaled.png and samples_upscaled.png beside them: the same images enlarged by that factor or model, shown
at the size it made them.

    python examples/sample.py --model_name_or_path igpt-tiny-digits --output_dir samples-digits --upscale_model 16
    python examples/sample.py --model_name_or_path openai/imagegpt-small --num_images 0 --output_dir samples-small \\
        --upscale_model caidas/swin2SR-classical-sr-x2-64
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import Image, load_dataset
from transformers import AutoImageProcessor, AutoModelForImageToImage, PreTrainedModel

from image_gpt_hf import ImageGPTForCausalImageModeling, load_config_and_processor, load_digits
from image_gpt_hf.generation import complete, sample, upscale_images
from image_gpt_hf.safe_io import atomic_file, check_output_path

logger = get_logger(__name__)
DIGITS = "sklearn-digits"  # scikit-learn's bundled 8x8 handwritten digits: no download

GAP = 2  # pixels between grid cells
HEADER = 14  # height of the column titles
INTEGER = re.compile(r"[+-]?\d+")  # an --upscale_model that is a factor, not a checkpoint


class RenamedFlag(argparse.Action):
    """Stores the value under its new name; warns when it comes under the deprecated one (its last option string)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.option_strings[-1]:
            new = self.option_strings[0]
            warnings.warn(f"{option_string} is deprecated; pass {new} (the same value).", FutureWarning, stacklevel=1)
        setattr(namespace, self.dest, values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Unconditional samples and completions from an AR Image GPT.")
    parser.add_argument("--model_name_or_path", type=str, required=True, help="An AR Image GPT checkpoint.")
    parser.add_argument(
        "--processor_name_or_path", type=str, default=None, help="Its processor (palette), if not saved with it."
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where to write completions.png, samples.png (and their _upscaled.png)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace grids an earlier run wrote there.")
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
        "--magnification",
        "--upscale",  # its former name, deprecated: it sat beside --upscale_model, which is another thing
        dest="magnification",
        action=RenamedFlag,
        type=int,
        default=None,
        help="Nearest-neighbour magnification of the cells of completions.png and samples.png (default: cells of at "
        "least 64 px). --upscale is its deprecated former name.",
    )
    parser.add_argument(
        "--upscale_model",
        type=str,
        default=None,
        help="Also write completions_upscaled.png and samples_upscaled.png, every image enlarged by this: an integer "
        "factor (nearest-neighbour, no model) or an image super-resolution checkpoint, a folder or Hub id that "
        "AutoModelForImageToImage loads (e.g. a Swin2SR model). Default: no upscaled grids.",
    )
    parser.add_argument("--seed", type=int, default=42, help="Seeds the choice of held-out images and the sampling.")
    group = parser.add_argument_group("the held-out images to complete")
    group.add_argument("--dataset_name", default=DIGITS, help=f"A `datasets` image dataset, or {DIGITS!r} (default).")
    group.add_argument("--dataset_config_name", default=None, help="The dataset configuration name.")
    group.add_argument("--train_dir", default=None, help="An imagefolder; its --train_val_split is held out.")
    group.add_argument("--validation_dir", default=None, help="An imagefolder of held-out images.")
    group.add_argument("--image_column_name", default=None, help="Default: the first column of `Image` type.")
    group.add_argument(
        "--train_val_split", type=float, default=0.15, help="Train held out when there is no evaluation split."
    )
    group.add_argument("--max_eval_samples", type=int, default=None, help="Truncate the evaluation split.")
    group.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    args = parser.parse_args(argv)
    if not 0.0 <= args.train_val_split < 1.0:
        raise ValueError(f"--train_val_split is a fraction and must be in [0, 1), got {args.train_val_split}.")
    if args.validation_dir is not None and args.train_dir is None:
        raise ValueError("--validation_dir needs a --train_dir to go with it.")
    for name in ("num_samples", "num_images"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.num_completions < 1:
        raise ValueError(f"--num_completions must be at least 1, got {args.num_completions}.")
    for name in ("batch_size", "magnification", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    upscale_factor(args.upscale_model)  # a factor below 1 is refused here; a checkpoint is loaded in main
    return args


def upscale_factor(upscale_model: str | None) -> int | None:
    """The nearest-neighbour factor that an --upscale_model of digits names; None for no value or a checkpoint."""
    if upscale_model is None or not INTEGER.fullmatch(upscale_model):
        return None
    if int(upscale_model) < 1:
        raise ValueError(f"--upscale_model as a factor must be at least 1, got {upscale_model}.")
    return int(upscale_model)


def load_upscaler(upscale_model: str | None) -> int | PreTrainedModel | None:
    """--upscale_model as `upscale_images` takes it: the integer factor, or the super-resolution model, loaded with its
    image processor here, before any generation, so that a bad value fails in seconds."""
    factor = upscale_factor(upscale_model)
    if upscale_model is None or factor is not None:
        return factor
    AutoImageProcessor.from_pretrained(upscale_model)
    model = AutoModelForImageToImage.from_pretrained(upscale_model)
    return model.eval()


def grid(rows: list[list[np.ndarray]], upscale: int = 1, titles: list[str] | None = None) -> PIL.Image.Image:
    """One PNG from rows of `(n, n, 3)` uint8 images, magnified `upscale` times, white gaps, column titles if the
    cells are wide enough for them."""
    side = rows[0][0].shape[0] * upscale
    columns = max(len(row) for row in rows)
    titles = titles if side >= 48 else None
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


def hide_rows(image: np.ndarray, rows: int) -> np.ndarray:
    """The image with everything below its top `rows` rows gray: what the model is given to complete."""
    given = image.copy()
    given[rows:] = 128
    return given


def upscaled(rows: list[list[np.ndarray]], upscaler: int | PreTrainedModel) -> list[list[np.ndarray]]:
    """The grid's rows with every image enlarged by `upscale_images` (in one call, batched for a model)."""
    images = upscale_images([PIL.Image.fromarray(image) for row in rows for image in row], upscaler)
    enlarged = iter(np.asarray(image) for image in images)
    return [[next(enlarged) for _ in row] for row in rows]


def load_held_out(args: argparse.Namespace):
    """The evaluation split of --dataset_name / --train_dir (validation, else test, else --train_val_split of train)."""
    if args.train_dir is not None:
        files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir is not None:
            files["validation"] = os.path.join(args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)
    elif args.dataset_name == DIGITS:
        dataset = load_digits()
    else:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    held_out = next((dataset[name] for name in ("validation", "test") if name in dataset), None)
    if held_out is None:
        if "train" not in dataset or args.train_val_split == 0:
            raise ValueError(
                f"The dataset has no validation or test split (its splits are {list(dataset)}); pass a "
                "--train_val_split > 0 of its train split, or --validation_dir."
            )
        held_out = dataset["train"].train_test_split(args.train_val_split, seed=args.seed)["test"]
    if args.max_eval_samples is not None:
        held_out = held_out.shuffle(seed=args.seed).select(range(min(args.max_eval_samples, len(held_out))))
    features = held_out.features
    image_column = args.image_column_name or next((n for n, f in features.items() if isinstance(f, Image)), None)
    if image_column not in features:
        raise ValueError(
            f"--image_column_name {args.image_column_name!r} is not a column of the dataset; its columns are "
            f"{list(features)}."
            if args.image_column_name
            else f"The dataset has no `Image` column: {list(features)}."
        )
    return held_out.shuffle(seed=args.seed), image_column


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Several CPU processes (accelerate launch without GPUs) join one run only when Accelerate is told to use the CPU.
    accelerator = Accelerator(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available())
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    # Existing grids are kept unless --overwrite, refused before any work; so is a grid inside an input.
    inputs = [args.model_name_or_path, args.processor_name_or_path, args.train_dir, args.validation_dir]
    inputs += [args.dataset_name, None if upscale_factor(args.upscale_model) else args.upscale_model]
    kinds = [name for name, count in (("completions", args.num_images), ("samples", args.num_samples)) if count > 0]
    suffixes = ["", "_upscaled"] if args.upscale_model is not None else [""]
    paths = {
        f"{kind}{suffix}": os.path.join(args.output_dir, f"{kind}{suffix}.png")
        for kind in kinds
        for suffix in suffixes
    }
    for path in paths.values():
        check_output_path(path, kind="file", inputs=inputs, overwrite=args.overwrite, arg="the output file")
    upscaler = load_upscaler(args.upscale_model)
    if isinstance(upscaler, PreTrainedModel):
        upscaler.to(accelerator.device)

    # The model, its palette and its LM head: a model that cannot sample is refused before any image is read.
    config, processor = load_config_and_processor(args.model_name_or_path, args.processor_name_or_path, objective="ar")
    model, loading = ImageGPTForCausalImageModeling.from_pretrained(
        args.model_name_or_path, config=config, output_loading_info=True
    )
    if "lm_head.weight" in loading["missing_keys"]:
        raise ValueError(
            f"{args.model_name_or_path} has no LM-head weights (lm_head.weight), the layer that predicts the next "
            "pixel (e.g. a classifier fine-tuned with finetune.py --gen_loss_weight 0); sampling from it would draw "
            "from a random head. Sample from a checkpoint of examples/pretrain.py --objective ar, or of "
            "examples/finetune.py with --gen_loss_weight > 0 (which keeps the head)."
        )
    if loading["missing_keys"]:
        raise ValueError(f"{args.model_name_or_path} lacks weights of the model: {loading['missing_keys'][:5]} ...")
    model = model.eval().to(accelerator.device)
    n_px = config.n_px  # sampling happens at the model's own resolution
    if args.primer_rows is not None and not 0 <= args.primer_rows < n_px:
        raise ValueError(f"--primer_rows must be in [0, {n_px}) for this {n_px}x{n_px} model, got {args.primer_rows}.")
    primer_rows = n_px // 2 if args.primer_rows is None else args.primer_rows
    if args.num_images > 0:
        with accelerator.main_process_first():
            held_out, image_column = load_held_out(args)
        # The held-out images as the model sees them: shortest edge to n_px, the center n_px x n_px, palette colors.
        images = held_out.select(range(min(args.num_images, len(held_out))))[image_column]
        center = {
            "size": {"shortest_edge": n_px},
            "do_center_crop": True,
            "crop_size": {"height": n_px, "width": n_px},
        }
        ids = processor(images, return_tensors="pt", **center)["input_ids"].long()

    if accelerator.is_main_process:
        magnification = args.magnification or max(1, math.ceil(64 / n_px))
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
            rows = [[original, *image_completions] for original, image_completions in zip(originals, completions)]
            titles = ["original", "given"] + [f"sample {i + 1}" for i in range(args.num_completions)]
            # Each row: the original | its top rows, the rest hidden | the completions.
            grids = {"completions": (rows, magnification)}
            if upscaler is not None:
                logger.info(f"Upscaling the completions with --upscale_model {args.upscale_model}")
                grids["completions_upscaled"] = (upscaled(rows, upscaler), 1)  # at the size the upscaler made
            for name, (images, cell_magnification) in grids.items():
                hidden_from = primer_rows * images[0][0].shape[0] // n_px  # the given rows, at this size
                cells = [[original, hide_rows(original, hidden_from), *rest] for original, *rest in images]
                with atomic_file(paths[name], overwrite=args.overwrite, inputs=inputs, arg="the output file") as tmp:
                    grid(cells, cell_magnification, titles).save(tmp)
        if args.num_samples > 0:
            logger.info(f"Sampling {args.num_samples} images from scratch")
            samples = sample(model, args.num_samples, seed=args.seed + 1, **options)
            per_row = min(8, args.num_samples)
            rows = [list(samples[i : i + per_row]) for i in range(0, len(samples), per_row)]
            grids = {"samples": (rows, magnification)}
            if upscaler is not None:
                logger.info(f"Upscaling the samples with --upscale_model {args.upscale_model}")
                grids["samples_upscaled"] = (upscaled(rows, upscaler), 1)
            for name, (images, cell_magnification) in grids.items():
                with atomic_file(paths[name], overwrite=args.overwrite, inputs=inputs, arg="the output file") as tmp:
                    grid(images, cell_magnification).save(tmp)
        for name, path in paths.items():
            logger.info(f"Wrote {name}: {path}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
