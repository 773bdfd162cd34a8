"""Linear probes of Image GPT features, layer by layer, as in the paper: how linearly separable are the classes in
the average-pooled features `n^l` of each layer `l`?

    accelerate launch examples/linear_probe.py --model_name_or_path igpt-tiny-digits --output_dir probe-digits

One forward pass per batch gives the features of every layer (`ImageGPTModel.extract_features`). Each layer gets a
logistic-regression probe (scikit-learn, features standardized, L2 strength chosen on a held-out part of the
training split), fitted on the training split and scored on the evaluation split. Two baselines run the same way: a
randomly initialised model of the same config (what the architecture alone gives) and the raw pixels. Writes
probe_results.json, probe_results.md and probe_accuracy.png to --output_dir.
"""

from __future__ import annotations

import argparse
import json
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
from common import logger
from image_gpt_hf import ImageGPTModel
from image_gpt_hf.safe_io import atomic_file, check_output_path

matplotlib.use("Agg")  # files only, no display


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
    parser.add_argument("--seed", type=int, default=42, help="Seeds the random-init baseline and the held-out split.")
    common.add_data_arguments(parser)
    common.add_processor_arguments(parser, augment=False)
    args = parser.parse_args(argv)
    common.check_data_arguments(args)
    if args.per_device_eval_batch_size < 1:
        raise ValueError(f"--per_device_eval_batch_size must be at least 1, got {args.per_device_eval_batch_size}.")
    if args.probe_max_iter < 1:
        raise ValueError(f"--probe_max_iter must be at least 1, got {args.probe_max_iter}.")
    if not 0.0 < args.probe_holdout < 1.0:
        raise ValueError(f"--probe_holdout must be in (0, 1), got {args.probe_holdout}.")
    if any(c <= 0 for c in args.probe_c):
        raise ValueError(f"--probe_c values must be positive, got {args.probe_c}.")
    return args


@torch.no_grad()
def model_features(
    accelerator: Accelerator, model: ImageGPTModel, dataloader: DataLoader, layers: list[int], desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled `n^l` features of `layers` for every image: `(num_layers, N, d)`, and the labels `(N,)`."""
    # AR models read OpenAI's [SOS, x_1, ..., x_{n-1}], the input they were trained on.
    forward_kwargs = {"prepend_sos": True} if model.config.objective == "ar" else {}
    features, labels = [], []
    for batch in common.progress_bar(accelerator, iterable=dataloader, desc=desc, leave=False):
        batch_features = model.extract_features(batch["input_ids"], layers=layers, **forward_kwargs)  # (L, B, d)
        batch_features, batch_labels = accelerator.gather_for_metrics(
            (batch_features.transpose(0, 1).contiguous(), batch["labels"])
        )
        features.append(batch_features.float().cpu())
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


def fit_probe(
    train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """A standardized logistic-regression probe: C chosen on a held-out part of train, refit on all of it."""

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
    return {
        "accuracy": float(probe.score(eval_x, eval_y)),
        "C": best_c,
        "holdout_accuracy": holdout_accuracy,
        "converged": converged,
    }


def probe_layers(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    layers: list[int],
    args: argparse.Namespace,
) -> dict[int, dict[str, Any]]:
    results = {}
    for index, layer in enumerate(layers):
        results[layer] = fit_probe(train[0][index], train[1], evaluation[0][index], evaluation[1], args)
        logger.info(f"{name} layer {layer}: accuracy {results[layer]['accuracy']:.4f} (C={results[layer]['C']:g})")
        if not results[layer]["converged"]:
            logger.warning(f"{name} layer {layer}: lbfgs did not converge in {args.probe_max_iter} iterations")
    return results


def write_outputs(results: dict[str, Any], paths: dict[str, str], overwrite: bool) -> str:
    """probe_results.json, probe_results.md (the table) and probe_accuracy.png (the plot); returns the table."""
    with atomic_file(paths["json"], overwrite=overwrite, arg="the output file") as tmp:
        tmp.write_text(json.dumps(results, indent=2))

    layers = results["layers"]
    pretrained, random_init = results["pretrained"], results.get("random_init")
    lines = [
        f"Linear probe accuracy on {results['dataset']} ({results['eval_split']} split, {results['num_eval']} images; "
        f"probes fitted on {results['num_train']} training images), model `{results['model']}`, "
        f"{results['n_px']}x{results['n_px']} pixels.",
        "",
        "| Layer | Pretrained | Random init |" if random_init else "| Layer | Pretrained |",
        "|---:|---:|---:|" if random_init else "|---:|---:|",
    ]
    for layer in layers:
        best = " **(best)**" if layer == results["best_layer"] else ""
        row = f"| {layer} | {pretrained[str(layer)]['accuracy']:.4f}{best} |"
        if random_init:
            row += f" {random_init[str(layer)]['accuracy']:.4f} |"
        lines.append(row)
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
    ax.plot(layers, [pretrained[str(layer)]["accuracy"] for layer in layers], "o-", label="pretrained")
    if random_init:
        ax.plot(layers, [random_init[str(layer)]["accuracy"] for layer in layers], "s--", label="random init")
    if "raw_pixels" in results:
        ax.axhline(results["raw_pixels"]["accuracy"], color="gray", linestyle=":", label="raw pixels")
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
    with accelerator.main_process_first():
        dataset, eval_split = common.load_image_dataset(args)
    image_column = common.find_image_column(dataset, args.image_column_name)
    label_column = common.find_label_column(dataset, args.label_column_name, required=True)
    _, label_map = common.label_names(dataset, label_column)

    model, loading_info = ImageGPTModel.from_pretrained(args.model_name_or_path, output_loading_info=True)
    if loading_info["missing_keys"]:
        raise ValueError(f"{args.model_name_or_path} lacks decoder weights: {loading_info['missing_keys'][:5]} ...")
    model = model.eval().to(accelerator.device)

    def loader(split: str, pixel_values: bool = False) -> DataLoader:
        collator = common.ImageGPTCollator(
            processor, image_column, label_column, label_map, train=False, pixel_values=pixel_values
        )
        return accelerator.prepare(common.dataloader(dataset[split], collator, args, train=False))

    train_loader, eval_loader = loader("train"), loader("validation")
    logger.info(f"Extracting the features of layers {layers} from {args.model_name_or_path}")
    feature_sets = {
        "pretrained": (
            model_features(accelerator, model, train_loader, layers, "features (train)"),
            model_features(accelerator, model, eval_loader, layers, "features (eval)"),
        )
    }
    if not args.no_baselines:
        torch.manual_seed(args.seed)
        random_model = ImageGPTModel(config).eval().to(accelerator.device)
        feature_sets["random_init"] = (
            model_features(accelerator, random_model, train_loader, layers, "random init (train)"),
            model_features(accelerator, random_model, eval_loader, layers, "random init (eval)"),
        )
        pixels = (
            pixel_features(accelerator, loader("train", pixel_values=True)),
            pixel_features(accelerator, loader("validation", pixel_values=True)),
        )

    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        (train_x, train_y), (eval_x, eval_y) = feature_sets["pretrained"]
        results = {
            "model": args.model_name_or_path,
            "dataset": common.data_name(args),
            "eval_split": eval_split,
            "num_train": int(len(train_y)),
            "num_eval": int(len(eval_y)),
            "n_px": common.processor_n_px(processor),
            "n_layer": config.n_layer,
            "objective": config.objective,
            "layers": layers,
        }
        for name, (train, evaluation) in feature_sets.items():
            per_layer = probe_layers(name, train, evaluation, layers, args)
            results[name] = {str(layer): value for layer, value in per_layer.items()}
        if not args.no_baselines:
            results["raw_pixels"] = fit_probe(pixels[0][0], pixels[0][1], pixels[1][0], pixels[1][1], args)
            logger.info(f"raw pixels: accuracy {results['raw_pixels']['accuracy']:.4f}")
        best_layer = max(layers, key=lambda layer: results["pretrained"][str(layer)]["accuracy"])
        results["best_layer"] = best_layer
        results["best_accuracy"] = results["pretrained"][str(best_layer)]["accuracy"]
        print(write_outputs(results, paths, args.overwrite))
        logger.info(f"Best layer {best_layer} of {config.n_layer}: accuracy {results['best_accuracy']:.4f}")
        logger.info(f"Wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
