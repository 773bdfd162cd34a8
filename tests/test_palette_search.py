"""palette_search.color_quantize: the nearest palette color, with the ids (ties included) of transformers' arithmetic.

The reference is transformers' own `color_quantize` (numpy: float32 pixels, float64 palette,
`|x|^2 - 2 x.c + |c|^2`, first minimum), called on the same pixels.
"""

import numpy as np
import pytest
import torch
from conftest import builtin

from image_gpt_hf.palette_search import color_quantize

transformers_color_quantize = builtin("image_processing_pil_imagegpt").color_quantize

# The float32 value of each 8-bit level after transformers' rescale and normalize (x / 255, then (x - 0.5) / 0.5).
LEVELS = ((np.arange(256) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)


def reference(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return transformers_color_quantize(pixels.astype(np.float32), palette)


def palette_of(kind: str, rng: np.random.Generator) -> np.ndarray:
    return {
        "uniform": lambda: rng.uniform(-1, 1, (512, 3)),
        "clustered": lambda: np.clip(rng.normal(0, 0.25, (512, 3)), -1, 1),
        "duplicated": lambda: np.repeat(rng.uniform(-1, 1, (128, 3)), 4, axis=0),
        "8-bit colors": lambda: LEVELS[rng.integers(0, 256, (512, 3))].astype(np.float64),
        "gray ramp": lambda: np.repeat(np.linspace(-1, 1, 100)[:, None], 3, axis=1),
        "two colors": lambda: rng.uniform(-1, 1, (2, 3)),
        "three colors": lambda: np.array([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    }[kind]()


@pytest.mark.parametrize(
    "kind", ["uniform", "clustered", "duplicated", "8-bit colors", "gray ramp", "two colors", "three colors"]
)
def test_ids_equal_transformers_pruned_or_not(kind):
    rng = np.random.default_rng(4)
    palette = palette_of(kind, rng)
    # 8-bit pixel values (many exactly on centers for "8-bit colors"), values off the 8-bit grid, the corners and
    # faces of the cube (grid-cell edges), and pixels outside it (another normalization), which the grid cannot hold.
    pixels = np.concatenate(
        [
            LEVELS[rng.integers(0, 256, (6000, 3))],
            rng.uniform(-1, 1, (1000, 3)).astype(np.float32),
            np.array([[1, 1, 1], [-1, -1, -1], [1, -1, 0.5], [0.125, -0.875, 0]], dtype=np.float32),
            rng.uniform(-1.3, 1.3, (200, 3)).astype(np.float32),
        ]
    )
    expected = reference(pixels, palette)
    x = torch.from_numpy(pixels)
    np.testing.assert_array_equal(color_quantize(x, palette, prune=True).numpy(), expected)
    np.testing.assert_array_equal(color_quantize(x, palette, prune=False).numpy(), expected)
    np.testing.assert_array_equal(color_quantize(x[:100], palette, chunk_size=3, prune=True).numpy(), expected[:100])


def test_ids_are_the_nearest_center_and_do_not_depend_on_chunks():
    rng = np.random.default_rng(2)
    palette = rng.uniform(-1, 1, size=(512, 3))
    pixels = torch.from_numpy(rng.uniform(-1.2, 1.2, size=(3000, 3)).astype(np.float32))
    expected = np.linalg.norm(pixels.double().numpy()[:, None] - palette[None], axis=-1).argmin(axis=1)
    for chunk_size in (7, 1000, None):
        np.testing.assert_array_equal(color_quantize(pixels, palette, chunk_size).numpy(), expected)
    np.testing.assert_array_equal(color_quantize(pixels[:100], palette, 1).numpy(), expected[:100])
    ids = color_quantize(pixels, torch.from_numpy(palette))  # a tensor palette is the same palette
    assert ids.dtype == torch.int64 and ids.shape == (3000,)
    np.testing.assert_array_equal(ids.numpy(), expected)


def test_ties_go_the_way_transformers_breaks_them():
    rng = np.random.default_rng(0)
    # 60 pixels, each exactly halfway between two centers in real arithmetic (p +- delta * u, u a random direction),
    # so rounding alone picks the winner: a float64 search alone sends about a third of them the other way.
    pixels = LEVELS[rng.integers(20, 236, size=(60, 3))]
    offsets = rng.normal(size=(60, 3))
    offsets *= rng.uniform(0.01, 0.05, size=(60, 1)) / np.linalg.norm(offsets, axis=1, keepdims=True)
    centers = pixels.astype(np.float64)
    palette = np.concatenate([centers + offsets, centers - offsets, centers[:4] + offsets[:4]])  # and duplicates
    x = torch.from_numpy(pixels)
    for prune in (True, False):
        np.testing.assert_array_equal(color_quantize(x, palette, prune=prune).numpy(), reference(pixels, palette))
    # A single pixel too (numpy takes another BLAS path for one row, with other rounding).
    for row in range(5):
        assert color_quantize(x[row : row + 1], palette).item() == reference(pixels[row : row + 1], palette)[0]
    # Exact ties go to the lowest id, as numpy's argmin does.
    duplicated = np.array([[0.9, 0.9, 0.9]] + [[0.25, -0.5, 0.125]] * 3)
    assert color_quantize(torch.tensor([[0.25, -0.5, 0.125]]), duplicated).item() == 1


def test_any_float_dtype_and_an_empty_batch():
    palette = np.random.default_rng(5).uniform(-1, 1, (64, 3))
    pixels = LEVELS[np.random.default_rng(6).integers(0, 256, (500, 3))]
    expected = reference(pixels, palette)
    for dtype in (torch.float32, torch.float64):
        np.testing.assert_array_equal(color_quantize(torch.from_numpy(pixels).to(dtype), palette).numpy(), expected)
    assert color_quantize(torch.empty(0, 3), palette).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu_the_ids_are_the_same_and_stay_there():
    rng = np.random.default_rng(3)
    palette = palette_of("8-bit colors", rng)
    pixels = torch.from_numpy(LEVELS[rng.integers(0, 256, (20000, 3))])
    ids = color_quantize(pixels.cuda(), palette)
    assert ids.device.type == "cuda"
    np.testing.assert_array_equal(ids.cpu().numpy(), reference(pixels.numpy(), palette))
    np.testing.assert_array_equal(color_quantize(pixels.cuda(), palette, prune=True).cpu().numpy(), ids.cpu().numpy())
