"""What the benchmark scripts share: timing side by side, the machine and its load, markdown tables, transformers'
ImageGPT on our weights, and writing a script's own `## ` section of benchmarks/RESULTS.md (keeping the others)."""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from image_gpt_hf.safe_io import atomic_file  # noqa: E402
from image_gpt_hf.transformers_compat import builtin_imagegpt  # noqa: E402


class Timing(NamedTuple):
    seconds: dict[str, float]  # per call: the median (or `pick`) of its timed repeats
    outputs: dict[str, object]  # per call: what its last call returned
    load: tuple[float, float]  # 1-minute load average before and after the timed repeats


def alternate(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, pick=statistics.median, sync=None
):
    """Times each call `repeats` times after `warmup` untimed calls, the repeats alternating between the calls round
    by round, so that a change in the machine's load falls on all of them alike."""
    outputs = {name: call() for _ in range(warmup) for name, call in calls.items()}
    times, before = {name: [] for name in calls}, os.getloadavg()[0]
    for _ in range(repeats):
        for name, call in calls.items():
            gc.collect()
            sync and sync()
            start = time.perf_counter()
            outputs[name] = call()
            sync and sync()
            times[name].append(time.perf_counter() - start)
    return Timing({name: pick(t) for name, t in times.items()}, outputs, (before, os.getloadavg()[0]))


def load(pair: tuple[float, float]) -> str:
    """A figure's load cell: the 1-minute load average before and after its timed calls."""
    return f"{pair[0]:.1f} / {pair[1]:.1f}"


def load_note(start: float) -> str:
    """The load at a run's start, marked "under load" from 1 (another job had a core's worth of work)."""
    under = " (**under load**: another job had a core's worth of work; absolute rates are low and noisy)"
    return f"1-minute load average {start:.1f} at the start{under if start >= 1 else ''}"


LOAD_NOTE = "load: the 1-minute load average before / after the figure's timed calls."


def machine(*more: str) -> str:
    return ", ".join(
        [
            f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
            *more,
        ]
    )


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            return re.findall(r"^model name\s*:\s*(.+)$", info.read(), flags=re.MULTILINE)[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine() or "unknown CPU"


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def transformers_twin(ours: torch.nn.Module) -> torch.nn.Module:
    """transformers' ImageGPTForCausalImageModeling of `ours`' config, carrying its weights, on its device and mode."""
    modeling, configuration = builtin_imagegpt("modeling_imagegpt"), builtin_imagegpt("configuration_imagegpt")
    if modeling is None or configuration is None:  # every figure of the caller is a comparison with it
        raise SystemExit(f"transformers {transformers.__version__} has no built-in ImageGPT to compare with: skipped.")
    fields = configuration.ImageGPTConfig().to_dict()
    config = configuration.ImageGPTConfig(**{k: v for k, v in ours.config.to_dict().items() if k in fields})
    theirs = modeling.ImageGPTForCausalImageModeling(config)
    missing = theirs.load_state_dict(ours.state_dict(), strict=False).missing_keys
    assert not missing, missing  # unexpected keys are only transformers 4's mask buffers
    return theirs.to(ours.device).train(ours.training)


def replace_section(path: Path, heading: str, text: str, preamble: str | None = None, arg="--update_results") -> None:
    """Put `text` under `heading` in `path` (appended where the heading is new), and `preamble` (if given) before the
    first section, written atomically (`arg`: the flag that named `path`, for errors)."""
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    if preamble is not None:
        first = re.search("^## ", content, flags=re.MULTILINE)
        content = preamble.strip() + "\n\n" + (content[first.start() :] if first else "")
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", flags=re.MULTILINE | re.DOTALL)
    section = f"{heading}\n\n{text.strip()}\n\n"
    content = (
        pattern.sub(lambda _: section, content) if pattern.search(content) else f"{content.rstrip()}\n\n{section}"
    )
    with atomic_file(path, overwrite=True, arg=arg) as staged:
        staged.write_text(content.rstrip() + "\n")
