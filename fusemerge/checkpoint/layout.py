"""The output-folder protocol: every name and rule that says whether a folder fusemerge writes is complete.

One owner for facts that the merge writer, the fuse steps, `push` and the fixtures all need (see
ARCHITECTURE.md, "Contracts"):

- a model folder is complete when its index (or single `model.safetensors`) exists: the index is written
  last, shards appear under their final names only once finished (hidden `.NAME.partial` while being
  written, hidden `.NAME.done` once synced and waiting for its siblings);
- fusemerge's own bookkeeping lives in a hidden `.fusemerge/` state folder (a manifest and a lock) and in a
  fused target's `fusemerge_target.json` stamp; none of it is ever uploaded;
- whole folders and small files are published by writing under a temporary sibling name and renaming,
  so a reader (or a rerun after kill -9) sees either nothing or the complete thing;
- one writer per folder, by `flock` on `.fusemerge/lock` (released by the kernel when the process dies,
  so a stale lock never blocks a rerun).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fusemerge.errors import FusemergeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Checkpoint formats that unpickle (and so can run code) when loaded: refused unless asked for.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
STATE_DIR = ".fusemerge"
STATE_MANIFEST = "manifest.json"
LOCK_NAME = "lock"
RECIPE_NAME = "fusemerge_recipe.yml"
TARGET_STAMP = "fusemerge_target.json"
PARTIAL_SUFFIX = ".partial"
DONE_SUFFIX = ".done"
TMP_MARK = ".tmp-"
# The files that make a tokenizer, copied beside merged weights and uploaded with them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What never leaves the machine: fusemerge's state, unfinished shards, a fused target's stamp, git data.
HUB_IGNORE_PATTERNS = [
    f"{STATE_DIR}/*",
    f"*{PARTIAL_SUFFIX}",
    f"*{DONE_SUFFIX}",
    TARGET_STAMP,
    ".git*",
    "*/.git*",
]


def partial_path(folder: Path, filename: str) -> Path:
    """Where a shard is written while incomplete (hidden, never mistaken for a finished shard)."""
    return folder / f".{filename}{PARTIAL_SUFFIX}"


def done_path(folder: Path, filename: str) -> Path:
    """Where a finished shard waits until every shard is finished."""
    return folder / f".{filename}{DONE_SUFFIX}"


def tmp_sibling(path: Path) -> Path:
    """A temporary name beside `path`, unique per process, that the final name is later renamed from."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def stale_tmp_siblings(folder: Path, pattern: str = "*") -> list[Path]:
    """Temporary siblings under `folder` left by interrupted writers (never complete, safe to delete)."""
    return sorted(folder.glob(f"{pattern}{TMP_MARK}*"))


def orphan_tmp_siblings(folder: Path) -> list[Path]:
    """Temporary siblings in `folder` whose writer is dead (`tmp_sibling` names carry its PID): left by
    a kill while a folder or file was being saved, never complete, safe to delete. A live writer's are
    kept (a PID that cannot be read, or whose process exists, counts as live)."""
    if not folder.is_dir():
        return []
    found = []
    for path in stale_tmp_siblings(folder):
        pid = path.name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            found.append(path)
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user's counts too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_path(path: Path) -> None:
    """Delete a file or a folder, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def usual_file_mode(path: Path) -> None:
    """Give a file the mode `open()` gives new files (0666 less the umask, e.g. 0644).

    safetensors writes its files 0600, so without this a store's shards and a saved model's weights
    would be private while every other file beside them is readable by the group and others.
    """
    try:
        path.chmod(0o666 & ~_umask())
    except OSError as exc:
        raise FusemergeError(f"cannot set the file's mode: {exc.strerror}", file=path) from exc


def usual_folder_modes(folder: Path, pattern: str = "*.safetensors") -> None:
    """`usual_file_mode` for every file in `folder` (not below it) that matches `pattern`."""
    for path in folder.glob(pattern):
        if path.is_file():
            usual_file_mode(path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def publish(tmp: Path, final: Path) -> None:
    """Give a completely written file or folder its final name in one rename."""
    os.replace(tmp, final)


@contextmanager
def staged_folder(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it becomes `final` by one rename.

    On an exception the temporary folder is removed and `final` is left as it was, so a folder under its
    final name is always complete. With `replace`, a folder already at `final` is removed once the new one
    is complete, just before the rename (a kill in between leaves no folder there, never a mixed one).
    """
    tmp = tmp_sibling(final)
    remove_path(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    if replace:
        remove_path(final)
    publish(tmp, final)


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see either the old content or the whole new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise FusemergeError(f"cannot write: {exc.strerror}", file=path) from exc


# -- the state folder -----------------------------------------------------------------------------------
def state_manifest_path(folder: Path) -> Path:
    return folder / STATE_DIR / STATE_MANIFEST


def read_state(folder: Path) -> dict[str, Any]:
    """The folder's state manifest, or {} when there is none (or it is unreadable)."""
    try:
        return json.loads(state_manifest_path(folder).read_text())
    except (OSError, ValueError):
        return {}


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_manifest_path(folder), json.dumps(state, indent=2) + "\n")


@contextmanager
def exclusive_lock(folder: Path, *, what: str = "merge") -> Iterator[None]:
    """One writer per folder. flock dies with its process, so a stale lock never blocks a rerun.

    Args:
        folder: the folder to guard; its `.fusemerge/` state folder is created if missing.
        what: the kind of run, for the message a second writer gets ("another merge is writing ...").
    """
    state = folder / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise FusemergeError(
                f"another {what} is writing this folder (pid {holder})", file=folder
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
