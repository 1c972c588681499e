"""Fault injection on checkpoints (docs/design.md section 8, savedir.py): a save killed at every step, and every
file of a saved checkpoint removed or corrupted in turn. Each outcome must load the complete old checkpoint, the
complete new one, or raise ``LocalistLoadError`` naming the file.

A kill is a real one: the save runs in a forked child process that ``os._exit``s at the chosen step (from
``savedir.fault_hook``), so no ``finally`` block and no cleanup runs, as with SIGKILL or a power cut.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from helpers import build_model, random_ids

import hf_localist as hl
from hf_localist import savedir
from hf_localist.patch import apply as apply_module

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="the kill is simulated in a forked child process")

X = random_ids(1, 8, seed=3)


def _old_model():
    """Blocks 1 and 2 active with centroids (a state file and a block record), alpha 0.2."""
    model = build_model("llama", seed=0)
    handle = hl.apply_localist(model, hl.LocalistConfig(block_assignment="centroid", active_blocks=[], alpha=0.2))
    torch.manual_seed(0)
    handle.activate_block(1, centroid=torch.randn(32))
    handle.activate_block(2, centroid=torch.randn(32))
    return model


def _new_model():
    """Other weights, alpha 0.8, no block: its save writes no state file, so the old one must go."""
    model = build_model("llama", seed=1)
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", active_blocks=[], alpha=0.8))
    return model


def fingerprint(path) -> tuple:
    model = hl.AutoLocalistModel.from_pretrained(path)
    h = model.localist_handle
    with torch.no_grad():
        logits = model(X, block_ids=torch.zeros_like(X)).logits if h.config.block_assignment == "explicit" \
            else model(X).logits
    centroids = None if h.state.centroids is None else h.state.centroids.tolist()
    return h.config.alpha, tuple(h.config.active_block_list()), centroids, logits.sum().item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    old, new = _old_model(), _new_model()
    old.save_pretrained(root / "old")
    new.save_pretrained(root / "new")
    fp_old, fp_new = fingerprint(root / "old"), fingerprint(root / "new")
    assert fp_old != fp_new and fp_old[1] == (1, 2) and fp_new[1] == ()
    return {"root": root, "new_model": new, "fp_old": fp_old, "fp_new": fp_new}


def _save_killed_at(model, target, kill_at: int | None) -> int:
    """Save ``model`` to ``target`` in a forked child killed right after step ``kill_at`` of the commit (0: while
    the staging directory is written, before the commit starts; None: not killed). Returns the child's status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            steps = [0]

            def hook(kind, rel):
                steps[0] += 1
                if steps[0] == kill_at:
                    os._exit(17)

            savedir.fault_hook = hook
            if kill_at == 0:
                apply_module.commit_directory = lambda *a, **k: os._exit(17)
            model.save_pretrained(target)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _steps_of_a_save(model, target) -> list[tuple[str, str]]:
    seen = []
    savedir.fault_hook = lambda kind, rel: seen.append((kind, rel))
    try:
        model.save_pretrained(target)
    finally:
        savedir.fault_hook = None
    return seen


def _outcome(path, fp_old, fp_new) -> str:
    try:
        fp = fingerprint(path)
    except hl.LocalistLoadError as e:
        message = str(e)
        assert str(path) in message and any(name in message for name in os.listdir(path)), message
        return "error"
    assert fp in (fp_old, fp_new), "a killed save loaded a mix of the two checkpoints"
    return "old" if fp == fp_old else "new"


def test_a_save_killed_at_every_step_leaves_old_new_or_a_named_error(checkpoints, tmp_path):
    c = checkpoints
    probe = tmp_path / "probe" / "ckpt"
    shutil.copytree(c["root"] / "old", probe)
    steps = _steps_of_a_save(c["new_model"], probe)
    kinds = [k for k, _ in steps]
    # pending manifest, every file moved, the old state file and block record removed, the complete manifest
    assert kinds[0] == "pending" and kinds[-1] == "complete" and kinds.count("remove") == 2, steps
    outcomes = {}
    for kill_at in range(len(steps) + 1):
        target = tmp_path / f"k{kill_at}" / "ckpt"
        shutil.copytree(c["root"] / "old", target)
        assert _save_killed_at(c["new_model"], target, kill_at) == 17
        outcomes[kill_at] = _outcome(target, c["fp_old"], c["fp_new"])
    # killed before any new file is in place: the old checkpoint whole; after the complete manifest: the new one
    assert outcomes[0] == "old" and outcomes[1] == "old" and outcomes[len(steps)] == "new", outcomes
    assert set(outcomes.values()) <= {"old", "new", "error"}
    # a killed save leaves its staging directory behind; the next save into the same parent removes it
    parent = tmp_path / "k0"
    assert [n for n in os.listdir(parent) if n.startswith(savedir.STAGING_PREFIX)]
    c["new_model"].save_pretrained(parent / "ckpt")
    assert not [n for n in os.listdir(parent) if n.startswith(savedir.STAGING_PREFIX)]
    assert fingerprint(parent / "ckpt") == c["fp_new"]
    # and every interrupted directory comes back whole with one more save
    for kill_at in outcomes:
        if outcomes[kill_at] == "error":
            c["new_model"].save_pretrained(tmp_path / f"k{kill_at}" / "ckpt")
            assert fingerprint(tmp_path / f"k{kill_at}" / "ckpt") == c["fp_new"]


def test_an_unkilled_forked_save_is_the_new_checkpoint(checkpoints, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoints["root"] / "old", target)
    assert _save_killed_at(checkpoints["new_model"], target, None) == 0
    assert fingerprint(target) == checkpoints["fp_new"]


@pytest.mark.parametrize("which", ["old", "new"])
def test_every_file_removed_or_corrupted_in_turn(checkpoints, tmp_path, which):
    c = checkpoints
    source = c["root"] / which
    expected = c[f"fp_{which}"]
    for name in sorted(os.listdir(source)):
        for damage in ("remove", "corrupt", "truncate"):
            target = tmp_path / f"{name}-{damage}"
            shutil.copytree(source, target)
            path = target / name
            if damage == "remove":
                path.unlink()
            elif damage == "corrupt":  # one byte flipped in the middle: the file still parses as what it was
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0x20
                path.write_bytes(bytes(data))
            else:
                path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
            try:
                fp = fingerprint(target)
            except hl.LocalistLoadError as e:
                assert name in str(e) and str(target) in str(e), (name, damage, str(e))
                continue
            # only the manifest can go without an error: the checkpoint then loads unchecked, and whole
            assert name == savedir.MANIFEST_NAME and damage == "remove", (name, damage)
            assert fp == expected


def test_a_file_that_is_a_directory_or_a_link_out_is_refused(checkpoints, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoints["root"] / "old", target)
    (target / "localist_blocks.json").unlink()
    (target / "localist_blocks.json").mkdir()
    with pytest.raises(hl.LocalistLoadError, match="localist_blocks.json' is not a regular file"):
        fingerprint(target)
