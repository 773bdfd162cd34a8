"""examples/app.py as a user runs it: served on a free local port and asked through gradio_client (the library's images,
partial rows, bad inputs, Stop), in a real headless browser (Debian's Chromium driven by Playwright), and
`python examples/app.py --write_space DIR` (the Space it writes, what it refuses).

The browser test saves a screenshot of the page; `APP_SCREENSHOT=docs/app.png pytest tests/test_app.py -k browser`
writes it where README.md shows it."""

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import EXAMPLES, TINY_DIMS, run_script, script_env, snapshot

gr = pytest.importorskip("gradio", reason='the app needs gradio: pip install "image_gpt_hf[app]"')
gradio_client = pytest.importorskip("gradio_client")

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
FACTOR = 256 // N_PX  # the app shows images enlarged to about 256 pixels a side
GRAY = 128  # the rows not generated yet
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


def save_tiny(path, **fields):
    """A tiny random autoregressive Image GPT at 32x32 and its 16-color processor, saved as a checkpoint folder."""
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**{**TINY_DIMS, "n_positions": N_PX * N_PX, **fields}))
    palette = np.random.default_rng(0).uniform(-1, 1, (TINY_DIMS["vocab_size"] - 1, 3))
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": N_PX, "width": N_PX})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_ar"))


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A class-conditional checkpoint (two classes), served, with the client and the model as the library loads it."""
    # Larger initial weights: the class tokens make a visible difference to a random model.
    classes = {"class_conditional": True, "prepend_sos": True, "id2label": {0: "cat", 1: "dog"}}
    path = save_tiny(tmp_path_factory.mktemp("tiny_cc"), **classes, initializer_range=0.5, vocab_size=19)
    server = serve(path, tmp_path_factory)
    url, log = next(server)
    yield (
        url,
        gradio_client.Client(url, verbose=False),
        (ImageGPTForCausalImageModeling.from_pretrained(path).eval(), ImageGPTImageProcessor.from_pretrained(path)),
    )
    server.close()


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The checkpoint as a user of the library loads it: what the app's images must equal."""
    return ImageGPTForCausalImageModeling.from_pretrained(checkpoint).eval(), ImageGPTImageProcessor.from_pretrained(
        checkpoint
    )


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "digit.png"
    PIL.Image.fromarray(load_sklearn_digits()[7]).save(path)
    return path


def pixels(images):
    return [np.asarray(image) for image in images]


def library(loaded, digit, rows, count, seed, temperature=1.0, top_k=0, **classes):
    model, processor = loaded
    _, enlarged = complete(model, PIL.Image.open(digit), processor=processor, primer_rows=rows, num_completions=count,
                           temperature=temperature, top_k=top_k, seed=seed, upscale=FACTOR, progress=False,
                           **classes)  # fmt: skip
    return pixels(enlarged)


# ------------------------------------------------------------------------------------------------ served, by its API


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    yield from serve(checkpoint, tmp_path_factory)


def serve(checkpoint, tmp_path_factory):
    """`python examples/app.py --model <tiny checkpoint> --port <free port>`, as a user starts it; its log is kept."""
    port, log_path = free_port(), tmp_path_factory.mktemp("server") / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "app.py"), "--model", str(checkpoint), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
            # One thread: the server shares the cores with this test, which computes the library's images.
            env=script_env(GRADIO_ANALYTICS_ENABLED="False"),
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
    try:
        yield url, log_path
    finally:  # also when a fixture closes it
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def readable(item) -> bool:
    """Whether an image of an intermediate update came back whole (the client may fetch one the page has replaced)."""
    path = item["image"]["path"] if isinstance(item["image"], dict) else item["image"]
    return os.path.getsize(path) > 0


def shown(gallery) -> tuple[list[np.ndarray], list[str]]:
    """A gallery the API returned: its images (as the page shows them) and captions."""
    images = [
        np.asarray(
            PIL.Image.open(item["image"]["path"] if isinstance(item["image"], dict) else item["image"]).convert("RGB")
        )
        for item in gallery
    ]
    return images, [item["caption"] for item in gallery]


def ask_completion(client, digit, rows, count, temperature, top_k, seed, *classes):
    upload = gradio_client.handle_file(str(digit))
    return client.submit(upload, rows, count, temperature, top_k, seed, *classes, api_name="/complete")


def test_completions_are_the_librarys_and_fill_in_row_by_row(client, loaded, digit):
    job = ask_completion(client, digit, 20, 3, 0.9, 5, 11)
    gallery, status = job.result(timeout=300)
    assert status.startswith("Done: 3 x 12 rows in") and "tokens/s" in status
    images, captions = shown(gallery)
    assert captions == ["given rows", "1 of 3", "2 of 3", "3 of 3"]
    expected = library(loaded, digit, 20, 3, 11, temperature=0.9, top_k=5)
    assert all(np.array_equal(a, b) for a, b in zip(images[1:], expected, strict=True))
    assert np.array_equal(images[0][: 20 * FACTOR], expected[0][: 20 * FACTOR])
    assert (images[0][20 * FACTOR :] == GRAY).all()
    # Every partial image is the final one's top rows over neutral gray: the rows appear as they are generated.
    # (Under load the client may fail to fetch an update the page has already replaced: it hands back the error.)
    updates = [update for update in job.outputs()[:-1] if isinstance(update, (list, tuple))]
    partials = [(item, final) for update in updates for item, final in zip(update[0][1:], expected)]
    partials = [(item, final) for item, final in partials if readable(item)]
    assert len(partials) > 2
    for item, final in partials:
        for image in shown([item])[0]:
            done = int(np.argmax((image == GRAY).all(axis=(1, 2)))) or len(image)
            assert np.array_equal(image[:done], final[:done]) and (image[done:] == GRAY).all()


def test_samples_are_the_librarys(client, loaded):
    gallery, status = client.predict(2, 1.0, 0, 4, api_name="/sample")
    assert status.startswith("Done: 2 x 32 rows")
    model, processor = loaded
    _, enlarged = sample(model, 2, processor=processor, top_k=0, seed=4, upscale=FACTOR, progress=False)
    images, captions = shown(gallery)
    assert captions == ["1 of 2", "2 of 2"] and all(np.array_equal(a, b) for a, b in zip(images, pixels(enlarged)))


def test_a_class_picked_gives_the_librarys_images_for_that_class(conditional, digit):
    _, client, loaded = conditional
    model, processor = loaded
    gallery, _ = client.predict(2, 1.0, 0, 4, "dog", 2.5, api_name="/sample")
    _, enlarged = sample(model, 2, processor=processor, top_k=0, seed=4, upscale=FACTOR, progress=False,
                         class_labels="dog", guidance_scale=2.5)  # fmt: skip
    unconditional = sample(model, 2, processor=processor, top_k=0, seed=4, progress=False, output_type="ids")
    assert not torch.equal(sample(model, 2, processor=processor, top_k=0, seed=4, progress=False, output_type="ids",
                                  class_labels="dog", guidance_scale=2.5), unconditional)  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(shown(gallery)[0], pixels(enlarged), strict=True))
    gallery, _ = ask_completion(client, digit, 24, 1, 1.0, 0, 5, "cat", 4.0).result(timeout=300)
    expected = library(loaded, digit, 24, 1, 5, class_labels="cat", guidance_scale=4.0)
    assert np.array_equal(shown(gallery)[0][1], expected[0])


def test_the_class_selector_shows_for_a_class_conditional_model_only(server, conditional):
    for url, shown_here in ((server[0], False), (conditional[0], True)):
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            props = [c["props"] for c in json.load(response)["components"]]
        visible = {p["label"]: p.get("visible", True) for p in props if p.get("label")}
        assert visible["Seed"] is True and visible["Class"] is shown_here
        assert visible["Guidance scale (1: none)"] is shown_here


def test_stop_ends_generation_and_the_next_request_runs(server, client, loaded, digit):
    job = client.submit(8, 1.0, 0, 0, api_name="/sample")
    deadline = time.monotonic() + 120
    while not job.outputs():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job.cancel()  # what Stop does: the request's generator is closed, which ends generate() at its next token
    deadline = time.monotonic() + 30
    while "Stopped a request" not in server[1].read_text():
        assert time.monotonic() < deadline, f"the request was not stopped; the app's log:\n{server[1].read_text()}"
        time.sleep(0.2)
    gallery, _ = ask_completion(client, digit, 30, 1, 1.0, 0, 2).result(timeout=300)
    assert np.array_equal(shown(gallery)[0][1], library(loaded, digit, 30, 1, 2)[0])


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
def test_bad_uploads_get_a_message(client, tmp_path, case):
    path, message = write_bad_inputs(tmp_path)[case]
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        ask_completion(client, path, 16, 1, 1.0, 0, 0).result(timeout=120)


def test_a_large_jpeg_is_read_downscaled(client, tmp_path):
    path = tmp_path / "large.jpg"
    PIL.Image.new("RGB", (8000, 6000), "orange").save(path)
    _, status = ask_completion(client, path, 31, 1, 1.0, 0, 0).result(timeout=300)
    assert status.startswith("Done")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((32, 1, 1.0, 0, 0), "Value 32 is greater than maximum value 31"),
        ((16, 9, 1.0, 0, 0), "Value 9 is greater than maximum value 8"),
        ((16, 1, 0.0, 0, 0), "Value 0.0 is less than minimum value 0.1"),
        ((16, 1, 1.0, 17, 0), "Value 17 is greater than maximum value 16"),
        ((16.5, 1, 1.0, 0, 0), "whole number of rows"),
        ((16, 1, 1.0, 0, 2**70), "seed must be from 0 to 2\\*\\*63 - 1"),
        ((16, 1, 1.0, 0, -1), "seed must be from 0"),
    ],
)
def test_bad_settings_get_a_message(client, digit, arguments, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        ask_completion(client, digit, *arguments).result(timeout=120)


# ------------------------------------------------------------------------------------- started, and --write_space


def test_checkpoints_the_app_cannot_run_are_refused_at_start(tmp_path, checkpoint):
    processor = ImageGPTImageProcessor.from_pretrained(checkpoint)
    for name, model in [
        ("base", ImageGPTModel(ImageGPTConfig(**TINY_DIMS))),
        ("bert", ImageGPTForMaskedImageModeling(ImageGPTConfig(**TINY_DIMS, objective="bert"))),
    ]:
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    ImageGPTForCausalImageModeling.from_pretrained(checkpoint).save_pretrained(tmp_path / "no_processor")
    for folder, message in [
        ("base", "has no LM head"),
        ("bert", "is a BERT-objective model; this needs an AR one"),
        ("no_processor", "has no preprocessor_config.json with a palette"),
        (".", "Cannot load a model config"),  # a folder with no checkpoint
    ]:
        assert message in run_script("app.py", "--model", str(tmp_path / folder), check=False)
    # Without --model, in a folder where `make demo` has not run:
    result = subprocess.run([sys.executable, str(EXAMPLES / "app.py")], cwd=tmp_path, env=script_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0 and "No model at demo_output/pretrained: `make demo` writes it" in result.stderr


def test_write_space_of_a_hub_model(tmp_path):
    space = tmp_path / "space"
    run_script("app.py", "--model", "openai/imagegpt-small", "--write_space", str(space))
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
    assert "is not an empty folder" in run_script("app.py", "--write_space", str(space), check=False)
    (tmp_path / "file").write_text("mine")
    assert "is not an empty folder" in run_script("app.py", "--write_space", str(tmp_path / "file"), check=False)
    assert (tmp_path / "file").read_text() == "mine"


def test_a_space_of_a_local_checkpoint_carries_only_what_it_serves(tmp_path, checkpoint):
    run = tmp_path / "run"  # a training run's output folder: the model, and its training state beside it
    shutil.copytree(checkpoint, run)
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / "step_2" / "optimizer.bin").write_bytes(b"optimizer state")
    (run / ".lock").write_text("")
    (run / "all_results.json").write_text("{}")
    space = tmp_path / "space"
    run_script("app.py", "--model", str(run), "--write_space", str(space))
    assert sorted(p.name for p in (space / "model").iterdir()) == sorted(p.name for p in Path(checkpoint).iterdir())
    assert "DEFAULT_MODEL = 'model'" in (space / "app.py").read_text()
    copied = ImageGPTForCausalImageModeling.from_pretrained(space / "model")
    original = ImageGPTForCausalImageModeling.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), original.state_dict().values()))


def test_a_space_is_never_written_inside_its_sources_nor_for_a_model_it_cannot_serve(tmp_path, checkpoint):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    before = snapshot(model)
    output = run_script("app.py", "--model", str(model), "--write_space", str(model / "space"), check=False)
    assert f"is inside {model}" in output and snapshot(model) == before
    processor = ImageGPTImageProcessor.from_pretrained(checkpoint)
    for name, headless in [
        ("bert", ImageGPTForMaskedImageModeling(ImageGPTConfig(**TINY_DIMS, objective="bert"))),
        ("base", ImageGPTModel(ImageGPTConfig(**TINY_DIMS))),
    ]:
        headless.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        output = run_script(
            "app.py", "--model", str(tmp_path / name), "--write_space", str(tmp_path / "s"), check=False
        )
        assert ("BERT-objective" if name == "bert" else "has no LM head") in output and not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ in a real browser


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


def request_completion(page, url: str, digit: Path, rows: int, count: int, seed: int, class_name=None) -> None:
    page.goto(url)
    page.locator("input[type=file]").first.set_input_files(str(digit))
    page.get_by_text(digit.name).first.wait_for()
    slider = page.get_by_label("range slider for Rows kept")
    slider.focus()
    for _ in range(abs(rows - N_PX // 2)):  # the slider starts at half the rows; the keys move it as a user's would
        slider.press("ArrowRight" if rows > N_PX // 2 else "ArrowLeft")
    page.get_by_label("range slider for Completions").fill(str(count))
    page.get_by_label("Seed").filter(visible=True).fill(str(seed))
    if class_name is not None:  # picked from the class selector's list, as a user picks it
        page.get_by_label("Class").filter(visible=True).click()
        page.get_by_role("option", name=class_name, exact=True).click()
    page.get_by_role("button", name="Complete", exact=True).click()


@pytest.mark.slow
def test_app_in_a_real_browser(server, loaded, digit, tmp_path, conditional):
    sync_playwright = browser_or_skip()
    url, log_path = server
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    start = time.perf_counter()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def finished(page, count):
            page.locator("#complete-status", has_text="Done").wait_for(timeout=300_000)
            images = gallery_images(page, url)
            assert len(images) == 1 + count, f"the gallery shows {len(images)} images, expected {1 + count}"
            return images[1:]

        # Upload a digit, keep 20 of its 32 rows, 3 completions, seed 7: the library's images.
        request_completion(page, url, digit, rows=20, count=3, seed=7)
        assert all(
            np.array_equal(a, b) for a, b in zip(finished(page, 3), library(loaded, digit, 20, 3, 7), strict=True)
        )
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
        assert all(
            np.array_equal(a, b) for a, b in zip(finished(page, 2), library(loaded, digit, 24, 2, 3), strict=True)
        )
        assert all(
            np.array_equal(a, b) for a, b in zip(finished(other, 2), library(loaded, digit, 24, 2, 4), strict=True)
        )
        # A class-conditional model: the class picked on the page gives the library's images for that class.
        request_completion(page, conditional[0], digit, rows=24, count=2, seed=5, class_name="dog")
        expected = library(conditional[2], digit, 24, 2, 5, class_labels="dog", guidance_scale=3.0)
        assert all(np.array_equal(a, b) for a, b in zip(finished(page, 2), expected, strict=True))
        browser.close()
    print(f"browser test: {time.perf_counter() - start:.0f} s")
