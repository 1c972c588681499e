"""Multi-process correctness (docs/distributed.md): DDP with 2 processes on CPU (gloo) against one process.

``tests/distributed_worker.py`` runs three short ``LocalistTrainer`` runs (group-lasso penalty as a loss term, as a
proximal step, and block recruitment with the proximal step) once as a single process with batch 4 and once under
``torch.distributed.run --nproc_per_node 2`` with batch 2 per rank (same global batch, no gradient accumulation, no
dropout). Every rank must end with identical weights, active blocks, localist state and recruitment decisions, and
those must match the single process to float tolerance.

FSDP2 (``fully_shard``, DTensor parameters) is checked by ``tests/fsdp_worker.py``: group norms, the penalty's
gradient and the proximal step on sharded weights against the unsharded computation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("loss", "loss_accum", "prox", "recruit")  # loss_accum: gradient accumulation 2, same global batch

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import Partial  # noqa: F401
    except ImportError:
        return False
    return True


_PORTS_GIVEN: set[int] = set()


def _free_port() -> int:
    """A port free now and not handed out before in this session (the launches start at the same time)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)  # never inherit a launcher's settings
    return env


def _launch(worker: str, out: str, args: list[str], nproc: int | None) -> subprocess.Popen:
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    cmd += [os.path.join(HERE, worker), out, *args]
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.txt"), "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
    proc.relaunch = lambda: _launch(worker, out, args, nproc)  # a new port, for a port taken meanwhile
    return proc


def _wait(proc: subprocess.Popen, out: str, timeout: float = 600) -> None:
    for attempt in range(2):
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        if rc == 0:
            return
        tail = open(os.path.join(out, "log.txt")).read()[-4000:]
        # Another program may take the rendezvous port between choosing and binding it: only then, try once more.
        if attempt == 0 and ("Address already in use" in tail or "EADDRINUSE" in tail):
            proc = proc.relaunch()
            continue
        pytest.fail(f"{' '.join(map(str, proc.args))} failed ({rc}):\n{tail}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Start every run at once (they overlap: each is mostly single-threaded start-up and tiny steps)."""
    root = tmp_path_factory.mktemp("distributed")
    outs = {"single": str(root / "single"), "ddp": str(root / "ddp"), "fsdp": str(root / "fsdp")}
    procs = {"single": _launch("distributed_worker.py", outs["single"], ["4"], None),
             "ddp": _launch("distributed_worker.py", outs["ddp"], ["2"], 2)}
    if _fsdp2_available():
        procs["fsdp"] = _launch("fsdp_worker.py", outs["fsdp"], ["cpu"], 2)
    yield {name: (proc, outs[name]) for name, proc in procs.items()}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def ddp_runs(launched):
    """{run: (single-process result, [rank 0 result, rank 1 result])}."""
    (p1, single), (p2, ddp) = launched["single"], launched["ddp"]
    _wait(p1, single)
    _wait(p2, ddp)

    def load(d, name):
        return torch.load(os.path.join(d, name), weights_only=False)

    return {run: (load(single, f"{run}_rank0.pt"), [load(ddp, f"{run}_rank{r}.pt") for r in (0, 1)]) for run in RUNS}


def _decision_key(d: dict) -> tuple:
    return d["step"], d["pass"], d["slot"], d["cluster_size"], d["accepted"], d["reason"]


@pytest.mark.parametrize("run", RUNS)
def test_ranks_agree_exactly(ddp_runs, run):
    _, (r0, r1) = ddp_runs[run]
    assert r0["world_size"] == r1["world_size"] == 2
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"{run}: {name} differs between ranks"
    assert r0["active_blocks"] == r1["active_blocks"]
    for key in ("centroids", "block_enabled", "subspaces"):
        if r0[key] is None:
            assert r1[key] is None
        else:
            assert torch.equal(r0[key], r1[key]), f"{run}: localist state {key} differs between ranks"
    assert r0["zero_groups"] == r1["zero_groups"]
    assert r0.get("decisions") == r1.get("decisions")


@pytest.mark.parametrize("run", RUNS)
def test_ddp_matches_one_process_with_the_same_global_batch(ddp_runs, run):
    single, (r0, _) = ddp_runs[run]
    assert single["world_size"] == 1
    for name, p in single["params"].items():
        torch.testing.assert_close(r0["params"][name], p, rtol=1e-4, atol=2e-5, msg=lambda m: f"{run}: {name}: {m}")
    assert r0["active_blocks"] == single["active_blocks"]
    assert r0["zero_groups"] == single["zero_groups"]
    if single["centroids"] is not None:
        torch.testing.assert_close(r0["centroids"], single["centroids"], rtol=1e-4, atol=1e-5)
        assert torch.equal(r0["block_enabled"], single["block_enabled"])
    if run == "prox":
        assert single["zero_groups"] > 0  # the proximal step made exact zeros
    if run == "recruit":
        ours, ref = r0["decisions"], single["decisions"]
        assert [_decision_key(d) for d in ours] == [_decision_key(d) for d in ref]
        assert any(d["accepted"] for d in ref) and any(not d["accepted"] for d in ref)
        for a, b in zip(ours, ref):
            if b["dL_total"] is not None:
                assert a["dL_total"] == pytest.approx(b["dL_total"], rel=1e-3, abs=1e-2)
        assert single["active_blocks"] and single["zero_groups"] > 0


# ---------------------------------------------------------------------------------------------- in one process
def test_helpers_are_no_ops_without_a_process_group():
    from hf_localist import distributed as d

    assert not d.is_distributed() and d.rank() == 0 and d.world_size() == 1
    obj = {"a": torch.ones(2)}
    assert d.broadcast_object(obj) is obj
    t = torch.arange(3.0)
    d.broadcast_tensors_([t])
    assert torch.equal(t, torch.arange(3.0))
    assert d.any_rank(True) and not d.any_rank(False)
    assert d.full_tensor(t) is t


def test_loss_output_survives_pytree_round_trip_as_ddp_does():
    """DDP (find_unused_parameters=True, the Trainer's default) rebuilds the output with pytree unflatten, i.e.
    ``type(out)(**out)``: the ``localist_loss`` entry must be a declared field of the output class."""
    import torch.utils._pytree as pytree
    from helpers import build_model, random_block_ids, random_ids
    from transformers.modeling_outputs import CausalLMOutputWithPast

    import hf_localist as hl

    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit", max_blocks=3, penalty="loss",
                                               penalty_lambda=0.1))
    model.train()
    ids = random_ids(2, 8)
    out = model(input_ids=ids, labels=ids, block_ids=random_block_ids(2, 8, num_blocks=3))
    assert isinstance(out, CausalLMOutputWithPast) and out.localist_loss is not None
    leaves, spec = pytree.tree_flatten(out)
    again = pytree.tree_unflatten(leaves, spec)
    assert type(again) is type(out)
    torch.testing.assert_close(again.localist_loss, out.localist_loss)
    torch.testing.assert_close(again.loss, out.loss)


# ---------------------------------------------------------------------------------------------- FSDP2 (sharded weights)
FSDP_TOLERANCE = {"group_norms_q": 1e-5, "group_norms_k": 1e-5, "penalty_grad": 1e-5, "train_step_grad": 1e-5,
                  "prox_weights": 1e-6, "kkt_ratios": 1e-4, "prox_zero_mask": 0.0}


@pytest.fixture(scope="module")
def fsdp_run(launched):
    proc, out = launched["fsdp"]
    _wait(proc, out)
    return [json.load(open(os.path.join(out, f"fsdp_rank{r}.json"))) for r in (0, 1)]


@pytest.mark.skipif(not _fsdp2_available(), reason="needs FSDP2 (torch.distributed.fsdp.fully_shard) and DTensor")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fsdp2_group_norms_and_prox_equal_the_unsharded_computation(fsdp_run, arch):
    for rank, results in enumerate(fsdp_run):
        res = results[arch]
        assert res["sharded"] == 1.0, "the Q/K weights were not sharded (no DTensor)"
        for key, tol in FSDP_TOLERANCE.items():
            assert res[key] <= tol, f"rank {rank}, {arch}: {key} differs from the unsharded computation by {res[key]}"
        assert res["prox_zero_groups"] == res["prox_zero_groups_ref"] > 0


def test_gradient_accumulation_gives_the_same_step_as_one_large_batch(ddp_runs):
    """Loss penalty, global batch 4 per optimizer step: 1 process x 4, 1 process x 2 x accumulation 2, and 2 ranks x 1
    x accumulation 2 reach the same weights (the penalty's num_items_in_batch share sums to one per step)."""
    big, _ = ddp_runs["loss"]
    single_accum, (ddp_accum, _) = ddp_runs["loss_accum"]
    for name, p in big["params"].items():
        torch.testing.assert_close(single_accum["params"][name], p, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ddp_accum["params"][name], p, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
