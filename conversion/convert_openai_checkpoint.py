"""Convert one of OpenAI's iGPT TensorFlow checkpoints (AR or BERT; S, M or L) into a Hugging Face checkpoint.

    python conversion/convert_openai_checkpoint.py \
        --checkpoint downloads/igpt-s/1000000/model.ckpt-1000000 \
        --clusters downloads/kmeans_centers.npy \
        --output_dir igpt-s-ar-32px [--dtype float32] [--max_shard_size 5GB] [--push_to_hub USER/igpt-s]

Everything about the model is read from the checkpoint's variables (no size flag): the number of layers from
`model/h{i}/...`, the width from `model/wte`, the heads from `q_proj`'s shape, the image side from `model/wpe`, the
palette size from `model/wte`/`model/wtet`, the objective from the presence of `model/sos` (only AR models have one)
and a classifier from `model/clf/wclf`. Optimizer slots, step counters and anything else that is not a weight of the
model are ignored.

The output folder holds config.json (with `auto_map`, so `trust_remote_code=True` works without this package),
safetensors weights, preprocessor_config.json with the palette, generation_config.json (AR models) and a model card.
Before the folder is written, the converted model is loaded back from it and checked against `openai_reference`
(a NumPy re-implementation of OpenAI's forward pass) on the checkpoint's own arrays. The folder is assembled in a
hidden sibling and renamed into place only when all of that succeeded (`image_gpt_hf.safe_io`): an existing non-empty
`--output_dir` is replaced only with `--overwrite`, and never when it is, holds or lies inside the checkpoint or the
palette.

TensorFlow is needed to read the checkpoint: `pip install "image_gpt_hf[conversion]"`.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import HfApi, split_torch_state_dict_into_shards

if __package__ in (None, ""):  # run as a file (python conversion/convert_openai_checkpoint.py): find `conversion`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.verify import Check, compare_with_reference  # noqa: E402
from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTPreTrainedModel,
)
from image_gpt_hf.generation import openai_generation_config  # noqa: E402
from image_gpt_hf.image_processing_imagegpt import ImageGPTImageProcessor, validate_palette  # noqa: E402
from image_gpt_hf.model_card import write_model_card  # noqa: E402
from image_gpt_hf.safe_io import OutputPathError, check_output_path, staged_dir  # noqa: E402

logger = logging.getLogger(__name__)

OPENAI_URL = "https://openaipublic.blob.core.windows.net/image-gpt"
PALETTE_URL = f"{OPENAI_URL}/color-clusters/kmeans_centers.npy"
RELEASED_STEPS = (131000, 262000, 524000, 1000000)
# (n_layer, n_embd, n_head) of the released sizes, named as in OpenAI's download paths (igpt-s, igpt-m, igpt-l).
OPENAI_SIZES = {(24, 512, 8): "s", (36, 1024, 8): "m", (48, 1536, 16): "l"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SCOPE = "model/"
# Per layer, every variable OpenAI's block() creates. A checkpoint missing any of them is incomplete.
LAYER_VARIABLES = (
    "ln_1/g",
    "attn/q_proj",
    "attn/k_proj",
    "attn/v_proj",
    "attn/c_proj",
    "ln_2/g",
    "mlp/c_fc/w",
    "mlp/c_proj/w",
)
_WEIGHT_NAME = re.compile(
    r"model/(?:wte|wtet|wpe|sos|ln_f/g|clf/wclf|h(?P<layer>\d+)/(?:" + "|".join(LAYER_VARIABLES) + r"))"
)
# Slot variables optimizers add next to each weight (model/wte/Adam, model/wte/Adam_1, ...).
_OPTIMIZER_SLOT = re.compile(r".*/(?:Adam(?:_\d+)?|Momentum|RMSProp(?:_\d+)?|Adagrad|ExponentialMovingAverage)")
_SHARD_NAME = re.compile(r"\.data-(\d{5})-of-(\d{5})$")


class ConversionError(ValueError):
    """A checkpoint, palette or output folder that cannot be used; the message names the file or variable."""


def import_tensorflow():
    """TensorFlow, imported only when a checkpoint is read; it is an optional dependency of this package."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter drowns the converter's output
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            "Reading OpenAI's checkpoints needs TensorFlow, which is not installed. Install the conversion extra: "
            '`pip install "image_gpt_hf[conversion]"` (or `pip install tensorflow-cpu`).'
        ) from err
    return tf


# ---------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class OpenAICheckpoint:
    """The model weights of an OpenAI checkpoint (TF names -> float32 arrays) and the hyper-parameters they imply."""

    prefix: str
    weights: dict[str, np.ndarray]
    objective: str  # "ar" or "bert"
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    n_ctx: int
    n_px: int
    palette_size: int
    num_labels: int | None
    step: int | None
    ignored: list[str] = field(default_factory=list)

    @property
    def size(self) -> str | None:
        """ "s", "m" or "l" when the shapes are those of a released iGPT size."""
        return OPENAI_SIZES.get((self.n_layer, self.n_embd, self.n_head))

    @property
    def source_url(self) -> str | None:
        """Where OpenAI publishes this checkpoint, when it is one of the released ones."""
        if self.size is None or self.step not in RELEASED_STEPS:
            return None
        suffix = "-bert" if self.objective == "bert" else ""
        return f"{OPENAI_URL}/checkpoints/igpt-{self.size}{suffix}/{self.step}/"

    @property
    def title(self) -> str:
        name = f"iGPT-{self.size.upper()}" if self.size else f"iGPT ({self.n_layer} layers, width {self.n_embd})"
        return f"{name} {'BERT' if self.objective == 'bert' else 'AR'} {self.n_px}x{self.n_px}"


def resolve_checkpoint_prefix(path: str | os.PathLike) -> str:
    """The checkpoint prefix (`.../model.ckpt-1000000`) from a prefix, one of its files, or a folder holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.index")))
        if len(indexes) != 1:
            found = ", ".join(os.path.basename(p) for p in indexes) or "none"
            raise ConversionError(
                f"{path} is a folder; it must hold exactly one checkpoint (*.index), found {found}. "
                "Pass the checkpoint prefix instead, e.g. .../model.ckpt-1000000."
            )
        return indexes[0][: -len(".index")]
    # A file of the checkpoint instead of its prefix: an easy slip with tab completion.
    return re.sub(r"\.(?:index|meta|data-\d{5}-of-\d{5})$", "", path)


def checkpoint_inputs(path: str | os.PathLike) -> list[str]:
    """The files and folders the converter reads for `--checkpoint`: the folder given, or the checkpoint's files."""
    if os.path.isdir(path):
        return [os.fspath(path)]
    prefix = resolve_checkpoint_prefix(path)
    files = glob.glob(glob.escape(prefix) + ".*")
    return [f for f in files if re.search(r"\.(?:index|meta|data-\d{5}-of-\d{5})$", f)] or [os.fspath(path)]


def check_checkpoint_files(prefix: str) -> None:
    """The index and every data shard must be there; TF would otherwise fail later, on whichever tensor is missing."""
    if not os.path.isfile(prefix + ".index"):
        raise ConversionError(f"No checkpoint at {prefix}: {prefix}.index does not exist.")
    shards = [m for m in (_SHARD_NAME.search(p) for p in glob.glob(glob.escape(prefix) + ".data-*")) if m]
    totals = {int(m.group(2)) for m in shards}
    if not shards:
        raise ConversionError(f"The checkpoint {prefix} is incomplete: it has no data files ({prefix}.data-*).")
    if len(totals) != 1:
        raise ConversionError(f"The checkpoint {prefix} mixes data files of different shard counts {sorted(totals)}.")
    (total,) = totals
    present = {int(m.group(1)) for m in shards}
    missing = [f"{os.path.basename(prefix)}.data-{i:05d}-of-{total:05d}" for i in range(total) if i not in present]
    if missing:
        raise ConversionError(
            f"The checkpoint {prefix} is incomplete: {len(missing)} of its {total} data shards are missing "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Download them again."
        )


def _expect(name: str, shape: Sequence[int], expected: Sequence[int], what: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ConversionError(
            f"Inconsistent checkpoint: {name} has shape {list(shape)}, expected {list(expected)} ({what})."
        )


def read_openai_checkpoint(path: str | os.PathLike) -> OpenAICheckpoint:
    """Read the model weights of an OpenAI iGPT checkpoint and infer its hyper-parameters from them.

    Raises `ConversionError` (naming the file or variable) for a missing or truncated file, a missing layer or
    variable, or shapes that do not fit together.
    """
    prefix = resolve_checkpoint_prefix(path)
    check_checkpoint_files(prefix)
    tf = import_tensorflow()
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as err:
        raise ConversionError(f"TensorFlow cannot open the checkpoint {prefix}: {err}") from None
    shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}

    names = sorted(name for name in shapes if _WEIGHT_NAME.fullmatch(name))
    ignored = sorted(set(shapes) - set(names))
    unknown = [n for n in ignored if n.startswith(SCOPE) and not _OPTIMIZER_SLOT.fullmatch(n)]
    if unknown:
        logger.warning("Ignoring variables that are not part of OpenAI's model: %s", ", ".join(unknown))

    for required in ("wte", "wtet", "wpe", "ln_f/g"):
        if SCOPE + required not in shapes:
            raise ConversionError(
                f"The checkpoint {prefix} is incomplete or not an iGPT checkpoint: no {SCOPE}{required}."
            )
    wte = shapes[SCOPE + "wte"]
    if len(wte) != 2:
        raise ConversionError(
            f"Inconsistent checkpoint: {SCOPE}wte has shape {list(wte)}, expected [n_vocab, n_embd]."
        )
    palette_size, n_embd = wte
    _expect(SCOPE + "wtet", shapes[SCOPE + "wtet"], wte, "the output embedding has the shape of wte")
    wpe = shapes[SCOPE + "wpe"]
    if len(wpe) != 2 or wpe[1] != n_embd:
        raise ConversionError(
            f"Inconsistent checkpoint: {SCOPE}wpe has shape {list(wpe)}, expected [n_ctx, {n_embd}]."
        )
    n_ctx = wpe[0]
    n_px = math.isqrt(n_ctx)
    if n_px * n_px != n_ctx:
        raise ConversionError(f"{SCOPE}wpe has {n_ctx} positions, which is not a square image (n_px * n_px).")
    _expect(SCOPE + "ln_f/g", shapes[SCOPE + "ln_f/g"], [n_embd], "a norm gain per channel")

    layers = {int(m.group("layer")) for m in map(_WEIGHT_NAME.fullmatch, names) if m.group("layer") is not None}
    if not layers:
        raise ConversionError(f"The checkpoint {prefix} has no transformer layers ({SCOPE}h0/... is missing).")
    n_layer = max(layers) + 1
    for layer in range(n_layer):
        for var in LAYER_VARIABLES:
            name = f"{SCOPE}h{layer}/{var}"
            if name not in shapes:
                raise ConversionError(
                    f"The checkpoint {prefix} is incomplete: {name} is missing "
                    f"(it has layers up to h{n_layer - 1}, so every h0..h{n_layer - 1} needs all of its variables)."
                )

    q_shape = shapes[f"{SCOPE}h0/attn/q_proj"]
    if len(q_shape) != 3 or q_shape[0] * q_shape[1] != n_embd or q_shape[2] != n_embd:
        raise ConversionError(
            f"Inconsistent checkpoint: {SCOPE}h0/attn/q_proj has shape {list(q_shape)}, expected "
            f"[n_head, {n_embd} / n_head, {n_embd}]."
        )
    n_head = q_shape[0]
    n_inner = shapes[f"{SCOPE}h0/mlp/c_fc/w"][-1]
    for layer in range(n_layer):
        p = f"{SCOPE}h{layer}/"
        for var in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/c_proj"):
            _expect(p + var, shapes[p + var], q_shape, f"[n_head, head_dim, n_embd] as {SCOPE}h0/attn/q_proj")
        _expect(p + "ln_1/g", shapes[p + "ln_1/g"], [n_embd], "a norm gain per channel")
        _expect(p + "ln_2/g", shapes[p + "ln_2/g"], [n_embd], "a norm gain per channel")
        _expect(p + "mlp/c_fc/w", shapes[p + "mlp/c_fc/w"], [n_embd, n_inner], "[n_embd, n_inner]")
        _expect(p + "mlp/c_proj/w", shapes[p + "mlp/c_proj/w"], [n_inner, n_embd], "[n_inner, n_embd]")

    objective = "ar" if SCOPE + "sos" in shapes else "bert"
    if objective == "ar":
        _expect(SCOPE + "sos", shapes[SCOPE + "sos"], [n_embd], "the start-of-sequence embedding")
    num_labels = None
    if SCOPE + "clf/wclf" in shapes:
        wclf = shapes[SCOPE + "clf/wclf"]
        if len(wclf) != 2 or wclf[1] != n_embd:
            raise ConversionError(
                f"Inconsistent checkpoint: {SCOPE}clf/wclf has shape {list(wclf)}, expected [n_classes, {n_embd}]."
            )
        num_labels = wclf[0]

    weights = {}
    for name in names:
        try:
            value = reader.get_tensor(name)
        except (tf.errors.OpError, IndexError, ValueError) as err:
            # A truncated .data file gives IndexError("Read less bytes than requested"), a corrupt one DataLossError.
            raise ConversionError(
                f"Cannot read {name} from the checkpoint {prefix}; a data file is truncated or corrupt: {err}"
            ) from None
        if not np.issubdtype(value.dtype, np.floating):
            raise ConversionError(f"{name} holds {value.dtype} values; iGPT weights are floating point.")
        if not np.isfinite(value).all():
            raise ConversionError(f"{name} holds NaN or infinite values; the checkpoint is corrupt.")
        weights[name] = value.astype(np.float32, copy=False)

    step = None
    match = re.search(r"ckpt-(\d+)$", prefix)
    if match:
        step = int(match.group(1))
    elif "global_step" in shapes:
        step = int(reader.get_tensor("global_step"))

    return OpenAICheckpoint(
        prefix=prefix,
        weights=weights,
        objective=objective,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_inner=n_inner,
        n_ctx=n_ctx,
        n_px=n_px,
        palette_size=palette_size,
        num_labels=num_labels,
        step=step,
        ignored=ignored,
    )


def load_palette(path: str | os.PathLike, palette_size: int) -> np.ndarray:
    """OpenAI's `kmeans_centers.npy`: `(palette_size, 3)` RGB centers in [-1, 1], checked against the checkpoint.

    An `.npz` archive holding exactly one array is read as that array.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if len(loaded.files) != 1:
                    raise ConversionError(
                        f"The palette {path} is an .npz archive of {len(loaded.files)} arrays "
                        f"({', '.join(loaded.files) or 'none'}); expected one, the ({palette_size}, 3) colors. Save "
                        "that array alone with numpy.save, as OpenAI's kmeans_centers.npy."
                    )
                loaded = loaded[loaded.files[0]]
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"Cannot read the palette {path}: {err}") from None
    return check_palette(loaded, f"The palette {path}", palette_size)


def check_palette(palette: np.ndarray, what: str, palette_size: int) -> np.ndarray:
    """`palette` (as floats) if it is `(palette_size, 3)` real RGB colors, finite and in [-1, 1]; else ConversionError.

    `what` starts the messages ("The palette kmeans_centers.npy").
    """
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ConversionError(
            f"{what} has shape {palette.shape} ({palette.dtype}); expected ({palette_size}, 3) RGB colors."
        )
    if palette.shape[0] != palette_size:
        raise ConversionError(
            f"{what} has {palette.shape[0]} colors but the checkpoint has {palette_size}; expected shape "
            f"({palette_size}, 3)."
        )
    try:
        validate_palette(palette)  # the image processor's checks: real numbers, finite, in [-1, 1]
    except ValueError as err:
        raise ConversionError(f"{what}: {err}") from None
    return palette if palette.dtype.kind == "f" else palette.astype(np.float64)  # the file's own precision kept


# ---------------------------------------------------------------------------------------------------------------------
# Mapping to the transformers ImageGPT layout
# ---------------------------------------------------------------------------------------------------------------------


def build_config(ckpt: OpenAICheckpoint) -> ImageGPTConfig:
    """The config of the converted model; every value comes from the checkpoint's shapes."""
    fields = {}
    if ckpt.num_labels is not None:
        # OpenAI fine-tuned on gen_loss + clf_loss: keep the LM head and that objective.
        fields = {"num_labels": ckpt.num_labels, "gen_loss_weight": 1.0}
    return ImageGPTConfig(
        vocab_size=ckpt.palette_size + 1,
        n_positions=ckpt.n_ctx,
        n_embd=ckpt.n_embd,
        n_layer=ckpt.n_layer,
        n_head=ckpt.n_head,
        n_inner=None if ckpt.n_inner == 4 * ckpt.n_embd else ckpt.n_inner,
        activation_function="quick_gelu",  # OpenAI's gelu2
        layer_norm_epsilon=1e-5,
        # OpenAI's model has no dropout anywhere.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # wte and wtet are separate variables
        objective=ckpt.objective,
        # Forward passes on whole images build [SOS, x_1..x_{n-1}] as OpenAI does; generate() is unaffected.
        prepend_sos=ckpt.objective == "ar",
        **fields,
    )


def convert_state_dict(ckpt: OpenAICheckpoint) -> dict[str, torch.Tensor]:
    """The OpenAI variables in transformers' ImageGPT layout (the table in conversion/README.md), as float32."""
    w = ckpt.weights
    d = ckpt.n_embd

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))

    # SOS is the last input id. BERT checkpoints have no sos (OpenAI's BERT never feeds one): that row stays zero.
    sos = w[SCOPE + "sos"] if ckpt.objective == "ar" else np.zeros(d, dtype=np.float32)
    state_dict = {
        "transformer.wte.weight": t(np.concatenate([w[SCOPE + "wte"], sos[None, :]], axis=0)),
        "transformer.wpe.weight": t(w[SCOPE + "wpe"]),
        "transformer.ln_f.weight": t(w[SCOPE + "ln_f/g"]),
        "lm_head.weight": t(w[SCOPE + "wtet"]),
    }
    for layer in range(ckpt.n_layer):
        p, hf = f"{SCOPE}h{layer}/", f"transformer.h.{layer}."
        # q[b,h,s,e] = sum_f x[b,s,f] W[h,e,f]: W.reshape(d, d) has rows (h, e) and columns f, so the Conv1D weight
        # (x @ weight, [in, out]) is its transpose, whose columns are ordered (h, e) as the model splits heads.
        qkv = [w[p + f"attn/{name}"].reshape(d, d).T for name in ("q_proj", "k_proj", "v_proj")]
        inner = w[p + "mlp/c_fc/w"].shape[1]
        state_dict.update(
            {
                hf + "ln_1.weight": t(w[p + "ln_1/g"]),
                hf + "attn.c_attn.weight": t(np.concatenate(qkv, axis=1)),
                hf + "attn.c_attn.bias": torch.zeros(3 * d),
                # out[b,s,f] = sum_{h,e} a[b,h,s,e] W[h,e,f]: merged heads (h, e) times W.reshape(d, d), [in, out].
                hf + "attn.c_proj.weight": t(w[p + "attn/c_proj"].reshape(d, d)),
                hf + "attn.c_proj.bias": torch.zeros(d),
                hf + "ln_2.weight": t(w[p + "ln_2/g"]),
                hf + "mlp.c_fc.weight": t(w[p + "mlp/c_fc/w"]),
                hf + "mlp.c_fc.bias": torch.zeros(inner),
                hf + "mlp.c_proj.weight": t(w[p + "mlp/c_proj/w"]),
                hf + "mlp.c_proj.bias": torch.zeros(d),
            }
        )
    if ckpt.num_labels is not None:
        state_dict["score.weight"] = t(w[SCOPE + "clf/wclf"])
    return state_dict


def build_model(config: ImageGPTConfig, state_dict: dict[str, torch.Tensor]) -> ImageGPTPreTrainedModel:
    """The model class that holds every converted weight, with those weights (strictly: no key may be left over)."""
    if "score.weight" in state_dict:
        model_class = ImageGPTForImageClassification
    elif config.objective == "ar":
        model_class = ImageGPTForCausalImageModeling
    else:
        model_class = ImageGPTForMaskedImageModeling
    # Built on the meta device and given the converted tensors, so a large model is never allocated twice.
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Writing the output folder
# ---------------------------------------------------------------------------------------------------------------------


def check_options(dtype: str, max_shard_size: str) -> None:
    """Refuse a `--dtype` or `--max_shard_size` that saving would reject only after the conversion."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    try:
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)  # parses the size as saving will
    except ValueError as err:
        raise ConversionError(
            f"--max_shard_size {max_shard_size!r} is not a size such as 5GB or 500MB: {err}"
        ) from None


def save_checkpoint_folder(
    folder: Path,
    model: ImageGPTPreTrainedModel,
    palette: np.ndarray,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
) -> ImageGPTImageProcessor:
    """config.json (+ auto_map and source files), safetensors, preprocessor_config.json, generation_config.json.

    The model is cast to `dtype` in place. Returns the image processor it saved.
    """
    model.to(dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    config = model.config
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": config.n_px, "width": config.n_px})
    processor.save_pretrained(folder)
    if config.objective == "ar" and hasattr(model, "lm_head"):
        # Written explicitly: a classification model with an LM head (AR + clf) would not write one, yet it
        # generates once loaded with AutoModelForCausalLM.
        openai_generation_config(config).save_pretrained(folder)
    return processor


def meta_copy(model: ImageGPTPreTrainedModel) -> ImageGPTPreTrainedModel:
    """The same class, config and dtype, holding no memory: what the model card reads (class, parameter count,
    dtype) after the real model has been freed."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    return copy.to(model.dtype)


def verification_notes(checks: list[Check], against: str) -> list[str]:
    """The model card's record of the check made at conversion."""
    if not checks:
        return ["This conversion was not verified (`--skip_verification`)."]
    figures = "; ".join(f"{c.name} {c.max_abs_diff:.1e}" for c in checks)
    tolerance = max(c.tolerance for c in checks)
    return [
        f"Verified at conversion, on random tokens, against {against}. Max abs differences: {figures} (tolerance {tolerance:.0e})."
    ]


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, private: bool = False, commit_message: str = ""
) -> str:
    """Upload a finished output folder to the Hub (credentials from `hf auth login` or HF_TOKEN); returns its URL."""
    api = HfApi()
    repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=os.fspath(folder),
        repo_type="model",
        commit_message=commit_message or "Upload converted iGPT checkpoint",
    )
    return f"https://huggingface.co/{repo.repo_id}"


def push_after_conversion(folder: str | os.PathLike, repo_id: str, private: bool = False) -> int:
    """`push_folder_to_hub` for the command line: an upload failure is reported, not raised, since the folder on
    disk is complete and can be uploaded again later. Returns the exit status."""
    try:
        url = push_folder_to_hub(folder, repo_id, private=private)
    except Exception as err:  # network, authentication, permissions: huggingface_hub raises many kinds
        logger.error(
            "Upload to %s failed: %s. The folder %s is complete; retry with `hf upload %s %s`.",
            repo_id,
            err,
            folder,
            repo_id,
            folder,
        )
        return 1
    logger.info("Uploaded to %s", url)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def card_facts(ckpt: OpenAICheckpoint, repo_id: str | None, notes: list[str]) -> dict[str, object]:
    """What the model card states beyond what it reads from the model and processor (`image_gpt_hf.model_card`)."""
    checkpoint = os.path.basename(ckpt.prefix)
    steps = f"{ckpt.step:,} training steps" if ckpt.step is not None else "unknown number of training steps"
    objective = "AR" if ckpt.objective == "ar" else "BERT"
    facts: dict[str, object] = {"model_name": ckpt.title, "notes": notes}
    if repo_id:
        facts["repo_id"] = repo_id
    if ckpt.source_url:
        # The shapes and step of a released checkpoint: OpenAI trained it on ImageNet (Chen et al., 2020).
        facts["training"] = f"Pre-trained by OpenAI, {objective} objective, {steps} (checkpoint `{checkpoint}`)."
        facts["datasets"] = ["imagenet-1k"]
        facts["source"] = (
            f"OpenAI's TensorFlow checkpoint {ckpt.source_url} and palette {PALETTE_URL}, converted with "
            "`conversion/convert_openai_checkpoint.py`."
        )
    else:
        facts["training"] = f"{objective} objective, {steps} (TensorFlow checkpoint `{checkpoint}`)."
        facts["source"] = (
            f"A TensorFlow checkpoint in OpenAI's layout (`{checkpoint}`), converted with "
            "`conversion/convert_openai_checkpoint.py`."
        )
    return facts


def convert_openai_checkpoint(
    checkpoint: str | os.PathLike,
    clusters: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "float32",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    verify: bool = True,
    num_verify_images: int = 1,
    repo_id: str | None = None,
) -> list[Check]:
    """Convert the checkpoint at `checkpoint` with the palette `clusters` into `output_dir`; see the module docstring.

    `repo_id` only names the Hub repository in the model card's usage snippet. Returns the verification results
    (empty with `verify=False`). Raises `ConversionError`, leaving nothing on disk, when the inputs are unusable or
    the converted model does not match the reference, and `image_gpt_hf.safe_io.OutputPathError` (before reading
    anything) for an output path it must not write to.
    """
    check_options(dtype, max_shard_size)
    inputs = [*checkpoint_inputs(checkpoint), clusters]
    check_output_path(output_dir, inputs=inputs, overwrite=overwrite)
    ckpt = read_openai_checkpoint(checkpoint)
    palette = load_palette(clusters, ckpt.palette_size)
    logger.info(
        "%s: %d layers, width %d, %d heads, %dx%d pixels, %d colors, step %s%s; ignored %d other variables.",
        ckpt.title,
        ckpt.n_layer,
        ckpt.n_embd,
        ckpt.n_head,
        ckpt.n_px,
        ckpt.n_px,
        ckpt.palette_size,
        ckpt.step,
        f", classifier with {ckpt.num_labels} classes" if ckpt.num_labels else "",
        len(ckpt.ignored),
    )
    notes = []
    if ckpt.objective == "bert":
        notes.append(
            "OpenAI's BERT checkpoints have no SOS embedding (the BERT model never feeds one): the SOS row of "
            "`transformer.wte.weight` (id vocab_size - 1) is zeros."
        )
        logger.info(notes[-1])

    config = build_config(ckpt)
    model = build_model(config, convert_state_dict(ckpt))
    checks: list[Check] = []
    with staged_dir(output_dir, overwrite=overwrite, inputs=inputs) as tmp:
        processor = save_checkpoint_folder(tmp, model, palette, DTYPES[dtype], max_shard_size)
        card_model = meta_copy(model)
        del model  # the check below loads the folder back; do not hold two copies of a large model
        if verify:
            checks = compare_with_reference(tmp, ckpt.weights, num_images=num_verify_images)
            for check in checks:
                logger.info("%s", check)
            failed = [c for c in checks if not c.ok]
            if failed:
                raise ConversionError(
                    "The converted model does not match OpenAI's forward pass: "
                    + "; ".join(str(c) for c in failed)
                    + ". Nothing was written."
                )
        against = (
            "an independent NumPy implementation of OpenAI's forward pass (`conversion/openai_reference.py`) "
            "run on the TensorFlow checkpoint's arrays"
        )
        notes += verification_notes(checks, against)
        write_model_card(tmp, card_model, processor=processor, facts=card_facts(ckpt, repo_id, notes))
    logger.info("Wrote %s", output_dir)
    return checks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint prefix, e.g. .../model.ckpt-1000000")
    parser.add_argument("--clusters", required=True, help="OpenAI's palette, kmeans_centers.npy")
    parser.add_argument("--output_dir", required=True, help="folder to write the converted checkpoint to")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 2GB or 500MB")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output_dir (all of its content)"
    )
    parser.add_argument(
        "--skip_verification",
        action="store_true",
        help="do not compare the converted model with the NumPy reference before writing (run verify.py later)",
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    try:
        convert_openai_checkpoint(
            args.checkpoint,
            args.clusters,
            args.output_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            verify=not args.skip_verification,
            repo_id=args.push_to_hub,
        )
    except (ConversionError, OutputPathError) as err:
        logger.error("%s", err)
        return 1
    except OSError as err:  # the disk is full, a folder is not writable, ...: nothing was left behind
        logger.error("Writing %s failed: %s", args.output_dir, err)
        return 1
    if args.push_to_hub:
        return push_after_conversion(args.output_dir, args.push_to_hub, private=args.private)
    return 0


if __name__ == "__main__":
    sys.exit(main())
