"""Shared fixtures. Tests build tiny random models and read real images that ship inside installed packages."""

import os
from pathlib import Path

import pytest
import torch

# Nothing in the test suite may reach the network: every Hub path is exercised on files the tests make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tiny model every test file builds on (`from conftest import TINY_DIMS`), varied per file where a test needs it:
# a 16-color palette + SOS, 8x8 images, head_dim 8 (not a perfect square, so parity tests see the exact attention
# scale).
TINY_DIMS = {"vocab_size": 17, "n_positions": 64, "n_embd": 32, "n_layer": 3, "n_head": 4}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def attention_calls():
    """`attention_calls(name)`: count the calls of the attention function registered under `name` with transformers'
    `AttentionInterface` (the registration is restored afterwards)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    restore, counts = {}, {}

    def count(name: str) -> dict:
        original = ALL_ATTENTION_FUNCTIONS[name]
        restore[name] = original
        counts[name] = 0

        def counted(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        AttentionInterface.register(name, counted)
        return counts

    yield count
    for name, original in restore.items():
        AttentionInterface.register(name, original)


@pytest.fixture
def arena(tmp_path):
    """`(user, outside)`: `user/` holds user files, an input file, an input folder and planted links to
    `outside/secret` and `outside/`; what a command that writes must leave byte-identical (see `snapshot`)."""
    user, outside = tmp_path / "user", tmp_path / "outside"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "todo.txt").write_bytes(b"mine\x00\xff")
    (user / "input.bin").write_bytes(b"input")
    (user / "images").mkdir()
    (user / "images" / "a.png").write_bytes(b"not really a png")
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (user / "link").symlink_to(outside / "secret")
    (user / "linkdir").symlink_to(outside, target_is_directory=True)
    return user, outside


def snapshot(root: Path) -> dict[str, object]:
    """Every entry below `root`: file bytes, link targets, folders; what a refused or finished command must keep."""
    entries: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = path.read_bytes()
    return entries
