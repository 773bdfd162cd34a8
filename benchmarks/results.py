"""What the benchmark scripts share: writing benchmarks/RESULTS.md (a script replaces its own section, by its `## `
heading, and keeps the others) and naming the CPU they ran on."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from image_gpt_hf.safe_io import atomic_file


def replace_section(path: Path, heading: str, text: str) -> None:
    """Put `text` under `heading` in `path` (appended when the heading is new), written atomically."""
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", flags=re.MULTILINE | re.DOTALL)
    section = f"{heading}\n\n{text.strip()}\n\n"
    if pattern.search(content):
        content = pattern.sub(lambda _: section, content)
    else:
        content = content.rstrip() + f"\n\n{section}"
    with atomic_file(path, overwrite=True, arg="--update_results") as staged:
        staged.write_text(content.rstrip() + "\n")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            names = re.findall(r"^model name\s*:\s*(.+)$", info.read(), flags=re.MULTILINE)
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
