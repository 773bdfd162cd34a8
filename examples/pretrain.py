"""Pretrain Image GPT on pixels with Accelerate: the paper's autoregressive (next pixel) or BERT (masked pixels)
objective, on any `datasets` image dataset, an imagefolder, or the bundled scikit-learn digits.

    accelerate launch examples/pretrain.py --objective ar --model_size tiny --output_dir igpt-tiny-digits

Images become palette ids in the datasets' transforms (random crops for training); a palette is fitted by k-means to
the training images unless one is given. Batches come from the library's `ImageGPTDataCollator`. Evaluation reports
the loss in bits per dimension (one dimension = one pixel = one palette id). The output folder loads with
`AutoModelForCausalLM` (AR, which then samples from SOS with a plain `generate()`) / `AutoModelForMaskedImageModeling`
(BERT) / `AutoModel`, and its processor with `AutoImageProcessor`. Checkpoints are accelerate's (`save_state`), with
the run's position and contract (`image_gpt_hf.training.TrainingRun`); the flags and the Accelerator are in
training_run.py, which finetune.py shares: to train on your own data, copy both files.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, get_scheduler

from image_gpt_hf import (
    PRESETS,
    ImageGPTConfig,
    ImageGPTDataCollator,
    ImageGPTForCausalImageModeling,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
    load_config_and_processor,
)
from image_gpt_hf.data import random_resized_crop
from image_gpt_hf.generation import openai_generation_config
from image_gpt_hf.model_card import write_model_card
from image_gpt_hf.palette import fit_palette
from image_gpt_hf.safe_io import check_output_path, staged_dir
from image_gpt_hf.training import DIGITS, TrainingRun, decode_images, load_image_dataset
from training_run import RUN_FLAGS, check_finite, make_accelerator, training_parser

logger = get_logger(__name__)
TRACKER_DIR = "image_gpt_pretrain"
KEEP = ["checkpoints", TRACKER_DIR, ".lock"]  # this run's own entries in --output_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = training_parser("Pretrain Image GPT on pixels (AR or BERT objective).", learning_rate=1e-3, epochs=10)
    add = parser.add_argument
    add("--objective", choices=["ar", "bert"], default=None, help="Default: the config's, else ar.")
    add("--model_size", choices=list(PRESETS), default=None, help="A preset for a new model (default: tiny).")
    add("--config_name", default=None, help="A config (folder, JSON or Hub id) instead of a preset.")
    add("--config_overrides", default=None, help="The new model's config fields, e.g. 'n_layer=4,n_embd=64'.")
    add("--model_name_or_path", default=None, help="Continue pretraining this checkpoint.")
    add("--mask_prob", type=float, default=None, help="BERT: the probability that a pixel is masked (0.15).")
    add("--n_px", type=int, help="A new model's side: 32, or 8 on the digits (default); else the config's.")
    add("--processor_name_or_path", default=None, help="A processor with a palette ('clusters').")
    add("--palette_size", type=int, default=None)
    add("--palette_max_pixels", type=int, default=1_000_000, help="Pixels sampled for the palette's k-means.")
    args = parser.parse_args(argv)

    # The errors argparse cannot see, before anything is loaded.
    if args.model_name_or_path is not None and (args.config_name is not None or args.config_overrides is not None):
        raise ValueError("--model_name_or_path brings its own config: drop --config_name / --config_overrides.")
    if args.model_size is not None and (args.model_name_or_path is not None or args.config_name is not None):
        given = "--model_name_or_path" if args.model_name_or_path is not None else "--config_name"
        raise ValueError(
            f"--model_size {args.model_size} is a preset for a new model; {given} brings its own config: drop "
            "--model_size."
        )
    args.overrides = {}  # --config_overrides as {field: value}, each a config field with a value of its type
    for pair in (p.strip() for p in (args.config_overrides or "").split(",") if p.strip()):
        field = pair.split("=", 1)[0].strip()
        if field in ("n_positions", "vocab_size"):
            raise ValueError(
                f"--config_overrides {pair!r}: {field} follows from the images and the palette; set --n_px / "
                "--palette_size instead."
            )
        config = ImageGPTConfig()
        try:
            config.update_from_string(pair)
        except ValueError as err:
            raise ValueError(
                f"--config_overrides {pair!r} is not a valid override ({err}); give comma-separated field=value pairs "
                "of ImageGPTConfig fields with values of their type, e.g. 'n_layer=4,n_embd=64,resid_pdrop=0.0'."
            ) from None
        args.overrides[field] = getattr(config, field)
    if args.objective and args.overrides.get("objective", args.objective) != args.objective:
        raise ValueError(
            f"--config_overrides objective={args.overrides['objective']} contradicts --objective {args.objective}; "
            "set the objective with --objective alone."
        )
    return args


def evaluate(accelerator: Accelerator, model: torch.nn.Module, eval_dataloader: DataLoader) -> dict[str, float]:
    """The objective's loss on the evaluation split, in nats and in bits per dimension (per pixel)."""
    model.eval()
    losses = []
    with torch.no_grad(), torch.random.fork_rng():  # evaluation draws nothing from training's random stream
        for batch in tqdm(eval_dataloader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
            loss = model(**batch).loss
            losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(len(batch["input_ids"]))))
    model.train()
    eval_loss = torch.cat(losses).mean().item()
    return {"eval_loss": eval_loss, "eval_bpd": eval_loss / math.log(2)}


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)

    # The Accelerator (`accelerate launch`, or plain python), with transformers' example logging.
    accelerator = make_accelerator(args)
    set_seed(args.seed)

    # The output folder (refused before any work when it holds anything but this run's own entries) and the checkpoint.
    inputs = [args.model_name_or_path, args.config_name, args.processor_name_or_path]
    inputs += [args.train_dir, args.validation_dir, args.dataset_name]
    checkpoint = TrainingRun.find_checkpoint(args.resume_from_checkpoint, args.output_dir, inputs)
    check_output_path(args.output_dir, inputs=inputs, overwrite=args.overwrite, keep=KEEP if checkpoint else [".lock"])

    # The config (a preset, --config_name or --model_name_or_path, with --config_overrides) and a given palette.
    base = processor = None
    if source := args.model_name_or_path or args.config_name:
        if args.model_name_or_path or args.processor_name_or_path:
            base, processor = load_config_and_processor(source, args.processor_name_or_path)
        elif not isinstance(base := AutoConfig.from_pretrained(source), ImageGPTConfig):
            raise ValueError(f"{source!r} is a {base.model_type!r} checkpoint ({type(base).__name__}), not Image GPT.")
    elif args.processor_name_or_path:
        if (processor := ImageGPTImageProcessor.from_pretrained(args.processor_name_or_path)).clusters is None:
            raise ValueError(f"{args.processor_name_or_path!r} has no palette ('clusters') in its processor config.")
    if processor is None and checkpoint and (palette := TrainingRun.saved(checkpoint)["palette"]):
        processor = ImageGPTImageProcessor(clusters=palette)  # the palette this run fitted
    digits = args.dataset_name == DIGITS and args.train_dir is None
    n_px = args.n_px or (base.n_px if base else 8 if digits else 32)
    if base is not None and n_px != base.n_px:
        raise ValueError(
            f"--n_px {n_px} differs from the config's n_px {base.n_px} ({source}, n_positions={base.n_positions}): the "
            f"model would train at {n_px}x{n_px} but keep {base.n_positions} positions. Leave --n_px out."
        )
    objective = args.objective or args.overrides.get("objective") or (base.objective if base else "ar")
    if args.model_name_or_path is not None and objective != base.objective:
        raise ValueError(f"{source} was pretrained with objective {base.objective!r}, not {objective!r}.")
    if args.mask_prob is not None and objective != "bert":
        raise ValueError(
            f"--mask_prob {args.mask_prob} masks pixels for the BERT objective, but this run's objective is "
            f"{objective!r}, trained on whole images; leave --mask_prob out."
        )
    if objective == "bert" and args.mask_prob is None:
        args.mask_prob = 0.15
    # OpenAI's AR input is [SOS, x_1, ..., x_{n-1}] predicting all n pixels; BERT reads the pixels alone.
    if args.overrides.get("prepend_sos", objective == "ar") != (objective == "ar"):
        raise ValueError(
            f"--config_overrides prepend_sos={args.overrides['prepend_sos']} contradicts the objective {objective!r} "
            f"(--objective {objective}): it trains with prepend_sos={objective == 'ar'}. Drop prepend_sos from "
            "--config_overrides."
        )

    # Data: "train" and "validation" splits, the image column.
    with accelerator.main_process_first():
        names = inspect.signature(load_image_dataset).parameters  # the data flags, by name
        dataset, eval_split, image_column = load_image_dataset(**{k: v for k, v in vars(args).items() if k in names})

    def decode(batch: dict) -> list[PIL.Image.Image]:
        return decode_images(batch[image_column])

    undecoded = {
        split: dataset[split].select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        for split in dataset
    }

    # The palette: a given processor's (or the resumed checkpoint's), the model's, or fitted by k-means.
    if processor is not None:
        processor.size, processor.do_center_crop = {"height": n_px, "width": n_px}, False
    palette_size = len(processor.clusters) if processor is not None else base.palette_size if base else None
    if args.palette_size not in (None, palette_size or args.palette_size):
        raise ValueError(f"--palette_size {args.palette_size} contradicts the {palette_size}-color palette given.")
    palette_size = palette_size or args.palette_size or (16 if digits else 512)
    config = (
        base
        if base is not None
        else ImageGPTConfig.from_preset(args.model_size or "tiny", n_px=n_px, palette_size=palette_size)
    )
    for field, value in args.overrides.items():
        setattr(config, field, value)
    config.objective, config.prepend_sos = objective, objective == "ar"
    try:
        config.validate_architecture()
    except ValueError as err:
        raise ValueError(f"The model config is invalid (check --config_name / --config_overrides): {err}") from None
    if processor is None:
        palette = [None]
        if accelerator.is_main_process:
            logger.info(f"Fitting a {palette_size}-color palette by k-means to the training images at {n_px}x{n_px}")
            images = undecoded["train"].with_transform(lambda batch: {image_column: decode(batch)})
            palette[0] = fit_palette(images, palette_size, n_px, args.palette_max_pixels, args.seed, image_column)
        if accelerator.num_processes > 1:
            broadcast_object_list(palette)
        processor = ImageGPTImageProcessor(clusters=palette[0], size={"height": n_px, "width": n_px})

    # The run contract (a resume must match it), carried by every checkpoint with the position; one writer per folder.
    flags = {f"--{name}": getattr(args, name) for name in RUN_FLAGS + (["mask_prob"] if objective == "bert" else [])}
    data, fingerprint = (dataset["train"], [image_column]), bool(checkpoint or args.checkpointing_steps)
    flags["image_column"], palette = image_column, np.asarray(processor.clusters).tolist()
    run = TrainingRun(accelerator, "pretrain.py", config, processor, flags, data, fingerprint, palette=palette)
    _lock = run.start(args.output_dir, checkpoint, args.overwrite, clear=(TRACKER_DIR,))  # held while main() runs

    # The model: new from the config, or the given checkpoint's weights.
    model_class = ImageGPTForCausalImageModeling if objective == "ar" else ImageGPTForMaskedImageModeling
    pretrained = args.model_name_or_path
    model = model_class.from_pretrained(pretrained, config=config) if pretrained else model_class(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger.info(
        f"Model: {model_class.__name__}, {config.n_layer} layers x {config.n_embd} wide, {model.num_parameters():,} "
        f"parameters, {n_px}x{n_px} pixels, {config.palette_size} colors, objective {objective}"
    )

    # Transforms: random crops for training (one generator per batch, seeded by the seed, the epoch and the examples'
    # indices: a resumed run draws the same crops), the center for evaluation. BERT masks come from the collator.
    epoch_now = [0]
    center = {"size": {"shortest_edge": n_px}, "do_center_crop": True, "crop_size": {"height": n_px, "width": n_px}}

    def encode(images: list[PIL.Image.Image], **kwargs) -> dict:
        return {"input_ids": processor(images, return_tensors="pt", **kwargs)["input_ids"]}

    def train_transforms(batch: dict) -> dict:
        if args.no_random_crop:
            return encode(decode(batch), **center)
        seed = np.random.SeedSequence([args.seed, 1, epoch_now[0], *batch["index"]]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        return encode([random_resized_crop(image, args.random_crop_scale, generator) for image in decode(batch)])

    train_dataset = undecoded["train"].add_column("index", list(range(len(undecoded["train"]))))
    train_dataset = train_dataset.with_transform(train_transforms)
    eval_dataset = undecoded["validation"].with_transform(lambda batch: encode(decode(batch), **center))
    masking = {"mask_probability": args.mask_prob} if objective == "bert" else {}
    collator = ImageGPTDataCollator(objective=objective, **masking, seed=args.seed)
    eval_collator = ImageGPTDataCollator(objective=objective, **masking, seed=args.seed)  # epoch 0: fixed masks
    order = torch.Generator().manual_seed(args.seed)  # keeps the data order off the global RNG (dropout)
    loading = {"num_workers": args.dataloader_num_workers}
    train_dataloader = DataLoader(
        train_dataset, args.per_device_train_batch_size, shuffle=True, collate_fn=collator, generator=order, **loading
    )
    eval_dataloader = DataLoader(eval_dataset, args.per_device_eval_batch_size, collate_fn=eval_collator, **loading)
    train_dataloader, eval_dataloader = accelerator.prepare(train_dataloader, eval_dataloader)

    # AdamW (no weight decay on biases and norms) and the schedule, sized by the prepared
    # (per-process) DataLoader.
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2))
    processes = accelerator.num_processes  # a prepared scheduler steps once per process for every optimizer step
    steps = {"num_warmup_steps": args.num_warmup_steps * processes, "num_training_steps": max_train_steps * processes}
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer, **steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if args.with_tracking:
        accelerator.init_trackers(
            TRACKER_DIR, {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        )

    # Training, from the checkpoint when resuming: the batches of its epoch that it has seen are skipped unloaded.
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training: {len(train_dataset)} examples, {num_train_epochs} epochs")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    run.resume(checkpoint, len(train_dataloader))
    completed_steps, starting_epoch = run["completed_steps"], run["epoch"]
    progress_bar = tqdm(
        total=max_train_steps, initial=completed_steps, desc="train", disable=not accelerator.is_local_main_process
    )
    running, metrics = [], {}
    model.train()
    for epoch in range(starting_epoch, num_train_epochs):
        if completed_steps >= max_train_steps:
            break
        epoch_now[0] = collator.epoch = epoch  # new crops and masks every epoch, the same ones after a resume
        train_dataloader.set_epoch(epoch)
        seen = run["seen"] if epoch == starting_epoch else 0
        for batch in accelerator.skip_first_batches(train_dataloader, seen) if seen else train_dataloader:
            seen += 1
            with accelerator.accumulate(model):
                # AR: OpenAI's loss over all n pixels (config.prepend_sos); BERT: the masked pixels of each image.
                loss = model(**batch).loss
                check_finite(accelerator, args, loss, completed_steps + 1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            running.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress_bar.update(1)
            done, end_of_epoch = completed_steps >= max_train_steps, seen >= len(train_dataloader)
            logs = {}
            if completed_steps % args.logging_steps == 0 or done:
                logs = {"train_loss": accelerator.reduce(torch.stack(running).mean(), "mean").item()}
                logs |= {"lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                running = []
                progress_bar.set_postfix(train_loss=f"{logs['train_loss']:.4f}")
            every = args.checkpointing_steps
            if (end_of_epoch or done) if every == "epoch" else every and completed_steps % int(every) == 0:
                run.save(completed_steps=completed_steps, epoch=epoch, seen=seen)
            if (completed_steps % args.eval_steps == 0 or done) if args.eval_steps else (end_of_epoch or done):
                logs |= (metrics := evaluate(accelerator, model, eval_dataloader))
            if logs:
                logger.info(f"step {completed_steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))
                if args.with_tracking:
                    accelerator.log(logs, step=completed_steps)
            if done:
                break
    metrics = metrics or evaluate(accelerator, model, eval_dataloader)  # (a run resumed from its last step)
    progress_bar.close()
    if args.with_tracking:
        accelerator.end_training()

    # The model folder (weights + config, processor, generation config, card, all_results.json), staged and renamed
    # into --output_dir beside its checkpoints.
    origin = f"from {args.model_name_or_path}" if args.model_name_or_path else "from scratch"
    data_name = args.train_dir and f"the imagefolder {args.train_dir}"
    data_name = data_name or ("scikit-learn handwritten digits (8x8 scans)" if digits else args.dataset_name)
    task = "unconditional-image-generation" if objective == "ar" else "masked-image-modeling"
    dataset_id = "imagefolder" if args.train_dir else args.dataset_name
    result = {"task": task, "dataset": dataset_id, "dataset_name": data_name, "split": eval_split}
    result |= {"metric": "bits_per_dim", "name": "bits per dimension (one pixel = one palette id)"}
    result["value"] = round(metrics["eval_bpd"], 4)
    facts = {
        "training": f"Pretrained {origin} with examples/pretrain.py, {objective.upper()} objective, {max_train_steps} "
        f"steps on {data_name} in batches of {total_batch_size} images, AdamW at peak learning rate "
        f"{args.learning_rate:g} ({args.lr_scheduler_type.value} schedule), seed {args.seed}.",
        "datasets": [] if args.train_dir or digits else [args.dataset_name],
        "results": [result],
    }
    if args.model_name_or_path is None:
        facts["license"] = "mit"
    elif not os.path.isdir(args.model_name_or_path):
        facts["base_model"] = args.model_name_or_path
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every process: gathers sharded (FSDP) weights
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with staged_dir(args.output_dir, overwrite=args.overwrite, keep=KEEP, inputs=inputs) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            if objective == "ar":
                openai_generation_config(unwrapped.config).save_pretrained(tmp)
            write_model_card(tmp, unwrapped, processor=processor, facts=facts)
            (tmp / "all_results.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"Saved the model to {args.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
