"""Fine-tune a pretrained Image GPT for image classification with Accelerate, on the paper's joint objective
`L = L_clf + w * L_gen` (`--gen_loss_weight w`; 0 is plain classification).

    accelerate launch examples/finetune.py --model_name_or_path igpt-tiny-digits --output_dir igpt-tiny-digits-clf

The classifier is a linear layer on the average-pooled final features (or `--classifier_layer`). AR models see
OpenAI's `[SOS, x_1, ..., x_{n-1}]` input and their generative loss covers all n pixels; BERT models draw the paper's
15% masks for their generative loss. Labels and their names come from the dataset; accuracy is measured on its
evaluation split. The output folder loads with `AutoModelForImageClassification` and `AutoImageProcessor`.
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
    common.add_data_arguments(parser)
    common.add_processor_arguments(parser)
    common.add_training_arguments(parser, learning_rate=3e-4, num_train_epochs=3)
    args = parser.parse_args(argv)
    common.check_training_arguments(args)
    if args.gen_loss_weight < 0:
        raise ValueError(f"--gen_loss_weight must be >= 0, got {args.gen_loss_weight}.")
    if not 0.0 < args.mask_prob < 1.0:
        raise ValueError(f"--mask_prob must be in (0, 1), got {args.mask_prob}.")
    return args


def evaluate(accelerator: Accelerator, model: torch.nn.Module, eval_dataloader: DataLoader) -> dict[str, float]:
    """Top-1 accuracy and the classification loss on the evaluation split (unmasked images)."""
    model.eval()
    correct, losses = [], []
    for batch in common.progress_bar(accelerator, iterable=eval_dataloader, desc="eval", leave=False):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        predictions, references, loss = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"], loss))
        correct.append(predictions == references)
        losses.append(loss)
    model.train()
    return {"eval_accuracy": torch.cat(correct).float().mean().item(), "eval_loss": torch.cat(losses).mean().item()}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    accelerator = common.create_accelerator(args)
    set_seed(args.seed)
    common.check_output_dir(accelerator, args, SCRIPT)
    checkpoint = common.find_checkpoint(args, accelerator, SCRIPT)

    # Checkpoint, data, labels and processor first: every bad input fails here, before a model is built.
    config = common.load_imagegpt_config(args.model_name_or_path)
    with accelerator.main_process_first():
        dataset, eval_split = common.load_image_dataset(args)
    image_column = common.find_image_column(dataset, args.image_column_name)
    label_column = common.find_label_column(dataset, args.label_column_name, required=True)
    labels, label_map = common.label_names(dataset, label_column)
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

    # DataLoaders with labels. BERT's generative loss needs masked pixels; the classifier is evaluated unmasked.
    mask_prob = args.mask_prob if config.objective == "bert" and args.gen_loss_weight > 0 else None
    crop_scale = None if args.no_random_crop else tuple(args.random_crop_scale)
    columns = (image_column, label_column, label_map)
    train_collator = common.ImageGPTCollator(
        processor, *columns, train=True, random_crop_scale=crop_scale, mask_prob=mask_prob, seed=args.seed
    )
    eval_collator = common.ImageGPTCollator(processor, *columns, train=False, seed=args.seed)
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
            metrics = evaluate(accelerator, model, eval_dataloader)
            progress.log(metrics)
    metrics = metrics or evaluate(accelerator, model, eval_dataloader)  # resumed from the last step
    progress.close()

    loss = f"L_clf + {args.gen_loss_weight:g} L_gen"
    trained = f"Fine-tuned from {args.model_name_or_path} with examples/finetune.py on {loss}, {max_train_steps} steps"
    accuracy = {"metric": "accuracy", "name": "top-1 accuracy (fine-tuned)", "value": metrics["eval_accuracy"]}
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
