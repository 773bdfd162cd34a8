"""ImageGPTImageProcessor: ids identical to transformers' processor, decoding, crops, (de)serialization, clear errors.

Images are real photos that ship inside scikit-image (no download); palettes are random or made of the photos' own
colors, never OpenAI's.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import data as skdata
from transformers import AutoImageProcessor
from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

from image_gpt_hf import ImageGPTImageProcessor
from image_gpt_hf.image_processing_imagegpt import color_quantize

N_PX = 32


# ----------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled photos: RGB ones, a gray one (camera) and an RGBA one (logo)."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "logo")
    return {name: getattr(skdata, name)() for name in names}


@pytest.fixture(scope="module")
def rgb_photos(photos) -> list[np.ndarray]:
    return [photos[name] for name in ("astronaut", "coffee", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def small_images(rgb_photos) -> list[np.ndarray]:
    """24 real n_px x n_px uint8 RGB images: random square crops of the photos, downsampled with PIL."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(24):
        photo = rgb_photos[i % len(rgb_photos)]
        side = int(rng.integers(N_PX, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = PIL.Image.fromarray(photo[top : top + side, left : left + side])
        images.append(np.array(crop.resize((N_PX, N_PX), PIL.Image.Resampling.BILINEAR)))
    return images


@pytest.fixture(scope="module")
def random_palette() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, size=(512, 3))


@pytest.fixture(scope="module")
def photo_palette(small_images) -> np.ndarray:
    """512 distinct colors of the images themselves, normalized as the processor does (x / 127.5 - 1 in float32).

    Centers sit on the pixels and next to each other (neighbouring 8-bit colors), so exact and rounding-level ties
    are common: the hardest case for matching transformers' nearest-center search.
    """
    colors = np.unique(np.concatenate([image.reshape(-1, 3) for image in small_images]), axis=0)
    chosen = colors[np.random.default_rng(1).choice(len(colors), 512, replace=False)]
    levels = ((np.arange(256) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    return levels[chosen].astype(np.float64)


def ours_for(palette, **kwargs) -> ImageGPTImageProcessor:
    return ImageGPTImageProcessor(clusters=palette, size={"height": N_PX, "width": N_PX}, **kwargs)


def reference_for(palette, **kwargs) -> ImageGPTImageProcessorPil:
    """transformers' own processor, configured as from a preprocessor_config.json (palette as a list of lists)."""
    return ImageGPTImageProcessorPil(clusters=palette.tolist(), size={"height": N_PX, "width": N_PX}, **kwargs)


def ids(processor, images, **kwargs) -> np.ndarray:
    return np.asarray(processor(images, return_tensors="np", **kwargs)["input_ids"])


# ------------------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("palette_name", ["random_palette", "photo_palette"])
def test_ids_identical_to_transformers_at_n_px(request, small_images, palette_name):
    palette = request.getfixturevalue(palette_name)
    images = [PIL.Image.fromarray(image) for image in small_images]
    ours = ids(ours_for(palette), images)
    reference = ids(reference_for(palette), images)
    assert ours.shape == (len(images), N_PX * N_PX) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, reference)


def test_every_input_format_gives_the_same_ids(small_images, random_palette):
    processor = ours_for(random_palette)
    expected = ids(processor, [PIL.Image.fromarray(image) for image in small_images])
    stacked = np.stack(small_images)  # (B, H, W, 3)
    formats = {
        "list of HWC arrays": small_images,
        "list of CHW arrays": [image.transpose(2, 0, 1) for image in small_images],
        "4-D HWC array": stacked,
        "4-D CHW tensor": torch.from_numpy(stacked).permute(0, 3, 1, 2),
        "list of CHW tensors": [torch.from_numpy(image).permute(2, 0, 1) for image in small_images],
        "float64 array in [0, 255]": stacked.astype(np.float64),
        "float32 tensor in [0, 255]": torch.from_numpy(stacked).float(),
        "nested lists": [small_images[:10], small_images[10:]],
        "datasets Column": datasets.Dataset.from_dict({"image": list(stacked)}).cast_column("image", Image())["image"],
    }
    for name, images in formats.items():
        np.testing.assert_array_equal(ids(processor, images), expected, err_msg=name)
    # Floats in [0, 1] with do_rescale=False are the same images.
    np.testing.assert_array_equal(ids(processor, stacked / 255.0, do_rescale=False), expected)
    # One image (not a batch) gives a batch of one.
    np.testing.assert_array_equal(ids(processor, small_images[3]), expected[3:4])


@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BILINEAR, PIL.Image.Resampling.BICUBIC])
def test_ids_match_transformers_when_resizing(rgb_photos, random_palette, resample):
    # Whole photos and off-size crops of them (up- and down-sampling, odd aspect ratios).
    images = list(rgb_photos) + [photo[7:44, 3:94] for photo in rgb_photos] + [photo[:17, :13] for photo in rgb_photos]
    images = [PIL.Image.fromarray(np.ascontiguousarray(image)) for image in images]
    ours = ids(ours_for(random_palette, resample=resample), images)
    reference = ids(reference_for(random_palette, resample=resample), images)
    fraction = float((ours == reference).mean())
    assert fraction >= 0.99, f"only {fraction:.4%} of the ids agree with transformers"
    # Same PIL resize, same arithmetic: in fact every id agrees.
    assert fraction == 1.0, f"{fraction:.4%} of the ids agree with transformers"


def test_gray_and_rgba_images_match_transformers_converting_to_rgb(photos, random_palette):
    reference = reference_for(random_palette, do_convert_rgb=True)
    for image in (PIL.Image.fromarray(photos["camera"]), PIL.Image.fromarray(photos["logo"])):  # modes L and RGBA
        np.testing.assert_array_equal(ids(ours_for(random_palette), image), ids(reference, image))
    # Arrays: gray is replicated, alpha composited onto white (rounded), as transformers' `convert_to_rgb` does.
    gray = photos["camera"]
    np.testing.assert_array_equal(ids(ours_for(random_palette), gray), ids(reference, np.stack([gray] * 3, -1)))
    rgba = photos["logo"]
    alpha = rgba[..., 3:] / 255.0
    on_white = np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    np.testing.assert_array_equal(ids(ours_for(random_palette), rgba), ids(reference, on_white))


def test_pixel_values_identical_to_transformers(small_images, rgb_photos, random_palette):
    images = [PIL.Image.fromarray(image) for image in small_images[:4]] + [PIL.Image.fromarray(rgb_photos[1])]
    ours = ours_for(random_palette)(images, do_color_quantize=False, return_tensors="np")["pixel_values"]
    reference = reference_for(random_palette)(images, do_color_quantize=False, return_tensors="np")["pixel_values"]
    assert ours.shape == (5, 3, N_PX, N_PX) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference)
    last = ours_for(random_palette)(images, do_color_quantize=False, data_format="channels_last")["pixel_values"]
    np.testing.assert_array_equal(np.stack(last), ours.transpose(0, 2, 3, 1))


def test_return_tensors(small_images, random_palette):
    processor = ours_for(random_palette)
    as_list = processor(small_images[:3])["input_ids"]
    assert isinstance(as_list, list) and len(as_list) == 3 and as_list[0].shape == (N_PX * N_PX,)
    as_torch = processor(small_images[:3], return_tensors="pt")["input_ids"]
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.long and as_torch.shape == (3, N_PX * N_PX)
    np.testing.assert_array_equal(as_torch.numpy(), np.stack(as_list))
    # Different sizes stay a list without return_tensors.
    mixed = processor([small_images[0], small_images[1][:20, :10]], do_resize=False)["input_ids"]
    assert [len(row) for row in mixed] == [N_PX * N_PX, 200]


# ------------------------------------------------------------------------------------------- nearest palette color


def test_color_quantize_is_chunk_independent_and_nearest(random_palette):
    pixels = torch.from_numpy(np.random.default_rng(2).uniform(-1.2, 1.2, size=(3000, 3)).astype(np.float32))
    expected = np.linalg.norm(pixels.double().numpy()[:, None] - random_palette[None], axis=-1).argmin(axis=1)
    for chunk_size in (7, 1000, None):
        np.testing.assert_array_equal(color_quantize(pixels, random_palette, chunk_size).numpy(), expected)
    np.testing.assert_array_equal(color_quantize(pixels[:200], random_palette, 1).numpy(), expected[:200])


@pytest.mark.parametrize("kind", ["uniform", "clustered", "duplicated", "8-bit colors", "gray ramp"])
def test_pruned_search_is_exact(kind):
    rng = np.random.default_rng(4)
    levels = ((np.arange(256) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    palette = {
        "uniform": lambda: rng.uniform(-1, 1, (512, 3)),
        "clustered": lambda: np.clip(rng.normal(0, 0.25, (512, 3)), -1, 1),
        "duplicated": lambda: np.repeat(rng.uniform(-1, 1, (128, 3)), 4, axis=0),
        "8-bit colors": lambda: levels[rng.integers(0, 256, (512, 3))].astype(np.float64),
        "gray ramp": lambda: np.repeat(np.linspace(-1, 1, 100)[:, None], 3, axis=1),
    }[kind]()
    # 8-bit pixel values, values off the 8-bit grid, the corners of the cube, and a few outside it.
    pixels = np.concatenate(
        [
            levels[rng.integers(0, 256, (6000, 3))],
            rng.uniform(-1, 1, (1000, 3)).astype(np.float32),
            np.array([[1, 1, 1], [-1, -1, -1], [1, -1, 0.5]], dtype=np.float32),
            rng.uniform(-1.3, 1.3, (200, 3)).astype(np.float32),
        ]
    )
    squared = (pixels**2).sum(axis=1)[:, None] - 2 * pixels @ palette.T + (palette**2).sum(axis=1)[None]
    reference = squared.argmin(axis=1)  # transformers' formula and precisions, in numpy
    x = torch.from_numpy(pixels)
    np.testing.assert_array_equal(color_quantize(x, palette, prune=True).numpy(), reference)
    np.testing.assert_array_equal(color_quantize(x, palette, prune=False).numpy(), reference)
    np.testing.assert_array_equal(color_quantize(x[:100], palette, chunk_size=3, prune=True).numpy(), reference[:100])


def test_ties_go_the_way_transformers_breaks_them():
    levels = ((np.arange(256) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    rng = np.random.default_rng(0)
    # 60 pixel colors, each exactly halfway between two centers in real arithmetic (p +- delta * u, u a random
    # direction), so float rounding alone picks the winner: about a third of them go the other way unless the
    # arithmetic is transformers' own.
    colors = rng.integers(20, 236, size=(60, 3))
    pixels = levels[colors].astype(np.float64)
    offsets = rng.normal(size=(60, 3))
    offsets *= rng.uniform(0.01, 0.05, size=(60, 1)) / np.linalg.norm(offsets, axis=1, keepdims=True)
    centers = np.concatenate([pixels + offsets, pixels - offsets, pixels[:4] + offsets[:4]])  # and exact duplicates
    image = colors.reshape(5, 12, 3).astype(np.uint8)
    ours = ids(ImageGPTImageProcessor(clusters=centers, do_resize=False), image)
    reference = ids(ImageGPTImageProcessorPil(clusters=centers.tolist(), do_resize=False), image)
    np.testing.assert_array_equal(ours, reference)
    duplicated = np.array([[0.25, -0.5, 0.125]] * 3 + [[0.9, 0.9, 0.9]])
    pixel = torch.tensor([[0.25, -0.5, 0.125]])
    assert color_quantize(pixel, duplicated).item() == 0  # an exact tie goes to the lowest id, as in numpy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_color_quantize_on_gpu_matches_cpu(small_images, photo_palette):
    stacked = torch.from_numpy(np.stack(small_images))
    processor = ours_for(photo_palette)
    on_gpu = processor(stacked.cuda(), return_tensors="pt")["input_ids"]
    assert on_gpu.device.type == "cuda"
    np.testing.assert_array_equal(on_gpu.cpu().numpy(), ids(processor, stacked))


# ------------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("palette_name", ["random_palette", "photo_palette"])
def test_decode_then_encode_gives_the_same_ids(request, small_images, palette_name):
    processor = ours_for(request.getfixturevalue(palette_name))
    tokens = ids(processor, small_images)
    decoded = processor.decode(tokens)
    assert isinstance(decoded, list) and decoded[0].size == (N_PX, N_PX) and decoded[0].mode == "RGB"
    np.testing.assert_array_equal(ids(processor, decoded), tokens)
    as_array = processor.decode(torch.from_numpy(tokens), output_type="np")
    assert as_array.shape == (len(tokens), N_PX, N_PX, 3) and as_array.dtype == np.uint8
    np.testing.assert_array_equal(ids(processor, as_array), tokens)
    # Every palette color, as a 16 x 32 image.
    every_id = np.arange(512)
    image = processor.decode(every_id, size=(16, 32), output_type="np")
    np.testing.assert_array_equal(ids(processor, image, do_resize=False)[0], every_id)


def test_decode_colors_are_the_palette_in_8_bits(random_palette):
    processor = ours_for(random_palette)
    colors = processor.decode(np.arange(512), size=(1, 512), output_type="np")[0].astype(int)
    rounded = np.rint(127.5 * (random_palette + 1))
    assert np.abs(colors - rounded).max() <= 1  # at most one level away, where needed to round-trip
    single = processor.decode(np.zeros(N_PX * N_PX, dtype=np.int64))
    assert isinstance(single, PIL.Image.Image)
    assert single.getpixel((0, 0)) == tuple(colors[0])
    batch = processor.batch_decode([[1] * 64, [2] * 64], output_type="np")
    assert batch.shape == (2, 8, 8, 3)  # not the processor's size: the square of side sqrt(64)


def test_decode_picks_a_color_that_re_encodes_where_rounding_would_not():
    # In 8-bit units: A = (100.45, 100, 100) rounds to (100, 100, 100), which is nearer to B = (99.6, 100, 100).
    levels = np.array([[100.45, 100, 100], [99.6, 100, 100], [10, 200, 30], [250, 5, 128]])
    processor = ImageGPTImageProcessor(clusters=levels / 127.5 - 1, size={"height": 2, "width": 2})
    colors = processor.decode(np.arange(4), output_type="np").reshape(4, 3)
    assert colors[0].tolist() == [101, 100, 100] and colors[1].tolist() == [100, 100, 100]
    image = colors.reshape(2, 2, 3)
    np.testing.assert_array_equal(ids(processor, image, input_data_format="channels_last")[0], np.arange(4))


# ---------------------------------------------------------------------------------------------------------- crops


def test_center_crop_keeps_the_aspect_ratio(photos, random_palette):
    coffee = photos["coffee"]  # 400 x 600
    processor = ImageGPTImageProcessor(
        clusters=random_palette,
        size={"shortest_edge": N_PX},
        do_center_crop=True,
        crop_size={"height": N_PX, "width": N_PX},
    )
    by_hand = np.asarray(PIL.Image.fromarray(coffee).resize((48, N_PX), PIL.Image.Resampling.BILINEAR))[:, 8:40]
    np.testing.assert_array_equal(ids(processor, coffee), ids(ours_for(random_palette), by_hand))
    assert processor.decode(ids(processor, coffee)[0]).size == (N_PX, N_PX)


def test_random_crop_is_seeded_and_covers_the_configured_region(photos, random_palette):
    processor = ours_for(random_palette, do_random_crop=True, random_crop_scale=(0.2, 0.6))
    images = [photos["astronaut"], photos["chelsea"]]
    torch.manual_seed(3)
    first = ids(processor, images)
    torch.manual_seed(3)
    np.testing.assert_array_equal(ids(processor, images), first)
    assert first.shape == (2, N_PX * N_PX)
    assert (ids(processor, images) != first).any()  # the RNG moved on: other crops
    # A crop of the whole area at the image's own aspect ratio is no crop at all.
    whole = ours_for(random_palette, do_random_crop=True, random_crop_scale=(1.0, 1.0), random_crop_ratio=(1.0, 1.0))
    np.testing.assert_array_equal(ids(whole, photos["astronaut"]), ids(ours_for(random_palette), photos["astronaut"]))


# ---------------------------------------------------------------------------------------------- save and load


def test_save_and_load_through_auto_image_processor(tmp_path, small_images, random_palette):
    processor = ours_for(random_palette, do_random_crop=False, random_crop_scale=(0.5, 1.0))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_imagegpt.ImageGPTImageProcessor"}
    assert (tmp_path / "image_processing_imagegpt.py").is_file()
    assert saved["clusters"] == random_palette.tolist() and saved["size"] == {"height": N_PX, "width": N_PX}
    assert saved["image_processor_type"] == "ImageGPTImageProcessor" and saved["resample"] == 2
    assert not any(key.startswith("_") for key in saved)

    for backend in (None, "pil", "torchvision"):
        kwargs = {} if backend is None else {"backend": backend}
        loaded = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
        assert isinstance(loaded, ImageGPTImageProcessor), backend
        assert loaded.to_dict() == processor.to_dict()
        np.testing.assert_array_equal(ids(loaded, small_images), ids(processor, small_images))


def test_transformers_loads_our_folder_and_gives_the_same_ids(tmp_path, small_images, random_palette):
    ours_for(random_palette).save_pretrained(tmp_path)
    reference = ImageGPTImageProcessorPil.from_pretrained(tmp_path)
    np.testing.assert_array_equal(ids(reference, small_images), ids(ours_for(random_palette), small_images))


@pytest.mark.parametrize("size", [{"height": N_PX, "width": N_PX}, N_PX])
@pytest.mark.parametrize("with_type", [True, False])
def test_openai_preprocessor_config_loads_unchanged(tmp_path, small_images, random_palette, size, with_type):
    # Written like openai/imagegpt-small's preprocessor_config.json (older ones have the int form of `size`).
    config = {
        "clusters": random_palette.tolist(),
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ImageGPTFeatureExtractor",
        "resample": 2,
        "size": size,
    }
    if with_type:
        config["image_processor_type"] = "ImageGPTImageProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    expected = ids(ImageGPTImageProcessorPil.from_pretrained(tmp_path), small_images)
    for loaded in (AutoImageProcessor.from_pretrained(tmp_path), ImageGPTImageProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, ImageGPTImageProcessor)
        assert (loaded.size.height, loaded.size.width) == (N_PX, N_PX)
        np.testing.assert_array_equal(ids(loaded, small_images), expected)


@pytest.mark.slow
def test_remote_code_loads_without_the_package(tmp_path, small_images, random_palette):
    ours_for(random_palette).save_pretrained(tmp_path / "processor")
    np.save(tmp_path / "images.npy", np.stack(small_images[:4]))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["image_gpt_hf"] = None  # importing the package is impossible in this process
        try:
            import image_gpt_hf
        except ImportError:
            pass
        else:
            raise SystemExit("image_gpt_hf was importable")
        import numpy as np
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "processor")!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert type(processor).__name__ == "ImageGPTImageProcessor"
        images = np.load({str(tmp_path / "images.npy")!r})
        np.save(sys.argv[1], processor(images, return_tensors="np")["input_ids"])
        """
    )
    out = tmp_path / "ids.npy"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out), ids(ours_for(random_palette), small_images[:4]))


# ------------------------------------------------------------------------------------------------ bad input


def bad_input_cases(palette):
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    processor = ImageGPTImageProcessor(clusters=palette, size=8)
    return {
        "empty batch": (lambda: processor([]), "empty batch"),
        "empty 4-D batch": (lambda: processor(np.zeros((0, 8, 8, 3), np.uint8)), "empty batch"),
        "palette shape": (lambda: ImageGPTImageProcessor(clusters=np.zeros((16, 4))), r"shape \(num_colors, 3\)"),
        "empty palette": (lambda: ImageGPTImageProcessor(clusters=np.zeros((0, 3))), r"num_colors >= 1"),
        "ragged palette": (lambda: ImageGPTImageProcessor(clusters=[[0, 0, 0], [0, 0]]), "could not read"),
        "palette range": (lambda: ImageGPTImageProcessor(clusters=np.full((4, 3), 1.5)), r"in \[-1, 1\]"),
        "palette nan": (lambda: ImageGPTImageProcessor(clusters=[[0, 0, 0], [np.nan, 0, 0]]), "non-finite"),
        "palette at call": (lambda: processor(good, clusters=np.full((4, 3), -2.0)), r"in \[-1, 1\]"),
        "no palette": (lambda: ImageGPTImageProcessor(size=8)(good), "needs a palette"),
        "mixed layouts": (
            lambda: processor([np.zeros((3, 9, 9)), np.zeros((9, 9, 3)), np.zeros((3, 5, 3))]),
            "mixes channel layouts",
        ),
        "ambiguous layout": (lambda: processor(np.zeros((3, 5, 4), np.uint8)), "input_data_format"),
        "no channel axis": (lambda: processor(np.zeros((5, 7, 9), np.uint8)), "Cannot infer the channel axis"),
        "nan pixels": (lambda: processor(np.full((8, 8, 3), np.nan)), "non-finite"),
        "inf pixels": (lambda: processor(torch.full((3, 8, 8), float("inf"))), "non-finite"),
        "integer range": (lambda: processor(np.full((8, 8, 3), 300, np.int32)), r"\[0, 255\]"),
        "float range": (lambda: processor(np.full((8, 8, 3), -4.0)), "must lie in"),
        "complex dtype": (lambda: processor(np.zeros((8, 8, 3), np.complex64)), "dtype"),
        "unsupported type": (lambda: processor({"image": good}), "Unsupported image type"),
        "5-D array": (lambda: processor(np.zeros((1, 1, 8, 8, 3), np.uint8)), "dimensions"),
        "empty image": (lambda: processor(np.zeros((0, 8, 3), np.uint8)), "empty image"),
        "no rgb conversion": (lambda: processor(np.zeros((8, 8), np.uint8), do_convert_rgb=False), "do_convert_rgb"),
        "sizes differ": (
            lambda: processor([good, np.zeros((9, 9, 3), np.uint8)], do_resize=False, return_tensors="np"),
            "different sizes",
        ),
        "crop too large": (
            lambda: processor(good, do_center_crop=True, crop_size={"height": 9, "width": 9}),
            "crop_size",
        ),
        "bad crop scale": (lambda: processor(good, do_random_crop=True, random_crop_scale=(0.5, 2.0)), "random_crop"),
        "padding": (lambda: processor(good, do_pad=True, pad_size={"height": 9, "width": 9}), "do_pad"),
        "decode id too large": (lambda: processor.decode([0] * 63 + [len(palette)]), "palette ids"),
        "decode negative id": (lambda: processor.decode([-1] * 64), "palette ids"),
        "decode float ids": (lambda: processor.decode(np.zeros(64)), "integer"),
        "decode size": (lambda: processor.decode([0] * 63, size=(8, 8)), "does not hold"),
        "decode not square": (lambda: ImageGPTImageProcessor(clusters=palette, size=8).decode([0] * 60), "size"),
    }


@pytest.mark.parametrize("case", list(bad_input_cases(np.zeros((4, 3)))))
def test_bad_input_raises_a_clear_value_error(random_palette, case):
    call, message = bad_input_cases(random_palette)[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_sos_token_is_named_when_decoding(random_palette):
    with pytest.raises(ValueError, match=re.escape("SOS token (id 512)")):
        ours_for(random_palette).decode(np.full(N_PX * N_PX, 512))


# ------------------------------------------------------------------------------------------- property-based

DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.int64, np.bool_, np.float16, np.float32, np.float64]
PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "I;16", "I", "F", "RGBX", "PA"]


@st.composite
def any_image(draw):
    """An image of random size, channels, layout, dtype and values; or a PIL image of a random mode."""
    height, width = draw(st.integers(0, 24)), draw(st.integers(1, 24))
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    dtype = draw(st.sampled_from(DTYPES))
    shape = (height, width) if channels is None else (height, width, channels)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        scale = draw(st.sampled_from([1.0, 255.0, 300.0]))
        values = rng.uniform(0, scale, size=shape)
        if draw(st.booleans()) and values.size:
            values.flat[0] = draw(st.sampled_from([np.nan, np.inf, -1.0]))
        array = values.astype(dtype)
    elif dtype is np.bool_:
        array = rng.integers(0, 2, size=shape).astype(bool)
    else:
        high = draw(st.sampled_from([256, int(np.iinfo(dtype).max)]))
        array = rng.integers(0, high, size=shape, endpoint=False).astype(dtype)
    container = draw(st.sampled_from(["numpy", "numpy channels first", "torch", "pil"]))
    if container == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        base = PIL.Image.fromarray(rng.integers(0, 256, size=(max(height, 1), width, 3), dtype=np.uint8))
        return base.convert(mode) if mode not in ("I;16",) else base.convert("L").convert("I;16")
    if channels is not None and container != "numpy":
        array = np.moveaxis(array, -1, 0)
    if container == "torch" and dtype not in (np.uint16,):
        return torch.from_numpy(np.ascontiguousarray(array))
    return array


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=st.lists(any_image(), min_size=1, max_size=3), do_resize=st.booleans())
def test_any_input_gives_ids_or_a_value_error(images, do_resize):
    palette = np.random.default_rng(0).uniform(-1, 1, size=(16, 3))
    processor = ImageGPTImageProcessor(clusters=palette, size=8, do_resize=do_resize)
    try:
        out = processor(images)["input_ids"]
    except ValueError as err:
        assert str(err)  # a message that says what is wrong
        return
    assert len(out) == len(images)
    for row in out:
        assert row.dtype == np.int64 and row.ndim == 1
        assert ((0 <= row) & (row < len(palette))).all()
        if do_resize:
            assert row.shape == (64,)
    # Decoding what came out and encoding it again is stable.
    if do_resize:
        tokens = np.stack(out)
        np.testing.assert_array_equal(ids(processor, processor.decode(tokens)), tokens)
