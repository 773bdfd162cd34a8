"""Nearest palette color: the id transformers' ImageGPT processor gives each pixel, computed many times faster; and
what a palette must be (`validate_palette`).

The reference is transformers' `ImageGPTImageProcessorPil`: float32 pixels, a float64 palette, the squared distance
written `|x|^2 - 2 x.c + |c|^2` in numpy, and the first minimum. `color_quantize` gives the same ids, ties included,
with three tricks, each there for a reason:

- float64 ranking by `|c|^2 - 2 x.c`. The pixel's own `|x|^2` is the same for every center, so dropping it leaves
  one fused matrix product per chunk (`addmm`). In float64 its rounding errors (~1e-15 relative) are far below any
  real gap between two centers, so the order is the true order except for near-ties.
- near-ties re-ranked with the reference arithmetic. Where the second-best center is within 1e-9 (relative) of the
  best, the order could depend on how the sum was rounded, so those pixels (a handful, if any) are ranked again by
  `_reference_nearest`, which repeats transformers' numpy arithmetic operation for operation. That settles rounding
  ties the way transformers does, and exact ties (duplicate centers, pixels halfway between two) go to the lowest id.
- a pruning grid. A 16 x 16 x 16 grid over [-1, 1]^3 (where normalized pixels live) lists, per cell, the centers that
  can be nearest to some point of the cell: a center is kept if its smallest distance to the cell is at most the
  smallest largest-distance of any center (plus the tie tolerance, so near-ties are still seen). For a spread-out
  512-color palette that is about 10 candidates instead of 512; the table is built once per palette and cached. Lists
  are padded to a multiple of four, so a batch's pixels fall into a handful of groups, each searched in a few large
  tensor operations (many small ones are slow, and very slow on a busy machine with several torch threads). Pixels
  outside the cube (other normalizations) search every center.

Chunking bounds memory: each chunk's distance matrix holds about 2**18 entries on CPU (cache-sized), 2**26 on
accelerators. MPS has no float64, so the search runs on the CPU there.

This file is shipped as remote code next to `image_processing_imagegpt.py`: it imports only numpy and torch.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

# Distances closer than this (relative) are re-ranked with the reference arithmetic.
TIE_TOLERANCE = 1e-9
# Entries of one chunk's distance matrix.
CPU_CHUNK = 1 << 18
ACCELERATOR_CHUNK = 1 << 26
# Cells per axis of the pruning grid, and the (pixels x colors) work from which building it pays.
GRID = 16
PRUNE_MIN_WORK = 1 << 23


def color_quantize(
    pixels: torch.Tensor,
    clusters: torch.Tensor | np.ndarray,
    chunk_size: int | None = None,
    prune: bool | None = None,
) -> torch.Tensor:
    """Id of the nearest palette color of every pixel: `(N, 3)` pixels, `(K, 3)` palette -> `(N,)` int64.

    Args:
        pixels: pixel values, normalized like the palette (the processor's are float32), on any device.
        clusters: the palette.
        chunk_size: pixels per chunk; by default the chunk's distance matrix holds about 2**18 entries on CPU and
            2**26 on accelerators.
        prune: search only each pixel's grid-cell candidates (exact). `None` prunes palettes of 64+ colors on CPU
            when there are enough pixels to repay building the grid.

    The ids are those of transformers' `ImageGPTImageProcessorPil` (see the module docstring for how).
    """
    device = torch.device("cpu") if pixels.device.type == "mps" else pixels.device
    pixels = pixels.to(device=device, dtype=torch.float32)
    palette = torch.as_tensor(clusters, dtype=torch.float64).to(device)
    num_pixels, num_colors = pixels.shape[0], palette.shape[0]
    if prune is None:
        prune = device.type == "cpu" and num_colors >= 64 and num_pixels * num_colors >= PRUNE_MIN_WORK

    x = pixels.to(torch.float64)
    center_norms = (palette * palette).sum(dim=1)  # (K,)
    # How close two distances must be for rounding to possibly order them differently than the reference does.
    tolerance = TIE_TOLERANCE * (1.0 + (x * x).sum(dim=1) + center_norms.max())  # (N,)
    ids = torch.empty(num_pixels, dtype=torch.long, device=device)
    near_tie = torch.zeros(num_pixels, dtype=torch.bool, device=device)
    rows = None
    if prune:
        in_cube = (x.abs() <= 1.0).all(dim=1)
        _search_grid(x, torch.nonzero(in_cube).squeeze(1), palette, center_norms, tolerance, chunk_size, ids, near_tie)
        rows = torch.nonzero(~in_cube).squeeze(1)
    _search_all(x, rows, palette, center_norms, tolerance, chunk_size, ids, near_tie)

    rows = torch.nonzero(near_tie).squeeze(1)
    if len(rows):
        exact = _reference_nearest(pixels[rows].cpu().numpy(), palette.cpu().numpy())
        ids[rows] = torch.from_numpy(exact).to(device)
    return ids


def validate_palette(clusters: Any) -> np.ndarray:
    """The palette as a `(K, 3)` float64 array in [-1, 1], or a ValueError that says what is wrong with it (numpy's own
    errors for what is not an array of numbers)."""
    raw = np.asarray(clusters.detach().cpu() if isinstance(clusters, torch.Tensor) else clusters)
    palette = raw.astype(np.float64) if raw.dtype.kind in "fiu" else np.full((0, 0), np.nan)  # complex: not colors
    if palette.ndim != 2 or palette.shape[1:] != (3,) or not len(palette) or not (abs(palette) <= 1).all():
        values = f"values in [{palette.min():g}, {palette.max():g}]" if palette.size else f"{raw.dtype} values"
        raise ValueError(f"The palette (`clusters`) must be (num_colors, 3) real numbers in [-1, 1] (the range pixels "
                         f"are scaled to), got shape {raw.shape} with {values}.")  # fmt: skip
    return palette


def _reference_nearest(pixels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Nearest-center ids with the very arithmetic of transformers' `ImageGPTImageProcessorPil`.

    float32 pixels, float64 palette, `|x|^2 - 2 x.c + |c|^2` with the squared norms summed by numpy and the dot
    products by numpy's BLAS, first minimum.
    """
    if len(pixels) == 1:  # a 1-row matmul takes BLAS' gemv path, whose rounding differs from the gemm path
        return _reference_nearest(np.concatenate([pixels, pixels]), clusters)[:1]
    centers_t = clusters.T
    pixel_norms = np.sum(np.square(pixels), axis=1)
    center_norms = np.sum(np.square(centers_t), axis=0)
    distances = pixel_norms[:, None] - 2 * np.matmul(pixels, centers_t) + center_norms[None, :]
    return np.argmin(distances, axis=1)


def _default_chunk(device: torch.device, width: int) -> int:
    return max(1, (CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK) // width)


def _search_all(
    x: torch.Tensor,
    rows: torch.Tensor | None,
    palette: torch.Tensor,
    center_norms: torch.Tensor,
    tolerance: torch.Tensor,
    chunk_size: int | None,
    ids: torch.Tensor,
    near_tie: torch.Tensor,
) -> None:
    """Nearest center of `x[rows]` (all rows if None) among all centers; fills `ids` and `near_tie`."""
    num_rows = len(x) if rows is None else len(rows)
    num_colors = len(palette)
    step = chunk_size or _default_chunk(x.device, num_colors)
    centers_t = palette.T.contiguous()  # (3, K)
    for start in range(0, num_rows, step):
        index = slice(start, min(start + step, num_rows)) if rows is None else rows[start : start + step]
        distances = torch.addmm(center_norms, x[index], centers_t, alpha=-2)  # (n, K): |c|^2 - 2 x.c
        best_distance, best = distances.min(dim=1)
        ids[index] = best
        if num_colors > 1:
            distances.scatter_(1, best[:, None], float("inf"))
            near_tie[index] = distances.amin(dim=1) <= best_distance + tolerance[index]


def _search_grid(
    x: torch.Tensor,
    rows: torch.Tensor,
    palette: torch.Tensor,
    center_norms: torch.Tensor,
    tolerance: torch.Tensor,
    chunk_size: int | None,
    ids: torch.Tensor,
    near_tie: torch.Tensor,
) -> None:
    """Nearest center of `x[rows]` (all in [-1, 1]^3) among the candidates of their grid cell."""
    if len(rows) == 0:
        return
    table, counts = _candidate_table(palette.cpu().numpy().tobytes(), len(palette), str(palette.device))
    # Padding ids point at a center infinitely far away, so they never win.
    palette = torch.cat([palette, palette.new_zeros(1, 3)])
    center_norms = torch.cat([center_norms, center_norms.new_full((1,), float("inf"))])
    # Pixels sorted by the width of their cell's candidate list, so that each chunk has one width; they are gathered
    # once in that order and the results scattered back once (indexing in the loop is slow).
    cells = ((x.index_select(0, rows) + 1.0) * (GRID / 2)).floor_().clamp_(0, GRID - 1).long()  # exact in binary
    cells = (cells[:, 0] * GRID + cells[:, 1]) * GRID + cells[:, 2]
    order = torch.argsort(counts.index_select(0, cells))
    rows, cells = rows.index_select(0, order), cells.index_select(0, order)
    x_rows, x_tolerance = x.index_select(0, rows), tolerance.index_select(0, rows)
    found = torch.empty(len(rows), dtype=torch.long, device=ids.device)
    tied = torch.zeros(len(rows), dtype=torch.bool, device=ids.device)
    widths, sizes = torch.unique_consecutive(counts.index_select(0, cells), return_counts=True)
    group_start = 0
    for width, size in zip(widths.tolist(), sizes.tolist()):
        step = chunk_size or _default_chunk(x.device, width)
        for start in range(group_start, group_start + size, step):
            stop = min(start + step, group_start + size)
            candidates = table[:, :width].index_select(0, cells[start:stop])  # (n, m) ids, ascending
            flat = candidates.reshape(-1)
            distances = torch.baddbmm(
                center_norms.index_select(0, flat).view(-1, width, 1),
                palette.index_select(0, flat).view(-1, width, 3),
                x_rows[start:stop].unsqueeze(-1),
                alpha=-2,
            ).squeeze(-1)  # (n, m): |c|^2 - 2 x.c
            best_distance, best = distances.min(dim=1)
            found[start:stop] = candidates.gather(1, best[:, None]).squeeze(1)
            if width > 1:
                distances.scatter_(1, best[:, None], float("inf"))
                tied[start:stop] = distances.amin(dim=1) <= best_distance + x_tolerance[start:stop]
        group_start += size
    ids.index_copy_(0, rows, found)
    near_tie.index_copy_(0, rows, tied)


@functools.lru_cache(maxsize=8)
def _candidate_table(palette_bytes: bytes, num_colors: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of the `GRID`^3 grid over [-1, 1]^3, the centers that can be nearest to a point of the cell.

    Returns `(cells, width)` ids (ascending, padded with `num_colors`) and each cell's width: its number of candidates
    rounded up to a multiple of four (from three on), so that a batch's pixels fall into a few groups of one width (a
    few large tensor operations rather than one small group per count). Centers within the tie tolerance of the bound
    are kept, so near-ties are still seen and re-ranked.
    """
    palette = torch.from_numpy(np.frombuffer(palette_bytes, dtype=np.float64).reshape(num_colors, 3).copy())
    low = torch.arange(GRID, dtype=torch.float64) * (2 / GRID) - 1.0  # cell edges, exact in binary
    high = low + 2 / GRID
    nearest, farthest = [], []
    for axis in range(3):  # per axis, (G, K) squared distances from each cell's interval to each center
        c = palette[:, axis][None, :]
        nearest.append(torch.clamp(torch.maximum(low[:, None] - c, c - high[:, None]), min=0) ** 2)
        farthest.append(torch.maximum((c - low[:, None]) ** 2, (c - high[:, None]) ** 2))
    members = torch.empty(GRID**3, num_colors, dtype=torch.bool)
    slack = TIE_TOLERANCE * (4.0 + (palette * palette).sum(dim=1).max()) + 1e-12
    for r in range(GRID):  # one slab of cells at a time bounds the memory
        near = nearest[0][r] + nearest[1][:, None, :] + nearest[2][None, :, :]  # (G, G, K)
        far = farthest[0][r] + farthest[1][:, None, :] + farthest[2][None, :, :]
        keep = near <= far.amin(dim=-1, keepdim=True) + slack
        members[r * GRID**2 : (r + 1) * GRID**2] = keep.reshape(-1, num_colors)
    counts = members.sum(dim=1)
    widths = torch.where(counts <= 2, counts, (counts + 3) // 4 * 4)
    width = int(widths.max())
    # Candidate ids in ascending order, then padding: sort "not a member" (False first) stably.
    order = torch.argsort((~members).to(torch.uint8), dim=1, stable=True)[:, :width]
    table = torch.full((GRID**3, width), num_colors)
    table[:, : order.shape[1]] = torch.where(torch.arange(order.shape[1]) < counts[:, None], order, num_colors)
    return table.to(device), widths.to(device)


__all__ = ["color_quantize", "validate_palette"]
