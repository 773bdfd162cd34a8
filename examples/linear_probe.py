"""Linear probes of Image GPT features, layer by layer, as in the paper: a logistic-regression probe on the
average-pooled features `n^l` of every layer `l` (one forward pass per batch, `ImageGPTModel.extract_features`), and
the same for a randomly initialised model and the raw pixels. Writes probe_results.json, .md and probe_accuracy.png.

    accelerate launch examples/linear_probe.py --model_name_or_path igpt-tiny-digits --output_dir probe-digits

The rest of the paper's protocol: layers side by side (`--concat_layers`, `--concat_window`), BERT models under K
masks (`--num_eval_masks`, `--eval_mask_prob`), seeded class-balanced label subsets (`--num_labels_per_class`), and
features on disk (`--feature_dir`: resumable after a kill, reused only for the same images) with a probe that reads
them a chunk at a time (`--probe torch`), both in examples/feature_store.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
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
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from datasets import DatasetDict
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import feature_store
from image_gpt_hf import ImageGPTDataCollator, ImageGPTModel, load_config_and_processor
from image_gpt_hf.safe_io import atomic_file, check_output_path, clean_stale_staging
from image_gpt_hf.training import DIGITS, class_balanced_subset, class_labels, dataset_fingerprint, load_image_dataset

matplotlib.use("Agg")  # files only, no display
logger = get_logger(__name__)

SETS = ("pretrained", "random_init", "raw_pixels")  # the feature sets, as a --feature_dir names them


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Linear probes on every layer of an Image GPT model.")
    add = parser.add_argument
    add("--model_name_or_path", required=True, help="An Image GPT checkpoint (folder or Hub id).")
    add("--processor_name_or_path", default=None, help="A processor with the model's palette (default: the model's).")
    add("--output_dir", required=True, help="Where to write probe_results.json, .md and probe_accuracy.png.")
    add("--overwrite", action="store_true", help="Replace earlier results (and a --feature_dir of other settings).")
    add("--layers", type=int, nargs="+", default=None, help="Hidden states to probe (0 = embeddings; default: all).")
    add("--concat_layers", type=int, nargs="+", default=None, help="Also probe these layers side by side.")
    add("--concat_window", type=int, default=None, help="Also probe W layers side by side around the best one.")
    add("--probe_c", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="Inverse L2 strengths to choose from.")
    add("--probe_holdout", type=float, default=0.2, help="Fraction of the training split used to choose --probe_c.")
    add("--probe_max_iter", type=int, default=2000, help="lbfgs iterations per probe.")
    add("--no_baselines", action="store_true", help="Skip the random-init and raw-pixel probes.")
    add("--per_device_eval_batch_size", type=int, default=128, help="Feature extraction batch size.")
    add("--seed", type=int, default=42, help="Seeds the random-init baseline, the hold-out, label subsets, masks.")
    add(
        "--feature_dir", default=None, help="Stream the features to this folder (resumable, reused) instead of memory."
    )
    add("--probe", choices=["sklearn", "torch"], default="sklearn", help="torch: L-BFGS over chunks, on the GPU.")
    add("--probe_chunk_size", type=int, default=4096, help="Rows per chunk of --probe torch.")
    add("--num_labels_per_class", type=int, default=None, help="Probe on N seeded training images of every class.")
    add("--num_eval_masks", type=int, default=1, help="BERT models: evaluate under K masks, probabilities averaged.")
    add("--eval_mask_prob", type=float, default=0.0, help="BERT models: masked fraction of each view (paper: 0.15).")
    add("--dataset_name", default=DIGITS, help=f"A `datasets` image dataset, or {DIGITS!r} (default, bundled).")
    add("--dataset_config_name", default=None, help="The dataset configuration name.")
    add("--train_dir", default=None, help="An imagefolder of training images (one subfolder per class).")
    add("--validation_dir", default=None, help="An imagefolder of evaluation images.")
    add("--image_column_name", default=None, help="Default: the first column of `Image` type.")
    add("--label_column_name", default=None, help="Default: the first `ClassLabel` column, else 'label(s)'.")
    add("--train_val_split", type=float, default=0.15, help="Train held out when there is no evaluation split.")
    add("--max_train_samples", type=int, default=None, help="Truncate the training split.")
    add("--max_eval_samples", type=int, default=None, help="Truncate the evaluation split.")
    add("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    add("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    args = parser.parse_args(argv)
    if args.num_labels_per_class is not None and args.num_labels_per_class < 1:  # an empty training set
        raise ValueError(f"--num_labels_per_class must be at least 1, got {args.num_labels_per_class}.")
    if args.num_eval_masks > 1 and args.eval_mask_prob == 0:  # K identical views
        raise ValueError(f"--num_eval_masks {args.num_eval_masks} needs --eval_mask_prob > 0 (the paper's: 0.15).")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------------


def fit_probe(train: Any, eval_views: Sequence[Any], names: list[str], args: argparse.Namespace, device) -> dict:
    """One probe of the features `names` side by side: C chosen on a stratified hold-out of train, refit on all of
    it, scored on the first evaluation view; with several views (BERT masks) also on their averaged probabilities."""
    if args.probe == "torch":
        options = dict(c_values=args.probe_c, holdout=args.probe_holdout, seed=args.seed, max_iter=args.probe_max_iter)
        return feature_store.fit_torch_probe(
            train, eval_views, names, chunk_size=args.probe_chunk_size, device=device, **options
        )
    train_x, train_y = train.load(names), train.labels

    def fit(x: np.ndarray, y: np.ndarray, c: float):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=args.probe_max_iter))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            probe.fit(x, y)
        return probe, not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    holdout_accuracy, best_c = {}, args.probe_c[0]
    if len(args.probe_c) > 1:
        fit_x, held_x, fit_y, held_y = train_test_split(
            train_x, train_y, test_size=args.probe_holdout, stratify=train_y, random_state=args.seed
        )
        for c in args.probe_c:
            holdout_accuracy[c] = float(fit(fit_x, fit_y, c)[0].score(held_x, held_y))
        best_c = max(args.probe_c, key=lambda c: (holdout_accuracy[c], -c))  # ties: the stronger regularisation
    probe, converged = fit(train_x, train_y, best_c)
    views = [view.load(names) for view in eval_views]
    labels = eval_views[0].labels
    result = {"accuracy": float(probe.score(views[0], labels)), "C": best_c}
    result |= {"holdout_accuracy": holdout_accuracy, "converged": converged}
    if len(views) > 1:
        probabilities = np.mean([probe.predict_proba(x) for x in views], axis=0)
        result["ensemble_accuracy"] = float((probe.classes_[probabilities.argmax(1)] == labels).mean())
    return result


def describe(result: dict[str, Any]) -> str:
    ensemble = f", mask ensemble {result['ensemble_accuracy']:.4f}" if "ensemble_accuracy" in result else ""
    return f"accuracy {result['accuracy']:.4f}{ensemble} (C={result['C']:g})"


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


def write_outputs(results: dict[str, Any], paths: dict[str, str], overwrite: bool) -> str:
    """probe_results.json, probe_results.md (the table) and probe_accuracy.png (the plot); returns the table."""
    layers, masks, pretrained = results["layers"], results["eval_masks"], results["pretrained"]
    random_init = results.get("random_init")
    ensemble, single = masks["num_eval_masks"] > 1, " (1 mask)" if masks["eval_mask_prob"] > 0 else ""
    columns = [f"Pretrained{single}"] + ([f"Pretrained, {masks['num_eval_masks']}-mask ensemble"] if ensemble else [])
    columns += [f"Random init{single}"] if random_init else []

    def cells(result: dict[str, Any], extra: dict[str, Any] | None, best: bool = False) -> str:
        row = [f"{result['accuracy']:.4f}" + (" **(best)**" if best else "")]
        row += [f"{result['ensemble_accuracy']:.4f}"] if ensemble else []
        return " | ".join(row + ([f"{extra['accuracy']:.4f}"] if extra else []))

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
        n_px, accuracy = results["n_px"], results["raw_pixels"]["accuracy"]
        lines += ["", f"Raw pixels ({n_px}x{n_px}x3 values): {accuracy:.4f}"]
    lines += [
        "",
        f"Best layer: {results['best_layer']} of {results['n_layer']}, accuracy {results['best_accuracy']:.4f}.",
    ]

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
    ax.set(xlabel="layer (0 = embeddings)", ylabel=f"linear probe accuracy ({results['eval_split']})", xticks=layers)
    model_name = os.path.basename(os.path.normpath(results["model"]))
    ax.set_title(f"Linear probe accuracy by layer\n{model_name} on {results['dataset']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    for kind, write in (
        ("json", lambda tmp: tmp.write_text(json.dumps(results, indent=2))),
        ("markdown", lambda tmp: tmp.write_text("\n".join(lines) + "\n")),
        ("plot", fig.savefig),
    ):
        with atomic_file(paths[kind], overwrite=overwrite, arg="the output file") as tmp:
            write(tmp)
    plt.close(fig)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Several CPU processes (accelerate launch without GPUs) join one run only when Accelerate is told to use the CPU.
    accelerator = Accelerator(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available())
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    names = {"json": "probe_results.json", "markdown": "probe_results.md", "plot": "probe_accuracy.png"}
    paths = {kind: os.path.join(args.output_dir, name) for kind, name in names.items()}
    inputs = [args.model_name_or_path, args.processor_name_or_path, args.train_dir, args.validation_dir]
    inputs.append(args.dataset_name)
    for path in paths.values():  # existing results are kept unless --overwrite, refused before any work
        check_output_path(path, kind="file", inputs=inputs, overwrite=args.overwrite, arg="the output file")
    if args.feature_dir is not None:  # a store of features may be resumed or reused; anything else is refused
        if accelerator.is_main_process:  # what a process killed while writing the store's settings left behind
            clean_stale_staging(args.feature_dir, feature_store.SETTINGS_FILE)
        accelerator.wait_for_everyone()
        keep = [feature_store.SETTINGS_FILE, *SETS]
        check_output_path(args.feature_dir, inputs=inputs, overwrite=args.overwrite, keep=keep, arg="--feature_dir")

    # The checkpoint's config and processor, the layers, the data and its labels: bad input fails before a model loads.
    config, processor = load_config_and_processor(args.model_name_or_path, args.processor_name_or_path)
    n_px = config.n_px  # features are pooled over whole images of the model's n_positions ids
    layers = args.layers if args.layers is not None else list(range(config.n_layer + 1))
    bad = [layer for layer in layers if not 0 <= layer <= config.n_layer]
    if bad:
        raise ValueError(f"--layers {bad} are not hidden-state indices of a {config.n_layer}-layer model.")
    missing = sorted(set(args.concat_layers or ()) - set(layers))
    if missing:
        raise ValueError(f"--concat_layers {missing} are not among the probed --layers {layers}; add them there.")
    if args.concat_window is not None and args.concat_window > len(layers):
        raise ValueError(f"--concat_window {args.concat_window} is more than the {len(layers)} probed layers.")
    if args.eval_mask_prob > 0 and config.objective != "bert":
        raise ValueError(
            f"--eval_mask_prob {args.eval_mask_prob} masks pixels for BERT models, but {args.model_name_or_path} is "
            f"an {config.objective.upper()} model, trained on whole images; leave --eval_mask_prob at 0."
        )
    with accelerator.main_process_first():
        names = inspect.signature(load_image_dataset).parameters  # the data flags, by name
        dataset, eval_split, image_column = load_image_dataset(**{k: v for k, v in vars(args).items() if k in names})
    label_column, label_names, label_map = class_labels(dataset, args.label_column_name)
    labels = {
        split: np.asarray([label_map[x] for x in values] if label_map else values, dtype=np.int64)
        for split, values in ((split, dataset[split][label_column]) for split in ("train", "validation"))
    }
    if args.num_labels_per_class is not None:
        rows = class_balanced_subset(labels["train"], label_names, args.num_labels_per_class, args.seed)
        dataset["train"], labels["train"] = dataset["train"].select(rows), labels["train"][rows]
        logger.info(f"Probing on {args.num_labels_per_class} labelled images per class (seed {args.seed})")
    dataset = DatasetDict({split: dataset[split].select_columns([image_column, label_column]) for split in dataset})
    logger.info(f"Data: {len(labels['train'])} training, {len(labels['validation'])} {eval_split} images")
    check_holdout(labels["train"], args)

    model, loading_info = ImageGPTModel.from_pretrained(args.model_name_or_path, output_loading_info=True)
    if loading_info["missing_keys"]:
        raise ValueError(f"{args.model_name_or_path} lacks decoder weights: {loading_info['missing_keys'][:5]} ...")
    models = {"pretrained": model.eval()}
    if not args.no_baselines:
        torch.manual_seed(args.seed)
        models["random_init"] = ImageGPTModel(config).eval()
    store = None
    if args.feature_dir is not None:  # what the features depend on: a store of other settings is never reused
        store = feature_store.FeatureStore(args.feature_dir)
        names = ["dataset_name", "dataset_config_name", "train_dir", "validation_dir", "image_column_name"]
        names += ["label_column_name", "train_val_split", "max_train_samples", "max_eval_samples"]
        data = {name: getattr(args, name) for name in [*names, "num_labels_per_class", "seed", "eval_mask_prob"]}
        images = [
            dataset_fingerprint(dataset[split], [image_column]) if accelerator.is_main_process else None
            for split in labels
        ]
        data["images"] = dict(zip(labels, broadcast_object_list(images)))  # read once, on the main process
        data |= {
            "rows": {split: len(y) for split, y in labels.items()},
            "labels": feature_store.digest(labels.values()),
        }
        data |= {"palette": feature_store.digest([np.asarray(processor.clusters, dtype=np.float32)]), "n_px": n_px}
        sets = {
            name: {"model": args.model_name_or_path, "weights": feature_store.digest(m.state_dict().values())}
            | {"layers": layers, "objective": m.config.objective}
            for name, m in models.items()
        } | ({} if args.no_baselines else {"raw_pixels": {}})
        store.prepare(data, sets, overwrite=args.overwrite, main=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    models = {name: m.to(accelerator.device) for name, m in models.items()}

    # Images as the model sees them: shortest edge to n_px, the center n_px x n_px, palette ids (or the normalized
    # pixels of the raw-pixel baseline).
    center = {"size": {"shortest_edge": n_px}, "do_center_crop": True, "crop_size": {"height": n_px, "width": n_px}}

    def collate(rows: list[dict], pixels: bool) -> dict[str, torch.Tensor]:
        images, values = [row[image_column] for row in rows], [row[label_column] for row in rows]
        batch = {"labels": torch.tensor([label_map[x] for x in values] if label_map else values)}
        if pixels:
            batch["pixels"] = processor(images, return_tensors="pt", do_color_quantize=False, **center)["pixel_values"]
        else:
            batch["input_ids"] = processor(images, return_tensors="pt", **center)["input_ids"].long()
        return batch

    # Evaluation views: whole images, or for BERT mask ensembles the k-th mask of every image (k < K), seeded by the
    # image alone (the library collator's masks); the probe is fitted on the training images under mask 0. AR models
    # read OpenAI's [SOS, x_1, ..., x_{n-1}].
    masker = None
    if args.eval_mask_prob > 0:
        masker = ImageGPTDataCollator(objective="bert", mask_probability=args.eval_mask_prob, seed=args.seed)
    views = [(f"validation-mask{k}" if k else "validation", k) for k in range(args.num_eval_masks)]

    def extract(name: str, split: str, part: str, view: int) -> Any:
        """The features of one set on one split (one view), in memory or through --feature_dir."""
        pixels = name == "raw_pixels"

        @torch.no_grad()
        def compute(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if pixels:
                return {"pixels": batch["pixels"].flatten(1).float()}
            ids, kwargs = batch["input_ids"], {"prepend_sos": True} if config.objective == "ar" else {}
            if masker is not None:
                kwargs["bool_masked_pos"] = masker.masks(ids, epoch=view).to(ids.device)
            features = models[name].extract_features(ids, layers=layers, **kwargs)
            return {f"layer{layer}": features[i] for i, layer in enumerate(layers)}

        loader = {"batch_size": args.per_device_eval_batch_size, "num_workers": args.dataloader_num_workers}
        loader["collate_fn"] = lambda rows: collate(rows, pixels)
        if store is not None:
            return feature_store.features_to_disk(
                accelerator, store, name, part, dataset[split], compute, overwrite=args.overwrite, **loader
            )
        return feature_store.features_in_memory(accelerator, f"{name} ({part})", dataset[split], compute, **loader)

    logger.info(f"Extracting the features of layers {layers} from {args.model_name_or_path}")
    features = {}
    for name in models if args.no_baselines else SETS:
        eval_views = views if name != "raw_pixels" else views[:1]
        train = extract(name, "train", "train", 0)
        features[name] = (train, [extract(name, "validation", part, view) for part, view in eval_views])

    if accelerator.is_main_process:
        device = accelerator.device
        data_name = "scikit-learn handwritten digits (8x8 scans)" if args.dataset_name == DIGITS else args.dataset_name
        results: dict[str, Any] = {
            "model": args.model_name_or_path,
            "dataset": f"the imagefolder {args.train_dir}" if args.train_dir else data_name,
            "eval_split": eval_split,
            "num_train": len(labels["train"]),
            "num_eval": len(labels["validation"]),
            "num_labels_per_class": args.num_labels_per_class,
            "n_px": n_px,
            "n_layer": config.n_layer,
            "objective": config.objective,
            "layers": layers,
            "probe": args.probe,
            "feature_dir": args.feature_dir,
            "eval_masks": {"num_eval_masks": args.num_eval_masks, "eval_mask_prob": args.eval_mask_prob},
        }
        for name in models:
            results[name] = {}
            for layer in layers:
                result = results[name][str(layer)] = fit_probe(*features[name], [f"layer{layer}"], args, device)
                logger.info(f"{name} layer {layer}: {describe(result)}")
                if not result["converged"]:
                    logger.warning(f"{name} layer {layer}: lbfgs did not converge in {args.probe_max_iter} iterations")
        if not args.no_baselines:
            results["raw_pixels"] = fit_probe(*features["raw_pixels"], ["pixels"], args, device)
            logger.info(f"raw pixels: accuracy {results['raw_pixels']['accuracy']:.4f}")
        best_layer = max(layers, key=lambda layer: results["pretrained"][str(layer)]["accuracy"])
        results |= {"best_layer": best_layer, "best_accuracy": results["pretrained"][str(best_layer)]["accuracy"]}
        # Layers side by side: --concat_layers, and --concat_window probed layers centered at the best one (shifted to
        # stay inside the probed layers).
        groups = [("--concat_layers", sorted(set(args.concat_layers)))] if args.concat_layers else []
        if args.concat_window is not None:
            ordered = sorted(layers)
            start = ordered.index(best_layer) - (args.concat_window - 1) // 2
            start = min(max(start, 0), len(ordered) - args.concat_window)
            window = ordered[start : start + args.concat_window]
            if not groups or groups[0][1] != window:  # the same layers are probed once
                groups.append((f"--concat_window {args.concat_window}", window))
        results["concat"] = []
        for source, group in groups:
            entry: dict[str, Any] = {"layers": group, "from": source}
            for name in models:
                entry[name] = fit_probe(*features[name], [f"layer{layer}" for layer in group], args, device)
                logger.info(f"{name} layers {group} concatenated: {describe(entry[name])}")
            results["concat"].append(entry)
        print(write_outputs(results, paths, args.overwrite))
        logger.info(f"Best layer {best_layer} of {config.n_layer}: accuracy {results['best_accuracy']:.4f}")
        logger.info(f"Wrote {paths['json']}, {paths['markdown']} and {paths['plot']}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
