"""Convert one of OpenAI's iGPT TensorFlow checkpoints (AR or BERT; S, M or L) into a Hugging Face checkpoint.

    python conversion/convert_openai_checkpoint.py \
        --checkpoint downloads/igpt-s/1000000/model.ckpt-1000000 \
        --clusters downloads/kmeans_centers.npy \
        --output_dir igpt-s-ar-32px [--dtype float32] [--max_shard_size 5GB] [--push_to_hub USER/igpt-s]

Everything about the model is read from the checkpoint's variables, no size flag (see `openai_checkpoint`).
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
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python conversion/convert_openai_checkpoint.py): find `conversion`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.cli import check_options, run_converter, write_checkpoint  # noqa: E402
from conversion.openai_checkpoint import (  # noqa: E402
    PALETTE_URL,
    SCOPE,
    ConversionError,
    OpenAICheckpoint,
    checkpoint_inputs,
    read_openai_checkpoint,
)
from conversion.verify import Check, compare_with_reference  # noqa: E402
from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTPreTrainedModel,
)
from image_gpt_hf.image_processing_imagegpt import validate_palette  # noqa: E402

logger = logging.getLogger(__name__)


def load_palette(path: str | os.PathLike, palette_size: int) -> np.ndarray:
    """OpenAI's `kmeans_centers.npy`: `(palette_size, 3)` RGB centers in [-1, 1], checked against the checkpoint.

    An `.npz` archive holding exactly one array is read as that array.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ConversionError(f"Cannot read the palette {path}: {err}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if len(loaded.files) != 1:
                raise ConversionError(
                    f"The palette {path} is an .npz archive of {len(loaded.files)} arrays "
                    f"({', '.join(loaded.files) or 'none'}); expected one, the ({palette_size}, 3) colors. Save "
                    "that array alone with numpy.save, as OpenAI's kmeans_centers.npy."
                )
            loaded = loaded[loaded.files[0]]
    return check_palette(loaded, f"The palette {path}", palette_size)


def check_palette(palette: np.ndarray, what: str, palette_size: int) -> np.ndarray:
    """`palette` (as floats) if it is `(palette_size, 3)` real RGB colors, finite and in [-1, 1]; else ConversionError.

    `what` starts the messages ("The palette kmeans_centers.npy").
    """
    palette = np.asarray(palette)
    try:
        validate_palette(palette)  # the image processor's rule: (num_colors, 3) real numbers, finite, in [-1, 1]
    except ValueError as err:
        raise ConversionError(f"{what}: {err}") from None
    if palette.shape[0] != palette_size:
        n, size = palette.shape[0], palette_size
        raise ConversionError(f"{what} has {n} colors but the checkpoint has {size}; expected shape ({size}, 3).")
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
    inputs = [*checkpoint_inputs(checkpoint), clusters]
    check_options(output_dir, inputs, overwrite, dtype, max_shard_size)
    ckpt = read_openai_checkpoint(checkpoint)
    palette = load_palette(clusters, ckpt.palette_size)
    logger.info(
        "%s: %d layers, width %d, %d heads, %dx%d pixels, %d colors, step %s%s; ignored %d other variables.",
        *(ckpt.title, ckpt.n_layer, ckpt.n_embd, ckpt.n_head, ckpt.n_px, ckpt.n_px, ckpt.palette_size, ckpt.step),
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
    return write_checkpoint(
        output_dir,
        inputs,
        build_model(build_config(ckpt), convert_state_dict(ckpt)),
        palette,
        {"dtype": dtype, "max_shard_size": max_shard_size, "overwrite": overwrite},
        (lambda folder: compare_with_reference(folder, ckpt.weights, num_images=num_verify_images))
        if verify
        else None,
        "an independent NumPy implementation of OpenAI's forward pass (`conversion/openai_reference.py`) run on the "
        "TensorFlow checkpoint's arrays",
        card_facts(ckpt, repo_id, notes),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint prefix, e.g. .../model.ckpt-1000000")
    parser.add_argument("--clusters", required=True, help="OpenAI's palette, kmeans_centers.npy")
    return run_converter(parser, convert_openai_checkpoint, argv, "the NumPy reference (verify.py runs it later)")


if __name__ == "__main__":
    sys.exit(main())
