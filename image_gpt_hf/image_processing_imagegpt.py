"""Image processor for Image GPT: images <-> sequences of palette ids.

iGPT never sees RGB. An image is resized to `n_px x n_px`, its pixels are scaled to [-1, 1] (x / 127.5 - 1) and each
pixel is replaced by the id of the nearest color of a palette (OpenAI's is 512 k-means centers). The processor is the
model's tokenizer; `decode` turns ids (samples, completions) back into images.

This file and `palette_search.py` are shipped as remote code by `save_pretrained`: they import only numpy, PIL, torch,
transformers and the standard library.
"""

from __future__ import annotations

import io
import math
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import (
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    get_image_size_for_max_height_width,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

from .palette_search import color_quantize
from .transformers_compat import NO_VIDEO_PROCESSOR

logger = logging.get_logger(__name__)

# From this many input pixels in a call, images are cropped and resized in a thread pool (PIL releases the GIL).
THREADED_PIXELS = 1 << 20

# ---------------------------------------------------------------------------------------------------------------------
# Reading images: one reader for files, PIL images, arrays and tensors
# ---------------------------------------------------------------------------------------------------------------------


def load_image_file(source: str | os.PathLike, timeout: float | None = None) -> PIL.Image.Image:
    """The image in a file, at an http(s) URL or in a `data:` URL, decoded as stored (mode and EXIF kept).

    The processor reads what this returns exactly as it reads a PIL image the user opened, so a file gives the same
    ids whether it is passed as a path or as `PIL.Image.open(path)`. `timeout` (seconds) bounds a URL's download.
    """
    source = os.fspath(source)
    if source.startswith(("http://", "https://", "data:")):
        with urllib.request.urlopen(source, timeout=timeout) as response:
            stream = io.BytesIO(response.read())
    elif os.path.isfile(source):
        stream = source
    else:
        raise FileNotFoundError(f"No image file at {source!r}.")
    try:
        with PIL.Image.open(stream) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises for unknown, broken or truncated files
        raise ValueError(f"Could not read an image from {source[:200]!r}: {err}") from None
    return image


def _flatten_images(images: Any, depth: int = 0) -> list:
    """A flat list of single images (PIL images, paths, 2-D or 3-D arrays); 4-D arrays and tensors are batches."""
    single = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, PIL.Image.Image, dict)
    if not isinstance(images, single) and hasattr(images, "__iter__") and hasattr(images, "__len__"):
        images = list(images)  # a list, tuple or another sized iterable such as a `datasets` Column
        if depth > 1:
            raise ValueError("Images can be nested at most two lists deep (a batch of lists of images).")
        return [image for item in images for image in _flatten_images(item, depth + 1)]
    if isinstance(images, (PIL.Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
        try:
            images = images.numpy()
        except TypeError as err:
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


def _layout(value: str | ChannelDimension, name: str) -> ChannelDimension:
    if value not in (ChannelDimension.FIRST, ChannelDimension.LAST, "channels_first", "channels_last"):
        raise ValueError(f"`{name}` must be 'channels_first' or 'channels_last', got {value!r}.")
    return ChannelDimension(value)


def _channel_layouts(images: list, input_data_format: str | ChannelDimension | None) -> list:
    """Channels first or last for each 3-D array (None for PIL images and 2-D arrays).

    Like transformers, the channel axis is inferred from 1, 3 or 4 channels (gray + alpha arrays need
    `input_data_format`). An array whose first and last axes could both hold channels, e.g. (3, 4, 3), takes the layout
    of the unambiguous arrays of its batch; if there are none, or they disagree, a ValueError asks for
    `input_data_format` instead of guessing.
    """
    arrays = [i for i, image in enumerate(images) if isinstance(image, np.ndarray) and image.ndim == 3]
    layouts: list = [None] * len(images)
    if input_data_format is not None:
        layout = _layout(input_data_format, "input_data_format")
        for i in arrays:
            layouts[i] = layout
        return layouts
    ambiguous = []
    for i in arrays:
        first, last = images[i].shape[0] in (1, 3, 4), images[i].shape[-1] in (1, 3, 4)
        if first and last:
            ambiguous.append(i)
        elif first or last:
            layouts[i] = ChannelDimension.FIRST if first else ChannelDimension.LAST
        else:
            raise ValueError(
                f"Cannot infer the channel axis of an image of shape {images[i].shape}: an image has 1, 3 or 4 "
                "channels, first (C, H, W) or last (H, W, C); pass `input_data_format` for 2 (gray + alpha). A batch "
                "of gray images is a list of (H, W) arrays or an (N, H, W, 1) array."
            )
    if ambiguous:
        known = {layout for layout in layouts if layout is not None}
        if len(known) != 1:
            reason = "the batch mixes channel layouts" if known else "nothing in the batch says which"
            raise ValueError(
                f"Cannot infer the channel axis of an image of shape {images[ambiguous[0]].shape} (channels first or "
                f"last; {reason}). Pass `input_data_format='channels_first'` or `'channels_last'`."
            )
        (layout,) = known
        for i in ambiguous:
            layouts[i] = layout
    return layouts


def _white(do_rescale: bool, rescale_factor: float) -> float:
    """Full intensity in the units float images are read in: 1 / rescale_factor with `do_rescale`, else 1."""
    if not do_rescale:
        return 1.0
    return 255.0 if rescale_factor == 1 / 255 else 1.0 / rescale_factor


def _pixel_levels(image: np.ndarray, white: float, check_range: bool) -> np.ndarray:
    """An array's pixel values as uint8 levels, or as floats in the processor's units (`white` is full intensity).

    Integer images are 8-bit levels as in transformers (values in [0, 255]), except uint16, which spans its whole range
    (65535 is white, as for PIL's 16-bit modes); bool images are black and white. Float images are in the units
    `do_rescale` expects: [0, 1 / rescale_factor] with it, [0, 1] without.
    """
    kind = image.dtype.kind
    if kind == "b":
        return image.astype(np.uint8) * np.uint8(255)
    if image.dtype == np.uint8:
        return image
    if kind == "u" and image.dtype.itemsize == 2:
        return _exact_levels(image.astype(np.float32) / np.float32(65535 / white), white)
    if kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer pixel values must lie in [0, 255] (uint16: [0, 65535]), got values in [{low}, {high}] for "
                f"an image of dtype {image.dtype}."
            )
        return image.astype(np.uint8)
    if kind != "f":
        raise ValueError(f"Unsupported pixel dtype {image.dtype}: expected bool, integers or floats.")
    image = image if image.dtype in (np.float32, np.float64) else image.astype(np.float32)
    if not np.isfinite(image).all():
        raise ValueError("The image has non-finite pixel values (NaN or inf).")
    if check_range:
        low, high = float(image.min()), float(image.max())
        if low < -1e-3 * white or high > white * (1 + 1e-3):
            raise ValueError(
                f"Float pixel values must lie in [0, {white:g}] (the units of `do_rescale` and `rescale_factor`: "
                f"[0, 1 / rescale_factor] with do_rescale=True, [0, 1] without), got values in [{low:g}, {high:g}]."
            )
        if white > 1.0 and high <= 1.0 and not ((image == 0.0) | (image == 1.0)).all():
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images (all pixel values are in [0, 1]). "
                "If the input images have pixel values between 0 and 1, set `do_rescale=False` to avoid rescaling "
                "them again."
            )
    return _exact_levels(image, white)


def _exact_levels(image: np.ndarray, white: float) -> np.ndarray:
    """Float pixels that are 8-bit levels as uint8: they take the 8-bit path (PIL's 8-bit resize, as transformers
    resizes integer-valued floats), so every representation of an 8-bit image gives its ids."""
    if white == 255.0 and np.array_equal(image, np.rint(image)):
        return image.astype(np.uint8)
    return image


def _composite_on_white(image: np.ndarray, white: float) -> np.ndarray:
    """Drops the alpha channel (last axis) by compositing onto white, as transformers' `convert_to_rgb` does."""
    color, alpha = image[..., :-1], image[..., -1:].astype(np.float64) / white
    blended = alpha * color + (1.0 - alpha) * white
    return np.round(blended).astype(np.uint8) if image.dtype == np.uint8 else blended.astype(image.dtype)


def _read_image(
    image: PIL.Image.Image | np.ndarray,
    layout: ChannelDimension | None,
    do_convert_rgb: bool,
    white: float,
    check_range: bool = True,
) -> PIL.Image.Image | np.ndarray:
    """One image as the processor works on it: a PIL image in mode "RGB" or "L" (8-bit pixels) or an `(H, W, 1 or 3)`
    float array (other pixels, in the units of `white`).

    PIL images are turned upright by their EXIF orientation, as transformers' `load_image` does; transparency (an alpha
    band or a palette's transparent color) is composited onto white; 16-bit, 32-bit and float modes keep their values
    (PIL's own conversion to 8 bits would clip them at 255).
    """
    if (image.width * image.height if isinstance(image, PIL.Image.Image) else image.size) == 0:
        raise ValueError(f"Got an empty image (no pixels): {_describe(image)}.")
    if isinstance(image, PIL.Image.Image):
        try:
            if image.getexif().get(PIL.ExifTags.Base.Orientation, 1) != 1:
                image = PIL.ImageOps.exif_transpose(image)
            mode = image.mode
            if mode == "RGB" or (mode == "L" and do_convert_rgb):
                return image
            if not do_convert_rgb:
                raise ValueError(
                    f"Got a PIL image in mode {mode!r} with `do_convert_rgb=False`; the palette is RGB. Convert the "
                    "image or pass `do_convert_rgb=True`."
                )
            if mode.startswith("I") or mode == "F":
                image, layout = np.asarray(image), None
            elif "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
                background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
                return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
            else:
                return image.convert("RGB")
        except OSError as err:  # a truncated or unreadable file behind a lazily loaded PIL image
            raise ValueError(f"Could not read the PIL image: {err}") from None
    array = _pixel_levels(image, white, check_range)
    if array.ndim == 2:
        array = array[..., None]
    elif layout == ChannelDimension.FIRST:
        array = np.moveaxis(array, 0, -1)
    channels = array.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"An image has 1, 2, 3 or 4 channels, got {channels} (shape {array.shape}).")
    if channels != 3 and not do_convert_rgb:
        raise ValueError(
            f"Got an image with {channels} channel(s) and `do_convert_rgb=False`; the palette is RGB. Pass "
            "`do_convert_rgb=True` to convert gray and alpha images."
        )
    if channels in (2, 4):
        array = _composite_on_white(array, white)
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array))
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _describe(image: PIL.Image.Image | np.ndarray) -> str:
    if isinstance(image, PIL.Image.Image):
        return f"PIL image of mode {image.mode} and size {image.width}x{image.height}"
    return f"array of shape {image.shape} and dtype {image.dtype}"


def _image_size(image: PIL.Image.Image | np.ndarray) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, PIL.Image.Image) else image.shape[:2]


def _resize_target(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """(height, width) after resizing to `size`, computed as transformers' resize computes it."""
    if any(value is not None and value < 1 for value in dict(size).values()):
        raise ValueError(f"`size` must be positive, got {dict(size)}.")
    if size.shortest_edge:
        target = get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    elif size.max_height and size.max_width:
        target = get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    elif size.height and size.width:
        target = (size.height, size.width)
    else:
        raise ValueError(
            "`size` must be {'height': h, 'width': w}, {'shortest_edge': s} (optionally with 'longest_edge') or "
            f"{{'max_height': h, 'max_width': w}}, got {dict(size)}."
        )
    return max(int(target[0]), 1), max(int(target[1]), 1)


def _random_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, by torchvision's RandomResizedCrop recipe, from torch's global RNG:
    an area fraction drawn from `scale` and a log-uniform aspect ratio from `ratio` (ten tries, then the largest
    central crop within `ratio`)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = height * width * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        crop_w, crop_h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,)).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,)).item())
            return top, left, crop_h, crop_w
    if width / height < ratio[0]:
        crop_h, crop_w = min(height, max(1, int(round(width / ratio[0])))), width
    elif width / height > ratio[1]:
        crop_h, crop_w = height, min(width, max(1, int(round(height * ratio[1]))))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _resize_and_crop(
    image: PIL.Image.Image | np.ndarray,
    box: tuple[int, int, int, int] | None,
    size: SizeDict | None,
    resample: PIL.Image.Resampling,
    crop_size: SizeDict | None,
) -> np.ndarray:
    """Random crop (`box`), resize to `size`, center crop to `crop_size`: an `(h, w, 3)` uint8 or float array.

    8-bit images are resized by PIL in their own mode, the very operation transformers' resize performs (so the pixels
    are bit-identical); float images channel by channel in PIL's float mode, without rounding to 8 bits.
    """
    if box is not None:
        top, left, height, width = box
        if isinstance(image, PIL.Image.Image):
            image = image.crop((left, top, left + width, top + height))
        else:
            image = image[top : top + height, left : left + width]
    if size is not None:
        height, width = _image_size(image)
        new_height, new_width = _resize_target(height, width, size)
        if isinstance(image, PIL.Image.Image):
            image = image.resize((new_width, new_height), resample=resample)
        elif (new_height, new_width) != (height, width):
            channels = [
                PIL.Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)) for c in range(image.shape[-1])
            ]
            image = np.stack([np.asarray(c.resize((new_width, new_height), resample)) for c in channels], axis=-1)
    array = np.asarray(image)
    array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array
    if crop_size is not None:
        height, width = array.shape[:2]
        if crop_size.height > height or crop_size.width > width:
            raise ValueError(
                f"`crop_size` ({crop_size.height}x{crop_size.width}) is larger than the resized image "
                f"({height}x{width}); make `size` at least as large as `crop_size`."
            )
        top, left = (height - crop_size.height) // 2, (width - crop_size.width) // 2
        array = array[top : top + crop_size.height, left : left + crop_size.width]
    return array


def validate_palette(clusters: Any) -> np.ndarray:
    """The palette as a `(K, 3)` float64 array in [-1, 1], or a ValueError that says what is wrong with it."""
    try:
        if isinstance(clusters, torch.Tensor):
            clusters = clusters.detach().cpu().numpy()
        raw = np.asarray(clusters)
        kind = raw.dtype.kind
        palette = raw.astype(np.float64) if kind in "fiu" else None
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"The palette (`clusters`) must be a (num_colors, 3) array of numbers in [-1, 1]; could not read it: {err}"
        ) from None
    if kind == "c":
        raise ValueError(
            "The palette (`clusters`) holds complex numbers; expected real RGB colors in [-1, 1]. Dropping the "
            "imaginary part would be a guess: convert the array to real values yourself if that is right."
        )
    if palette is None:
        raise ValueError(f"The palette (`clusters`) holds {raw.dtype} values; expected real RGB colors in [-1, 1].")
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] == 0:
        raise ValueError(
            f"The palette (`clusters`) must have shape (num_colors, 3) with num_colors >= 1, got shape {palette.shape}."
        )
    if not np.isfinite(palette).all():
        bad = np.flatnonzero(~np.isfinite(palette).all(axis=1))
        raise ValueError(f"The palette (`clusters`) has non-finite values (NaN or inf) in rows {bad[:10].tolist()}.")
    if palette.min() < -1.0 or palette.max() > 1.0:
        raise ValueError(
            "The palette (`clusters`) must lie in [-1, 1], the range pixels are scaled to (x / 127.5 - 1) before the "
            f"nearest color is found; got values in [{palette.min():g}, {palette.max():g}]."
        )
    return palette


def check_palette_fits(processor: Any, config: Any, source: str = "The processor") -> None:
    """The one rule that a processor and a model belong together: the processor's palette has the colors the model
    predicts (vocab_size minus SOS, for this package's config and transformers' own), or its ids and decoded images
    mean something else. A processor without a palette (None, or no `clusters`) has nothing to check."""
    clusters, palette_size = getattr(processor, "clusters", None), config.vocab_size - 1
    if clusters is not None and len(clusters) != palette_size:
        raise ValueError(
            f"{source}'s palette has {len(clusters)} colors but the model predicts {palette_size} "
            f"(vocab_size {config.vocab_size} = palette + SOS): they do not belong to the same checkpoint; use the "
            "processor saved with the model (`ImageGPTImageProcessor.from_pretrained(model_path)`)."
        )


def _as_id_array(input_ids: Any) -> np.ndarray:
    """Token ids as an int64 numpy array, or a ValueError if they are not integers."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    try:
        ids = np.asarray(input_ids)
    except ValueError as err:
        raise ValueError(f"`input_ids` must be a rectangular array of integer ids: {err}") from None
    if ids.dtype.kind not in "iu" and ids.size:
        raise ValueError(f"`input_ids` must be integer palette ids, got dtype {ids.dtype}.")
    return ids.astype(np.int64)


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
    Turns images into Image GPT's token ids: resize to `size` (n_px x n_px), scale pixels to [-1, 1], and replace each
    pixel by the id of its nearest palette color, giving `input_ids` of shape `(batch, n_px * n_px)` in raster order.
    `decode` maps ids back to images.

    It reads and writes the `preprocessor_config.json` of transformers' own ImageGPT processor (`clusters`, `size`,
    `resample`, `do_resize`, `do_normalize`, `do_color_quantize`, ...), so `openai/imagegpt-*` configs load unchanged
    and transformers' `ImageGPTImageProcessorPil` loads the folders this class writes. On 8-bit RGB images its ids are
    that processor's, pixel for pixel: the same PIL resize, transformers' own `rescale` and `normalize`, and a
    nearest-color search (`palette_search.color_quantize`) that reproduces transformers' arithmetic, ties included.
    It is many times faster: the search runs once per distinct color of the batch, in chunked torch products, over
    only the centers that can be nearest, on the input tensors' device or `device=`.

    What it adds, with defaults that keep transformers' behaviour:
    - one reader for every input: paths and URLs (opened as stored, then read like a PIL image), PIL images of any
      mode (L, P, RGBA, LA, CMYK, I;16, F, ...), numpy arrays and torch tensors (channels first or last; bool,
      integer or float), single images, lists and batches. PIL images are turned upright by their EXIF orientation
      (as transformers' `load_image` does); gray images are replicated to RGB and transparency is composited onto
      white (`do_convert_rgb`, on by default: the palette is RGB); 16-bit images span their full range (65535 is
      white). Float images are in [0, 255] with `do_rescale=True` and in [0, 1] with `do_rescale=False`.
    - crops: `do_center_crop` + `crop_size` crop the center after resizing (with `size={"shortest_edge": n_px}` this
      keeps the aspect ratio, as OpenAI's evaluation sets were center-cropped); `do_random_crop` (+
      `random_crop_scale`, `random_crop_ratio`) crops a random region before resizing, for training.
    - clear errors: an input it cannot read raises a ValueError that names the problem (FileNotFoundError for a
      path that does not exist).

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
    # Added: a palette is RGB, so images are converted (transformers' processor fails on gray or RGBA arrays).
    do_convert_rgb = True
    do_random_crop = None
    random_crop_scale = None
    random_crop_ratio = None
    quantize_chunk_size = None

    def __init__(
        self,
        clusters: np.ndarray | list[list[float]] | torch.Tensor | None = None,
        **kwargs: Unpack[ImageGPTImageProcessorKwargs],
    ) -> None:
        super().__init__(clusters=None if clusters is None else validate_palette(clusters), **kwargs)

    # -- reading ------------------------------------------------------------------------------------------------------

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Opens paths and URLs with `load_image_file` (as stored: they are then read exactly like PIL images); other
        inputs pass through. Lists are opened item by item."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image_file(image_url_or_urls)
        return image_url_or_urls

    def process_image(
        self, image: Any, do_convert_rgb: bool | None = None, input_data_format: str | None = None, **kwargs
    ) -> np.ndarray:
        """One image as this processor reads it: a channels-first RGB array (uint8 for 8-bit images, else float)."""
        images = _flatten_images(self.fetch_images(image))
        if len(images) != 1:
            raise ValueError(f"`process_image` takes one image, got {len(images)}.")
        white = _white(kwargs.get("do_rescale", self.do_rescale), kwargs.get("rescale_factor", self.rescale_factor))
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        layout = _channel_layouts(images, input_data_format)[0]
        array = np.asarray(_read_image(images[0], layout, do_convert_rgb, white))
        return np.moveaxis(np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array, -1, 0)

    def _preprocess_image_like_inputs(self, images: Any, *args, **kwargs) -> BatchFeature:
        """Reads the images with this processor's one reader (any source, mode, dtype or layout), then processes them."""
        if kwargs.get("device") is None:  # tensors that all live on one device: the search runs there too
            tensors = images if isinstance(images, (list, tuple)) else [images]
            devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
            if len(devices) == 1 and all(isinstance(t, torch.Tensor) for t in tensors):
                kwargs["device"] = devices.pop()
        images = [self.fetch_images(image) for image in _flatten_images(images)]
        if not images:
            raise ValueError("Got an empty batch: no images to process.")
        layouts = _channel_layouts(images, kwargs.get("input_data_format"))
        do_convert_rgb = kwargs.get("do_convert_rgb") is not False
        white = _white(kwargs["do_rescale"], kwargs["rescale_factor"])
        check_range = bool(kwargs["do_rescale"] or kwargs["do_normalize"])
        images = [
            _read_image(image, layout, do_convert_rgb, white, check_range) for image, layout in zip(images, layouts)
        ]
        return self._preprocess(images, *args, **kwargs)

    def _preprocess(
        self,
        images: list[PIL.Image.Image | np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_center_crop: bool | None,
        crop_size: SizeDict | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        return_tensors: str | TensorType | None,
        do_color_quantize: bool | None = None,
        clusters: np.ndarray | list[list[float]] | torch.Tensor | None = None,
        do_random_crop: bool | None = None,
        random_crop_scale: tuple[float, float] | None = None,
        random_crop_ratio: tuple[float, float] | None = None,
        quantize_chunk_size: int | None = None,
        do_pad: bool | None = None,
        data_format: str | ChannelDimension | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Crops and resizes each image (as read by `_read_image`), then normalizes and quantizes them in batches."""
        if do_pad:
            raise ValueError("`do_pad=True` is not supported: Image GPT needs every image at the same n_px x n_px.")
        palette = None
        if do_color_quantize:
            if clusters is None:
                raise ValueError(
                    "Color quantization needs a palette: pass `clusters` (a (num_colors, 3) array in [-1, 1]) to the "
                    "processor or to this call, or set `do_color_quantize=False` to get `pixel_values`."
                )
            palette = validate_palette(clusters)
        if do_center_crop and (crop_size is None or not (crop_size.height and crop_size.width)):
            raise ValueError(f"`crop_size` must be {{'height': h, 'width': w}}, got {crop_size}.")
        boxes = [None] * len(images)
        if do_random_crop:
            scale = tuple(float(v) for v in (random_crop_scale or (0.08, 1.0)))
            ratio = tuple(float(v) for v in (random_crop_ratio or (3 / 4, 4 / 3)))
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ValueError(f"`random_crop_scale` must be (min, max) with 0 < min <= max <= 1, got {scale}.")
            if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
                raise ValueError(f"`random_crop_ratio` must be (min, max) with 0 < min <= max, got {ratio}.")
            boxes = [_random_crop_box(*_image_size(image), scale, ratio) for image in images]
        resample = PIL.Image.Resampling(int(PILImageResampling.BILINEAR if resample is None else resample))

        def resize_and_crop(index: int) -> np.ndarray:
            size_or_none, crop_or_none = size if do_resize else None, crop_size if do_center_crop else None
            return _resize_and_crop(images[index], boxes[index], size_or_none, resample, crop_or_none)

        workers = min(len(images), os.cpu_count() or 1, 8)
        if workers > 1 and sum(_image_size(image)[0] * _image_size(image)[1] for image in images) >= THREADED_PIXELS:
            with ThreadPoolExecutor(workers) as pool:
                arrays = list(pool.map(resize_and_crop, range(len(images))))
        else:
            arrays = [resize_and_crop(index) for index in range(len(images))]
        if return_tensors is not None and len({array.shape[:2] for array in arrays}) > 1:
            raise ValueError(
                f"The processed images have different sizes {sorted({array.shape[:2] for array in arrays})}, which "
                "cannot be stacked into tensors. Resize to a fixed `size={'height': n_px, 'width': n_px}`, "
                "center-crop with `crop_size`, or pass `return_tensors=None` to get a list."
            )
        device = torch.device(device or "cpu")
        values = {"do_rescale": do_rescale, "rescale_factor": rescale_factor, "do_normalize": do_normalize}
        values.update(image_mean=image_mean, image_std=image_std)

        # Images of one size and kind are processed together.
        groups: dict[tuple, list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault((array.shape[:2], array.dtype == np.uint8), []).append(index)
        results: list[Any] = [None] * len(arrays)
        for (shape, is_uint8), indices in groups.items():
            batch = np.stack([arrays[i] for i in indices])  # (B, H, W, 3)
            if do_color_quantize and is_uint8:
                # 8-bit colors repeat (and are only 2**24): search each distinct color of the batch once.
                codes = torch.from_numpy(batch.reshape(-1, 3).astype(np.int32))
                distinct, inverse = torch.unique(
                    (codes[:, 0] << 16) | (codes[:, 1] << 8) | codes[:, 2], return_inverse=True
                )
                colors = torch.stack([distinct >> 16, (distinct >> 8) & 255, distinct & 255], dim=1).numpy()
                ids = self._color_ids(colors.astype(np.uint8), palette, device, quantize_chunk_size, **values)
                out = ids[inverse.to(ids.device)].reshape(len(indices), -1)
            else:
                pixels = self._model_values(batch.reshape(-1, shape[1], 3), **values)  # (B * H, W, 3) float32
                if do_color_quantize:
                    flat = torch.from_numpy(pixels.reshape(-1, 3)).to(device)
                    out = color_quantize(flat, palette, quantize_chunk_size).reshape(len(indices), -1)
                else:
                    out = pixels.reshape(batch.shape)
            for position, index in enumerate(indices):
                results[index] = out[position]

        if do_color_quantize:
            key = "input_ids"
            results = [r if isinstance(r, torch.Tensor) else torch.from_numpy(r) for r in results]
        else:
            key = "pixel_values"
            channels_last = data_format is not None and _layout(data_format, "data_format") == ChannelDimension.LAST
            results = [
                torch.from_numpy(r if channels_last else np.ascontiguousarray(r.transpose(2, 0, 1))) for r in results
            ]
        if return_tensors is None:
            return BatchFeature(data={key: [r.cpu().numpy() for r in results]})
        stacked = torch.stack(results)
        if TensorType(return_tensors) == TensorType.PYTORCH:
            return BatchFeature(data={key: stacked.to(device)})
        return BatchFeature(data={key: stacked.cpu().numpy()}, tensor_type=return_tensors)

    def _model_values(
        self,
        pixels: np.ndarray,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
    ) -> np.ndarray:
        """`(..., W, 3)` pixels -> the float32 values the model sees, by transformers' own `rescale` and `normalize`
        (elementwise, so the values are bit-identical to transformers' whatever the layout)."""
        channels_first = np.moveaxis(pixels.reshape(-1, pixels.shape[-2], 3), -1, 0)  # (3, rows, W)
        if do_rescale:
            channels_first = self.rescale(channels_first, rescale_factor)
        if do_normalize:
            channels_first = self.normalize(channels_first, image_mean, image_std)
        return np.ascontiguousarray(np.moveaxis(channels_first, 0, -1), dtype=np.float32).reshape(pixels.shape)

    def _color_ids(
        self, colors: np.ndarray, palette: np.ndarray, device: torch.device, chunk_size: int | None, **values
    ) -> torch.Tensor:
        """Palette ids of `(N, 3)` colors (uint8 levels or floats in the processor's units)."""
        pixels = self._model_values(colors[None], **values)[0]
        return color_quantize(torch.from_numpy(pixels).to(device), palette, chunk_size)

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
        palette = self.clusters if clusters is None else validate_palette(clusters)
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
        images = self._palette_colors(np.asarray(palette, dtype=np.float64))[ids].reshape(len(ids), height, width, 3)
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
        normalization = {
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }
        key = (palette.tobytes(), repr(normalization))
        cached = getattr(self, "_decode_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        # The normalization undone: the fraction of full intensity, whatever the units of the processor's inputs.
        fraction = palette
        if self.do_normalize:
            fraction = fraction * np.asarray(self.image_std, np.float64) + np.asarray(self.image_mean, np.float64)
        levels = 255.0 * fraction
        colors = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
        white = _white(self.do_rescale, self.rescale_factor)

        def encode(rgb: np.ndarray) -> np.ndarray:  # as the processor reads an image of these 8-bit colors
            pixels = rgb if white == 255.0 else rgb * (white / 255.0)
            return self._color_ids(pixels, palette, torch.device("cpu"), None, **normalization).numpy()

        wrong = np.flatnonzero(encode(colors) != np.arange(len(palette)))
        if len(wrong):
            # Try the 26 neighbours of the rounded color, nearest to the exact value first.
            offsets = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
            candidates = np.clip(colors[wrong][:, None, :].astype(np.int64) + offsets[None], 0, 255)  # (W, 27, 3)
            order = np.argsort(np.abs(candidates - levels[wrong][:, None, :]).sum(-1), axis=1, kind="stable")
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
        # "No video processor here" (see transformers_compat.NO_VIDEO_PROCESSOR): else pipeline() asks to run code.
        output["video_processor_type"] = NO_VIDEO_PROCESSOR
        return output


class ImageGPTImageProcessorPil(ImageGPTImageProcessor):
    """`ImageGPTImageProcessor` under the name transformers gives its PIL-backend processors.

    Registered as this package's "pil" backend so that `AutoImageProcessor` resolves to this package with either
    backend in every transformers 5.x: before 5.23 it looks a saved `image_processor_type` up by class name
    ("ImageGPTImageProcessor" for "torchvision", "ImageGPTImageProcessorPil" for "pil", the default without
    torchvision) before it looks at registered classes. It saves the same `preprocessor_config.json`.
    """


# `save_pretrained` copies this file (and palette_search.py) next to preprocessor_config.json and names it in
# `auto_map`, so the folder loads with `trust_remote_code=True` where this package is not installed.
ImageGPTImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["ImageGPTImageProcessor", "ImageGPTImageProcessorPil", "color_quantize", "load_image_file"]
