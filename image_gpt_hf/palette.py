"""Fitting an Image GPT color palette by k-means, and the `igpt-fit-palette` command.

iGPT's vocabulary is a palette: OpenAI clustered ImageNet's pixels into 512 colors (`kmeans_centers.npy`, centers in
[-1, 1]). A model trained on other data (gray digits, medical scans, a small CPU demo) wants a palette, and often a
smaller one, fitted to that data. This module samples pixels the way the model sees them (through the processor,
resized to n_px x n_px and scaled to [-1, 1]), clusters them with scikit-learn, and writes the palette both in OpenAI's
`.npy` format and as a processor folder that `AutoImageProcessor.from_pretrained` loads.

    igpt-fit-palette --sklearn_digits --num_colors 16 --n_px 32 --output_dir palettes/digits16

Memory stays bounded whatever the size of the photos: images stream through in batches (`batch_size`), and an image
with more than `pixel_budget` pixels is scaled down (aspect ratio kept; JPEGs are decoded at a reduced scale) as soon
as it is read, before its pixels are sampled. The command writes through `image_gpt_hf.safe_io`: it refuses an
existing non-empty `--output_dir` without `--overwrite`, and an `--output_dir` in or around its input images.

scikit-learn is an optional dependency (`pip install "image_gpt_hf[examples]"`); it is imported only when fitting.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from .image_processing_imagegpt import ImageGPTImageProcessor, color_quantize
from .safe_io import check_output_path, staged_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
PALETTE_FILE = "kmeans_centers.npy"
# Above this many (distinct colors x clusters), full k-means gives way to mini-batch k-means; below the second,
# k-means runs single-threaded.
_FULL_KMEANS_WORK = 20_000_000
_SMALL_KMEANS_WORK = 1_000_000
# Images with more pixels than this are scaled down as they are read (about 3 MB each as 8-bit RGB).
PIXEL_BUDGET = 1_000_000
BATCH_SIZE = 32


def load_sklearn_digits() -> np.ndarray:
    """scikit-learn's bundled handwritten digits as `(1797, 8, 8)` uint8 gray images, ink bright on black.

    The digits are 8x8 counts in 0..16; they are scaled to 0..255 (`round(v * 255 / 16)`). They ship inside
    scikit-learn, so examples and tests that use them run offline.
    """
    import sklearn.datasets

    images = sklearn.datasets.load_digits().images
    return np.rint(images * (255.0 / 16.0)).astype(np.uint8)


def _image_column(dataset: Any, image_column: str | None) -> str:
    """The dataset column holding images: the one asked for, else the first `Image` feature, else "image"/"img"."""
    columns = list(dataset.column_names or [])
    if image_column is not None:
        return image_column
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "Image":
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise ValueError(f"Cannot tell which column holds the images among {columns}; pass `image_column`.")


def _budget_size(size: tuple[int, int], pixel_budget: int) -> tuple[int, int]:
    """The largest (width, height) with the aspect ratio of `size` and at most `pixel_budget` pixels."""
    width, height = size
    scale = math.sqrt(pixel_budget / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _within_budget(image: Any, pixel_budget: int | None, opened_here: bool = False) -> Any:
    """`image`, or for a PIL image with more than `pixel_budget` pixels, a copy scaled down to fit (aspect kept).

    An image this module opened (`opened_here`) and has not loaded yet is decoded at a reduced scale where the format
    allows it (JPEG's draft mode), so a large photo never lies in memory at full size. The caller's images are not
    modified, and arrays are returned as they are (they are in memory already).
    """
    if pixel_budget is None or not isinstance(image, PIL.Image.Image) or image.width * image.height <= pixel_budget:
        return image
    size = _budget_size(image.size, pixel_budget)
    if opened_here:
        image.draft(None, size)  # JPEG: decoded at the smallest DCT scale at least this large; others: no-op
    try:
        return image.resize(size, PIL.Image.Resampling.BICUBIC, reducing_gap=2.0)
    except ValueError:  # a mode Pillow cannot resize: the processor reads it at full size
        return image


def _read_image_file(path: Path, pixel_budget: int | None) -> PIL.Image.Image:
    """The image in `path`, scaled down to `pixel_budget`; a `ValueError` naming the file if it cannot be read."""
    try:
        with PIL.Image.open(path) as image:
            reduced = _within_budget(image, pixel_budget, opened_here=True)
            reduced.load()
            return reduced.copy() if reduced is image else reduced
    except Exception as err:  # Pillow's errors (many kinds, a decompression bomb among them) do not name the file
        raise ValueError(f"Cannot read the image file {path}: {type(err).__name__}: {err}") from None


def _image_batches(
    images: Any, batch_size: int, image_column: str | None, pixel_budget: int | None = None
) -> Iterator[list]:
    """Batches of images (PIL images or arrays) from a folder, a `datasets` dataset, an array batch or a list.

    PIL images with more than `pixel_budget` pixels are scaled down as they are read; only one image is ever held at
    full size, so a batch takes at most about `batch_size * pixel_budget` pixels.
    """
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"Found no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder {root}.")
        for start in range(0, len(files), batch_size):
            yield [_read_image_file(path, pixel_budget) for path in files[start : start + batch_size]]
    elif hasattr(images, "column_names") and hasattr(images, "features"):  # a datasets.Dataset / IterableDataset
        column = _image_column(images, image_column)
        if hasattr(images, "__len__") and hasattr(images, "__getitem__"):
            # Row by row: a slice would decode a whole batch of full-size images at once.
            examples = (images[index] for index in range(len(images)))
        else:
            examples = iter(images)
        batch = []
        for example in examples:
            batch.append(_within_budget(example[column], pixel_budget))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    elif isinstance(images, (np.ndarray, torch.Tensor)):  # a batch: (N, H, W) gray or (N, H, W, C) / (N, C, H, W)
        if images.ndim not in (3, 4):  # one image's rows would pass for images
            raise ValueError(f"An array of images is (N, H, W[, C]), got {tuple(images.shape)}; wrap one in a list.")
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            yield list(chunk)
    elif isinstance(images, Sequence):
        for start in range(0, len(images), batch_size):
            yield [_within_budget(image, pixel_budget) for image in images[start : start + batch_size]]
    else:
        raise ValueError(f"Unsupported images {type(images).__name__}: pass a folder, a dataset, an array or a list.")


def _check_budget(n_px: int | None, pixel_budget: int | None) -> None:
    """Images are scaled down to the budget before they are resized to n_px x n_px: a smaller one loses detail."""
    if pixel_budget is not None and pixel_budget < (n_px or 1) ** 2:
        raise ValueError(f"`pixel_budget` must be at least n_px * n_px = {(n_px or 1) ** 2}, got {pixel_budget}.")


def sample_pixels(
    images: Any,
    n_px: int | None = 32,
    max_pixels: int = 1_000_000,
    seed: int = 0,
    image_column: str | None = None,
    batch_size: int = BATCH_SIZE,
    pixel_budget: int | None = PIXEL_BUDGET,
) -> np.ndarray:
    """Up to `max_pixels` pixels drawn uniformly without replacement from `images`, as the model sees them.

    Every image goes through `ImageGPTImageProcessor` (RGB, resized to `n_px x n_px` unless `n_px` is None, scaled
    to [-1, 1]); each pixel gets a random key from `numpy.random.default_rng(seed)` and the `max_pixels` smallest keys
    are kept as batches stream by, so the sample depends only on the data, its order and the seed (not on
    `batch_size`).

    Memory is bounded whatever the size and number of the images: `batch_size` images are read at a time, and a PIL
    image (a file, a dataset's image, an item of a list) with more than `pixel_budget` pixels is first scaled down to
    fit, aspect ratio kept (None: never). With `n_px` set, that only changes how a photo far larger than n_px x n_px
    is averaged down to it; with `n_px=None` the sampled pixels are those of the scaled-down image. Arrays are
    sampled as they are.

    Returns:
        `(num_pixels, 3)` float32 in [-1, 1].
    """
    _check_budget(n_px, pixel_budget)
    processor = ImageGPTImageProcessor(
        do_color_quantize=False,
        do_resize=n_px is not None,
        size={"height": n_px or 1, "width": n_px or 1},
    )
    rng = np.random.default_rng(seed)
    kept, keys = [np.empty((0, 3), dtype=np.float32)], [np.empty(0)]
    pending = 0
    num_images = 0
    for batch in _image_batches(images, batch_size, image_column, pixel_budget):
        if not batch:
            continue
        num_images += len(batch)
        for value in processor(batch, data_format="channels_last")["pixel_values"]:
            pixels = value.reshape(-1, 3)
            kept.append(pixels)
            keys.append(rng.random(len(pixels)))
            pending += len(pixels)
            if pending > 2 * max_pixels:  # trimmed now and then, not after every image: linear time overall
                kept, keys = _smallest_keys(kept, keys, max_pixels)
                pending = len(kept[0])
    if num_images == 0:
        raise ValueError("Got no images to sample pixels from.")
    return _smallest_keys(kept, keys, max_pixels)[0][0]


def _smallest_keys(
    pixels: list[np.ndarray], keys: list[np.ndarray], count: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The `count` pixels with the smallest keys, in their original order, as one-element lists."""
    pixels, keys = np.concatenate(pixels), np.concatenate(keys)
    if len(keys) > count:
        keep = np.argpartition(keys, count - 1)[:count]
        keep.sort()
        pixels, keys = pixels[keep], keys[keep]
    return [pixels], [keys]


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
    import sklearn.cluster as cluster

    pixels = np.asarray(pixels, dtype=np.float32)
    colors, counts = _distinct_colors(pixels)
    if num_colors > len(colors):
        raise ValueError(
            f"Cannot fit {num_colors} colors to {len(colors)} distinct ones: lower num_colors, or sample more."
        )
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
    batch_size: int = BATCH_SIZE,
    pixel_budget: int | None = PIXEL_BUDGET,
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
        batch_size: images read and processed at a time.
        pixel_budget: larger images are scaled down to this many pixels as they are read (see `sample_pixels`).

    Returns:
        `(num_colors, 3)` float32 centers in [-1, 1], the format of OpenAI's `kmeans_centers.npy`.
    """
    pixels = sample_pixels(images, n_px, max_pixels, seed, image_column, batch_size, pixel_budget)
    return fit_palette_to_pixels(pixels, num_colors, seed, method)


def quantization_error(pixels: np.ndarray, palette: np.ndarray) -> float:
    """Mean Euclidean distance from each pixel to its nearest palette color, in [-1, 1] RGB units.

    Multiply by 127.5 for 8-bit (0-255) units.
    """
    colors, counts = _distinct_colors(np.asarray(pixels, dtype=np.float32))
    palette = np.asarray(palette, dtype=np.float64)
    ids = color_quantize(torch.from_numpy(colors), palette).numpy()
    distances = np.linalg.norm(colors.astype(np.float64) - palette[ids], axis=1)
    return float(np.average(distances, weights=counts))


def save_palette(
    palette: np.ndarray,
    output_dir: str | os.PathLike,
    n_px: int = 32,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    **processor_kwargs: Any,
) -> ImageGPTImageProcessor:
    """Write `palette` as OpenAI's `kmeans_centers.npy` and as a processor folder (`preprocessor_config.json`).

    The folder loads with `AutoImageProcessor.from_pretrained(output_dir)` (this package's processor after
    `import image_gpt_hf`, transformers' own otherwise, or this one as remote code with `trust_remote_code=True`).
    It is written as a whole (`image_gpt_hf.safe_io.staged_dir`): an existing non-empty `output_dir` (say, a model
    folder, whose vocabulary the new palette would not match) is refused unless `overwrite=True`, which replaces
    it entirely; an `output_dir` that is, holds or lies inside one of `inputs` is always refused.

    Returns:
        The processor that was saved.
    """
    palette = np.asarray(palette, dtype=np.float32)
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": n_px, "width": n_px}, **processor_kwargs)
    with staged_dir(output_dir, overwrite=overwrite, inputs=inputs) as tmp:
        np.save(tmp / PALETTE_FILE, palette)
        processor.save_pretrained(tmp)
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
    parser.add_argument(
        "--batch_size", type=int, default=BATCH_SIZE, help="Images read and processed at a time (memory)."
    )
    parser.add_argument(
        "--pixel_budget",
        type=int,
        default=PIXEL_BUDGET,
        help="Images with more pixels are scaled down to this many (aspect kept) as they are read, which bounds "
        "memory; at least n_px * n_px; 0 for no limit.",
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Where to write the palette files.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing non-empty --output_dir (all of its content)."
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """The `igpt-fit-palette` command (also `python -m image_gpt_hf.palette`)."""
    args = _parse_args(argv)
    try:
        _fit_and_save(args)
    except (ValueError, OSError, ImportError) as err:  # bad data, options or paths: what is wrong, no traceback
        raise SystemExit(f"igpt-fit-palette: {err}") from None


def _fit_and_save(args: argparse.Namespace) -> None:
    # The budget and the output path are checked before the data is read: a mistake costs no fitting time.
    pixel_budget = args.pixel_budget or None
    _check_budget(args.n_px, pixel_budget)
    inputs = [args.image_dir] if args.image_dir is not None else []
    if args.dataset_name is not None and os.path.exists(args.dataset_name):  # a local data set folder or file
        inputs.append(args.dataset_name)
    check_output_path(args.output_dir, inputs=inputs, overwrite=args.overwrite)

    if args.sklearn_digits:
        images, source = load_sklearn_digits(), "scikit-learn digits"
    elif args.image_dir is not None:
        images, source = args.image_dir, args.image_dir
    else:
        import datasets

        images = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
        source = f"{args.dataset_name} [{args.dataset_split}]"

    pixels = sample_pixels(
        images, args.n_px, args.max_pixels, args.seed, args.image_column, args.batch_size, pixel_budget
    )
    palette = fit_palette_to_pixels(pixels, args.num_colors, args.seed, args.method)
    error = quantization_error(pixels, palette)
    save_palette(palette, args.output_dir, n_px=args.n_px, overwrite=args.overwrite, inputs=inputs)

    print(f"source: {source}; {len(pixels)} pixels sampled at {args.n_px}x{args.n_px} (seed {args.seed})")
    print(f"palette: {len(palette)} colors")
    print(f"mean quantization error: {error:.4f} in [-1, 1] RGB units = {error * 127.5:.2f} in 0-255 units")
    print(f"wrote {os.path.join(args.output_dir, PALETTE_FILE)}")
    print(f"wrote {os.path.join(args.output_dir, 'preprocessor_config.json')} (load with AutoImageProcessor)")


if __name__ == "__main__":
    main()
