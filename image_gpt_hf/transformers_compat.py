"""What depends on the installed transformers release, in one place.

Supported: transformers >= 5.22, < 6. Each difference is read off the installed library itself (a signature or a
dataclass field), not off its version number, so a release that backports or reverts a change is handled as it is.
Every entry has a test (tests/test_transformers_compat.py; the video processor one is
tests/test_image_processing.py::test_loading_a_saved_checkpoint_never_asks_to_run_its_code), and CI runs the suite on
the lowest supported release and on the newest one.

- 5.24 renamed the key/value cache from `past_key_values` to `cache`: in model outputs (`outputs.cache`), in the
  model inputs `generate()` builds, and in the masking utilities' keyword arguments. This package's models accept
  the cache under both names on every release and return it under the field the installed release has.
- `output_hidden_states=[i, j]` (indices into the tuple of hidden states, negative ones from the end) gives a tuple of
  full length with `None` where a state is not selected since transformers' output capturing learned to select by
  index (`selected_hidden_states`, 5.23); before, it counted from the first layer's output instead. This
  package's models give the newer result on every release.

- Since transformers' `pipeline()` looks for a video processor for every image task (5.2x), a saved
  `preprocessor_config.json` without a `video_processor_type` makes AutoVideoProcessor derive one from
  `auto_map["AutoImageProcessor"]` (a class that does not exist) and ask, for 15 s, whether to run the folder's code.
  The image processor saves `video_processor_type: NO_VIDEO_PROCESSOR`, a name of no class: AutoVideoProcessor then
  raises a ValueError, which pipelines skip.

This module is shipped as remote code next to modeling_imagegpt.py and image_processing_imagegpt.py: it imports only
transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_OUTPUT_FIELD = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)
"""The name of the cache field of transformers' model outputs (and of the cache in generate()'s model inputs)."""

NO_VIDEO_PROCESSOR = "none"
"""The `video_processor_type` the image processor saves: the name of no class (see the module docstring)."""

MASK_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
"""The keyword `create_causal_mask` / `create_bidirectional_mask` take the cache under."""


try:  # transformers' output capturing selects hidden states by their index in the output
    from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401

    SELECTS_HIDDEN_STATES_BY_INDEX = True
except ImportError:
    SELECTS_HIDDEN_STATES_BY_INDEX = False


def select_hidden_states_by_index(forward: Callable) -> Callable:
    """Decorator (outside `capture_outputs`) for a forward whose `output_hidden_states` may be a list of indices:
    where the installed release cannot select by index, capture them all and keep the selected ones."""
    if SELECTS_HIDDEN_STATES_BY_INDEX:
        return forward

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        selection = kwargs.get("output_hidden_states")
        if selection is None or isinstance(selection, bool):
            return forward(self, *args, **kwargs)
        indices = [selection] if isinstance(selection, int) else list(selection)
        return_dict = kwargs.pop("return_dict", True)
        outputs = forward(self, *args, **{**kwargs, "output_hidden_states": True})
        count = len(outputs.hidden_states)
        keep = {index % count for index in indices if -count <= index < count}
        outputs.hidden_states = tuple(state if i in keep else None for i, state in enumerate(outputs.hidden_states))
        return outputs if return_dict is not False else outputs.to_tuple()

    return wrapper


def resolve_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a forward was given, under either of its names (`cache` since transformers 5.24, `past_key_values`
    before; both are accepted on every release). The old name warns where the installed release has renamed it, as
    transformers' own models do."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as `cache` (or under its older name `past_key_values`), not both.")
    if CACHE_OUTPUT_FIELD == "cache":
        warnings.warn(
            "`past_key_values` is deprecated: transformers 5.24 renamed the cache argument `cache`. Pass `cache=` "
            "(image_gpt_hf's models take it on every transformers release they support).",
            FutureWarning,
            stacklevel=_callers_stacklevel(),
        )
    return past_key_values


def _callers_stacklevel() -> int:
    """The `stacklevel` that attributes a warning to the first frame outside this package, transformers and torch (the
    user's call), however many decorators wrap the forward that warns."""
    level, frame = 1, inspect.currentframe()
    internal = ("image_gpt_hf", "transformers", "torch")  # remote code runs as transformers_modules.*
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0].startswith(internal):
        frame, level = frame.f_back, level + 1
    return max(level - 1, 1)


def cache_output(cache: Any) -> dict[str, Any]:
    """`{field: cache}` for a model output, under the field name of the installed release."""
    return {CACHE_OUTPUT_FIELD: cache}


def output_cache(outputs: Any) -> Any:
    """The cache of a model output (None if it has none), under the field name of the installed release."""
    return getattr(outputs, CACHE_OUTPUT_FIELD, None)


def mask_cache_argument(cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for transformers' masking utilities."""
    return {MASK_CACHE_ARGUMENT: cache}


__all__ = [
    "NO_VIDEO_PROCESSOR",
    "SELECTS_HIDDEN_STATES_BY_INDEX",
    "select_hidden_states_by_index",
    "CACHE_OUTPUT_FIELD",
    "MASK_CACHE_ARGUMENT",
    "cache_output",
    "mask_cache_argument",
    "output_cache",
    "resolve_cache",
]


def builtin_imagegpt(module: str = "modeling_imagegpt"):
    """transformers' own ImageGPT `module` (e.g. "modeling_imagegpt", "configuration_imagegpt",
    "image_processing_pil_imagegpt"), where the release keeps it: `transformers.models.imagegpt`, or
    `transformers.models.deprecated.imagegpt` once it is moved there; None where neither exists."""
    import importlib

    for package in ("transformers.models.imagegpt", "transformers.models.deprecated.imagegpt"):
        try:
            return importlib.import_module(f"{package}.{module}")
        except ImportError:
            continue
    return None
