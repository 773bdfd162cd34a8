"""OpenAI's iGPT forward pass, re-implemented in NumPy from `src/model.py` of openai/image-gpt.

It runs on the arrays of an OpenAI TensorFlow checkpoint exactly as they are stored (a mapping from variable name,
e.g. `model/h0/attn/q_proj`, to array) and shares no code with `image_gpt_hf` or with the converter. Agreement between
this reference and a converted model is therefore evidence that both the weight mapping and the PyTorch model are
right; that is its only job, so it favours following OpenAI's code line by line over speed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SCOPE = "model/"
NORM_EPS = 1e-5  # OpenAI's norm() default


@dataclass
class ReferenceOutput:
    """What OpenAI's `model()` returns that a conversion can be checked against.

    gen_logits: `(batch, n, n_vocab)`; for AR models `gen_logits[:, t]` predicts `tokens[:, t]`.
    hidden_states: `(batch, n, n_embd)`, the output of the final norm `ln_f`.
    gen_loss: OpenAI's generative loss (AR: mean cross-entropy over all positions; BERT: per-image mean over the
        masked positions, then the mean over images).
    clf_logits: `(batch, n_classes)` when the checkpoint has `model/clf/wclf`, else `None`.
    """

    gen_logits: np.ndarray
    hidden_states: np.ndarray
    gen_loss: float
    clf_logits: np.ndarray | None = None


def _norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    # Not a LayerNorm: no mean subtraction and no bias.
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + NORM_EPS) * g


def _gelu2(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-1.702 * x))  # x * sigmoid(1.702 x)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _num_layers(weights: Mapping[str, np.ndarray]) -> int:
    n_layer = 0
    while f"{SCOPE}h{n_layer}/ln_1/g" in weights:
        n_layer += 1
    return n_layer


def openai_forward(
    weights: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    keep: np.ndarray | None = None,
    dtype: type[np.floating] = np.float64,
) -> ReferenceOutput:
    """Run OpenAI's iGPT on `tokens` with the checkpoint arrays `weights`.

    Args:
        weights: checkpoint variables by their TensorFlow names (`model/wte`, `model/h0/attn/q_proj`, ...). A model
            with `model/sos` is autoregressive, one without it is a BERT model (as in OpenAI's code, where only the AR
            branch creates `sos`).
        tokens: `(batch, n)` palette ids, `n <= n_ctx`. These are OpenAI's `X`: the image itself, not shifted; the AR
            model builds its input `[sos, X[:, :-1]]` internally.
        keep: BERT models only, `(batch, n)` bool, OpenAI's `M`: True where the token is kept, False where it is
            masked. OpenAI draws it at random inside the model; here the caller passes it so that a converted model
            can be given the same one.
        dtype: the floating type to compute in; `np.float64` makes the reference's own rounding negligible.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"`tokens` must be a (batch, n) integer array, got {tokens.dtype} {tokens.shape}.")
    bert = f"{SCOPE}sos" not in weights
    if bert and keep is None:
        raise ValueError("This is a BERT checkpoint (no model/sos): pass `keep`, OpenAI's token mask M.")
    if not bert and keep is not None:
        raise ValueError("`keep` applies to BERT checkpoints only; this one has model/sos, so it is autoregressive.")

    def w(name: str) -> np.ndarray:
        # Cast one variable at a time, so that a float64 run never holds a second full copy of a large model.
        return np.asarray(weights[SCOPE + name]).astype(dtype, copy=False)

    wte, wpe = w("wte"), w("wpe")
    n_vocab = wte.shape[0]
    batch, n = tokens.shape
    if n > wpe.shape[0]:
        raise ValueError(f"{n} tokens are more than the model's n_ctx={wpe.shape[0]}.")
    if tokens.min() < 0 or tokens.max() >= n_vocab:
        raise ValueError(f"`tokens` must be palette ids in [0, {n_vocab}).")

    h = wte[tokens]  # (B, n, d)
    if bert:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != tokens.shape:
            raise ValueError(f"`keep` has shape {keep.shape}, expected {tokens.shape}.")
        h = h * keep[:, :, None].astype(dtype)
    else:
        sos = np.broadcast_to(w("sos"), (batch, 1, wte.shape[1]))
        h = np.concatenate([sos, h[:, :-1]], axis=1)
    h = h + wpe[:n]

    # OpenAI's attention_mask(): 1 on and below the diagonal; masked scores become exactly -1e10.
    causal = np.tril(np.ones((n, n), dtype=dtype))
    for layer in range(_num_layers(weights)):
        p = f"h{layer}/"
        x = _norm(h, w(p + "ln_1/g"))
        wq, wk, wv, wc = (w(p + f"attn/{name}") for name in ("q_proj", "k_proj", "v_proj", "c_proj"))
        head_dim = wq.shape[1]
        q = np.einsum("bsf,hef->bhse", x, wq, optimize=True)
        k = np.einsum("bsf,hef->bhse", x, wk, optimize=True)
        v = np.einsum("bsf,hef->bhse", x, wv, optimize=True)
        scores = np.einsum("bhse,bhte->bhst", q, k, optimize=True) / np.sqrt(dtype(head_dim))
        if not bert:
            scores = scores * causal - dtype(1e10) * (1 - causal)
        a = np.einsum("bhst,bhte->bhse", _softmax(scores), v, optimize=True)
        h = h + np.einsum("bhse,hef->bsf", a, wc, optimize=True)

        x = _norm(h, w(p + "ln_2/g"))
        h = h + _gelu2(x @ w(p + "mlp/c_fc/w")) @ w(p + "mlp/c_proj/w")
    h = _norm(h, w("ln_f/g"))

    gen_logits = h @ w("wtet").T  # (B, n, n_vocab)
    # Both objectives score the image's own tokens: AR because its input was shifted by sos, BERT at masked positions.
    token_loss = -np.take_along_axis(_log_softmax(gen_logits), tokens[:, :, None], axis=-1)[:, :, 0]  # (B, n)
    if bert:
        masked = 1.0 - keep.astype(dtype)
        # An image without a masked position gives 0/0 = NaN here, exactly as in OpenAI's code.
        with np.errstate(invalid="ignore", divide="ignore"):
            gen_loss = float(np.mean((token_loss * masked).sum(axis=1) / masked.sum(axis=1)))
    else:
        gen_loss = float(token_loss.mean())

    clf_logits = None
    if f"{SCOPE}clf/wclf" in weights:
        clf_logits = h.mean(axis=1) @ w("clf/wclf").T
    return ReferenceOutput(gen_logits=gen_logits, hidden_states=h, gen_loss=gen_loss, clf_logits=clf_logits)


__all__ = ["ReferenceOutput", "openai_forward"]
