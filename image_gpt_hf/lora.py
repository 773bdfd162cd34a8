"""LoRA on Image GPT with peft: which modules to adapt, and a `LoraConfig` that says so.

peft has no default target modules for "imagegpt" (`get_peft_model(model, LoraConfig())` asks for them). The decoder
is GPT-2's: every projection is a transformers `Conv1D`, which stores its weight as (in, out), so LoRA needs
`fan_in_fan_out=True`. The four projections of each block are named by their path, because a bare `c_proj` matches
both the attention output and the MLP output. A head that the base checkpoint does not carry (the classifier's
`score`, new for a downstream task) trains in full and is saved with the adapter (`modules_to_save`); the LM head of
the causal and masked models comes pretrained and stays frozen.

With rank `r`, LoRA on all four projections trains `16 * r / (12 * n_embd)` of each block; at `r=8` a classifier
trains 2.0% of iGPT-S, 1.0% of iGPT-M and 0.69% of iGPT-L.

```python
>>> from peft import LoraConfig, get_peft_model
>>> from image_gpt_hf import LORA_TARGET_MODULES

>>> config = LoraConfig(
...     r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES, fan_in_fan_out=True, modules_to_save=["score"]
... )
>>> model = get_peft_model(classifier, config)  # or: get_peft_model(classifier, lora_config(classifier))
```

peft is optional: it is imported only when `lora_config` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .modeling_imagegpt import ImageGPTForImageClassification, ImageGPTPreTrainedModel

if TYPE_CHECKING:
    from peft import LoraConfig

# The four Conv1D projections of every block: attention in (q, k, v) and out, MLP in and out.
LORA_TARGET_MODULES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
# Heads that a downstream task adds, by model class: trained in full and saved with the adapter.
LORA_MODULES_TO_SAVE = {ImageGPTForImageClassification: ["score"]}


def lora_config(
    model: ImageGPTPreTrainedModel,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> LoraConfig:
    """peft's `LoraConfig` for `model`: `target_modules` (default `LORA_TARGET_MODULES`) with `fan_in_fan_out=True`,
    and the head of `model`'s class in `modules_to_save` (`score` for `ImageGPTForImageClassification`). A target that
    names no projection of `model` (as peft matches names: the whole name or its end) is refused, the valid ones named."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    projections = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    if unmatched := [t for t in target_modules or () if not any(n == t or n.endswith(f".{t}") for n in projections)]:
        raise ValueError(
            f"LoRA target modules {unmatched} name no projection of this model; the projections of every block are "
            f"{LORA_TARGET_MODULES} (or their last part: c_attn, c_fc, c_proj for both attn.c_proj and mlp.c_proj)."
        )
    modules_to_save = next((m for cls, m in LORA_MODULES_TO_SAVE.items() if isinstance(model, cls)), None)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGET_MODULES if target_modules is None else target_modules),
        fan_in_fan_out=True,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
