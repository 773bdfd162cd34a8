"""Shared fixtures. Tests build tiny random models and read real images that ship inside installed packages."""

import os

import pytest
import torch

# Nothing in the test suite may reach the network: every Hub path is exercised on files the tests make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
