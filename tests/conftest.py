"""Shared fixtures. Tests build tiny random models and read real images that ship inside installed packages."""

import contextlib
import io
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from image_gpt_hf.transformers_compat import builtin_imagegpt

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

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


def builtin(module: str = "modeling_imagegpt"):
    """transformers' own ImageGPT `module` (image_gpt_hf.transformers_compat.builtin_imagegpt); the calling test (or,
    at import, the whole file) skips with the reason where the installed release no longer has it."""
    found = builtin_imagegpt(module)
    if found is None:
        pytest.skip(f"this transformers release has no built-in ImageGPT {module}", allow_module_level=True)
    return found


# Running what users run: the example scripts, `accelerate launch`, and Python without this package.


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a script run: offline, one thread, repeatable arithmetic, CPU only."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        # MKL's results may depend on memory alignment; this makes a run's arithmetic repeatable bit for bit.
        MKL_CBWR="AUTO,STRICT",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",  # CPU runs, also on a machine with GPUs
    )
    return env | extra


def run_script(script: str, *args: str, timeout: int = 300, check: bool = True, env=None, **options) -> str:
    """Runs `python examples/<script> args...`; returns its output (stdout + stderr), failing with it when its exit
    status is not what `check` expects (0, or anything else)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env or script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **options,
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == check, f"{script} exited with {result.returncode}:\n{output[-6000:]}"
    return output


def run_in_process(script: str, *args: str) -> None:
    """Runs `python examples/<script> args...` in this process (as python runs it, with examples/ on the path)."""
    argv, path, sys.argv = sys.argv, list(sys.path), [str(EXAMPLES / script), *args]
    sys.path.insert(0, str(EXAMPLES))  # runpy does not, python does: the scripts import their neighbours
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path


def refusal(script: str, *args: str) -> str:
    """Runs `python examples/<script> args...` in this process, expecting it to stop with an error; returns the error
    (argparse's usage errors included)."""
    stderr = io.StringIO()
    with pytest.raises((ValueError, OSError, SystemExit)) as error, contextlib.redirect_stderr(stderr):
        run_in_process(script, *args)
    return f"{error.value} {stderr.getvalue()}"


def launch_command(config: str, script: str, *args: str, num_processes: int | None = None) -> list[str]:
    """`accelerate launch --config_file examples/accelerate_configs/<config> examples/<script> args...`."""
    launcher = ["--config_file", str(EXAMPLES / "accelerate_configs" / config)]
    launcher += ["--num_processes", str(num_processes)] if num_processes else []
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(EXAMPLES / script), *args]


def launch(config: str, script: str, *args: str, timeout: int = 300, env=None, **options) -> str:
    """Runs `launch_command(config, script, *args, num_processes=...)`; returns its output, failing on an error."""
    command = launch_command(config, script, *args, **options)
    result = subprocess.run(command, env=env or script_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"accelerate launch {script} failed:\n{output[-6000:]}"
    return output


WITHOUT_THE_PACKAGE = """\
import sys
sys.modules["image_gpt_hf"] = None  # importing the package is impossible in this process
try:
    import image_gpt_hf
except ImportError:
    pass
else:
    raise SystemExit("image_gpt_hf was importable")
"""


def run_without_package(code: str, *args: str, cwd: Path, timeout: int = 600, **env: str) -> str:
    """Runs `code` (dedented) in a fresh Python that cannot import image_gpt_hf, as a user without the package: offline,
    remote code cached under `cwd`, no terminal to answer a prompt. Fails with its stderr unless it exits 0; returns
    its stdout."""
    env = {**os.environ, "HF_MODULES_CACHE": str(Path(cwd, "modules")), "HF_HUB_OFFLINE": "1", **env}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_PACKAGE + textwrap.dedent(code), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
