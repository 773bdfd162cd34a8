"""Pretrain Image GPT on pixels with Accelerate: the paper's autoregressive (next pixel) or BERT (masked pixels)
objective, on any `datasets` image dataset, an imagefolder, or the bundled scikit-learn digits.

    accelerate launch examples/pretrain.py --objective ar --model_size tiny --output_dir igpt-tiny-digits

Images become palette ids in the datasets' transforms (random crops for training); a palette is fitted by k-means to
the training images unless one is given. Batches come from the library's `ImageGPTDataCollator`. Evaluation reports
the loss in bits per dimension (one dimension = one pixel = one palette id). With `--class_conditional`, each image's
class (`--label_column_name`, dropped with probability `--class_dropout`) is its first token, and evaluation reports
the bits per pixel without a class (`eval_bpd`) and with it (`eval_bpd_conditional`). The output folder loads with
`AutoModelForCausalLM` (AR, which then samples from SOS with a plain `generate()`) / `AutoModelForMaskedImageModeling`
(BERT) / `AutoModel`, and its processor with `AutoImageProcessor`. Checkpoints are accelerate's (`save_state`), with
the run's position and contract (`image_gpt_hf.training.TrainingRun`); the flags and the Accelerator are in
training_run.py, which finetune.py shares: to train on your own data, copy both files.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import time

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from datasets.distributed import split_dataset_by_node
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
from image_gpt_hf.shards import MANIFEST, load_shards, plan_processes
from image_gpt_hf.training import DIGITS, TrainingRun, class_labels, decode_images, load_image_dataset
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
    add("--class_conditional", action="store_true", help="Condition on the class labels (a new AR model).")
    add("--class_dropout", type=float, default=None, help="--class_conditional: how often to drop the class (0.1).")
    add("--label_column_name", default="label", help="With --class_conditional: the column of class labels.")
    # Tokenized shards (examples/tokenize_images.py), read map-style or streamed; throughput.
    add("--shards_dir", default=None, help="Shards of tokenize_images.py: their ids, palette and n_px.")
    add("--streaming", action="store_true", help="Stream --shards_dir: each process reads its own shards.")
    add("--shuffle_buffer_size", type=int, default=10_000, help="Streaming: examples in the shuffle buffer.")
    add("--allow_shard_reread", action="store_true", help="Streaming: allow more processes than shards.")
    add("--save_data_order", action="store_true", help="Write each process's example indices to data_order/.")
    add("--peak_tflops", type=float, default=None, help="A device's peak TFLOP/s: logs the MFU.")
    args = parser.parse_args(argv)
    if args.shards_dir:
        clash = ["train_dir", "validation_dir", "processor_name_or_path", "palette_size", "n_px", "no_random_crop"]
        clash = [
            f"--{name}"
            for name in clash + ["max_train_samples", "dataset_config_name", "class_conditional"]
            if getattr(args, name)
        ]
        clash += ["--dataset_name"] * (args.dataset_name != DIGITS)
        clash += ["--random_crop_scale"] * (tuple(args.random_crop_scale) != (0.5, 1.0))
        if clash:
            raise ValueError(
                f"--shards_dir {args.shards_dir} brings the images (tokenized, center-cropped), their palette and "
                f"n_px: drop {', '.join(clash)}."
            )
    if args.class_dropout is not None and not args.class_conditional:
        raise ValueError(f"--class_dropout {args.class_dropout} drops the class of --class_conditional runs: drop it.")
    args.class_dropout = 0.1 if args.class_dropout is None else args.class_dropout
    if args.streaming and (missing := [name for name in ("shards_dir", "max_train_steps") if not getattr(args, name)]):
        raise ValueError(
            "--streaming reads --shards_dir and needs --max_train_steps (a stream has no length to count epochs by): "
            f"give --{' and --'.join(missing)}."
        )

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
    """The objective's loss on the evaluation split, in nats and in bits per dimension (per pixel); a class-conditional
    model's without a class (as an unconditional model is evaluated) and, `_conditional`, with each image's class."""
    model.eval()
    losses = {"": [], "_conditional": []}
    with torch.no_grad(), torch.random.fork_rng():  # evaluation draws nothing from training's random stream
        for batch in tqdm(eval_dataloader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
            classes = batch.pop("class_labels", None)
            for name, given in (("", None), ("_conditional", classes)) if classes is not None else (("", None),):
                loss = model(**batch, class_labels=given).loss.detach().float().repeat(len(batch["input_ids"]))
                losses[name].append(accelerator.gather_for_metrics(loss))
    model.train()
    metrics = {}
    for name, values in losses.items():
        if values:
            loss = torch.cat(values).mean().item()
            metrics |= {f"eval_loss{name}": loss, f"eval_bpd{name}": loss / math.log(2)}
    return metrics


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
    if args.shards_dir:  # their processor (a model's own is checked against the shards by load_shards)
        manifest = json.loads(open(os.path.join(args.shards_dir, MANIFEST)).read())
        processor = processor or ImageGPTImageProcessor.from_pretrained(args.shards_dir)
    digits = args.dataset_name == DIGITS and args.train_dir is None and not args.shards_dir
    n_px = args.n_px or (base.n_px if base else manifest["n_px"] if args.shards_dir else 8 if digits else 32)
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

    # Data: "train" and "validation" splits, the image column (and, class-conditional, the labels and their names).
    with accelerator.main_process_first():
        names = inspect.signature(load_image_dataset).parameters  # the data flags, by name
        data_flags = {k: v for k, v in vars(args).items() if k in names}
        data = load_image_dataset(**data_flags) if not args.shards_dir else ({}, "validation", None)
        dataset, eval_split, image_column = data
    label_column = label_ids = None
    if args.class_conditional:  # the labels' names become the config's id2label
        label_column, class_names, label_ids = class_labels(dataset, args.label_column_name)

    def decode(batch: dict) -> list[PIL.Image.Image]:
        return decode_images(batch[image_column])

    undecoded = {
        split: dataset[split]
        .select_columns([image_column] + [label_column] * args.class_conditional)
        .cast_column(image_column, datasets.Image(decode=False))
        for split in dataset
    }

    # The palette: a given processor's (or the resumed checkpoint's), the model's, or fitted by k-means.
    if processor is not None:
        processor.size, processor.do_center_crop = {"height": n_px, "width": n_px}, False
    palette_size = len(processor.clusters) if processor is not None else base.palette_size if base else None
    if args.palette_size not in (None, palette_size or args.palette_size):
        raise ValueError(f"--palette_size {args.palette_size} contradicts the {palette_size}-color palette given.")
    palette_size = palette_size or args.palette_size or (16 if digits else 512)
    if args.class_conditional and (objective != "ar" or source):
        raise ValueError("--class_conditional trains a new AR model from a preset: drop --model_name_or_path, "
                         "--config_name and --objective bert.")  # fmt: skip
    classes = {"class_conditional": True, "id2label": dict(enumerate(class_names))} if args.class_conditional else {}
    preset = args.model_size or "tiny"
    config = base or ImageGPTConfig.from_preset(preset, n_px=n_px, palette_size=palette_size, **classes)
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
    names = RUN_FLAGS + (["mask_prob"] if objective == "bert" else [])
    names += ["class_conditional", "class_dropout", "label_column_name"] if args.class_conditional else []
    flags = {f"--{name}": getattr(args, name) for name in names}
    data = (dataset["train"], [image_column] + [label_column] * args.class_conditional) if dataset else None
    fingerprint = bool(checkpoint or args.checkpointing_steps)
    flags["image_column"], palette = image_column, np.asarray(processor.clusters).tolist()
    if args.shards_dir:  # the shards' manifest stands for the images: their palette, source and bytes
        shards = manifest["splits"]["train"]["shards"]
        flags |= {f"--{name}": getattr(args, name) for name in ("shards_dir", "streaming", "shuffle_buffer_size")}
        flags["shards"] = [manifest["palette"], manifest["source"]["fingerprint"], [s["sha256"] for s in shards]]
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

    def encode(images: list[PIL.Image.Image], batch: dict, **kwargs) -> dict:
        encoded = {"input_ids": processor(images, return_tensors="pt", **kwargs)["input_ids"]}
        if label_column:  # class ids (a ClassLabel's values are its ids), for the collator's class_labels
            encoded["label"] = [label_ids[value] if label_ids else value for value in batch[label_column]]
        return encoded

    def train_transforms(batch: dict) -> dict:
        if args.no_random_crop:
            return encode(decode(batch), batch, **center)
        seed = np.random.SeedSequence([args.seed, 1, epoch_now[0], *batch["index"]]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        crops = [random_resized_crop(image, args.random_crop_scale, generator) for image in decode(batch)]
        return encode(crops, batch)

    if not args.shards_dir:
        train_dataset = undecoded["train"].add_column("index", list(range(len(undecoded["train"]))))
        train_dataset = train_dataset.with_transform(train_transforms)
        eval_dataset = undecoded["validation"].with_transform(lambda batch: encode(decode(batch), batch, **center))
    masking = {"mask_probability": args.mask_prob} if objective == "bert" else {}
    masking |= {"class_conditional": args.class_conditional, "class_dropout": args.class_dropout}
    collator = collate = ImageGPTDataCollator(objective=objective, **masking, seed=args.seed)
    if args.shards_dir:  # ids already; map-style, or streamed: each process reads its own shards (stream_epoch)
        train_dataset = load_shards(args.shards_dir, config, processor, streaming=args.streaming)
        eval_dataset = load_shards(args.shards_dir, config, processor, split="validation")
        if args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))

        def collate(examples: list[dict]) -> dict:  # the collator's batch, with the examples' indices
            return collator(examples) | {"index": torch.as_tensor([example["index"] for example in examples])}

    # Epoch 0: fixed masks; every class given (evaluate() also measures without them).
    eval_collator = ImageGPTDataCollator(objective=objective, **masking | {"class_dropout": 0.0}, seed=args.seed)
    order = torch.Generator().manual_seed(args.seed)  # keeps the data order off the global RNG (dropout)
    loading = {"num_workers": args.dataloader_num_workers}
    train_dataloader = None  # streamed: a DataLoader per epoch (stream_epoch)
    if not args.streaming:
        sampling = {"shuffle": True, "collate_fn": collate, "generator": order}
        train_dataloader = DataLoader(train_dataset, args.per_device_train_batch_size, **sampling, **loading)
    eval_dataloader = DataLoader(eval_dataset, args.per_device_eval_batch_size, collate_fn=eval_collator, **loading)
    train_dataloader, eval_dataloader = accelerator.prepare(train_dataloader, eval_dataloader)
    batches_per_epoch = len(train_dataloader) if train_dataloader else 0
    if args.streaming:  # not prepared (that would split the stream again); as many batches on every process
        rank, world = accelerator.process_index, accelerator.num_processes
        logger.info(plan_processes(len(shards), world, args.allow_shard_reread))
        rows = sorted(shard["num_examples"] for shard in shards)  # the fewest a process can be given:
        least = sum(rows[: len(rows) // world]) if len(rows) % world == 0 else sum(rows) // world
        batches_per_epoch = least // args.per_device_train_batch_size // args.gradient_accumulation_steps
        if batches_per_epoch == 0:
            raise ValueError(f"{least} examples per process make no batch: lower --per_device_train_batch_size.")
        batches_per_epoch *= args.gradient_accumulation_steps

        def stream_epoch(epoch: int, skip: int):  # the same batches for one seed, epoch, rank and world
            stream = train_dataset.shuffle(args.seed, buffer_size=args.shuffle_buffer_size)
            stream = split_dataset_by_node(stream, rank, world)
            stream.set_epoch(epoch)
            off_global_rng = torch.Generator().manual_seed(args.seed)  # (a DataLoader draws its workers' seed)
            loader = DataLoader(
                stream, args.per_device_train_batch_size, collate_fn=collate, generator=off_global_rng, **loading
            )
            return itertools.islice(loader, skip, batches_per_epoch)

    # AdamW (no weight decay on biases and norms) and the schedule, sized by the prepared
    # (per-process) DataLoader.
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
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
    examples = sum(rows) if args.streaming else len(train_dataset)
    logger.info(f"***** Running training: {examples} examples, {num_train_epochs} epochs")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    run.resume(checkpoint, batches_per_epoch)
    completed_steps, starting_epoch = run["completed_steps"], run["epoch"]
    progress_bar = tqdm(
        total=max_train_steps, initial=completed_steps, desc="train", disable=not accelerator.is_local_main_process
    )
    running, metrics = [], {}
    clock, logged = time.perf_counter(), completed_steps
    # FLOPs per token: 6 per weight outside the embeddings (forward and backward) and the attention's 12 * L * d * T.
    flops_per_token = 6 * accelerator.unwrap_model(model).num_parameters(exclude_embeddings=True)
    flops_per_token += 12 * config.n_layer * config.n_embd * config.n_positions
    order_dir = os.path.join(args.output_dir, TRACKER_DIR, "data_order")  # --save_data_order: a line per batch
    if args.save_data_order:
        os.makedirs(order_dir, exist_ok=True)
    model.train()
    for epoch in range(starting_epoch, num_train_epochs):
        if completed_steps >= max_train_steps:
            break
        epoch_now[0] = collator.epoch = epoch  # new crops and masks every epoch, the same ones after a resume
        seen = run["seen"] if epoch == starting_epoch else 0
        if args.streaming:
            batches = stream_epoch(epoch, seen)
        else:
            train_dataloader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_dataloader, seen) if seen else train_dataloader
        for batch in batches:
            seen += 1
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            if (indices := batch.pop("index", None)) is not None and args.save_data_order:
                with open(os.path.join(order_dir, f"process_{accelerator.process_index}.txt"), "a") as file:
                    file.write(f"{epoch} {' '.join(map(str, indices.tolist()))}\n")
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
            done, end_of_epoch = completed_steps >= max_train_steps, seen >= batches_per_epoch
            logs = {}
            if completed_steps % args.logging_steps == 0 or done:
                logs = {"train_loss": accelerator.reduce(torch.stack(running).mean(), "mean").item()}
                logs |= {"lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                running, elapsed = [], time.perf_counter() - clock
                images = (completed_steps - logged) * total_batch_size  # (logged: at the last log)
                logs |= {"images_per_s": images / elapsed, "tokens_per_s": images * config.n_positions / elapsed}
                if args.peak_tflops:  # model FLOPs utilization, all processes' peak
                    peak = args.peak_tflops * 1e12 * accelerator.num_processes
                    logs["mfu"] = logs["tokens_per_s"] * flops_per_token / peak
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
                clock, logged = time.perf_counter(), completed_steps  # throughput leaves out evaluation and saving
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
    data_name = data_name or (args.shards_dir and f"the tokenized shards {args.shards_dir}")
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
        "datasets": [] if args.train_dir or args.shards_dir or digits else [args.dataset_name],
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
