"""ImageGPT configuration: the fields of transformers' ImageGPTConfig, a few additive ones, and named presets."""

import math
import operator
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# The paper's model sizes (Chen et al., 2020, table 1) plus a tiny one for tests and CPU demos. A preset is data:
# `ImageGPTConfig.from_preset(name, n_px=...)` turns one into a config. OpenAI never said how many heads iGPT-XL had;
# 24 heads keeps the head width at 128, as in iGPT-M, which is also what fused attention kernels run fastest.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 6, "n_embd": 128, "n_head": 4},
    "small": {"n_layer": 24, "n_embd": 512, "n_head": 8},
    "medium": {"n_layer": 36, "n_embd": 1024, "n_head": 8},
    "large": {"n_layer": 48, "n_embd": 1536, "n_head": 16},
    "xl": {"n_layer": 60, "n_embd": 3072, "n_head": 24},
}
PAPER_RESOLUTIONS = (32, 48, 64)

# The model type written for checkpoints that transformers' built-in ImageGPT cannot compute (see
# `ImageGPTConfig.builtin_compatible`): transformers without this package refuses them with a message that asks for
# `trust_remote_code=True` instead of loading them into a model that computes something else.
EXTENDED_MODEL_TYPE = "image_gpt_hf"


def image_side(n_positions: int) -> int:
    """`n_px` of a model that sees `n_positions = n_px * n_px` pixels (also for transformers' own ImageGPT configs)."""
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise ValueError(f"n_positions={n_positions} is not a square; this config has no single n_px.")
    return side


@strict
class ImageGPTConfig(PreTrainedConfig):
    r"""
    Configuration of an Image GPT model. The fields and their defaults are those of transformers' `ImageGPTConfig`
    (the defaults describe iGPT-S at 32x32), so `config.json` files move both ways unchanged. The fields this package
    adds only add behaviour; their defaults reproduce transformers' model exactly.

    vocab_size (`int`, defaults to 513):
        Palette size + 1. The last id is the start-of-sequence (SOS) token; the LM head predicts the palette only.
    n_positions (`int`, defaults to 1024):
        Sequence length the model can see, `n_px * n_px`: the image size is set here (`n_px` is derived from it;
        `from_preset` takes `n_px`).
    objective (`"ar"` or `"bert"`, defaults to `"ar"`):
        The pre-training objective. `"ar"` gives causal attention (next-pixel prediction); `"bert"` gives bidirectional
        attention (masked-pixel prediction, as OpenAI's `-bert` checkpoints). transformers' own ImageGPT ignores this
        field and always attends causally.
    prepend_sos (`bool`, defaults to `False`):
        When `True`, forward passes on full images build the model input as `[SOS, x_1, ..., x_{n-1}]` from the `n`
        pixel ids they are given, exactly as OpenAI's code does, so `logits[:, t]` predicts `x_t` and the loss covers
        all `n` pixels. `False` is transformers' behaviour (the input is used as given). Every forward also takes a
        `prepend_sos` argument that overrides this; `generate()` never prepends (it starts from its own SOS).
    classifier_layer (`int`, *optional*):
        Which layer `ImageGPTForImageClassification` average-pools: an index into `hidden_states` (0 is the
        embedding output, `n_layer` the final normed output; negative indices count from the end), read through the
        norm of the block that follows it, as the paper's `n^l`. `None` (default) is the final normed output, as in
        transformers and the paper's fine-tuning.
    gen_loss_weight (`float`, defaults to 0.0):
        Weight `w` of the generative loss in the classification fine-tuning objective `L = L_clf + w * L_gen`
        (the paper uses 1.0 for AR models). With `w > 0` the classification model carries an LM head.
    class_conditional (`bool`, defaults to `False`):
        A class-conditional model: its input vocabulary holds one token per class after the palette (ids
        `palette_size + c` for the `num_labels` classes of `id2label`), and a sequence starts with its class token in
        place of SOS, which stands for "no class" (label dropout during training teaches the model both, for
        classifier-free guidance). The LM head still predicts the palette only.
    feature_layer (`int`, *optional*):
        The layer whose normed hidden state `ImageGPTModel` averages into `pooler_output` (what the
        `image-feature-extraction` pipeline returns with `pool=True`). `None` is the middle of the network
        (`n_layer // 2`), where the paper finds the best linear-probe features.

    Which layer is pooled: every pooled feature is a hidden state `l` (0 is the embedding output, `n_layer` the final
    normed output) read through the norm of the block that follows it (the paper's `n^l`) and averaged over the
    positions given (the paper's feature is the mean over a whole image, `n_positions` ids; a part of one is pooled as
    given, with a warning). `feature_layer` picks `l` for `ImageGPTModel`'s `pooler_output`, `classifier_layer` for
    `ImageGPTForImageClassification`; `hidden_state_index` resolves either.

    `n_px` and `palette_size` are derived (`n_positions = n_px ** 2`, `vocab_size = palette_size + 1`, plus the classes
    of a class-conditional model); given beside the fields they are checked to agree, never stored.

    A config whose added fields keep their defaults describes a model transformers' built-in ImageGPT computes
    exactly; it is saved with `model_type: "imagegpt"` and moves both ways. Any other (a BERT objective, `prepend_sos`,
    a classifier or feature layer, a joint loss) is saved with `model_type: "image_gpt_hf"`, which this package and
    `trust_remote_code=True` load and which transformers alone refuses (see `builtin_compatible`).
    """

    model_type = "imagegpt"
    # Trainer drops these output keys at evaluation (the cache field is named `cache` since transformers 5.24).
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "embed_dim": "n_embd",  # with `num_heads` and `head_dim`, the names transformers' architecture check reads
        "num_heads": "n_head",
    }

    # transformers' ImageGPTConfig fields, same names and defaults.
    vocab_size: int = 512 + 1
    n_positions: int = 32 * 32
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None
    activation_function: str = "quick_gelu"
    resid_pdrop: float | int = 0.1
    embd_pdrop: float | int = 0.1
    attn_pdrop: float | int = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # Added by this package; the defaults reproduce transformers' ImageGPT.
    objective: Literal["ar", "bert"] = "ar"
    prepend_sos: bool = False
    classifier_layer: int | None = None
    gen_loss_weight: float | int = 0.0
    feature_layer: int | None = None
    class_conditional: bool = False

    def __post_init__(self, n_px: int | None = None, palette_size: int | None = None, **kwargs):
        for name, value in (("n_px", n_px), ("palette_size", palette_size)):
            if value is not None and value != getattr(self, name):
                raise ValueError(f"`{name}`={value!r} disagrees with the fields' {name}={getattr(self, name)}.")
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation (which checks each field's type): what no model could honour."""
        super().validate_architecture()  # n_embd divisible by n_head
        if not 0 <= self.gen_loss_weight < math.inf:
            raise ValueError(f"`gen_loss_weight` must be a finite number >= 0, got {self.gen_loss_weight}.")
        if (self.prepend_sos or self.class_conditional) and self.objective == "bert":
            raise ValueError("`prepend_sos` and `class_conditional` apply to autoregressive models only, not to 'bert'.")
        for name in ("classifier_layer", "feature_layer"):
            if getattr(self, name) is not None:
                self.hidden_state_index(getattr(self, name), name)

    def hidden_state_index(self, layer: int | None = None, name: str = "layer") -> int:
        """`layer` as an index into `hidden_states`, in `[0, n_layer]` (negative ones count from the end). `None` is
        `feature_layer`, itself defaulting to the middle of the network, where the paper finds the best features."""
        if layer is None:
            layer = self.n_layer // 2 if self.feature_layer is None else self.feature_layer
        if not -(self.n_layer + 1) <= operator.index(layer) <= self.n_layer:
            raise ValueError(f"Layer {layer} is not a hidden-state index of a {self.n_layer}-layer model (`{name}`).")
        return layer % (self.n_layer + 1)

    @property
    def builtin_compatible(self) -> bool:
        """Whether transformers' built-in ImageGPT computes this model exactly: the AR objective, no `prepend_sos`, and
        none of the classifier/feature layer or joint-loss options (which the built-in would silently ignore)."""
        return (
            self.objective == "ar"
            and not self.prepend_sos
            and self.classifier_layer is None
            and self.feature_layer is None
            and self.gen_loss_weight == 0
            and not self.class_conditional
        )

    def to_dict(self) -> dict:
        """`PreTrainedConfig.to_dict`, with the model type this config is saved under (see `builtin_compatible`)."""
        output = super().to_dict()
        output["model_type"] = self.model_type if self.builtin_compatible else EXTENDED_MODEL_TYPE
        return output

    @classmethod
    def get_config_dict(cls, *args, **kwargs) -> tuple[dict, dict]:
        """`PreTrainedConfig.get_config_dict`; this class reads both model types it writes."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == EXTENDED_MODEL_TYPE:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict`. The stored model type is not kept on the instance: `to_dict` derives it from
        the fields, so a config reads the same whichever of the two types it was saved under."""
        if config_dict.get("model_type") in (cls.model_type, EXTENDED_MODEL_TYPE):
            config_dict = {key: value for key, value in config_dict.items() if key != "model_type"}
        if "n_px" in config_dict and "n_positions" not in config_dict and isinstance(config_dict["n_px"], int):
            config_dict = {**config_dict, "n_positions": config_dict["n_px"] ** 2}  # the one size it names
        return super().from_dict(config_dict, **kwargs)

    @property
    def sos_token_id(self) -> int:
        """The start-of-sequence id: the last id of the input vocabulary."""
        return self.vocab_size - 1

    @property
    def palette_size(self) -> int:
        """Number of palette colors, i.e. the LM head's output size."""
        return self.vocab_size - 1 - (self.num_labels if self.class_conditional else 0)

    def class_token_id(self, label: int | str) -> int:
        """The input id of a class-conditional model's class `label` (an index or a name of `id2label`)."""
        names = {name: index for index, name in self.id2label.items()}
        if not self.class_conditional:
            raise ValueError("This model is not class-conditional (`class_conditional=False`): it takes no class.")
        if isinstance(label, str) and label in names:
            return self.palette_size + names[label]
        if isinstance(label, str) or not 0 <= label < self.num_labels:
            raise ValueError(f"Unknown class {label!r}: this model's classes are {self.id2label}.")
        return self.palette_size + int(label)

    @property
    def n_px(self) -> int:
        """Side of the square image the model sees (`n_positions = n_px ** 2`)."""
        return image_side(self.n_positions)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(
        cls, name: str, n_px: int | None = None, palette_size: int | None = None, **kwargs
    ) -> "ImageGPTConfig":
        """A config for one of the named sizes in `PRESETS` at `n_px x n_px` input (default 32; the paper used 32, 48,
        64) with a palette of `palette_size` colors (default 512).

        Any other field can be given as a keyword, e.g. `ImageGPTConfig.from_preset("small", 48, objective="bert")`.
        `n_positions` and `vocab_size` may replace `n_px` and `palette_size` (keywords that disagree are refused).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        classes = len(kwargs.get("id2label") or {}) or kwargs.get("num_labels", 2) if kwargs.get("class_conditional") else 0
        derived = {"n_positions": n_px and n_px * n_px, "vocab_size": palette_size and palette_size + 1 + classes}
        fields = {**PRESETS[name], "n_positions": 32 * 32, "vocab_size": 512 + 1}
        fields |= {key: value for key, value in derived.items() if value} | kwargs
        return cls(**fields, n_px=n_px, palette_size=palette_size)


# `save_pretrained` copies this file next to config.json and names it in `auto_map` (remote code).
ImageGPTConfig.register_for_auto_class()

__all__ = ["EXTENDED_MODEL_TYPE", "ImageGPTConfig", "PRESETS", "PAPER_RESOLUTIONS"]
