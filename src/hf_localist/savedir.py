"""Checkpoint directories that are never a silent mix of two saves: staging, a checksummed manifest, stale files.

A checkpoint is several files (``config.json``, the weights, ``localist_config.json``, the state tensors, ...), and
no file system renames several files at once. :func:`commit_directory` therefore moves a complete new checkpoint
from a staging directory into place under a manifest (``localist_manifest.json``) that records the size and SHA-256
of every file:

1. the caller writes the whole new checkpoint into a staging directory (:func:`staging_directory`, a hidden
   sibling of the target): a failure while writing leaves the target untouched;
2. a *pending* manifest is written into the target, holding the checksums of the new files and of the old
   checkpoint (taken from the old manifest, when there was a complete one);
3. the new files are moved in one by one (``os.replace``), then the stale files of the old checkpoint (files the
   new save does not write: an old state file, shards of an earlier sharded save, a dropped specialist) are removed;
4. the *complete* manifest (new files only) replaces the pending one, and the staging directory is removed.

:func:`verify_directory` checks a directory against its manifest before anything is loaded: a process killed at
any point leaves the complete old checkpoint, the complete new one, or a directory it refuses with a
``LocalistLoadError`` naming the file that does not match. A directory without a manifest (saved by plain
transformers or an older version) is not checked. Files the save did not write (a tokenizer saved next to the
model, training logs) are left alone and never checked.

:func:`update_manifest` records files rewritten in place afterwards (``save_localist_state`` adding the localist
files to a saved directory), so the directory still verifies.

Staging directories left behind by a killed save are removed by the next save into the same parent directory
(:func:`remove_leftovers`); each carries the id of the process that made it, so a save in progress elsewhere keeps
its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable

from .errors import LocalistLoadError
from .utils import atomic_write_text

MANIFEST_NAME = "localist_manifest.json"
STAGING_PREFIX = ".localist-save-"
#: Staging prefixes of earlier versions (no process id in the name): removed as leftovers too.
_LEGACY_PREFIXES = (".tmp-router-",)
_FORMAT = "hf_localist-checkpoint-manifest"

#: Called after every step of :func:`commit_directory` as ``fault_hook(step, relative_path)`` with step in
#: ``"pending"``, ``"move"``, ``"remove"``, ``"complete"``. Only for fault-injection tests (kill the process at a
#: chosen step); None in normal use.
fault_hook: Callable[[str, str], None] | None = None


def _step(kind: str, rel: str) -> None:
    if fault_hook is not None:
        fault_hook(kind, rel)


# ---------------------------------------------------------------------------------------------- staging
def check_save_target(save_directory: str) -> str:
    """``save_directory`` as a path, or a ``LocalistLoadError`` when it is an existing file (not a directory)."""
    path = os.fspath(save_directory)
    if os.path.exists(path) and not os.path.isdir(path):
        raise LocalistLoadError(f"save_directory={path!r} exists and is a file, not a directory: pass a directory "
                                "path (it is created when missing)")
    return path


def staging_directory(save_directory: str) -> str:
    """A fresh hidden sibling directory of ``save_directory`` to write a checkpoint into (same file system, so the
    moves are renames). Leftovers of killed saves in the same parent are removed first."""
    parent = os.path.dirname(os.path.abspath(save_directory))
    try:
        os.makedirs(parent, exist_ok=True)
        remove_leftovers(parent)
        return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent)
    except OSError as e:
        raise LocalistLoadError(f"cannot save into {save_directory!r}: its parent directory {parent!r} is not "
                                f"writable ({e}); choose another directory") from e


def remove_leftovers(parent: str) -> list[str]:
    """Remove staging directories in ``parent`` left by saves whose process no longer runs; returns their paths."""
    removed = []
    for name in os.listdir(parent):
        if name.startswith(STAGING_PREFIX):
            pid = name[len(STAGING_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
        elif not name.startswith(_LEGACY_PREFIXES):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a save of this very process (another thread) is in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# ---------------------------------------------------------------------------------------------- checksums
def _digest(path: str) -> list:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return [os.path.getsize(path), h.hexdigest()]


def _files_under(root: str) -> list[str]:
    """Relative paths (with '/') of the regular files under ``root``, sorted; symlinks are not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in filenames:
            full = os.path.join(dirpath, f)
            if not os.path.islink(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def read_manifest(directory: str) -> dict | None:
    """The manifest of ``directory`` (a dict), None when it has none; ``LocalistLoadError`` when it is corrupt."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:
        raise LocalistLoadError(f"{path!r} is not a readable checkpoint manifest ({type(e).__name__}: {e}): the "
                                "checkpoint cannot be verified; save the model again") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(files, dict) \
            or data.get("state") not in ("pending", "complete") \
            or not all(isinstance(v, list) and len(v) == 2 for v in files.values()) \
            or not isinstance(data.get("old"), (dict, type(None))):
        raise LocalistLoadError(f"{path!r} is not a checkpoint manifest written by hf_localist: the checkpoint "
                                "cannot be verified; save the model again")
    return data


def _mismatch(directory: str, table: dict, absent: Iterable[str]) -> str | None:
    """Why ``directory`` is not exactly the checkpoint of ``table`` (None when it is): the first bad file."""
    for rel, (size, sha) in sorted(table.items()):
        full = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(full):
            return f"{full!r} is {'not a regular file' if os.path.lexists(full) else 'missing'}"
        if os.path.getsize(full) != size or _digest(full)[1] != sha:
            return f"{full!r} does not match its checksum (corrupt, or changed after the save)"
    for rel in sorted(absent):
        full = os.path.join(directory, *rel.split("/"))
        if os.path.lexists(full):
            return f"{full!r} belongs to another save than the rest of the checkpoint"
    return None


def verify_directory(directory: str) -> list[str] | None:
    """Check ``directory`` against its manifest; returns the checkpoint's files (relative paths), or None when the
    directory has no manifest. Raises ``LocalistLoadError`` naming the first file that does not match."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    new, old = manifest["files"], manifest.get("old")
    why = _mismatch(directory, new, set(old or ()) - set(new))
    if why is None:
        return sorted(new)
    if manifest["state"] == "pending" and old is not None and _mismatch(directory, old, set(new) - set(old)) is None:
        return sorted(old)  # killed before the first file of the new save was moved in: the old one is whole
    state = ("a save into this directory was interrupted" if manifest["state"] == "pending"
             else "the checkpoint was changed after it was saved")
    raise LocalistLoadError(f"checkpoint {directory!r}: {why}; {state} (see {MANIFEST_NAME}): save the model "
                            "again, or restore the directory from a backup")


# ---------------------------------------------------------------------------------------------- commit
def commit_directory(staging: str, target: str, owned: Callable[[str], bool],
                     deep: tuple[str, ...] = ()) -> list[str]:
    """Move the checkpoint written into ``staging`` into ``target`` (see the module docstring); returns its files.

    ``owned(rel)`` says whether a file of ``target`` that the new save does not write belongs to the checkpoint
    (and is then removed as stale) or to someone else (kept). Files directly in ``target`` and every file under the
    subdirectories ``deep`` are considered; so are the files of the old manifest.
    """
    check_save_target(target)
    os.makedirs(target, exist_ok=True)
    names = [n for n in _files_under(staging) if n != MANIFEST_NAME]
    new = {rel: _digest(os.path.join(staging, *rel.split("/"))) for rel in names}
    try:
        previous = read_manifest(target)
    except LocalistLoadError:
        previous = None  # a corrupt manifest describes nothing that could be kept
    old = previous["files"] if previous is not None and previous["state"] == "complete" else None
    _write_manifest(target, "pending", new, old)
    _step("pending", MANIFEST_NAME)
    for rel in names:
        dst = os.path.join(target, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(staging, *rel.split("/")), dst)
        _step("move", rel)
    stale = set(previous["files"] if previous is not None else ()) | set(previous.get("old") or ()
                                                                         if previous is not None else ())
    stale |= {n for n in os.listdir(target) if os.path.isfile(os.path.join(target, n)) and owned(n)}
    for sub in deep:
        if os.path.isdir(os.path.join(target, sub)):
            stale |= {f"{sub}/{rel}" for rel in _files_under(os.path.join(target, sub)) if owned(f"{sub}/{rel}")}
    for rel in sorted(stale - set(new) - {MANIFEST_NAME}):
        full = os.path.join(target, *rel.split("/"))
        if os.path.lexists(full) and not os.path.isdir(full):
            os.unlink(full)
            _prune_empty(os.path.dirname(full), target)
            _step("remove", rel)
    _write_manifest(target, "complete", new, None)
    _step("complete", MANIFEST_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    return names


def update_manifest(directory: str, written: Iterable[str], removed: Iterable[str] = ()) -> None:
    """After files of a checkpoint were rewritten in place (``save_localist_state`` adding the localist files to a
    saved directory): record the new checksums of ``written`` and drop ``removed`` from its complete manifest, so the
    directory still verifies. No manifest: nothing to do. A pending one (an interrupted save) is left as it is: the
    directory stays refused until it is saved again."""
    manifest = read_manifest(directory)
    if manifest is None or manifest["state"] != "complete":
        return
    files = dict(manifest["files"])
    for rel in removed:
        files.pop(rel, None)
    for rel in written:
        files[rel] = _digest(os.path.join(directory, *rel.split("/")))
    _write_manifest(directory, "complete", files, None)


def _write_manifest(target: str, state: str, files: dict, old: dict | None) -> None:
    data = {"format": _FORMAT, "version": 1, "state": state, "files": files, "old": old}
    atomic_write_text(os.path.join(target, MANIFEST_NAME), json.dumps(data, indent=1, sort_keys=True) + "\n")


def _prune_empty(directory: str, stop: str) -> None:
    """Remove ``directory`` and its parents up to (not including) ``stop`` while they are empty."""
    stop = os.path.abspath(stop)
    directory = os.path.abspath(directory)
    while directory != stop and directory.startswith(stop + os.sep):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
        if os.path.isdir(directory):
            return
        directory = os.path.dirname(directory)


# ---------------------------------------------------------------------------------------------- what a save owns
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json", "localist_config.json",
               "localist_state.safetensors", "localist_blocks.json")


def model_file(rel: str) -> bool:
    """Whether ``rel`` is a file a localist model save writes (weights, shards, configs, localist state): a stale
    one is removed by the next save; other files (tokenizer, logs) are kept."""
    return rel in MODEL_FILES or bool(_SHARD.match(rel))
