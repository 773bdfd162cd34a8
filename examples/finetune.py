"""Fine-tune a pretrained Image GPT for image classification with Accelerate, on the paper's joint objective
`L = L_clf + w * L_gen` (`--gen_loss_weight w`; 0 is plain classification), in full or as a LoRA adapter (`--lora_r`).

    accelerate launch examples/finetune.py --model_name_or_path igpt-tiny-digits --output_dir igpt-tiny-digits-clf

The classifier is a linear layer on the average-pooled final features (or `--classifier_layer`). AR models read
OpenAI's `[SOS, x_1, ..., x_{n-1}]`; BERT models draw the paper's 15% masks for L_gen (`ImageGPTDataCollator`). The
paper's evaluation protocol: `--num_labels_per_class N` trains on a seeded, class-balanced subset of the labels, and
BERT models can be evaluated under `--num_eval_masks K` masks of `--eval_mask_prob`, their class probabilities
averaged. The output folder loads with `AutoModelForImageClassification` (a LoRA run's with peft's `PeftModel` on the
base model; `--merge_lora` also writes the merged model to `merged/`). Checkpoints are accelerate's (`save_state`), with
the run's position and contract (`image_gpt_hf.training.TrainingRun`); the flags and the Accelerator are in
training_run.py, which pretrain.py shares: to train on your own data, copy both files.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from image_gpt_hf import (
    LORA_TARGET_MODULES,
    ImageGPTDataCollator,
    ImageGPTForImageClassification,
    load_config_and_processor,
    lora_config,
)
from image_gpt_hf.data import random_resized_crop
from image_gpt_hf.model_card import write_model_card
from image_gpt_hf.safe_io import check_output_path, staged_dir
from image_gpt_hf.training import (
    DIGITS,
    TrainingRun,
    class_balanced_subset,
    class_labels,
    decode_images,
    load_image_dataset,
)
from training_run import RUN_FLAGS, check_finite, make_accelerator, training_parser

logger = get_logger(__name__)
TRACKER_DIR = "image_gpt_finetune"
KEEP = ["checkpoints", TRACKER_DIR, ".lock"]  # this run's own entries in --output_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = training_parser("Fine-tune Image GPT for image classification.", learning_rate=3e-4, epochs=3)
    add = parser.add_argument
    add("--model_name_or_path", required=True, help="A pretrained Image GPT (folder or Hub id).")
    add("--gen_loss_weight", type=float, default=1.0, help="w in L_clf + w * L_gen.")
    add("--classifier_layer", type=int, default=None, help="The hidden state pooled (default: the final one).")
    add("--mask_prob", type=float, default=None, help="BERT models with w > 0: pixels masked for L_gen (0.15).")
    add("--ignore_mismatched_sizes", action="store_true", help="Replace a classifier of another size.")
    add("--num_labels_per_class", type=int, default=None, help="Train on N labelled images per class.")
    add("--num_eval_masks", type=int, default=1, help="BERT models: average the classes over K masks.")
    add("--eval_mask_prob", type=float, default=0.0, help="BERT models: pixels masked in each evaluation view.")
    add("--lora_r", type=int, default=None, help="Train a LoRA adapter of this rank (needs peft).")
    add("--lora_alpha", type=float, default=None, help="Default: 2 * r.")
    add("--lora_dropout", type=float, default=None, help="Default: 0.")
    add("--lora_target_modules", nargs="+", default=None, help="Default: image_gpt_hf.LORA_TARGET_MODULES.")
    add("--merge_lora", action="store_true", help="Also write the model with the adapter merged to output_dir/merged.")
    add("--label_column_name", default=None, help="Default: the first `ClassLabel`, or label(s).")
    add("--processor_name_or_path", default=None, help="A processor with the model's palette ('clusters').")
    args = parser.parse_args(argv)

    # The errors argparse cannot see, before anything is loaded.
    if args.num_eval_masks > 1 and args.eval_mask_prob == 0:
        raise ValueError(
            f"--num_eval_masks {args.num_eval_masks} needs --eval_mask_prob > 0 (the paper's is 0.15): without masks "
            "every view is the same image."
        )
    lora_flags = [
        f"--{k}" for k in ("lora_alpha", "lora_dropout", "lora_target_modules") if getattr(args, k) is not None
    ]
    if args.lora_r is None and (lora_flags := lora_flags + ["--merge_lora"] * args.merge_lora):
        raise ValueError(f"{' '.join(lora_flags)} needs --lora_r (the rank of a LoRA adapter).")
    if args.lora_r is not None:
        args.lora_alpha = args.lora_alpha or 2.0 * args.lora_r
        args.lora_dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
        args.lora_target_modules = sorted(set(args.lora_target_modules or LORA_TARGET_MODULES))
    return args


def evaluate(accelerator, model, dataloader: DataLoader, masker: ImageGPTDataCollator | None, views: int) -> dict:
    """Top-1 accuracy and the classification loss on the evaluation split: of whole images, or for BERT models of the
    images under a seeded random mask (`masker`, --eval_mask_prob); with K > 1 `views`, also of the class
    probabilities averaged over K masks (`eval_ensemble_accuracy`, `eval_ensemble_loss`)."""
    model.eval()
    found = {}  # "eval" (the first view) / "eval_ensemble" -> (correct, losses) of every batch

    def record(name: str, probabilities: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        predictions, references, loss = accelerator.gather_for_metrics((probabilities.argmax(-1), labels, loss))
        correct, losses = found.setdefault(name, ([], []))
        correct.append(predictions == references)
        losses.append(loss)

    with torch.no_grad(), torch.random.fork_rng():  # evaluation draws nothing from training's random stream
        for batch in tqdm(dataloader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
            ids, labels, probabilities = batch["input_ids"], batch["labels"], 0.0
            for view in range(views):
                kwargs = {} if masker is None else {"bool_masked_pos": masker.masks(ids, epoch=view).to(ids.device)}
                logits = model(input_ids=ids, **kwargs).logits.float()
                if view == 0:
                    record("eval", logits, labels, F.cross_entropy(logits, labels, reduction="none"))
                probabilities = probabilities + logits.softmax(-1) / views
            if views > 1:
                loss = -probabilities.gather(1, labels[:, None])[:, 0].clamp_min(1e-12).log()
                record("eval_ensemble", probabilities, labels, loss)
    model.train()
    return {
        key: value
        for name, (correct, losses) in found.items()
        for key, value in (
            (f"{name}_accuracy", torch.cat(correct).float().mean().item()),
            (f"{name}_loss", torch.cat(losses).mean().item()),
        )
    }


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)

    # The Accelerator (`accelerate launch`, or plain python), with transformers' example logging.
    accelerator = make_accelerator(args)
    set_seed(args.seed)

    # The output folder (refused before any work when it holds anything but this run's own entries) and the checkpoint.
    inputs = [args.model_name_or_path, args.processor_name_or_path, args.train_dir, args.validation_dir]
    inputs += [args.dataset_name]
    checkpoint = TrainingRun.find_checkpoint(args.resume_from_checkpoint, args.output_dir, inputs)
    check_output_path(args.output_dir, inputs=inputs, overwrite=args.overwrite, keep=KEEP if checkpoint else [".lock"])

    # The pretrained model's config and processor (its palette defines the model's token ids).
    config, processor = load_config_and_processor(args.model_name_or_path, args.processor_name_or_path)
    if args.eval_mask_prob > 0 and config.objective != "bert":
        raise ValueError(
            f"--eval_mask_prob {args.eval_mask_prob} masks pixels for BERT models, but {args.model_name_or_path} is "
            f"an {config.objective.upper()} model, trained on whole images; leave --eval_mask_prob at 0."
        )
    if args.mask_prob is not None and (config.objective != "bert" or args.gen_loss_weight == 0):
        why = (
            "trained with --gen_loss_weight 0"
            if config.objective == "bert"
            else f"an {config.objective.upper()} model"
        )
        raise ValueError(
            f"--mask_prob {args.mask_prob} masks pixels for a BERT model's generative loss, but this run is {why}: "
            "it has no effect; leave --mask_prob out."
        )
    if config.objective == "bert" and args.gen_loss_weight > 0 and args.mask_prob is None:
        args.mask_prob = 0.15
    n_px = config.n_px
    processor.size, processor.do_center_crop = {"height": n_px, "width": n_px}, False
    if args.lora_r is not None:  # target modules checked before the data are read
        with torch.device("meta"):
            classifier = ImageGPTForImageClassification(config)
        lora = lora_config(classifier, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)

    # Data: "train" and "validation" splits, the image column and the labels.
    with accelerator.main_process_first():
        names = inspect.signature(load_image_dataset).parameters  # the data flags, by name
        dataset, eval_split, image_column = load_image_dataset(**{k: v for k, v in vars(args).items() if k in names})

    def decode(batch: dict) -> list[PIL.Image.Image]:
        return decode_images(batch[image_column])

    label_column, labels, label_ids = class_labels(dataset, args.label_column_name)
    if args.num_labels_per_class is not None:  # the paper's low-data subsets: N seeded images of every class
        raw = dataset["train"][label_column]
        ids = np.asarray([label_ids[x] for x in raw] if label_ids else raw, dtype=np.int64)
        dataset["train"] = dataset["train"].select(
            class_balanced_subset(ids, labels, args.num_labels_per_class, args.seed)
        )
        logger.info(f"Training on {args.num_labels_per_class} labelled images per class (seed {args.seed})")

    # The classifier's config: the pretrained decoder (+ its LM head for the generative loss) and a new linear layer.
    config.num_labels, config.id2label = len(labels), dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.gen_loss_weight, config.classifier_layer = args.gen_loss_weight, args.classifier_layer
    config.prepend_sos = config.objective == "ar"
    config.validate_architecture()

    # The run contract (a resume must match it; a LoRA run's base weights too), carried by every checkpoint with the
    # position; one writer per output folder.
    flags = RUN_FLAGS + ["num_labels_per_class", "mask_prob", "lora_r", "lora_alpha", "lora_dropout"]
    flags = {f"--{name}": getattr(args, name) for name in flags + ["lora_target_modules"]}
    flags |= {"image_column": image_column, "label_column": label_column}
    fingerprint = bool(checkpoint or args.checkpointing_steps)
    if args.lora_r is not None and fingerprint:  # the base: the adapter's other half
        files = sorted(p for p in Path(args.model_name_or_path).glob("*") if p.suffix in (".safetensors", ".bin"))
        digests = [hashlib.file_digest(open(p, "rb"), "sha256").hexdigest() for p in files]  # noqa: SIM115
        flags["base weights (fingerprint)"] = hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]
    data = (dataset["train"], [image_column, label_column])
    run = TrainingRun(accelerator, "finetune.py", config, processor, flags, data, fingerprint, palette=None)
    _lock = run.start(args.output_dir, checkpoint, args.overwrite, clear=(TRACKER_DIR,))  # held while main() runs

    # The model: the pretrained weights and a new classification layer; with --lora_r, LoRA on the decoder's
    # projections (image_gpt_hf.lora), the new classifier trained in full.
    pretrained = {"config": config, "ignore_mismatched_sizes": args.ignore_mismatched_sizes}
    model, info = ImageGPTForImageClassification.from_pretrained(
        args.model_name_or_path, **pretrained, output_loading_info=True
    )
    if missing := [key for key in info["missing_keys"] if key.startswith("transformer.")]:
        raise ValueError(
            f"{args.model_name_or_path} lacks pretrained decoder weights ({', '.join(missing[:5])}, ...); fine-tuning "
            "would start from random weights."
        )
    logger.info(f"Newly initialised: {sorted(info['missing_keys']) or 'nothing'}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_r is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(f"LoRA r={args.lora_r}: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})")
    logger.info(f"Model: {config.n_layer} x {config.n_embd} ({config.objective}), {len(labels)} labels, {n_px}px")

    # Transforms: random crops for training (one generator per batch, seeded by the seed, the epoch and the examples'
    # indices: a resumed run draws the same crops), the center for evaluation. BERT masks come from the collator; the
    # classifier is evaluated unmasked, or under masks seeded by each image, the view and --seed (--eval_mask_prob).
    epoch_now = [0]
    center = {"size": {"shortest_edge": n_px}, "do_center_crop": True, "crop_size": {"height": n_px, "width": n_px}}

    def encode(batch: dict, images: list[PIL.Image.Image], **kwargs) -> dict:
        labels = [label_ids[x] for x in batch[label_column]] if label_ids else batch[label_column]
        return {"input_ids": processor(images, return_tensors="pt", **kwargs)["input_ids"], "label": labels}

    def train_transforms(batch: dict) -> dict:
        if args.no_random_crop:
            return encode(batch, decode(batch), **center)
        seed = np.random.SeedSequence([args.seed, 1, epoch_now[0], *batch["index"]]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        crops = [random_resized_crop(image, args.random_crop_scale, generator) for image in decode(batch)]
        return encode(batch, crops)

    columns = [image_column, label_column]
    undecoded = {
        k: v.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
        for k, v in dataset.items()
    }
    train_dataset = undecoded["train"].add_column("index", list(range(len(undecoded["train"]))))
    train_dataset = train_dataset.with_transform(train_transforms)
    eval_dataset = undecoded["validation"].with_transform(lambda batch: encode(batch, decode(batch), **center))
    bert_gen = config.objective == "bert" and args.gen_loss_weight > 0  # BERT's generative loss needs masked pixels
    masking = {"objective": "bert", "mask_probability": args.mask_prob} if bert_gen else {"objective": None}
    collator = ImageGPTDataCollator(**masking, label_column="label", seed=args.seed)
    eval_masking = {"objective": "bert", "mask_probability": args.eval_mask_prob, "seed": args.seed}
    masker = ImageGPTDataCollator(**eval_masking) if args.eval_mask_prob else None
    order = torch.Generator().manual_seed(args.seed)  # keeps the data order off the global RNG (dropout)
    loading = {"num_workers": args.dataloader_num_workers}
    train_dataloader = DataLoader(
        train_dataset, args.per_device_train_batch_size, shuffle=True, collate_fn=collator, generator=order, **loading
    )
    eval_collator = ImageGPTDataCollator(objective=None, label_column="label")
    eval_dataloader = DataLoader(eval_dataset, args.per_device_eval_batch_size, collate_fn=eval_collator, **loading)
    train_dataloader, eval_dataloader = accelerator.prepare(train_dataloader, eval_dataloader)

    # AdamW on the trainable parameters (no weight decay on biases and norms) and the schedule, sized by the prepared
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
    running, right, metrics = [], [], {}
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
                outputs = model(**batch)  # L_clf + w * L_gen
                check_finite(accelerator, args, outputs.loss, completed_steps + 1)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            running.append(outputs.loss.detach().float())
            right.append((outputs.logits.argmax(-1) == batch["labels"]).float().mean())
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress_bar.update(1)
            done, end_of_epoch = completed_steps >= max_train_steps, seen >= len(train_dataloader)
            logs = {}
            if completed_steps % args.logging_steps == 0 or done:
                logs = {"train_loss": accelerator.reduce(torch.stack(running).mean(), "mean").item()}
                logs["train_accuracy"] = accelerator.reduce(torch.stack(right).mean(), "mean").item()
                logs |= {"lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                running, right = [], []
                progress_bar.set_postfix(train_loss=f"{logs['train_loss']:.4f}")
            every = args.checkpointing_steps
            if (end_of_epoch or done) if every == "epoch" else every and completed_steps % int(every) == 0:
                run.save(completed_steps=completed_steps, epoch=epoch, seen=seen)
            if (completed_steps % args.eval_steps == 0 or done) if args.eval_steps else (end_of_epoch or done):
                logs |= (metrics := evaluate(accelerator, model, eval_dataloader, masker, args.num_eval_masks))
            if logs:
                logger.info(f"step {completed_steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))
                if args.with_tracking:
                    accelerator.log(logs, step=completed_steps)
            if done:
                break
    # (A run resumed from its last step has evaluated nothing yet.)
    metrics = metrics or evaluate(accelerator, model, eval_dataloader, masker, args.num_eval_masks)
    progress_bar.close()
    if args.with_tracking:
        accelerator.end_training()

    # The model folder (weights or adapter + config, processor, card, all_results.json), staged and renamed into
    # --output_dir beside its checkpoints.
    digits, data_name = args.dataset_name == DIGITS and args.train_dir is None, f"the imagefolder {args.train_dir}"
    data_name = data_name if args.train_dir else "scikit-learn handwritten digits" if digits else args.dataset_name
    subset = f", {args.num_labels_per_class} labelled images per class" if args.num_labels_per_class else ""
    dataset_id = "imagefolder" if args.train_dir else args.dataset_name
    accuracy = {"dataset": dataset_id, "metric": "accuracy", "name": "top-1 accuracy (fine-tuned)"}
    accuracy["value"] = round(metrics.get("eval_ensemble_accuracy", metrics["eval_accuracy"]), 4)
    if args.eval_mask_prob > 0:  # the card reports the evaluation as it ran: masked, ensembled over K masks
        views = f"{args.num_eval_masks}-mask ensemble" if args.num_eval_masks > 1 else "one mask"
        accuracy["name"] = f"top-1 accuracy (fine-tuned; {views}, {args.eval_mask_prob:g} of the pixels masked)"
    lora = args.lora_r and f", as a LoRA adapter (r={args.lora_r}, alpha {args.lora_alpha:g}, on "
    lora = lora and lora + f"{', '.join(args.lora_target_modules)}; {trainable:,} parameters trained)" or ""
    facts = {
        "training": f"Fine-tuned from {args.model_name_or_path} with examples/finetune.py on L_clf + "
        f"{args.gen_loss_weight:g} L_gen, {max_train_steps} steps{subset} on {data_name} in batches of "
        f"{total_batch_size} images, AdamW at peak learning rate {args.learning_rate:g} "
        f"({args.lr_scheduler_type.value} schedule), seed {args.seed}{lora}.",
        "datasets": [] if args.train_dir or digits else [args.dataset_name],
        "results": [{"task": "image-classification", "dataset_name": data_name, "split": eval_split, **accuracy}],
    }
    if not os.path.isdir(args.model_name_or_path):
        facts["base_model"] = args.model_name_or_path
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every process: gathers sharded (FSDP) weights
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with staged_dir(args.output_dir, overwrite=args.overwrite, keep=KEEP, inputs=inputs) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)  # LoRA: adapter_config.json, adapter_model.*
            processor.save_pretrained(tmp)
            if args.lora_r is None:
                write_model_card(tmp, unwrapped, processor=processor, facts=facts)
            else:  # the classifier's config (labels) beside the adapter, which loads on the base with peft
                config.save_pretrained(tmp)
                note = (  # transformers' Auto classes cannot load it: they find a config.json and look for weights
                    f"A LoRA adapter on {args.model_name_or_path}: `base = AutoModelForImageClassification.from_pretrained("
                    f"{args.model_name_or_path!r}, config=AutoConfig.from_pretrained(this_folder))`, then peft's "
                    "`PeftModel.from_pretrained(base, this_folder)` (--merge_lora writes the merged model to merged/)."
                )
                card = {"processor": processor, "facts": {**facts, "notes": [note]}, "overwrite": True}  # over peft's
                write_model_card(tmp, unwrapped.get_base_model(), **card)
            if args.merge_lora:  # the saved adapter on a fresh base, merged: a plain checkpoint
                from peft import PeftModel

                base = ImageGPTForImageClassification.from_pretrained(args.model_name_or_path, **pretrained)
                merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
                merged.save_pretrained(tmp / "merged")
                processor.save_pretrained(tmp / "merged")
                write_model_card(tmp / "merged", merged, processor=processor, facts=facts)
            (tmp / "all_results.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"Saved the model to {args.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
