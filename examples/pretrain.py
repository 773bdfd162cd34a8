"""Pretrain Image GPT on pixels with Accelerate: the paper's autoregressive (next pixel) or BERT (masked pixels)
objective, on any `datasets` image dataset, an imagefolder, or the bundled scikit-learn digits.

    accelerate launch examples/pretrain.py --objective ar --model_size tiny --output_dir igpt-tiny-digits

Images become palette ids on the fly (random crops for training); a palette is fitted by k-means to the training
images unless one is given. Evaluation reports the loss in bits per dimension (one dimension = one pixel = one
palette id). The output folder loads with `AutoModelForCausalLM` (AR) / `AutoModelForMaskedImageModeling` (BERT) /
`AutoModel`, and its processor with `AutoImageProcessor`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import torch
from accelerate.utils import set_seed

import common
from common import logger
from image_gpt_hf import PRESETS, ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTForMaskedImageModeling


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
    common.add_processor_arguments(parser, fit_palette=True)
    common.add_training_arguments(parser, learning_rate=1e-3, num_train_epochs=10)
    args = parser.parse_args(argv)
    common.check_training_arguments(args)
    if args.model_name_or_path is not None and (args.config_name is not None or args.config_overrides is not None):
        raise ValueError("--model_name_or_path brings its own config: drop --config_name / --config_overrides.")
    if not 0.0 < args.mask_prob < 1.0:
        raise ValueError(f"--mask_prob must be in (0, 1), got {args.mask_prob}.")
    return args


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
        common.check_n_px(n_px, config, args.config_name or args.model_name_or_path)
    if args.config_overrides is not None:
        config.update_from_string(args.config_overrides)
    objective = args.objective or (base.objective if base is not None else "ar")
    if base is not None and args.model_name_or_path is not None and objective != base.objective:
        raise ValueError(
            f"{args.model_name_or_path} was pretrained with objective {base.objective!r}, not {objective!r}."
        )
    config.objective = objective
    # OpenAI's AR input: [SOS, x_1, ..., x_{n-1}] predicts all n pixels; saved so that the checkpoint keeps it.
    config.prepend_sos = objective == "ar"
    config.validate_architecture()
    if n_px * n_px > config.n_positions:
        raise ValueError(
            f"--n_px {n_px} needs {n_px * n_px} positions; the config has n_positions={config.n_positions}."
        )
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    accelerator = common.create_accelerator(args)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    resume_checkpoint = common.resolve_checkpoint(args)

    # Configs and data first: every bad input fails here, before a model is built.
    base = None
    if args.model_name_or_path is not None:
        base = common.load_imagegpt_config(args.model_name_or_path)
    elif args.config_name is not None:
        base = common.load_imagegpt_config(args.config_name)
    with accelerator.main_process_first():
        dataset = common.load_image_dataset(args)
    image_column = common.find_image_column(dataset, args.image_column_name)
    digits = args.dataset_name == common.DIGITS and args.train_dir is None
    if args.n_px is not None:
        n_px = args.n_px
    elif base is not None:
        n_px = base.n_px
    else:
        n_px = common.DIGITS_N_PX if digits else common.PAPER_N_PX
    if base is not None:
        common.check_n_px(n_px, base, args.config_name or args.model_name_or_path)
    elif n_px < 1:
        raise ValueError(f"--n_px must be positive, got {n_px}.")

    # The palette: the resumed checkpoint's, a given processor's, the model's, or fitted to the training images.
    processor_source = resume_checkpoint or args.processor_name_or_path or args.model_name_or_path
    processor = common.load_processor(processor_source) if processor_source is not None else None
    if processor is not None:
        processor = common.resize_processor(processor, n_px)
        logger.info(f"Using the {len(processor.clusters)}-color palette of {processor_source}")
    elif args.processor_name_or_path is not None or args.model_name_or_path is not None:
        raise ValueError(f"{processor_source!r} has no preprocessor_config.json with a palette ('clusters').")
    else:
        if args.palette_size is not None:
            palette_size = args.palette_size
        elif base is not None:
            palette_size = base.palette_size
        else:
            palette_size = common.DIGITS_PALETTE_SIZE if digits else common.PAPER_PALETTE_SIZE
        processor = common.fitted_processor(args, accelerator, dataset["train"], image_column, n_px, palette_size)
    if args.palette_size is not None and args.palette_size != len(processor.clusters):
        raise ValueError(
            f"--palette_size {args.palette_size} contradicts the {len(processor.clusters)}-color palette of {processor_source}."
        )
    config = build_config(args, base, len(processor.clusters), n_px)

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

    mask_prob = args.mask_prob if config.objective == "bert" else None
    train_dataloader, eval_dataloader, train_collator = common.make_dataloaders(
        args, dataset, processor, image_column, mask_prob=mask_prob, eval_mask_prob=mask_prob
    )
    train_dataloader, eval_dataloader = accelerator.prepare(train_dataloader, eval_dataloader)
    optimizer, lr_scheduler = common.optimizer_and_scheduler(args, accelerator, model, train_dataloader)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # AR: OpenAI's loss over all n pixels (config.prepend_sos); BERT: the masked pixels of each image.
        return model(**batch, labels=batch["input_ids"]).loss

    def evaluate() -> dict[str, float]:
        model.eval()
        losses = []
        for batch in common.progress_bar(accelerator, iterable=eval_dataloader, desc="eval", leave=False):
            with torch.no_grad():
                loss = model(**batch, labels=batch["input_ids"]).loss
            losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(len(batch["input_ids"]))))
        model.train()
        eval_loss = torch.cat(losses).mean().item()
        return {"eval_loss": eval_loss, "eval_bpd": eval_loss / math.log(2)}

    metrics = common.train(
        args,
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        train_dataloader,
        train_collator,
        compute_loss=compute_loss,
        evaluate=evaluate,
        resume_checkpoint=resume_checkpoint,
        save_extra=processor.save_pretrained,
        project_name="image_gpt_pretrain",
    )

    data_name, hub_datasets = common.dataset_facts(args)
    origin = f"from {args.model_name_or_path}" if args.model_name_or_path else "from scratch"
    facts = {
        "training": f"Pretrained {origin} with examples/pretrain.py, {config.objective.upper()} objective, on "
        f"{data_name}: {args.max_train_steps} steps of {args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} "
        f"images, AdamW at peak learning rate {args.learning_rate:g} ({args.lr_scheduler_type.value} schedule), "
        f"seed {args.seed}.",
        "datasets": hub_datasets,
        "results": [
            {
                "task": "unconditional-image-generation" if config.objective == "ar" else "masked-image-modeling",
                "dataset": args.dataset_name if args.train_dir is None else "imagefolder",
                "dataset_name": data_name,
                "split": args.eval_split_name,
                "metric": "bits_per_dim",
                "name": "bits per dimension (one pixel = one palette id)",
                "value": round(metrics["eval_bpd"], 4),
            }
        ],
    }
    if args.model_name_or_path is None:
        facts["license"] = "mit"
    elif not os.path.isdir(args.model_name_or_path):
        facts["base_model"] = args.model_name_or_path
    common.save_model(accelerator, model, processor, args, facts=facts, results=metrics)
    return metrics


if __name__ == "__main__":
    main()
