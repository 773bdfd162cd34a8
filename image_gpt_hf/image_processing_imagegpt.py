"""Image processor for Image GPT: images <-> sequences of palette ids.

iGPT never sees RGB. An image is resized to `n_px x n_px`, its pixels are scaled to [-1, 1] (x / 127.5 - 1) and each
pixel is replaced by the id of the nearest color of a palette (OpenAI's is 512 k-means centers). The processor is the
model's tokenizer; `decode` turns ids (samples, completions) back into images.

This file is shipped as remote code by `save_pretrained`: it imports only numpy, PIL, torch and transformers.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, load_image
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

logger = logging.get_logger(__name__)

# Channel counts an array image may have: gray, gray + alpha, RGB, RGBA. Like transformers, the channel axis is
# inferred from the first three only (gray + alpha arrays need `input_data_format`), so fewer shapes are ambiguous.
_CHANNEL_COUNTS = (1, 2, 3, 4)
_INFERRED_CHANNEL_COUNTS = (1, 3, 4)
# Above this many input pixels in a batch, decoding and resizing run in a thread pool (PIL releases the GIL there).
_THREADED_PIXELS = 1 << 20
# Distances closer than this (relative) are re-ranked with numpy's own arithmetic, see `color_quantize`.
_TIE_TOLERANCE = 1e-9
# Entries of one chunk's distance matrix: cache-sized on CPU, large on accelerators.
_CPU_CHUNK = 1 << 18
_ACCELERATOR_CHUNK = 1 << 26
# Cells per axis of the grid that prunes the search, and the (pixels x colors) work from which pruning pays.
_GRID = 16
_PRUNE_MIN_WORK = 1 << 23


# ---------------------------------------------------------------------------------------------------------------------
# Nearest palette color
# ---------------------------------------------------------------------------------------------------------------------


def _numpy_nearest(pixels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Nearest-center ids computed with the very arithmetic of transformers' `ImageGPTImageProcessorPil`.

    float32 pixels, float64 palette, `|x|^2 - 2 x.c + |c|^2` with the squared norms summed by numpy and the dot
    products by numpy's BLAS. Used only to break the rare near-ties of the torch path the same way transformers does.
    """
    if len(pixels) == 1:  # a 1-row matmul takes BLAS' gemv path, whose rounding differs from the gemm path
        return _numpy_nearest(np.concatenate([pixels, pixels]), clusters)[:1]
    centers_t = clusters.T
    pixel_norms = np.sum(np.square(pixels), axis=1)
    center_norms = np.sum(np.square(centers_t), axis=0)
    distances = pixel_norms[:, None] - 2 * np.matmul(pixels, centers_t) + center_norms[None, :]
    return np.argmin(distances, axis=1)


def color_quantize(
    pixels: torch.Tensor,
    clusters: torch.Tensor | np.ndarray,
    chunk_size: int | None = None,
    prune: bool | None = None,
) -> torch.Tensor:
    """Id of the nearest palette color of every pixel: `(N, 3)` pixels, `(K, 3)` palette -> `(N,)` int64.

    Args:
        pixels: pixel values, normalized like the palette (transformers' pixel values are float32).
        clusters: the palette.
        chunk_size: pixels per chunk, bounding the `(chunk, colors searched)` distance matrix; by default about 2**18
            entries on CPU, 2**26 on accelerators.
        prune: search only the centers that can be nearest to each pixel, found from a 16 x 16 x 16 grid over
            [-1, 1]^3 (about 10 of 512 for a spread-out palette). Exact, and several times faster on CPU for large
            batches; `None` prunes for palettes of 64+ colors on CPU when there are enough pixels to repay building
            the grid (cached per palette).

    The ids are those of transformers' `ImageGPTImageProcessorPil`, ties included. The search ranks centers by
    `|c|^2 - 2 x.c` (the squared distance less the pixel's constant `|x|^2`) in float64, one fused matrix product per
    chunk. Where the best and second-best center of a pixel are within rounding of each other (1e-9 relative; float64
    errors are ~1e-15) the order could depend on the arithmetic, so those pixels, a handful if any, are re-ranked
    with the arithmetic of transformers' processor itself (numpy: float32 `|x|^2`, float64 palette,
    `|x|^2 - 2 x.c + |c|^2`, first minimum), which also sends exact ties to the lowest id.
    """
    if pixels.ndim != 2 or pixels.shape[-1] != 3:
        raise ValueError(f"`pixels` must have shape (num_pixels, 3), got {tuple(pixels.shape)}.")
    device = pixels.device
    if device.type == "mps":  # no float64 there
        device = torch.device("cpu")
    pixels = pixels.to(device=device, dtype=torch.float32)
    palette = torch.as_tensor(clusters, dtype=torch.float64).to(device)
    if palette.ndim != 2 or palette.shape[-1] != 3 or palette.shape[0] == 0:
        raise ValueError(f"The palette must have shape (num_colors, 3), got {tuple(palette.shape)}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive number of pixels, got {chunk_size}.")
    num_pixels, num_colors = pixels.shape[0], palette.shape[0]
    if prune is None:
        prune = device.type == "cpu" and num_colors >= 64 and num_pixels * num_colors >= _PRUNE_MIN_WORK

    pixels64 = pixels.to(torch.float64)
    center_norms = (palette * palette).sum(dim=1)  # (K,)
    # How close two distances must be for rounding to possibly order them differently than transformers does.
    tolerance = _TIE_TOLERANCE * (1.0 + (pixels64 * pixels64).sum(dim=1) + center_norms.max())  # (N,)
    ids = torch.empty(num_pixels, dtype=torch.long, device=device)
    near_tie = torch.zeros(num_pixels, dtype=torch.bool, device=device)
    if prune:
        on_grid = (pixels64.abs() <= 1.0).all(dim=1)
        rows = torch.nonzero(on_grid).squeeze(1)
        _search_grid(pixels64, rows, palette, center_norms, tolerance, chunk_size, ids, near_tie)
        rows = torch.nonzero(~on_grid).squeeze(1)  # normalized outside [-1, 1]: no cell, search everything
    else:
        rows = None
    _search_all(pixels64, rows, palette, center_norms, tolerance, chunk_size, ids, near_tie)

    rows = torch.nonzero(near_tie).squeeze(1)
    if len(rows):
        exact = _numpy_nearest(pixels[rows].cpu().numpy(), palette.cpu().numpy())
        ids[rows] = torch.from_numpy(exact).to(device)
    return ids


def _search_all(
    pixels: torch.Tensor,
    rows: torch.Tensor | None,
    palette: torch.Tensor,
    center_norms: torch.Tensor,
    tolerance: torch.Tensor,
    chunk_size: int | None,
    ids: torch.Tensor,
    near_tie: torch.Tensor,
) -> None:
    """Nearest center of `pixels[rows]` (all rows if None) among all centers; fills `ids` and `near_tie`."""
    num_rows = len(pixels) if rows is None else len(rows)
    num_colors = len(palette)
    if chunk_size is None:
        chunk_size = max(1, (_CPU_CHUNK if pixels.device.type == "cpu" else _ACCELERATOR_CHUNK) // num_colors)
    centers_t = palette.T.contiguous()  # (3, K)
    for start in range(0, num_rows, chunk_size):
        index = slice(start, min(start + chunk_size, num_rows)) if rows is None else rows[start : start + chunk_size]
        distances = torch.addmm(center_norms, pixels[index], centers_t, alpha=-2)  # (n, K): |c|^2 - 2 x.c
        best_distance, best = distances.min(dim=1)
        ids[index] = best
        if num_colors > 1:
            distances.scatter_(1, best[:, None], float("inf"))
            near_tie[index] = distances.amin(dim=1) <= best_distance + tolerance[index]


def _search_grid(
    pixels: torch.Tensor,
    rows: torch.Tensor,
    palette: torch.Tensor,
    center_norms: torch.Tensor,
    tolerance: torch.Tensor,
    chunk_size: int | None,
    ids: torch.Tensor,
    near_tie: torch.Tensor,
) -> None:
    """Nearest center of `pixels[rows]` (all in [-1, 1]^3) among their grid cell's candidates."""
    if len(rows) == 0:
        return
    table, counts = _candidate_table(palette.cpu().numpy().tobytes(), len(palette), str(palette.device))
    # Pixels sorted by how many candidates their cell has, so each chunk has one width and needs no padding; they
    # are gathered once in that order and the results scattered back once (indexing in the loop is slow on CPU).
    cells = ((pixels.index_select(0, rows) + 1.0) * (_GRID / 2)).floor_().clamp_(0, _GRID - 1).long()  # exact
    cells = (cells[:, 0] * _GRID + cells[:, 1]) * _GRID + cells[:, 2]
    order = torch.argsort(counts.index_select(0, cells))
    rows, cells = rows.index_select(0, order), cells.index_select(0, order)
    x, x_tolerance = pixels.index_select(0, rows), tolerance.index_select(0, rows)
    found = torch.empty(len(rows), dtype=torch.long, device=ids.device)
    tied = torch.zeros(len(rows), dtype=torch.bool, device=ids.device)
    widths, sizes = torch.unique_consecutive(counts.index_select(0, cells), return_counts=True)
    budget = _CPU_CHUNK if pixels.device.type == "cpu" else _ACCELERATOR_CHUNK
    group_start = 0
    for width, size in zip(widths.tolist(), sizes.tolist()):
        step = chunk_size or max(1, budget // width)
        for start in range(group_start, group_start + size, step):
            stop = min(start + step, group_start + size)
            candidates = table[:, :width].index_select(0, cells[start:stop])  # (n, m) ids, ascending
            flat = candidates.reshape(-1)
            distances = torch.baddbmm(
                center_norms.index_select(0, flat).view(-1, width, 1),
                palette.index_select(0, flat).view(-1, width, 3),
                x[start:stop].unsqueeze(-1),
                alpha=-2,
            ).squeeze(-1)  # (n, m): |c|^2 - 2 x.c
            best_distance, best = distances.min(dim=1)
            found[start:stop] = candidates.gather(1, best[:, None]).squeeze(1)
            if width > 1:
                distances.scatter_(1, best[:, None], float("inf"))
                tied[start:stop] = distances.amin(dim=1) <= best_distance + x_tolerance[start:stop]
        group_start += size
    ids.index_copy_(0, rows, found)
    near_tie.index_copy_(0, rows, tied)


@functools.lru_cache(maxsize=8)
def _candidate_table(palette_bytes: bytes, num_colors: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of a `_GRID`^3 grid over [-1, 1]^3, the centers that can be nearest to a point of the cell.

    A center can be nearest to some point of a cell only if its smallest distance to the cell is at most the
    smallest, over all centers, of the largest distance to the cell; centers within the tie tolerance of that bound
    are kept too, so near-ties are still seen. Returns `(cells, max candidates)` ids (ascending, padded with
    `num_colors`) and the number of candidates of each cell.
    """
    palette = torch.from_numpy(np.frombuffer(palette_bytes, dtype=np.float64).reshape(num_colors, 3).copy())
    low = torch.arange(_GRID, dtype=torch.float64) * (2 / _GRID) - 1.0  # cell edges, exact in binary
    high = low + 2 / _GRID
    nearest, farthest = [], []
    for axis in range(3):
        c = palette[:, axis][None, :]  # (1, K) against (G, 1) edges
        nearest.append(torch.clamp(torch.maximum(low[:, None] - c, c - high[:, None]), min=0) ** 2)
        farthest.append(torch.maximum((c - low[:, None]) ** 2, (c - high[:, None]) ** 2))
    members = torch.empty(_GRID**3, num_colors, dtype=torch.bool)
    norms = (palette * palette).sum(dim=1)
    slack = _TIE_TOLERANCE * (4.0 + norms.max()) + 1e-12
    for r in range(_GRID):  # one slab of cells at a time bounds the memory
        near = nearest[0][r] + nearest[1][:, None, :] + nearest[2][None, :, :]  # (G, G, K)
        far = farthest[0][r] + farthest[1][:, None, :] + farthest[2][None, :, :]
        keep = near <= far.amin(dim=-1, keepdim=True) + slack
        members[r * _GRID**2 : (r + 1) * _GRID**2] = keep.reshape(-1, num_colors)
    counts = members.sum(dim=1)
    width = int(counts.max())
    # Candidate ids in ascending order, then padding: sort "not a member" (False first) stably.
    order = torch.argsort((~members).to(torch.uint8), dim=1, stable=True)[:, :width]
    table = torch.where(torch.arange(width)[None, :] < counts[:, None], order, torch.full_like(order, num_colors))
    return table.to(device), counts.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Palette and pixel-value helpers
# ---------------------------------------------------------------------------------------------------------------------


def _validate_palette(clusters: Any) -> np.ndarray:
    """The palette as a `(K, 3)` float64 array, or a ValueError that says what is wrong with it."""
    try:
        if isinstance(clusters, torch.Tensor):
            palette = clusters.detach().to("cpu", torch.float64).numpy()
        else:
            palette = np.asarray(clusters, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"The palette (`clusters`) must be a (num_colors, 3) array of numbers in [-1, 1]; could not read it: {err}"
        ) from None
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] == 0:
        raise ValueError(
            "The palette (`clusters`) must have shape (num_colors, 3) with num_colors >= 1, "
            f"got shape {palette.shape}."
        )
    if not np.isfinite(palette).all():
        bad = np.flatnonzero(~np.isfinite(palette).all(axis=1))
        raise ValueError(f"The palette (`clusters`) has non-finite values (NaN or inf) in rows {bad[:10].tolist()}.")
    low, high = float(palette.min()), float(palette.max())
    if low < -1.0 or high > 1.0:
        raise ValueError(
            f"The palette (`clusters`) must lie in [-1, 1], the range pixels are scaled to (x / 127.5 - 1) before the "
            f"nearest-color search; got values in [{low}, {high}]."
        )
    return palette


def _channel_values(value: float | list[float] | tuple[float, ...], name: str) -> np.ndarray:
    """`image_mean` / `image_std` as 3 float32 numbers (one per RGB channel), as transformers' normalize casts them."""
    values = np.asarray(value, dtype=np.float32).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3:
        raise ValueError(f"`{name}` must be one number or one per RGB channel (3), got {value!r}.")
    if name == "image_std" and (values == 0).any():
        raise ValueError(f"`image_std` must not contain zeros, got {value!r}.")
    return values


def _level_tables(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, image_mean: Any, image_std: Any
) -> np.ndarray:
    """`(3, 256)` float32: the model-input value of each 8-bit level in each channel.

    The values are computed with the operations transformers applies to a uint8 image (rescale: float64 product cast to
    float32; normalize: float32 `(x - mean) / std`), so a lookup gives bit-identical pixel values at a fraction of the
    cost.
    """
    levels = np.arange(256, dtype=np.uint8)
    values = _rescale(levels, do_rescale, rescale_factor)
    values = np.broadcast_to(values, (3, 256))
    if do_normalize:
        mean = _channel_values(image_mean, "image_mean")[:, None]
        std = _channel_values(image_std, "image_std")[:, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def _rescale(values: np.ndarray, do_rescale: bool, rescale_factor: float) -> np.ndarray:
    """transformers' rescale: multiply in float64, then cast to float32."""
    if do_rescale:
        return (values.astype(np.float64) * rescale_factor).astype(np.float32)
    return values.astype(np.float32)


def _normalize_floats(
    image: np.ndarray,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean: Any,
    image_std: Any,
) -> np.ndarray:
    """Rescale and normalize a float `(..., 3)` image in transformers' precisions; float32 out."""
    values = _rescale(image, do_rescale, rescale_factor)
    if do_normalize:
        values = (values - _channel_values(image_mean, "image_mean")) / _channel_values(image_std, "image_std")
    return values


# ---------------------------------------------------------------------------------------------------------------------
# Reading images of any kind into RGB arrays
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """What happens to each image's pixels grid, resolved once per call."""

    do_resize: bool
    size: tuple[int, int] | int | None  # (height, width), or an int shortest edge
    longest_edge: int | None
    resample: PIL.Image.Resampling
    do_center_crop: bool
    crop_size: tuple[int, int] | None
    do_random_crop: bool
    random_crop_scale: tuple[float, float]
    random_crop_ratio: tuple[float, float]


@dataclass(frozen=True)
class _Reading:
    """How raw pixel values are read, resolved once per call."""

    do_convert_rgb: bool
    do_rescale: bool
    rescale_factor: float
    check_range: bool


def _is_image_sequence(images: Any) -> bool:
    """A container of images other than list/tuple (sized and iterable, and not itself an image or a path)."""
    single = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, PIL.Image.Image, list, tuple, dict)
    return not isinstance(images, single) and hasattr(images, "__iter__") and hasattr(images, "__len__")


def _flatten_images(images: Any, depth: int = 0) -> list[PIL.Image.Image | np.ndarray]:
    """A flat list of single images (PIL images, 2-D or 3-D arrays); 4-D arrays and tensors are batches."""
    if _is_image_sequence(images):
        images = list(images)  # e.g. a `datasets` Column, which is a sized iterable but not a list
    if isinstance(images, (list, tuple)):
        if depth > 1:
            raise ValueError("Images can be nested at most two lists deep (a batch of lists of images).")
        return [image for item in images for image in _flatten_images(item, depth + 1)]
    if isinstance(images, PIL.Image.Image):
        return [images]
    if isinstance(images, (str, os.PathLike)):
        return [load_image(os.fspath(images))]
    if isinstance(images, torch.Tensor):
        images = images.detach()
        if images.dtype in (torch.float16, torch.bfloat16):
            images = images.float()
        try:
            images = images.cpu().numpy()
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"Cannot read a tensor of dtype {images.dtype} as an image: {err}") from None
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(
            "An image array must have 2 (H, W), 3 (H, W, C or C, H, W) or 4 (a batch) dimensions, "
            f"got shape {images.shape}."
        )
    raise ValueError(
        f"Unsupported image type {type(images).__name__}: expected a PIL.Image.Image, numpy.ndarray, torch.Tensor, "
        "a path or URL, or a list of those."
    )


def _channel_layouts(
    images: list[PIL.Image.Image | np.ndarray], input_data_format: str | ChannelDimension | None
) -> list[ChannelDimension | None]:
    """Channels-first or channels-last for each 3-D array (None for PIL images and 2-D arrays).

    An array whose first and last axes could both hold channels (e.g. (3, 4, 3)) takes the layout of the unambiguous
    arrays of its batch; if there are none, or they disagree, the layout cannot be inferred and a ValueError asks for
    `input_data_format` instead of guessing.
    """
    if input_data_format is not None:
        layout = ChannelDimension(input_data_format)
        if layout not in (ChannelDimension.FIRST, ChannelDimension.LAST):
            raise ValueError(f"`input_data_format` must be 'channels_first' or 'channels_last', got {layout!r}.")
        return [layout if isinstance(image, np.ndarray) and image.ndim == 3 else None for image in images]
    layouts: list[ChannelDimension | None] = []
    ambiguous = []
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3:
            layouts.append(None)
            continue
        first, last = image.shape[0] in _INFERRED_CHANNEL_COUNTS, image.shape[-1] in _INFERRED_CHANNEL_COUNTS
        if first and last:
            layouts.append(None)
            ambiguous.append(index)
        elif first or last:
            layouts.append(ChannelDimension.FIRST if first else ChannelDimension.LAST)
        else:
            raise ValueError(
                f"Cannot infer the channel axis of an image of shape {image.shape}: an image has 1, 3 or 4 "
                "channels, first (C, H, W) or last (H, W, C); pass `input_data_format` for 2 (gray + alpha). A batch "
                "of gray images is a list of (H, W) arrays or an (N, H, W, 1) array."
            )
    if ambiguous:
        known = {layout for layout in layouts if layout is not None}
        if len(known) != 1:
            shape = images[ambiguous[0]].shape
            reason = "the batch mixes channel layouts" if known else "nothing in the batch says which"
            raise ValueError(
                f"Cannot infer the channel axis of an image of shape {shape} (channels first or last; {reason}). "
                "Pass `input_data_format='channels_first'` or `'channels_last'`."
            )
        (layout,) = known
        for index in ambiguous:
            layouts[index] = layout
    return layouts


def _array_levels(image: np.ndarray, reading: _Reading) -> tuple[np.ndarray, float]:
    """Pixel values of an array as uint8 levels, or as floats in the units `do_rescale` expects; and "white".

    Integer images are 8-bit levels, as in transformers (values must lie in [0, 255]), except uint16, which spans its
    whole range (65535 is white, as for PIL's 16-bit modes). Float images are in the units of the processor:
    [0, 1 / rescale_factor] with `do_rescale` (so [0, 255] by default), [0, 1] without it.
    """
    kind = image.dtype.kind
    if kind == "b":
        return image.astype(np.uint8) * np.uint8(255), 255.0
    if image.dtype == np.uint8:
        return image, 255.0
    if kind == "u" and image.dtype.itemsize == 2:
        return image.astype(np.float32) / np.float32(257.0), 255.0
    if kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer pixel values must lie in [0, 255] (uint16: [0, 65535]), got values in [{low}, {high}] for "
                f"an image of dtype {image.dtype}."
            )
        return image.astype(np.uint8), 255.0
    if kind != "f":
        raise ValueError(f"Unsupported pixel dtype {image.dtype}: expected bool, integers or floats.")
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise ValueError("The image has non-finite pixel values (NaN or inf).")
    white = 1.0 / reading.rescale_factor if reading.do_rescale else 1.0
    if reading.check_range:
        low, high = float(image.min()), float(image.max())
        slack = 1e-3 * white
        if low < -slack or high > white + slack:
            setting = (
                f"do_rescale=True, rescale_factor={reading.rescale_factor:g}"
                if reading.do_rescale
                else "do_rescale=False"
            )
            raise ValueError(
                f"Float pixel values must lie in [0, {white:g}] ({setting}), got values in [{low:g}, {high:g}]."
            )
        binary = ((image == 0.0) | (image == 1.0)).all()
        if reading.do_rescale and white > 1.0 and high <= 1.0 and not binary:
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images (all pixel values are in [0, 1]). "
                "If the input images have pixel values between 0 and 1, set `do_rescale=False` to avoid rescaling "
                "them again."
            )
        # Integer-valued floats on the 8-bit scale are 8-bit images: take the exact (and fast) uint8 path.
        if reading.do_rescale and reading.rescale_factor == 1 / 255 and np.array_equal(image, np.rint(image)):
            return image.astype(np.uint8), 255.0
    return image, white


def _composite_on_white(image: np.ndarray, white: float) -> np.ndarray:
    """Drop the alpha channel (last axis) by compositing onto white, the way transformers' `convert_to_rgb` does."""
    color, alpha = image[..., :-1], image[..., -1:].astype(np.float64) / white
    blended = alpha * color + (1.0 - alpha) * white
    if image.dtype == np.uint8:
        return np.round(blended).astype(np.uint8)
    return blended.astype(image.dtype)


def _pil_to_rgb(image: PIL.Image.Image, reading: _Reading) -> PIL.Image.Image | tuple[np.ndarray, float]:
    """A PIL image in mode "RGB" or "L"; or, for 16-bit, integer and float modes, an array to read as such."""
    mode = image.mode
    if mode in ("RGB", "L") and (mode == "RGB" or reading.do_convert_rgb):
        return image
    if not reading.do_convert_rgb:
        raise ValueError(
            f"Got a PIL image in mode {mode!r} with `do_convert_rgb=False`; the palette is RGB. Convert the image or "
            "pass `do_convert_rgb=True`."
        )
    if mode.startswith("I") or mode == "F":  # 16/32-bit gray: PIL's own conversion would clip at 255
        return _array_levels(np.asarray(image), reading)
    has_alpha = any(band in ("A", "a") for band in image.getbands()) or "transparency" in image.info
    try:
        if has_alpha:
            background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return image.convert("L" if mode == "1" else "RGB")
    except ValueError as err:
        raise ValueError(f"Cannot convert a PIL image in mode {mode!r} to RGB: {err}") from None


def _crop_box(height: int, width: int, geometry: _Geometry) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random crop (RandomResizedCrop's recipe), from torch's global RNG."""
    area = height * width
    log_ratio = (math.log(geometry.random_crop_ratio[0]), math.log(geometry.random_crop_ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*geometry.random_crop_scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,)).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,)).item())
            return top, left, crop_h, crop_w
    # Fallback: the largest central crop whose aspect ratio is within the allowed range.
    ratio = width / height
    if ratio < geometry.random_crop_ratio[0]:
        crop_w, crop_h = width, max(1, int(round(width / geometry.random_crop_ratio[0])))
    elif ratio > geometry.random_crop_ratio[1]:
        crop_h, crop_w = height, max(1, int(round(height * geometry.random_crop_ratio[1])))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, min(crop_h, height), min(crop_w, width)


def _output_size(height: int, width: int, geometry: _Geometry) -> tuple[int, int]:
    """Target (height, width) of the resize: a fixed size, or a shortest edge (capped by a longest edge)."""
    if isinstance(geometry.size, tuple):
        return geometry.size
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = geometry.size, int(geometry.size * long / short)
    if geometry.longest_edge is not None and new_long > geometry.longest_edge:
        new_short, new_long = int(geometry.longest_edge * short / long), geometry.longest_edge
    new_short = max(new_short, 1)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _resize_array(image: np.ndarray, height: int, width: int, resample: PIL.Image.Resampling) -> np.ndarray:
    """PIL resize of an (H, W, C) array: 8-bit images as PIL does them (bit-identical to transformers), floats per
    channel in PIL's float mode (no rounding to 8 bits)."""
    if image.dtype == np.uint8:
        pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        resized = np.asarray(pil.resize((width, height), resample=resample))
        return resized[..., None] if resized.ndim == 2 else resized
    channels = [
        np.asarray(
            PIL.Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).resize(
                (width, height), resample
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _image_size(image: PIL.Image.Image | np.ndarray, layout: ChannelDimension | None) -> tuple[int, int]:
    """(height, width) of a raw image."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if image.ndim == 2 or layout == ChannelDimension.LAST:
        return image.shape[0], image.shape[1]
    return image.shape[1], image.shape[2]


def _prepare_image(
    image: PIL.Image.Image | np.ndarray,
    layout: ChannelDimension | None,
    reading: _Reading,
    geometry: _Geometry,
    crop_box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """One image, from whatever it was, to its final (h, w, 1 or 3) uint8 or float grid of pixel values.

    `crop_box` is the random crop, drawn beforehand in batch order so that threads cannot reorder the draws.
    """
    if _num_pixels(image) == 0:
        raise ValueError(f"Got an empty image (no pixels): {_describe(image)}.")
    white = 255.0
    if isinstance(image, PIL.Image.Image):
        try:
            converted = _pil_to_rgb(image, reading)
            if isinstance(converted, PIL.Image.Image):
                height, width = converted.height, converted.width
                if crop_box is not None:
                    top, left, crop_h, crop_w = crop_box
                    converted = converted.crop((left, top, left + crop_w, top + crop_h))
                    height, width = crop_h, crop_w
                if geometry.do_resize:
                    out_h, out_w = _output_size(height, width, geometry)
                    if (out_h, out_w) != (height, width):
                        converted = converted.resize((out_w, out_h), resample=geometry.resample)
                array = np.asarray(converted)
                array = array[..., None] if array.ndim == 2 else array
                return _center_crop(array, geometry)
            array, white = converted
        except OSError as err:  # a truncated or unreadable file behind a lazily loaded PIL image
            raise ValueError(f"Could not read the PIL image: {err}") from None
    else:
        array, white = _array_levels(image, reading)
    # Arrays: to (H, W, C).
    if array.ndim == 2:
        array = array[..., None]
    elif layout == ChannelDimension.FIRST:
        array = np.moveaxis(array, 0, -1)
    height, width, channels = array.shape
    if channels not in _CHANNEL_COUNTS:
        raise ValueError(f"An image has 1, 2, 3 or 4 channels, got {channels} (shape {array.shape}).")
    if channels != 3 and not reading.do_convert_rgb:
        raise ValueError(
            f"Got an image with {channels} channel(s) and `do_convert_rgb=False`; the palette is RGB. Pass "
            "`do_convert_rgb=True` to convert gray and alpha images."
        )
    if channels in (2, 4):
        array = _composite_on_white(array, white)
    if crop_box is not None:
        top, left, crop_h, crop_w = crop_box
        array = array[top : top + crop_h, left : left + crop_w]
        height, width = crop_h, crop_w
    if geometry.do_resize:
        out_h, out_w = _output_size(height, width, geometry)
        if (out_h, out_w) != (height, width):
            array = _resize_array(array, out_h, out_w, geometry.resample)
    return _center_crop(array, geometry)


def _center_crop(array: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """transformers' center crop (after the resize), refusing to pad: a crop larger than the image is an error."""
    if not geometry.do_center_crop:
        return array
    height, width = array.shape[:2]
    crop_h, crop_w = geometry.crop_size
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"`crop_size` ({crop_h}x{crop_w}) is larger than the resized image ({height}x{width}); make `size` at "
            "least as large as `crop_size`."
        )
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return array[top : top + crop_h, left : left + crop_w]


def _parallel_map(function, items: list, num_pixels: int) -> list:
    """`map` in a thread pool when there is enough pixel work to share (PIL's decode and resize release the GIL)."""
    workers = min(len(items), os.cpu_count() or 1, 16)
    if workers < 2 or num_pixels < _THREADED_PIXELS:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))


def _num_pixels(image: PIL.Image.Image | np.ndarray) -> int:
    if isinstance(image, PIL.Image.Image):
        return image.width * image.height
    return int(image.size)


def _describe(image: PIL.Image.Image | np.ndarray) -> str:
    if isinstance(image, PIL.Image.Image):
        return f"PIL image of mode {image.mode} and size {image.width}x{image.height}"
    return f"array of shape {image.shape} and dtype {image.dtype}"


def _tensor_device(images: Any) -> torch.device | None:
    """The device of the input tensors when they all live on one accelerator, so the search can run there too."""
    tensors = images if isinstance(images, (list, tuple)) else [images]
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) == 1 and all(isinstance(t, torch.Tensor) for t in tensors):
        (device,) = devices
        return device if device.type != "cpu" else None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------


class ImageGPTImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    clusters (`np.ndarray`, `list[list[float]]` or `torch.Tensor` of shape `(num_colors, 3)`, *optional*):
        The color palette, values in [-1, 1] (the range pixels are normalized to). Defaults to `self.clusters`.
    do_color_quantize (`bool`, *optional*, defaults to `self.do_color_quantize`):
        Replace each pixel by the id of its nearest palette color and return `input_ids`; `False` returns the
        normalized `pixel_values` instead.
    do_random_crop (`bool`, *optional*, defaults to `self.do_random_crop`):
        Training augmentation: before resizing, crop a random region covering a fraction of the image's area drawn
        from `random_crop_scale`, with an aspect ratio drawn log-uniformly from `random_crop_ratio` (the recipe of
        torchvision's `RandomResizedCrop`). Draws from torch's global RNG, so `torch.manual_seed` makes it repeatable
        and DataLoader workers get different crops.
    random_crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.08, 1.0)`):
        Range of the fraction of the image's area a random crop covers.
    random_crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3 / 4, 4 / 3)`):
        Range of the aspect ratio (width / height) of a random crop.
    quantize_chunk_size (`int`, *optional*):
        Pixels per chunk of the nearest-color search, bounding its `(chunk, num_colors)` distance matrix. `None`
        picks a cache-friendly size on CPU and a large one on accelerators.
    """

    clusters: np.ndarray | list[list[float]] | torch.Tensor | None
    do_color_quantize: bool | None
    do_random_crop: bool | None
    random_crop_scale: tuple[float | int, float | int] | list[float | int] | None
    random_crop_ratio: tuple[float | int, float | int] | list[float | int] | None
    quantize_chunk_size: int | None


class ImageGPTImageProcessor(PilBackend):
    r"""
    Turns images into Image GPT's token ids: resize to `size` (n_px x n_px), scale pixels to [-1, 1], and replace
    each pixel by the id of its nearest palette color, giving `input_ids` of shape `(batch, n_px * n_px)` in raster
    order. `decode` maps ids back to images.

    It reads and writes the `preprocessor_config.json` of transformers' own ImageGPT processor (`clusters`, `size`,
    `resample`, `do_resize`, `do_normalize`, `do_color_quantize`, ...), so `openai/imagegpt-*` configs load unchanged
    and transformers' `ImageGPTImageProcessorPil` loads the folders this class writes. Its ids equal that processor's,
    pixel for pixel, on 8-bit RGB images (it uses the same PIL resize and the same distance arithmetic), many times
    faster: 8-bit pixels take their normalized values from a lookup table, and the nearest-color search
    (`color_quantize`) runs once per distinct color of the batch, in chunked torch products, over only the centers
    that can be nearest. The search runs on the input tensors' device or `device=` (on CPU, on one torch thread).

    What it adds, with defaults that keep the old behaviour:
    - any input: PIL images of any mode (L, P, RGBA, LA, CMYK, I;16, F, ...), numpy arrays and torch tensors, channels
      first or last, bool / integer / float dtypes, single images or batches. Gray images are replicated to RGB and
      alpha is composited onto white (`do_convert_rgb`, on by default: the palette is RGB); 16-bit images span their
      full range. Float images are in [0, 255] when `do_rescale=True` and in [0, 1] with `do_rescale=False`, as in
      transformers.
    - crops: `do_center_crop` + `crop_size` crop the center after resizing, as in transformers (with
      `size={"shortest_edge": n_px}` this keeps the aspect ratio: OpenAI's evaluation sets were center-cropped);
      `do_random_crop` (+ `random_crop_scale`, `random_crop_ratio`) crops a random region before resizing, for
      training.
    - clear errors: every input it cannot read raises a ValueError that names the problem.

    Args:
        clusters (`np.ndarray`, `list[list[float]]` or `torch.Tensor` of shape `(num_colors, 3)`, *optional*):
            The color palette in [-1, 1], e.g. OpenAI's `kmeans_centers.npy` or one from
            `image_gpt_hf.palette.fit_palette`.
        **kwargs: any of the processor's options (`size`, `resample`, `do_color_quantize`, `do_random_crop`, ...).
    """

    model_input_names = ["input_ids"]
    valid_kwargs = ImageGPTImageProcessorKwargs
    # transformers' ImageGPT defaults.
    resample = PILImageResampling.BILINEAR
    do_color_quantize = True
    clusters = None
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_rescale = True
    do_normalize = True
    size = {"height": 256, "width": 256}
    do_resize = True
    # Added; a palette is RGB, so images are converted (transformers' processor fails on gray or RGBA inputs instead).
    do_convert_rgb = True
    # Added; None means off / the documented default.
    do_random_crop = None
    random_crop_scale = None
    random_crop_ratio = None
    quantize_chunk_size = None

    def __init__(
        self,
        clusters: np.ndarray | list[list[float]] | torch.Tensor | None = None,
        **kwargs: Unpack[ImageGPTImageProcessorKwargs],
    ) -> None:
        if clusters is not None:
            clusters = _validate_palette(clusters)
        super().__init__(clusters=clusters, **kwargs)

    # -- encoding -----------------------------------------------------------------------------------------------------

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One raw image as a channels-first RGB array (uint8 for 8-bit images, float otherwise), unresized."""
        images = _flatten_images(image)
        if len(images) != 1:
            raise ValueError(f"`process_image` takes one image, got {len(images)}.")
        reading = self._reading(
            self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb,
            kwargs.get("do_rescale", self.do_rescale),
            kwargs.get("rescale_factor", self.rescale_factor),
            check_range=True,
        )
        layout = _channel_layouts(images, input_data_format)[0]
        array = _prepare_image(images[0], layout, reading, _NO_GEOMETRY)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        return np.moveaxis(array, -1, 0)

    def _preprocess_image_like_inputs(self, images: Any, *args, **kwargs) -> BatchFeature:
        """Reads the images with this processor's own reader (any mode, dtype or layout) and processes them."""
        if kwargs.get("device") is None:
            kwargs["device"] = _tensor_device(images)
        images = _flatten_images(images)
        if not images:
            raise ValueError("Got an empty batch: no images to process.")
        return self._preprocess(images, *args, **kwargs)

    def _preprocess(
        self,
        images: list[PIL.Image.Image | np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: str | TensorType | None,
        do_color_quantize: bool | None = None,
        clusters: np.ndarray | list[list[float]] | torch.Tensor | None = None,
        do_convert_rgb: bool | None = None,
        do_center_crop: bool | None = None,
        crop_size: SizeDict | None = None,
        do_random_crop: bool | None = None,
        random_crop_scale: tuple[float, float] | None = None,
        random_crop_ratio: tuple[float, float] | None = None,
        quantize_chunk_size: int | None = None,
        do_pad: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        data_format: str | ChannelDimension | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> BatchFeature:
        if do_pad:
            raise ValueError("`do_pad=True` is not supported: Image GPT needs every image at the same n_px x n_px.")
        palette = None
        if do_color_quantize:
            if clusters is None:
                raise ValueError(
                    "Color quantization needs a palette: pass `clusters` (a (num_colors, 3) array in [-1, 1]) to the "
                    "processor or to this call, or set `do_color_quantize=False` to get `pixel_values`."
                )
            palette = _validate_palette(clusters)
        reading = self._reading(do_convert_rgb, do_rescale, rescale_factor, check_range=do_rescale or do_normalize)
        geometry = _resolve_geometry(
            do_resize, size, resample, do_center_crop, crop_size, do_random_crop, random_crop_scale, random_crop_ratio
        )
        layouts = _channel_layouts(images, input_data_format)
        crop_boxes = [None] * len(images)
        if geometry.do_random_crop:
            sizes = [_image_size(image, layout) for image, layout in zip(images, layouts)]
            crop_boxes = [_crop_box(height, width, geometry) if height and width else None for height, width in sizes]

        def prepare(index: int) -> np.ndarray:
            return _prepare_image(images[index], layouts[index], reading, geometry, crop_boxes[index])

        num_pixels = sum(_num_pixels(image) for image in images)
        arrays = _parallel_map(prepare, list(range(len(images))), num_pixels)

        shapes = {array.shape[:2] for array in arrays}
        if return_tensors is not None and len(shapes) > 1:
            raise ValueError(
                f"The processed images have different sizes {sorted(shapes)}, which cannot be stacked into tensors. "
                "Resize to a fixed `size={'height': n_px, 'width': n_px}`, center-crop with `crop_size`, or pass "
                "`return_tensors=None` to get a list."
            )
        if device is None:
            device = "cpu"
        device = torch.device(device)

        # Images of one size and kind are processed together: 8-bit ones by lookup table, float ones by arithmetic.
        groups: dict[tuple, list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault((array.shape[:2], array.dtype == np.uint8), []).append(index)
        results: list[Any] = [None] * len(arrays)
        tables = None
        for (_, is_uint8), indices in groups.items():
            batch = np.stack([arrays[i] for i in indices])
            if batch.shape[-1] == 1:
                batch = np.repeat(batch, 3, axis=-1)
            if is_uint8:
                if tables is None:
                    tables = _level_tables(do_rescale, rescale_factor, do_normalize, image_mean, image_std)
                if do_color_quantize:
                    out = _quantize_uint8(batch, tables, palette, device, quantize_chunk_size)
                else:
                    out = np.stack([tables[c][batch[..., c]] for c in range(3)], axis=-1)
            else:
                values = _normalize_floats(batch, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
                if do_color_quantize:
                    flat = torch.from_numpy(np.ascontiguousarray(values.reshape(-1, 3))).to(device)
                    out = color_quantize(flat, palette, quantize_chunk_size).reshape(len(indices), -1)
                else:
                    out = values
            for position, index in enumerate(indices):
                results[index] = out[position]

        if do_color_quantize:
            key = "input_ids"
            results = [r if isinstance(r, torch.Tensor) else torch.from_numpy(r) for r in results]
        else:
            key = "pixel_values"
            channels_last = data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST
            results = [
                torch.from_numpy(np.ascontiguousarray(r if channels_last else np.moveaxis(r, -1, 0))).to(device)
                for r in results
            ]
        if return_tensors is None:
            return BatchFeature(data={key: [r.cpu().numpy() for r in results]})
        stacked = torch.stack(results)
        if TensorType(return_tensors) == TensorType.PYTORCH:
            return BatchFeature(data={key: stacked})
        return BatchFeature(data={key: stacked.cpu().numpy()}, tensor_type=return_tensors)

    def _reading(
        self, do_convert_rgb: bool | None, do_rescale: bool, rescale_factor: float, check_range: bool
    ) -> _Reading:
        return _Reading(
            do_convert_rgb=True if do_convert_rgb is None else bool(do_convert_rgb),
            do_rescale=bool(do_rescale),
            rescale_factor=float(rescale_factor) if rescale_factor is not None else 1 / 255,
            check_range=bool(check_range),
        )

    # -- decoding -----------------------------------------------------------------------------------------------------

    def decode(
        self,
        input_ids: torch.Tensor | np.ndarray | list[int] | list[list[int]],
        output_type: Literal["pil", "np"] = "pil",
        clusters: np.ndarray | list[list[float]] | torch.Tensor | None = None,
        size: int | tuple[int, int] | dict[str, int] | None = None,
    ) -> PIL.Image.Image | list[PIL.Image.Image] | np.ndarray:
        """Images from token ids: samples from `generate()` (drop the SOS token first) or completions.

        Args:
            input_ids: one sequence `(n_px * n_px,)` or a batch `(batch, n_px * n_px)` of palette ids.
            output_type: `"pil"` gives a PIL image (a list of them for a batch); `"np"` a uint8 array `(H, W, 3)`
                (`(batch, H, W, 3)` for a batch).
            clusters: the palette, defaults to the processor's.
            size: `(height, width)` of the images; defaults to the processor's `size` (or `crop_size`) when it has
                as many pixels as the sequences, else to the square of side `sqrt(len)`.

        Each id becomes its palette color mapped back through the normalization (`127.5 * (c + 1)` by default),
        rounded to 8 bits; where rounding would make the color re-encode to another id, a neighbouring 8-bit color
        that re-encodes to the same id is used instead, so decoding then encoding gives the same ids back whenever
        any 8-bit color can.
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"`output_type` must be 'pil' or 'np', got {output_type!r}.")
        palette = self.clusters if clusters is None else _validate_palette(clusters)
        if palette is None:
            raise ValueError("Decoding needs a palette: pass `clusters` or set it on the processor.")
        ids = _as_id_array(input_ids)
        single = ids.ndim == 1
        ids = ids[None] if single else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"`input_ids` must have shape (sequence_length,) or (batch, sequence_length), got {ids.shape}."
            )
        if ids.size and (ids.min() < 0 or ids.max() >= len(palette)):
            bad = ids[(ids < 0) | (ids >= len(palette))]
            raise ValueError(
                f"Token ids must be palette ids in [0, {len(palette)}), got {sorted(set(bad.tolist()))[:5]}. "
                f"Sequences from `generate()` start with the SOS token (id {len(palette)}): drop it first, "
                "e.g. `output[:, 1:]`."
            )
        height, width = self._decode_size(ids.shape[1], size)
        colors = self._palette_colors(palette)
        images = colors[ids].reshape(len(ids), height, width, 3)
        if output_type == "np":
            return images[0] if single else images
        pil_images = [PIL.Image.fromarray(image) for image in images]
        return pil_images[0] if single else pil_images

    def batch_decode(
        self,
        input_ids: torch.Tensor | np.ndarray | list[list[int]],
        output_type: Literal["pil", "np"] = "pil",
        **kwargs,
    ) -> list[PIL.Image.Image] | np.ndarray:
        """`decode` for a batch `(batch, n_px * n_px)`: a list of PIL images or a `(batch, H, W, 3)` uint8 array."""
        ids = _as_id_array(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"`batch_decode` takes a (batch, sequence_length) batch of ids, got shape {ids.shape}.")
        return self.decode(ids, output_type=output_type, **kwargs)

    def _decode_size(self, length: int, size: Any) -> tuple[int, int]:
        if size is not None:
            if isinstance(size, int):
                height, width = size, size
            elif isinstance(size, dict):
                height, width = size["height"], size["width"]
            else:
                height, width = size
            if height * width != length:
                raise ValueError(f"`size` {height}x{width} does not hold sequences of {length} ids.")
            return height, width
        for candidate in (self.crop_size if self.do_center_crop else None, self.size):
            height, width = (candidate.get("height"), candidate.get("width")) if candidate is not None else (0, 0)
            if height and width and height * width == length:
                return height, width
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(
                f"Cannot tell the image size of sequences of {length} ids (not a square and not the processor's "
                "size); pass `size=(height, width)`."
            )
        return side, side

    def _palette_colors(self, palette: np.ndarray) -> np.ndarray:
        """`(K, 3)` uint8: the 8-bit color each id decodes to (cached per palette and normalization)."""
        key = (
            palette.tobytes(),
            bool(self.do_rescale),
            float(self.rescale_factor),
            bool(self.do_normalize),
            tuple(_channel_values(self.image_mean, "image_mean").tolist()) if self.do_normalize else None,
            tuple(_channel_values(self.image_std, "image_std").tolist()) if self.do_normalize else None,
        )
        cached = getattr(self, "_decode_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        values = palette.copy()
        if self.do_normalize:
            values = values * _channel_values(self.image_std, "image_std") + _channel_values(
                self.image_mean, "image_mean"
            )
        if self.do_rescale:
            values = values / self.rescale_factor
        colors = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        tables = _level_tables(
            self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )

        def encode(rgb: np.ndarray) -> np.ndarray:
            pixels = np.stack([tables[c][rgb[:, c]] for c in range(3)], axis=-1)
            return color_quantize(torch.from_numpy(pixels), palette).numpy()

        wrong = np.flatnonzero(encode(colors) != np.arange(len(palette)))
        if len(wrong):
            # Try the 26 neighbours of the rounded color, nearest to the exact value first.
            offsets = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
            candidates = np.clip(colors[wrong][:, None, :].astype(np.int64) + offsets[None], 0, 255)  # (W, 27, 3)
            error = np.abs(candidates - values[wrong][:, None, :]).sum(-1)
            order = np.argsort(error, axis=1, kind="stable")
            candidates = np.take_along_axis(candidates, order[..., None], axis=1).astype(np.uint8)
            hits = encode(candidates.reshape(-1, 3)).reshape(len(wrong), -1) == wrong[:, None]
            for row, target in enumerate(wrong):
                if hits[row].any():
                    colors[target] = candidates[row, np.argmax(hits[row])]
        self._decode_cache = (key, colors)
        return colors

    # -- serialization ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` content: transformers' ImageGPT fields (palette as a list of lists)."""
        output = super().to_dict()
        for key in [key for key in output if key.startswith("_")]:
            del output[key]
        if output.get("clusters") is not None:
            output["clusters"] = np.asarray(output["clusters"]).tolist()
        for key in ("random_crop_scale", "random_crop_ratio"):
            if isinstance(output.get(key), tuple):
                output[key] = list(output[key])
        return output


_NO_GEOMETRY = _Geometry(
    do_resize=False,
    size=None,
    longest_edge=None,
    resample=PIL.Image.Resampling.BILINEAR,
    do_center_crop=False,
    crop_size=None,
    do_random_crop=False,
    random_crop_scale=(0.08, 1.0),
    random_crop_ratio=(3 / 4, 4 / 3),
)


def _resolve_geometry(
    do_resize: bool,
    size: SizeDict | None,
    resample: PILImageResampling | int | None,
    do_center_crop: bool | None,
    crop_size: SizeDict | None,
    do_random_crop: bool | None,
    random_crop_scale: Any,
    random_crop_ratio: Any,
) -> _Geometry:
    """Checks the geometric options once per call and packs them for the per-image work."""
    target: tuple[int, int] | int | None = None
    longest_edge = None
    if do_resize:
        if size is not None and size.height and size.width:
            target = (int(size.height), int(size.width))
        elif size is not None and size.shortest_edge:
            target, longest_edge = int(size.shortest_edge), size.longest_edge
        else:
            raise ValueError(
                f"`size` must be {{'height': h, 'width': w}} or {{'shortest_edge': s}} (optionally with "
                f"'longest_edge'), got {dict(size) if size is not None else None}."
            )
        if (isinstance(target, tuple) and min(target) < 1) or (isinstance(target, int) and target < 1):
            raise ValueError(f"`size` must be positive, got {dict(size)}.")
    crop = None
    if do_center_crop:
        if crop_size is None or not (crop_size.height and crop_size.width):
            raise ValueError(f"`crop_size` must be {{'height': h, 'width': w}}, got {crop_size}.")
        crop = (int(crop_size.height), int(crop_size.width))
    scale = tuple(float(v) for v in (random_crop_scale if random_crop_scale is not None else (0.08, 1.0)))
    ratio = tuple(float(v) for v in (random_crop_ratio if random_crop_ratio is not None else (3 / 4, 4 / 3)))
    if do_random_crop:
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"`random_crop_scale` must be (min, max) with 0 < min <= max <= 1, got {scale}.")
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"`random_crop_ratio` must be (min, max) with 0 < min <= max, got {ratio}.")
    return _Geometry(
        do_resize=bool(do_resize),
        size=target,
        longest_edge=int(longest_edge) if longest_edge else None,
        resample=PIL.Image.Resampling(int(resample if resample is not None else PILImageResampling.BILINEAR)),
        do_center_crop=bool(do_center_crop),
        crop_size=crop,
        do_random_crop=bool(do_random_crop),
        random_crop_scale=scale,
        random_crop_ratio=ratio,
    )


def _quantize_uint8(
    batch: np.ndarray,
    tables: np.ndarray,
    palette: np.ndarray,
    device: torch.device,
    chunk_size: int | None,
) -> torch.Tensor:
    """Palette ids of a `(B, H, W, 3)` uint8 batch: one nearest-color search per distinct color of the batch.

    Photos at n_px x n_px repeat colors, and 8-bit colors are only 2**24, so searching the distinct colors is exact
    and does far less work than searching every pixel.
    """
    codes = torch.from_numpy(batch.reshape(-1, 3).astype(np.int32))
    codes = (codes[:, 0] << 16) | (codes[:, 1] << 8) | codes[:, 2]
    distinct, inverse = torch.unique(codes, return_inverse=True)
    rgb = torch.stack([(distinct >> 16) & 255, (distinct >> 8) & 255, distinct & 255], dim=1).numpy()
    pixels = np.stack([tables[c][rgb[:, c]] for c in range(3)], axis=-1)
    ids = color_quantize(torch.from_numpy(pixels).to(device), palette, chunk_size)
    return ids[inverse.to(ids.device)].reshape(batch.shape[0], -1)


def _as_id_array(input_ids: Any) -> np.ndarray:
    """Token ids as an int64 numpy array, or a ValueError if they are not integers."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    try:
        ids = np.asarray(input_ids)
    except ValueError as err:
        raise ValueError(f"`input_ids` must be a rectangular array of integer ids: {err}") from None
    if ids.dtype.kind not in "iu":
        if ids.size == 0:
            return ids.astype(np.int64)
        raise ValueError(f"`input_ids` must be integer palette ids, got dtype {ids.dtype}.")
    return ids.astype(np.int64)


class ImageGPTImageProcessorPil(ImageGPTImageProcessor):
    """`ImageGPTImageProcessor` under the name transformers gives its PIL-backend processors.

    Registered as this package's "pil" backend so that `AutoImageProcessor` resolves to this package with either
    backend in every transformers 5.x: before 5.23 it looks a saved `image_processor_type` up by class name
    ("ImageGPTImageProcessor" for "torchvision", "ImageGPTImageProcessorPil" for "pil", the default without
    torchvision) before it looks at registered classes. It saves the same `preprocessor_config.json`.
    """


# `save_pretrained` copies this file next to preprocessor_config.json and names it in `auto_map` (remote code).
ImageGPTImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["ImageGPTImageProcessor", "ImageGPTImageProcessorPil", "color_quantize"]
