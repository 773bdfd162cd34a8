"""ImageGPTImageProcessor: ids identical to transformers' processor, one reader for every kind of input (a file gives
the same ids as a path and as a PIL image), decoding, crops, saving and loading without prompts, clear errors.

Images are real photos that ship inside scikit-image, scikit-learn's handwritten digits, or files the tests write;
palettes are random or made of the photos' own colors, never OpenAI's. The nearest-color search itself is tested in
test_palette_search.py.
"""

import base64
import builtins
import http.server
import json
import socket
import sys
import threading
import time

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from conftest import builtin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import data as skdata
from transformers import AutoImageProcessor, pipeline
from transformers.dynamic_module_utils import get_imports
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from image_gpt_hf import ImageGPTConfig, ImageGPTImageProcessor, ImageGPTModel, image_processing_imagegpt
from image_gpt_hf.image_processing_imagegpt import ImageGPTImageProcessorPil as OursPil
from image_gpt_hf.image_processing_imagegpt import load_image_file
from image_gpt_hf.palette import load_sklearn_digits

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
    return ImageGPTImageProcessor(clusters=palette, size=kwargs.pop("size", {"height": N_PX, "width": N_PX}), **kwargs)


def reference_class():
    """transformers' own processor class (the test skips where the release no longer has it)."""
    return builtin("image_processing_pil_imagegpt").ImageGPTImageProcessorPil


def reference_for(palette, **kwargs):
    """transformers' own processor, configured as from a preprocessor_config.json (palette as a list of lists)."""
    return reference_class()(
        clusters=palette.tolist(), size=kwargs.pop("size", {"height": N_PX, "width": N_PX}), **kwargs
    )


def ids(processor, images, **kwargs) -> np.ndarray:
    return np.asarray(processor(images, return_tensors="np", **kwargs)["input_ids"])


# ------------------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("palette_name", ["random_palette", "photo_palette"])
def test_ids_identical_to_transformers_at_n_px(request, small_images, palette_name):
    palette = request.getfixturevalue(palette_name)
    images = [PIL.Image.fromarray(image) for image in small_images]
    ours = ids(ours_for(palette), images)
    assert ours.shape == (len(images), N_PX * N_PX) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ids(reference_for(palette), images))


@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BILINEAR, PIL.Image.Resampling.BICUBIC])
def test_ids_identical_to_transformers_when_resizing(rgb_photos, photo_palette, resample):
    # Whole photos and off-size crops of them (up- and down-sampling, odd aspect ratios).
    images = list(rgb_photos) + [photo[7:44, 3:94] for photo in rgb_photos] + [photo[:17, :13] for photo in rgb_photos]
    images = [PIL.Image.fromarray(np.ascontiguousarray(image)) for image in images]
    expected = ids(reference_for(photo_palette, resample=resample), images)
    np.testing.assert_array_equal(ids(ours_for(photo_palette, resample=resample), images), expected)


def test_digit_images_match_transformers_on_their_rgb_conversion():
    # Gray and RGBA pictures of every kind are compared below (property-based); here scikit-learn's 8x8 digits (17
    # gray levels) against a gray palette, where ties are everywhere; as they are and upsampled to n_px.
    digits = list(load_sklearn_digits()[:64])
    gray_palette = np.repeat(np.linspace(-1, 1, 16)[:, None], 3, axis=1)
    as_rgb = [np.stack([digit] * 3, -1) for digit in digits]
    for size in (8, N_PX):
        ours, reference = ours_for(gray_palette, size=size), reference_for(gray_palette, size=size)
        np.testing.assert_array_equal(ids(ours, digits), ids(reference, as_rgb))


def test_pixel_values_identical_to_transformers(small_images, rgb_photos, random_palette):
    images = [PIL.Image.fromarray(image) for image in small_images[:4]] + [PIL.Image.fromarray(rgb_photos[1])]
    ours = ours_for(random_palette)(images, do_color_quantize=False, return_tensors="np")["pixel_values"]
    reference = reference_for(random_palette)(images, do_color_quantize=False, return_tensors="np")["pixel_values"]
    assert ours.shape == (5, 3, N_PX, N_PX) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference)
    last = ours_for(random_palette)(images, do_color_quantize=False, data_format="channels_last")["pixel_values"]
    np.testing.assert_array_equal(np.stack(last), ours.transpose(0, 2, 3, 1))


def test_every_input_format_gives_the_same_ids(small_images, random_palette):
    processor = ours_for(random_palette)
    expected = ids(processor, [PIL.Image.fromarray(image) for image in small_images])
    stacked = np.stack(small_images)  # (B, H, W, 3)
    formats = {
        "list of HWC arrays": small_images,
        "4-D HWC array": stacked,
        "4-D CHW tensor": torch.from_numpy(stacked).permute(0, 3, 1, 2),
        "list of CHW tensors": [torch.from_numpy(image).permute(2, 0, 1) for image in small_images],
        "nested lists": [small_images[:10], small_images[10:]],
        "datasets Column": datasets.Dataset.from_dict({"image": list(stacked)}).cast_column("image", datasets.Image())[
            "image"
        ],
    }
    for name, images in formats.items():
        np.testing.assert_array_equal(ids(processor, images), expected, err_msg=name)
    # One image (not a batch) gives a batch of one.
    np.testing.assert_array_equal(ids(processor, small_images[3]), expected[3:4])


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_a_gpu_are_quantized_there_with_the_same_ids(small_images, photo_palette):
    stacked = torch.from_numpy(np.stack(small_images))
    processor = ours_for(photo_palette)
    on_gpu = processor(stacked.cuda(), return_tensors="pt")["input_ids"]
    assert on_gpu.device.type == "cuda"
    np.testing.assert_array_equal(on_gpu.cpu().numpy(), ids(processor, stacked))
    on_cpu_device = processor(stacked, return_tensors="pt", device="cuda")["input_ids"]
    assert on_cpu_device.device.type == "cuda"
    np.testing.assert_array_equal(on_cpu_device.cpu().numpy(), ids(processor, stacked))


# ------------------------------------------------------------------------------ one reader: files, URLs, PIL images


def gray_levels_palette() -> np.ndarray:
    """Black (id 0), middle gray (id 1) and white (id 2)."""
    return np.array([[-1.0] * 3, [0.0] * 3, [1.0] * 3])


def same_ids_as_path_and_as_pil_image(path, processor) -> np.ndarray:
    from_path = ids(processor, str(path))
    with PIL.Image.open(path) as opened:
        np.testing.assert_array_equal(ids(processor, opened), from_path)
    np.testing.assert_array_equal(ids(processor, path), from_path)  # a pathlib.Path too
    return from_path[0]


def test_a_16_bit_png_gives_the_same_ids_as_a_path_and_as_a_pil_image(tmp_path):
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)  # black, middle gray, white
    PIL.Image.fromarray(levels).save(tmp_path / "gray16.png")
    assert PIL.Image.open(tmp_path / "gray16.png").mode == "I;16"
    processor = ImageGPTImageProcessor(clusters=gray_levels_palette(), do_resize=False)
    tokens = same_ids_as_path_and_as_pil_image(tmp_path / "gray16.png", processor)
    np.testing.assert_array_equal(tokens.reshape(4, 3), [[0, 1, 2]] * 4)  # full 16-bit range, not clipped to white


def test_palette_transparency_is_composited_onto_white_for_paths_and_pil_images(tmp_path):
    image = PIL.Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 128, 128, 128] + [0] * 762)
    image.putdata([0, 1, 0, 1, 0, 0, 1, 1])  # index 0 is transparent: white on screen
    image.save(tmp_path / "transparent.png", transparency=0)
    processor = ImageGPTImageProcessor(clusters=gray_levels_palette(), do_resize=False)
    tokens = same_ids_as_path_and_as_pil_image(tmp_path / "transparent.png", processor)
    np.testing.assert_array_equal(tokens, [2, 1, 2, 1, 2, 2, 1, 1])


def test_exif_orientation_turns_paths_and_pil_images_upright(tmp_path, photos, random_palette):
    photo = np.ascontiguousarray(photos["astronaut"][::8, ::4])  # 64 x 128: a rotation changes the shape
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 6  # stored rotated: displayed after a quarter turn
    PIL.Image.fromarray(photo).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    processor = ours_for(random_palette, do_resize=False)
    tokens = same_ids_as_path_and_as_pil_image(tmp_path / "rotated.jpg", processor)
    with PIL.Image.open(tmp_path / "rotated.jpg") as opened:
        upright = PIL.ImageOps.exif_transpose(opened)
    assert upright.size == (64, 128)  # (width, height): turned
    np.testing.assert_array_equal(tokens, ids(processor, np.asarray(upright))[0])


def test_data_urls_and_file_errors(tmp_path, small_images, random_palette):
    processor = ours_for(random_palette)
    PIL.Image.fromarray(small_images[0]).save(tmp_path / "image.png")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "image.png").read_bytes()).decode()
    np.testing.assert_array_equal(ids(processor, url), ids(processor, small_images[0]))
    np.testing.assert_array_equal(
        ids(processor, [str(tmp_path / "image.png"), url]), ids(processor, small_images[:1] * 2)
    )
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor([small_images[0], str(tmp_path / "missing.png")])


@pytest.fixture
def silent_server():
    """The URL of a server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/image.png"
    stop.set()
    thread.join()
    for connection in [*held, server]:
        connection.close()


def test_a_url_whose_server_never_answers_times_out_with_the_call_timeout_or_the_default(
    silent_server, random_palette, monkeypatch
):
    processor = ours_for(random_palette)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not send its image within 0\.5 s; pass a larger `timeout`"):
        processor(silent_server, timeout=0.5)
    assert time.monotonic() - start < 5
    # Without `timeout`, the default bounds the wait (shortened here from its 10 s).
    monkeypatch.setattr(image_processing_imagegpt, "URL_TIMEOUT", 0.3)
    with pytest.raises(TimeoutError, match=r"within 0\.3 s"):
        processor([np.zeros((8, 8, 3), np.uint8), silent_server])


class Trickle(http.server.BaseHTTPRequestHandler):
    """Sends a PNG's headers, then one byte every 0.3 s: each read is quick, the whole never comes."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100):  # bounded: the test is over long before
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args):
        pass


def test_a_url_that_trickles_bytes_times_out_at_the_deadline_and_a_closed_port_is_named(random_palette):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, outcome = f"http://127.0.0.1:{server.server_address[1]}/image.png", []
    start = time.monotonic()
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(TimeoutError, load_image_file, url, 1.0)))
    reader.daemon = True
    reader.start()
    reader.join(10)  # each read takes 0.3 s of its 1 s timeout: without a deadline this never ends
    server.shutdown()
    assert outcome and "did not send its image within 1.0 s" in str(outcome[0].value)
    assert time.monotonic() - start < 3
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{free.getsockname()[1]}/image.png"
    with pytest.raises(OSError, match=f"Could not read the image at '{closed}'.*refused"):
        ours_for(random_palette)(closed)


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
    # Without rescaling, inputs are floats in [0, 1]: the decoded colors are the same 8-bit colors.
    unscaled = ours_for(random_palette, do_rescale=False)
    np.testing.assert_array_equal(unscaled.decode(np.arange(512), size=(1, 512), output_type="np")[0], colors)


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


# ---------------------------------------------------------------------------------------------- save and load


def test_save_and_load_through_auto_image_processor(tmp_path, small_images, random_palette):
    processor = ours_for(random_palette)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_imagegpt.ImageGPTImageProcessor"}
    # The processor's code travels with it, and imports only what every transformers user has.
    sources = sorted(path.name for path in tmp_path.glob("*.py"))
    assert sources == ["image_processing_imagegpt.py", "palette_search.py", "transformers_compat.py"]
    for source in sources:
        imports = set(get_imports(tmp_path / source)) - set(sys.stdlib_module_names)
        assert imports <= {"numpy", "PIL", "torch", "transformers"}, (source, imports)
    assert saved["clusters"] == random_palette.tolist() and saved["size"] == {"height": N_PX, "width": N_PX}
    assert saved["image_processor_type"] == "ImageGPTImageProcessor" and saved["resample"] == 2
    assert not any(key.startswith("_") or "random_crop" in key for key in saved)

    for backend, cls in (("pil", OursPil), ("torchvision", ImageGPTImageProcessor)):
        loaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        assert type(loaded) is cls, backend
        assert loaded.to_dict() == processor.to_dict()  # the same file, whichever class reads it
        np.testing.assert_array_equal(ids(loaded, small_images), ids(processor, small_images))


def test_a_saved_random_crop_loads_when_off_and_is_refused_with_where_it_went_when_on(tmp_path, small_images):
    # Folders saved when the processor made random crops (training augmentation now lives in the training scripts).
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3))
    ours_for(palette).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    crops = {"random_crop_scale": [0.5, 1.0], "random_crop_ratio": [0.75, 1.3333]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "do_random_crop": False, **crops}))
    for loaded in (ImageGPTImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert not any("random_crop" in key for key in loaded.to_dict())
        np.testing.assert_array_equal(ids(loaded, small_images[:3]), ids(ours_for(palette), small_images[:3]))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "do_random_crop": True, **crops}))
    message = 'random crops, which belong in the training script now: set "do_random_crop": false'
    with pytest.raises(ValueError, match=message):
        ImageGPTImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoImageProcessor.from_pretrained(tmp_path)


def test_folders_load_both_ways_with_transformers_and_give_the_same_ids(tmp_path, small_images, random_palette):
    ours_for(random_palette).save_pretrained(tmp_path / "ours")
    reference = reference_class().from_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(ids(reference, small_images), ids(ours_for(random_palette), small_images))
    reference_for(random_palette, size={"height": 16, "width": 16}).save_pretrained(tmp_path / "theirs")
    loaded = ImageGPTImageProcessor.from_pretrained(tmp_path / "theirs")
    assert (loaded.size.height, loaded.size.width) == (16, 16)
    np.testing.assert_array_equal(
        ids(loaded, small_images), ids(reference_class().from_pretrained(tmp_path / "theirs"), small_images)
    )


def test_loading_a_saved_checkpoint_never_asks_to_run_its_code(tmp_path, monkeypatch):
    # transformers asks on stdin (15 s, then gives up) before it runs a folder's code it was not told to trust.
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": prompts.append(prompt) or "n")
    config = ImageGPTConfig.from_preset("tiny", n_px=8, palette_size=16)
    ImageGPTModel(config).save_pretrained(tmp_path)
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3))
    ImageGPTImageProcessor(clusters=palette, size={"height": 8, "width": 8}).save_pretrained(tmp_path)
    # `pipeline()` looks for a video processor for every image task; there is none, and nothing to run to find out.
    with pytest.raises(ValueError):
        AutoVideoProcessor.from_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))  # the README's snippet
    assert isinstance(extractor.image_processor, ImageGPTImageProcessor)
    assert prompts == []


# ------------------------------------------------------------------------------------------------ bad input


def bad_input_cases(palette):
    """Each a result that would otherwise be silently wrong (or an error that would not say what to do)."""
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    processor = ImageGPTImageProcessor(clusters=palette, size=8)
    return {
        "palette shape": (lambda: ImageGPTImageProcessor(clusters=np.zeros((16, 4))), r"got shape \(16, 4\)"),
        "empty palette": (lambda: ImageGPTImageProcessor(clusters=np.zeros((0, 3))), r"got shape \(0, 3\)"),
        "palette range": (
            lambda: ImageGPTImageProcessor(clusters=np.full((4, 3), 1.5)),
            r"in \[-1, 1\].*\[1.5, 1.5\]",
        ),
        "palette nan": (lambda: ImageGPTImageProcessor(clusters=[[0, 0, 0], [np.nan, 0, 0]]), r"\[nan, nan\]"),
        "palette complex": (lambda: ImageGPTImageProcessor(clusters=np.full((4, 3), 0.5j)), "complex128 values"),
        "palette at call": (lambda: processor(good, clusters=np.full((4, 3), -2.0)), r"must be .* in \[-1, 1\]"),
        "no palette": (lambda: ImageGPTImageProcessor(size=8)(good), "Color quantization needs a palette"),
        "ambiguous layout": (
            lambda: processor([np.zeros((9, 9, 3)), np.zeros((3, 5, 4), np.uint8)]),
            r"channel axis of an image of shape \(3, 5, 4\): pass `input_data_format=",
        ),
        "unsupported type": (lambda: processor({"image": good}), "Unsupported image dict"),
        "no rgb conversion": (
            lambda: processor(np.zeros((8, 8), np.uint8), do_convert_rgb=False),
            r"1 channel\(s\).*with `do_convert_rgb=True`",
        ),
        "no rgb conversion, PIL": (
            lambda: processor(PIL.Image.new("LA", (8, 8)), do_convert_rgb=False),
            r"2 channel\(s\)",
        ),
        "sizes differ": (
            lambda: processor([good, np.zeros((9, 9, 3), np.uint8)], do_resize=False, return_tensors="np"),
            "different sizes",
        ),
        # 2x8 and 8x2 hold 16 pixels each: stacked, their ids would pass for one raster.
        "shapes differ": (
            lambda: processor(
                [np.zeros((2, 8, 3), np.uint8), np.zeros((8, 2, 3), np.uint8)], do_resize=False, return_tensors="pt"
            ),  # fmt: skip
            r"different sizes \[\(2, 8\), \(8, 2\)\]",
        ),
        # Resized, an empty image or a size of 0 would pass for an image.
        "empty image": (lambda: processor([good, np.zeros((0, 8, 3), np.uint8)]), r"empty image \(no pixels\)"),
        "empty PIL image": (lambda: processor(PIL.Image.new("RGB", (0, 5))), r"empty image \(no pixels\)"),
        "size 0": (lambda: processor(good, size={"height": 0, "width": 8}), "height and width must be > 0"),
        "crop too large": (
            lambda: processor(good, do_center_crop=True, crop_size={"height": 9, "width": 9}),
            r"`crop_size` \(9x9\) is larger than the resized image \(8x8\)",
        ),
        # Parameters are checked at construction and at each call, before any image is read.
        "std zero": (lambda: ImageGPTImageProcessor(image_std=[0, 0, 0]), r"`image_std` finite and nonzero"),
        "rescale factor at call": (lambda: processor(good, rescale_factor=-1 / 255), "`rescale_factor` must be"),
        "padding": (lambda: processor(good, do_pad=True, pad_size={"height": 9, "width": 9}), "`do_pad=True`"),
        "decode id too large": (lambda: processor.decode([0] * 63 + [len(palette)]), "must be palette ids"),
        "decode negative id": (lambda: processor.decode([-1] * 64), r"must be palette ids in \[0, 512\), got \[-1\]"),
        "decode float ids": (lambda: processor.decode(np.zeros(64)), "must be integer palette ids"),
        "decode grid": (lambda: processor.decode(np.zeros((1, 8, 8), int)), r"\(\[batch,\] length\)"),
        "decode size": (lambda: processor.decode([0] * 63, size=(8, 8)), "sequences of 63 ids: pass a `size`"),
        "decode size, negative": (lambda: processor.decode([0] * 64, size=(-8, -8)), r"got \(-8, -8\)"),
        "decode not square": (lambda: processor.decode([0] * 60), "image size of sequences of 60 ids"),
        "decode SOS": (lambda: processor.decode(np.full(64, len(palette))), rf"SOS token \(id {len(palette)}\)"),
    }


@pytest.mark.parametrize("case", list(bad_input_cases(np.zeros((4, 3)))))
def test_bad_input_raises_a_clear_value_error(random_palette, case):
    call, message = bad_input_cases(random_palette)[case]
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------- property-based

PALETTE_16 = np.random.default_rng(7).uniform(-1, 1, size=(16, 3))


@st.composite
def pictures(draw):
    """(one image in some representation, the call's options, the 8-bit RGB picture it shows on screen)."""
    height, width = draw(st.integers(5, 12)), draw(st.integers(5, 12))  # >= 5: the channel axis is never ambiguous
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    on_white = np.round(alpha / 255.0 * rgb + (1 - alpha / 255.0) * 255).astype(np.uint8)
    three = np.stack([gray] * 3, -1)
    kinds = {
        "PIL RGB": lambda: (PIL.Image.fromarray(rgb), {}, rgb),
        "PIL CMYK": lambda: (PIL.Image.fromarray(rgb).convert("CMYK"), {}, rgb),
        "PIL RGBA": lambda: (
            PIL.Image.fromarray(np.concatenate([rgb, alpha], -1)),
            {},
            np.asarray(
                PIL.Image.alpha_composite(
                    PIL.Image.new("RGBA", (width, height), (255,) * 4),
                    PIL.Image.fromarray(np.concatenate([rgb, alpha], -1)),
                ).convert("RGB")
            ),
        ),
        "PIL L": lambda: (PIL.Image.fromarray(gray), {}, three),
        "PIL LA opaque": lambda: (PIL.Image.fromarray(gray).convert("LA"), {}, three),
        "PIL I;16": lambda: (PIL.Image.fromarray(gray.astype(np.uint16) * 257), {}, three),
        "PIL I": lambda: (PIL.Image.fromarray(gray.astype(np.int32)), {}, three),
        "PIL F": lambda: (PIL.Image.fromarray(gray.astype(np.float32)), {}, three),
        "HWC uint8": lambda: (rgb, {}, rgb),
        "CHW uint8": lambda: (rgb.transpose(2, 0, 1).copy(), {}, rgb),
        "CHW tensor": lambda: (torch.from_numpy(rgb).permute(2, 0, 1), {}, rgb),
        "HWC int64": lambda: (rgb.astype(np.int64), {}, rgb),
        "HWC uint16": lambda: (rgb.astype(np.uint16) * 257, {}, rgb),
        "HWC float64 in [0, 255]": lambda: (rgb.astype(np.float64), {}, rgb),
        "HWC float16 tensor": lambda: (torch.from_numpy(rgb).half(), {}, rgb),
        # Float images are resized in float, without rounding to 8 bits: the same ids as 8-bit ones only unresized.
        "HWC float32 in [0, 1]": lambda: (
            (rgb * (1 / 255)).astype(np.float32),
            {"do_rescale": False, "do_resize": False},
            rgb,
        ),
        "HWC RGBA": lambda: (np.concatenate([rgb, alpha], -1), {}, on_white),
        "gray (H, W)": lambda: (gray, {}, three),
        "gray (1, H, W) tensor": lambda: (torch.from_numpy(gray)[None], {}, three),
        "gray (H, W, 1)": lambda: (gray[..., None], {}, three),
        "gray + alpha": lambda: (
            np.stack([gray, np.full_like(gray, 255)], -1),
            {"input_data_format": "channels_last"},
            three,
        ),
        "bool": lambda: (gray > 127, {}, np.stack([(gray > 127).astype(np.uint8) * 255] * 3, -1)),
    }
    return kinds[draw(st.sampled_from(sorted(kinds)))]()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(picture=pictures(), do_resize=st.booleans())
def test_any_representation_of_a_picture_gives_transformers_ids_of_its_rgb(picture, do_resize):
    image, options, rgb = picture
    do_resize = options.get("do_resize", do_resize)
    ours = ImageGPTImageProcessor(clusters=PALETTE_16, size=8, do_resize=do_resize)
    expected = ids(reference_for(PALETTE_16, size=8, do_resize=do_resize), rgb)
    np.testing.assert_array_equal(ids(ours, image, **options), expected)
    if "do_rescale" not in options:  # in a batch with the plain RGB array, each gives its own ids
        np.testing.assert_array_equal(ids(ours, [rgb, image, rgb], **options), np.concatenate([expected] * 3))


@st.composite
def broken_images(draw):
    """(an image the processor cannot read, the call's options, a pattern of its ValueError's message)."""
    height, width = draw(st.integers(5, 12)), draw(st.integers(5, 12))
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    out_of_range = draw(st.sampled_from([-1.0, 255.5 * 1.01, 1e6]))
    big = draw(st.integers(256, 2**31 - 1))
    rgb = np.zeros((height, width, 3), np.uint8)
    row, column = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))

    def with_value(array, v):
        array = array.copy()
        array[row, column, 0] = v
        return array

    kinds = {
        "non-finite": lambda: (with_value(rgb.astype(np.float32), value), {}, "Pixel values must be finite"),
        "float out of range": lambda: (
            with_value(rgb.astype(np.float64), out_of_range),
            {},
            r"Pixel values must be finite, floats in \[0, 255\]",
        ),
        "float out of [0, 1] without rescaling": lambda: (
            with_value(rgb.astype(np.float32), 2.0),
            {"do_rescale": False},
            r"floats in \[0, 1\]",
        ),
        "integer out of range": lambda: (
            with_value(rgb.astype(np.int64), big),
            {},
            rf"Integer pixel values must lie in \[0, 255\], got \[0, {big}\]",
        ),
        "negative integer": lambda: (
            with_value(rgb.astype(np.int16), -1),
            {},
            r"values must lie in \[0, 255\], got \[-1, 0\]",
        ),
        "PIL I out of range": lambda: (
            PIL.Image.fromarray(with_value(rgb.astype(np.int32), big)[..., 0]),
            {},
            r"values must lie in \[0, 255\]",
        ),
        "5 channels, channels last": lambda: (
            np.zeros((height, width, 5), np.uint8),
            {"input_data_format": "channels_last"},
            r"image of 5 channel\(s\)",
        ),
        "2 channels": lambda: (
            np.zeros((height, width, 2), np.uint8),
            {},
            "Cannot infer the channel axis .*: pass `input_data_format",
        ),
        "complex": lambda: (rgb.astype(np.complex64), {}, "Unsupported pixel dtype complex64"),
        "1-D": lambda: (np.zeros(width, np.uint8), {}, r"Unsupported image ndarray\(\d+,\)"),
        "not an image": lambda: (3.5, {}, "Unsupported image float"),
    }
    return kinds[draw(st.sampled_from(sorted(kinds)))]()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(broken=broken_images(), position=st.integers(0, 2))
def test_an_unreadable_image_in_a_batch_raises_its_specific_error(broken, position):
    image, options, message = broken
    batch = [np.zeros((8, 8, 3), np.uint8)] * 2
    batch.insert(position, image)
    with pytest.raises(ValueError, match=message):
        ImageGPTImageProcessor(clusters=PALETTE_16, size=8)(batch, **options)
