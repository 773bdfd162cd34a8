"""The `image-feature-extraction` pipeline for Image GPT, with the layer as an argument.

transformers' own `ImageFeatureExtractionPipeline` already works on this package's models: per position it returns
the first model output (`last_hidden_state`, the final normed layer `n^L`), and with `pool=True` the model's
`pooler_output`, which is the paper's linear-probe feature: the normed hidden state of `config.feature_layer`
(default: the middle layer, `n_layer // 2`), averaged over positions. What it cannot do is read per-position features
from another layer (it also ignores arguments it does not know, so `layer=` would be silently dropped), and it reads
every image through transformers' `load_image`, as 8-bit RGB: a 16-bit image comes out nearly white and transparency
is dropped. This subclass adds `layer` and hands images to the image processor's own reader, which reads paths, URLs
and PIL images alike; for 8-bit RGB images it returns exactly what the built-in pipeline returns.

Ways to get it (`layer` and `pool` can be given when the pipeline is built or on each call):
- with this package installed: `pipeline("image-feature-extraction", model=..., pipeline_class=ImageGPTFeatureExtractionPipeline)`;
- without it: `pipe.save_pretrained(folder)` / `pipe.push_to_hub(repo_id)` ship this file next to the model and name it
  under `custom_pipelines` in config.json, so `pipeline(model=folder_or_repo, trust_remote_code=True)` builds it.

This file is shipped as remote code: it imports only torch, transformers and the image processor's module.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import ImageFeatureExtractionPipeline
from transformers.dynamic_module_utils import custom_object_save

from .image_processing_imagegpt import load_image_file

TASK = "image-feature-extraction"


class ImageGPTFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    r"""
    Image GPT features of images, from any layer.

    Args (at construction or per call, besides the built-in pipeline's `pool`, `return_tensors`,
    `image_processor_kwargs` and `timeout`):
        layer (`int`, *optional*):
            Hidden-state index to read: 0 is the embedding output, `n_layer` the final normed output, negative values
            count from the end. The features are the paper's `n^l`: hidden state `l` through the norm of the block that
            reads it (`ImageGPTModel.normed_features`), exactly what `ImageGPTModel.extract_features` returns.
            When not given, the output is the built-in pipeline's: the final layer per position, and with `pool=True`
            the model's `pooler_output` (layer `config.feature_layer`, by default `n_layer // 2`, where the paper
            finds the best linear-probe features).
        pool (`bool`, *optional*, defaults to `False`):
            Average the features over positions: one vector of size `n_embd` per image instead of one per pixel.
            An image whose ids are not the model's `n_positions` is pooled as given, with a warning.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> from image_gpt_hf.pipelines import ImageGPTFeatureExtractionPipeline

    >>> extractor = pipeline(
    ...     "image-feature-extraction", model=path, pipeline_class=ImageGPTFeatureExtractionPipeline, layer=-1
    ... )
    >>> features = extractor(image, pool=True, return_tensors=True)  # (1, n_embd): last layer, mean over pixels
    ```
    """

    def _sanitize_parameters(
        self,
        image_processor_kwargs: dict[str, Any] | None = None,
        return_tensors: bool | None = None,
        pool: bool | None = None,
        layer: int | None = None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            image_processor_kwargs=image_processor_kwargs, return_tensors=return_tensors, pool=pool, **kwargs
        )
        if layer is not None:
            # Fails now, with the valid range in the message, rather than after the first forward pass.
            self._decoder().resolve_layer(layer)
            forward_params["layer"] = layer
        if "pool" in postprocess_params:  # the forward pools
            forward_params["pool"] = postprocess_params["pool"]
        return preprocess_params, forward_params, postprocess_params

    def _decoder(self) -> torch.nn.Module:
        """The Image GPT decoder, also when the pipeline was given a model with a head."""
        decoder = self.model.base_model
        if not hasattr(decoder, "normed_features"):
            raise ValueError(
                f"{type(self).__name__} needs an Image GPT model (with `normed_features`), got {type(decoder).__name__}."
            )
        return decoder

    def preprocess(
        self, image: Any, timeout: float | None = None, **image_processor_kwargs
    ) -> dict[str, torch.Tensor]:
        """The image processor reads the image itself (paths, URLs, PIL images alike), so a file gives the same ids as
        the PIL image opened from it; the built-in pipeline first converts paths to 8-bit RGB, which whitens 16-bit
        images and drops transparency."""
        if not hasattr(self.image_processor, "clusters"):  # not an Image GPT processor: the built-in way
            return super().preprocess(image, timeout=timeout, **image_processor_kwargs)
        if isinstance(image, (str, os.PathLike)):
            image = load_image_file(image, timeout=timeout)
        return self.image_processor(image, return_tensors="pt", **image_processor_kwargs).to(self.dtype)

    def _forward(
        self, model_inputs: dict[str, torch.Tensor], layer: int | None = None, pool: bool | None = None
    ) -> dict[str, torch.Tensor]:
        decoder = self._decoder()
        if layer is None:
            outputs = decoder(**model_inputs, return_pooler_output=bool(pool))
            return {"features": outputs.pooler_output if pool else outputs.last_hidden_state}
        input_ids = model_inputs.pop("input_ids")
        return {"features": decoder.extract_features(input_ids, layers=[layer], pool=bool(pool), **model_inputs)[0]}

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], pool: bool | None = None, return_tensors: bool = False
    ) -> torch.Tensor | list:
        return model_outputs["features"] if return_tensors else model_outputs["features"].tolist()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Saves the model and image processor, plus this file and a `custom_pipelines` entry in config.json.

        Loading the folder (or the Hub repo it is pushed to) with `pipeline(model=..., trust_remote_code=True)` then
        builds this pipeline where `image_gpt_hf` is not installed. With the package installed, pass
        `pipeline_class=ImageGPTFeatureExtractionPipeline` instead: transformers asks for `trust_remote_code` for any
        task a config names under `custom_pipelines`.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) must be a directory, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        config = self.model.config
        previous = getattr(config, "custom_pipelines", None)
        module = type(self).__module__.rsplit(".", 1)[-1]
        config.custom_pipelines = {
            TASK: {"impl": f"{module}.{type(self).__name__}", "pt": ["AutoModel"], "type": "image"}
        }
        try:
            custom_object_save(self, save_directory)
            super().save_pretrained(save_directory, **kwargs)
        finally:
            # The entry describes the saved folder, which holds this file; the in-memory model does not carry it on
            # into other folders its own save_pretrained may write.
            if previous is None:
                del config.custom_pipelines
            else:
                config.custom_pipelines = previous


__all__ = ["ImageGPTFeatureExtractionPipeline"]
