"""Pretrain Image GPT on pixels with Accelerate: the paper's autoregressive (next pixel) or BERT (masked pixels)
objective, on any `datasets` image dataset, an imagefolder, or the bundled scikit-learn digits.

    accelerate launch examples/pretrain.py --objective ar --model_size tiny --output_dir igpt-tiny-digits

Images become palette ids on the fly (random crops for training); a palette is fitted by k-means to the training
images unless one is given. Evaluation reports the loss in bits per dimension (one dimension = one pixel = one
palette id). The output folder loads with `AutoModelForCausalLM` (AR, which then samples from SOS with a plain
`generate()`) / `AutoModelForMaskedImageModeling` (BERT) / `AutoModel`, and its processor with `AutoImageProcessor`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

import common
from common import logger
from image_gpt_hf import (
    PRESETS,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
)
from image_gpt_hf.palette import fit_palette

SCRIPT = "pretrain.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain Image GPT on pixels (AR or BERT objective) with Accelerate."
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--objective",
        choices=["ar", "bert"],
        default=None,
        help="ar: next-pixel prediction (causal); bert: masked-pixel prediction. Default: the config's, else ar.",
    )
    group.add_argument("--model_size", choices=list(PRESETS), default="tiny", help="A preset size for a new model.")
    group.add_argument(
        "--config_name", type=str, default=None, help="A config (folder, JSON or Hub id) instead of a preset."
    )
    group.add_argument(
        "--config_overrides",
        type=str,
        default=None,
        help="Override config fields of a new model, e.g. 'n_layer=4,n_embd=64,resid_pdrop=0.0'.",
    )
    group.add_argument(
        "--model_name_or_path",
        type=str,
        default=None,
        help="Continue pretraining this checkpoint's weights (with its config and palette) instead of a new model.",
    )
    group.add_argument("--mask_prob", type=float, default=0.15, help="BERT: probability that a pixel is masked.")
    common.add_data_arguments(parser)
    group = common.add_processor_arguments(parser)
    group.add_argument(
        "--palette_size",
        type=int,
        default=None,
        help=f"Colors of the palette fitted by k-means when no processor is given. Default: the config's, else "
        f"{common.PAPER_PALETTE_SIZE} (the paper's), or {common.DIGITS_PALETTE_SIZE} on the bundled gray digits.",
    )
    group.add_argument("--palette_max_pixels", type=int, default=1_000_000, help="Pixels sampled for the palette fit.")
    common.add_training_arguments(parser, learning_rate=1e-3, num_train_epochs=10)
    args = parser.parse_args(argv)
    common.check_training_arguments(args)
    if args.model_name_or_path is not None and (args.config_name is not None or args.config_overrides is not None):
        raise ValueError("--model_name_or_path brings its own config: drop --config_name / --config_overrides.")
    if not 0.0 < args.mask_prob < 1.0:
        raise ValueError(f"--mask_prob must be in (0, 1), got {args.mask_prob}.")
    if args.n_px is not None and args.n_px < 1:
        raise ValueError(f"--n_px must be positive, got {args.n_px}.")
    if args.palette_size is not None and args.palette_size < 2:
        raise ValueError(f"--palette_size must be at least 2, got {args.palette_size}.")
    if args.config_overrides is not None:
        parse_config_overrides(args.config_overrides)
    return args


def parse_config_overrides(overrides: str) -> list[str]:
    """The 'field=value' pairs of --config_overrides, each checked to be a config field with a value of its type."""
    pairs = [pair.strip() for pair in overrides.split(",") if pair.strip()]
    for pair in pairs:
        field = pair.split("=", 1)[0].strip()
        if field in ("n_positions", "vocab_size"):
            raise ValueError(
                f"--config_overrides {pair!r}: {field} follows from the images and the palette; set --n_px / "
                "--palette_size instead."
            )
        try:
            ImageGPTConfig().update_from_string(pair)
        except ValueError as err:
            raise ValueError(
                f"--config_overrides {pair!r} is not a valid override ({err}); give comma-separated field=value "
                "pairs of ImageGPTConfig fields with values of their type, e.g. 'n_layer=4,n_embd=64,resid_pdrop=0.0'."
            ) from None
    return pairs


def build_config(
    args: argparse.Namespace, base: ImageGPTConfig | None, palette_size: int, n_px: int
) -> ImageGPTConfig:
    """The model config: `base` (from --config_name / --model_name_or_path) or the --model_size preset."""
    if base is None:
        config = ImageGPTConfig.from_preset(args.model_size, n_px=n_px, palette_size=palette_size)
    else:
        config = base
        if config.palette_size != palette_size:
            raise ValueError(
                f"The config predicts {config.palette_size} colors but the palette has {palette_size}; "
                "pass a matching --palette_size / --processor_name_or_path."
            )
    for pair in parse_config_overrides(args.config_overrides or ""):
        config.update_from_string(pair)
    objective = args.objective or (base.objective if base is not None else "ar")
    if base is not None and args.model_name_or_path is not None and objective != base.objective:
        raise ValueError(
            f"{args.model_name_or_path} was pretrained with objective {base.objective!r}, not {objective!r}."
        )
    config.objective = objective
    # OpenAI's AR input: [SOS, x_1, ..., x_{n-1}] predicts all n pixels; saved so that the checkpoint keeps it.
    config.prepend_sos = objective == "ar"
    try:
        config.validate_architecture()
    except ValueError as err:
        raise ValueError(f"The model config is invalid (check --config_name / --config_overrides): {err}") from None
    return config


class DecodedImages(Sequence):
    """The images of a split, decoded (and named when unreadable) by `common.ImageDataset`: what the palette fit reads."""

    def __init__(self, split: datasets.Dataset, image_column: str):
        self.dataset = common.ImageDataset(split, image_column, [image_column])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            examples = self.dataset.__getitems__(list(range(*index.indices(len(self)))))
            return [example[self.dataset.image_column] for _, example in examples]
        return self.dataset[index][1][self.dataset.image_column]


def fitted_palette(
    args: argparse.Namespace,
    accelerator: Accelerator,
    split: datasets.Dataset,
    image_column: str,
    n_px: int,
    size: int,
) -> np.ndarray:
    """A palette fitted by k-means to the training images, on the main process, then shared with the others."""
    palette = [None]
    if accelerator.is_main_process:
        logger.info(f"Fitting a {size}-color palette by k-means to the training images at {n_px}x{n_px}")
        palette[0] = fit_palette(
            DecodedImages(split, image_column),
            num_colors=size,
            n_px=n_px,
            max_pixels=args.palette_max_pixels,
            seed=args.seed,
        )
    if accelerator.num_processes > 1:
        broadcast_object_list(palette)
    return palette[0]


def evaluate(accelerator: Accelerator, model: torch.nn.Module, eval_dataloader: DataLoader) -> dict[str, float]:
    """The objective's loss on the evaluation split, in nats and in bits per dimension (per pixel)."""
    model.eval()
    losses = []
    for batch in common.progress_bar(accelerator, iterable=eval_dataloader, desc="eval", leave=False):
        with torch.no_grad():
            loss = model(**batch, labels=batch["input_ids"]).loss
        losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(len(batch["input_ids"]))))
    model.train()
    eval_loss = torch.cat(losses).mean().item()
    return {"eval_loss": eval_loss, "eval_bpd": eval_loss / math.log(2)}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    accelerator = common.create_accelerator(args)
    set_seed(args.seed)
    common.check_output_dir(accelerator, args, SCRIPT)
    checkpoint = common.find_checkpoint(args, accelerator, SCRIPT)

    # Config, data and palette first: every bad input fails here, before a model is built or a palette fitted.
    base_source = args.model_name_or_path or args.config_name
    base = common.load_imagegpt_config(base_source) if base_source is not None else None
    with accelerator.main_process_first():
        dataset, eval_split = common.load_image_dataset(args)
    image_column = common.find_image_column(dataset, args.image_column_name)
    digits = args.dataset_name == common.DIGITS and args.train_dir is None
    n_px = args.n_px or (base.n_px if base else common.DIGITS_N_PX if digits else common.PAPER_N_PX)
    if base is not None:
        common.check_n_px(n_px, base, base_source)

    # The palette: the resumed checkpoint's, a given processor's, the model's, or fitted to the training images.
    processor_source = checkpoint[0] if checkpoint else args.processor_name_or_path or args.model_name_or_path
    processor = common.load_processor(processor_source, n_px) if processor_source is not None else None
    if processor is None and (args.processor_name_or_path or args.model_name_or_path) is not None:
        raise ValueError(f"{processor_source!r} has no preprocessor_config.json with a palette ('clusters').")
    default_size = base.palette_size if base else common.DIGITS_PALETTE_SIZE if digits else common.PAPER_PALETTE_SIZE
    palette_size = len(processor.clusters) if processor is not None else args.palette_size or default_size
    if args.palette_size is not None and args.palette_size != palette_size:
        raise ValueError(
            f"--palette_size {args.palette_size} contradicts the {palette_size}-color palette of {processor_source}."
        )
    config = build_config(args, base, palette_size, n_px)
    if processor is None:
        palette = fitted_palette(args, accelerator, dataset["train"], image_column, n_px, palette_size)
        processor = ImageGPTImageProcessor(clusters=palette, size={"height": n_px, "width": n_px})
    else:
        logger.info(f"Using the {palette_size}-color palette of {processor_source}")

    # The model: new from the config, or the given checkpoint's weights.
    model_class = ImageGPTForCausalImageModeling if config.objective == "ar" else ImageGPTForMaskedImageModeling
    if args.model_name_or_path is not None:
        model = model_class.from_pretrained(args.model_name_or_path, config=config)
    else:
        model = model_class(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger.info(
        f"Model: {model_class.__name__}, {config.n_layer} layers x {config.n_embd} wide, {model.num_parameters():,} "
        f"parameters, {n_px}x{n_px} pixels, {config.palette_size} colors, objective {config.objective}"
    )

    # DataLoaders: random crops for training, center crops for evaluation; BERT masks on both (fixed by the seed).
    mask_prob = args.mask_prob if config.objective == "bert" else None
    crop_scale = None if args.no_random_crop else tuple(args.random_crop_scale)
    train_collator = common.ImageGPTCollator(
        processor, image_column, train=True, random_crop_scale=crop_scale, mask_prob=mask_prob, seed=args.seed
    )
    eval_collator = common.ImageGPTCollator(processor, image_column, train=False, mask_prob=mask_prob, seed=args.seed)
    train_dataloader = accelerator.prepare(common.dataloader(dataset["train"], train_collator, args, train=True))
    eval_dataloader = accelerator.prepare(common.dataloader(dataset["validation"], eval_collator, args, train=False))

    # Optimizer and schedule, sized by the prepared (per-process) DataLoader.
    optimizer, lr_scheduler, max_train_steps = common.optimizer_and_scheduler(
        args, accelerator, model, train_dataloader
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    # Training, from the checkpoint when resuming; the processor is saved with every checkpoint (its palette).
    progress = common.TrainingProgress(
        accelerator, args, SCRIPT, train_dataloader, max_train_steps, checkpoint, save_also=processor.save_pretrained
    )
    metrics = {}
    model.train()
    for batch in progress.batches(train_collator):
        with accelerator.accumulate(model):
            # AR: OpenAI's loss over all n pixels (config.prepend_sos); BERT: the masked pixels of each image.
            loss = model(**batch, labels=batch["input_ids"]).loss
            accelerator.backward(loss)
            common.optimizer_step(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm)
        if progress.step(lr_scheduler, train_loss=loss):  # an evaluation is due
            metrics = evaluate(accelerator, model, eval_dataloader)
            progress.log(metrics)
    metrics = metrics or evaluate(accelerator, model, eval_dataloader)  # resumed from the last step
    progress.close()

    origin = f"from {args.model_name_or_path}" if args.model_name_or_path else "from scratch"
    trained = (
        f"Pretrained {origin} with examples/pretrain.py, {config.objective.upper()} objective, {max_train_steps} steps"
    )
    bpd = {
        "metric": "bits_per_dim",
        "name": "bits per dimension (one pixel = one palette id)",
        "value": metrics["eval_bpd"],
    }
    common.save_model(
        accelerator, model, processor, args, SCRIPT, trained=trained, split=eval_split, result=bpd, results=metrics
    )
    return metrics


if __name__ == "__main__":
    main()
