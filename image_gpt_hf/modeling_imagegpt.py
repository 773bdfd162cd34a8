"""PyTorch Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020).

One file holds the model, top to bottom in the order data flows: norm, attention, MLP, block, the decoder, and its
three heads (causal = the paper's AR objective, masked = its BERT objective, classification = its fine-tuning).
State-dict keys and shapes are those of transformers' ImageGPT, so checkpoints move both ways unchanged.

This module is shipped as remote code by `save_pretrained`: it imports only torch, transformers and its sibling
configuration module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_imagegpt import ImageGPTConfig

logger = logging.get_logger(__name__)

# The three auto classes (besides AutoConfig) a saved checkpoint names in `auto_map`, so that
# `AutoModel*.from_pretrained(path, trust_remote_code=True)` works where this package is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_imagegpt.ImageGPTConfig",
    "AutoModel": "modeling_imagegpt.ImageGPTModel",
    "AutoModelForCausalLM": "modeling_imagegpt.ImageGPTForCausalImageModeling",
    "AutoModelForMaskedImageModeling": "modeling_imagegpt.ImageGPTForMaskedImageModeling",
    "AutoModelForImageClassification": "modeling_imagegpt.ImageGPTForImageClassification",
}


QUICK_GELU_ALPHA = 1.702  # OpenAI's gelu2(x) = x * sigmoid(1.702 x), transformers' quick_gelu


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _conv1d(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`module(hidden_states)` for a projection, computed from a plain `Conv1D`'s weights directly (one addmm, no
    module call: it counts in the one-token decode step)."""
    if not _is_plain(module):
        return module(hidden_states)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, in)
    return torch.addmm(module.bias, flat, module.weight).view(*hidden_states.shape[:-1], module.nf)


def _is_plain(module: nn.Module) -> bool:
    """Whether a projection may be computed from its weights directly instead of through its `forward`: a bare
    transformers `Conv1D` with no hooks. Anything that wraps or replaces it (PEFT adapters, quantized layers,
    accelerate's offload hooks) keeps its own forward."""
    return type(module) is Conv1D and not _is_hooked(module)


def _is_hooked(module: nn.Module) -> bool:
    """Whether calling `module` does more than its class's `forward`: forward (pre-)hooks, or a forward replaced on
    the instance, as accelerate's device and offload hooks do (they also leave the weights on the meta device).
    transformers' output-capturing hooks do not count: they record nothing unless outputs are requested, which the
    callers check themselves."""
    attributes = module.__dict__  # plain lookups: this runs for every module of every one-token step
    if "forward" in attributes or "_hf_hook" in attributes or attributes["_forward_pre_hooks"]:
        return True
    hooks = attributes["_forward_hooks"]
    return bool(hooks) and any(getattr(hook, "__name__", "") != "output_capturing_hook" for hook in hooks.values())


def _mean_pool(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average over positions (B, T, d) -> (B, d), skipping padded positions when a 2-D mask is given."""
    if attention_mask is None or attention_mask.dim() != 2:
        return states.mean(dim=1)
    weights = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


def random_bert_mask(
    input_ids_or_shape: torch.Tensor | tuple[int, ...],
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.BoolTensor:
    """The paper's BERT mask: every position is masked independently with probability `mask_prob` (0.15).

    Returns a bool tensor of the shape of `input_ids_or_shape` (True = masked), to pass as `bool_masked_pos`.
    OpenAI's code keeps a token where `uniform > 0.15`; this is the same distribution.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"`mask_prob` must be in [0, 1], got {mask_prob}.")
    if isinstance(input_ids_or_shape, torch.Tensor):
        shape, device = input_ids_or_shape.shape, device or input_ids_or_shape.device
    else:
        shape = tuple(input_ids_or_shape)
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(shape, generator=generator, device=gen_device)
    return (noise < mask_prob).to(device)


class ImageGPTCacheLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers with room to spare.

    `DynamicLayer` appends a step with `torch.cat`, which re-allocates and copies the layer's whole cache for every
    generated token: over an image of `n` tokens that is O(n^2) bytes moved, more than the attention itself reads. Here
    a step is written in place and the buffers double when they fill up (amortized O(1) per token, capped at the
    model's `n_positions`). `self.keys` / `self.values` stay the valid `(B, nh, T, hs)` views, so whatever `DynamicLayer` does
    with them (crop, beam reordering, batch selection, offloading) keeps working: when such an operation replaces them
    with new tensors, the next update adopts those as its buffers.
    """

    def __init__(self, max_length: int, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, nh, capacity, hs) each
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # what the last update set keys/values to

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            # Writing in place would change tensors autograd saved from earlier steps: concatenate, as DynamicLayer.
            self._buffers = self._views = None
            return super().update(key_states, value_states, *args, **kwargs)
        past = self.get_seq_length()
        total = past + key_states.shape[-2]
        # Still our views (nothing replaced them since the last update) and room left: write in place.
        ours = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
        if not ours or total > self._buffers[0].shape[2]:
            # A prefill gets what it holds; growth at least doubles, up to the model's context.
            capacity = total if past == 0 else max(total, min(2 * total, self.max_length))
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            buffers = tuple(torch.empty(shape, dtype=key_states.dtype, device=key_states.device) for _ in range(2))
            if past:
                buffers[0].narrow(2, 0, past).copy_(self.keys)
                buffers[1].narrow(2, 0, past).copy_(self.values)
            self._buffers = buffers
        keys, values = self._buffers
        keys.narrow(2, past, total - past).copy_(key_states)
        values.narrow(2, past, total - past).copy_(value_states)
        self.keys, self.values = self._views = (keys.narrow(2, 0, total), values.narrow(2, 0, total))
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        ours = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
        super().crop(tokens_to_remove)
        if ours:  # shorter slices of the same buffers (assisted decoding crops at every step)
            self._views = (self.keys, self.values)

    def reset(self) -> None:
        self._buffers = self._views = None
        super().reset()


class ImageGPTDynamicCache(DynamicCache):
    """The cache `ImageGPTModel` and `generate()` use by default: a `DynamicCache` (same API, same results) whose
    layers grow in place (`ImageGPTCacheLayer`) instead of by concatenation."""

    def __init__(self, ddp_cache_data=None, config: ImageGPTConfig | None = None):
        if config is None and isinstance(ddp_cache_data, PreTrainedConfig):  # `ImageGPTDynamicCache(config)`
            config, ddp_cache_data = ddp_cache_data, None
        super().__init__(ddp_cache_data, config=config)
        if config is not None and ddp_cache_data is None:
            self.layers = [ImageGPTCacheLayer(max_length=config.n_positions) for _ in range(config.n_layer)]
            self.layer_class_to_replicate = None
        # Otherwise (torch's DataParallel gathers a cache by rebuilding it from its tensors) the layers are
        # DynamicCache's own: the same results, grown by concatenation.


class ImageGPTLayerNorm(nn.Module):
    """OpenAI's iGPT norm: x * rsqrt(mean(x^2) + eps) * g. No mean subtraction and no bias (an RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type == "cpu" and hidden_states.dtype == torch.float32:
            # On CPU torch's rms_norm is a composite (pow, mean, type casts, ...) that runs 2-3x slower than this.
            variance = (hidden_states * hidden_states).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(variance + self.eps))
        # Elsewhere torch's fused kernel; it computes in float32 for half-precision inputs.
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    # query (B, nh, T, hs), key/value (B, nh, S, hs); attention_mask is additive, (B, 1, T, S), or None.
    if getattr(module, "reorder_and_upcast_attn", False):
        # transformers' ImageGPT option for mixed precision: scores and softmax in float32.
        attn_weights = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    else:
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, T, nh, hs)
    return attn_output, attn_weights


def blockwise_causal_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    block_size: int = 128,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa for causal self-attention with dropout on CPU, one block of queries at a time.

    On CPU, sdpa with dropout falls back to its math path over the full (T, T) scores, the masked half included.
    Queries `[s, e)` only see keys `[0, e)`: going block by block skips most of that half (and its dropout draws),
    which makes a CPU training step's attention about 2x cheaper. Same distribution, same gradients; anything this
    does not cover (a padding mask, a cache, bidirectional attention) goes to transformers' sdpa as usual.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or not module.is_causal or q_len != kv_len or q_len <= block_size:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    outputs = []
    for start in range(0, q_len, block_size):
        end = min(start + block_size, q_len)
        causal = torch.ones(end - start, end, dtype=torch.bool, device=query.device).tril(start)  # key j <= query i
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, :end], value[:, :, :end], causal, dropout_p=dropout, scale=scaling
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (B, T, nh, hs)


class ImageGPTAttention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection (Conv1D, as GPT-2), causal or bidirectional."""

    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = self.embed_dim // self.num_heads
        # Read by the sdpa/flash/flex interfaces: causal for the AR objective, bidirectional for BERT.
        self.is_causal = config.objective == "ar"
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)

        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attention_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        # (B, T, 3d) -> 3 x (B, nh, T, hs)
        qkv = _conv1d(self.c_attn, hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.attention_dropout if self.training else 0.0
        if dropout > 0 and self.config._attn_implementation == "sdpa" and query.device.type == "cpu":
            # CPU sdpa has no fused kernel with dropout: it materializes the whole (T, T) score matrix and its mask.
            attention_interface = blockwise_causal_sdpa_forward
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = _conv1d(self.c_proj, attn_output.reshape(batch_size, seq_len, self.embed_dim))
        # At inference dropout is the identity; skipping the module call matters in the one-token decode step.
        return self.resid_dropout(attn_output) if self.training else attn_output, attn_weights


class ImageGPTMLP(nn.Module):
    def __init__(self, intermediate_size: int, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = ACT2FN[config.activation_function]  # quick_gelu: OpenAI's gelu2, x * sigmoid(1.702 x)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.fuse_quick_gelu = config.activation_function == "quick_gelu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fuse_quick_gelu and _is_plain(self.c_fc) and _is_plain(self.c_proj):
            hidden_states = self._fused_quick_gelu_mlp(hidden_states)
        else:
            hidden_states = self.c_proj(self.act(self.c_fc(hidden_states)))
        return self.dropout(hidden_states) if self.training else hidden_states

    def _fused_quick_gelu_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # quick_gelu(h) = h * sigmoid(a h) = silu(a h) / a with a = 1.702. Both scalings ride on the matmuls (addmm's
        # alpha and beta cost nothing), which leaves one fused elementwise kernel on the widest activation instead of
        # three passes and three (B, T, 4d) allocations; without autograd it even runs in place.
        a = QUICK_GELU_ALPHA
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, d)
        h = torch.addmm(self.c_fc.bias, x, self.c_fc.weight, beta=a, alpha=a)  # (B*T, 4d) = a * c_fc(x)
        h = F.silu(h, inplace=not h.requires_grad)
        out = torch.addmm(self.c_proj.bias, h, self.c_proj.weight, alpha=1.0 / a)  # (B*T, d) = c_proj(quick_gelu)
        return out.view(hidden_states.shape)


class ImageGPTBlock(GradientCheckpointingLayer):
    """Pre-norm block: x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = ImageGPTAttention(config, layer_idx=layer_idx)
        self.ln_2 = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = ImageGPTMLP(inner_dim, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))

    def decode_one(self, hidden_states: torch.Tensor, cache_layer: ImageGPTCacheLayer) -> torch.Tensor:
        """`forward` for one new token per sequence at inference, sdpa attention, no mask: the same operations on the
        same tensors in the same order (so the same bits), without the module calls, mask and dispatch around them.
        `ImageGPTModel` calls it only where that holds (see `ImageGPTModel._can_decode_one`)."""
        attn = self.attn
        batch_size = hidden_states.shape[0]
        qkv = _conv1d(attn.c_attn, self.ln_1.forward(hidden_states))
        query, key, value = qkv.view(batch_size, 1, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        key, value = cache_layer.update(key, value)
        # One query sees every cached key: no mask, as transformers' sdpa path does for a single query.
        attn_output = F.scaled_dot_product_attention(query, key, value, scale=attn.scaling)  # (B, nh, 1, hs)
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, 1, attn.embed_dim)
        hidden_states = hidden_states + _conv1d(attn.c_proj, attn_output)
        return hidden_states + self.mlp.forward(self.ln_2.forward(hidden_states))


class ImageGPTPreTrainedModel(PreTrainedModel):
    config_class = ImageGPTConfig
    config: ImageGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ImageGPTBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": ImageGPTBlock,
        "attentions": OutputRecorder(ImageGPTAttention, index=1),
    }
    # Old checkpoints (e.g. the Hub's openai/imagegpt-*) carry the causal-mask buffers of transformers 4.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$", r"attn\.masked_bias$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, ImageGPTLayerNorm):
            init.ones_(module.weight)
        if isinstance(module, (ImageGPTAttention, ImageGPTMLP)):
            # GPT-2's scaled init of the residual projections: 2 residual paths per block.
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.c_proj.weight, mean=0.0, std=std)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the source files and a full `auto_map` for remote code."""
        # Every head is listed, so any Auto class loads any checkpoint; the files are copied because each class is
        # registered for its auto class at the bottom of this module.
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- input checks: a clear ValueError instead of an IndexError or a device-side assert -------------------------

    # True while `generate()` runs its decode loop (see `ImageGPTForCausalImageModeling._optimize_model_for_decode`):
    # the ids it feeds back are the model's own argmax or samples over the palette, so checking them again would only
    # cost a device sync per token.
    _inputs_from_decode_loop = False

    def _check_ids(self, name: str, ids: torch.Tensor, high: int, allow_ignore: bool = False) -> None:
        if _is_compiling() or self._inputs_from_decode_loop or ids.numel() == 0:
            return
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"`{name}` must hold integer ids, got dtype {ids.dtype}.")
        if not allow_ignore:
            low, top = torch.stack(torch.aminmax(ids)).tolist()  # one pass over the ids, one sync
            if low >= 0 and top < high:
                return
        valid = (ids >= 0) & (ids < high)
        if allow_ignore:
            valid |= ids == -100
        if not bool(valid.all()):
            bad = ids[~valid]
            raise ValueError(
                f"`{name}` holds ids outside [0, {high}){' (or -100, ignored)' if allow_ignore else ''}: "
                f"min {int(bad.min())}, max {int(bad.max())}, {bad.numel()} invalid."
            )

    def _check_shape(self, name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if tensor is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"`{name}` has shape {tuple(tensor.shape)}, expected {tuple(shape)}.")


@dataclass
class ImageGPTModelOutput(BaseModelOutputWithPast):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The paper's linear-probe feature: the normed hidden state of `config.feature_layer` (default: the middle of
        the network, `n_layer // 2`), averaged over positions. See `ImageGPTModel.extract_features`.
    """

    pooler_output: torch.FloatTensor | None = None


class ImageGPTModel(ImageGPTPreTrainedModel):
    """The iGPT decoder: palette-id embeddings + learned positions, `n_layer` blocks, final norm.

    Attention is causal for `config.objective == "ar"` and bidirectional for `"bert"`.
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__(config)
        self.embed_dim = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.n_positions, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ImageGPTBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = ImageGPTLayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def resolve_layer(self, layer: int | None) -> int:
        """A hidden-state index in `[0, n_layer]` (negative counts from the end; `None` is `config.feature_layer`,
        itself defaulting to the middle of the network, where the paper finds the best linear-probe features)."""
        n_layer = self.config.n_layer
        if layer is None:
            layer = self.config.feature_layer if self.config.feature_layer is not None else n_layer // 2
        if not -(n_layer + 1) <= layer <= n_layer:
            raise ValueError(f"Layer {layer} is not a hidden-state index of a {n_layer}-layer model.")
        return layer % (n_layer + 1)

    def normed_features(self, hidden_state: torch.Tensor, layer: int) -> torch.Tensor:
        """The paper's `n^l`: hidden state `l` through the norm the next block reads it with (`ln_1` of block `l`;
        the final norm for `l = n_layer`, whose hidden state is already normed)."""
        return hidden_state if layer == self.config.n_layer else self.h[layer].ln_1(hidden_state)

    @torch.no_grad()
    def extract_features(
        self,
        input_ids: torch.LongTensor,
        layers: int | list[int] | None = None,
        pool: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Features of several layers in one forward pass, as the paper's linear probes read them.

        Returns `(len(layers), batch, hidden)` mean-pooled features (`pool=True`) or `(len(layers), batch, seq, hidden)`.
        `layers` are hidden-state indices (0 = embeddings, `n_layer` = final output); `None` means all of them.
        `kwargs` go to `forward` (e.g. `prepend_sos=True` for OpenAI's AR inputs, `bool_masked_pos`).
        """
        if layers is None:
            layers = list(range(self.config.n_layer + 1))
        layers = [self.resolve_layer(layer) for layer in ([layers] if isinstance(layers, int) else layers)]
        kwargs.pop("output_hidden_states", None)
        outputs = self(input_ids, output_hidden_states=True, use_cache=False, **kwargs)
        mask = kwargs.get("attention_mask")
        features = [self.normed_features(outputs.hidden_states[layer], layer) for layer in layers]
        return torch.stack([_mean_pool(f, mask) if pool else f for f in features])

    def _can_decode_one(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values: Cache | None, kwargs
    ) -> bool:
        """Whether this call is a plain one-token decode step that `ImageGPTBlock.decode_one` computes exactly as
        `forward` does: inference, causal sdpa, one new token after a non-empty `ImageGPTDynamicCache`, no padding,
        nothing to record (attentions, hidden states) and no hooks on the blocks (PEFT, offloading, user hooks)."""
        if (
            self.training
            or hidden_states.shape[1] != 1
            or _is_compiling()
            or self.config.objective != "ar"
            or self.config._attn_implementation != "sdpa"
            or not isinstance(past_key_values, ImageGPTDynamicCache)
            or kwargs.get("output_attentions", self.config.output_attentions)
            or kwargs.get("output_hidden_states", self.config.output_hidden_states)
            or set(kwargs) - {"output_attentions", "output_hidden_states", "return_dict"}
            or len(past_key_values.layers) != len(self.h)
            or not all(isinstance(layer, ImageGPTCacheLayer) for layer in past_key_values.layers)
            or past_key_values.get_seq_length() == 0
        ):
            return False
        if attention_mask is not None:
            # A 2-D all-ones mask (what generate() passes) masks nothing; reading it syncs, so only on CPU.
            if attention_mask.dim() != 2 or hidden_states.device.type != "cpu" or not bool(attention_mask.all()):
                return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        for block in self.h:  # the modules `decode_one` does not call (`_conv1d` checks the projections itself)
            for module in (block, block.ln_1, block.attn, block.ln_2, block.mlp):
                if _is_hooked(module):
                    return False
        return True

    def add_sos(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[SOS, x_1, ..., x_{n-1}]` from the pixel ids `x` (B, n): the input OpenAI's AR code builds."""
        sos = torch.full_like(input_ids[:, :1], self.config.sos_token_id)
        return torch.cat([sos, input_ids[:, :-1]], dim=1)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        prepend_sos: bool | None = None,
        use_cache: bool | None = None,
        return_pooler_output: bool = True,
        **kwargs,
    ) -> ImageGPTModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Palette ids from `ImageGPTImageProcessor` (the SOS id, `vocab_size - 1`, starts a generated sequence).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions whose input embedding is zeroed, as OpenAI's BERT objective does (see `random_bert_mask`).
        prepend_sos (`bool`, *optional*, defaults to `config.prepend_sos`):
            Build the input as `[SOS, x_1, ..., x_{n-1}]` from the pixel ids, as OpenAI's AR code does.
        return_pooler_output (`bool`, *optional*, defaults to `True`):
            Compute `pooler_output`. The heads, which do not read it, pass `False` to save a norm and a mean per call
            (noticeable in the one-token decode steps of generation).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        prepend_sos = self.config.prepend_sos if prepend_sos is None else prepend_sos
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"`input_ids` must be (batch_size, sequence_length), got shape {tuple(input_ids.shape)}."
                )
            self._check_ids("input_ids", input_ids, self.config.vocab_size)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.embed_dim:
            raise ValueError(
                f"`inputs_embeds` must be (batch_size, sequence_length, {self.embed_dim}), "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        if prepend_sos:
            if self.config.objective != "ar":
                raise ValueError("`prepend_sos` applies to autoregressive models only, not to objective='bert'.")
            if input_ids is None or past_key_values is not None:
                raise ValueError("`prepend_sos` needs `input_ids` of whole images and no `past_key_values`.")
            input_ids = self.add_sos(input_ids)

        batch_size, seq_len = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        self._check_shape("bool_masked_pos", bool_masked_pos, (batch_size, seq_len))

        if use_cache and past_key_values is None:
            past_key_values = ImageGPTDynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if bool_masked_pos is not None:
            # OpenAI's BERT: a masked token contributes nothing but its position embedding.
            inputs_embeds = inputs_embeds * (~bool_masked_pos.bool()).unsqueeze(-1).to(inputs_embeds.dtype)

        # Length checks read tensor values (a device sync); compiled graphs and generate's decode loop skip them.
        check_lengths = not (_is_compiling() or self._inputs_from_decode_loop)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            if check_lengths and past_seen + seq_len > self.config.n_positions:
                raise ValueError(
                    f"Sequence of {past_seen + seq_len} tokens ({past_seen} cached + {seq_len} new) is longer than "
                    f"the model's n_positions={self.config.n_positions}."
                )
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen).unsqueeze(0)
        elif check_lengths and position_ids.numel() and int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(
                f"`position_ids` go up to {int(position_ids.max())}, past n_positions={self.config.n_positions}."
            )
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))

        if not return_pooler_output and self._can_decode_one(hidden_states, attention_mask, past_key_values, kwargs):
            # Generation's one-token step: the blocks' arithmetic without the machinery around it (about 2x faster
            # for small models on CPU, where that machinery costs more than the arithmetic).
            for block, cache_layer in zip(self.h, past_key_values.layers):
                hidden_states = block.decode_one(hidden_states, cache_layer)
            return ImageGPTModelOutput(last_hidden_state=self.ln_f(hidden_states), past_key_values=past_key_values)

        if attention_mask is not None and attention_mask.dim() < 4:
            attention_mask = attention_mask.view(batch_size, -1)
        pool_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
        }
        if self.config.objective == "ar":
            mask = create_causal_mask(**mask_kwargs, position_ids=position_ids)
        else:
            mask = create_bidirectional_mask(**mask_kwargs)

        feature_layer = self.resolve_layer(None) if return_pooler_output else -1
        pooled = None
        for i, block in enumerate(self.h):
            if i == feature_layer:
                pooled = _mean_pool(block.ln_1(hidden_states), pool_mask)
            hidden_states = block(hidden_states, mask, past_key_values, position_ids=position_ids, **kwargs)
        hidden_states = self.ln_f(hidden_states)
        if return_pooler_output and pooled is None:
            pooled = _mean_pool(hidden_states, pool_mask)

        return ImageGPTModelOutput(
            last_hidden_state=hidden_states, past_key_values=past_key_values, pooler_output=pooled
        )


def _gen_loss_ar(logits: torch.Tensor, labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Mean cross-entropy of next-pixel prediction; `shifted=False` means `logits[:, t]` already predicts `labels[:, t]`."""
    if shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _gen_loss_bert(logits: torch.Tensor, labels: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """OpenAI's BERT loss: per image, the mean cross-entropy over its masked positions; then the mean over images.

    Images with no masked position (or only ignored labels there) do not count.
    """
    weight = (bool_masked_pos.bool() & (labels != -100)).to(torch.float32)
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), labels.masked_fill(labels == -100, 0), reduction="none"
    )  # (B, T)
    per_image_count = weight.sum(dim=1)
    per_image = (token_loss * weight).sum(dim=1) / per_image_count.clamp(min=1)
    has_mask = (per_image_count > 0).to(torch.float32)
    return (per_image * has_mask).sum() / has_mask.sum().clamp(min=1)


class ImageGPTForCausalImageModeling(ImageGPTPreTrainedModel, GenerationMixin):
    """iGPT with its autoregressive head: next-pixel logits over the palette (`vocab_size - 1` outputs).

    Generation starts from the SOS id (`config.vocab_size - 1`) and works with every `generate()` option.

    OpenAI's generative loss (all `n` pixels, each predicted from its predecessors, SOS at position 0) is
    `model(input_ids=pixel_ids, labels=pixel_ids, prepend_sos=True).loss`; without `prepend_sos` the labels are
    shifted inside the model, as in transformers, and the first pixel is not predicted.
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__(config)
        if config.objective != "ar":
            raise ValueError(
                "ImageGPTForCausalImageModeling needs an autoregressive config (objective='ar'); "
                f"got objective={config.objective!r}. Use ImageGPTForMaskedImageModeling for BERT models."
            )
        self.transformer = ImageGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size - 1, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # generate() feeds its own SOS; a config with prepend_sos=True must not shift the ids again.
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        model_inputs["prepend_sos"] = False
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate()'s default cache is a `DynamicCache`, which copies itself whole at every token; ours grows in
        # place. Only that default is swapped: caches the user passed or chose (`cache_implementation`) stay.
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if (
            type(cache) is DynamicCache
            and generation_config.cache_implementation in (None, "dynamic")
            and not getattr(cache, "_is_user_defined", False)
        ):
            model_kwargs["past_key_values"] = ImageGPTDynamicCache(config=self.config)
        return result

    @contextlib.contextmanager
    def _optimize_model_for_decode(self):
        # generate() runs its token-by-token loop inside this context (after the prefill, which is checked as usual).
        # The ids it feeds back there are the model's own picks over the palette, so the per-step id and length
        # checks are skipped: on an accelerator each would cost a device sync per token.
        with super()._optimize_model_for_decode():
            self.transformer._inputs_from_decode_loop = True
            try:
                yield
            finally:
                self.transformer._inputs_from_decode_loop = False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prepend_sos: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Palette ids in `[0, vocab_size - 1)` or -100 (ignored). Shifted inside the model (`labels = input_ids`),
            unless `prepend_sos` is on, in which case `labels[:, t]` is the target of `logits[:, t]`.
        prepend_sos (`bool`, *optional*, defaults to `config.prepend_sos`):
            Build the input as `[SOS, x_1, ..., x_{n-1}]` from the pixel ids, as OpenAI's code does.
        """
        prepend_sos = self.config.prepend_sos if prepend_sos is None else prepend_sos
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            return_pooler_output=False,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            prepend_sos=prepend_sos,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            self._check_shape("labels", labels, hidden_states.shape[:2])
            self._check_ids("labels", labels, self.config.vocab_size - 1, allow_ignore=True)
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("`labels` need logits for every position; do not combine them with `logits_to_keep`.")
            loss = _gen_loss_ar(logits, labels, shifted=not prepend_sos)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ImageGPTForMaskedImageModeling(ImageGPTPreTrainedModel):
    """iGPT with its BERT head: bidirectional attention, masked-pixel logits over the palette.

    `bool_masked_pos` (True = masked) zeroes those positions' input embeddings, as OpenAI's BERT code does; the loss
    covers the masked positions only. `random_bert_mask` draws the paper's 15% mask.
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__(config)
        if config.objective != "bert":
            raise ValueError(
                "ImageGPTForMaskedImageModeling needs a bidirectional config (objective='bert'); "
                f"got objective={config.objective!r}. Pass objective='bert' to the config or to from_pretrained."
            )
        self.transformer = ImageGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size - 1, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, sequence_length)`):
            True where a pixel is masked. Required with `labels`.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The original palette ids (usually `input_ids` itself); only masked positions count. The loss is OpenAI's:
            per-image mean over masked positions, then mean over the batch.
        """
        if labels is not None and bool_masked_pos is None:
            raise ValueError("`labels` need `bool_masked_pos`: the BERT loss covers the masked positions only.")
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            return_pooler_output=False,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            bool_masked_pos=bool_masked_pos,
            use_cache=False,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            self._check_shape("labels", labels, logits.shape[:2])
            self._check_ids("labels", labels, self.config.vocab_size - 1, allow_ignore=True)
            loss = _gen_loss_bert(logits, labels, bool_masked_pos)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@dataclass
class ImageGPTImageClassifierOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): `clf_loss + config.gen_loss_weight * gen_loss` (the paper's fine-tuning
        objective), or `clf_loss` alone when there is no generative part.
    clf_loss (`torch.FloatTensor`, *optional*): classification loss.
    gen_loss (`torch.FloatTensor`, *optional*): generative loss (AR or BERT, by `config.objective`).
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): classification scores.
    """

    loss: torch.FloatTensor | None = None
    clf_loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class ImageGPTForImageClassification(ImageGPTPreTrainedModel):
    """iGPT with a linear classifier on average-pooled hidden states.

    `config.classifier_layer` picks the pooled layer `l` (default: the final normed output, as the paper's
    fine-tuning); an earlier layer is read as the paper's probes read it, through the norm of the block that follows
    (`n^l`, see `ImageGPTModel.normed_features`). With `config.gen_loss_weight = w > 0` the model also carries the LM head and trains on the paper's
    joint objective `L = L_clf + w * L_gen`, returning both parts (AR: next-pixel loss; BERT: masked-pixel loss over
    `bool_masked_pos`).
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ImageGPTModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        if config.gen_loss_weight > 0:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size - 1, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prepend_sos: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageGPTImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, num_labels)` (or floats for regression / multi-label, by `config.problem_type`).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            BERT models: positions whose input embedding is zeroed; the generative loss covers them.
        prepend_sos (`bool`, *optional*, defaults to `config.prepend_sos`):
            AR models: pool over `[SOS, x_1, ..., x_{n-1}]`, as OpenAI's code does, and score all `n` pixels.
        """
        prepend_sos = self.config.prepend_sos if prepend_sos is None else prepend_sos
        layer = self.config.classifier_layer
        want_hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            return_pooler_output=False,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            bool_masked_pos=bool_masked_pos,
            prepend_sos=prepend_sos,
            use_cache=False,
            output_hidden_states=bool(want_hidden) or layer is not None,
            **kwargs,
        )
        if layer is None:
            features = outputs.last_hidden_state
        else:
            layer = self.transformer.resolve_layer(layer)
            features = self.transformer.normed_features(outputs.hidden_states[layer], layer)
        logits = self.score(_mean_pool(features, attention_mask))

        loss = clf_loss = gen_loss = None
        if labels is not None:
            if labels.dim() == 0 or labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"`labels` must have one entry per image ({logits.shape[0]}), got shape {tuple(labels.shape)}."
                )
            if self.config.problem_type in (None, "single_label_classification") and not labels.is_floating_point():
                self._check_ids("labels", labels, self.num_labels)
            clf_loss = self.loss_function(labels, logits, self.config)
            loss = clf_loss
            if self.config.gen_loss_weight > 0:
                gen_loss = self._gen_loss(outputs.last_hidden_state, input_ids, bool_masked_pos, prepend_sos)
                loss = clf_loss + self.config.gen_loss_weight * gen_loss

        return ImageGPTImageClassifierOutput(
            loss=loss,
            clf_loss=clf_loss,
            gen_loss=gen_loss,
            logits=logits,
            hidden_states=outputs.hidden_states if want_hidden else None,
            attentions=outputs.attentions,
        )

    def _gen_loss(self, last_hidden_state, input_ids, bool_masked_pos, prepend_sos) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("The generative part of the loss needs `input_ids` (the targets), not `inputs_embeds`.")
        gen_logits = self.lm_head(last_hidden_state)
        targets = input_ids if prepend_sos or self.config.objective == "bert" else input_ids[:, 1:]
        self._check_ids("input_ids (generative targets)", targets, self.config.vocab_size - 1)
        if self.config.objective == "bert":
            if bool_masked_pos is None:
                raise ValueError(
                    "BERT fine-tuning with gen_loss_weight > 0 needs `bool_masked_pos` (see `random_bert_mask`)."
                )
            return _gen_loss_bert(gen_logits, input_ids, bool_masked_pos)
        return _gen_loss_ar(gen_logits, input_ids, shifted=not prepend_sos)


ImageGPTModel.register_for_auto_class("AutoModel")
ImageGPTForCausalImageModeling.register_for_auto_class("AutoModelForCausalLM")
ImageGPTForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
ImageGPTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "ImageGPTForCausalImageModeling",
    "ImageGPTForImageClassification",
    "ImageGPTForMaskedImageModeling",
    "ImageGPTImageClassifierOutput",
    "ImageGPTModel",
    "ImageGPTModelOutput",
    "ImageGPTPreTrainedModel",
    "random_bert_mask",
]
