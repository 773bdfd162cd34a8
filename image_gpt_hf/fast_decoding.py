"""Fast decoding for autoregressive Image GPT: a static cache and a compiled decode step, through `generate()`.

`fast_generate(model, input_ids, **generate_kwargs)` returns what `model.generate(input_ids, **generate_kwargs)`
returns, by the fastest correct path on the model's device: transformers' `StaticCache` (pre-allocated once, written in
place, reused by later calls of the same batch size) and a decode step compiled with `torch.compile(fullgraph=True,
dynamic=False)`. The step is compiled once per model, batch size, dtype and device and kept for later calls; a prompt
longer than one id (the prefill of a completion) and the first step into a fresh cache run eagerly, so there is one
graph per batch size and completions of any primer length share it.
Where compilation is unavailable or fails, the same call runs on the default path and the reason is logged. Greedy
float32 tokens are the default path's.

`precision="bfloat16"` or `"int8"` decodes with lower-precision weights (a copy kept per model and remade when its
weights change; the model itself is untouched): bfloat16 weights and activations, or int8 weight-only quantization
(per-output-channel scales, bfloat16 activations) of every projection and the LM head, which inductor lowers to its int8
weight-only matmul kernel on CPU. A peft model decodes on the default path (merge its adapter to compile or
quantize).

```python
from image_gpt_hf.fast_decoding import fast_generate

ids = fast_generate(model, prompts, max_new_tokens=1024, do_sample=True, top_k=64)          # auto: compile if it pays
ids = fast_generate(model, prompts, max_new_tokens=1024, do_sample=False, compile=False)    # the default path
ids = fast_generate(model, prompts, max_new_tokens=1024, do_sample=False, precision="int8")  # int8 weights
```
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

logger = logging.get_logger(__name__)

PRECISIONS = (None, "bfloat16", "int8")
# compile=None compiles models at least this large: below it, compiling (tens of seconds) costs more than it saves
# on a whole image (the tiny preset, 1.4M parameters, eagerly decodes a 32x32 image in seconds on CPU).
AUTO_COMPILE_MIN_PARAMETERS = 20_000_000
# Options of generate() that bring their own cache or compilation: fast_generate leaves such calls as they are.
_OWN_CACHE_OPTIONS = ("past_key_values", "cache", "compile_config", "cache_implementation", "disable_compile")

# model -> {(batch, precision, dtype, device): _Decoder}; entries go with the model.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    *,
    compile: bool | None = None,
    precision: str | None = None,
    **generate_kwargs: Any,
) -> torch.LongTensor:
    """`model.generate(input_ids, **generate_kwargs)` through a static cache and a compiled decode step.

    Args:
        model: an autoregressive Image GPT (`ImageGPTForCausalImageModeling`, or transformers' own), in eval mode.
        input_ids: `(batch, prompt_length)` prompts (the SOS id, then any primer ids).
        compile: `None` (auto) compiles the decode step for models of at least `AUTO_COMPILE_MIN_PARAMETERS`
            parameters, `True` compiles it whatever the size, `False` runs eagerly (with `precision=None`, exactly
            `model.generate()`). A failed compilation falls back to the eager step, with a logged warning.
        precision: `None` (the model's own weights), `"bfloat16"` or `"int8"` (weight-only, bfloat16 activations).
        **generate_kwargs: any option of `generate()`. A call that brings its own cache or compilation
            (`past_key_values`, `cache_implementation`, `compile_config`, `disable_compile`) runs as given.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"`compile` must be None (auto), True or False, got {compile!r}.")
    if precision is not None and getattr(model, "peft_config", None):
        raise ValueError(
            f"precision={precision!r} would quantize the adapter's own layers too: merge the adapter first "
            "(`model = model.merge_and_unload()`), or decode with precision=None."
        )
    reason = _default_path_reason(model, compile, generate_kwargs)
    if reason is not None:
        if compile:
            logger.warning(f"fast_generate: the decode step is not compiled: {reason}.")
        else:
            logger.info(f"fast_generate: the default path: {reason}.")
        if precision is None:
            return model.generate(input_ids, **generate_kwargs)
        return _current(lower_precision_copy(model, precision), model).generate(input_ids, **generate_kwargs)
    decoder = _current(_decoder(model, precision, input_ids.shape[0]).model, model)
    # disable_compile: the step compiles itself; generate() must not wrap it in a second compilation on accelerators.
    return decoder.generate(input_ids, cache_implementation="static", disable_compile=True, **generate_kwargs)


def lower_precision_copy(model: PreTrainedModel, precision: str) -> PreTrainedModel:
    """A copy of `model` with `"bfloat16"` weights, or with `"int8"` weight-only quantized projections and LM head
    (every `Conv1D` and `nn.Linear`; embeddings and norms in bfloat16). Made once per model and precision, then
    reused while the model's weights and device stay as they were (checked at each call by a fingerprint of every
    weight, about one read of them); a changed model gets a new copy. The copy follows the model's train/eval mode."""
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"`precision` must be 'bfloat16' or 'int8', got {precision!r}.")
    if any(p.device.type == "meta" for p in model.parameters()):  # else accelerate's "can't move a model ..."
        raise ValueError(
            f"precision={precision!r} makes a copy of the model's weights, and this model keeps some of them offloaded "
            "(device_map with offload): decode it with precision=None, or load it in bfloat16 "
            "(`from_pretrained(..., dtype=torch.bfloat16)`) where it fits in memory."
        )
    copies = _DECODERS.setdefault(model, {})
    weights = (model.device, _fingerprint(model))
    kept = copies.get(precision)
    if kept is None or kept[0][0] != weights[0] or not torch.equal(kept[0][1], weights[1]):
        for key in [k for k in copies if isinstance(k, tuple) and k[1] == precision]:
            del copies[key]  # compiled steps of the stale copy
        low = copy.deepcopy(model).to(torch.bfloat16)
        if precision == "int8":
            quantize_int8_weight_only(low)
        copies[precision] = kept = (weights, low)
    return kept[1].train(model.training)


@torch.no_grad()
def _fingerprint(model: nn.Module) -> torch.Tensor:
    """One number per parameter: its values dotted with fixed random weights (in float64, on its own device). Any
    edit changes it (a permutation of rows too, which a sum would not see), unless made to cancel these weights."""
    prints = []
    for index, p in enumerate(model.parameters()):
        generator = torch.Generator(p.device).manual_seed(index)
        weights = torch.randn(p.numel(), generator=generator, device=p.device, dtype=torch.float64)
        prints.append((p.detach().flatten().double() @ weights).cpu())
    return torch.stack(prints)


def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    """Replace, in place, every `Conv1D` (GPT-2 layout: weight `(in, out)`) and `nn.Linear` of `model` with an
    `Int8WeightOnlyLinear` that keeps the weight as int8 with one scale per output channel. Returns `model`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                weight = child.weight.detach().t()  # (in, out) -> (out, in)
            elif isinstance(child, nn.Linear):
                weight = child.weight.detach()
            else:
                continue
            bias = child.bias.detach() if child.bias is not None else None
            setattr(module, child_name, Int8WeightOnlyLinear(weight, bias))
    return model


class Int8WeightOnlyLinear(nn.Module):
    """`y = (x @ q.T) * scale + bias`: weight `q` int8 `(out, in)`, symmetric, one scale per output channel.

    Written as `F.linear(x, q.to(x.dtype)) * scale`, which `torch.compile` lowers on CPU (bfloat16 `x` and scales)
    to a matmul that reads the int8 weight directly; eagerly it dequantizes the weight at every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        # The scale is rounded to `dtype` first, so that the one the matmul multiplies by is the one quantized with.
        scale = (weight.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny).to(dtype)
        quantized = torch.round(weight.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("weight", quantized)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def forget(model: PreTrainedModel) -> None:
    """Drop the compiled steps, static caches and lower-precision copies kept for `model`."""
    _DECODERS.pop(model, None)


# ---------------------------------------------------------------------------------------------------------- helpers


def _default_path_reason(model: PreTrainedModel, compile: bool | None, generate_kwargs: dict) -> str | None:
    """Why this call cannot, or need not, take the compiled path (None: it takes it)."""
    if compile is False:
        return "compile=False"
    given = [name for name in _OWN_CACHE_OPTIONS if name in generate_kwargs]
    config = generate_kwargs.get("generation_config") or model.generation_config
    given += [name for name in _OWN_CACHE_OPTIONS[2:] if getattr(config, name, None)]
    if given:
        return f"the call or its generation config sets {', '.join(given)} itself"
    if getattr(model, "peft_config", None):
        return "a peft model's generate() calls its base model's own forward (merge_and_unload() first to compile)"
    if model.training:
        return "the model is in training mode (call model.eval() first)"
    if compile is None and model.num_parameters() < AUTO_COMPILE_MIN_PARAMETERS:
        return (
            f"a model of {model.num_parameters():,} parameters decodes faster eagerly than it compiles "
            f"(auto compiles from {AUTO_COMPILE_MIN_PARAMETERS:,}; compile=True forces it)"
        )
    return None


class _Decoder:
    """A view of the model (shared modules and weights) whose forward runs the compiled step for one-id inputs."""

    def __init__(self, model: PreTrainedModel, key: tuple):
        self.model = copy.copy(model)  # shallow: the same modules and parameters, its own `forward` and cache slot
        self.key = key
        self.failed = False
        eager = self.model.forward
        mode = "reduce-overhead" if model.device.type == "cuda" else None  # CUDA graphs on CUDA
        try:
            compiled = torch.compile(eager, fullgraph=True, dynamic=False, mode=mode)
        except Exception as error:  # noqa: BLE001 (e.g. a Python version torch.compile does not support)
            self._fall_back(error)
            compiled = eager

        @functools.wraps(eager)  # generate() reads the forward's signature
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            # Eager: a prompt's prefill, and the first step of a fresh cache (which allocates it: a graph of its own).
            fresh = cache is not None and not getattr(cache.layers[0], "is_initialized", True)
            if self.failed or ids is None or ids.shape[1] != 1 or fresh:
                return eager(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 (compilation failed: this step and the next ones run eagerly)
                self._fall_back(error)
                return eager(*args, **kwargs)

        self.model.forward = forward

    def _fall_back(self, error: Exception) -> None:
        self.failed = True
        logger.warning(
            f"fast_generate: compiling the decode step failed ({type(error).__name__}: {str(error)[:300]}); "
            f"decoding eagerly instead (batch, precision, dtype, device = {self.key})."
        )


def _current(copy_: PreTrainedModel, model: PreTrainedModel) -> PreTrainedModel:
    """`copy_` (a view or a lower-precision copy of `model`) with the generation config `model` has now."""
    copy_.generation_config = model.generation_config
    return copy_


def _decoder(model: PreTrainedModel, precision: str | None, batch: int) -> _Decoder:
    source = model if precision is None else lower_precision_copy(model, precision)
    key = (batch, precision, source.dtype, source.device)
    decoders = _DECODERS.setdefault(model, {})
    if key not in decoders:
        decoders[key] = _Decoder(source, key)
    return decoders[key]


__all__ = [
    "AUTO_COMPILE_MIN_PARAMETERS",
    "Int8WeightOnlyLinear",
    "PRECISIONS",
    "fast_generate",
    "forget",
    "lower_precision_copy",
    "quantize_int8_weight_only",
]
