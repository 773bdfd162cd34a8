"""examples/sample.py, run as `python examples/sample.py ...` (in this process, so that a refusal is the exception it
raises), judged by the grids it writes: completions keep their given rows, upscaled grids hold the same images
enlarged, and a model that cannot sample is refused before anything is written."""

import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_in_process

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
)

GAP, HEADER = 2, 14  # the grids' white gaps between cells, and the height of the column titles


def run(*args) -> None:
    """`python examples/sample.py args...`, in this process."""
    run_in_process("sample.py", *map(str, args))


def save_tiny(path: Path, model_class=ImageGPTForCausalImageModeling, **config) -> Path:
    """A random 2-layer model on 4x4 pixels with a 16-gray palette, saved with its processor."""
    torch.manual_seed(0)
    options = {"n_px": 4, "palette_size": 16, "n_layer": 2, "n_embd": 32, "n_head": 2, **config}
    model_class(ImageGPTConfig.from_preset("tiny", **options)).save_pretrained(path)
    palette = np.linspace(-1, 1, 16, dtype=np.float32)[:, None].repeat(3, axis=1)
    ImageGPTImageProcessor(clusters=palette, size={"height": 4, "width": 4}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def swin2sr(tmp_path_factory) -> Path:
    """A tiny random Swin2SR x2 super-resolution checkpoint with its image processor, saved locally (no download)."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessorPil

    path = tmp_path_factory.mktemp("swin2sr")
    config = Swin2SRConfig(
        image_size=8, patch_size=1, embed_dim=8, depths=[1], num_heads=[1], window_size=4, upscale=2, mlp_ratio=1.0
    )
    torch.manual_seed(0)
    Swin2SRForImageSuperResolution(config).save_pretrained(path)
    Swin2SRImageProcessorPil(size_divisor=4).save_pretrained(path)
    return path


def grid_cells(path: Path, side: int, rows: int, columns: int, titled: bool = False) -> list[list[np.ndarray]]:
    """The `side`-pixel cells of a grid PNG, row by row, after checking the grid's size."""
    with PIL.Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    top = (HEADER if titled else 0) + GAP
    assert pixels.shape == (top + rows * (side + GAP), GAP + columns * (side + GAP), 3), path.name
    return [
        [pixels[top + r * (side + GAP) :][:side, GAP + c * (side + GAP) :][:, :side] for c in range(columns)]
        for r in range(rows)
    ]


def test_completions_keep_the_given_rows_of_held_out_images(tiny, tmp_path, caplog):
    caplog.set_level("INFO")
    run(
        "--model_name_or_path", tiny, "--num_images", 3, "--num_completions", 2, "--num_samples", 4,
        "--magnification", 4, "--top_k", 8, "--output_dir", tmp_path,
    )  # fmt: skip
    cell = 4 * 4  # 4x4 images magnified 4 times: too narrow for titles
    for original, given, *generated in grid_cells(tmp_path / "completions.png", cell, rows=3, columns=4):
        assert np.array_equal(given[: cell // 2], original[: cell // 2])  # the given rows are the original's
        assert (given[cell // 2 :] == 128).all()  # the rest is hidden
        for completion in generated:
            assert np.array_equal(completion[: cell // 2], original[: cell // 2])  # kept, then continued
    (samples,) = grid_cells(tmp_path / "samples.png", cell, rows=1, columns=4)
    assert len({image.tobytes() for image in samples}) > 1  # drawn, not one image repeated
    assert f"Wrote completions: {tmp_path / 'completions.png'}" in caplog.text


def test_the_former_flag_upscale_still_magnifies_and_warns(tiny, tmp_path):
    common = ["--model_name_or_path", tiny, "--num_images", 0, "--num_samples", 2]
    run(*common, "--magnification", 3, "--output_dir", tmp_path / "new")
    with pytest.warns(FutureWarning, match="--upscale is deprecated; pass --magnification"):
        run(*common, "--upscale", 3, "--output_dir", tmp_path / "old")
    grid_cells(tmp_path / "new" / "samples.png", 12, rows=1, columns=2)
    assert (tmp_path / "old" / "samples.png").read_bytes() == (tmp_path / "new" / "samples.png").read_bytes()


def test_nearest_neighbour_upscaled_grids_beside_the_originals(tiny, tmp_path):
    run(
        "--model_name_or_path", tiny, "--num_images", 2, "--num_completions", 2, "--num_samples", 3,
        "--magnification", 4, "--upscale_model", 12, "--output_dir", tmp_path,
    )  # fmt: skip
    # The plain grids: 16-pixel cells, no titles; the upscaled ones: the same images 12 times larger, titled.
    plain = grid_cells(tmp_path / "completions.png", 16, rows=2, columns=4)
    upscaled = grid_cells(tmp_path / "completions_upscaled.png", 48, rows=2, columns=4, titled=True)
    plain += grid_cells(tmp_path / "samples.png", 16, rows=1, columns=3)
    upscaled += grid_cells(tmp_path / "samples_upscaled.png", 48, rows=1, columns=3)
    for small_row, large_row in zip(plain, upscaled):
        for small, large in zip(small_row, large_row):
            assert np.array_equal(large, small[::4, ::4].repeat(12, axis=0).repeat(12, axis=1))


def test_upscaled_with_a_super_resolution_checkpoint(tiny, swin2sr, tmp_path):
    from image_gpt_hf.generation import upscale_images

    run(
        "--model_name_or_path", tiny, "--num_images", 1, "--num_completions", 2, "--num_samples", 2,
        "--upscale_model", swin2sr, "--output_dir", tmp_path,
    )  # fmt: skip
    plain = grid_cells(tmp_path / "samples.png", 64, rows=1, columns=2)  # 4x4 magnified to cells of 64
    upscaled = grid_cells(tmp_path / "samples_upscaled.png", 8, rows=1, columns=2)  # 4x4 through the x2 model
    for small, large in zip(plain[0], upscaled[0]):
        (expected,) = upscale_images([PIL.Image.fromarray(np.ascontiguousarray(small[::16, ::16]))], str(swin2sr))
        assert np.array_equal(large, np.asarray(expected))
    grid_cells(tmp_path / "completions_upscaled.png", 8, rows=1, columns=4)


def test_a_checkpoint_without_lm_head_weights_is_refused(tmp_path):
    """A classifier fine-tuned with --gen_loss_weight 0 has no LM head: sampling would draw from a random one."""
    classifier = save_tiny(tmp_path / "clf", ImageGPTForImageClassification, num_labels=10, gen_loss_weight=0.0)
    with pytest.raises(ValueError, match=r"has no LM-head weights .*examples/pretrain.py .*finetune.py with"):
        run("--model_name_or_path", classifier, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # With the generative loss, fine-tuning keeps the head: that classifier samples.
    joint = save_tiny(tmp_path / "joint", ImageGPTForImageClassification, num_labels=10, gen_loss_weight=1.0)
    run("--model_name_or_path", joint, "--num_images", 0, "--num_samples", 1, "--output_dir", tmp_path / "ok")
    assert (tmp_path / "ok" / "samples.png").is_file()


def test_a_bert_model_is_refused(tmp_path):
    bert = save_tiny(tmp_path / "bert", ImageGPTForMaskedImageModeling, objective="bert")
    with pytest.raises(ValueError, match="is a BERT-objective model; this needs an AR one"):
        run("--model_name_or_path", bert, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_an_upscale_factor_below_one_is_refused(value, tmp_path):
    with pytest.raises(ValueError, match=f"--upscale_model as a factor must be at least 1, got {value}"):
        run("--model_name_or_path", "unused", "--output_dir", tmp_path, "--upscale_model", value)


def test_a_bad_upscale_model_is_refused_before_the_model_loads(tiny, tmp_path):
    """Checked before the Image GPT loads: a model whose weights are damaged gives the upscaler's error, not its own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    damaged = Path(shutil.copytree(tiny, tmp_path / "damaged"))
    (damaged / "model.safetensors").write_bytes(b"not weights")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(gpt2)
    out = tmp_path / "out"
    for value in (tiny, gpt2, tmp_path / "no_such_model"):  # none is a super-resolution checkpoint
        with pytest.raises((ValueError, OSError)):  # transformers' own error, before the Image GPT loads
            run("--model_name_or_path", damaged, "--output_dir", out, "--upscale_model", value)
    assert not out.exists()
    # The upscaler checkpoint is an input: grids are never written inside it.
    upscaler = tmp_path / "upscaler"
    upscaler.mkdir()
    with pytest.raises(ValueError, match=rf"{upscaler / 'grids' / 'completions.png'} is inside the input {upscaler}"):
        run("--model_name_or_path", tiny, "--output_dir", upscaler / "grids", "--upscale_model", upscaler)
    assert list(upscaler.iterdir()) == []


def test_existing_grids_are_kept_unless_overwrite_and_links_never_followed(tiny, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "samples.png").write_bytes(b"my samples")
    run_args = ["--model_name_or_path", tiny, "--num_images", 0, "--num_samples", 1]
    with pytest.raises(ValueError, match=rf"{samples / 'samples.png'} exists.*--overwrite"):
        run(*run_args, "--output_dir", samples)
    assert (samples / "samples.png").read_bytes() == b"my samples"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "samples.png").symlink_to(samples / "samples.png")  # a link out of the output folder
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="symbolic link"):
            run(*run_args, "--output_dir", linked, *overwrite)
    assert (samples / "samples.png").read_bytes() == b"my samples"
    run(*run_args, "--output_dir", samples, "--overwrite")
    with PIL.Image.open(samples / "samples.png") as image:
        assert image.size == (GAP + 64 + GAP, GAP + 64 + GAP)  # one 4x4 sample in a 64-pixel cell
