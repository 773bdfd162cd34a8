"""Data for training Image GPT: the data collator (images or processor output in, model batches out), a seeded random
crop for training transforms, and scikit-learn's bundled handwritten digits as a `datasets.DatasetDict`.

    from transformers import Trainer
    from image_gpt_hf import ImageGPTDataCollator

    collator = ImageGPTDataCollator(processor, objective="bert")  # input_ids, bool_masked_pos, labels
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[collator]).train()

transformers' own collators do not fit Image GPT: it has no tokenizer, and its BERT objective zeroes the embeddings of
masked pixels (`bool_masked_pos`) instead of substituting a mask token.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import TrainerCallback

from .image_processing_imagegpt import ImageGPTImageProcessor
from .modeling_imagegpt import random_bert_mask
from .palette import load_sklearn_digits

__all__ = ["DIGITS_TEST_SIZE", "ImageGPTDataCollator", "load_digits", "random_resized_crop"]

DIGITS_TEST_SIZE = 360  # load_digits: a fixed, stratified 1,437 / 360 train / test split


@dataclass
class ImageGPTDataCollator(TrainerCallback):
    """Examples -> a batch of `input_ids` (+ `labels`, + `bool_masked_pos`), for the `data_collator=` of transformers'
    `Trainer` or the `collate_fn=` of a `torch.utils.data.DataLoader`.

    An example is a dict with `input_ids` (one row of the image processor's output: what `dataset.with_transform`
    returns) or with an image under `image_column` (PIL image, array or path; `image_processor` turns it into ids), or
    an image itself. Other keys are ignored, except the class labels under `label_column`.

    Args:
        image_processor: encodes the examples that hold images (their palette defines the ids). Needed only then.
        objective: what the batch trains. "ar": `labels` are the `input_ids` (the causal model shifts them itself).
            "bert": also `bool_masked_pos`, OpenAI's masking (each pixel masked independently with probability
            `mask_probability`); the loss covers the masked pixels. None: `input_ids` only (evaluation, features).
        mask_probability: the BERT masking probability (the paper's 0.15); only with `objective="bert"`.
        label_column: a key of the examples holding integer class ids; they become `labels` (for a classifier, whose
            generative loss reads the `input_ids` and, for BERT models, `bool_masked_pos`).
        seed: seeds the masks. Each example's mask is drawn from (seed, epoch, the example's ids), so it is the same
            whatever the batch, the process, the DataLoader worker or the resumed run that draws it.
        epoch: the epoch the masks are drawn for. A training loop sets it each epoch; under transformers' `Trainer`,
            pass the collator as a callback too (`callbacks=[collator]`): it then follows Trainer's epoch (with
            `dataloader_persistent_workers=False`, the default, so that workers see it).
        image_column: the key of the examples' images.
        return_tensors: "pt" (torch tensors) or "np" (numpy arrays).

    Every example of a batch must have the same raster (one `n_px`): Image GPT has no padding token, and a raster of
    another size would put pixels on positions learned for other rows, so a batch of mixed sizes is refused rather
    than padded.
    """

    image_processor: ImageGPTImageProcessor | None = None
    objective: str | None = "ar"
    mask_probability: float | None = None
    label_column: str | None = None
    seed: int = 0
    epoch: int = 0
    image_column: str = "image"
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.objective not in ("ar", "bert", None):
            raise ValueError(f"`objective` must be 'ar', 'bert' or None, got {self.objective!r}.")
        if self.objective != "bert" and self.mask_probability is not None:  # it would mask nothing
            raise ValueError(f"`mask_probability` masks pixels for objective='bert', not {self.objective!r}.")
        if self.objective == "bert" and self.mask_probability is None:
            self.mask_probability = 0.15

    def on_epoch_begin(self, args, state, control, **kwargs):
        """transformers' `Trainer` callback: the masks follow its epoch (also after a resume in mid-epoch)."""
        self.epoch = math.floor(state.epoch + 1e-6)

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        input_ids = self._input_ids(examples)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids}
        if self.objective == "bert":
            batch["bool_masked_pos"] = self.masks(input_ids)
        if self.label_column is not None:
            batch["labels"] = torch.as_tensor([self._class_id(example) for example in examples])
        elif self.objective is not None:
            if isinstance(examples[0], Mapping) and np.ndim(examples[0].get("labels", ())) == 0:  # class labels
                raise ValueError("The examples' `labels` would become the pixel ids: pass `label_column='labels'`.")
            batch["labels"] = input_ids.clone()
        return {key: value.numpy() for key, value in batch.items()} if self.return_tensors == "np" else batch

    def masks(self, input_ids: torch.Tensor, epoch: int | None = None) -> torch.BoolTensor:
        """The BERT masks of a batch of ids `(B, L)`: row b drawn from (seed, epoch, input_ids[b]) alone.

        `epoch` (default: `self.epoch`) also numbers the views of an evaluation that averages several masks.
        """
        epoch = self.epoch if epoch is None else epoch
        masks = []
        for row in torch.as_tensor(input_ids).detach().cpu().to(torch.int64):
            key = hashlib.blake2b(np.int64([self.seed, epoch]).tobytes() + row.numpy().tobytes(), digest_size=8)
            generator = torch.Generator().manual_seed(int.from_bytes(key.digest(), "little") >> 1)
            masks.append(random_bert_mask(row.shape, self.mask_probability, generator=generator))
        return torch.stack(masks)

    def _class_id(self, example: Mapping) -> int:
        value = np.asarray(example[self.label_column])
        if value.ndim != 0 or value.dtype.kind not in "iuf" or value != np.round(value):
            hint = "map names to ids (datasets' `class_encode_column`); int() would truncate fractions"
            raise ValueError(f"Class labels must be integer class ids, got {example[self.label_column]!r}: {hint}.")
        return int(value)

    def _input_ids(self, examples: Sequence[Any]) -> torch.Tensor:
        if all(isinstance(example, Mapping) and "input_ids" in example for example in examples):
            rows = [np.asarray(example["input_ids"]) for example in examples]
        else:
            if self.image_processor is None:
                raise ValueError("These examples hold images, not `input_ids`: pass the model's `image_processor`.")
            missing = next((e for e in examples if isinstance(e, Mapping) and self.image_column not in e), None)
            if missing is not None:
                trainer = "under Trainer, set `remove_unused_columns=False`, or it drops the image column"
                raise ValueError(f"No `input_ids` nor {self.image_column!r} in {sorted(missing)}: {trainer}.")
            images = [e[self.image_column] if isinstance(e, Mapping) else e for e in examples]
            rows = [np.asarray(row) for row in self.image_processor(images, return_tensors=None)["input_ids"]]
        shapes = sorted({row.shape for row in rows})
        if len(shapes) > 1:
            raise ValueError(f"The examples' ids have shapes {shapes}: resize the images to one n_px x n_px.")
        ids = np.stack(rows).reshape(len(rows), -1)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"`input_ids` must be integer palette ids, got {ids.dtype}.")
        return torch.from_numpy(ids.astype(np.int64))


def random_resized_crop(
    image: PIL.Image.Image, scale: tuple[float, float], generator: torch.Generator, ratio=(3 / 4, 4 / 3)
) -> PIL.Image.Image:
    """A random crop of `image` drawn from `generator`: torchvision's RandomResizedCrop box, without torchvision.

    An area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`, ten tries at a box that fits; then
    the largest central crop within `ratio`. The crop is returned at its own size: resize it with the image processor
    (its `size`). With a generator seeded per batch (say, by the seed, the epoch and the examples' indices), a training
    transform draws the same crops in every run and after a resume:

        generator = torch.Generator().manual_seed(seed)
        crops = [random_resized_crop(image, (0.5, 1.0), generator) for image in images]
        input_ids = processor(crops, return_tensors="pt")["input_ids"]
    """
    width, height = image.size
    for _ in range(10):
        area = height * width * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).item())
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return image.crop((left, top, left + w, top + h))
    h, w = height, width
    if width / height < ratio[0]:
        h = min(height, max(1, int(round(width / ratio[0]))))
    elif width / height > ratio[1]:
        w = min(width, max(1, int(round(height * ratio[1]))))
    top, left = (height - h) // 2, (width - w) // 2
    return image.crop((left, top, left + w, top + h))


def load_digits():
    """scikit-learn's 1,797 handwritten digits as an image-classification `datasets.DatasetDict`.

    8x8 gray PIL `image`s (the scans' 0..16 counts scaled to 0..255), a `ClassLabel` `label` with names "0".."9", and a
    fixed, stratified split: 1,437 "train" and 360 "test" images. The data ship inside scikit-learn, so nothing is
    downloaded. Needs the `datasets` and `scikit-learn` packages (`pip install "image_gpt_hf[examples]"`).
    """
    import datasets
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_sklearn_digits(), sklearn_digits().target
    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(indices: np.ndarray):
        columns = {"image": [images[i] for i in indices], "label": [int(labels[i]) for i in indices]}
        return datasets.Dataset.from_dict(columns, features=features)

    return datasets.DatasetDict({"train": split(train), "test": split(test)})
