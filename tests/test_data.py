"""image_gpt_hf.data: the public data collator, the seeded random crop and the bundled digits, also under transformers'
Trainer."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from image_gpt_hf import ImageGPTConfig, ImageGPTDataCollator, ImageGPTImageProcessor, load_digits
from image_gpt_hf.data import random_resized_crop

PALETTE = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def processor():
    return ImageGPTImageProcessor(clusters=PALETTE, size={"height": 4, "width": 4})


def test_digits_are_a_fixed_stratified_split(digits):
    assert (len(digits["train"]), len(digits["test"])) == (1437, 360)
    assert digits["train"].features["label"].names == [str(d) for d in range(10)]
    image = digits["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    counts = np.bincount(digits["test"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    again = load_digits()
    assert list(again["test"]["label"]) == list(digits["test"]["label"])
    assert np.array_equal(np.asarray(again["test"][5]["image"]), np.asarray(digits["test"][5]["image"]))


def test_images_and_processor_output_give_the_same_batch(digits, processor):
    examples = [digits["train"][i] for i in range(6)]
    expected = processor([e["image"] for e in examples], return_tensors="pt")["input_ids"]
    from_images = ImageGPTDataCollator(processor)(examples)
    assert torch.equal(from_images["input_ids"], expected) and from_images["input_ids"].dtype == torch.long
    assert torch.equal(from_images["labels"], expected)  # AR: the pixels are the targets
    rows = [{"input_ids": row.tolist(), "label": e["label"]} for row, e in zip(expected, examples)]
    from_ids = ImageGPTDataCollator()(rows)
    assert from_ids.keys() == {"input_ids", "labels"} and torch.equal(from_ids["input_ids"], expected)
    bare = ImageGPTDataCollator(processor, objective=None)([e["image"] for e in examples])
    assert bare.keys() == {"input_ids"} and torch.equal(bare["input_ids"], expected)
    classes = ImageGPTDataCollator(objective=None, label_column="label")(rows)
    assert classes["labels"].tolist() == [e["label"] for e in examples]
    numpy = ImageGPTDataCollator(objective="bert", return_tensors="np")(rows)
    assert isinstance(numpy["input_ids"], np.ndarray) and numpy["bool_masked_pos"].dtype == np.bool_


def test_bert_masks_are_seeded_per_example(digits, processor):
    rows = [{"input_ids": ids} for ids in processor(digits["train"][:64]["image"], return_tensors="pt")["input_ids"]]
    collator = ImageGPTDataCollator(objective="bert", seed=3)
    rng_before = torch.get_rng_state()
    batch = collator(rows)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG (dropout) is untouched
    masks = batch["bool_masked_pos"]
    assert masks.shape == (64, 16) and 0.08 < masks.float().mean() < 0.25
    assert torch.equal(batch["labels"], batch["input_ids"])
    # The same mask for an example whatever the batch it is in, its position there or the worker drawing it.
    reordered = collator(rows[::-1][:10])["bool_masked_pos"]
    assert torch.equal(reordered, masks.flip(0)[:10])
    assert not torch.equal(ImageGPTDataCollator(objective="bert", seed=4)(rows)["bool_masked_pos"], masks)
    collator.epoch = 1  # new masks every epoch
    assert not torch.equal(collator(rows)["bool_masked_pos"], masks)
    assert torch.equal(collator.masks(batch["input_ids"], epoch=0), masks)
    heavy = ImageGPTDataCollator(objective="bert", mask_probability=0.5)(rows)["bool_masked_pos"]
    assert 0.4 < heavy.float().mean() < 0.6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "mlm"}, "`objective` must be 'ar', 'bert' or None"),
        ({"mask_probability": 0.3}, "masks pixels for objective='bert', not 'ar'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageGPTDataCollator(**kwargs)


def test_bad_batches_are_refused(digits, processor):
    with pytest.raises(ValueError, match="pass the model.s `image_processor`"):
        ImageGPTDataCollator()([digits["train"][0]])
    with pytest.raises(ValueError, match=r"have shapes \[\(9,\), \(16,\)\]: resize the images to one n_px"):
        ImageGPTDataCollator()([{"input_ids": [0] * 16}, {"input_ids": [0] * 9}])
    # A 2x8 and an 8x2 grid of ids hold 16 each, but they are not the same raster.
    with pytest.raises(ValueError, match=r"shapes \[\(2, 8\), \(8, 2\)\]"):
        ImageGPTDataCollator()([{"input_ids": np.zeros((2, 8), int)}, {"input_ids": np.zeros((8, 2), int)}])
    # transformers' Trainer drops the image column by default: the message names the setting.
    with pytest.raises(
        ValueError,
        match=r"No `input_ids` nor 'image' in \['label'\]: under Trainer, set `remove_unused_columns=False`",
    ):
        ImageGPTDataCollator(processor)([{"label": 3}])


def test_class_labels_are_integer_ids_and_never_replaced_by_pixels():
    rows = [{"input_ids": [1] * 16, "labels": 3}, {"input_ids": [2] * 16, "labels": 1}]
    with pytest.raises(ValueError, match="`labels` would become the pixel ids: pass `label_column='labels'`"):
        ImageGPTDataCollator()(rows)
    assert ImageGPTDataCollator(label_column="labels")(rows)["labels"].tolist() == [3, 1]
    for bad in ("cat", 1.7):  # a string, and a fraction that int() would truncate to 1
        with pytest.raises(ValueError, match=f"integer class ids, got {bad!r}"):
            ImageGPTDataCollator(label_column="label")([{"input_ids": [0] * 16, "label": bad}])
    assert ImageGPTDataCollator(label_column="label")([{"input_ids": [0] * 16, "label": 2.0}])["labels"].tolist() == [
        2
    ]


def test_bert_masks_follow_the_epoch_under_trainer(tmp_path):
    """Trainer never sets the collator's epoch; given the collator as a callback, each epoch draws new masks."""
    from transformers import Trainer, TrainingArguments

    from image_gpt_hf import ImageGPTForMaskedImageModeling

    config = ImageGPTConfig.from_preset("tiny", n_px=4, palette_size=16, n_layer=1, n_embd=16, n_head=2)
    config.objective, config.prepend_sos = "bert", False
    model, masks = ImageGPTForMaskedImageModeling(config), []
    model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["bool_masked_pos"].cpu()), with_kwargs=True)
    rows = [{"input_ids": torch.randint(0, 16, (16,)).tolist()}]  # one image, so each epoch's batch is the same
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=1, num_train_epochs=3, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0)  # fmt: skip
    collator = ImageGPTDataCollator(objective="bert", mask_probability=0.5)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[collator]).train()
    assert len(masks) == 3 and collator.epoch == 2
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_trainer_trains_with_the_collator_and_saves_a_loadable_model(objective, digits, processor, tmp_path):
    """transformers' Trainer with `data_collator=ImageGPTDataCollator`: the loss falls on the digits, and the saved
    folder loads with the Auto classes."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForMaskedImageModeling,
        Trainer,
        TrainingArguments,
    )

    from image_gpt_hf import ImageGPTForCausalImageModeling, ImageGPTForMaskedImageModeling

    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset("tiny", n_px=4, palette_size=16, n_layer=2, n_embd=32, n_head=2)
    config.objective, config.prepend_sos = objective, objective == "ar"
    model_class = ImageGPTForCausalImageModeling if objective == "ar" else ImageGPTForMaskedImageModeling
    model = model_class(config)
    train = digits["train"].select(range(512)).with_transform(lambda batch: processor(batch["image"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        max_steps=40,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,  # the transform reads the image column
        seed=0,
    )
    collator = ImageGPTDataCollator(objective=objective, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[collator])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    trainer.save_model(str(tmp_path / "model"))
    processor.save_pretrained(tmp_path / "model")
    auto = AutoModelForCausalLM if objective == "ar" else AutoModelForMaskedImageModeling
    loaded = auto.from_pretrained(tmp_path / "model")
    assert isinstance(loaded, model_class) and loaded.config.objective == objective
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu()), key
    assert np.array_equal(AutoImageProcessor.from_pretrained(tmp_path / "model").clusters, processor.clusters)


def coordinates(width: int, height: int) -> PIL.Image.Image:
    """An image whose pixel at (x, y) holds y * width + x: a crop's top-left pixel tells where it was cut."""
    return PIL.Image.fromarray(np.arange(width * height, dtype=np.int32).reshape(height, width))


def test_random_resized_crop_draws_torchvisions_box_from_the_generator():
    image, scale, ratio = coordinates(40, 30), (0.5, 1.0), (3 / 4, 4 / 3)
    first = random_resized_crop(image, scale, torch.Generator().manual_seed(0))
    # The draws are fixed for a seed (a resumed run cuts the same crops): this one is 32x28 at (6, 2).
    assert first.size == (32, 28) and first.getpixel((0, 0)) == 2 * 40 + 6
    again = random_resized_crop(image, scale, torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(again), np.asarray(first))
    generator = torch.Generator().manual_seed(1)
    boxes = []
    for _ in range(200):
        crop = random_resized_crop(image, scale, generator)
        (w, h), corner = crop.size, crop.getpixel((0, 0))
        top, left = divmod(corner, 40)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        # The box is the rounded one of an area fraction in `scale` and an aspect ratio in `ratio`.
        assert scale[0] - 0.1 <= w * h / (40 * 30) <= scale[1] + 1e-9, (w, h)
        assert math.log(ratio[0]) - 0.1 <= math.log(w / h) <= math.log(ratio[1]) + 0.1, (w, h)
        boxes.append((left, top, w, h))
    assert len(set(boxes)) > 50  # a fresh box per draw, not one crop repeated


def test_random_resized_crop_falls_back_to_the_central_crop_within_the_ratio():
    # A 100x5 strip: no box of half its area or more fits an aspect ratio of 4/3 at most in ten tries.
    crop = random_resized_crop(coordinates(100, 5), (0.5, 1.0), torch.Generator().manual_seed(0))
    assert crop.size == (7, 5) and crop.getpixel((0, 0)) == (100 - 7) // 2
