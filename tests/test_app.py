"""examples/app.py: its functions called directly (the library's images, bad inputs, Stop, the Space it writes), and
the app served on a free local port and used in a real headless browser (Debian's Chromium driven by Playwright).

The browser test saves a screenshot of the page; `APP_SCREENSHOT=docs/app.png pytest tests/test_app.py -k browser`
writes it where README.md shows it."""

import ast
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_DIMS

gr = pytest.importorskip("gradio", reason='the app needs gradio: pip install "image_gpt_hf[app]"')

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import app  # noqa: E402
from image_gpt_hf import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
    ImageGPTModel,
)
from image_gpt_hf.generation import complete, sample  # noqa: E402
from image_gpt_hf.palette import load_sklearn_digits  # noqa: E402

N_PX = 32  # 1,024 pixels: long enough for a request to be stopped halfway, on the tiny dims
FACTOR = app.VIEW_SIDE // N_PX
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random autoregressive Image GPT at 32x32 and its 16-color processor, saved as a checkpoint folder."""
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**{**TINY_DIMS, "n_positions": N_PX * N_PX}))
    palette = np.random.default_rng(0).uniform(-1, 1, (TINY_DIMS["vocab_size"] - 1, 3))
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": N_PX, "width": N_PX})
    path = tmp_path_factory.mktemp("tiny_ar")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return app.load_model(str(checkpoint))


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "digit.png"
    PIL.Image.fromarray(load_sklearn_digits()[7]).save(path)
    return path


def pixels(images):
    return [np.asarray(image) for image in images]


def test_completions_are_the_librarys(loaded, digit):
    model, processor = loaded
    updates = list(app.complete_images(model, processor, str(digit), 20, 3, 0.9, 5, 11))
    gallery, status = updates[-1]
    assert status.startswith("Done: 3 x 12 rows in") and "tokens/s" in status
    assert [caption for _, caption in gallery] == ["given rows", "1 of 3", "2 of 3", "3 of 3"]

    images, enlarged = complete(
        model, PIL.Image.open(digit), processor=processor, primer_rows=20, num_completions=3, temperature=0.9,
        top_k=5, seed=11, upscale=FACTOR, progress=False,
    )  # fmt: skip
    assert [image.size for image, _ in gallery] == [(N_PX * FACTOR, N_PX * FACTOR)] * 4
    assert all(np.array_equal(a, b) for a, b in zip(pixels(image for image, _ in gallery[1:]), pixels(enlarged)))
    given = np.asarray(gallery[0][0])
    assert np.array_equal(given[: 20 * FACTOR], np.asarray(enlarged[0])[: 20 * FACTOR])
    assert (given[20 * FACTOR :] == app.NEUTRAL_GRAY).all()

    # Every partial image is the final one's top rows over neutral gray: the rows appear as they are generated.
    assert len(updates) > 2
    for partial, _ in updates[:-1]:
        for (image, _), final in zip(partial[1:], enlarged):
            image, final = np.asarray(image), np.asarray(final)
            done = int(np.argmax((image == app.NEUTRAL_GRAY).all(axis=(1, 2)))) or len(image)
            assert np.array_equal(image[:done], final[:done]) and (image[done:] == app.NEUTRAL_GRAY).all()


def test_a_page_that_falls_behind_gets_the_given_rows_and_the_final_images(loaded, digit, monkeypatch):
    class Behind(queue.Queue):
        """Answers nothing until generation is done: every row update is then behind the next one."""

        def __init__(self):
            super().__init__()
            self.done = threading.Event()

        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            if item[0] == "done":
                self.done.set()

        def get(self, *args, **kwargs):
            self.done.wait()
            return super().get(*args, **kwargs)

    monkeypatch.setattr(app.queue, "Queue", Behind)
    model, processor = loaded
    updates = list(app.complete_images(model, processor, str(digit), 28, 2, 1.0, 0, 5))
    assert len(updates) == 1  # only the final images: the rows in between were skipped
    gallery, status = updates[0]
    _, enlarged = complete(model, PIL.Image.open(digit), processor=processor, primer_rows=28, num_completions=2,
                           top_k=0, seed=5, upscale=FACTOR, progress=False)  # fmt: skip
    assert [caption for _, caption in gallery] == ["given rows", "1 of 2", "2 of 2"]
    assert np.array_equal(np.asarray(gallery[0][0])[: 28 * FACTOR], np.asarray(enlarged[0])[: 28 * FACTOR])
    assert all(np.array_equal(a, b) for a, b in zip(pixels(image for image, _ in gallery[1:]), pixels(enlarged)))


def test_samples_are_the_librarys(loaded):
    model, processor = loaded
    gallery, status = list(app.sample_images(model, processor, 2, 1.0, 0, 4))[-1]
    assert status.startswith("Done: 2 x 32 rows")
    images, enlarged = sample(model, 2, processor=processor, top_k=0, seed=4, upscale=FACTOR, progress=False)
    assert [caption for _, caption in gallery] == ["1 of 2", "2 of 2"]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(image for image, _ in gallery), pixels(enlarged)))


def test_stop_ends_generation_and_the_next_request_runs(loaded, digit, capsys):
    model, processor = loaded
    updates = app.sample_images(model, processor, 8, 1.0, 0, 0)
    _, status = next(updates)
    assert status.startswith("Row 0 of 32")
    start = time.perf_counter()
    updates.close()  # what Gradio does on Stop: the generator is closed, which ends generate() at its next token
    assert time.perf_counter() - start < 5
    stopped = capsys.readouterr().out
    assert "Stopped a request at row 0 of 32" in stopped
    # The next request runs and still gives the library's images.
    gallery, _ = list(app.complete_images(model, processor, str(digit), 30, 1, 1.0, 0, 2))[-1]
    _, enlarged = complete(model, PIL.Image.open(digit), processor=processor, primer_rows=30, top_k=0, seed=2,
                           upscale=FACTOR, progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(gallery[1][0]), np.asarray(enlarged[0]))


def write_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files the app must refuse, each with a part of the message the page shows."""
    cases = {}
    text = folder / "notes.png"
    text.write_text("not an image")
    cases["not an image"] = (text, "is not an image this app can read")
    frames = [PIL.Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    animated = folder / "animated.gif"
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    cases["animated"] = (animated, "is animated (2 frames): upload a still image")
    deep = folder / "deep.png"
    PIL.Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(deep)
    cases["16-bit"] = (deep, "16 or 32 bits per channel")
    huge = folder / "huge.png"  # a few kilobytes that decode to 49 million pixels
    PIL.Image.new("L", (7000, 7000)).save(huge)
    cases["too many pixels"] = (huge, "more than the 36,000,000 read here")
    return cases


@pytest.mark.parametrize("case", ["not an image", "animated", "16-bit", "too many pixels"])
def test_bad_uploads_get_a_message(loaded, tmp_path, case):
    path, message = write_bad_inputs(tmp_path)[case]
    with pytest.raises(gr.Error, match=re.escape(message)):
        next(app.complete_images(*loaded, str(path), 16, 1, 1.0, 0, 0))


def test_a_large_jpeg_is_read_downscaled(tmp_path):
    path = tmp_path / "large.jpg"
    PIL.Image.new("RGB", (8000, 6000), "orange").save(path)
    image = app.read_image(path)
    assert image.width * image.height <= app.MAX_PIXELS and image.size == (4000, 3000)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((None, 16, 1, 1.0, 0, 0), "Upload an image"),
        (("DIGIT", 32, 1, 1.0, 0, 0), "Keep 0 to 31 rows, got 32"),
        (("DIGIT", 16, 9, 1.0, 0, 0), "Choose 1 to 8 images, got 9"),
        (("DIGIT", 16, 1, 0.0, 0, 0), "temperature must be positive"),
        (("DIGIT", 16, 1, 1.0, 17, 0), "Top-k must be from 0 .* to 16"),
        (("DIGIT", 16, 1, 1.0, 0, 0.5), "seed must be a whole number"),
        (("DIGIT", 16, 1, 1.0, 0, float("nan")), "seed must be a whole number, got nan"),
        (("DIGIT", 16, 1, 1.0, float("inf"), 0), "top-k must be a whole number, got inf"),
        (("DIGIT", 16, 1, 1.0, 0, 2**70), "seed must be from 0 to 2\\*\\*63 - 1"),
        (("DIGIT", 16, 1, 1.0, 0, -1), "seed must be from 0"),
    ],
)
def test_bad_settings_get_a_message(loaded, digit, arguments, message):
    arguments = [str(digit) if value == "DIGIT" else value for value in arguments]
    with pytest.raises(gr.Error, match=message):
        next(app.complete_images(*loaded, *arguments))


def test_checkpoints_the_app_cannot_run_are_refused_at_start(tmp_path, checkpoint, monkeypatch):
    processor = ImageGPTImageProcessor.from_pretrained(checkpoint)
    for name, model in [
        ("base", ImageGPTModel(ImageGPTConfig(**TINY_DIMS))),
        ("bert", ImageGPTForMaskedImageModeling(ImageGPTConfig(**TINY_DIMS, objective="bert"))),
    ]:
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    with pytest.raises(SystemExit, match="has no LM head"):
        app.main(["--model", str(tmp_path / "base")])
    with pytest.raises(SystemExit, match="needs an autoregressive config"):
        app.main(["--model", str(tmp_path / "bert")])
    ImageGPTForCausalImageModeling.from_pretrained(checkpoint).save_pretrained(tmp_path / "no_processor")
    with pytest.raises(SystemExit, match="Cannot load the image processor"):
        app.main(["--model", str(tmp_path / "no_processor")])
    with pytest.raises(SystemExit, match="Cannot load an autoregressive Image GPT"):
        app.main(["--model", str(tmp_path)])  # a folder with no checkpoint
    monkeypatch.chdir(tmp_path)  # no demo_output here
    with pytest.raises(SystemExit, match="No model at demo_output/pretrained: `make demo` writes it"):
        app.main([])


def test_examples_are_held_out_digits_for_8px_models_and_photos_otherwise(tmp_path):
    from image_gpt_hf.data import load_digits

    (tmp_path / "digits").mkdir(), (tmp_path / "photos").mkdir()
    digits = app.example_images(8, str(tmp_path / "digits"))
    held_out = load_digits()["test"]
    assert len(digits) == 6
    for path, example in zip(digits, held_out):
        assert np.array_equal(np.asarray(PIL.Image.open(path)), np.asarray(example["image"]))
    photos = app.example_images(32, str(tmp_path / "photos"))
    assert [Path(path).name for path in photos] == ["chelsea.png", "coffee.png", "rocket.png"]


def test_write_space(tmp_path):
    space = tmp_path / "space"
    app.main(["--model", "openai/imagegpt-small", "--write_space", str(space)])
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "\nsdk: gradio\n" in readme and "\napp_file: app.py\n" in readme
    requirements = (space / "requirements.txt").read_text().split()
    assert f"gradio=={gr.__version__}" in requirements and any(r.startswith("transformers") for r in requirements)
    assert (space / "image_gpt_hf" / "generation.py").is_file()
    assignments = {
        node.targets[0].id: node.value.value
        for node in ast.parse((space / "app.py").read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    assert assignments["DEFAULT_MODEL"] == "openai/imagegpt-small"
    with pytest.raises(SystemExit, match="is not empty"):
        app.main(["--write_space", str(space)])


def test_a_space_of_a_local_checkpoint_carries_it(tmp_path, checkpoint, monkeypatch):
    space = tmp_path / "space"
    app.main(["--model", str(checkpoint), "--write_space", str(space)])
    assert sorted(p.name for p in (space / "model").iterdir()) == sorted(p.name for p in Path(checkpoint).iterdir())
    assert "DEFAULT_MODEL = 'model'" in (space / "app.py").read_text()
    monkeypatch.chdir(space)  # where the Space runs app.py
    model, _ = app.load_model("model")
    original = ImageGPTForCausalImageModeling.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


# ------------------------------------------------------------------------------------------------ in a real browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`python examples/app.py --model <tiny checkpoint> --port <free port>`, as a user starts it; its log is kept."""
    port, log_path = free_port(), tmp_path_factory.mktemp("server") / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "app.py"), "--model", str(checkpoint), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
            # One thread: the server shares the cores with this test, which computes the library's images.
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"The app did not start; its log:\n{log_path.read_text()}")
            time.sleep(1)
    yield url, log_path
    process.terminate()
    process.wait(timeout=30)


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('The browser test needs Playwright for Python: pip install "image_gpt_hf[dev]"')
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"The browser test needs Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    return sync_playwright


def gallery_images(page, url: str) -> list[np.ndarray]:
    """The images the page's completion gallery shows, fetched as the browser fetches them."""
    sources = page.locator("#complete-gallery img").evaluate_all("images => images.map(image => image.src)")
    return [
        np.asarray(PIL.Image.open(urllib.request.urlopen(source, timeout=30)).convert("RGB")) for source in sources
    ]


def request_completion(page, url: str, digit: Path, rows: int, count: int, seed: int) -> None:
    page.goto(url)
    page.locator("input[type=file]").first.set_input_files(str(digit))
    page.get_by_text(digit.name).first.wait_for()
    slider = page.get_by_label("range slider for Rows kept")
    slider.focus()
    for _ in range(abs(rows - N_PX // 2)):  # the slider starts at half the rows; the keys move it as a user's would
        slider.press("ArrowRight" if rows > N_PX // 2 else "ArrowLeft")
    page.get_by_label("range slider for Completions").fill(str(count))
    page.get_by_label("Seed").filter(visible=True).fill(str(seed))
    page.get_by_role("button", name="Complete", exact=True).click()


@pytest.mark.slow
def test_app_in_a_real_browser(server, loaded, digit, tmp_path):
    sync_playwright = browser_or_skip()
    url, log_path = server
    model, processor = loaded
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    start = time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def library(rows, count, seed):
            _, enlarged = complete(model, PIL.Image.open(digit), processor=processor, primer_rows=rows,
                                   num_completions=count, top_k=0, seed=seed, upscale=FACTOR, progress=False)  # fmt: skip
            return [np.asarray(image) for image in enlarged]

        def finished(page, count):
            page.locator("#complete-status", has_text="Done").wait_for(timeout=300_000)
            images = gallery_images(page, url)
            assert len(images) == 1 + count, f"the gallery shows {len(images)} images, expected {1 + count}"
            return images[1:]

        # Upload a digit, keep 20 of its 32 rows, 3 completions, seed 7: the library's images.
        request_completion(page, url, digit, rows=20, count=3, seed=7)
        assert all(np.array_equal(a, b) for a, b in zip(finished(page, 3), library(20, 3, 7), strict=True))
        screenshot = Path(os.environ.get("APP_SCREENSHOT", tmp_path / "app.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"screenshot: {screenshot}")

        # A long request (8 completions of 31 rows), stopped while it runs: the server stops generating, the page
        # answers the next request.
        request_completion(page, url, digit, rows=1, count=8, seed=1)
        page.locator("#complete-status", has_text="Row").wait_for(timeout=60_000)
        page.get_by_role("button", name="Stop", exact=True).filter(visible=True).click()
        deadline = time.monotonic() + 60
        while "Stopped a request" not in log_path.read_text():
            assert time.monotonic() < deadline, f"Stop did not stop generation; the app's log:\n{log_path.read_text()}"
            time.sleep(0.2)
        assert "Done" not in page.locator("#complete-status").inner_text()

        # Two pages at once (two users): both get their own completions.
        other = browser.new_context().new_page()
        request_completion(page, url, digit, rows=24, count=2, seed=3)
        request_completion(other, url, digit, rows=24, count=2, seed=4)
        assert all(np.array_equal(a, b) for a, b in zip(finished(page, 2), library(24, 2, 3), strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(finished(other, 2), library(24, 2, 4), strict=True))
        browser.close()
    print(f"browser test: {time.perf_counter() - start:.0f} s")
