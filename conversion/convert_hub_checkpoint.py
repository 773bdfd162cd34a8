"""Re-save a transformers ImageGPT checkpoint, such as the Hub's openai/imagegpt-small|medium|large, for image_gpt_hf.

    hf download openai/imagegpt-small --local-dir imagegpt-small
    python conversion/convert_hub_checkpoint.py imagegpt-small --output_dir igpt-s-hub [--push_to_hub USER/REPO]

The source folder holds what transformers' ImageGPT writes (and what those Hub repositories hold): config.json,
weights as pytorch_model.bin or model.safetensors (sharded or not; Conv1D layout; transformers 4 also saved the
attention-mask buffers `attn.bias` / `attn.masked_bias`, which are dropped), and preprocessor_config.json with the
palette (`clusters`). The state-dict keys and shapes are already this package's, so the weights are copied unchanged;
what the output adds is this package's config (`auto_map` + source files, so `trust_remote_code=True` works without
the package), safetensors, this package's processor config, a generation config and a model card. A causal model
gets `prepend_sos=True`, so that whole images are scored as OpenAI does; a classifier keeps transformers' input
convention (the processor's pixel ids as they are), so it computes what it computed.

Before the folder is written, it is loaded back and compared with transformers' own ImageGPT on the source folder, on
random pixel ids, both models called as a user calls them: a classifier on the same ids, a causal model against
transformers' given `[SOS, x_1, ..., x_{n-1}]` (its model does not add SOS itself). It is assembled in a hidden
sibling and renamed into place only then (`image_gpt_hf.safe_io`): an existing non-empty `--output_dir` is replaced
only with `--overwrite`, and never when it is, holds or lies inside the source folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

if __package__ in (None, ""):  # run as a file (python conversion/convert_hub_checkpoint.py): find `conversion`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.cli import DTYPES, check_options, run_converter, write_checkpoint  # noqa: E402
from conversion.convert_openai_checkpoint import check_palette  # noqa: E402
from conversion.openai_checkpoint import OPENAI_SIZES, ConversionError  # noqa: E402
from conversion.verify import ATOL, Check, stored_dtype  # noqa: E402
from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTPreTrainedModel,
)

# Buffers transformers 4 saved with each attention layer; the masks now come from transformers' masking utilities.
_OLD_BUFFERS = re.compile(r".*\.attn\.(?:bias|masked_bias)$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    # mmap: a 5.6 GB pytorch_model.bin (imagegpt-large) is paged in as it is copied, not read whole up front.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_hub_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """The source folder's weights (single file or sharded with an index), without the old attention buffers."""
    name = next((n for n in _WEIGHT_FILES if (src / n).is_file()), None)
    if name is None:
        raise ConversionError(f"{src} has no weights: expected one of {', '.join(_WEIGHT_FILES)}.")
    try:
        files = [name]
        if name.endswith(".index.json"):
            files = sorted(set(json.loads((src / name).read_text())["weight_map"].values()))
        state_dict = {}
        for file in files:
            state_dict.update(_load_weight_file(src / file))
    except Exception as err:  # a missing shard, a truncated or corrupt file: torch and safetensors raise many kinds
        raise ConversionError(f"Cannot read the weights in {src}/{name}: {err}") from None
    return {k: v for k, v in state_dict.items() if not _OLD_BUFFERS.fullmatch(k)}


def load_hub_palette(src: Path, palette_size: int) -> np.ndarray:
    """The palette (`clusters`) of the source's preprocessor_config.json, checked like OpenAI's palette file."""
    path = src / "preprocessor_config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no preprocessor_config.json, so no palette (`clusters`).")
    try:  # not JSON, not a JSON object, no `clusters`, ragged rows or strings, ...
        clusters = np.asarray(json.loads(path.read_text())["clusters"], dtype=np.float64)
    except (ValueError, AttributeError, TypeError, KeyError) as err:
        raise ConversionError(
            f"Cannot read the palette (`clusters`, an array of numbers) in {path}: {err!r}"
        ) from None
    return check_palette(clusters, f"The palette (`clusters`) in {path}", palette_size)


def build_hub_model(src: Path, state_dict: dict[str, torch.Tensor]) -> ImageGPTPreTrainedModel:
    """This package's model of the source's kind (causal LM, or classifier), holding exactly the source's weights."""
    try:
        source_config = json.loads((src / "config.json").read_text())
        model_type = source_config.get("model_type")
    except (ValueError, AttributeError) as err:  # not JSON, or not a JSON object
        raise ConversionError(f"Cannot read {src}/config.json: {err}") from None
    if model_type != "imagegpt":
        raise ConversionError(f"{src}/config.json is not an ImageGPT config (model_type {model_type!r}).")
    has_lm_head, has_score = "lm_head.weight" in state_dict, "score.weight" in state_dict
    if has_lm_head == has_score:
        raise ConversionError(
            f"{src} must hold either an LM head (lm_head.weight, ImageGPTForCausalImageModeling) or a classifier "
            f"(score.weight, ImageGPTForImageClassification); it has {'both' if has_lm_head else 'neither'}."
        )
    # A causal model scores whole images as OpenAI does (prepend_sos); a classifier keeps the input it was trained
    # on, the processor's pixel ids as they are.
    try:
        config = ImageGPTConfig.from_pretrained(src, objective="ar", prepend_sos=has_lm_head)
        _ = config.n_px  # raises for a non-square n_positions: the processor needs n_px x n_px images
    except (ValueError, TypeError) as err:  # a field out of range or of the wrong type
        raise ConversionError(f"{src}/config.json is not a usable ImageGPT config: {err}") from None
    config.architectures = None  # set again by save_pretrained from the class actually saved
    model_class = ImageGPTForCausalImageModeling if has_lm_head else ImageGPTForImageClassification
    with torch.device("meta"):
        model = model_class(config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:  # missing / unexpected keys or wrong shapes, all listed by torch
        raise ConversionError(f"The weights in {src} do not fit its config.json: {err}") from None
    return model.eval()


def compare_with_transformers(
    folder: Path, src: Path, num_images: int = 2, seed: int = 0, atol: float = ATOL
) -> list[Check]:
    """The converted `folder` against transformers' own ImageGPT loaded from `src`, on the same random pixel ids.

    Ours is called as a user calls it, on pixel ids alone. A classifier must give transformers' logits on those same
    ids; a causal model (`prepend_sos`) must give what transformers' gives on `[SOS, x_1, ..., x_{n-1}]`. Both run in
    float32; transformers' model gets its weights rounded to the folder's dtype first, so the comparison checks the
    copy of every weight exactly whatever `--dtype` was.
    """
    config = ImageGPTConfig.from_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, config.palette_size, (num_images, config.n_positions), generator=generator)
    if "ImageGPTForImageClassification" in (config.architectures or []):
        name, ours_class, theirs_ids = "classification logits", ImageGPTForImageClassification, pixels
    else:
        sos = torch.full_like(pixels[:, :1], config.sos_token_id)
        name, ours_class, theirs_ids = (
            "causal logits",
            ImageGPTForCausalImageModeling,
            torch.cat([sos, pixels[:, :-1]], 1),
        )
    theirs = getattr(transformers, ours_class.__name__).from_pretrained(src, dtype=torch.float32)
    theirs = theirs.to(DTYPES[stored_dtype(config)]).float().eval()
    ours = ours_class.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(input_ids=pixels).logits - theirs(input_ids=theirs_ids).logits).abs().max()
    return [Check(name, float(diff), atol)]


def convert_hub_checkpoint(
    src: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "float32",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    verify: bool = True,
    repo_id: str | None = None,
    base_model: str | None = None,
) -> list[Check]:
    """Re-save the transformers ImageGPT folder `src` into `output_dir`; see the module docstring.

    `base_model` (e.g. "openai/imagegpt-small") names the source on the Hub in the model card and its metadata;
    `repo_id` names the destination in the card's usage snippet.
    """
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} is not a checkpoint folder: it has no config.json.")
    check_options(output_dir, [src], overwrite, dtype, max_shard_size)
    model = build_hub_model(src, load_hub_state_dict(src))
    config = model.config
    palette = load_hub_palette(src, config.palette_size)
    size = OPENAI_SIZES.get((config.n_layer, config.n_embd, config.n_head))
    name = f"iGPT-{size.upper()}" if size else f"iGPT ({config.n_layer} layers, width {config.n_embd})"
    facts: dict[str, object] = {
        "model_name": f"{name} AR {config.n_px}x{config.n_px}",
        "source": f"The transformers ImageGPT checkpoint `{base_model or src.name}`, re-saved with "
        "`conversion/convert_hub_checkpoint.py` (weights unchanged).",
        **({"base_model": base_model} if base_model else {}),
        **({"repo_id": repo_id} if repo_id else {}),
    }
    inputs = "given SOS explicitly" if config.prepend_sos else "on the same pixel ids"
    options = {"dtype": dtype, "max_shard_size": max_shard_size, "overwrite": overwrite}
    against = f"transformers' own ImageGPT on the source folder, {inputs}"
    check = (lambda folder: compare_with_transformers(folder, src)) if verify else None
    return write_checkpoint(output_dir, [src], model, palette, options, check, against, facts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder laid out like openai/imagegpt-small (config.json, weights, palette)")
    parser.add_argument("--base_model", help="the source's Hub id, e.g. openai/imagegpt-small, for the model card")
    return run_converter(parser, convert_hub_checkpoint, argv, "transformers' ImageGPT on the source")


if __name__ == "__main__":
    sys.exit(main())
