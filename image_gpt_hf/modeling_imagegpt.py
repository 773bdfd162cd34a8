"""PyTorch Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020).

One file holds the model, top to bottom in the order data flows: norm, attention, MLP, block, the decoder, and its
three heads (causal = the paper's AR objective, masked = its BERT objective, classification = its fine-tuning).
State-dict keys and shapes are those of transformers' ImageGPT, so checkpoints move both ways unchanged.

The model goes through transformers' public extension points only: the attention interface, `Cache` objects, the
masking utilities and output capturing. What differs between transformers releases lives in transformers_compat.py.

This module is shipped as remote code by `save_pretrained`: it imports only torch, transformers and its sibling
modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import (
    AttentionMaskInterface,
    create_bidirectional_mask,
    create_causal_mask,
    sdpa_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_imagegpt import ImageGPTConfig
from .transformers_compat import (
    cache_output,
    mask_cache_argument,
    output_cache,
    resolve_cache,
    select_hidden_states_by_index,
)

logger = logging.get_logger(__name__)

# The auto classes (besides AutoConfig) a saved checkpoint names in `auto_map`, so that
# `AutoModel*.from_pretrained(path, trust_remote_code=True)` works where this package is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_imagegpt.ImageGPTConfig",
    "AutoModel": "modeling_imagegpt.ImageGPTModel",
    "AutoModelForCausalLM": "modeling_imagegpt.ImageGPTForCausalImageModeling",
    "AutoModelForMaskedImageModeling": "modeling_imagegpt.ImageGPTForMaskedImageModeling",
    "AutoModelForImageClassification": "modeling_imagegpt.ImageGPTForImageClassification",
}

# Keyword arguments a forward takes besides its named ones: the output flags that transformers' output capturing
# reads. Anything else is refused, so that nothing that would change the result is silently dropped.
OUTPUT_FLAGS = frozenset({"output_attentions", "output_hidden_states", "return_dict"})

# The attention of CPU training with attention dropout: what "sdpa" (the default) runs there.
BLOCKWISE_SDPA = "imagegpt_blockwise_sdpa"


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor | None, n_positions: int) -> torch.Tensor:
    """Average over positions (B, T, d) -> (B, d), skipping the padding of a 2-D mask (its last T entries).

    The paper's feature is the mean over a whole image (`n_positions` ids); a part of one is pooled as given, as
    transformers' ImageGPT does, with a warning.
    """
    if states.shape[1] != n_positions:
        logger.warning_once(
            f"Pooling {states.shape[1]} positions, not a whole image of n_positions={n_positions}: the mean is over "
            "the part given."
        )
    if attention_mask is None:
        return states.mean(dim=1)
    if attention_mask.dim() != 2:
        raise ValueError(f"Pooling skips padding by a 2-D `attention_mask`; got shape {tuple(attention_mask.shape)}.")
    weights = attention_mask[:, -states.shape[1] :].bool().to(states.dtype).unsqueeze(-1)
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

    What the default attention ("sdpa") runs in CPU training with attention dropout, and registered with transformers'
    attention interface as "imagegpt_blockwise_sdpa". On CPU, sdpa with dropout falls back to its math path over the
    full (T, T) scores, the masked half included. Queries `[s, e)` only see keys `[0, e)`: going block by block skips
    most of that half (and its dropout draws), which makes a CPU training step's attention about 2x cheaper. Same
    distribution, same gradients (not the same dropout draws as sdpa); anything it does not cover (no dropout, a
    padding mask, a cache, bidirectional attention) goes to transformers' sdpa as usual.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if dropout == 0 or attention_mask is not None or not module.is_causal or q_len != kv_len or q_len <= block_size:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
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


AttentionInterface.register(BLOCKWISE_SDPA, blockwise_causal_sdpa_forward)
AttentionMaskInterface.register(BLOCKWISE_SDPA, sdpa_mask)


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
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        # (B, T, 3d) -> 3 x (B, nh, T, hs)
        qkv = self.c_attn(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation
        if implementation == "sdpa" and self.training and self.attention_dropout > 0 and query.device.type == "cpu":
            implementation = BLOCKWISE_SDPA  # sdpa's CPU dropout path computes the whole (T, T) score matrix
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.c_proj(attn_output.reshape(batch_size, seq_len, self.embed_dim))
        return self.resid_dropout(attn_output), attn_weights


class ImageGPTMLP(nn.Module):
    def __init__(self, intermediate_size: int, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = ACT2FN[config.activation_function]  # quick_gelu: OpenAI's gelu2, x * sigmoid(1.702 x)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


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
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class ImageGPTPreTrainedModel(PreTrainedModel):
    config_class = ImageGPTConfig
    config: ImageGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ImageGPTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
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
    # The losses are means over their targets and take no `num_items_in_batch`: Trainer scales gradient accumulation.
    accepts_loss_kwargs = False

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
        """A hidden-state index in `[0, n_layer]`: `ImageGPTConfig.hidden_state_index`."""
        return self.config.hidden_state_index(layer)

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
        `kwargs` go to `forward` (e.g. `prepend_sos=True` for OpenAI's AR inputs, `bool_masked_pos`, `attention_mask`,
        by which pooling skips padded positions).
        """
        if layers is None:
            layers = range(self.config.n_layer + 1)
        layers = [self.resolve_layer(layer) for layer in ([layers] if isinstance(layers, int) else layers)]
        outputs = self(input_ids, output_hidden_states=True, use_cache=False, **kwargs)
        features = [self.normed_features(outputs.hidden_states[layer], layer) for layer in layers]
        mask, n_positions = kwargs.get("attention_mask"), self.config.n_positions
        return torch.stack([mean_pool(f, mask, n_positions) if pool else f for f in features])

    def add_sos(self, input_ids: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """`[SOS, x_1, ..., x_{n-1}]` from the pixel ids `x` (B, n): the input OpenAI's AR code builds; with
        `class_labels` (B,), each image's class token in place of SOS (-100: no class, SOS)."""
        start = torch.full_like(input_ids[:, :1], self.config.sos_token_id)
        if class_labels is not None:
            labels = class_labels.to(input_ids.device).view(-1, 1)
            start = torch.where(labels == -100, start, labels + self.config.palette_size)
        return torch.cat([start, input_ids[:, :-1]], dim=1)

    def resolve_prepend_sos(self, input_ids, cache, prepend_sos: bool | None, class_labels=None) -> bool:
        """Whether a forward builds the start of the sequence (`prepend_sos`, default the config's): not for sequences
        already started, a step on a cache that holds positions or ids that begin with SOS or a class token (as
        generate() and its classifier-free guidance pass them), which are used as given."""
        prepend_sos = self.config.prepend_sos if prepend_sos is None else prepend_sos
        if prepend_sos and class_labels is None and input_ids is not None and not torch.compiler.is_compiling():
            cached = cache is not None and cache.get_seq_length() > 0
            prepend_sos = not (cached or bool((input_ids[:, 0] >= self.config.palette_size).all()))
        return prepend_sos

    @select_hidden_states_by_index
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        prepend_sos: bool | None = None,
        class_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pooler_layer: int | None = None,
        return_pooler_output: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ImageGPTModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Palette ids from `ImageGPTImageProcessor` (the SOS id, `vocab_size - 1`, starts a generated sequence).
        cache (`Cache`, *optional*):
            Keys and values of earlier positions (`past_key_values` is accepted as well, its name before transformers
            5.24). Returned when `use_cache` is on (default: `config.use_cache`; always off for BERT models).
        attention_mask (`torch.Tensor`, *optional*):
            `(batch_size, cached + sequence_length)` with 1 for positions to attend to and 0 for padding, or a 4-D
            mask `(batch_size, 1, sequence_length, key_length)` as transformers' generation builds for static caches.
        token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            As in transformers' ImageGPT: their token embeddings are added to the input.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            BERT models only: positions (true where nonzero) whose input embedding is zeroed, as OpenAI's BERT
            objective does (see `random_bert_mask`). Causal models refuse it.
        prepend_sos (`bool`, *optional*, defaults to `config.prepend_sos`):
            Build the input as `[SOS, x_1, ..., x_{n-1}]` from the `n` pixel ids, as OpenAI's AR code does. Ids that
            already start with SOS or a class token, and steps on a cache that holds positions, are used as given
            (generation, classifier-free guidance); ids that hold SOS elsewhere are refused.
        class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class-conditional models (`config.class_conditional`) with `prepend_sos`: each image's class, whose token
            takes SOS's place (-100: no class, SOS itself).
        pooler_layer (`int`, *optional*, defaults to `config.feature_layer`):
            The hidden-state index whose normed states are averaged into `pooler_output` (see `resolve_layer`).
        return_pooler_output (`bool`, *optional*):
            Compute `pooler_output`, the mean over the positions given (`True`; other lengths than `n_positions` are
            pooled with a warning), skip it (`False`: the heads that do not read it save a norm and a mean), or
            (`None`) compute it for whole images only and leave it `None` for a prompt or a decoding step.
        """
        config = self.config
        cache = resolve_cache(cache, past_key_values)
        unexpected = set(kwargs) - OUTPUT_FLAGS
        if unexpected:  # transformers' forwards take **kwargs; one that is not honoured must not be dropped silently
            raise TypeError(f"{type(self).__name__}.forward() got unexpected argument(s): {sorted(unexpected)}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions", config.output_attentions) and config._attn_implementation != "eager":
            # As transformers' models do with sdpa: the call runs, says so, and `attentions` holds no weights.
            logger.warning_once(
                f"`output_attentions=True` needs attn_implementation='eager': {config._attn_implementation!r} "
                "computes no attention weights, so `attentions` holds none. Load the model with "
                "`attn_implementation='eager'` (or call `model.set_attn_implementation('eager')`) to get them."
            )
        use_cache = config.use_cache and config.objective == "ar" if use_cache is None else use_cache
        if (
            self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and (use_cache or cache is not None)
        ):
            logger.warning_once("Caching is incompatible with gradient checkpointing: running without a cache.")
            use_cache, cache = False, None

        prepend_sos = self.resolve_prepend_sos(input_ids, cache, prepend_sos, class_labels)
        if class_labels is not None:
            known = (class_labels >= 0) & (class_labels < config.num_labels) | (class_labels == -100)
            if not (config.class_conditional and prepend_sos) or not bool(known.all()):
                raise ValueError(
                    "`class_labels` (class indices, or -100 for none) choose the first token of a class-conditional "
                    f"model's pixel ids (with `prepend_sos`); this model has {config.num_labels if config.class_conditional else 'no'} "
                    "classes. Without `prepend_sos`, start `input_ids` with `config.class_token_id(label)` instead."
                )
        if prepend_sos:
            if input_ids is None or cache is not None or attention_mask is not None or token_type_ids is not None:
                raise ValueError(
                    "`prepend_sos` builds `[SOS, x_1, ..., x_{n-1}]` from whole images' `input_ids`: it takes no "
                    "cache, `inputs_embeds`, `attention_mask` or `token_type_ids` (pass ids that start with SOS and "
                    "`prepend_sos=False` for those)."
                )
            if not torch.compiler.is_compiling() and bool((input_ids >= config.palette_size).any()):
                raise ValueError(
                    f"`input_ids` hold SOS or class ids (>= {config.palette_size}) after a pixel, but `prepend_sos` is on "
                    "and adds the start itself. Pass pixel ids only (e.g. `ids[:, 1:]` of a generate() output), whole "
                    "sequences that each start with SOS, or `prepend_sos=False`."
                )
            input_ids = self.add_sos(input_ids, class_labels)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if bool_masked_pos is not None:
            if config.objective != "bert":  # a causal model was never trained on zeroed inputs: its output is noise
                raise ValueError(
                    "`bool_masked_pos` masks pixels for BERT models (objective='bert'); this model is autoregressive "
                    "and reads whole images. Leave the mask out (a data collator's objective=None or 'ar' adds none)."
                )
            # OpenAI's BERT: a masked token contributes nothing but its position embedding.
            inputs_embeds = inputs_embeds * (~bool_masked_pos.bool()).unsqueeze(-1).to(inputs_embeds.dtype)
        seq_len = inputs_embeds.shape[1]
        past_seen = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 4 and isinstance(past_seen, int):
            expected = (inputs_embeds.shape[0], past_seen + seq_len)  # transformers' masks would read it misaligned
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected {expected}: one entry per "
                    "cached and new position of each sequence (or a 4-D mask)."
                )
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen).unsqueeze(0)
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if return_pooler_output is None:  # whole images only, padded by a 2-D mask if any
            whole = isinstance(past_seen, int) and past_seen == 0 and seq_len == config.n_positions
            return_pooler_output = whole and (attention_mask is None or attention_mask.dim() == 2)
        pool_layer = self.resolve_layer(pooler_layer) if return_pooler_output else None

        hidden_states = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids)
        hidden_states = self.drop(hidden_states)

        mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if config.objective == "ar":
            mask = create_causal_mask(**mask_kwargs, **mask_cache_argument(cache), position_ids=position_ids)
        else:
            mask = create_bidirectional_mask(**mask_kwargs, **mask_cache_argument(cache))

        pooled = None
        for i, block in enumerate(self.h):
            if i == pool_layer:
                pooled = mean_pool(block.ln_1(hidden_states), attention_mask, config.n_positions)
            hidden_states = block(hidden_states, mask, cache)
        hidden_states = self.ln_f(hidden_states)
        if pool_layer == config.n_layer:
            pooled = mean_pool(hidden_states, attention_mask, config.n_positions)

        return ImageGPTModelOutput(
            last_hidden_state=hidden_states, pooler_output=pooled, **cache_output(cache if use_cache else None)
        )


def _gen_loss_ar(logits: torch.Tensor, labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Mean cross-entropy of next-pixel prediction; `shifted=False` means `logits[:, t]` already predicts `labels[:, t]`.
    With every label -100 (no target) the loss is nan, as in transformers' causal LMs."""
    if shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _gen_loss_bert(logits: torch.Tensor, labels: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """OpenAI's BERT loss: per image, the mean cross-entropy over its masked positions; then the mean over images.

    Images with no masked position (or only ignored labels there) do not count; with no target at all the loss is nan
    (a mean over nothing), as the AR loss with every label -100 and transformers' causal LMs give.
    """
    weight = (bool_masked_pos.bool() & (labels != -100)).to(torch.float32)
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), labels.masked_fill(labels == -100, 0), reduction="none"
    )  # (B, T)
    per_image_count = weight.sum(dim=1)
    per_image = (token_loss * weight).sum(dim=1) / per_image_count.clamp(min=1)
    has_mask = (per_image_count > 0).to(torch.float32)
    return (per_image * has_mask).sum() / has_mask.sum()


class ImageGPTForCausalImageModeling(ImageGPTPreTrainedModel, GenerationMixin):
    """iGPT with its autoregressive head: next-pixel logits over the palette (`vocab_size - 1` outputs).

    Generation starts from the SOS id (`config.vocab_size - 1`) and works with every `generate()` option.

    OpenAI's generative loss (all `n` pixels, each predicted from its predecessors, SOS at position 0) is
    `model(input_ids=pixel_ids, labels=pixel_ids, prepend_sos=True).loss`; without `prepend_sos` the labels are
    shifted inside the model, as in transformers (`labels=input_ids` with SOS at position 0 is the usual pattern),
    and the first position is not predicted.
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__(config)
        if config.objective != "ar":
            raise ValueError(
                "ImageGPTForCausalImageModeling needs an autoregressive config (objective='ar'); "
                f"got objective={config.objective!r}. Use ImageGPTForMaskedImageModeling for BERT models."
            )
        self.transformer = ImageGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.palette_size, bias=False)
        self.post_init()

    def generate(self, inputs=None, generation_config=None, *args, **kwargs):
        """`GenerationMixin.generate`, refusing up front a length the model cannot see (rather than at the first
        position past `n_positions`, on an accelerator as a device-side assert)."""
        settings = generation_config if generation_config is not None else self.generation_config
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        new_tokens = kwargs.get("max_new_tokens", settings.max_new_tokens)
        if new_tokens is None:
            total = kwargs.get("max_length", settings.max_length)
        else:
            total = new_tokens + (prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else 1)
        if total > self.config.n_positions + 1:
            raise ValueError(
                f"Generating {total} tokens in all is more than this model sees: n_positions={self.config.n_positions} "
                "allows `max_length <= n_positions + 1` (the last generated token is never fed back)."
            )
        return super().generate(inputs, generation_config, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # generate() starts from its own SOS: a config with prepend_sos=True must not add another one.
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        model_inputs["prepend_sos"] = False
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prepend_sos: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Palette ids in `[0, vocab_size - 1)` or -100 (ignored). Shifted inside the model (`labels = input_ids`;
            position 0, which may hold SOS, is never a target), unless `prepend_sos` is on, in which case
            `labels[:, t]` is the target of `logits[:, t]`. The loss is the mean over the targets: nan when there is
            none (every label -100), as in transformers' causal LMs.
        prepend_sos (`bool`, *optional*, defaults to `config.prepend_sos`):
            Build the input as `[SOS, x_1, ..., x_{n-1}]` from the pixel ids, as OpenAI's code does (a class-conditional
            model takes `class_labels`, see `ImageGPTModel.forward`).
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits for the last `logits_to_keep` positions only (0: all), or for the given indices.
        """
        cache = resolve_cache(cache, past_key_values)
        prepend_sos = self.transformer.resolve_prepend_sos(input_ids, cache, prepend_sos, kwargs.get("class_labels"))
        outputs: ImageGPTModelOutput = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            prepend_sos=prepend_sos,
            use_cache=use_cache,
            return_pooler_output=False,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None if labels is None else _gen_loss_ar(logits, labels, shifted=not prepend_sos)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_output(output_cache(outputs)),
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
        self.lm_head = nn.Linear(config.n_embd, config.palette_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
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
            per-image mean over masked positions, then mean over the images that have one; nan when no position is
            masked (a mean over nothing, the rule of the AR loss with every label -100).
        """
        if labels is not None and bool_masked_pos is None:
            raise ValueError("`labels` need `bool_masked_pos`: the BERT loss covers the masked positions only.")
        outputs: ImageGPTModelOutput = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            bool_masked_pos=bool_masked_pos,
            return_pooler_output=False,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None if labels is None else _gen_loss_bert(logits, labels, bool_masked_pos)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@dataclass
class ImageGPTImageClassifierOutput(SequenceClassifierOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*): `clf_loss + config.gen_loss_weight * gen_loss` (the paper's fine-tuning
        objective), or `clf_loss` alone when there is no generative part.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): classification scores.
    clf_loss (`torch.FloatTensor`, *optional*): classification loss.
    gen_loss (`torch.FloatTensor`, *optional*): generative loss (AR or BERT, by `config.objective`).
    """

    clf_loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None


class ImageGPTForImageClassification(ImageGPTPreTrainedModel):
    """iGPT with a linear classifier on average-pooled hidden states.

    `config.classifier_layer` picks the pooled layer `l` (default: the final normed output, as the paper's
    fine-tuning); an earlier layer is read as the paper's probes read it, through the norm of the block that follows
    (`n^l`, see `ImageGPTModel.normed_features`). With `config.gen_loss_weight = w > 0` the model also carries the LM
    head and trains on the paper's joint objective `L = L_clf + w * L_gen`, returning both parts (AR: next-pixel loss;
    BERT: masked-pixel loss over `bool_masked_pos`).
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ImageGPTModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        if config.gen_loss_weight > 0:
            self.lm_head = nn.Linear(config.n_embd, config.palette_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        prepend_sos: bool | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ImageGPTImageClassifierOutput:
        r"""
        labels (`torch.Tensor`, *optional*):
            By `config.problem_type`, as transformers' sequence classification heads: `"single_label_classification"`
            takes integer class ids `(batch_size,)` in `[0, num_labels)`; `"multi_label_classification"` float
            multi-hot (or soft) targets `(batch_size, num_labels)`; `"regression"` numbers `(batch_size,)` or
            `(batch_size, num_labels)`. Unset, it is regression for `num_labels == 1`, single-label classification
            for integer labels and multi-label classification for float ones (and the loss records it in the config,
            as transformers does).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            BERT models: positions whose input embedding is zeroed; the generative loss covers them.
        prepend_sos (`bool`, *optional*, defaults to `config.prepend_sos`):
            AR models: pool over `[SOS, x_1, ..., x_{n-1}]`, as OpenAI's code does, and score all `n` pixels.
        use_cache (`bool`, *optional*, defaults to `False`):
            Return the keys and values (classification does not need them, so they are not kept by default).
        """
        cache = resolve_cache(cache, past_key_values)
        prepend_sos = self.transformer.resolve_prepend_sos(input_ids, cache, prepend_sos)
        layer = self.config.classifier_layer
        outputs: ImageGPTModelOutput = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            bool_masked_pos=bool_masked_pos,
            prepend_sos=prepend_sos,
            use_cache=bool(use_cache),
            pooler_layer=self.config.n_layer if layer is None else layer,
            return_pooler_output=True,
            **kwargs,
        )
        logits = self.score(outputs.pooler_output)

        loss = clf_loss = gen_loss = None
        if labels is not None:
            clf_loss = self.loss_function(labels, logits, self.config)
            loss = clf_loss
            if self.config.gen_loss_weight > 0:
                gen_loss = self._gen_loss(
                    outputs.last_hidden_state, input_ids, bool_masked_pos, prepend_sos, attention_mask
                )
                loss = clf_loss + self.config.gen_loss_weight * gen_loss

        return ImageGPTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            clf_loss=clf_loss,
            gen_loss=gen_loss,
            **cache_output(output_cache(outputs)),
        )

    def _gen_loss(self, last_hidden_state, input_ids, bool_masked_pos, prepend_sos, attention_mask) -> torch.Tensor:
        bert = self.config.objective == "bert"
        if input_ids is None or (bert and bool_masked_pos is None):
            raise ValueError(
                "The generative part of the loss (gen_loss_weight > 0) needs `input_ids` (its targets) and, for BERT "
                "models, `bool_masked_pos` (see `random_bert_mask`)."
            )
        gen_logits = self.lm_head(last_hidden_state)
        # Padded positions (a 2-D mask's zeros) are no targets, as they count in no pooled feature either.
        if attention_mask is not None and attention_mask.dim() == 2:
            input_ids = input_ids.masked_fill(attention_mask == 0, -100)
        if bert:
            return _gen_loss_bert(gen_logits, input_ids, bool_masked_pos)
        return _gen_loss_ar(gen_logits, input_ids, shifted=not prepend_sos)


ImageGPTModel.register_for_auto_class("AutoModel")
ImageGPTForCausalImageModeling.register_for_auto_class("AutoModelForCausalLM")
ImageGPTForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
ImageGPTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "BLOCKWISE_SDPA",
    "ImageGPTForCausalImageModeling",
    "ImageGPTForImageClassification",
    "ImageGPTForMaskedImageModeling",
    "ImageGPTImageClassifierOutput",
    "ImageGPTModel",
    "ImageGPTModelOutput",
    "ImageGPTPreTrainedModel",
    "random_bert_mask",
]
