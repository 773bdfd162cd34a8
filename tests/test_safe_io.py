"""image_gpt_hf.safe_io: the rule every command that writes follows.

User files stay byte-identical, inputs are never written into, links are never followed, output appears whole or not
at all, a killed writer's staging is cleaned up by the next one, and files get the umask's mode.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from image_gpt_hf import ImageGPTConfig
from image_gpt_hf.model_card import write_model_card
from image_gpt_hf.safe_io import (
    OutputPathError,
    atomic_file,
    check_output_path,
    clean_stale_staging,
    staged_dir,
    staging_path,
)
from tests.conftest import snapshot

SAFE_IO = Path(__file__).resolve().parents[1] / "image_gpt_hf" / "safe_io.py"


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def umask():
    """Set the process umask for a test, restored after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# ------------------------------------------------------------------------------------------------ check_output_path


def test_inputs_are_refused_whatever_overwrite_says(arena, monkeypatch):
    user, _ = arena
    before = snapshot(user)
    inputs = [user / "input.bin", user / "images"]
    cases = {
        user: "contains the input",  # would replace the folder holding the inputs
        user / "images": "is the input",
        user / "images" / "out": "is inside the input",
        user / "input.bin": "is the input",
    }
    for output, relation in cases.items():
        with pytest.raises(OutputPathError, match=relation) as error:
            check_output_path(output, inputs=inputs, overwrite=True)
        assert str(output) in str(error.value) and "--overwrite" in str(error.value)
        with pytest.raises(OutputPathError, match=relation):
            with staged_dir(output, inputs=inputs, overwrite=True) as tmp:
                (tmp / "x").write_text("x")
    assert snapshot(user) == before
    # Through a link or a relative path, the same folder is recognised.
    (user.parent / "alias").symlink_to(user, target_is_directory=True)
    with pytest.raises(OutputPathError, match="is the input"):
        check_output_path(user.parent / "alias" / "images", inputs=inputs, overwrite=True)
    monkeypatch.chdir(user / "notes")
    with pytest.raises(OutputPathError, match="is inside the input"):
        check_output_path("../images/out", inputs=inputs)
    assert check_output_path(user / "new", inputs=inputs) == user / "new"  # a new sibling of the inputs is fine


def test_existing_output_needs_overwrite(arena):
    user, _ = arena
    with pytest.raises(OutputPathError, match=r"not empty \(it holds todo.txt\).*pass --overwrite"):
        check_output_path(user / "notes")
    with pytest.raises(OutputPathError, match="exists and is not a folder"):
        check_output_path(user / "input.bin", overwrite=True)
    with pytest.raises(OutputPathError, match="input.bin exists. Choose another path, or pass --force"):
        check_output_path(user / "input.bin", kind="file", overwrite_arg="--force")
    with pytest.raises(OutputPathError, match="is a folder; give a file path"):
        check_output_path(user / "notes", kind="file", overwrite=True)
    with pytest.raises(OutputPathError, match="input.bin is not a folder"):
        check_output_path(user / "input.bin" / "out")
    (user / "empty").mkdir()
    assert check_output_path(user / "empty") == user / "empty"
    assert check_output_path(user / "notes", keep=["todo.txt"]) == user / "notes"  # the command's own entries


def test_links_at_the_output_path_are_refused(arena):
    user, outside = arena
    for path, kind in ((user / "linkdir", "dir"), (user / "link", "file")):
        with pytest.raises(OutputPathError, match=f"is a symbolic link \\(to {outside}"):
            check_output_path(path, kind=kind, overwrite=True)


def test_the_working_folder_is_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "project" / "src").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project" / "src")
    for output in (tmp_path / "project", ".", tmp_path / "project" / "src"):
        with pytest.raises(OutputPathError, match="is or holds the current working folder"):
            check_output_path(output, overwrite=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")  # even an empty one: renaming over it would leave the process nowhere
    with pytest.raises(OutputPathError, match="is or holds the current working folder"):
        check_output_path(".")


# ---------------------------------------------------------------------------------------------------- staged_dir


def test_staged_dir_writes_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="half way"):
        with staged_dir(target) as tmp:
            assert tmp.parent == target.parent.resolve() and tmp.name.startswith(".out.tmp-")
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []  # the staging and the parents it created are gone

    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists()  # nothing appears before the block ends
    assert (target / "a.txt").read_text() == "a" and siblings(target) == []


def test_overwrite_replaces_the_folder_and_removes_links_without_following_them(arena):
    user, outside = arena
    out = user / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "kmeans_centers.npy").symlink_to(outside / "secret")  # planted at a path the command writes
    before, outside_before = snapshot(user / "notes"), snapshot(outside)

    with pytest.raises(OutputPathError, match="pass --overwrite"):
        with staged_dir(out) as tmp:
            pytest.fail("the block must not run")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "kmeans_centers.npy").write_bytes(b"new")
            raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old" and siblings(out) == []

    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "kmeans_centers.npy").write_bytes(b"new")
    assert sorted(os.listdir(out)) == ["kmeans_centers.npy"]
    assert not (out / "kmeans_centers.npy").is_symlink() and (out / "kmeans_centers.npy").read_bytes() == b"new"
    assert snapshot(outside) == outside_before and snapshot(user / "notes") == before
    assert siblings(out) == []  # no .tmp-* or .old-* left


def test_keep_leaves_the_commands_own_entries_in_place(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / "state.json").write_text("{}")
    inode = (out / "checkpoints").stat().st_ino
    with staged_dir(out, keep=["checkpoints"]) as tmp:  # only its own entries there: no --overwrite needed
        (tmp / "model.safetensors").write_text("v1")
    assert sorted(os.listdir(out)) == ["checkpoints", "model.safetensors"]
    assert (out / "checkpoints").stat().st_ino == inode  # never moved
    (out / "user.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"holds model.safetensors, user.txt"):
        check_output_path(out, keep=["checkpoints"])
    with staged_dir(out, keep=["checkpoints"], overwrite=True) as tmp:
        (tmp / "config.json").write_text("v2")
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json"]  # the old model files went, the kept stayed
    assert (out / "checkpoints" / "step_2" / "state.json").read_text() == "{}" and siblings(out) == []


def test_staging_shared_between_processes(tmp_path):
    target = tmp_path / "out"
    assert len({staging_path(target) for _ in range(50)}) == 50
    shared = staging_path(target)  # chosen by one process, passed to the others
    assert shared.parent == tmp_path.resolve() and not shared.exists()
    with staged_dir(target, staging=shared) as tmp:
        assert tmp == shared and tmp.is_dir()
        (tmp / "rank1.bin").write_bytes(b"1")
    assert (target / "rank1.bin").read_bytes() == b"1"


# --------------------------------------------------------------------------------------------------- atomic_file


def test_atomic_file_replaces_in_one_step_and_never_writes_through_a_link(arena):
    user, outside = arena
    path = user / "samples.png"
    with atomic_file(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == user.resolve()  # writers that infer the format from it work
        tmp.write_bytes(b"v1")
        assert not path.exists()
    assert path.read_bytes() == b"v1"
    with pytest.raises(OutputPathError, match="samples.png exists"):
        with atomic_file(path) as tmp:
            pytest.fail("the block must not run")
    with pytest.raises(ValueError, match="encoder"):
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("the encoder failed")
    assert path.read_bytes() == b"v1"
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_bytes(b"v2")
    assert path.read_bytes() == b"v2" and siblings(path) == []

    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="symbolic link"):
            with atomic_file(user / "link", overwrite=overwrite) as tmp:
                tmp.write_bytes(b"evil")
    assert (outside / "secret").read_bytes() == b"secret" and (user / "link").is_symlink()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_and_folders_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    with atomic_file(tmp_path / "card" / "README.md") as tmp:
        tmp.write_text("card")
    with staged_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "card" / "README.md").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "model" / "config.json").stat().st_mode) == 0o666 & ~mask


def test_write_model_card_keeps_user_files(arena):
    user, outside = arena
    config = ImageGPTConfig(vocab_size=17, n_positions=64, n_embd=32, n_layer=2)
    (user / "README.md").write_text("my own notes")
    before, outside_before = snapshot(user), snapshot(outside)
    with pytest.raises(OutputPathError, match="README.md exists.*overwrite=True"):
        write_model_card(user, config)
    (user / "README.md").unlink()
    (user / "README.md").symlink_to(outside / "secret")  # planted where the card goes
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="symbolic link"):
            write_model_card(user, config, overwrite=overwrite)
    (user / "README.md").unlink()
    (user / "README.md").write_text("my own notes")
    assert snapshot(user) == before and snapshot(outside) == outside_before
    write_model_card(user, config, overwrite=True)  # told to: the card replaces it, nothing else changes
    assert (user / "README.md").read_text().startswith("---\n")
    assert {k: v for k, v in snapshot(user).items() if k != "README.md"} == {
        k: v for k, v in before.items() if k != "README.md"
    }


# ------------------------------------------------------------------------------------------------- stale staging

KILLED_WRITER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("safe_io", sys.argv[1])
    safe_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(safe_io)
    with safe_io.{function}(sys.argv[2], overwrite=True) as tmp:
        {write}
        print(tmp, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("function", ["staged_dir", "atomic_file"])
def test_staging_of_a_killed_process_is_removed_by_the_next_run(tmp_path, function):
    target = tmp_path / ("out" if function == "staged_dir" else "out.npy")
    write = "(tmp / 'weights.bin').write_bytes(b'partial')" if function == "staged_dir" else "tmp.write_bytes(b'x')"
    script = KILLED_WRITER.format(function=function, write=write)
    process = subprocess.Popen([sys.executable, "-c", script, str(SAFE_IO), str(target)], stdout=subprocess.PIPE)
    staging = Path(process.stdout.readline().decode().strip())
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert staging.exists() and not target.exists()  # what a killed conversion used to leave behind forever

    writer = staged_dir if function == "staged_dir" else atomic_file
    with writer(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"done") if function == "staged_dir" else tmp.write_bytes(b"done")
    assert not staging.exists() and siblings(target) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_clean_stale_staging_touches_only_dead_local_writers(tmp_path, caplog):
    host = staging_path(tmp_path / "out").name.split("-")[1]
    dead = dead_pid()
    stale = tmp_path / f".out.tmp-{host}-{dead}-0123abcd"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-0123abcd"
    remote = tmp_path / f".out.tmp-otherhost-{dead}-0123abcd"
    stale_file = tmp_path / f".grid.png.tmp-{host}-{dead}-0123abcd.png"
    unrelated = tmp_path / f".other.tmp-{host}-{dead}-0123abcd"
    for folder in (stale, live, remote, unrelated):
        folder.mkdir()
        (folder / "part").write_text("x")
    stale_file.write_text("x")
    user_file = tmp_path / ".out.tmp-notes"  # does not follow the pattern: a user's file
    user_file.write_text("mine")
    with caplog.at_level("WARNING"):
        removed = clean_stale_staging(tmp_path, "out")
    assert removed == [stale] and live.exists() and remote.exists() and unrelated.exists()
    assert "otherhost" in caplog.text  # reported, since its owner cannot be checked from here
    assert clean_stale_staging(tmp_path) == [stale_file, unrelated] and user_file.read_text() == "mine"


def test_a_folder_moved_aside_by_a_killed_process_is_restored(tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: the old folder comes back."""
    host = staging_path(tmp_path / "out").name.split("-")[1]
    aside = tmp_path / f".out.old-{host}-{dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "config.json").write_text("old model")
    assert clean_stale_staging(tmp_path, "out") == [aside]
    assert (tmp_path / "out" / "config.json").read_text() == "old model"


def test_the_early_check_sees_a_folder_a_killed_run_had_moved_aside(tmp_path):
    """The next run must refuse before its work, not after it, when the restored folder is not empty."""
    host = staging_path(tmp_path / "out").name.split("-")[1]
    aside = tmp_path / f".out.old-{host}-{dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "config.json").write_text("old model")
    with pytest.raises(OutputPathError, match="not empty"):
        check_output_path(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "old model"
