"""Fine-tune a pretrained Image GPT for image classification with Accelerate, on the paper's joint objective
`L = L_clf + w * L_gen` (`--gen_loss_weight w`; 0 is plain classification).

    accelerate launch examples/finetune.py --model_name_or_path igpt-tiny-digits --output_dir igpt-tiny-digits-clf

The classifier is a linear layer on the average-pooled final features (or `--classifier_layer`). AR models see
OpenAI's `[SOS, x_1, ..., x_{n-1}]` input and their generative loss covers all n pixels; BERT models draw the paper's
15% masks for their generative loss. Labels and their names come from the dataset; accuracy is measured on its
evaluation split. The output folder loads with `AutoModelForImageClassification` and `AutoImageProcessor`.

The paper's evaluation protocol: `--num_labels_per_class N` fine-tunes on a fixed, seeded, class-balanced subset of
the labels (its low-data table), and BERT models can be evaluated under `--num_eval_masks K` random masks of
`--eval_mask_prob` (0.15 in the paper), their class probabilities averaged; both the single-mask and the K-mask
accuracy are reported.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import common
from common import logger
from image_gpt_hf import ImageGPTForImageClassification

SCRIPT = "finetune.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune Image GPT for image classification with Accelerate.")
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_name_or_path",
        type=str,
        required=True,
        help="A pretrained Image GPT checkpoint (folder or Hub id), e.g. the output of examples/pretrain.py.",
    )
    group.add_argument(
        "--gen_loss_weight",
        type=float,
        default=1.0,
        help="Weight of the generative loss in L_clf + w * L_gen (the paper's fine-tuning uses 1; 0 for plain "
        "classification).",
    )
    group.add_argument(
        "--classifier_layer",
        type=int,
        default=None,
        help="The hidden-state index the classifier pools (0 = embeddings, n_layer = final; default: final).",
    )
    group.add_argument(
        "--mask_prob", type=float, default=0.15, help="BERT models: probability that a pixel is masked."
    )
    group.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Start from a classifier with another number of labels, replacing its classification layer.",
    )
    common.add_evaluation_arguments(parser)
    common.add_data_arguments(parser)
    common.add_processor_arguments(parser)
    common.add_training_arguments(parser, learning_rate=3e-4, num_train_epochs=3)
    args = parser.parse_args(argv)
    common.check_training_arguments(args)
    common.check_evaluation_arguments(args)
    if args.gen_loss_weight < 0:
        raise ValueError(f"--gen_loss_weight must be >= 0, got {args.gen_loss_weight}.")
    if not 0.0 < args.mask_prob < 1.0:
        raise ValueError(f"--mask_prob must be in (0, 1), got {args.mask_prob}.")
    return args


def evaluate(
    accelerator: Accelerator, model: torch.nn.Module, eval_dataloader: DataLoader, args: argparse.Namespace
) -> dict[str, float]:
    """Top-1 accuracy and the classification loss on the evaluation split: of whole images, or for BERT models of
    the images under a seeded random mask (--eval_mask_prob); with --num_eval_masks K > 1, also of the class
    probabilities averaged over K masks (`eval_ensemble_accuracy`, `eval_ensemble_loss`)."""
    model.eval()
    correct, losses, ensemble_correct, ensemble_losses = [], [], [], []
    for batch in common.progress_bar(accelerator, iterable=eval_dataloader, desc="eval", leave=False):
        ids, labels, probabilities = batch["input_ids"], batch["labels"], 0.0
        for view in range(args.num_eval_masks):
            kwargs = {}
            if args.eval_mask_prob > 0:  # the view-th mask of every image, seeded by its index
                masks = common.evaluation_masks(batch["indices"], ids.shape[1], args.eval_mask_prob, args.seed, view)
                kwargs["bool_masked_pos"] = masks.to(ids.device)
            with torch.no_grad():
                logits = model(input_ids=ids, **kwargs).logits
            if view == 0:
                loss = F.cross_entropy(logits.float(), labels, reduction="none")
                predictions, references, loss = accelerator.gather_for_metrics((logits.argmax(dim=-1), labels, loss))
                correct.append(predictions == references)
                losses.append(loss)
            probabilities = probabilities + logits.float().softmax(-1) / args.num_eval_masks
        if args.num_eval_masks > 1:
            loss = -probabilities.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()
            predictions, references, loss = accelerator.gather_for_metrics((probabilities.argmax(-1), labels, loss))
            ensemble_correct.append(predictions == references)
            ensemble_losses.append(loss)
    model.train()
    metrics = {"eval_accuracy": torch.cat(correct).float().mean().item(), "eval_loss": torch.cat(losses).mean().item()}
    if ensemble_correct:
        metrics["eval_ensemble_accuracy"] = torch.cat(ensemble_correct).float().mean().item()
        metrics["eval_ensemble_loss"] = torch.cat(ensemble_losses).mean().item()
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    accelerator = common.create_accelerator(args)
    set_seed(args.seed)
    common.check_output_dir(accelerator, args, SCRIPT)
    checkpoint = common.find_checkpoint(args, accelerator, SCRIPT)

    # Checkpoint, data, labels and processor first: every bad input fails here, before a model is built.
    config = common.load_imagegpt_config(args.model_name_or_path)
    common.check_eval_masks(args, config)
    with accelerator.main_process_first():
        dataset, eval_split = common.load_image_dataset(args)
    image_column = common.find_image_column(dataset, args.image_column_name)
    label_column = common.find_label_column(dataset, args.label_column_name, required=True)
    labels, label_map = common.label_names(dataset, label_column)
    if args.num_labels_per_class is not None:
        dataset["train"] = common.class_balanced_subset(
            dataset["train"], label_column, labels, label_map, args.num_labels_per_class, args.seed
        )
        logger.info(f"Training on {args.num_labels_per_class} labelled images per class (seed {args.seed})")
    processor = common.checkpoint_processor(args.model_name_or_path, config, args.processor_name_or_path, args.n_px)

    # The classifier: the pretrained decoder (+ its LM head for the generative loss) and a new linear layer.
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.gen_loss_weight = args.gen_loss_weight
    config.classifier_layer = args.classifier_layer
    config.prepend_sos = config.objective == "ar"
    config.validate_architecture()
    model, loading_info = ImageGPTForImageClassification.from_pretrained(
        args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        output_loading_info=True,
    )
    missing_backbone = [key for key in loading_info["missing_keys"] if key.startswith("transformer.")]
    if missing_backbone:
        raise ValueError(
            f"{args.model_name_or_path} lacks pretrained decoder weights ({', '.join(missing_backbone[:5])}, ...); "
            "fine-tuning would start from random weights."
        )
    logger.info(f"Newly initialised: {sorted(loading_info['missing_keys']) or 'nothing'}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger.info(
        f"Model: {config.n_layer} layers x {config.n_embd} wide ({config.objective}), {len(labels)} labels, "
        f"loss L_clf + {args.gen_loss_weight:g} L_gen, {common.processor_n_px(processor)}px"
    )

    # DataLoaders with labels. BERT's generative loss needs masked pixels; the classifier is evaluated unmasked, or
    # under evaluation masks seeded by the images' indices (--eval_mask_prob).
    mask_prob = args.mask_prob if config.objective == "bert" and args.gen_loss_weight > 0 else None
    crop_scale = None if args.no_random_crop else tuple(args.random_crop_scale)
    columns = (image_column, label_column, label_map)
    train_collator = common.ImageGPTCollator(
        processor, *columns, train=True, random_crop_scale=crop_scale, mask_prob=mask_prob, seed=args.seed
    )
    eval_collator = common.ImageGPTCollator(
        processor, *columns, train=False, seed=args.seed, indices=args.eval_mask_prob > 0
    )
    train_dataloader = accelerator.prepare(common.dataloader(dataset["train"], train_collator, args, train=True))
    eval_dataloader = accelerator.prepare(common.dataloader(dataset["validation"], eval_collator, args, train=False))

    # Optimizer and schedule, sized by the prepared (per-process) DataLoader.
    optimizer, lr_scheduler, max_train_steps = common.optimizer_and_scheduler(
        args, accelerator, model, train_dataloader
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    # Training on the joint loss, from the checkpoint when resuming; the log follows the training batches' accuracy.
    progress = common.TrainingProgress(accelerator, args, SCRIPT, train_dataloader, max_train_steps, checkpoint)
    metrics = {}
    model.train()
    for batch in progress.batches(train_collator):
        with accelerator.accumulate(model):
            outputs = model(**batch)  # L_clf + w * L_gen
            accelerator.backward(outputs.loss)
            common.optimizer_step(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm)
        accuracy = (outputs.logits.argmax(dim=-1) == batch["labels"]).float().mean()
        if progress.step(lr_scheduler, train_loss=outputs.loss, train_accuracy=accuracy):  # an evaluation is due
            metrics = evaluate(accelerator, model, eval_dataloader, args)
            progress.log(metrics)
    metrics = metrics or evaluate(accelerator, model, eval_dataloader, args)  # resumed from the last step
    progress.close()

    loss = f"L_clf + {args.gen_loss_weight:g} L_gen"
    subset = f", {args.num_labels_per_class} labelled images per class" if args.num_labels_per_class else ""
    trained = f"Fine-tuned from {args.model_name_or_path} with examples/finetune.py on {loss}, {max_train_steps} steps"
    trained += subset
    accuracy = {"metric": "accuracy", "name": "top-1 accuracy (fine-tuned)", "value": metrics["eval_accuracy"]}
    if args.eval_mask_prob > 0:  # the model card reports the evaluation as it ran: masked, ensembled over K masks
        views = f"{args.num_eval_masks}-mask ensemble" if args.num_eval_masks > 1 else "one mask"
        accuracy["name"] = f"top-1 accuracy (fine-tuned; {views}, {args.eval_mask_prob:g} of the pixels masked)"
        accuracy["value"] = metrics.get("eval_ensemble_accuracy", metrics["eval_accuracy"])
    common.save_model(
        accelerator,
        model,
        processor,
        args,
        SCRIPT,
        trained=trained,
        split=eval_split,
        result=accuracy,
        results=metrics,
    )
    return metrics


if __name__ == "__main__":
    main()
