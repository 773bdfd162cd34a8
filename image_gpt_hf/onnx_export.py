"""Export Image GPT checkpoints to ONNX, check them in onnxruntime, and decode greedily with onnxruntime.

Three tasks, each exported with a dynamic batch dimension by `torch.onnx.export(..., dynamo=True)`:

- `feature-extraction` (`ImageGPTModel`): input `input_ids` `(batch, n_positions)`; outputs `last_hidden_state`
  `(batch, n_positions, n_embd)` (the final normed layer, per pixel) and `pooler_output` `(batch, n_embd)` (the
  paper's feature: layer `config.feature_layer`, default `n_layer // 2`, normed and mean-pooled), which are what the
  `image-feature-extraction` pipeline returns without and with `pool=True`. With `layers=[l, ...]` also
  `features.l` `(batch, n_positions, n_embd)` and `pooled_features.l` `(batch, n_embd)` per chosen layer, what
  `ImageGPTFeatureExtractionPipeline` returns with `layer=l` (the paper's `n^l`, see `ImageGPTModel.normed_features`).
- `image-classification` (`ImageGPTForImageClassification`): input `input_ids` `(batch, n_positions)`; output `logits`
  `(batch, num_labels)`.
- `causal-lm` (`ImageGPTForCausalImageModeling`, autoregressive checkpoints): inputs `input_ids` `(batch, sequence)`
  and the key/value cache `past.{i}.key`, `past.{i}.value` `(batch, n_head, past_sequence, head_dim)` per layer
  (`past_sequence` may be 0); outputs `logits` `(batch, sequence, palette_size)` and `present.{i}.key`,
  `present.{i}.value` `(batch, n_head, past_sequence + sequence, head_dim)`. `greedy_generate` runs it token by token;
  its tokens are those of `model.generate(do_sample=False)`.

The ids are the image processor's. An id outside `[0, vocab_size)`, negative ones included (ONNX's Gather would read
them from the end of the table), makes onnxruntime refuse the run. A checkpoint with `prepend_sos=True` adds SOS inside
the feature and classification graphs, as its PyTorch forward does; the causal-lm graph takes ids that start with SOS.

The output folder holds `model.onnx` (plus `model.onnx.data` over 2 GB), `config.json` and the checkpoint's
`preprocessor_config.json` where it has one. Before the folder is put in place (`image_gpt_hf.safe_io`: complete or
absent, a non-empty folder replaced only with `--overwrite`), onnxruntime runs the export on random ids (batch sizes 1
and 3) and a difference from PyTorch's outputs is an error that leaves nothing behind.

    python -m image_gpt_hf.onnx_export --model_name_or_path PATH --output_dir DIR --task feature-extraction

optimum's ONNX exporter is not used: optimum-onnx (0.1.0, the newest release) requires transformers < 4.58 and does
not import on transformers 5. Needs `onnx`, `onnxscript` and `onnxruntime` (`pip install "image_gpt_hf[onnx]"`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, DynamicCache

from . import __version__
from .configuration_imagegpt import ImageGPTConfig
from .modeling_imagegpt import (
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTModel,
    ImageGPTPreTrainedModel,
)
from .safe_io import check_output_path, staged_dir

logger = logging.getLogger(__name__)

TASKS = ("feature-extraction", "image-classification", "causal-lm")
ONNX_FILE = "model.onnx"
MIN_OPSET = 18  # the dynamo exporter's lowest
METADATA_PREFIX = "image_gpt_hf."
PROG = "igpt-export-onnx"

__all__ = ["ONNX_FILE", "TASKS", "OnnxExport", "export_onnx", "greedy_generate", "main"]


@dataclass
class OnnxExport:
    """What `export_onnx` wrote: the model file, its opset, input and output names, and the largest difference
    between onnxruntime's and PyTorch's outputs in the check (None when the check was skipped)."""

    path: Path
    task: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    max_abs_diff: float | None


# ---------------------------------------------------------------------------------------------------------------------
# Wrappers: the exported graphs take and return plain tensors
# ---------------------------------------------------------------------------------------------------------------------


def _refuse_negative_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ONNX's Gather reads a negative index from the end (-1 would embed SOS): move negative ids past the end, where
    onnxruntime refuses the index, as it refuses `vocab_size` and above."""
    return torch.where(input_ids < 0, vocab_size, input_ids)


class _FeatureExtraction(nn.Module):
    def __init__(self, decoder: ImageGPTModel, layers: list[int]):
        super().__init__()
        self.decoder = decoder
        self.layers = layers

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids = _refuse_negative_ids(input_ids, self.decoder.config.vocab_size)
        outputs = self.decoder(
            input_ids, use_cache=False, output_hidden_states=bool(self.layers), return_pooler_output=True
        )
        results = [outputs.last_hidden_state, outputs.pooler_output]
        for layer in self.layers:
            features = self.decoder.normed_features(outputs.hidden_states[layer], layer)  # (B, T, d)
            results += [features, features.mean(dim=1)]
        return tuple(results)


class _Classification(nn.Module):
    def __init__(self, model: ImageGPTForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(_refuse_negative_ids(input_ids, self.model.config.vocab_size)).logits


class _CausalLM(nn.Module):
    """One step of cached decoding: new ids and the cache so far in, logits of the new ids and the grown cache out."""

    def __init__(self, model: ImageGPTForCausalImageModeling):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.model.config.n_layer):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)  # (B, nh, P, hs) each
        input_ids = _refuse_negative_ids(input_ids, self.model.config.vocab_size)
        logits = self.model(input_ids, cache=cache, use_cache=True, prepend_sos=False).logits
        present = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (logits, *present)


def _past_names(n_layer: int, prefix: str = "past") -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(n_layer) for kind in ("key", "value")]


# ---------------------------------------------------------------------------------------------------------------------
# Argument and checkpoint checks
# ---------------------------------------------------------------------------------------------------------------------


def _check_options(task: str, layers: Sequence[int] | None) -> None:
    if task not in TASKS:
        raise ValueError(f"--task {task!r} is not one of {', '.join(TASKS)}.")
    if layers and task != "feature-extraction":  # they would be left out of the graph without a word
        raise ValueError(
            f"--layers chooses extra feature outputs; it applies to --task feature-extraction, not {task!r}."
        )


def _require(validate: bool) -> None:
    """The packages the export needs, checked before any work (torch asks for onnxscript only halfway through)."""
    import importlib.util

    missing = [
        name for name in ["onnx", "onnxscript"] + ["onnxruntime"] * validate if not importlib.util.find_spec(name)
    ]
    if missing:
        raise ImportError(f'Exporting to ONNX needs {", ".join(missing)}: pip install "image_gpt_hf[onnx]".')


_TASK_CLASSES = {
    "feature-extraction": ImageGPTModel,
    "image-classification": ImageGPTForImageClassification,
    "causal-lm": ImageGPTForCausalImageModeling,
}
_ARCHITECTURES = {
    cls.__name__: cls
    for cls in (
        ImageGPTModel,
        ImageGPTForCausalImageModeling,
        ImageGPTForMaskedImageModeling,
        ImageGPTForImageClassification,
    )
}


def _check_config(config: Any, task: str, source: str) -> None:
    if not isinstance(config, ImageGPTConfig):  # its weights would load into a model of another architecture
        raise ValueError(
            f"{source} is a {config.model_type!r} checkpoint, not an Image GPT one (model_type 'imagegpt')."
        )
    if task == "causal-lm" and config.objective != "ar":  # a BERT model's logits are not next-pixel predictions
        raise ValueError(
            f"--task causal-lm needs an autoregressive checkpoint; {source} has objective={config.objective!r}. Export "
            "it with --task feature-extraction or image-classification."
        )


def _load(path: str, task: str) -> ImageGPTPreTrainedModel:
    """The task's model from a folder or Hub id, in float32; refused when the checkpoint lacks the task's weights."""
    source = f"--model_name_or_path {path}"
    config = AutoConfig.from_pretrained(path)
    _check_config(config, task, source)
    model_class = _TASK_CLASSES[task]
    if task == "feature-extraction":
        # The checkpoint's own class, whose decoder is exported: loading its weights leaves none unused.
        saved = [_ARCHITECTURES[name] for name in config.architectures or [] if name in _ARCHITECTURES]
        model_class = saved[0] if saved else ImageGPTModel
    model, info = model_class.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True)
    missing = list(info["missing_keys"]) + [str(key) for key in info.get("mismatched_keys", [])]
    if missing:  # else the export would carry random weights
        head = {"image-classification": " (no classification head: fine-tune it first)", "causal-lm": " (no LM head)"}
        raise ValueError(
            f"{source} lacks weights {model_class.__name__} needs for --task {task}{head.get(task, '')}: "
            f"{', '.join(sorted(missing)[:5])}{' ...' if len(missing) > 5 else ''}. Exporting it would use random ones."
        )
    return model


def _task_model(model: ImageGPTPreTrainedModel, task: str) -> ImageGPTPreTrainedModel:
    _check_config(model.config, task, f"The model ({type(model).__name__})")
    if task != "feature-extraction" and not isinstance(model, _TASK_CLASSES[task]):
        raise ValueError(f"--task {task} needs an {_TASK_CLASSES[task].__name__}, got {type(model).__name__}.")
    if model.dtype != torch.float32:  # the export is float32 (onnxruntime's CPU kernels)
        raise ValueError(f"The model's weights are {model.dtype}; the export is float32: pass `model.float()`.")
    return model.base_model if task == "feature-extraction" else model


def _eager_twin(model: ImageGPTPreTrainedModel) -> ImageGPTPreTrainedModel:
    """The model in eval mode with eager attention, sharing its weights; the model itself is left as it is.

    Eager attention (matmul, additive mask, softmax) becomes the same short graph at every opset, whereas torch's sdpa
    becomes, below opset 23 (ONNX's own Attention operator), a longer one with its masking and NaN guards.
    """
    config = type(model.config).from_dict(model.config.to_dict(), attn_implementation="eager")
    with torch.device("meta"):  # no memory and no random init for weights that are replaced right away
        twin = type(model)(config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.to(model.device).eval()


def _random_ids(shape: tuple[int, ...], high: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # leaves the global RNG alone
    return torch.randint(0, high, shape, generator=generator).to(device)


def _graph_spec(model: ImageGPTPreTrainedModel, task: str, layers: list[int]) -> tuple[nn.Module, tuple, dict]:
    """The wrapper module, example inputs and the dynamic shapes, input and output names of a task."""
    config, device = model.config, model.device
    batch = torch.export.Dim("batch")
    if task == "causal-lm":
        n_head, head_dim = config.n_head, config.n_embd // config.n_head
        sequence = torch.export.Dim("sequence", max=config.n_positions)
        past_sequence = torch.export.Dim("past_sequence", max=config.n_positions)
        # Distinct example sizes (2, 3, 4), so that the exporter does not tie the dimensions to each other.
        ids = _random_ids((2, 3), config.palette_size, 0, device)
        past = tuple(torch.zeros(2, n_head, 4, head_dim, device=device) for _ in range(2 * config.n_layer))
        names = _past_names(config.n_layer)
        spec = {
            "input_names": ["input_ids", *names],
            "output_names": ["logits", *_past_names(config.n_layer, "present")],
            "dynamic_shapes": {
                "input_ids": {0: batch, 1: sequence},
                "past": tuple({0: batch, 2: past_sequence} for _ in names),
            },
        }
        return _CausalLM(model).eval(), (ids, *past), spec
    ids = _random_ids((2, config.n_positions), config.palette_size, 0, device)
    if task == "feature-extraction":
        wrapper = _FeatureExtraction(model, layers)
        outputs = ["last_hidden_state", "pooler_output"]
        outputs += [name for layer in layers for name in (f"features.{layer}", f"pooled_features.{layer}")]
    else:
        wrapper, outputs = _Classification(model), ["logits"]
    spec = {"input_names": ["input_ids"], "output_names": outputs, "dynamic_shapes": {"input_ids": {0: batch}}}
    return wrapper.eval(), (ids,), spec


def _metadata(model: ImageGPTPreTrainedModel, task: str, layers: list[int]) -> dict[str, str]:
    config = model.config
    decoder = model.base_model
    facts = {
        "task": task,
        "version": __version__,
        "n_positions": config.n_positions,
        "vocab_size": config.vocab_size,
        "sos_token_id": config.sos_token_id,
        "objective": config.objective,
        "prepend_sos": config.prepend_sos,
    }
    if task == "feature-extraction":
        facts["pooler_layer"] = decoder.resolve_layer(None)
        facts["layers"] = ",".join(map(str, layers))
    return {
        METADATA_PREFIX + key: str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in facts.items()
    }


def _exported_opset(model_proto: Any) -> int:
    return next(entry.version for entry in model_proto.opset_import if entry.domain in ("", "ai.onnx"))


def _check_opset(model_proto: Any, requested: int | None) -> int:
    """The opset of the default domain; refused when the exporter silently wrote another than the one requested."""
    written = _exported_opset(model_proto)
    if requested is not None and written != requested:
        raise ValueError(
            f"The exporter wrote opset {written} instead of the requested --opset {requested} (it could not convert "
            "every operator); choose another --opset, or leave it out for torch's default."
        )
    return written


def export_onnx(
    model: str | os.PathLike | ImageGPTPreTrainedModel,
    output_dir: str | os.PathLike,
    task: str = "feature-extraction",
    *,
    layers: Sequence[int] | None = None,
    opset: int | None = None,
    image_processor: Any | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> OnnxExport:
    """Export an Image GPT checkpoint (a folder, a Hub id, or a model of this package) to `output_dir/model.onnx`.

    Args:
        model: a checkpoint path or Hub id (loaded in float32 with the task's class; refused if it lacks the task's
            weights), or an in-memory float32 model: any Image GPT model for `feature-extraction` (its decoder is
            exported), an `ImageGPTForImageClassification` or an `ImageGPTForCausalImageModeling` for the others.
        output_dir: the folder to write; refused if it exists and is not empty, unless `overwrite`.
        task: "feature-extraction", "image-classification" or "causal-lm" (see the module docstring for the graphs).
        layers: feature-extraction only: extra hidden-state indices to output per pixel and pooled.
        opset: the ONNX opset (18 or newer); None is torch's default.
        image_processor: saved next to the model (for a checkpoint path, its own processor is copied if it has one).
        validate: run the exported model in onnxruntime and compare it with PyTorch before writing it.
        atol: the largest difference allowed in that check, relative to the largest magnitude of each output (at
            least 1).
        overwrite: replace a non-empty `output_dir`.

    Returns:
        An `OnnxExport` with the path written, the opset, the names of the inputs and outputs, and the check's largest
        difference.

    Raises:
        ValueError: a bad checkpoint, model or option, or outputs that differ from PyTorch's; nothing is written.
            (`image_gpt_hf.safe_io.OutputPathError`, a ValueError, for an output path it must not write to.)
        ImportError: onnx, onnxscript or (with `validate`) onnxruntime is not installed.
    """
    _require(validate)
    _check_options(task, layers)
    path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    check_output_path(output_dir, inputs=[path] if path is not None else [], overwrite=overwrite)
    if path is not None:
        model = _load(path, task)
        if image_processor is None:
            image_processor = _processor_of(path)
    model = _task_model(model, task)
    resolved = sorted({model.base_model.resolve_layer(layer) for layer in layers or []})

    twin = _eager_twin(model)
    wrapper, args, spec = _graph_spec(twin, task, resolved)
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter names each dynamic axis once and says so for every other input that shares it.
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        # torch's own pytree code, called by the exporter, warns about its own deprecated use.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, verbose=False, **spec)
    written_opset = _check_opset(program.model_proto, opset)
    program.model.metadata_props.update(_metadata(model, task, resolved))
    with staged_dir(output_dir, overwrite=overwrite, inputs=[path] if path is not None else []) as tmp:
        program.save(tmp / ONNX_FILE)
        _save_config(model.config, tmp / "config.json")
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        max_diff = _max_difference(tmp / ONNX_FILE, wrapper, task, atol) if validate else None
    return OnnxExport(
        path=Path(output_dir) / ONNX_FILE,
        task=task,
        opset=written_opset,
        inputs=list(spec["input_names"]),
        outputs=list(spec["output_names"]),
        max_abs_diff=max_diff,
    )


def _save_config(config: ImageGPTConfig, path: Path) -> None:
    """The checkpoint's config.json, for its facts (n_positions, labels, palette size), without the `auto_map` of
    the Python code, which the ONNX folder does not carry."""
    fields = json.loads(config.to_json_string())
    fields.pop("auto_map", None)
    path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def _processor_of(path: str) -> Any | None:
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.info("%s has no image processor to copy (%s); the ONNX folder will not have one.", path, err)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Checking an export in onnxruntime
# ---------------------------------------------------------------------------------------------------------------------


def _session(path: str | os.PathLike) -> Any:
    import onnxruntime

    path = Path(path)
    path = path / ONNX_FILE if path.is_dir() else path
    return onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def _compare(name: str, ours: np.ndarray, reference: torch.Tensor, atol: float) -> float:
    reference = reference.detach().float().cpu().numpy()
    if ours.shape != reference.shape:  # numpy would broadcast one onto the other
        diff = float("inf")
    else:
        diff = float(np.abs(ours - reference).max()) if reference.size else 0.0
    scale = max(1.0, float(np.abs(reference).max()) if reference.size else 1.0)
    if not diff <= atol * scale:  # also catches NaN
        raise ValueError(
            f"The exported model's output {name} differs from PyTorch's by {diff:.3g} (allowed: {atol:g} x "
            f"{scale:.3g}); the export is not written. Try another --opset, or report the model's config."
        )
    return diff


def _max_difference(path: Path, wrapper: nn.Module, task: str, atol: float) -> float:
    """Largest difference between onnxruntime and PyTorch on random ids, batch sizes 1 and 3; ValueError if too large."""
    session = _session(path)
    names = [output.name for output in session.get_outputs()]
    config = wrapper.model.config if task != "feature-extraction" else wrapper.decoder.config
    device = next(wrapper.parameters()).device
    max_diff = 0.0
    for batch_size in (1, 3):
        if task == "causal-lm":
            # A prompt from SOS through an empty cache, then one cached step, as greedy_generate runs them.
            prompt_len = min(4, config.n_positions - 1)
            prompt = _random_ids((batch_size, prompt_len), config.palette_size, batch_size, device)
            prompt[:, 0] = config.sos_token_id
            step = _random_ids((batch_size, 1), config.palette_size, batch_size + 1, device)
            head_dim = config.n_embd // config.n_head
            past = [torch.zeros(batch_size, config.n_head, 0, head_dim, device=device)] * (2 * config.n_layer)
            for ids in (prompt, step):
                with torch.no_grad():
                    reference = wrapper(ids, *past)
                feeds = {"input_ids": ids.cpu().numpy()}
                feeds.update({name: tensor.cpu().numpy() for name, tensor in zip(_past_names(config.n_layer), past)})
                ours = session.run(None, feeds)
                for name, out, ref in zip(names, ours, reference):
                    max_diff = max(max_diff, _compare(name, out, ref, atol))
                past = list(reference[1:])
            continue
        ids = _random_ids((batch_size, config.n_positions), config.palette_size, batch_size, device)
        with torch.no_grad():
            reference = wrapper(ids)
        reference = reference if isinstance(reference, tuple) else (reference,)
        ours = session.run(None, {"input_ids": ids.cpu().numpy()})
        for name, out, ref in zip(names, ours, reference):
            max_diff = max(max_diff, _compare(name, out, ref, atol))
    return max_diff


# ---------------------------------------------------------------------------------------------------------------------
# Greedy decoding in onnxruntime
# ---------------------------------------------------------------------------------------------------------------------


def greedy_generate(
    session: Any,
    input_ids: np.ndarray | torch.Tensor,
    max_length: int | None = None,
) -> np.ndarray:
    """Greedy decoding with an exported `causal-lm` model in onnxruntime, with its key/value cache.

    Gives the tokens of `model.generate(input_ids, do_sample=False, max_length=max_length)` (up to float rounding,
    which can flip a near-tie).

    Args:
        session: an `onnxruntime.InferenceSession` of the exported `model.onnx`, or the path of it or of its folder.
        input_ids: `(batch, prompt_length)` integer ids starting with SOS (`config.sos_token_id`): SOS alone to draw
            whole images, or SOS and the top rows of images to complete them.
        max_length: the total length to reach, prompt included (default and largest: `n_positions + 1`).

    Returns:
        `(batch, max_length)` int64 ids, the prompt first.
    """
    if not hasattr(session, "run"):
        session = _session(session)
    facts = {
        key[len(METADATA_PREFIX) :]: value
        for key, value in session.get_modelmeta().custom_metadata_map.items()
        if key.startswith(METADATA_PREFIX)
    }
    if facts.get("task") != "causal-lm":
        raise ValueError(
            f"`session` runs a {facts.get('task', 'non-image_gpt_hf')!r} export; greedy_generate needs one made with "
            "--task causal-lm."
        )
    n_positions = int(facts["n_positions"])
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    max_length = n_positions + 1 if max_length is None else max_length
    if max_length > n_positions + 1:  # onnxruntime would only say "indices element out of data bounds"
        raise ValueError(f"`max_length` is at most n_positions + 1 = {n_positions + 1}, got {max_length}.")
    past_inputs = [spec for spec in session.get_inputs() if spec.name != "input_ids"]
    batch_size = ids.shape[0]
    feeds = {spec.name: np.zeros((batch_size, spec.shape[1], 0, spec.shape[3]), np.float32) for spec in past_inputs}
    tokens, step = ids.astype(np.int64), ids.astype(np.int64)
    while tokens.shape[1] < max_length:
        logits, *present = session.run(None, {"input_ids": step, **feeds})
        step = logits[:, -1].argmax(axis=-1).astype(np.int64)[:, None]  # (B, 1)
        tokens = np.concatenate([tokens, step], axis=1)
        feeds = {spec.name: tensor for spec, tensor in zip(past_inputs, present)}
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export an Image GPT checkpoint to ONNX (torch.onnx dynamo exporter) and check it in onnxruntime.",
    )
    parser.add_argument("--model_name_or_path", type=str, required=True, help="A checkpoint folder or Hub id.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where to write model.onnx and config.json.")
    parser.add_argument("--task", choices=TASKS, default="feature-extraction", help="Which graph to export.")
    parser.add_argument(
        "--opset", type=int, default=None, help=f"ONNX opset ({MIN_OPSET} or newer; default: torch's)."
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="feature-extraction: also output these hidden-state indices, per pixel and pooled (negative from the end).",
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="Largest ONNX-PyTorch difference allowed in the check (relative)."
    )
    parser.add_argument("--no_validate", action="store_true", help="Skip the onnxruntime check (no onnxruntime).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing non-empty --output_dir (all of its content)."
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """The `igpt-export-onnx` command (also `python -m image_gpt_hf.onnx_export`)."""
    args = _parse_args(argv)
    try:
        result = export_onnx(
            args.model_name_or_path,
            args.output_dir,
            args.task,
            layers=args.layers,
            opset=args.opset,
            validate=not args.no_validate,
            atol=args.atol,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError, ImportError) as err:  # bad checkpoint, options or paths: what is wrong, no traceback
        raise SystemExit(f"{PROG}: {err}") from None
    print(f"wrote {result.path} ({result.task}, opset {result.opset})")
    print(f"inputs: {', '.join(result.inputs)}")
    print(f"outputs: {', '.join(result.outputs)}")
    if result.max_abs_diff is None:
        print("not checked in onnxruntime (--no_validate)")
    else:
        print(f"onnxruntime vs PyTorch, batch sizes 1 and 3: max abs difference {result.max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
