"""generate() against decoding without a cache (default, static cache, torch.compile), and the `sample` /
`complete` helpers."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_DIMS
from transformers import DynamicCache, GenerationConfig

from image_gpt_hf import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForMaskedImageModeling,
    ImageGPTImageProcessor,
)
from image_gpt_hf.generation import complete, openai_generation_config, sample, upscale_images

N_PX = 8
DIMS = {**TINY_DIMS, "n_layer": 2}
PALETTE = DIMS["vocab_size"] - 1
SOS = DIMS["vocab_size"] - 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval()


@pytest.fixture(scope="module")
def processor():
    palette = np.random.default_rng(0).uniform(-1, 1, (PALETTE, 3))
    return ImageGPTImageProcessor(clusters=palette, size={"height": N_PX, "width": N_PX})


def greedy(model, batch=2, **kwargs):
    start = torch.full((batch, 1), SOS)
    return model.generate(start, max_new_tokens=N_PX * N_PX, min_new_tokens=N_PX * N_PX, do_sample=False, **kwargs)


def uncached_greedy(model, start, steps):
    """Greedy decoding by hand, each step a full forward without a cache: the reference generate() must meet."""
    ids = start
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------------- invariants: cached decoding = uncached decoding
# These hold whatever transformers does inside generate(); CI runs them on the lowest and the newest supported release.


@pytest.fixture(scope="module")
def prompts():
    # A batch with SOS only, and one with a primer of 11 pixels after SOS (as `complete` builds).
    primer = torch.randint(0, PALETTE, (2, 11), generator=torch.Generator().manual_seed(5))
    return {"sos": torch.full((2, 1), SOS), "primer": torch.cat([torch.full((2, 1), SOS), primer], dim=1)}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("prompt", ["sos", "primer"])
def test_generate_equals_uncached_greedy_decoding(model, prompts, attn, cache, prompt):
    model.set_attn_implementation(attn)
    try:
        start = prompts[prompt]
        steps = DIMS["n_positions"] + 1 - start.shape[1]
        options = {} if cache == "dynamic" else {"cache_implementation": "static"}
        generated = model.generate(start, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **options)
        assert generated.shape == (2, DIMS["n_positions"] + 1)
        assert torch.equal(generated, uncached_greedy(model, start, steps))
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_generate_equals_uncached_greedy_decoding(prompts, backend):
    # The static-cache + torch.compile path: the decode step compiled as one graph (fullgraph raises on any break).
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval()
    expected = uncached_greedy(model, prompts["primer"], DIMS["n_positions"] + 1 - prompts["primer"].shape[1])
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=backend)
    steps = expected.shape[1] - prompts["primer"].shape[1]
    generated = model.generate(
        prompts["primer"], max_new_tokens=steps, min_new_tokens=steps, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(generated, expected)


def test_generate_past_n_positions_is_a_clear_error(model):
    start = torch.full((1, 1), SOS)
    with pytest.raises(ValueError, match="n_positions=64"):
        model.generate(start, max_length=DIMS["n_positions"] + 2, do_sample=False)
    with pytest.raises(ValueError, match="n_positions=64"):
        model.generate(start, max_length=DIMS["n_positions"] + 2, do_sample=False, cache_implementation="static")
    assert model.generate(start, max_length=DIMS["n_positions"] + 1, do_sample=False).shape == (1, 65)


def test_cached_decode_steps_read_no_tensor_values():
    """Reading a tensor value is a device sync per token on an accelerator: a one-token step after a filled cache runs
    on the meta device, where reading any value raises (as reading a prompt's ids under `prepend_sos` does)."""
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**DIMS)).eval().to("meta")
    head_dim = DIMS["n_embd"] // DIMS["n_head"]
    for prepend_sos in (False, True):  # a cached step is never shifted, so its ids are not read
        cache = DynamicCache(config=model.config)
        for layer in range(DIMS["n_layer"]):
            cache.update(*(torch.empty(2, DIMS["n_head"], 5, head_dim, device="meta") for _ in range(2)), layer)
        step = model(torch.zeros(2, 1, dtype=torch.long, device="meta"), cache=cache, prepend_sos=prepend_sos)
        assert step.logits.shape == (2, 1, PALETTE) and cache.get_seq_length() == 6
    with pytest.raises(RuntimeError, match="meta"):
        model(torch.zeros(2, 5, dtype=torch.long, device="meta"), use_cache=False, prepend_sos=True)


# ---------------------------------------------------------------------------------------------------------- sample


def test_sample_shapes_and_output_types(model, processor):
    images = sample(model, 3, processor=processor, batch_size=2, seed=0, progress=False)
    assert len(images) == 3 and all(isinstance(image, PIL.Image.Image) for image in images)
    assert images[0].size == (N_PX, N_PX)
    arrays = sample(model, 3, processor=processor, batch_size=2, seed=0, output_type="np", progress=False)
    assert arrays.shape == (3, N_PX, N_PX, 3) and arrays.dtype == np.uint8
    assert np.array_equal(arrays[0], np.asarray(images[0]))
    ids = sample(model, 3, batch_size=2, seed=0, output_type="ids", progress=False)
    assert ids.shape == (3, N_PX * N_PX) and ids.min() >= 0 and ids.max() < PALETTE
    assert np.array_equal(processor.batch_decode(ids, output_type="np"), arrays)


def test_sample_seed_reproduces_and_leaves_global_rng_alone(model):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample(model, 2, seed=7, output_type="ids", progress=False, top_k=8, temperature=1.5)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample(model, 2, seed=7, output_type="ids", progress=False, top_k=8, temperature=1.5)
    c = sample(model, 2, seed=8, output_type="ids", progress=False, top_k=8, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_sample_is_greedy_generate(model):
    ids = sample(model, 2, do_sample=False, output_type="ids", progress=False)
    assert torch.equal(ids, greedy(model)[:, 1:])


def test_sample_with_progress_bar_and_generate_options(model, capsys):
    # generate() options pass through: suppressed pixels never appear, and a static cache gives the dynamic one's ids.
    allowed = [PALETTE - 2, PALETTE - 1]
    options = {"suppress_tokens": [i for i in range(PALETTE) if i not in allowed], "seed": 0, "output_type": "ids"}
    ids = sample(model, 2, progress=True, cache_implementation="static", **options)
    assert ids.shape == (2, N_PX * N_PX) and set(ids.unique().tolist()) == set(allowed)
    assert "px" in capsys.readouterr().err  # tqdm wrote its bar
    assert torch.equal(ids, sample(model, 2, progress=False, **options))


# -------------------------------------------------------------------------------------------------------- complete


def test_complete_keeps_primer_rows_of_images(model, processor):
    images = sample(model, 2, processor=processor, seed=1, progress=False)
    ids = processor(images, return_tensors="pt")["input_ids"]
    out = complete(model, images, processor=processor, num_completions=3, seed=0, output_type="np", progress=False)
    assert out.shape == (6, N_PX, N_PX, 3)
    originals = processor.batch_decode(ids, output_type="np")
    for i in range(6):
        assert np.array_equal(out[i, : N_PX // 2], originals[i // 3, : N_PX // 2])  # top half kept, image-major
    pil = complete(model, images[0], processor=processor, primer_rows=5, seed=0, progress=False)
    assert len(pil) == 1 and np.array_equal(np.asarray(pil[0])[:5], originals[0, :5])


def test_complete_from_ids(model):
    ids = sample(model, 2, seed=3, output_type="ids", progress=False)
    out = complete(model, ids, primer_rows=3, num_completions=2, seed=0, output_type="ids", progress=False)
    assert out.shape == (4, N_PX * N_PX)
    assert torch.equal(out[:, : 3 * N_PX], ids.repeat_interleave(2, dim=0)[:, : 3 * N_PX])
    # Greedy completion of a greedy image reproduces it; one sequence given as 1-D works too.
    full = greedy(model, batch=1)[0, 1:]
    assert torch.equal(complete(model, full, do_sample=False, output_type="ids", progress=False)[0], full)
    # primer_rows=0 is plain sampling from SOS.
    assert torch.equal(
        complete(model, ids, primer_rows=0, seed=5, output_type="ids", progress=False),
        sample(model, 2, seed=5, output_type="ids", progress=False),
    )


def test_complete_seed_reproduces(model):
    ids = sample(model, 1, seed=3, output_type="ids", progress=False)
    a = complete(model, ids, num_completions=2, seed=11, output_type="ids", progress=False)
    b = complete(model, ids, num_completions=2, seed=11, output_type="ids", progress=False)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


# ------------------------------------------------------------------------------------------------------- bad input


def test_processor_with_another_palette_size_is_refused(model):
    other = ImageGPTImageProcessor(clusters=np.zeros((512, 3)), size={"height": N_PX, "width": N_PX})
    with pytest.raises(ValueError, match="512 colors but the model predicts 16"):
        sample(model, 1, processor=other, progress=False)
    with pytest.raises(ValueError, match="512 colors"):
        complete(model, torch.zeros(1, 64, dtype=torch.long), processor=other, progress=False)


IMAGE = torch.zeros(1, N_PX * N_PX, dtype=torch.long)  # the ids of one image


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: complete(m, IMAGE, primer_rows=N_PX, output_type="ids"), r"primer_rows.*\[0, 8\)"),
        (lambda m, p: complete(m, IMAGE, primer_rows=-1, output_type="ids"), "primer_rows"),
        (
            lambda m, p: complete(m, IMAGE[:, 1:], output_type="ids"),
            r"shape \(batch,\) \(64,\) or \(8, 8\), got \(1, 63\)",
        ),
        (lambda m, p: complete(m, torch.full((1, 64), SOS), output_type="ids"), "drop the SOS"),
        (lambda m, p: sample(m, 2, batch_size=0, output_type="ids"), "batch_size"),
        (lambda m, p: sample(m, 1, output_type="jpeg"), "output_type"),
        (lambda m, p: sample(m, 1, output_type="ids", max_new_tokens=3), "max_new_tokens"),
        (lambda m, p: sample(m, 1), "need the image processor"),
        (lambda m, p: complete(m, [PIL.Image.new("RGB", (4, 4))], output_type="ids"), "need the image processor"),
        (
            lambda m, p: complete(
                m, PIL.Image.new("RGB", (4, 4)), processor=ImageGPTImageProcessor(clusters=p.clusters)
            ),
            "size=",
        ),
        (lambda m, p: sample(m, 1, processor=p, output_type="np", upscale=2, progress=False), "'pil' with `upscale`"),
    ],
)
def test_bad_input_raises_value_error(model, processor, call, message):
    with pytest.raises(ValueError, match=message):
        call(model, processor)


@pytest.mark.parametrize("as_array", [False, True])
def test_complete_reads_an_id_grid_as_ids(model, as_array):
    """(batch, n_px, n_px) palette ids, as a tensor or an int64 array, are the ids of `batch` images (not a picture)."""
    ids = sample(model, 2, seed=3, output_type="ids", progress=False)
    grid = ids.reshape(2, N_PX, N_PX)
    grid = grid.numpy() if as_array else grid
    got = complete(model, grid, primer_rows=3, seed=5, output_type="ids", progress=False)
    assert torch.equal(got, complete(model, ids, primer_rows=3, seed=5, output_type="ids", progress=False))
    assert got.shape == (2, N_PX * N_PX) and torch.equal(got[:, : 3 * N_PX], ids[:, : 3 * N_PX])
    one = complete(model, grid[0], primer_rows=3, seed=5, output_type="ids", progress=False)
    assert torch.equal(one[:, : 3 * N_PX], ids[:1, : 3 * N_PX])


@pytest.mark.slow
def test_sample_and_complete_on_a_model_offloaded_to_disk(model, tmp_path):
    """As plain generate() does, on a model whose weights all stay on disk (device_map with offload)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "model")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map={"": "disk"}, offload_folder=tmp_path / "offload"
    ).eval()
    options = {"do_sample": False, "output_type": "ids", "progress": False}
    ids = sample(offloaded, 2, **options)
    assert torch.equal(ids, sample(model, 2, **options)) and torch.equal(ids, greedy(model)[:, 1:])
    assert torch.equal(complete(offloaded, ids, primer_rows=2, seed=1, output_type="ids", progress=False),
                       complete(model, ids, primer_rows=2, seed=1, output_type="ids", progress=False))  # fmt: skip


def test_bert_models_are_refused(processor):
    bert = ImageGPTForMaskedImageModeling(ImageGPTConfig(**DIMS, objective="bert")).eval()
    with pytest.raises(ValueError, match="autoregressive"):
        sample(bert, 1, processor=processor)


def test_beam_search_and_a_users_streamer_go_without_the_progress_bar(model, capsys):
    class Count:
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1

        def end(self):
            pass

    streamer = Count()
    ids = sample(model, 1, output_type="ids", do_sample=False, streamer=streamer)  # progress=True by default
    assert ids.shape == (1, N_PX * N_PX) and streamer.calls == N_PX * N_PX + 1  # the prompt, then every token
    assert "px" not in capsys.readouterr().err  # the user's streamer took the slot: no bar
    beams = sample(model, 2, output_type="ids", do_sample=False, num_beams=2)
    assert "px" not in capsys.readouterr().err  # beam search takes no streamer: no bar
    start = torch.full((2, 1), SOS)
    expected = model.generate(start, max_length=N_PX * N_PX + 1, min_length=N_PX * N_PX + 1, num_beams=2)
    assert torch.equal(beams, expected[:, 1:])


def test_the_number_of_results_is_the_one_asked_for(model):
    with pytest.raises(
        ValueError, match="num_return_sequences.* are set by the image size and `num_images` / `num_completions`"
    ):
        sample(model, 2, output_type="ids", progress=False, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        complete(model, torch.zeros(1, N_PX * N_PX, dtype=torch.long), output_type="ids", num_return_sequences=3)
    # A generation config saved with several sequences per prompt does not multiply the images either.
    saved = model.generation_config
    model.generation_config = GenerationConfig(num_return_sequences=3, do_sample=True)
    try:
        assert sample(model, 2, seed=0, output_type="ids", progress=False).shape == (2, N_PX * N_PX)
        ids = torch.zeros(1, N_PX * N_PX, dtype=torch.long)
        assert complete(model, ids, num_completions=2, output_type="ids", progress=False).shape == (2, N_PX * N_PX)
    finally:
        model.generation_config = saved


def test_a_model_saved_with_the_openai_generation_config_samples_without_length_warnings(model, caplog):
    saved = model.generation_config
    model.generation_config = openai_generation_config(model.config)  # what examples/pretrain.py saves
    try:
        with caplog.at_level("WARNING"):
            ids = sample(model, 1, seed=0, output_type="ids", progress=False)
            done = complete(model, ids, seed=0, output_type="ids", progress=False)
    finally:
        model.generation_config = saved
    assert ids.shape == done.shape == (1, N_PX * N_PX)
    assert "max_new_tokens" not in caplog.text and "max_length" not in caplog.text, caplog.text


# ------------------------------------------------------------------------------------------------------- upscaling


@pytest.fixture(scope="module")
def swin2sr(tmp_path_factory):
    """A tiny random Swin2SR x2 super-resolution checkpoint with its image processor, saved locally (no download)."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution
    from transformers.models.swin2sr.image_processing_pil_swin2sr import Swin2SRImageProcessorPil

    folder = tmp_path_factory.mktemp("swin2sr")
    config = Swin2SRConfig(
        image_size=8, patch_size=1, embed_dim=8, depths=[1], num_heads=[1], window_size=4, upscale=2, mlp_ratio=1.0
    )
    torch.manual_seed(0)
    Swin2SRForImageSuperResolution(config).save_pretrained(folder)
    Swin2SRImageProcessorPil(size_divisor=4).save_pretrained(folder)
    return folder


def test_sample_returns_nearest_neighbour_enlargements_beside_the_originals(model, processor):
    images, big = sample(model, 2, processor=processor, seed=0, progress=False, upscale=4)
    assert [image.size for image in images] == [(N_PX, N_PX)] * 2 and [image.size for image in big] == [(32, 32)] * 2
    for image, enlarged in zip(images, big):
        pixels = np.asarray(enlarged)
        assert np.array_equal(pixels[::4, ::4], np.asarray(image))  # each pixel became a 4x4 block
        assert np.array_equal(pixels[3::4, 3::4], np.asarray(image))
    again = sample(model, 2, processor=processor, seed=0, progress=False)
    assert [np.asarray(a).tolist() for a in again] == [np.asarray(a).tolist() for a in images]


def test_complete_upscales_with_a_super_resolution_model(model, processor, swin2sr):
    from transformers import AutoImageProcessor, AutoModelForImageToImage

    start = sample(model, 1, processor=processor, seed=1, progress=False)
    images, big = complete(
        model, start, processor=processor, num_completions=2, seed=0, progress=False, upscale=swin2sr
    )
    assert len(images) == len(big) == 2 and all(image.size == (2 * N_PX, 2 * N_PX) for image in big)
    # The same as running the model by hand on each image.
    sr, sr_processor = (
        AutoModelForImageToImage.from_pretrained(swin2sr).eval(),
        AutoImageProcessor.from_pretrained(swin2sr),
    )
    with torch.no_grad():
        expected = sr(**sr_processor(images[0], return_tensors="pt")).reconstruction[0, :, : 2 * N_PX, : 2 * N_PX]
    expected = (expected.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(big[0]), expected)
    assert not np.array_equal(np.asarray(big[0]), np.asarray(images[0].resize((16, 16), PIL.Image.NEAREST)))
    # A loaded model works as well as its folder.
    assert np.array_equal(np.asarray(upscale_images(images[:1], sr)[0]), expected)
    # Images of different sizes in one call: each is enlarged as it would be alone.
    mixed = [images[0], images[1].resize((12, 4))]
    big = upscale_images(mixed, swin2sr, batch_size=2)
    assert [image.size for image in big] == [(16, 16), (24, 8)]
    assert np.array_equal(np.asarray(big[0]), expected)
    assert np.array_equal(np.asarray(big[1]), np.asarray(upscale_images(mixed[1:], swin2sr)[0]))


@pytest.mark.parametrize("convert", [lambda x: x.int(), lambda x: x.short(), lambda x: x.numpy(), lambda x: x[0]])
def test_complete_takes_ids_of_any_integer_dtype_as_ids(model, convert):
    ids = sample(model, 2, seed=3, output_type="ids", progress=False)
    expected = complete(model, ids[:1] if convert(ids).ndim == 1 else ids, seed=5, output_type="ids", progress=False)
    got = complete(model, convert(ids), seed=5, output_type="ids", progress=False)
    assert torch.equal(got, expected) and got.shape[0] == expected.shape[0]
