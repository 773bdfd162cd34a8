"""Palette fitting: sources, seeded sampling, k-means quality, the k > distinct colors error, and the CLI.

Data: scikit-learn's bundled handwritten digits and scikit-image's bundled photos (no downloads).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data as skdata
from transformers import AutoImageProcessor

from image_gpt_hf import ImageGPTImageProcessor
from image_gpt_hf import palette as palette_module
from image_gpt_hf.image_processing_imagegpt import color_quantize
from image_gpt_hf.palette import (
    PALETTE_FILE,
    fit_palette,
    fit_palette_to_pixels,
    load_sklearn_digits,
    main,
    quantization_error,
    sample_pixels,
    save_palette,
)
from tests.conftest import snapshot


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_sklearn_digits()


@pytest.fixture(scope="module")
def photo_crops() -> list[PIL.Image.Image]:
    """12 real RGB images of assorted sizes: crops of scikit-image's bundled photos."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(12):
        photo = photos[i % 3]
        height, width = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        crops.append(PIL.Image.fromarray(photo[top : top + height, left : left + width]))
    return crops


def test_sklearn_digits_are_8_bit_gray_images(digits):
    assert digits.shape == (1797, 8, 8) and digits.dtype == np.uint8
    assert digits.min() == 0 and digits.max() == 255
    assert len(np.unique(digits)) == 17  # the 0..16 counts, scaled


def test_fit_palette_on_digits(digits):
    palette = fit_palette(digits, num_colors=8, n_px=8, seed=0)
    assert palette.shape == (8, 3) and palette.dtype == np.float32
    assert palette.min() >= -1 and palette.max() <= 1
    np.testing.assert_allclose(palette[:, 0], palette[:, 1], atol=1e-6)  # gray data, gray palette
    np.testing.assert_array_equal(fit_palette(digits, num_colors=8, n_px=8, seed=0), palette)  # seeded
    pixels = sample_pixels(digits, n_px=8)
    # k-means beats evenly spaced gray levels at what it minimizes (the squared error), and more colors fit better.
    even = np.repeat(np.linspace(-1, 1, 8)[:, None], 3, axis=1)
    assert squared_error(pixels, palette) < squared_error(pixels, even)
    assert quantization_error(pixels, fit_palette_to_pixels(pixels, 16)) < quantization_error(pixels, palette)


def squared_error(pixels, palette):
    palette = np.asarray(palette, dtype=np.float64)
    nearest = palette[color_quantize(torch.from_numpy(pixels), palette).numpy()]
    return float(((pixels - nearest) ** 2).sum(axis=1).mean())


def test_every_source_gives_the_same_pixels_and_palette(tmp_path, photo_crops):
    datasets = pytest.importorskip("datasets")
    arrays = [np.asarray(image) for image in photo_crops]
    for index, image in enumerate(photo_crops):  # sorted file names keep the order of the list
        folder = tmp_path / "images" / ("a" if index < 6 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:02d}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    dataset = datasets.Dataset.from_dict({"label": list(range(12)), "img": photo_crops})
    dataset = dataset.cast_column("img", datasets.Image())
    kwargs = {"n_px": 16, "max_pixels": 2000, "seed": 5}
    expected = sample_pixels(photo_crops, **kwargs)
    assert expected.shape == (2000, 3)
    for source in (tmp_path / "images", str(tmp_path / "images"), dataset, arrays):
        np.testing.assert_array_equal(sample_pixels(source, **kwargs), expected, err_msg=type(source).__name__)
    # The same pixels make the same palette: the fit is seeded too.
    palette = fit_palette(tmp_path / "images", num_colors=24, **kwargs)
    assert palette.shape == (24, 3)
    np.testing.assert_array_equal(fit_palette_to_pixels(expected, 24, seed=5), palette)
    same_size = np.stack([np.asarray(image.resize((50, 40))) for image in photo_crops])
    assert sample_pixels(same_size, **kwargs).shape == (2000, 3)  # a 4-D array of images


def test_sample_pixels_is_a_seeded_uniform_subsample(digits):
    everything = sample_pixels(digits, n_px=8, max_pixels=10**9)
    assert everything.shape == (1797 * 64, 3)
    sample = sample_pixels(digits, n_px=8, max_pixels=5000, seed=1, batch_size=100)
    assert sample.shape == (5000, 3) and sample.dtype == np.float32
    np.testing.assert_array_equal(sample_pixels(digits, n_px=8, max_pixels=5000, seed=1, batch_size=100), sample)
    assert not np.array_equal(sample_pixels(digits, n_px=8, max_pixels=5000, seed=2, batch_size=100), sample)
    assert set(map(tuple, sample)) <= set(map(tuple, everything))
    # Uniform: the share of background (black) pixels matches the data's.
    background = (everything == -1).all(axis=1).mean()
    assert abs((sample == -1).all(axis=1).mean() - background) < 0.03


def test_quantization_error_is_the_mean_distance_to_the_nearest_color():
    pixels = np.array([[0, 0, 0], [1, 1, 1], [1, 1, 1], [-1, -1, -1]], dtype=np.float32)
    assert quantization_error(pixels, np.array([[0.0, 0.0, 0.0]])) == pytest.approx(3 * np.sqrt(3) / 4)
    assert quantization_error(pixels, np.array([[0, 0, 0], [1, 1, 1], [-1, -1, -1]])) == 0.0


def test_saved_palette_loads_as_a_processor(tmp_path, digits):
    palette = fit_palette(digits, num_colors=12, n_px=8)
    save_palette(palette, tmp_path, n_px=8)
    np.testing.assert_array_equal(np.load(tmp_path / PALETTE_FILE), palette)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, ImageGPTImageProcessor)
    np.testing.assert_array_equal(processor.clusters, palette.astype(np.float64))
    tokens = processor(list(digits[:5]), return_tensors="np")["input_ids"]
    assert tokens.shape == (5, 64) and tokens.max() < 12


def test_cli_on_the_bundled_digits(tmp_path, capsys, digits):
    main(
        ["--sklearn_digits", "--num_colors", "16", "--n_px", "16", "--max_pixels", "50000"]
        + ["--output_dir", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    palette = np.load(tmp_path / PALETTE_FILE)
    assert palette.shape == (16, 3)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"height": 16, "width": 16} and len(config["clusters"]) == 16
    # The figure it prints is the palette's error on the sampled pixels, in both units.
    error = quantization_error(sample_pixels(digits, n_px=16, max_pixels=50000, seed=0), palette)
    assert f"mean quantization error: {error:.4f} in [-1, 1] RGB units = {error * 127.5:.2f} in 0-255 units" in printed
    assert str(tmp_path / PALETTE_FILE) in printed
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor(digits[0], return_tensors="np")["input_ids"].shape == (1, 256)


def test_cli_reports_more_colors_than_the_data_has(tmp_path, digits):
    with pytest.raises(SystemExit, match="Cannot fit 18 colors to 17 distinct ones"):
        main(["--sklearn_digits", "--num_colors", "18", "--n_px", "8", "--output_dir", str(tmp_path)])
    assert not (tmp_path / PALETTE_FILE).exists()
    assert fit_palette(digits, num_colors=17, n_px=8).shape == (17, 3)


@pytest.mark.slow
def test_cli_runs_as_a_module(tmp_path):
    command = [sys.executable, "-m", "image_gpt_hf.palette", "--sklearn_digits", "--num_colors", "4", "--n_px", "8"]
    result = subprocess.run([*command, "--output_dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean quantization error" in result.stdout
    assert np.load(tmp_path / PALETTE_FILE).shape == (4, 3)


# ------------------------------------------------------------------------------------- what the command may write


def save_images(folder: Path, images: list[PIL.Image.Image], suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{index:02d}{suffix}")


def test_cli_keeps_user_files(tmp_path, photo_crops, capsys):
    """Its input images, a model folder, the user's files and a planted link's target are byte-identical after every
    run, refused or not; only --overwrite replaces an output folder, and never one holding its inputs."""
    user, outside = tmp_path / "user", tmp_path / "outside"
    save_images(user / "images", photo_crops[:4])
    (user / "notes.txt").write_text("mine")
    model = user / "model"  # a model folder: the palette would no longer match its 24-color vocabulary
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "imagegpt", "vocab_size": 25}))
    (model / "preprocessor_config.json").write_text(json.dumps({"clusters": [[0.0, 0.0, 0.0]] * 24}))
    np.save(model / PALETTE_FILE, np.zeros((24, 3), np.float32))
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    out = user / "out"
    out.mkdir()
    (out / PALETTE_FILE).symlink_to(outside / "secret")  # planted where the palette goes
    base = ["--image_dir", str(user / "images"), "--num_colors", "4", "--n_px", "8", "--max_pixels", "2000"]
    before, outside_before = snapshot(user), snapshot(outside)

    for output, extra, message in [
        (user, ["--overwrite"], "contains the input"),
        (user / "images" / "palette", ["--overwrite"], "is inside the input"),
        (model, [], "not empty (it holds config.json, kmeans_centers.npy, preprocessor_config.json)"),
        (out, [], "pass --overwrite"),
        (user / "notes.txt", ["--overwrite"], "exists and is not a folder"),
    ]:
        with pytest.raises(SystemExit, match="igpt-fit-palette: ") as error:
            main([*base, "--output_dir", str(output), *extra])
        assert message in str(error.value) and str(output) in str(error.value)
    assert snapshot(user) == before and snapshot(outside) == outside_before

    main([*base, "--output_dir", str(out), "--overwrite"])
    assert not (out / PALETTE_FILE).is_symlink() and np.load(out / PALETTE_FILE).shape == (4, 3)
    assert snapshot(outside) == outside_before
    unchanged = {k: v for k, v in snapshot(user).items() if not k.startswith("out")}
    assert unchanged == {k: v for k, v in before.items() if not k.startswith("out")}
    assert sorted(os.listdir(user)) == ["images", "model", "notes.txt", "out"]  # no staging left


def test_cli_checks_every_argument_before_reading_data(tmp_path, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("pixels were sampled before the arguments were checked")

    monkeypatch.setattr(palette_module, "sample_pixels", no_sampling)
    (tmp_path / "a_file").write_text("x")
    base = ["--sklearn_digits", "--n_px", "8", "--output_dir"]
    for argv, message in [
        ([*base, str(tmp_path / "a_file")], "exists and is not a folder"),
        ([*base, str(tmp_path / "a_file" / "out")], "is not a folder"),
        ([*base, str(tmp_path / "out"), "--pixel_budget", "10"], "`pixel_budget` must be at least n_px * n_px = 64"),
    ]:
        with pytest.raises(SystemExit) as error:
            main(argv)
        assert message in str(error.value)
    with pytest.raises(SystemExit, match="no_such_dataset"):
        main(["--dataset_name", str(tmp_path / "no_such_dataset"), "--output_dir", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_cli_names_a_bad_image_file(tmp_path, monkeypatch, photo_crops):
    save_images(tmp_path / "images", [photo_crops[0].resize((120, 100))])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 5000)  # 12,000 pixels is more than twice the limit
    with pytest.raises(SystemExit) as error:
        main(["--image_dir", str(tmp_path / "images"), "--num_colors", "4", "--output_dir", str(tmp_path / "out")])
    message = str(error.value)
    assert str(tmp_path / "images" / "00.png") in message and "decompression bomb" in message
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    data = (tmp_path / "images" / "00.png").read_bytes()
    (tmp_path / "images" / "00.png").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(SystemExit, match=r"Cannot read the image file .*00\.png"):
        main(["--image_dir", str(tmp_path / "images"), "--num_colors", "4", "--output_dir", str(tmp_path / "out")])


def test_large_images_are_scaled_down_as_they_are_read(tmp_path, monkeypatch):
    """However large the photos, no more than `pixel_budget` pixels per image and `batch_size` images at a time reach
    the processor; the sample hardly changes, and does not depend on the batch size."""
    photos = [PIL.Image.fromarray(skdata.astronaut()), PIL.Image.fromarray(skdata.coffee())]  # 262k, 240k pixels
    save_images(tmp_path / "png", photos * 3)
    save_images(tmp_path / "jpeg", photos * 3, suffix=".jpg")  # decoded at a reduced scale (draft)
    seen = []
    real_call = ImageGPTImageProcessor.__call__

    def spy(self, images, *args, **kwargs):
        seen.append([image.width * image.height for image in images])
        return real_call(self, images, *args, **kwargs)

    monkeypatch.setattr(ImageGPTImageProcessor, "__call__", spy)
    for folder in ("png", "jpeg"):
        seen.clear()
        small = sample_pixels(tmp_path / folder, n_px=32, max_pixels=4000, batch_size=4, pixel_budget=20_000)
        assert [len(batch) for batch in seen] == [4, 2]
        assert max(max(batch) for batch in seen) <= 20_000
        full = sample_pixels(tmp_path / folder, n_px=32, max_pixels=4000, batch_size=4, pixel_budget=None)
        assert max(max(batch) for batch in seen[2:]) > 200_000  # without a budget, the photos arrive whole
        np.testing.assert_allclose(small.mean(axis=0), full.mean(axis=0), atol=0.02)  # the same colors, averaged
        one_by_one = sample_pixels(tmp_path / folder, n_px=32, max_pixels=4000, batch_size=1, pixel_budget=20_000)
        np.testing.assert_array_equal(one_by_one, small)
    # Images of a list or a data set are scaled down too; the caller's images are never modified, only copied.
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"img": photos}).cast_column("img", datasets.Image())
    for source in (photos, dataset):
        seen.clear()
        sample_pixels(source, n_px=32, batch_size=4, pixel_budget=20_000)
        assert [len(batch) for batch in seen] == [2] and max(seen[0]) <= 20_000
    assert photos[0].size == (512, 512)
