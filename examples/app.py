"""Complete images with an autoregressive Image GPT in the browser: a Gradio app over `image_gpt_hf.generation`.

Upload an image (or pick an example), choose how many of its top rows to keep, and watch the completions fill in row
by row; a second tab samples whole images. The app calls the library's `complete()` and `sample()`, so with the same
seed and settings it shows exactly their images.

    make app                                                 # the model `make demo` writes, on http://127.0.0.1:7860
    python examples/app.py --model openai/imagegpt-small     # any checkpoint: a folder or a Hub id
    python examples/app.py --model openai/imagegpt-small --write_space my-space   # a Hugging Face Space folder
    hf upload spaces/USER/NAME my-space . --repo-type space  # ... pushed (creates the Space if needed)
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import torch
from transformers.generation.streamers import BaseStreamer

import image_gpt_hf
from image_gpt_hf import ImageGPTForCausalImageModeling, ImageGPTImageProcessor, load_config_and_processor
from image_gpt_hf.generation import complete, sample, upscale_images

# `--write_space` writes this line with the Space's model.
DEFAULT_MODEL = "demo_output/pretrained"
# Shown enlarged (nearest-neighbour, the library's `upscale`) to about this many pixels a side.
VIEW_SIDE = 256
# An upload is decoded at most this large (about 100 MB as RGB); a bigger JPEG is decoded downscaled, others refused.
MAX_PIXELS = 36_000_000
NEUTRAL_GRAY = 128  # the rows not generated yet
# Defaults sized for iGPT-S at 32x32 on a free 2-vCPU Space: half the rows kept, 4 completions, about 26 s (estimated
# from benchmarks/RESULTS.md; README.md's App section says how).
DEFAULT_COMPLETIONS = 4
MAX_COMPLETIONS = 8


def load_model(name_or_path: str) -> tuple[ImageGPTForCausalImageModeling, ImageGPTImageProcessor]:
    """The autoregressive model and its processor; a ValueError with the reason for anything the app cannot run."""
    if name_or_path == DEFAULT_MODEL and not os.path.isdir(name_or_path):
        raise ValueError(
            f"No model at {DEFAULT_MODEL}: `make demo` writes it (a tiny Image GPT trained on the bundled digits, "
            "minutes on 2 CPU cores), or pass any checkpoint with --model (a folder or a Hub id such as "
            "openai/imagegpt-small)."
        )
    config, processor = load_config_and_processor(name_or_path, objective="ar")
    model, info = ImageGPTForCausalImageModeling.from_pretrained(name_or_path, config=config, output_loading_info=True)
    if any(key.startswith("lm_head.") for key in info["missing_keys"]):  # else: completions from a random head
        raise ValueError(
            f"{name_or_path!r} has no LM head (a feature-extraction or classification checkpoint): completing images "
            "needs the next-pixel head an autoregressive pretraining saves (e.g. examples/pretrain.py --objective ar)."
        )
    return model.eval(), processor


def read_image(path: str | os.PathLike) -> PIL.Image.Image:
    """An uploaded still image with 8-bit pixels, at most `MAX_PIXELS` pixels (a bigger JPEG is decoded downscaled);
    a ValueError that says what is wrong otherwise."""
    name = os.path.basename(path)
    try:
        with PIL.Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise ValueError(f"{name} is animated ({image.n_frames} frames): upload a still image.")
            if image.mode.startswith("I") or image.mode == "F":
                raise ValueError(
                    f"{name} has {image.mode!r} pixels (16 or 32 bits per channel): save it with 8-bit pixels."
                )
            if image.width * image.height > MAX_PIXELS:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale: ask for a size whose chosen scale stays within the budget.
                scale = math.sqrt(MAX_PIXELS / (image.width * image.height)) / 2
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                if image.width * image.height > MAX_PIXELS:
                    raise ValueError(
                        f"{name} is {image.width}x{image.height} pixels, more than the {MAX_PIXELS:,} read here: "
                        "scale it down (or save it as JPEG, which is read downscaled)."
                    )
            image.load()
            return image.copy()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{name} is too large to read: {error}") from None
    except (OSError, SyntaxError) as error:  # what Pillow raises for unknown, broken or truncated files
        raise ValueError(f"{name} is not an image this app can read: {error}") from None


class Stopped(Exception):
    """Raised inside `generate()` when the request that started it is stopped or abandoned."""


class RowStreamer(BaseStreamer):
    """Receives `generate()`'s tokens (first the prompt, then one token per sequence per step) and hands the ids
    generated so far to `updates` at every finished row; once `stop` is set, it ends generation by raising."""

    def __init__(self, n_px: int, updates: queue.Queue, stop: threading.Event):
        self.n_px, self.updates, self.stop = n_px, updates, stop
        self.prompt, self.new = None, []

    def put(self, value: torch.Tensor) -> None:
        if self.stop.is_set():
            raise Stopped
        if self.prompt is None:  # (batch, 1 + kept pixels): SOS and the given rows
            self.prompt = value[:, 1:]
            self.updates.put(("rows", self.prompt))
            return
        self.new.append(value)  # (batch,)
        if len(self.new) % self.n_px == 0:
            self.updates.put(("rows", torch.cat([self.prompt, torch.stack(self.new, dim=1)], dim=1)))

    def end(self) -> None:
        pass


def partial_images(processor: ImageGPTImageProcessor, ids: torch.Tensor, n_px: int) -> list[PIL.Image.Image]:
    """(batch, rows * n_px) ids as n_px x n_px images: the rows decoded so far on top, neutral gray below."""
    rows = ids.shape[1] // n_px
    canvas = np.full((len(ids), n_px, n_px, 3), NEUTRAL_GRAY, dtype=np.uint8)
    if rows:
        canvas[:, :rows] = processor.batch_decode(ids[:, : rows * n_px], output_type="np", size=(rows, n_px))
    return [PIL.Image.fromarray(array) for array in canvas]


def stream(run, model, processor, kept_rows: int, count: int) -> Iterator[tuple[list, str]]:
    """Runs `run(streamer)` (a `complete` or `sample` call with `upscale`) in a thread and yields (gallery, status):
    the given rows and the completions so far after every generated row, then `run`'s own images. Closing the
    generator (Stop, a closed page) stops generation before the next token."""
    n_px = model.config.n_px
    factor = max(1, VIEW_SIDE // n_px)
    updates, stop = queue.Queue(), threading.Event()

    def work():
        try:
            updates.put(("done", run(RowStreamer(n_px, updates, stop))))
        except BaseException as error:  # noqa: B036 - handed to the page's request, which raises it there
            updates.put(("error", error))

    def gallery(given, images):
        given = [(image, "given rows") for image in upscale_images(given, factor)] if kept_rows else []
        return given + [(image, f"{i + 1} of {count}") for i, image in enumerate(images)]

    new_tokens = count * n_px * (n_px - kept_rows)
    start, given, rows = time.perf_counter(), [], kept_rows
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = updates.get()
            if kind == "error":
                raise value
            seconds = time.perf_counter() - start
            if kind == "done":
                tokens = f"{new_tokens / seconds:,.0f} tokens/s" if seconds > 0 else ""
                yield (
                    gallery(given, value[1]),
                    f"Done: {count} x {n_px - kept_rows} rows in {seconds:.1f} s, {tokens}.",
                )
                return
            if not given and kept_rows:  # the first update is the prompt: the given rows
                given = partial_images(processor, value[:1, : kept_rows * n_px], n_px)
            if not updates.empty():  # the page is behind: show only the latest rows
                continue
            rows = value.shape[1] // n_px
            images = upscale_images(partial_images(processor, value, n_px), factor)
            yield gallery(given, images), f"Row {rows} of {n_px} ({seconds:.1f} s)"
    except GeneratorExit:  # Stop, or the page went away
        stop.set()
        thread.join()
        print(f"Stopped a request at row {rows} of {n_px} after {time.perf_counter() - start:.1f} s.", flush=True)
        raise
    finally:
        stop.set()  # ends generate() at its next token if it still runs
        thread.join()


def check_settings(num_images, temperature, top_k, seed) -> dict:
    """The sampling settings from the page as `complete`/`sample` keywords; gr.Error for a value it cannot take (the
    sliders' ranges are Gradio's to enforce; the seed box takes any number)."""
    for name, value in (("count", num_images), ("top-k", top_k), ("seed", seed)):
        if value is None or not math.isfinite(value) or int(value) != value:
            raise gr.Error(f"The {name} must be a whole number, got {value!r}.")
    if not 0 <= seed < 2**63:
        raise gr.Error(f"The seed must be from 0 to 2**63 - 1 (torch's seeds), got {seed}.")
    # top_k 0: every color drawn from the full softmax, as OpenAI's sampler does. compile=False: the compiled step is
    # made once per batch size (10-26 s for iGPT-S), which would stall the first request at every count on the slider.
    return {"temperature": float(temperature), "top_k": int(top_k), "seed": int(seed), "compile": False}


def complete_images(model, processor, path, kept_rows, num_completions, temperature, top_k, seed):
    """The completion tab: the given rows of the uploaded image and its completions, filling in row by row."""
    if path is None:
        raise gr.Error("Upload an image (or pick an example) first.")
    try:
        image = read_image(path)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    n_px = model.config.n_px
    if int(kept_rows) != kept_rows:
        raise gr.Error(f"Keep a whole number of rows, got {kept_rows!r}.")
    settings = check_settings(num_completions, temperature, top_k, seed)
    kept_rows, num_completions = int(kept_rows), int(num_completions)

    def run(streamer):
        return complete(model, image, processor=processor, primer_rows=kept_rows, num_completions=num_completions,
                        upscale=max(1, VIEW_SIDE // n_px), progress=False, streamer=streamer, **settings)  # fmt: skip

    try:
        yield from stream(run, model, processor, kept_rows, num_completions)
    except ValueError as error:  # e.g. an image the processor refuses
        raise gr.Error(str(error)) from None


def sample_images(model, processor, num_images, temperature, top_k, seed):
    """The sampling tab: whole new images, filling in row by row."""
    settings = check_settings(num_images, temperature, top_k, seed)
    n_px = model.config.n_px

    def run(streamer):
        return sample(model, int(num_images), processor=processor, upscale=max(1, VIEW_SIDE // n_px),
                      progress=False, streamer=streamer, **settings)  # fmt: skip

    yield from stream(run, model, processor, 0, int(num_images))


def example_images(n_px: int, folder: str) -> list[str]:
    """Example files for the page: held-out digits for an 8x8 model (the demo's), scikit-image's photos otherwise."""
    if n_px == 8:
        from image_gpt_hf.data import load_digits

        held_out = load_digits()["test"]  # the digits the demo's pretraining holds out
        images = {
            f"digit{i}_{example['label']}": example["image"] for i, example in enumerate(held_out.select(range(6)))
        }
    else:
        import skimage.data

        images = {name: PIL.Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "rocket")}
    paths = []
    for name, image in images.items():
        paths.append(os.path.join(folder, f"{name}.png"))
        image.save(paths[-1])
    return paths


def build_app(model, processor, title: str = "Image GPT") -> gr.Blocks:
    """The page: a completion tab and a sampling tab, each with its settings on the left and a gallery on the right."""
    n_px = model.config.n_px
    palette = model.config.vocab_size - 1
    examples = example_images(n_px, tempfile.mkdtemp(prefix="igpt_app_examples_"))
    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\nA {n_px}x{n_px} autoregressive Image GPT ({palette} colors) continues an image pixel by "
            "pixel from its top rows. The same seed and settings give the same images as "
            "`image_gpt_hf.generation.complete()`."
        )
        with gr.Tab("Complete"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image", file_types=["image"], type="filepath")
                    gr.Examples(examples, inputs=upload, label="Examples")
                    rows = gr.Slider(0, n_px - 1, value=n_px // 2, step=1, label="Rows kept")
                    count = gr.Slider(1, MAX_COMPLETIONS, value=DEFAULT_COMPLETIONS, step=1, label="Completions")
                    settings = sampling_settings(palette)
                    with gr.Row():
                        run_complete = gr.Button("Complete", variant="primary")
                        stop_complete = gr.Button("Stop", variant="stop")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Given rows | completions", columns=5, format="png", elem_id="complete-gallery"
                    )
                    status = gr.Markdown(elem_id="complete-status")
        with gr.Tab("Sample"):
            with gr.Row():
                with gr.Column(scale=1):
                    sample_count = gr.Slider(1, MAX_COMPLETIONS, value=DEFAULT_COMPLETIONS, step=1, label="Images")
                    sample_settings = sampling_settings(palette)
                    with gr.Row():
                        run_sample = gr.Button("Sample", variant="primary")
                        stop_sample = gr.Button("Stop", variant="stop")
                with gr.Column(scale=2):
                    sample_gallery = gr.Gallery(label="Samples", columns=4, format="png")
                    sample_status = gr.Markdown(elem_id="sample-status")

        completing = run_complete.click(
            functools.partial(complete_images, model, processor),
            [upload, rows, count, *settings],
            [gallery, status],
            api_name="complete",
        )
        stop_complete.click(None, cancels=[completing])
        sampling = run_sample.click(
            functools.partial(sample_images, model, processor),
            [sample_count, *sample_settings],
            [sample_gallery, sample_status],
            api_name="sample",
        )
        stop_sample.click(None, cancels=[sampling])
    # One request computes at a time (they share the cores); the others wait in the queue.
    return demo.queue(default_concurrency_limit=1)


def sampling_settings(palette: int) -> list:
    return [
        gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature"),
        gr.Slider(0, palette, value=0, step=1, label="Top-k (0: all colors)"),
        gr.Number(0, precision=0, label="Seed"),
    ]


# What a Space needs of a local checkpoint: its top-level config, weights, processor and remote code; not its
# training state (checkpoints/, optimizer and random states, the run's lock file) nor anything else in the folder.
SPACE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "*.safetensors*", "pytorch_model*",
               "*.py", "README.md")  # fmt: skip


def write_space(folder: str, model: str) -> None:
    """A Hugging Face Space in `folder`: this app serving `model`, the package it runs on, requirements and the
    README front matter (`sdk: gradio`). Push it with `hf upload spaces/USER/NAME FOLDER . --repo-type space`."""
    target = Path(folder).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{folder} is not an empty folder: write the Space into a new one.")
    package = Path(image_gpt_hf.__file__).resolve().parent
    sources = [package] + ([Path(model).resolve()] if os.path.isdir(model) else [])
    for source in sources:  # a Space inside what it copies would copy itself
        if target.is_relative_to(source):
            raise ValueError(f"{folder} is inside {source}, which the Space is made from: write it elsewhere.")
    if os.path.isdir(model):  # what the Space would refuse at start is refused here (a Hub id is checked there)
        load_model(model)
    with open(__file__) as f:
        source = f.read()
    line = f'DEFAULT_MODEL = "{DEFAULT_MODEL}"'
    target.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(model):  # a local checkpoint travels with the Space, which cannot read this machine's folders
        (target / "model").mkdir()
        for path in sorted(Path(model).iterdir()):
            if path.is_file() and any(path.match(pattern) for pattern in SPACE_FILES):
                shutil.copy2(path, target / "model" / path.name)
        model = "model"
    (target / "app.py").write_text(source.replace(line, f"DEFAULT_MODEL = {model!r}"))
    # The package itself, so that the Space runs the version that wrote it.
    shutil.copytree(package, target / "image_gpt_hf", ignore=shutil.ignore_patterns("__pycache__"))
    requirements = [r for r in importlib.metadata.requires("image_gpt_hf") if "extra ==" not in r]
    requirements += [f"gradio=={gr.__version__}", "scikit-image", "scikit-learn", "datasets"]
    (target / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (target / "README.md").write_text(
        f"---\ntitle: Image GPT completion\nsdk: gradio\nsdk_version: {gr.__version__}\napp_file: app.py\n"
        f"pinned: false\n---\n\n# Image GPT completion\n\nUpload an image and let `{model}` complete it from its "
        "top rows, or sample new images. Made with image_gpt_hf's examples/app.py "
        f"(`python examples/app.py --model {model} --write_space DIR`).\n"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Gradio app that completes and samples images with Image GPT.")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"An autoregressive Image GPT checkpoint: a folder or a Hub id (default: {DEFAULT_MODEL}, `make demo`).",
    )
    # A Space sets GRADIO_SERVER_NAME (0.0.0.0) and GRADIO_SERVER_PORT; here the app stays on this machine.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--write_space",
        metavar="DIR",
        default=None,
        help="Write a Hugging Face Space serving --model into DIR (a new folder) instead of serving.",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.write_space:
            write_space(args.write_space, args.model)
            print(
                f"Wrote the Space to {args.write_space}; push it: hf upload spaces/USER/NAME {args.write_space} . --repo-type space"
            )
            return
        model, processor = load_model(args.model)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    build_app(model, processor, f"Image GPT: {name}").launch(
        server_name=args.host, server_port=args.port, max_file_size="20mb"
    )


if __name__ == "__main__":
    main()
