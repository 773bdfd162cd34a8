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
    config, processor = _prepare(model, processor, output_type, upscale)
    prompts = torch.full((num_images, 1), config.sos_token_id, dtype=torch.long, device=_input_device(model))
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, **generate_kwargs)
    ids = _generate(model, prompts, batch_size=batch_size, seed=seed, progress=progress, compile=compile,
                    precision=precision, **options)  # fmt: skip
    return _with_upscaled(_to_output(ids, processor, output_type, config.n_px), upscale)


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
            integer tensor or numpy array (any integer dtype but uint8, which is pixels) of shape `(n_px * n_px,)`,
            `(batch, n_px * n_px)`, `(n_px, n_px)` or `(batch, n_px, n_px)`.
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
    given_ids = _are_ids(images)
    config, processor = _prepare(model, processor, output_type, upscale, not given_ids)
    n_px = config.n_px
    primer_rows = n_px // 2 if primer_rows is None else primer_rows
    if not isinstance(primer_rows, int) or not 0 <= primer_rows < n_px:  # -1 would keep all but one pixel
        raise ValueError(f"`primer_rows` must be an integer in [0, {n_px}) for this model, got {primer_rows!r}.")
    ids = _as_ids(images, config) if given_ids else _encode(images, processor, n_px)
    primer = ids[:, : primer_rows * n_px].to(_input_device(model))
    sos = torch.full((len(primer), 1), config.sos_token_id, dtype=torch.long, device=primer.device)
    prompts = torch.cat([sos, primer], dim=1).repeat_interleave(
        num_completions, dim=0
    )  # (N * completions, 1 + primer)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, **generate_kwargs)
    completed = _generate(model, prompts, batch_size=batch_size, seed=seed, progress=progress, compile=compile,
                          precision=precision, **options)  # fmt: skip
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
    if isinstance(upscaler, (int, np.integer)):
        factor = int(upscaler)
        return [image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST) for image in images]
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
    else:
        source = os.fspath(upscaler)
        model = AutoModelForImageToImage.from_pretrained(source)
    return model.eval(), AutoImageProcessor.from_pretrained(source)


def _with_upscaled(images: Any, upscale: Upscaler | None) -> Any:
    return images if upscale is None else (images, upscale_images(images, upscale))


def _prepare(
    model: PreTrainedModel,
    processor: Any,
    output_type: str,
    upscale: Any,
    needs_processor: bool = False,
) -> tuple[ImageGPTConfig, ImageGPTImageProcessor | None]:
    """The preamble of `sample` and `complete`: the model's config (read as this package's, which derives n_px, the
    palette size and the SOS id) and the processor that fits it; a ValueError for what would give wrong images."""
    config = model.config
    if getattr(config, "objective", "ar") != "ar":  # a BERT model's logits are not next-pixel predictions
        raise ValueError(
            f"Sampling needs an autoregressive model (objective='ar'), not objective={config.objective!r}."
        )
    config = config if isinstance(config, ImageGPTConfig) else ImageGPTConfig.from_dict(config.to_dict())
    if output_type not in OUTPUT_TYPES or (upscale is not None and output_type != "pil"):
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES} ('pil' with `upscale`), got {output_type!r}.")
    if processor is None and (output_type != "ids" or needs_processor):
        source = getattr(model, "name_or_path", "")
        try:
            processor = ImageGPTImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            error = (
                f"Images need the image processor (its palette): pass `processor=`, or use output_type='ids' ({error})"
            )
            raise ValueError(error) from None
    if processor is not None:
        check_palette_fits(processor, config)
    return config, processor


def _input_device(model: PreTrainedModel) -> torch.device:
    """Where the prompts go: the model's device, or the CPU for a model offloaded entirely (its weights on `meta`;
    accelerate's hooks move the inputs to where each block runs)."""
    return torch.device("cpu") if model.device.type == "meta" else model.device


def _generate(
    model: PreTrainedModel,
    prompts: torch.LongTensor,
    *,
    batch_size: int | None,
    seed: int | None,
    progress: bool,
    compile: bool | None,
    precision: str | None,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    **generate_kwargs: Any,
) -> torch.LongTensor:
    """`fast_generate()` over `prompts` (N, 1 + primer) in batches, each to a whole image; the (N, n_px * n_px)
    palette ids, SOS dropped."""
    fixed = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "num_return_sequences"}
    if fixed & set(generate_kwargs):  # the image size and `num_images` / `num_completions` set these
        raise ValueError(
            f"{sorted(fixed & set(generate_kwargs))} are set by the image size and `num_images` / `num_completions`."
        )
    batch_size = len(prompts) if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    # Greedy decoding takes no sampling options (generate() warns about them). The length is given once as a total (a
    # saved generation config holds `max_length`); the minimum keeps an `eos_token_id` from stopping early; one
    # sequence per prompt, whatever the saved generation config says.
    total = model.config.n_positions + 1
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    options |= dict(do_sample=do_sample, max_length=total, min_length=total, max_new_tokens=None, min_new_tokens=None)
    options |= dict(num_return_sequences=1, **generate_kwargs)

    # The bar rides on generate()'s streamer, which beam search refuses and a user's own streamer takes over.
    num_beams = options.get("num_beams", getattr(model.generation_config, "num_beams", 1)) or 1
    progress = progress and "streamer" not in options and num_beams == 1
    bar = _progress_bar(progress, len(prompts) * (total - prompts.shape[1]))
    outputs = []
    # fork_rng: a seeded draw is repeatable and leaves the caller's random state as it was.
    device = prompts.device
    with torch.random.fork_rng([device] if device.type != "cpu" else [], seed is not None, device_type=device.type):
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
    return torch.cat(outputs) if outputs else prompts[:, 1:1]  # no images asked for: none


def _are_ids(images: Any) -> bool:
    """Whether `complete`'s `images` are palette ids: an integer tensor or numpy array other than uint8 (pixels)."""
    if isinstance(images, torch.Tensor):
        return not (images.is_floating_point() or images.is_complex() or images.dtype in (torch.bool, torch.uint8))
    return isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8


def _as_ids(images: torch.Tensor | np.ndarray, config: ImageGPTConfig) -> torch.LongTensor:
    """Palette ids as (batch, n_px * n_px): one sequence or a batch, flat or as (n_px, n_px) grids."""
    ids, n_px = torch.as_tensor(images).long(), config.n_px
    grid = ids.dim() in (2, 3) and tuple(ids.shape[-2:]) == (n_px, n_px)
    flat = ids.dim() in (1, 2) and ids.shape[-1] == n_px * n_px
    if not (grid or flat):
        raise ValueError(
            f"Palette ids must be of shape (batch,) ({n_px * n_px},) or ({n_px}, {n_px}), got {tuple(ids.shape)}."
        )
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < config.palette_size:  # SOS would read as a color
        raise ValueError(f"Palette ids must be in [0, {config.palette_size}) (drop the SOS of generate()'s output).")
    return ids.reshape(-1, n_px * n_px)


def _encode(images: Any, processor: ImageGPTImageProcessor, n_px: int) -> torch.LongTensor:
    ids = processor(images, return_tensors="pt")["input_ids"]
    if ids.shape[-1] != n_px * n_px:  # the top rows of another size would be kept, silently wrong
        raise ValueError(
            f"The processor turns each image into {ids.shape[-1]} ids but the model's images are {n_px}x{n_px} "
            f"({n_px * n_px} ids): give it `size={{'height': {n_px}, 'width': {n_px}}}`."
        )
    return ids.long()


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
