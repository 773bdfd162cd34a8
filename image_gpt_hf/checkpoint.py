"""Reading a checkpoint's config and processor together, the way every script and the app starts."""

from __future__ import annotations

from transformers import AutoConfig

from .configuration_imagegpt import ImageGPTConfig
from .image_processing_imagegpt import ImageGPTImageProcessor, check_palette_fits


def load_config_and_processor(
    model_name_or_path: str, processor_name_or_path: str | None = None, objective: str | None = None
) -> tuple[ImageGPTConfig, ImageGPTImageProcessor]:
    """The Image GPT config of `model_name_or_path` and the processor whose palette its ids index (from
    `processor_name_or_path`, default the same checkpoint), checked to belong together (`check_palette_fits`); with
    `objective`, the model must have been trained with it. A ValueError says what is wrong and what to pass instead."""
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load a model config from {model_name_or_path!r}: {err}") from err
    if not isinstance(config, ImageGPTConfig):
        raise ValueError(
            f"{model_name_or_path!r} is a {config.model_type!r} checkpoint ({type(config).__name__}), not an Image GPT "
            "one (model_type 'imagegpt'), e.g. one written by examples/pretrain.py."
        )
    if objective is not None and config.objective != objective:
        raise ValueError(
            f"{model_name_or_path} is a {config.objective.upper()}-objective model; this needs an "
            f"{objective.upper()} one (examples/pretrain.py --objective {objective})."
        )
    source = processor_name_or_path or model_name_or_path
    try:
        processor = ImageGPTImageProcessor.from_pretrained(source)
    except OSError:
        processor = None
    if getattr(processor, "clusters", None) is None:
        raise ValueError(
            f"{source!r} has no preprocessor_config.json with a palette ('clusters'). The model's token ids index the "
            "palette it was trained with; pass the processor it was trained with as --processor_name_or_path."
        )
    check_palette_fits(processor, config, f"The processor from {source!r}")
    return config, processor
