"""Image processor for Image GPT: images <-> sequences of palette ids (each pixel, scaled to [-1, 1], becomes the id of
its nearest palette color; `decode` turns ids back into images). It is transformers' `PilBackend` (arguments, defaults,
rescale, normalize, saving, loading) with `_preprocess` overridden, as transformers' `ImageGPTImageProcessorPil` is;
what else is here says why. Shipped as remote code by `save_pretrained` (with the two modules it imports): they import
only numpy, PIL, torch, transformers and the standard library."""

from __future__ import annotations

import io
import math
import os
import time
import urllib.request
from typing import Any, Literal

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb, get_size_with_aspect_ratio
from transformers.image_utils import (
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    get_image_size_for_max_height_width,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from .palette_search import color_quantize, validate_palette
from .transformers_compat import NO_VIDEO_PROCESSOR

URL_TIMEOUT = 10.0  # seconds the processor gives a URL's image (connect and download) unless told `timeout`

# Reading images is own code: transformers' reader makes every image 8-bit RGB first (16-bit and float images clip at
# 255), guesses ambiguous channel axes, and waits for a URL without a time limit.


def load_image_file(source: str | os.PathLike, timeout: float | None = None) -> PIL.Image.Image:
    """The image in a file, at an http(s) URL or in a `data:` URL, decoded as stored (mode and EXIF kept), so a file
    gives the same ids as a path and as `PIL.Image.open(path)`. `timeout`: seconds for the whole download of a URL
    (None: no limit; a read under way when it passes may add up to `timeout` more), then a TimeoutError."""
    source = os.fspath(source)
    if source.startswith(("http://", "https://", "data:")):
        deadline, chunks = time.monotonic() + (timeout or math.inf), []
        try:  # read by chunks against one deadline: a server that trickles bytes never resets it
            with urllib.request.urlopen(source, timeout=timeout) as response:
                while chunk := response.read1(1 << 16):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise TimeoutError
        except OSError as err:  # urllib's errors name neither the URL nor, for a timeout, what to do
            if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
                late = f"{source[:99]!r} did not send its image within {timeout} s; pass a larger `timeout`."
                raise TimeoutError(late) from None
            raise OSError(f"Could not read the image at {source[:200]!r}: {err}") from None
        source = io.BytesIO(b"".join(chunks))
    with PIL.Image.open(source) as image:
        image.load()
    return image


def _flatten_images(images: Any) -> list:
    """A flat list of single images; lists (nested too), sized iterables (a `datasets` Column) and 4-D arrays or
    tensors are batches. Own code: transformers' flattening takes neither paths nor a Column."""
    single = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, PIL.Image.Image, dict)
    if not isinstance(images, single) and hasattr(images, "__len__"):
        return [image for item in list(images) for image in _flatten_images(item)]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = (images.float() if images.dtype in (torch.float16, torch.bfloat16) else images).numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (PIL.Image.Image, str, os.PathLike)) or getattr(images, "ndim", 0) in (2, 3):
        return [images]
    shape = getattr(images, "shape", "")
    raise ValueError(f"Unsupported image {type(images).__name__}{shape}: pass PIL images, paths, arrays (H, W[, C]).")


def _white(do_rescale: bool, rescale_factor: float) -> float:
    """Full intensity in the units float images are read in: 1 / rescale_factor with `do_rescale`, else 1."""
    return (255.0 if rescale_factor == 1 / 255 else 1.0 / rescale_factor) if do_rescale else 1.0


def _pixel_levels(image: np.ndarray, white: float, check_range: bool) -> np.ndarray:
    """An array's pixels as uint8 levels or as floats in the processor's units (`white` is full intensity). Integers
    are 8-bit levels as in transformers, except uint16 (65535 is white, as in PIL's 16-bit modes); bool is black and
    white; floats are in [0, 1 / rescale_factor] with `do_rescale`, else [0, 1], and 8-bit levels among them uint8."""
    kind = image.dtype.kind
    if kind == "b" or image.dtype == np.uint8:
        return image.astype(np.uint8) * np.uint8(255 if kind == "b" else 1)
    if kind in "iu" and image.dtype != np.uint16:
        if image.min() < 0 or image.max() > 255:  # uint8 would wrap them around
            raise ValueError(f"Integer pixel values must lie in [0, 255], got [{image.min()}, {image.max()}].")
        return image.astype(np.uint8)
    if kind == "u":
        image, check_range = image.astype(np.float32) / np.float32(65535 / white), False
    elif kind != "f":  # complex pixels would lose their imaginary part
        raise ValueError(f"Unsupported pixel dtype {image.dtype}: expected bool, integers or floats.")
    image = image if image.dtype in (np.float32, np.float64) else image.astype(np.float32)
    low, high = float(image.min()), float(image.max())  # NaN, if any
    if not np.isfinite([low, high]).all() or check_range and not -1e-3 * white <= low <= high <= white * (1 + 1e-3):
        why = f"finite, floats in [0, {white:g}] (1 / `rescale_factor` with `do_rescale`, else 1)"
        raise ValueError(f"Pixel values must be {why}, got values in [{low:g}, {high:g}].")
    return image.astype(np.uint8) if white == 255.0 and np.array_equal(image, np.rint(image)) else image


def _read_image(image: Any, input_data_format: Any, do_convert_rgb: bool, white: float, check_range: bool) -> Any:
    """One image as the processor works on it: an 8-bit PIL image in mode RGB or L, or an `(H, W, 3)` float array.
    PIL images are turned upright by their EXIF orientation (as transformers' `load_image` does) and converted by
    transformers' `convert_to_rgb`, except 16-bit, 32-bit and float modes, read as arrays. An array holds 1, 3 or 4
    channels (2 when `input_data_format` says where); a shape such as (3, 4, 3) is refused where transformers guesses.
    """
    shape = image.size if isinstance(image, PIL.Image.Image) else np.shape(image)[:2]
    if 0 in shape:  # resized, it would pass for an image
        raise ValueError(f"Got an empty image (no pixels): {type(image).__name__} of size {image.size}.")
    if isinstance(image, PIL.Image.Image):
        if image.getexif().get(PIL.ExifTags.Base.Orientation, 1) != 1:
            image = PIL.ImageOps.exif_transpose(image)
        if image.mode == "RGB" or (image.mode == "L" and do_convert_rgb):
            return image  # resized in its own mode, as transformers resizes it
        if do_convert_rgb and not (image.mode.startswith("I") or image.mode == "F"):
            return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))
        image, input_data_format = np.asarray(image), "channels_last"
    array = _pixel_levels(image, white, check_range)
    first = array.shape[0] in (1, 3, 4)
    if array.ndim == 3 and input_data_format is None and first == (array.shape[-1] in (1, 3, 4)):
        where = "pass `input_data_format='channels_first'` or `'channels_last'`"
        raise ValueError(f"Cannot infer the channel axis of an image of shape {array.shape}: {where}.")
    if array.ndim == 2:
        array = array[..., None]
    elif input_data_format == "channels_first" or input_data_format is None and first:
        array = np.moveaxis(array, 0, -1)
    channels = array.shape[-1]
    if channels not in (1, 2, 3, 4) or channels != 3 and not do_convert_rgb:
        what = "3 channels, or 1 (gray), 2 (+ alpha) or 4 (RGBA) with `do_convert_rgb=True`"
        problem = f"Got an image of {channels} channel(s) (shape {array.shape}); the palette is RGB: pass {what}"
        raise ValueError(problem + ".")
    if channels in (2, 4):  # onto white, rounded for 8-bit images as transformers' `convert_to_rgb` does
        color, alpha = array[..., :-1], array[..., -1:].astype(np.float64) / white
        blended = alpha * color + (1.0 - alpha) * white
        array = np.round(blended).astype(np.uint8) if array.dtype == np.uint8 else blended.astype(array.dtype)
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array))
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _resize_and_crop(image: Any, size: SizeDict | None, resample: int, crop_size: SizeDict | None) -> np.ndarray:
    """Resize to `size`, center crop to `crop_size`: an `(h, w, 3)` uint8 or float array. Own code for speed: 8-bit
    images are resized by PIL in their own mode, the very operation inside transformers' `resize` (so the pixels are
    bit-identical) without its round trips through numpy; float images channel by channel in PIL's float mode."""
    if size is not None:
        height, width = (image.height, image.width) if isinstance(image, PIL.Image.Image) else image.shape[:2]
        if size.shortest_edge:
            target = get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
        elif size.max_height and size.max_width:
            target = get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
        else:  # as given: a 0 is refused by PIL
            target = None
        # (width, height), as PIL takes it; a side of an extreme aspect ratio rounded down to 0 becomes 1.
        new_size = (size.width, size.height) if target is None else (max(int(target[1]), 1), max(int(target[0]), 1))
        if isinstance(image, PIL.Image.Image):
            image = image.resize(new_size, resample=resample)
        elif new_size != (width, height):
            channels = [PIL.Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)) for c in range(3)]
            image = np.stack([np.asarray(c.resize(new_size, resample)) for c in channels], axis=-1)
    array = np.asarray(image)
    array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array
    if crop_size is not None:
        (height, width), (crop_h, crop_w) = array.shape[:2], (crop_size.height, crop_size.width)
        if crop_h > height or crop_w > width:
            raise ValueError(f"`crop_size` ({crop_h}x{crop_w}) is larger than the resized image ({height}x{width}).")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        array = array[top : top + crop_h, left : left + crop_w]
    return array


def check_palette_fits(processor: Any, config: Any, source: str = "The processor") -> None:
    """The one rule that a processor and a model belong together: the processor's palette has the colors the model
    predicts (vocab_size minus SOS, for this package's config and transformers' own), or its ids and decoded images
    mean something else. A processor without a palette (None, or no `clusters`) has nothing to check."""
    clusters, size = getattr(processor, "clusters", None), config.vocab_size - 1
    if clusters is not None and len(clusters) != size:
        raise ValueError(f"{source}'s palette has {len(clusters)} colors but the model predicts {size} (vocab_size "
                         f"{size + 1} = palette + SOS): use the processor saved with the model.")  # fmt: skip


def _positive_pair(size: Any) -> tuple[int, int] | None:
    """(height, width) from an int, a pair or a dict with both, if they are positive integers; else None."""
    if isinstance(size, (dict, SizeDict)):
        size = (dict(size).get("height"), dict(size).get("width"))
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    valid = isinstance(pair, (tuple, list)) and len(pair) == 2
    if valid and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair):
        return int(pair[0]), int(pair[1])
    return None


class ImageGPTImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    clusters (`np.ndarray`, `list[list[float]]` or `torch.Tensor` of shape `(num_colors, 3)`, *optional*):
        The color palette, values in [-1, 1] (the range pixels are normalized to). Defaults to `self.clusters`.
    do_color_quantize (`bool`, *optional*, defaults to `self.do_color_quantize`):
        Return the `input_ids` of each pixel's nearest palette color; `False` returns the normalized `pixel_values`.
    quantize_chunk_size (`int`, *optional*):
        Pixels per chunk of the nearest-color search (bounds its memory); `None` picks one for the device.
    timeout (`float`, *optional*, defaults to `URL_TIMEOUT`, 10 s):
        Seconds to wait for the server of an image URL (each connect or read) before a TimeoutError.
    """

    clusters: np.ndarray | list[list[float]] | torch.Tensor | None
    do_color_quantize: bool | None
    quantize_chunk_size: int | None
    timeout: float | None


class ImageGPTImageProcessor(PilBackend):
    r"""
    Images to Image GPT's `input_ids` `(batch, n_px * n_px)`, raster order: resize to `size`, scale pixels to [-1, 1],
    take each pixel's nearest palette color; `decode` maps ids back to images. Its `preprocessor_config.json` is that
    of transformers' ImageGPT processor (both load either's), and so are its ids on 8-bit RGB images, ties included,
    many times faster (`palette_search`; on the input tensors' device or `device=`). It reads paths, URLs, PIL images
    of any mode and arrays or tensors of any dtype. Random crops (training augmentation) belong in the training
    script's transform (examples/pretrain.py, examples/finetune.py).

    Args:
        clusters (`np.ndarray`, `list[list[float]]` or `torch.Tensor` of shape `(num_colors, 3)`, *optional*):
            The color palette in [-1, 1], e.g. OpenAI's `kmeans_centers.npy` or `image_gpt_hf.palette.fit_palette`'s.
        **kwargs: any of the processor's options (`size`, `resample`, `do_color_quantize`, `timeout`, ...).
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
    quantize_chunk_size = None
    timeout = None

    def __init__(self, clusters: Any = None, **kwargs: Unpack[ImageGPTImageProcessorKwargs]) -> None:
        if kwargs.pop("do_random_crop", None):  # saved when the processor made random crops, which it no longer does
            raise ValueError('Saved with random crops, which belong in the training script now: set "do_random_crop": '
                             "false in preprocessor_config.json (and crop as examples/pretrain.py does).")  # fmt: skip
        kwargs = {key: value for key, value in kwargs.items() if not key.startswith("random_crop_")}
        super().__init__(clusters=None if clusters is None else validate_palette(clusters), **kwargs)
        self._check_parameters({name: getattr(self, name) for name in self.valid_kwargs.__annotations__})

    @staticmethod
    def _check_parameters(options: dict[str, Any]) -> None:
        """The processor's parameters, checked at construction and at each call before any image is read."""
        rescale_factor, image_std = options["rescale_factor"], options["image_std"]
        bad_std = options["do_normalize"] and not (np.isfinite(image_std).all() and np.all(np.asarray(image_std) != 0))
        if bad_std or options["do_rescale"] and not 0 < rescale_factor < math.inf:
            raise ValueError(f"`rescale_factor` must be positive and `image_std` finite and nonzero, got {rescale_factor!r}"
                             f" and {image_std}.")  # fmt: skip
        if options.get("do_pad"):  # the processor would ignore it
            raise ValueError("`do_pad=True` is not supported: Image GPT needs every image at the same n_px x n_px.")

    def _preprocess_image_like_inputs(self, images: Any, *args, **kwargs) -> BatchFeature:
        """Checks the parameters, then reads the images with this file's reader and processes them."""
        self._check_parameters(kwargs)
        if kwargs["do_color_quantize"] and kwargs["clusters"] is None:
            raise ValueError("Color quantization needs a palette: pass `clusters`, or `do_color_quantize=False`.")
        if kwargs["do_color_quantize"]:
            kwargs["clusters"] = validate_palette(kwargs["clusters"])
        tensors = images if isinstance(images, (list, tuple)) else [images]
        if kwargs.get("device") is None and tensors and all(isinstance(t, torch.Tensor) for t in tensors):
            if len({t.device for t in tensors}) == 1:  # tensors that all live on one device: the search runs there
                kwargs["device"] = tensors[0].device
        timeout, images = kwargs.get("timeout") or URL_TIMEOUT, _flatten_images(images)
        images = [load_image_file(i, timeout) if isinstance(i, (str, os.PathLike)) else i for i in images]
        white = _white(kwargs["do_rescale"], kwargs["rescale_factor"])
        options = (kwargs.get("input_data_format"), kwargs.get("do_convert_rgb") is not False, white)
        images = [_read_image(image, *options, kwargs["do_rescale"] or kwargs["do_normalize"]) for image in images]
        return self._preprocess(images, *args, **kwargs)

    def _preprocess(self, images: list[PIL.Image.Image | np.ndarray], **kwargs) -> BatchFeature:
        """Resizes and crops each image (as read by `_read_image`), then normalizes and quantizes all pixels at once."""
        resample = kwargs["resample"] if kwargs["resample"] is not None else PILImageResampling.BILINEAR
        size, return_tensors = kwargs["size"] if kwargs["do_resize"] else None, kwargs["return_tensors"]
        crop_size = kwargs["crop_size"] if kwargs["do_center_crop"] else None
        arrays = [_resize_and_crop(image, size, PIL.Image.Resampling(int(resample)), crop_size) for image in images]
        if return_tensors is not None and len({array.shape for array in arrays}) > 1:
            sizes = sorted({array.shape[:2] for array in arrays})
            problem = f"The processed images have different sizes {sizes}: resize them to one, or pass"
            problem += " `return_tensors=None`."
            raise ValueError(problem)
        device, quantize = torch.device(kwargs.get("device") or "cpu"), kwargs["do_color_quantize"]
        results: list[Any] = [None] * len(arrays)
        for is_uint8 in (True, False):  # 8-bit images and float ones, each kind in one go
            indices = [i for i, array in enumerate(arrays) if (array.dtype == np.uint8) == is_uint8]
            if indices:
                flat = np.concatenate([arrays[i].reshape(-1, 3) for i in indices])  # (P, 3)
                out = self._ids(flat, **kwargs) if quantize else torch.from_numpy(self._model_values(flat, **kwargs))
                for index, part in zip(indices, out.split([arrays[i].shape[0] * arrays[i].shape[1] for i in indices])):
                    results[index] = part if quantize else part.reshape(arrays[index].shape)
        key = "input_ids" if quantize else "pixel_values"
        if not quantize and ChannelDimension(kwargs.get("data_format") or "channels_first") != ChannelDimension.LAST:
            results = [r.permute(2, 0, 1).contiguous() for r in results]
        if return_tensors is None:
            return BatchFeature(data={key: [r.cpu().numpy() for r in results]})
        stacked = torch.stack(results).to(device)
        as_torch = TensorType(return_tensors) == TensorType.PYTORCH
        return BatchFeature(data={key: stacked if as_torch else stacked.cpu().numpy()}, tensor_type=return_tensors)

    def _model_values(self, pixels: np.ndarray, **kwargs) -> np.ndarray:
        """`(N, 3)` pixels -> the float32 values the model sees, by transformers' own `rescale` and `normalize`
        (elementwise, so bit-identical to transformers' values in any layout)."""
        image = pixels.T[:, None, :]  # (3, 1, N): channels first, as they take it
        image = self.rescale(image, kwargs["rescale_factor"]) if kwargs["do_rescale"] else image
        image = self.normalize(image, kwargs["image_mean"], kwargs["image_std"]) if kwargs["do_normalize"] else image
        return np.ascontiguousarray(image[:, 0].T, dtype=np.float32)

    def _ids(self, pixels: np.ndarray, **kwargs) -> torch.Tensor:
        """Palette ids of `(N, 3)` pixels (uint8, or floats in the processor's units)."""
        inverse = None
        if pixels.dtype == np.uint8:  # 8-bit colors repeat (and are only 2**24): search each distinct color once
            codes = torch.from_numpy(pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32))
            distinct, inverse = (t.numpy() for t in torch.unique(codes, return_inverse=True))
            pixels = np.stack([distinct >> 16, distinct >> 8 & 255, distinct & 255], axis=1).astype(np.uint8)
        values = torch.from_numpy(self._model_values(pixels, **kwargs)).to(kwargs.get("device") or "cpu")
        ids = color_quantize(values, kwargs["clusters"], kwargs.get("quantize_chunk_size"))
        return ids if inverse is None else ids[torch.from_numpy(inverse).to(ids.device)]

    def decode(
        self,
        input_ids: torch.Tensor | np.ndarray | list[int] | list[list[int]],
        output_type: Literal["pil", "np"] = "pil",
        clusters: np.ndarray | list[list[float]] | torch.Tensor | None = None,
        size: int | tuple[int, int] | dict[str, int] | None = None,
    ) -> PIL.Image.Image | list[PIL.Image.Image] | np.ndarray:
        """Images from palette ids `([batch,] height * width)`, e.g. samples from `generate()` without their SOS token:
        PIL images (`output_type="pil"`) or uint8 arrays `([batch,] H, W, 3)` (`"np"`). `clusters` defaults to the
        processor's palette; `size` (`(height, width)`, an int or `{"height": h, "width": w}`) to the processor's size
        or crop size when it holds the sequences, else to a square. Each id becomes its palette color with the
        normalization undone, rounded to 8 bits, or a neighbouring 8-bit color where only that re-encodes to the id."""
        palette = validate_palette(self.clusters if clusters is None else clusters)
        ids = np.asarray(input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
        single = ids.ndim == 1
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):  # float ids would be truncated, a grid misread
            problem = f"`input_ids` must be integer palette ids ([batch,] length), got {ids.dtype} {ids.shape}."
            raise ValueError(problem)
        ids = ids[None].astype(np.int64) if single else ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= len(palette):  # numpy would wrap negative ids around
            bad = sorted(set(ids[(ids < 0) | (ids >= len(palette))].tolist()))[:5]
            sos = f"`generate()`'s sequences start with the SOS token (id {len(palette)}): drop it, `output[:, 1:]`"
            raise ValueError(f"Token ids must be palette ids in [0, {len(palette)}), got {bad}; {sos}.")
        height, width = self._decode_size(ids.shape[1], size)
        images = self._palette_colors(np.asarray(palette, dtype=np.float64))[ids].reshape(len(ids), height, width, 3)
        if output_type == "np":
            return images[0] if single else images
        pil_images = [PIL.Image.fromarray(image) for image in images]
        return pil_images[0] if single else pil_images

    def batch_decode(self, input_ids: Any, output_type: Literal["pil", "np"] = "pil", **kwargs) -> Any:
        """`decode` for a batch `(batch, n_px * n_px)`: a list of PIL images or a `(batch, H, W, 3)` uint8 array."""
        return self.decode(input_ids, output_type=output_type, **kwargs)

    def _decode_size(self, length: int, size: Any) -> tuple[int, int]:
        for candidate in (size,) if size is not None else (self.crop_size if self.do_center_crop else None, self.size):
            pair = _positive_pair(candidate)
            if pair and pair[0] * pair[1] == length:
                return pair
        side = math.isqrt(length)
        if size is not None or side * side != length:
            holding = f"pass a `size` (height, width) that holds them, got {size}"
            raise ValueError(f"Cannot tell the image size of sequences of {length} ids: {holding}.")
        return side, side

    def _palette_colors(self, palette: np.ndarray) -> np.ndarray:
        """`(K, 3)` uint8: the 8-bit color each id decodes to (cached per palette and normalization)."""
        normalization = {k: getattr(self, k) for k in ("do_rescale", "rescale_factor", "do_normalize", "image_mean")}
        normalization["image_std"] = self.image_std
        key = (palette.tobytes(), repr(normalization))
        if getattr(self, "_decode_cache", (None,))[0] == key:
            return self._decode_cache[1]
        # The normalization undone: the fraction of full intensity, whatever the units of the processor's inputs.
        fraction = palette
        if self.do_normalize:
            fraction = fraction * np.asarray(self.image_std, np.float64) + np.asarray(self.image_mean, np.float64)
        levels = 255.0 * fraction
        colors = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
        white = _white(self.do_rescale, self.rescale_factor)

        def encode(rgb: np.ndarray) -> np.ndarray:  # as the processor reads an image of these 8-bit colors
            pixels = rgb if white == 255.0 else rgb * (white / 255.0)
            return self._ids(pixels, clusters=palette, **normalization).numpy()

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

    def to_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` content: transformers' ImageGPT fields (palette as a list of lists)."""
        output = {key: value for key, value in super().to_dict().items() if not key.startswith("_")}
        if output.get("clusters") is not None:
            output["clusters"] = np.asarray(output["clusters"]).tolist()
        # "No video processor here" (see transformers_compat.NO_VIDEO_PROCESSOR): else pipeline() asks to run code.
        output["video_processor_type"] = NO_VIDEO_PROCESSOR
        return output


class ImageGPTImageProcessorPil(ImageGPTImageProcessor):
    """`ImageGPTImageProcessor` under the name transformers gives PIL-backend processors, registered as the "pil"
    backend: before 5.23 `AutoImageProcessor` looks a saved `image_processor_type` up by class name for each backend."""


# `save_pretrained` copies this file (and the modules it imports) next to preprocessor_config.json and names it in
# `auto_map`, so the folder loads with `trust_remote_code=True` where this package is not installed.
ImageGPTImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["ImageGPTImageProcessor", "ImageGPTImageProcessorPil", "color_quantize", "load_image_file"]
