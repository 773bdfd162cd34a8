"""Fitting an Image GPT color palette by k-means, and the `igpt-fit-palette` command.

iGPT's vocabulary is a palette: OpenAI clustered ImageNet's pixels into 512 colors (`kmeans_centers.npy`, centers in
[-1, 1]). A model trained on other data (gray digits, medical scans, a small CPU demo) wants a palette, and often a
smaller one, fitted to that data. This module samples pixels the way the model sees them (through the processor,
resized to n_px x n_px and scaled to [-1, 1]), clusters them with scikit-learn, and writes the palette both in OpenAI's
`.npy` format and as a processor folder that `AutoImageProcessor.from_pretrained` loads.

    igpt-fit-palette --sklearn_digits --num_colors 16 --n_px 32 --output_dir palettes/digits16

scikit-learn is an optional dependency (`pip install "image_gpt_hf[examples]"`); it is imported only when fitting.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from .image_processing_imagegpt import ImageGPTImageProcessor, color_quantize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
PALETTE_FILE = "kmeans_centers.npy"
# Above this many (distinct colors x clusters), full k-means gives way to mini-batch k-means; below the second,
# k-means runs single-threaded.
_FULL_KMEANS_WORK = 20_000_000
_SMALL_KMEANS_WORK = 1_000_000


def _require_sklearn():
    try:
        import sklearn.cluster
    except ImportError as err:
        raise ImportError(
            "Fitting a palette needs scikit-learn: `pip install 'image_gpt_hf[examples]'` (or `pip install "
            "scikit-learn`)."
        ) from err
    return sklearn.cluster


def _require_sklearn_datasets():
    _require_sklearn()
    import sklearn.datasets

    return sklearn.datasets


def load_sklearn_digits() -> np.ndarray:
    """scikit-learn's bundled handwritten digits as `(1797, 8, 8)` uint8 gray images, ink bright on black.

    The digits are 8x8 counts in 0..16; they are scaled to 0..255 (`round(v * 255 / 16)`). They ship inside
    scikit-learn, so examples and tests that use them run offline.
    """
    datasets = _require_sklearn_datasets()
    images = datasets.load_digits().images
    return np.rint(images * (255.0 / 16.0)).astype(np.uint8)


def _image_column(dataset: Any, image_column: str | None) -> str:
    """The dataset column holding images: the one asked for, else the first `Image` feature, else "image"/"img"."""
    columns = list(dataset.column_names or [])
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"The dataset has no column {image_column!r}; its columns are {columns}.")
        return image_column
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "Image":
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise ValueError(f"Cannot tell which column holds the images among {columns}; pass `image_column`.")


def _image_batches(images: Any, batch_size: int, image_column: str | None) -> Iterator[list]:
    """Batches of images (PIL images or arrays) from a folder, a `datasets` dataset, an array batch or a list."""
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory of images.")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"Found no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
        for start in range(0, len(files), batch_size):
            batch = []
            for path in files[start : start + batch_size]:
                try:
                    with PIL.Image.open(path) as image:
                        image.load()
                        batch.append(image.copy())
                except OSError as err:
                    raise ValueError(f"Cannot read the image file {path}: {err}") from None
            yield batch
    elif hasattr(images, "column_names") and hasattr(images, "features"):  # a datasets.Dataset / IterableDataset
        column = _image_column(images, image_column)
        if hasattr(images, "__len__") and hasattr(images, "__getitem__"):
            for start in range(0, len(images), batch_size):
                yield list(images[start : start + batch_size][column])
        else:
            batch = []
            for example in images:
                batch.append(example[column])
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
    elif isinstance(images, (np.ndarray, torch.Tensor)):  # a batch: (N, H, W) gray or (N, H, W, C) / (N, C, H, W)
        if images.ndim not in (3, 4):
            raise ValueError(
                f"An array of images must have shape (N, H, W) or (N, H, W, C), got {tuple(images.shape)}; wrap a "
                "single image in a list."
            )
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            yield list(chunk)
    elif isinstance(images, Sequence):
        for start in range(0, len(images), batch_size):
            yield list(images[start : start + batch_size])
    else:
        raise ValueError(
            f"Unsupported image source {type(images).__name__}: pass a folder, a `datasets` Dataset, an array of "
            "images or a list of images."
        )


def sample_pixels(
    images: Any,
    n_px: int | None = 32,
    max_pixels: int = 1_000_000,
    seed: int = 0,
    image_column: str | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Up to `max_pixels` pixels drawn uniformly without replacement from `images`, as the model sees them.

    Every image goes through `ImageGPTImageProcessor` (RGB, resized to `n_px x n_px` unless `n_px` is None, scaled
    to [-1, 1]); each pixel gets a random key from `numpy.random.default_rng(seed)` and the `max_pixels` smallest keys
    are kept as batches stream by, so memory stays bounded however large the data is and the sample depends only on
    the data, its order and the seed.

    Returns:
        `(num_pixels, 3)` float32 in [-1, 1].
    """
    if max_pixels < 1:
        raise ValueError(f"`max_pixels` must be positive, got {max_pixels}.")
    if n_px is not None and n_px < 1:
        raise ValueError(f"`n_px` must be positive (or None to keep each image's size), got {n_px}.")
    processor = ImageGPTImageProcessor(
        do_color_quantize=False,
        do_resize=n_px is not None,
        size={"height": n_px or 1, "width": n_px or 1},
    )
    rng = np.random.default_rng(seed)
    kept = np.empty((0, 3), dtype=np.float32)
    keys = np.empty(0)
    num_images = 0
    for batch in _image_batches(images, batch_size, image_column):
        if not batch:
            continue
        values = processor(batch, data_format="channels_last")["pixel_values"]
        pixels = np.concatenate([v.reshape(-1, 3) for v in values])
        num_images += len(batch)
        kept = np.concatenate([kept, pixels])
        keys = np.concatenate([keys, rng.random(len(pixels))])
        if len(kept) > max_pixels:
            keep = np.argpartition(keys, max_pixels - 1)[:max_pixels]
            keep.sort()
            kept, keys = kept[keep], keys[keep]
    if num_images == 0:
        raise ValueError("Got no images to sample pixels from.")
    return kept


def _distinct_colors(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of `(N, 3)` float32 pixels and how often each occurs."""
    packed = np.ascontiguousarray(pixels, dtype=np.float32).view(np.dtype((np.void, 12))).reshape(-1)
    _, first, counts = np.unique(packed, return_index=True, return_counts=True)
    return pixels[first], counts


def fit_palette_to_pixels(
    pixels: np.ndarray,
    num_colors: int = 512,
    seed: int = 0,
    method: Literal["auto", "kmeans", "minibatch"] = "auto",
) -> np.ndarray:
    """k-means centers of `(N, 3)` pixels in [-1, 1]: a `(num_colors, 3)` float32 palette in [-1, 1].

    k-means runs on the distinct colors weighted by their counts, which is the same objective as on every pixel and
    far less work (8-bit images repeat colors). `method="auto"` uses scikit-learn's full `KMeans` while that is cheap
    and `MiniBatchKMeans` beyond.
    """
    cluster = _require_sklearn()
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2 or pixels.shape[1] != 3 or len(pixels) == 0:
        raise ValueError(f"`pixels` must have shape (num_pixels, 3), got {pixels.shape}.")
    if not np.isfinite(pixels).all():
        raise ValueError("`pixels` contains non-finite values.")
    if num_colors < 1:
        raise ValueError(f"`num_colors` must be positive, got {num_colors}.")
    colors, counts = _distinct_colors(pixels)
    if num_colors > len(colors):
        raise ValueError(
            f"Cannot fit num_colors={num_colors} palette colors to data with only {len(colors)} distinct colors "
            f"(in {len(pixels)} sampled pixels). Lower num_colors to at most {len(colors)}, or sample more or more "
            "varied pixels."
        )
    if method not in ("auto", "kmeans", "minibatch"):
        raise ValueError(f"`method` must be 'auto', 'kmeans' or 'minibatch', got {method!r}.")
    if method == "auto":
        method = "kmeans" if len(colors) * num_colors <= _FULL_KMEANS_WORK else "minibatch"
    if method == "kmeans":
        model = cluster.KMeans(n_clusters=num_colors, n_init=4, random_state=seed)
    else:
        model = cluster.MiniBatchKMeans(
            n_clusters=num_colors, batch_size=max(4096, 4 * num_colors), n_init=3, random_state=seed
        )
    # Small fits run on one thread: their many short OpenMP loops gain nothing from more, and stall on a busy CPU.
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=1 if len(colors) * num_colors < _SMALL_KMEANS_WORK else None):
        model.fit(colors, sample_weight=counts.astype(np.float64))
    return np.clip(model.cluster_centers_, -1.0, 1.0).astype(np.float32)


def fit_palette(
    images: Any,
    num_colors: int = 512,
    n_px: int | None = 32,
    max_pixels: int = 1_000_000,
    seed: int = 0,
    image_column: str | None = None,
    method: Literal["auto", "kmeans", "minibatch"] = "auto",
    batch_size: int = 256,
) -> np.ndarray:
    """Fit a `num_colors`-color palette to the pixels of `images` by k-means (OpenAI's recipe for iGPT's palette).

    Args:
        images: a folder of image files (searched recursively), a `datasets` Dataset with an image column, an array
            holding a batch of images (`(N, H, W)` gray, `(N, H, W, C)` or `(N, C, H, W)`), or a list of PIL images /
            arrays.
        num_colors: palette size, the model's vocabulary without SOS (OpenAI: 512).
        n_px: images are resized to `n_px x n_px` first, so the palette fits the pixels the model sees; None keeps
            each image's size.
        max_pixels: how many pixels to sample uniformly at random (seeded) for the fit.
        seed: seeds both the pixel sample and k-means, so a fit is repeatable.
        image_column: the dataset column with the images (found automatically when it has the `Image` feature).
        method: "kmeans" (scikit-learn's `KMeans`), "minibatch" (`MiniBatchKMeans`) or "auto".

    Returns:
        `(num_colors, 3)` float32 centers in [-1, 1], the format of OpenAI's `kmeans_centers.npy`.
    """
    pixels = sample_pixels(images, n_px, max_pixels, seed, image_column, batch_size)
    return fit_palette_to_pixels(pixels, num_colors, seed, method)


def quantization_error(pixels: np.ndarray, palette: np.ndarray) -> float:
    """Mean Euclidean distance from each pixel to its nearest palette color, in [-1, 1] RGB units.

    Multiply by 127.5 for 8-bit (0-255) units.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if len(pixels) == 0:
        raise ValueError("`pixels` is empty.")
    colors, counts = _distinct_colors(pixels)
    palette = np.asarray(palette, dtype=np.float64)
    ids = color_quantize(torch.from_numpy(colors), palette).numpy()
    distances = np.linalg.norm(colors.astype(np.float64) - palette[ids], axis=1)
    return float(np.average(distances, weights=counts))


def save_palette(
    palette: np.ndarray, output_dir: str | os.PathLike, n_px: int = 32, **processor_kwargs: Any
) -> ImageGPTImageProcessor:
    """Write `palette` as OpenAI's `kmeans_centers.npy` and as a processor folder (`preprocessor_config.json`).

    The folder loads with `AutoImageProcessor.from_pretrained(output_dir)` (this package's processor after
    `import image_gpt_hf`, transformers' own otherwise, or this one as remote code with `trust_remote_code=True`).

    Returns:
        The processor that was saved.
    """
    palette = np.asarray(palette, dtype=np.float32)
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": n_px, "width": n_px}, **processor_kwargs)
    os.makedirs(output_dir, exist_ok=True)
    np.save(os.path.join(output_dir, PALETTE_FILE), palette)
    processor.save_pretrained(output_dir)
    return processor


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="igpt-fit-palette",
        description="Fit an Image GPT color palette by k-means and save it as kmeans_centers.npy + "
        "preprocessor_config.json.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_dir", type=str, help="A folder of image files (searched recursively).")
    source.add_argument("--dataset_name", type=str, help="A `datasets` dataset name or path (load_dataset).")
    source.add_argument(
        "--sklearn_digits", action="store_true", help="scikit-learn's bundled 8x8 handwritten digits (offline)."
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The dataset configuration name.")
    parser.add_argument("--dataset_split", type=str, default="train", help="The dataset split to sample.")
    parser.add_argument("--image_column", type=str, default=None, help="The dataset column holding the images.")
    parser.add_argument("--num_colors", type=int, default=512, help="Palette size (OpenAI: 512).")
    parser.add_argument("--n_px", type=int, default=32, help="Images are resized to n_px x n_px before sampling.")
    parser.add_argument("--max_pixels", type=int, default=1_000_000, help="Pixels sampled for the fit.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pixel sample and of k-means.")
    parser.add_argument("--method", choices=("auto", "kmeans", "minibatch"), default="auto")
    parser.add_argument("--output_dir", type=str, required=True, help="Where to write the palette files.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """The `igpt-fit-palette` command (also `python -m image_gpt_hf.palette`)."""
    args = _parse_args(argv)
    if args.n_px < 1:
        raise SystemExit(f"--n_px must be positive, got {args.n_px}.")
    if args.sklearn_digits:
        images, source = load_sklearn_digits(), "scikit-learn digits"
    elif args.image_dir is not None:
        images, source = args.image_dir, args.image_dir
    else:
        import datasets

        images = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
        source = f"{args.dataset_name} [{args.dataset_split}]"

    try:
        pixels = sample_pixels(images, args.n_px, args.max_pixels, args.seed, args.image_column)
        palette = fit_palette_to_pixels(pixels, args.num_colors, args.seed, args.method)
    except ValueError as err:  # bad data or options: say what is wrong, without a traceback
        raise SystemExit(f"igpt-fit-palette: {err}") from None
    error = quantization_error(pixels, palette)
    save_palette(palette, args.output_dir, n_px=args.n_px)

    print(f"source: {source}; {len(pixels)} pixels sampled at {args.n_px}x{args.n_px} (seed {args.seed})")
    print(f"palette: {len(palette)} colors")
    print(f"mean quantization error: {error:.4f} in [-1, 1] RGB units = {error * 127.5:.2f} in 0-255 units")
    print(f"wrote {os.path.join(args.output_dir, PALETTE_FILE)}")
    print(f"wrote {os.path.join(args.output_dir, 'preprocessor_config.json')} (load with AutoImageProcessor)")


if __name__ == "__main__":
    main()
