"""Linear probes of Image GPT features, layer by layer, as in the paper: how linearly separable are the classes in
the average-pooled features `n^l` of each layer `l`?

    accelerate launch examples/linear_probe.py --model_name_or_path igpt-tiny-digits --output_dir probe-digits

One forward pass per batch gives the features of every layer (`ImageGPTModel.extract_features`). Each layer gets a
logistic-regression probe (scikit-learn, features standardized, L2 strength chosen on a held-out part of the
training split), fitted on the training split and scored on the evaluation split. Two baselines run the same way: a
randomly initialised model of the same config (what the architecture alone gives) and the raw pixels. Writes
probe_results.json, probe_results.md and probe_accuracy.png to --output_dir.

The rest of the paper's protocol: probes on several layers' features side by side (`--concat_layers`,
`--concat_window`), BERT models evaluated under K random masks (`--num_eval_masks`, `--eval_mask_prob`: one probe,
its class probabilities averaged over the masks), fixed low-data label subsets (`--num_labels_per_class`), and
datasets beyond memory: `--feature_dir` streams the features to disk as batches arrive (one shard per process,
resumable after a kill) and `--probe torch` fits the probe from there a chunk at a time (examples/probe_data.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

import common
import probe_data
from common import logger
from image_gpt_hf import ImageGPTModel
from image_gpt_hf.safe_io import atomic_file, check_output_path, clean_stale_staging

matplotlib.use("Agg")  # files only, no display

SETS = ("pretrained", "random_init", "raw_pixels")  # the feature sets, as a --feature_dir names them


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Linear probes on every layer of an Image GPT model.")
    parser.add_argument(
        "--model_name_or_path", type=str, required=True, help="An Image GPT checkpoint (folder or Hub id)."
    )
    common.add_output_arguments(parser, what="the results")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="Hidden-state indices to probe (0 = embeddings, n_layer = final output). Default: all.",
    )
    parser.add_argument(
        "--concat_layers",
        type=int,
        nargs="+",
        default=None,
        help="Also probe these layers' features side by side (concatenated), e.g. 2 3 4.",
    )
    parser.add_argument(
        "--concat_window",
        type=int,
        default=None,
        help="Also probe W neighbouring probed layers concatenated, centered at the best single layer (the paper: "
        "11 layers for iGPT-L, 5 for iGPT-XL).",
    )
    parser.add_argument(
        "--probe_c",
        type=float,
        nargs="+",
        default=[0.01, 0.1, 1.0],
        help="Inverse L2 strengths to choose from on the held-out part of the training split (one value: no search).",
    )
    parser.add_argument(
        "--probe_holdout", type=float, default=0.2, help="Fraction of the training split used to choose --probe_c."
    )
    parser.add_argument("--probe_max_iter", type=int, default=2000, help="lbfgs iterations per probe.")
    parser.add_argument("--no_baselines", action="store_true", help="Skip the random-init and raw-pixel probes.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=128, help="Feature extraction batch size.")
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="Seeds the random-init baseline, the held-out split, label subsets, masks.",
    )
    group = parser.add_argument_group("features beyond memory")
    group.add_argument(
        "--feature_dir",
        default=None,
        help="Write the features here as batches arrive (one shard per process) instead of holding them in memory; "
        "a run killed midway resumes where it stopped, and a run of the same settings reuses them.",
    )
    group.add_argument(
        "--probe",
        choices=["sklearn", "torch"],
        default="sklearn",
        help="sklearn (default): scikit-learn's LogisticRegression on features loaded into memory, one probe at a "
        "time. torch: the same model and objective fitted with L-BFGS in torch, reading --probe_chunk_size rows at a "
        "time, on the GPU when there is one.",
    )
    group.add_argument("--probe_chunk_size", type=int, default=4096, help="Rows per chunk of --probe torch.")
    common.add_evaluation_arguments(parser)
    common.add_data_arguments(parser)
    common.add_processor_arguments(parser, augment=False)
    args = parser.parse_args(argv)
    common.check_data_arguments(args)
    common.check_evaluation_arguments(args)
    for name in ("per_device_eval_batch_size", "probe_max_iter", "probe_chunk_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if not 0.0 < args.probe_holdout < 1.0:
        raise ValueError(f"--probe_holdout must be in (0, 1), got {args.probe_holdout}.")
    if any(c <= 0 for c in args.probe_c):
        raise ValueError(f"--probe_c values must be positive, got {args.probe_c}.")
    if args.concat_layers is not None and (len(set(args.concat_layers)) < 2):
        raise ValueError(f"--concat_layers needs at least 2 different layers, got {args.concat_layers}.")
    if args.concat_window is not None and args.concat_window < 2:
        raise ValueError(f"--concat_window must be at least 2 layers, got {args.concat_window}.")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Features: in memory (gathered from every process) or streamed to --feature_dir (a shard per process)
# ---------------------------------------------------------------------------------------------------------------------


def batch_features(
    model: ImageGPTModel, batch: dict[str, torch.Tensor], layers: list[int], mask: tuple[float, int, int] | None
) -> torch.Tensor:
    """`(len(layers), B, d)`: the pooled `n^l` of a batch, under the evaluation mask `(mask_prob, seed, view)`."""
    kwargs: dict[str, Any] = {"prepend_sos": True} if model.config.objective == "ar" else {}
    if mask is not None:  # BERT mask ensembles: the view-th mask of every image, seeded by its index
        ids = batch["input_ids"]
        kwargs["bool_masked_pos"] = common.evaluation_masks(batch["indices"], ids.shape[1], *mask).to(ids.device)
    return model.extract_features(batch["input_ids"], layers=layers, **kwargs)


@torch.no_grad()
def model_features(
    accelerator: Accelerator,
    model: ImageGPTModel,
    dataloader: DataLoader,
    layers: list[int],
    desc: str,
    mask: tuple[float, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled `n^l` features of `layers` for every image: `(num_layers, N, d)`, and the labels `(N,)`.

    AR models read OpenAI's [SOS, x_1, ..., x_{n-1}], the input they were trained on; BERT models read the image
    under `mask` (`(mask_prob, seed, view)`; the collator must return `indices`), or whole without one."""
    features, labels = [], []
    for batch in common.progress_bar(accelerator, iterable=dataloader, desc=desc, leave=False):
        pooled = batch_features(model, batch, layers, mask)  # (L, B, d)
        pooled, batch_labels = accelerator.gather_for_metrics((pooled.transpose(0, 1).contiguous(), batch["labels"]))
        features.append(pooled.float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(features).transpose(0, 1).numpy(), torch.cat(labels).numpy()


def pixel_features(accelerator: Accelerator, dataloader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """The raw-pixel baseline: every image's normalized RGB values at n_px x n_px, flattened."""
    features, labels = [], []
    for batch in common.progress_bar(accelerator, iterable=dataloader, desc="raw pixels", leave=False):
        pixels, batch_labels = accelerator.gather_for_metrics((batch["pixel_values"].flatten(1), batch["labels"]))
        features.append(pixels.cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def store_settings(
    args: argparse.Namespace,
    processor: Any,
    labels: dict[str, np.ndarray],
    models: dict[str, ImageGPTModel],
    layers: list[int],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """What a --feature_dir's features depend on: the data (and the palette and masks that turn it into inputs), and
    per feature set the model's weights and the layers. A store of other settings is never reused."""
    data_args = ["dataset_name", "dataset_config_name", "train_dir", "validation_dir", "image_column_name"]
    data_args += ["label_column_name", "train_val_split", "max_train_samples", "max_eval_samples"]
    data_args += ["num_labels_per_class", "seed", "eval_mask_prob"]
    data = {name: getattr(args, name) for name in data_args}
    data["rows"] = {split: len(y) for split, y in labels.items()}
    data["labels"] = probe_data.digest(labels.values())
    data["palette"] = probe_data.digest([np.asarray(processor.clusters, dtype=np.float32)])
    data["n_px"] = common.processor_n_px(processor)
    sets = {
        name: {"model": args.model_name_or_path, "weights": probe_data.digest(model.state_dict().values())}
        | {"layers": layers, "objective": model.config.objective}
        for name, model in models.items()
    }
    if not args.no_baselines:
        sets["raw_pixels"] = {}
    return data, sets


# ---------------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------------


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    args: argparse.Namespace,
    more_eval_x: Sequence[np.ndarray] = (),
) -> dict[str, Any]:
    """A standardized logistic-regression probe: C chosen on a held-out part of train, refit on all of it. With
    `more_eval_x` (more mask views of the evaluation images), also the accuracy of the views' averaged probabilities.
    """

    def fit(x: np.ndarray, y: np.ndarray, c: float):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=args.probe_max_iter))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            probe.fit(x, y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return probe, converged

    holdout_accuracy = {}
    if len(args.probe_c) > 1:
        fit_x, held_x, fit_y, held_y = train_test_split(
            train_x, train_y, test_size=args.probe_holdout, stratify=train_y, random_state=args.seed
        )
        for c in args.probe_c:
            probe, _ = fit(fit_x, fit_y, c)
            holdout_accuracy[c] = float(probe.score(held_x, held_y))
        best_c = max(args.probe_c, key=lambda c: (holdout_accuracy[c], -c))  # ties: the stronger regularisation
    else:
        best_c = args.probe_c[0]
    probe, converged = fit(train_x, train_y, best_c)
    result = {
        "accuracy": float(probe.score(eval_x, eval_y)),
        "C": best_c,
        "holdout_accuracy": holdout_accuracy,
        "converged": converged,
    }
    if more_eval_x:
        probabilities = np.mean([probe.predict_proba(x) for x in (eval_x, *more_eval_x)], axis=0)
        result["ensemble_accuracy"] = float((probe.classes_[probabilities.argmax(1)] == eval_y).mean())
    return result


def probe(train: Any, eval_views: Sequence[Any], names: list[str], args: argparse.Namespace, device) -> dict:
    """One probe of the features `names` (side by side), by --probe, scored on every evaluation view."""
    if args.probe == "torch":
        return probe_data.fit_torch_probe(
            train,
            eval_views,
            names,
            c_values=args.probe_c,
            holdout=args.probe_holdout,
            seed=args.seed,
            max_iter=args.probe_max_iter,
            chunk_size=args.probe_chunk_size,
            device=device,
        )
    views = [view.load(names) for view in eval_views]
    return fit_probe(train.load(names), train.labels, views[0], eval_views[0].labels, args, views[1:])


def describe(result: dict[str, Any]) -> str:
    ensemble = f", mask ensemble {result['ensemble_accuracy']:.4f}" if "ensemble_accuracy" in result else ""
    return f"accuracy {result['accuracy']:.4f}{ensemble} (C={result['C']:g})"


def probe_layers(
    name: str, train: Any, eval_views: Sequence[Any], layers: list[int], args: argparse.Namespace, device
) -> dict[int, dict[str, Any]]:
    results = {}
    for layer in layers:
        results[layer] = probe(train, eval_views, [f"layer{layer}"], args, device)
        logger.info(f"{name} layer {layer}: {describe(results[layer])}")
        if not results[layer]["converged"]:
            logger.warning(f"{name} layer {layer}: lbfgs did not converge in {args.probe_max_iter} iterations")
    return results


def concat_groups(args: argparse.Namespace, layers: list[int], best_layer: int) -> list[tuple[str, list[int]]]:
    """The layer groups to probe concatenated: --concat_layers, and --concat_window layers around the best one."""
    groups = []
    if args.concat_layers is not None:
        groups.append(("--concat_layers", sorted(set(args.concat_layers))))
    if args.concat_window is not None:
        ordered = sorted(layers)
        start = ordered.index(best_layer) - (args.concat_window - 1) // 2
        start = min(max(start, 0), len(ordered) - args.concat_window)  # shifted to stay inside the probed layers
        window = ordered[start : start + args.concat_window]
        if not groups or groups[0][1] != window:  # the same layers are probed once
            groups.append((f"--concat_window {args.concat_window}", window))
    return groups


def check_holdout(train_labels: np.ndarray, args: argparse.Namespace) -> None:
    """Choosing C on a stratified hold-out needs 2 images of each class and a class's worth on either side."""
    if len(args.probe_c) < 2:
        return
    counts = np.unique(train_labels, return_counts=True)[1]
    held = math.ceil(args.probe_holdout * len(train_labels))
    if counts.min() < 2 or min(held, len(train_labels) - held) < len(counts):
        raise ValueError(
            f"Choosing among --probe_c {' '.join(f'{c:g}' for c in args.probe_c)} on a stratified --probe_holdout "
            f"{args.probe_holdout} of {len(train_labels)} training images needs 2 images of every class and at least "
            f"{len(counts)} (one per class) held out and fitted; here {held} are held out and the smallest class has "
            f"{counts.min()}. Pass a single --probe_c value (no search) or another --probe_holdout."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


def write_outputs(results: dict[str, Any], paths: dict[str, str], overwrite: bool) -> str:
    """probe_results.json, probe_results.md (the table) and probe_accuracy.png (the plot); returns the table."""
    with atomic_file(paths["json"], overwrite=overwrite, arg="the output file") as tmp:
        tmp.write_text(json.dumps(results, indent=2))

    layers, masks = results["layers"], results["eval_masks"]
    pretrained, random_init = results["pretrained"], results.get("random_init")
    ensemble = masks["num_eval_masks"] > 1
    single = " (1 mask)" if masks["eval_mask_prob"] > 0 else ""
    columns = [f"Pretrained{single}"] + ([f"Pretrained, {masks['num_eval_masks']}-mask ensemble"] if ensemble else [])
    columns += [f"Random init{single}"] if random_init else []

    def cells(result: dict[str, Any], extra: dict[str, Any] | None, best: bool = False) -> str:
        row = [f"{result['accuracy']:.4f}" + (" **(best)**" if best else "")]
        row += [f"{result['ensemble_accuracy']:.4f}"] if ensemble else []
        row += [f"{extra['accuracy']:.4f}"] if extra else []
        return " | ".join(row)

    subset = f"{results['num_labels_per_class']} per class, " if results["num_labels_per_class"] else ""
    lines = [
        f"Linear probe accuracy on {results['dataset']} ({results['eval_split']} split, {results['num_eval']} images; "
        f"probes fitted on {results['num_train']} training images, {subset}{results['probe']} probe), model "
        f"`{results['model']}`, {results['n_px']}x{results['n_px']} pixels.",
    ]
    if masks["eval_mask_prob"] > 0:
        lines.append(
            f"BERT evaluation masks: {masks['eval_mask_prob']:g} of the pixels masked, {masks['num_eval_masks']} "
            "mask(s) per evaluation image; the ensemble averages one probe's class probabilities over the masks."
        )
    lines += ["", "| Layer | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for layer in layers:
        extra = random_init[str(layer)] if random_init else None
        lines.append(f"| {layer} | {cells(pretrained[str(layer)], extra, layer == results['best_layer'])} |")
    for group in results["concat"]:
        label = " + ".join(str(layer) for layer in group["layers"])
        lines.append(f"| {label} (concatenated) | {cells(group['pretrained'], group.get('random_init'))} |")
    if "raw_pixels" in results:
        lines += [
            "",
            f"Raw pixels ({results['n_px']}x{results['n_px']}x3 values): {results['raw_pixels']['accuracy']:.4f}",
        ]
    lines += [
        "",
        f"Best layer: {results['best_layer']} of {results['n_layer']}, accuracy {results['best_accuracy']:.4f}.",
    ]
    with atomic_file(paths["markdown"], overwrite=overwrite, arg="the output file") as tmp:
        tmp.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(layers, [pretrained[str(layer)]["accuracy"] for layer in layers], "o-", label=f"pretrained{single}")
    if ensemble:
        accuracies = [pretrained[str(layer)]["ensemble_accuracy"] for layer in layers]
        ax.plot(layers, accuracies, "^-", label=f"{masks['num_eval_masks']}-mask ensemble")
    if random_init:
        ax.plot(layers, [random_init[str(layer)]["accuracy"] for layer in layers], "s--", label="random init")
    if "raw_pixels" in results:
        ax.axhline(results["raw_pixels"]["accuracy"], color="gray", linestyle=":", label="raw pixels")
    for group in results["concat"]:  # a bar over the layers it concatenates
        span, accuracy = group["layers"], group["pretrained"]["accuracy"]
        name = f"layers {span[0]}-{span[-1]}" if span == list(range(span[0], span[-1] + 1)) else f"layers {span}"
        ax.plot([span[0], span[-1]], [accuracy, accuracy], "|-", linewidth=3, markersize=12, label=f"{name} concat.")
    ax.plot([results["best_layer"]], [results["best_accuracy"]], "r*", markersize=14, label="best layer")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"linear probe accuracy ({results['eval_split']})")
    model_name = os.path.basename(os.path.normpath(results["model"]))
    ax.set_title(f"Linear probe accuracy by layer\n{model_name} on {results['dataset']}", fontsize=10)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_file(paths["plot"], overwrite=overwrite, arg="the output file") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = common.create_accelerator(args)
    set_seed(args.seed)
    names = {"json": "probe_results.json", "markdown": "probe_results.md", "plot": "probe_accuracy.png"}
    paths = {kind: os.path.join(args.output_dir, name) for kind, name in names.items()}
    for path in paths.values():  # existing results are kept unless --overwrite, refused before any work
        check_output_path(
            path, kind="file", inputs=common.inputs(args), overwrite=args.overwrite, arg="the output file"
        )
    if args.feature_dir is not None:  # a store of features may be resumed or reused; anything else is refused
        if accelerator.is_main_process:  # what a process killed while writing the store's settings left behind
            clean_stale_staging(args.feature_dir, probe_data.SETTINGS_FILE)
        accelerator.wait_for_everyone()
        keep = [probe_data.SETTINGS_FILE, *SETS]
        check_output_path(
            args.feature_dir, inputs=common.inputs(args), overwrite=args.overwrite, keep=keep, arg="--feature_dir"
        )

    # The checkpoint's config and processor, the layers, the data and its labels: every bad input fails here, before
    # a model is loaded.
    config = common.load_imagegpt_config(args.model_name_or_path)
    processor = common.checkpoint_processor(args.model_name_or_path, config, args.processor_name_or_path, args.n_px)
    layers = args.layers if args.layers is not None else list(range(config.n_layer + 1))
    bad = [layer for layer in layers if not 0 <= layer <= config.n_layer]
    if bad:
        raise ValueError(
            f"--layers {bad} are not hidden-state indices of a {config.n_layer}-layer model (0..{config.n_layer})."
        )
    missing = sorted(set(args.concat_layers or ()) - set(layers))
    if missing:
        raise ValueError(f"--concat_layers {missing} are not among the probed --layers {layers}; add them there.")
    if args.concat_window is not None and args.concat_window > len(layers):
        raise ValueError(f"--concat_window {args.concat_window} is more than the {len(layers)} probed layers.")
    common.check_eval_masks(args, config)
    with accelerator.main_process_first():
        dataset, eval_split = common.load_image_dataset(args)
    image_column = common.find_image_column(dataset, args.image_column_name)
    label_column = common.find_label_column(dataset, args.label_column_name, required=True)
    label_list, label_map = common.label_names(dataset, label_column)
    if args.num_labels_per_class is not None:
        dataset["train"] = common.class_balanced_subset(
            dataset["train"], label_column, label_list, label_map, args.num_labels_per_class, args.seed
        )
        logger.info(f"Training on {args.num_labels_per_class} labelled images per class (seed {args.seed})")
    labels = {
        split: np.asarray([label_map[x] for x in values] if label_map else values, dtype=np.int64)
        for split, values in ((split, dataset[split][label_column]) for split in ("train", "validation"))
    }
    check_holdout(labels["train"], args)

    model, loading_info = ImageGPTModel.from_pretrained(args.model_name_or_path, output_loading_info=True)
    if loading_info["missing_keys"]:
        raise ValueError(f"{args.model_name_or_path} lacks decoder weights: {loading_info['missing_keys'][:5]} ...")
    models = {"pretrained": model.eval()}
    if not args.no_baselines:
        torch.manual_seed(args.seed)
        models["random_init"] = ImageGPTModel(config).eval()
    store = None
    if args.feature_dir is not None:
        store = probe_data.FeatureStore(args.feature_dir)
        data, sets = store_settings(args, processor, labels, models, layers)
        store.prepare(data, sets, overwrite=args.overwrite, main=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    models = {name: m.to(accelerator.device) for name, m in models.items()}

    # Evaluation views: whole images, or for BERT mask ensembles the k-th seeded mask of every image (k < K); the
    # probe is fitted on the training images under mask 0.
    masked = args.eval_mask_prob > 0
    views = [(f"validation-mask{k}" if k else "validation", k) for k in range(args.num_eval_masks)]

    def collator(pixel_values: bool = False) -> common.ImageGPTCollator:
        return common.ImageGPTCollator(
            processor, image_column, label_column, label_map, pixel_values=pixel_values, indices=masked
        )

    def extract(name: str, split: str, part: str, view: int) -> Any:
        """The features of one set on one split (one view), in memory or through --feature_dir."""
        pixels = name == "raw_pixels"
        mask = (args.eval_mask_prob, args.seed, view) if masked and not pixels else None
        if store is None:
            loader = accelerator.prepare(common.dataloader(dataset[split], collator(pixels), args, train=False))
            if pixels:
                x, y = pixel_features(accelerator, loader)
                return probe_data.ArrayFeatures({"pixels": x}, y)
            x, y = model_features(accelerator, models[name], loader, layers, f"{name} ({part})", mask)
            return probe_data.ArrayFeatures({f"layer{layer}": x[i] for i, layer in enumerate(layers)}, y)

        def compute(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if pixels:
                return {"pixels": batch["pixel_values"].flatten(1)}
            features = batch_features(models[name], batch, layers, mask)
            return {f"layer{layer}": features[i] for i, layer in enumerate(layers)}

        columns = [image_column, label_column]
        images = common.ImageDataset(dataset[split], image_column, columns)
        return probe_data.features_to_disk(
            accelerator,
            store,
            name,
            part,
            images,
            collator(pixels),
            compute,
            batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers,
            overwrite=args.overwrite,
        )

    logger.info(f"Extracting the features of layers {layers} from {args.model_name_or_path}")
    features = {}
    for name in models if args.no_baselines else SETS:
        eval_views = views if name != "raw_pixels" else views[:1]
        train = extract(name, "train", "train", 0)
        features[name] = (train, [extract(name, "validation", part, view) for part, view in eval_views])

    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        device = accelerator.device
        results = {
            "model": args.model_name_or_path,
            "dataset": common.data_name(args),
            "eval_split": eval_split,
            "num_train": int(len(labels["train"])),
            "num_eval": int(len(labels["validation"])),
            "num_labels_per_class": args.num_labels_per_class,
            "n_px": common.processor_n_px(processor),
            "n_layer": config.n_layer,
            "objective": config.objective,
            "layers": layers,
            "probe": args.probe,
            "feature_dir": args.feature_dir,
            "eval_masks": {"num_eval_masks": args.num_eval_masks, "eval_mask_prob": args.eval_mask_prob},
        }
        for name in models:
            per_layer = probe_layers(name, *features[name], layers, args, device)
            results[name] = {str(layer): value for layer, value in per_layer.items()}
        if not args.no_baselines:
            results["raw_pixels"] = probe(*features["raw_pixels"], ["pixels"], args, device)
            logger.info(f"raw pixels: accuracy {results['raw_pixels']['accuracy']:.4f}")
        best_layer = max(layers, key=lambda layer: results["pretrained"][str(layer)]["accuracy"])
        results["best_layer"] = best_layer
        results["best_accuracy"] = results["pretrained"][str(best_layer)]["accuracy"]
        results["concat"] = []
        for source, group in concat_groups(args, layers, best_layer):
            entry: dict[str, Any] = {"layers": group, "from": source}
            for name in models:
                entry[name] = probe(*features[name], [f"layer{layer}" for layer in group], args, device)
                logger.info(f"{name} layers {group} concatenated: {describe(entry[name])}")
            results["concat"].append(entry)
        print(write_outputs(results, paths, args.overwrite))
        logger.info(f"Best layer {best_layer} of {config.n_layer}: accuracy {results['best_accuracy']:.4f}")
        logger.info(f"Wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
