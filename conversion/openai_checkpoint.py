"""OpenAI's iGPT TensorFlow checkpoints: finding their files, checking them, and reading the model's weights.

What both `convert_openai_checkpoint.py` and `verify.py` read. Everything about the model is inferred from the
checkpoint's variables (no size flag): the number of layers from `model/h{i}/...`, the width from `model/wte`, the
heads from `q_proj`'s shape, the image side from `model/wpe`, the palette size from `model/wte`/`model/wtet`, the
objective from the presence of `model/sos` (only AR models have one) and a classifier from `model/clf/wclf`.
Optimizer slots, step counters and anything else that is not a weight of the model are ignored. TensorFlow is needed
only here, and imported only when a checkpoint is read: `pip install "image_gpt_hf[conversion]"`.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

OPENAI_URL = "https://openaipublic.blob.core.windows.net/image-gpt"
PALETTE_URL = f"{OPENAI_URL}/color-clusters/kmeans_centers.npy"
RELEASED_STEPS = (131000, 262000, 524000, 1000000)
# (n_layer, n_embd, n_head) of the released sizes, named as in OpenAI's download paths (igpt-s, igpt-m, igpt-l).
OPENAI_SIZES = {(24, 512, 8): "s", (36, 1024, 8): "m", (48, 1536, 16): "l"}

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
    palette_size: int
    num_labels: int | None
    step: int | None
    ignored: list[str] = field(default_factory=list)

    @property
    def n_px(self) -> int:
        return math.isqrt(self.n_ctx)

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

    # The sizes, read off three variables; then every variable's shape must follow from them.
    wte, wpe, q_shape = shapes[SCOPE + "wte"], shapes[SCOPE + "wpe"], shapes[f"{SCOPE}h0/attn/q_proj"]
    _expect(SCOPE + "wte", wte, wte if len(wte) == 2 else (0, 0), "[n_vocab, n_embd]")
    palette_size, n_embd = wte
    _expect(SCOPE + "wpe", wpe, (wpe[0], n_embd), f"[n_ctx, {n_embd}]")
    n_ctx, n_px = wpe[0], math.isqrt(wpe[0])
    if n_px * n_px != n_ctx:
        raise ConversionError(f"{SCOPE}wpe has {n_ctx} positions, which is not a square image (n_px * n_px).")
    n_head = q_shape[0] if len(q_shape) == 3 and q_shape[0] * q_shape[1] == n_embd else 0
    _expect(
        f"{SCOPE}h0/attn/q_proj", q_shape, (n_head, n_embd // max(n_head, 1), n_embd), "[n_head, head_dim, n_embd]"
    )
    n_inner = shapes[f"{SCOPE}h0/mlp/c_fc/w"][-1]
    expected = {"wtet": (wte, "the output embedding has the shape of wte"), "ln_f/g": ((n_embd,), "a norm gain")}
    for layer in range(n_layer):
        expected |= {f"h{layer}/{v}": (q_shape, "[n_head, head_dim, n_embd]") for v in LAYER_VARIABLES if "attn" in v}
        expected |= {f"h{layer}/{v}": ((n_embd,), "a norm gain per channel") for v in ("ln_1/g", "ln_2/g")}
        expected[f"h{layer}/mlp/c_fc/w"] = ((n_embd, n_inner), "[n_embd, n_inner]")
        expected[f"h{layer}/mlp/c_proj/w"] = ((n_inner, n_embd), "[n_inner, n_embd]")
    objective = "ar" if SCOPE + "sos" in shapes else "bert"
    expected["sos"] = ((n_embd,), "the start-of-sequence embedding")
    wclf = shapes.get(SCOPE + "clf/wclf")
    num_labels = wclf[0] if wclf else None
    expected["clf/wclf"] = ((num_labels, n_embd), f"[n_classes, {n_embd}]")
    for name, (shape, what) in expected.items():
        if SCOPE + name in shapes:
            _expect(SCOPE + name, shapes[SCOPE + name], shape, what)

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
        prefix, weights, objective, n_layer, n_embd, n_head, n_inner, n_ctx, palette_size, num_labels, step, ignored
    )
