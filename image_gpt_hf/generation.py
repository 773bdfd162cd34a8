"""Sampling and completing images with an autoregressive Image GPT: thin helpers over `generate()`.

`sample` draws whole images from the SOS token; `complete` keeps the top rows of given images and generates the rest,
as in the paper's completions figure. Both take any `generate()` option on top and decode the ids with the image
processor's palette. They generate through `fast_decoding.fast_generate`: a static cache and a decode step compiled
once per model and batch size (by default for models of 20M parameters and more), or plain `generate()` where
compiling does not pay or fails (with a logged reason); `compile=` and `precision=` choose.

```python
from image_gpt_hf import ImageGPTForCausalImageModeling, ImageGPTImageProcessor
from image_gpt_hf.generation import complete, sample

model = ImageGPTForCausalImageModeling.from_pretrained(path).eval()
processor = ImageGPTImageProcessor.from_pretrained(path)
images = sample(model, 8, processor=processor, top_k=64, seed=0)  # 8 PIL images
halves = complete(model, images[:2], processor=processor, num_completions=4, seed=0)  # 2 x 4 completions
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from .configuration_imagegpt import ImageGPTConfig
from .fast_decoding import fast_generate
from .image_processing_imagegpt import ImageGPTImageProcessor, check_palette_fits

OutputType = Literal["pil", "np", "ids"]
# An integer factor (nearest-neighbour) or a super-resolution model (a path, a Hub id or the model).
Upscaler = int | str | os.PathLike | PreTrainedModel
OUTPUT_TYPES = ("pil", "np", "ids")


def sample(
    model: PreTrainedModel,
    num_images: int = 1,
    *,
    processor: ImageGPTImageProcessor | None = None,
    batch_size: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = True,
    seed: int | None = None,
    output_type: OutputType = "pil",
    progress: bool = True,
    upscale: Upscaler | None = None,
    compile: bool | None = None,
    precision: str | None = None,
    **generate_kwargs: Any,
) -> list[PIL.Image.Image] | np.ndarray | torch.LongTensor | tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:
    """Draw `num_images` images from an autoregressive Image GPT, each generated pixel by pixel from the SOS token.

    Args:
        model: an `ImageGPTForCausalImageModeling` (or transformers' own ImageGPT causal model).
        num_images: how many images to draw.
        processor: the image processor whose palette decodes the ids; by default it is loaded from the model's
            `name_or_path`. Not needed for `output_type="ids"`.
        batch_size: images generated together (default: all of them in one batch).
        temperature, top_k, top_p, do_sample: the sampling options of `generate()`; `do_sample=False` is greedy.
        seed: makes the draw repeatable (for a given `batch_size`) without touching the caller's global RNG state.
        output_type: `"pil"` (a list of PIL images), `"np"` (a `(num_images, n_px, n_px, 3)` uint8 array) or `"ids"`
            (a `(num_images, n_px * n_px)` tensor of palette ids, SOS dropped).
        progress: show a progress bar over the generated pixels (needs tqdm; not with beam search or a `streamer` of
            your own, which take generate()'s streamer slot).
        upscale: also return the images enlarged, for viewing (`output_type="pil"` only): an integer factor
            (nearest-neighbour, no model needed), or a transformers super-resolution model (a Swin2SR checkpoint's
            folder or Hub id, or the model itself); see `upscale_images`. The result is then `(images, upscaled)`.
        compile: compile the decode step (`torch.compile`, once per model and batch size, reused by later calls):
            `None` does it for models of 20M parameters and more, `True` whatever the size, `False` never (with
            `precision=None`, plain `generate()`). Where it fails, decoding runs eagerly and the reason is logged.
            Greedy float32 tokens are the same either way. See `fast_decoding.fast_generate`.
        precision: `None` (the model's weights), `"bfloat16"` or `"int8"` (weight-only, bfloat16 activations): decode
            with lower-precision weights, from a copy of the model, remade when its weights change (the model itself is untouched).
        **generate_kwargs: passed on to `model.generate()` (e.g. a `streamer`). The image size sets the length, so
            `max_new_tokens`, `max_length`, `min_new_tokens` and `min_length` are refused, and so is
            `num_return_sequences`: ask for more images with `num_images` (in `complete`, `num_completions`). Values
            saved in the model's generation config for these are overridden.
    """
    config = _check_model(model)
    n_px = config.n_px
    _check_upscale(upscale, output_type)
    _check_count("num_images", num_images)
    batch_size = _check_batch_size(batch_size, num_images)
    _check_output_type(output_type)
    processor = _resolve_processor(model, processor, output_type)
    check_palette_fits(processor, model.config)

    prompts = torch.full((num_images, 1), config.sos_token_id, dtype=torch.long, device=model.device)
    ids = _generate(
        model,
        prompts,
        n_px * n_px,
        batch_size,
        seed,
        progress,
        temperature,
        top_k,
        top_p,
        do_sample,
        compile,
        precision,
        generate_kwargs,
    )
    return _with_upscaled(_to_output(ids, processor, output_type, n_px), upscale)


def complete(
    model: PreTrainedModel,
    images: Any,
    *,
    processor: ImageGPTImageProcessor | None = None,
    primer_rows: int | None = None,
    num_completions: int = 1,
    batch_size: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool = True,
    seed: int | None = None,
    output_type: OutputType = "pil",
    progress: bool = True,
    upscale: Upscaler | None = None,
    compile: bool | None = None,
    precision: str | None = None,
    **generate_kwargs: Any,
) -> list[PIL.Image.Image] | np.ndarray | torch.LongTensor | tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:
    """Keep the top `primer_rows` rows of each image and let the model generate the rest.

    Args:
        model: an `ImageGPTForCausalImageModeling` (or transformers' own ImageGPT causal model).
        images: images the processor reads (a PIL image, an array, or a list of them), or palette ids already: an
            integer tensor (any integer dtype but uint8, which is pixels) of shape `(n_px * n_px,)` or
            `(batch, n_px * n_px)`, or an integer numpy array (not uint8) of that shape.
        processor: encodes the images and decodes the results; by default loaded from the model's `name_or_path`.
            Not needed when `images` are ids and `output_type="ids"`.
        primer_rows: rows kept from each image (default: the top half, `n_px // 2`); 0 samples whole new images.
        num_completions: completions per image.
        batch_size: sequences generated together (default: all of them in one batch).
        temperature, top_k, top_p, do_sample, seed, output_type, progress, upscale, compile, precision,
            **generate_kwargs: as in `sample`.

    Returns:
        `len(images) * num_completions` results, image by image (the completions of the first image come first), as
        a list of PIL images, a `(N, n_px, n_px, 3)` uint8 array or a `(N, n_px * n_px)` tensor of palette ids. The
        first `primer_rows` rows of each result are the kept rows, unchanged. With `upscale`: `(images, upscaled)`.
    """
    config = _check_model(model)
    n_px = config.n_px
    _check_upscale(upscale, output_type)
    _check_count("num_completions", num_completions)
    _check_output_type(output_type)
    primer_rows = n_px // 2 if primer_rows is None else primer_rows
    if not isinstance(primer_rows, int) or not 0 <= primer_rows < n_px:
        raise ValueError(
            f"`primer_rows` must be an integer in [0, {n_px}) for {n_px}x{n_px} images (the model generates the "
            f"rows below it), got {primer_rows!r}."
        )

    is_ids = _are_ids(images, n_px)
    processor = _resolve_processor(model, processor, output_type, needed=not is_ids)
    check_palette_fits(processor, model.config)
    ids = _check_ids(images, n_px, config.palette_size) if is_ids else _encode(images, processor, n_px)
    batch_size = _check_batch_size(batch_size, len(ids) * num_completions)

    primer = ids[:, : primer_rows * n_px].to(model.device)
    sos = torch.full((len(primer), 1), config.sos_token_id, dtype=torch.long, device=model.device)
    prompts = torch.cat([sos, primer], dim=1)
    prompts = prompts.repeat_interleave(num_completions, dim=0)  # (N * num_completions, 1 + primer)
    completed = _generate(
        model,
        prompts,
        n_px * (n_px - primer_rows),
        batch_size,
        seed,
        progress,
        temperature,
        top_k,
        top_p,
        do_sample,
        compile,
        precision,
        generate_kwargs,
    )
    return _with_upscaled(_to_output(completed, processor, output_type, n_px), upscale)


def openai_generation_config(config: ImageGPTConfig) -> GenerationConfig:
    """The generation config this project saves with autoregressive checkpoints (converted or trained): unconditional
    sampling as OpenAI's sampler does it, from SOS, every pixel drawn from the full softmax, a whole image long. With
    it, `model.generate()` without inputs draws an image."""
    return GenerationConfig(
        bos_token_id=config.sos_token_id,
        decoder_start_token_id=config.sos_token_id,
        max_length=config.n_positions + 1,  # SOS + n_px * n_px pixels
        do_sample=True,
        top_k=0,  # no truncation of the distribution, as in OpenAI's run.py
    )


def upscale_images(
    images: Sequence[PIL.Image.Image],
    upscaler: Upscaler,
    *,
    batch_size: int = 8,
) -> list[PIL.Image.Image]:
    """Enlarge images for viewing: generated samples are 32x32 (8x8 on the digits) and are looked at enlarged.

    Args:
        images: PIL images (e.g. what `sample` or `complete` return).
        upscaler: an integer factor for nearest-neighbour enlargement (sharp pixels, no model), or a transformers
            image super-resolution model: a checkpoint folder or Hub id (loaded with `AutoModelForImageToImage` and
            its `AutoImageProcessor`, e.g. a Swin2SR model), or such a model already loaded (its processor is then
            loaded from its `name_or_path`). Its config's `upscale` is the factor.
        batch_size: images per forward pass of the super-resolution model (images of different sizes in a batch go one at
            a time).

    Returns:
        The enlarged images, in order, as RGB PIL images `factor` times the size of the originals.
    """
    images = list(images)
    if not all(isinstance(image, PIL.Image.Image) for image in images):
        raise ValueError("`upscale_images` takes PIL images (generate them with output_type='pil').")
    if isinstance(upscaler, bool):
        raise ValueError("`upscaler` must be an integer factor or a super-resolution model, not a bool.")
    if isinstance(upscaler, (int, np.integer)):
        if upscaler < 1:
            raise ValueError(f"An upscale factor must be a positive integer, got {upscaler}.")
        factor = int(upscaler)
        return [image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST) for image in images]
    _check_count("batch_size", batch_size)
    model, processor = _super_resolution_model(upscaler)
    factor = model.config.upscale
    upscaled = []
    for start in range(0, len(images), batch_size):
        chunk = [image.convert("RGB") for image in images[start : start + batch_size]]
        # A batch is one tensor: images of different sizes go one at a time.
        for batch in [chunk] if len({image.size for image in chunk}) == 1 else [[image] for image in chunk]:
            inputs = processor(batch, return_tensors="pt").to(model.device)
            with torch.no_grad():
                reconstruction = model(**inputs).reconstruction  # (b, 3, H, W) in [0, 1], of the padded input
            for image, output in zip(batch, reconstruction.float().clamp(0, 1).cpu()):
                # The processor pads each side to the model's window; the enlarged original is the top-left part.
                array = output[:, : image.height * factor, : image.width * factor].permute(1, 2, 0).numpy()
                upscaled.append(PIL.Image.fromarray((array * 255.0).round().astype(np.uint8)))
    return upscaled


# ---------------------------------------------------------------------------------------------------------- helpers


def _super_resolution_model(upscaler: Any) -> tuple[PreTrainedModel, Any]:
    """(model, image processor) of a transformers image super-resolution checkpoint, from a path, an id or a model."""
    from transformers import AutoImageProcessor, AutoModelForImageToImage

    if isinstance(upscaler, PreTrainedModel):
        model, source = upscaler, upscaler.name_or_path
    elif isinstance(upscaler, (str, os.PathLike)):
        source = os.fspath(upscaler)
        try:
            model = AutoModelForImageToImage.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"`upscale` {source!r} is neither an integer factor nor a loadable image super-resolution checkpoint "
                f"(AutoModelForImageToImage, e.g. Swin2SR): {error}"
            ) from error
    else:
        raise ValueError(
            "`upscale` must be an integer factor or a super-resolution model (a checkpoint path, a Hub id or a "
            f"loaded model), got {type(upscaler).__name__}."
        )
    if not isinstance(getattr(model.config, "upscale", None), int):
        raise ValueError(
            f"{type(model).__name__} is not an image super-resolution model (its config has no integer `upscale`)."
        )
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The super-resolution model's image processor could not be loaded from {source!r}: {error}"
        ) from error
    return model.eval(), processor


def _check_upscale(upscale: Any, output_type: str) -> None:
    if upscale is not None and output_type != "pil":
        raise ValueError(f"`upscale` gives enlarged PIL images: use output_type='pil' (got {output_type!r}).")
    if isinstance(upscale, bool):
        raise ValueError("`upscale` must be an integer factor or a super-resolution model, not a bool.")


def _with_upscaled(images: Any, upscale: Upscaler | None) -> Any:
    return images if upscale is None else (images, upscale_images(images, upscale))


def _generate(
    model: PreTrainedModel,
    prompts: torch.LongTensor,
    max_new_tokens: int,
    batch_size: int,
    seed: int | None,
    progress: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    do_sample: bool,
    compile: bool | None,
    precision: str | None,
    generate_kwargs: dict[str, Any],
) -> torch.LongTensor:
    """`fast_generate()` over `prompts` (N, 1 + primer) in batches; the (N, n_px * n_px) palette ids, SOS dropped."""
    for name, instead in (
        ("max_new_tokens", "the image size"),
        ("max_length", "the image size"),
        ("min_new_tokens", "the image size"),
        ("min_length", "the image size"),
        ("num_return_sequences", "`num_images` / `num_completions`, the number of results"),
    ):
        if name in generate_kwargs:
            raise ValueError(f"`{name}` is set by {instead}; do not pass it.")
    options = {"do_sample": do_sample}
    if do_sample:  # greedy decoding takes no sampling options (generate() warns about them)
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    # Images have a fixed length, given once as a total (a saved generation config holds `max_length`, and generate()
    # warns when it meets both kinds of limit); forcing the minimum keeps an `eos_token_id` from stopping early. One
    # sequence per prompt, whatever the saved generation config says.
    total = prompts.shape[1] + max_new_tokens
    options.update(max_length=total, min_length=total, max_new_tokens=None, min_new_tokens=None)
    options.update(num_return_sequences=1, **generate_kwargs)

    # The bar rides on generate()'s streamer, which beam search refuses and a user's own streamer takes over.
    num_beams = options.get("num_beams", getattr(model.generation_config, "num_beams", 1)) or 1
    progress = progress and "streamer" not in options and num_beams == 1
    bar = _progress_bar(progress, len(prompts) * max_new_tokens)
    outputs = []
    # fork_rng: a seeded draw is repeatable and leaves the caller's random state as it was.
    devices = [model.device] if model.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None, device_type=model.device.type):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            if bar is not None:
                options["streamer"] = _BarStreamer(bar, len(batch))
            out = fast_generate(model, batch, compile=compile, precision=precision, **options)
            outputs.append(out[:, 1:])  # drop SOS: (b, primer + new) = (b, n_px * n_px)
    if bar is not None:
        bar.close()
    return torch.cat(outputs)


def _check_model(model: PreTrainedModel) -> ImageGPTConfig:
    """The config of an autoregressive Image GPT (this package's, or transformers' own read as this package's, which
    derives n_px, the palette size and the SOS id); a ValueError otherwise."""
    config = getattr(model, "config", None)
    is_imagegpt = isinstance(config, ImageGPTConfig) or getattr(config, "model_type", None) == "imagegpt"
    if not is_imagegpt or not hasattr(model, "generate"):
        raise ValueError(
            f"Expected an autoregressive Image GPT (ImageGPTForCausalImageModeling), got {type(model).__name__}."
        )
    if getattr(config, "objective", "ar") != "ar":
        raise ValueError(
            "Sampling needs an autoregressive model (objective='ar'); this is a BERT-objective model "
            f"(objective={config.objective!r}), which predicts masked pixels instead of the next one."
        )
    return config if isinstance(config, ImageGPTConfig) else ImageGPTConfig.from_dict(config.to_dict())


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_batch_size(batch_size: int | None, total: int) -> int:
    if batch_size is None:
        return total
    _check_count("batch_size", batch_size)
    return batch_size


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")


def _are_ids(images: Any, n_px: int) -> bool:
    """Whether `complete`'s `images` are palette ids: an integer tensor other than uint8 (any shape: a wrong one is
    refused as ids), or an integer numpy array other than uint8 whose last axis holds `n_px * n_px` values. uint8 arrays
    and tensors are pixels."""
    if isinstance(images, torch.Tensor):
        return not (images.is_floating_point() or images.is_complex() or images.dtype in (torch.bool, torch.uint8))
    if isinstance(images, np.ndarray):
        is_integer = np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8
        return is_integer and images.ndim in (1, 2) and images.shape[-1] == n_px * n_px
    return False


def _check_ids(ids: torch.Tensor | np.ndarray, n_px: int, palette_size: int) -> torch.LongTensor:
    ids = torch.as_tensor(ids).long()
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] != n_px * n_px or len(ids) == 0:
        raise ValueError(
            f"Palette ids must have shape ({n_px * n_px},) or (batch, {n_px * n_px}) for this {n_px}x{n_px} model, "
            f"got {tuple(ids.shape)}."
        )
    if bool((ids < 0).any()) or bool((ids >= palette_size).any()):
        raise ValueError(
            f"Palette ids must be in [0, {palette_size}); got values from {int(ids.min())} to {int(ids.max())} "
            "(drop the SOS token of generate() outputs first)."
        )
    return ids


def _encode(images: Any, processor: ImageGPTImageProcessor, n_px: int) -> torch.LongTensor:
    if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    if isinstance(images, Sequence) and len(images) == 0:
        raise ValueError("`images` is empty.")
    ids = processor(images, return_tensors="pt")["input_ids"]
    if ids.shape[-1] != n_px * n_px:
        raise ValueError(
            f"The processor turns each image into {ids.shape[-1]} ids but the model's images are {n_px}x{n_px} "
            f"({n_px * n_px} ids): give it `size={{'height': {n_px}, 'width': {n_px}}}`."
        )
    return ids.long()


def _resolve_processor(
    model: PreTrainedModel, processor: ImageGPTImageProcessor | None, output_type: str, needed: bool = False
) -> ImageGPTImageProcessor | None:
    if processor is not None or (output_type == "ids" and not needed):
        return processor
    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if source:
        try:
            return ImageGPTImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            reason = f" (loading it from {source!r} failed: {error})"
    else:
        reason = ""
    raise ValueError(
        "Encoding or decoding images needs the image processor (it holds the color palette): pass "
        f"`processor=ImageGPTImageProcessor.from_pretrained(...)`, or use palette ids with output_type='ids'{reason}."
    )


def _to_output(
    ids: torch.LongTensor, processor: ImageGPTImageProcessor | None, output_type: str, n_px: int
) -> list[PIL.Image.Image] | np.ndarray | torch.LongTensor:
    if output_type == "ids":
        return ids
    images = processor.batch_decode(ids.cpu(), output_type=output_type, size=(n_px, n_px))
    return list(images) if output_type == "pil" else images


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, unit="px", desc="Generating pixels")


class _BarStreamer(BaseStreamer):
    """Advances a progress bar by one step per generated pixel of the batch (generate() calls `put` once per step,
    first with the prompt)."""

    def __init__(self, bar, batch_size: int):
        self.bar, self.batch_size, self.seen_prompt = bar, batch_size, False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.bar.update(self.batch_size)
        self.seen_prompt = True

    def end(self) -> None:
        pass


__all__ = ["complete", "openai_generation_config", "sample", "upscale_images"]
