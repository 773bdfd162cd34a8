"""How every command of this project writes its output: refuse early, stage, rename into place, clean up.

The rule, for the converters, `igpt-fit-palette`, `write_model_card` and the example scripts:

- Nothing the user made is deleted or overwritten unless the command was told to (`--overwrite`): a non-empty
  output folder or an existing output file is refused, before any expensive work.
- A command never writes into or deletes its own inputs: an output that is, holds or lies inside an input file or
  folder is refused whatever `--overwrite` says, with a message naming both paths.
- An output path that is a symbolic link is refused (the command would otherwise write wherever it points); links
  inside a folder being replaced are removed as links, never followed. So is an output folder that is or holds the
  current working folder.
- Output is staged in a hidden sibling of the target (`.NAME.tmp-HOST-PID-TOKEN`) and renamed into place only when it
  is complete: a failure or Ctrl-C removes the staging, a killed process leaves it behind, and the next command that
  writes the same target removes it (only once the process that made it is gone). Staging is created with the modes
  the user's umask gives (no private 0600 / 0700 files).

A command calls `check_output_path` right after parsing its arguments, so that a bad output path fails in a second,
not after an hour of work, then writes through `staged_dir` (a folder) or `atomic_file` (one file):

    from image_gpt_hf.safe_io import OutputPathError, atomic_file, check_output_path, staged_dir

    try:
        check_output_path(args.output_dir, inputs=[args.model_name_or_path], overwrite=args.overwrite)
    except OutputPathError as err:
        raise SystemExit(f"my-command: {err}")
    model = expensive_work()
    with staged_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)  # every file goes into `tmp`; `args.output_dir` appears complete, or not at all

    # One file (checked first with `check_output_path(path, kind="file", ...)`):
    with atomic_file(args.output_file, overwrite=args.overwrite) as tmp:
        grid.save(tmp)  # `tmp` keeps the suffix (.png), so libraries that infer the format from it still work

A folder that also holds the command's own entries from earlier in the same run (a training script's `checkpoints/`
or tracker logs) names them in `keep`: they are not user content (no `--overwrite` needed for them alone), and they
stay in place while the rest of the folder is replaced. The folder itself cannot then be swapped in one rename: its
old entries are moved out first, then the new ones in, so a process killed in between leaves missing files (a loud
error when loading), never a mix of old and new files, and the kept entries never move.

Processes that share a staging folder (several `accelerate` workers) agree on it with `staging_path`, chosen by the
main process and broadcast, and pass it to `staged_dir(..., staging=...)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = [
    "OutputPathError",
    "atomic_file",
    "check_output_path",
    "clean_stale_staging",
    "staged_dir",
    "staging_path",
]

PathLike = str | os.PathLike

_STAGING_NAME = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})(?P<suffix>\.[^.]*)?"
)


class OutputPathError(ValueError):
    """An output path a command must not write to; the message names the path, the argument and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Checking an output path
# ---------------------------------------------------------------------------------------------------------------------


def _absolute(path: PathLike) -> Path:
    """The absolute path, `..` removed, its parent's links resolved but not a link at the path itself."""
    path = Path(os.path.abspath(os.fspath(path)))
    if path.parent == path:  # the file system root
        return path
    return Path(os.path.realpath(path.parent)) / path.name


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _relation(output: Path, input_: Path) -> str | None:
    """How `output` relates to the existing `input_`: "is", "is inside" or "contains" (links followed), or None."""
    input_id = _identity(input_)
    if input_id is None:
        return None
    output_chain = [output, *output.parents]
    if _identity(output) == input_id:
        return "is"
    if any(_identity(p) == input_id for p in output_chain[1:]):
        return "is inside"
    output_id = _identity(output)
    if output_id is not None:
        input_parents = {*input_.parents, *Path(os.path.realpath(input_)).parents}
        if any(_identity(p) == output_id for p in input_parents):
            return "contains"
    return None


def _listing(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:5])
    return shown + (f", ... ({len(entries)} in all)" if len(entries) > 5 else "")


def check_output_path(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    kind: Literal["dir", "file"] = "dir",
    keep: Iterable[str] = (),
    arg: str = "--output_dir",
    overwrite_arg: str = "--overwrite",
) -> Path:
    """Refuse an output path a command must not write to; call it before any expensive work.

    Args:
        path: the output folder (`kind="dir"`) or file (`kind="file"`); it may not exist yet.
        inputs: the files and folders the command reads (None entries and paths that do not exist are skipped).
            The output may not be one of them, lie inside one, or contain one, whatever `overwrite` says.
        overwrite: whether an existing non-empty folder (or an existing file) may be replaced.
        keep: names of entries of the output folder that the command itself made earlier (a training script's
            `checkpoints`); they do not count as user content.
        arg, overwrite_arg: how the messages name the output argument and the overwrite switch.

    Returns:
        The absolute output path.

    Raises:
        OutputPathError: naming the path, the argument and the fix.
    """
    output = _absolute(path)
    # What a killed run left first: a folder it had moved aside comes back, so the checks below see it.
    clean_stale_staging(output.parent, output.name)

    def refuse(problem: str) -> None:
        raise OutputPathError(f"{arg} {output} {problem}.")

    if os.path.islink(output):
        refuse(f"is a symbolic link (to {os.readlink(output)}); pass its target itself as {arg}, or remove the link")
    for input_ in (i for i in inputs if i is not None):
        if relation := _relation(output, Path(os.path.abspath(os.fspath(input_)))):
            refuse(f"{relation} the input {input_}: an input is never written, whatever {overwrite_arg} says")
    if os.path.lexists(output) and (kind == "dir") != output.is_dir():
        refuse("exists and is not a folder" if kind == "dir" else "is a folder; give a file path")
    entries = [e for e in os.listdir(output) if e not in set(keep)] if kind == "dir" and output.is_dir() else []
    if (entries or kind == "file" and output.exists()) and not overwrite:
        held = f"exists and is not empty (it holds {_listing(entries)})" if entries else "exists"
        kept = f" but {_listing(list(keep))}" if keep else ""
        refuse(f"{held}. Choose another path, or pass {overwrite_arg} to replace it (all of it{kept})")
    if kind == "dir" and _identity(output) in {_identity(p) for p in [Path.cwd(), *Path.cwd().parents]}:
        refuse(f"is or holds the current working folder {Path.cwd()}; it is never replaced. Choose another folder")
    existing = next((p for p in output.parents if os.path.lexists(p)), output)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        refuse(f"cannot be created: {existing} is not a folder you may write in")
    return output


# ---------------------------------------------------------------------------------------------------------------------
# Staging and stale staging
# ---------------------------------------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def staging_path(target: PathLike) -> Path:
    """A fresh hidden sibling of `target` to stage it in (not created): `.NAME.tmp-HOST-PID-TOKEN[.SUFFIX]`.

    The name says which process made it, so that `clean_stale_staging` removes it only once that process is gone.
    It keeps the target's suffix (`.png`, `.npy`), since some writers infer the format from it or append their own.
    """
    return _sibling(_absolute(target), "tmp")


def _sibling(target: Path, kind: Literal["tmp", "old"]) -> Path:
    suffix = target.suffix if kind == "tmp" else ""
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # no safe liveness probe without extra dependencies: never treat a process as gone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists under another user (EPERM), or the probe is refused: assume it lives
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clean_stale_staging(parent: PathLike, name: str | None = None) -> list[Path]:
    """Remove what killed processes left in `parent` while writing `name` (every target when None).

    Only staging made on this machine by a process that no longer runs is touched; staging from another machine
    (a shared file system) is reported with a warning and left alone. A folder that was moved aside to be replaced
    (`.NAME.old-*`) is renamed back when its replacement never arrived, and removed otherwise.

    Returns:
        The paths removed or restored.
    """
    parent = Path(parent)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    host, handled = _host(), []
    for entry in sorted(entries):
        match = _STAGING_NAME.fullmatch(entry)
        if match is None or (name is not None and match["name"] != name):
            continue
        suffix = match["suffix"] or ""
        if suffix and Path(match["name"]).suffix != suffix:
            continue
        path = parent / entry
        if match["host"] != host:
            logger.warning(
                "%s was left by a process on the machine %s; remove it by hand if that process is gone.",
                path,
                match["host"],
            )
            continue
        if _alive(int(match["pid"])):
            continue
        target = parent / match["name"]
        try:
            if match["kind"] == "old" and not os.path.lexists(target) and path.is_dir() and not path.is_symlink():
                os.rename(path, target)
                logger.warning("Restored %s, which a killed process had moved aside to %s.", target, path)
            else:
                _remove(path)
                logger.info("Removed %s, left by a killed process (pid %s).", path, match["pid"])
        except OSError as err:
            logger.warning("Could not clean up %s, left by a killed process: %s", path, err)
            continue
        handled.append(path)
    return handled


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, innermost first."""
    created = [p for p in [folder, *folder.parents] if not os.path.lexists(p)]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in created:  # innermost first; a folder something else wrote into stays
        with contextlib.suppress(OSError):
            folder.rmdir()


# ---------------------------------------------------------------------------------------------------------------------
# Writing a folder
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_dir(
    target: PathLike,
    *,
    overwrite: bool = False,
    keep: Iterable[str] = (),
    inputs: Iterable[PathLike | None] = (),
    staging: PathLike | None = None,
    arg: str = "--output_dir",
    overwrite_arg: str = "--overwrite",
) -> Iterator[Path]:
    """Yield an empty hidden folder next to `target`; when the block succeeds, it becomes `target`.

    The checks of `check_output_path` run again on entry and before the rename (the file system may have changed
    since the command checked); stale staging of `target` is removed first. On any error, Ctrl-C included, the staging
    folder and the parents this call created are removed and `target` is left as it was.

    With `overwrite`, an existing `target` is replaced as a whole (moved aside, the new folder renamed in, the old one
    deleted), except the entries named in `keep`, which stay in place (see the module docstring). `staging` is a
    path from `staging_path(target)` when several processes write the folder together.
    """
    keep = tuple(keep)
    inputs = tuple(inputs)
    checks = {"inputs": inputs, "kind": "dir", "keep": keep, "arg": arg, "overwrite_arg": overwrite_arg}
    target = check_output_path(target, overwrite=overwrite, **checks)
    tmp = _sibling(target, "tmp") if staging is None else _absolute(staging)  # staging: from staging_path(target)
    clean_stale_staging(target.parent, target.name)
    created = _make_parents(target.parent)
    try:
        tmp.mkdir()  # the umask's mode, unlike mkdtemp's private 0700
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield tmp
        check_output_path(target, overwrite=overwrite, **checks)
        _commit_dir(tmp, target, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _commit_dir(tmp: Path, target: Path, keep: tuple[str, ...]) -> None:
    if not os.path.lexists(target) or not os.listdir(target):
        os.rename(tmp, target)  # onto nothing, or onto an empty folder: one atomic rename
        return
    kept = [name for name in keep if os.path.lexists(target / name)]
    if kept:
        _replace_entries(tmp, target, set(kept))
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _delete_old(old)


def _replace_entries(tmp: Path, target: Path, kept: set[str]) -> None:
    """Replace every entry of `target` but the `kept` ones by those of `tmp`: old ones out first, then new ones in."""
    if clash := kept & set(os.listdir(tmp)):  # renamed in, they would replace the kept ones
        raise OutputPathError(f"The output written for {target} holds {_listing(list(clash))}, kept from the folder.")
    old = _sibling(target, "old")
    old.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in sorted(set(os.listdir(target)) - kept):
            os.rename(target / name, old / name)
            moved_out.append(name)
        for name in sorted(os.listdir(tmp)):
            os.rename(tmp / name, target / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            with contextlib.suppress(OSError):
                os.rename(target / name, tmp / name)
        for name in reversed(moved_out):
            with contextlib.suppress(OSError):
                os.rename(old / name, target / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    os.rmdir(tmp)
    _delete_old(old)


def _delete_old(old: Path) -> None:
    """The replaced content is gone from the target already; a failure to delete it is reported, not raised."""
    try:
        shutil.rmtree(old)
    except OSError as err:
        logger.warning("The output is in place, but its replaced content %s could not be deleted: %s", old, err)


# ---------------------------------------------------------------------------------------------------------------------
# Writing one file
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(
    path: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike | None] = (),
    arg: str = "--output",
    overwrite_arg: str = "--overwrite",
) -> Iterator[Path]:
    """Yield a new empty hidden file next to `path` (same suffix) to write; when the block succeeds it replaces `path`.

    The checks of `check_output_path` (`kind="file"`) run on entry and again before the rename. The rename replaces
    the directory entry, so it never writes through a link; on any error the staged file is removed and `path` is
    left as it was. The staged file is created with the umask's mode (0644 under the usual 022), not 0600.
    """
    inputs = tuple(inputs)
    checks = {"inputs": inputs, "kind": "file", "arg": arg, "overwrite_arg": overwrite_arg}
    path = check_output_path(path, overwrite=overwrite, **checks)
    clean_stale_staging(path.parent, path.name)
    created = _make_parents(path.parent)
    tmp = _sibling(path, "tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield tmp
        check_output_path(path, overwrite=overwrite, **checks)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_created(created)
        raise
