"""image_gpt_hf: OpenAI's Image GPT as Hugging Face transformers models.

Importing this package registers its config, models and image processor with the transformers Auto classes for
the model types "imagegpt" (what transformers' built-in ImageGPT computes too) and "image_gpt_hf" (checkpoints only
this package computes: BERT objective, `prepend_sos`, classifier or feature layers, joint loss). transformers ships a
built-in model of the first name; this registration replaces it, so after `import image_gpt_hf`,
`AutoModel.from_pretrained("openai/imagegpt-small")` builds this package's classes.
"""

from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_IMAGE_MODELING_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)
from transformers.utils import logging

from .checkpoint import load_config_and_processor
from .configuration_imagegpt import EXTENDED_MODEL_TYPE, PAPER_RESOLUTIONS, PRESETS, ImageGPTConfig
from .data import ImageGPTDataCollator, load_digits, random_resized_crop
from .image_processing_imagegpt import ImageGPTImageProcessor, ImageGPTImageProcessorPil
from .lora import LORA_MODULES_TO_SAVE, LORA_TARGET_MODULES, lora_config
from .modeling_imagegpt import (
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageClassifierOutput,
    ImageGPTModel,
    ImageGPTModelOutput,
    ImageGPTPreTrainedModel,
    random_bert_mask,
)

__version__ = "0.1.0"

AutoConfig.register("imagegpt", ImageGPTConfig, exist_ok=True)
# The same class reads and writes both model types (`ImageGPTConfig.to_dict` picks one by the config's fields), so it
# is entered under the second name directly: `AutoConfig.register` insists on the class's own `model_type`.
CONFIG_MAPPING.register(EXTENDED_MODEL_TYPE, ImageGPTConfig, exist_ok=True)
AutoModel.register(ImageGPTConfig, ImageGPTModel, exist_ok=True)
AutoModelForCausalLM.register(ImageGPTConfig, ImageGPTForCausalImageModeling, exist_ok=True)
MODEL_FOR_CAUSAL_IMAGE_MODELING_MAPPING.register(ImageGPTConfig, ImageGPTForCausalImageModeling, exist_ok=True)
AutoModelForMaskedImageModeling.register(ImageGPTConfig, ImageGPTForMaskedImageModeling, exist_ok=True)
AutoModelForImageClassification.register(ImageGPTConfig, ImageGPTForImageClassification, exist_ok=True)
# This package's processor for both backends, whichever one transformers picks (see ImageGPTImageProcessorPil).
# Registering reads transformers' built-in entry first, whose torchvision class warns when torchvision is absent;
# that warning is about a class this registration replaces, so it is silenced here.
_verbosity = logging.get_verbosity()
logging.set_verbosity_error()
try:
    AutoImageProcessor.register(
        ImageGPTConfig,
        image_processor_classes={"pil": ImageGPTImageProcessorPil, "torchvision": ImageGPTImageProcessor},
        exist_ok=True,
    )
finally:
    logging.set_verbosity(_verbosity)

__all__ = [
    "EXTENDED_MODEL_TYPE",
    "LORA_MODULES_TO_SAVE",
    "LORA_TARGET_MODULES",
    "PAPER_RESOLUTIONS",
    "PRESETS",
    "ImageGPTConfig",
    "ImageGPTDataCollator",
    "ImageGPTForCausalImageModeling",
    "ImageGPTForImageClassification",
    "ImageGPTForMaskedImageModeling",
    "ImageGPTImageClassifierOutput",
    "ImageGPTImageProcessor",
    "ImageGPTModel",
    "ImageGPTModelOutput",
    "ImageGPTPreTrainedModel",
    "load_config_and_processor",
    "load_digits",
    "lora_config",
    "random_bert_mask",
    "random_resized_crop",
]
