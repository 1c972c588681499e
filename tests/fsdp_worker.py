"""Worker of ``tests/test_distributed.py::test_fsdp2_*`` (and of ``benchmarks/gpu/check_fsdp.py`` on GPUs).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR [cpu|cuda]

Shards a tiny Llama (GQA) and a tiny GPT-2 (fused ``c_attn``) with FSDP2 (``fully_shard`` per decoder layer, then
the root), keeps an unsharded copy with the same weights on every rank, and compares, on sharded against unsharded
weights: the group norms, the gradient of the penalty when each rank's loss holds a different share of it, one
training step's gradients with ``penalty='loss'`` (each rank half of the global batch, the Trainer's
``num_items_in_batch`` and world-size loss scaling), the proximal step (full weights and zero groups) and the KKT
ratios. Each rank writes ``OUT_DIR/fsdp_rank<r>.json``: the largest absolute difference per check.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# The shared test helpers (tests/helpers.py): a script's directory is sys.path[0] already, made explicit here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import build_model  # noqa: E402

import hf_localist as hl  # noqa: E402
from hf_localist.training.penalty import group_norms, kkt_ratios, penalty, prox_step  # noqa: E402

torch.set_num_threads(1)
hf_logging.set_verbosity_error()


def build(kind: str, device: str):
    """The tiny Llama (GQA) or GPT-2 of tests/helpers.py, seed 0."""
    model = build_model(kind, seed=0)
    layers = model.model.layers if kind == "llama" else model.transformer.h
    model.to(device).train()
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit", max_blocks=3,
                                                        penalty="loss", penalty_lambda=0.5, localist_loss_coef=1.0,
                                                        general_head_fraction=0.25))
    return model, handle, layers


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((full(a).detach().float().cpu() - full(b).detach().float().cpu()).abs().max())


def grad_diffs(model, ref) -> float:
    named = dict(ref.named_parameters())
    return max(maxdiff(p.grad, named[n].grad) for n, p in model.named_parameters() if p.grad is not None)


def check(kind: str, device: str) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device, (world,))
    model, handle, layers = build(kind, device)
    ref, ref_handle, _ = build(kind, device)  # the same weights, never sharded
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # the Q/K weights really are sharded DTensors
    out: dict[str, float] = {"sharded": float(all(hasattr(p, "full_tensor")
                                                  for p in handle.attention_modules[0].parameters()))}

    # 1. group norms of sharded weights = of the full weights
    with torch.no_grad():
        a, b = group_norms(handle), group_norms(ref_handle)
    out["group_norms_q"], out["group_norms_k"] = maxdiff(a.q, b.q), maxdiff(a.k, b.k)

    # 2. penalty gradient, rank r's loss holding the share c_r (mean 1): the shards get the mean, like FSDP's data
    #    gradients
    share = (0.5 + rank) * 2 / world if world == 2 else 1.0
    (penalty(handle) * share).backward()
    penalty(ref_handle).backward()
    out["penalty_grad"] = grad_diffs(model, ref)
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)

    # 3. one step with penalty='loss': each rank half of the global batch, num_items_in_batch over the global batch,
    #    loss times the world size (transformers' Trainer with average_tokens_across_devices=True); the reference runs
    #    the global batch in one process
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2 * world, 12), generator=g)
    labels = ids.clone()
    labels[0, 7:] = -100  # ranks hold different numbers of label tokens
    blocks = torch.randint(1, 4, ids.shape, generator=g).sort(dim=1).values
    blocks[:, 0] = 0
    n_global = torch.tensor(int((labels[:, 1:] != -100).sum()), device=device)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = model(input_ids=ids[mine].to(device), labels=labels[mine].to(device), block_ids=blocks[mine].to(device),
                 num_items_in_batch=n_global).loss * world
    loss.backward()
    ref(input_ids=ids.to(device), labels=labels.to(device), block_ids=blocks.to(device),
        num_items_in_batch=n_global).loss.backward()
    out["train_step_grad"] = grad_diffs(model, ref)

    # 4. KKT ratios of zero groups, then 5. the proximal step (lambda large enough for exact zeros)
    handle.config.update(penalty_lambda=200.0)
    ref_handle.config.update(penalty_lambda=200.0)
    stats, ref_stats = prox_step(handle, 1e-2), prox_step(ref_handle, 1e-2)
    out["prox_zero_groups"] = float(stats.num_zero)
    out["prox_zero_groups_ref"] = float(ref_stats.num_zero)
    out["prox_zero_mask"] = float(not (torch.equal(stats.zero_q, ref_stats.zero_q)
                                       and torch.equal(stats.zero_k, ref_stats.zero_k)))
    named = dict(ref.named_parameters())
    out["prox_weights"] = max(maxdiff(p, named[n]) for n, p in model.named_parameters())
    r, r_ref = kkt_ratios(handle, stats), kkt_ratios(ref_handle, ref_stats)
    same_count = r.numel() == r_ref.numel()
    out["kkt_ratios"] = maxdiff(r, r_ref) if same_count and r.numel() else float(not same_count)
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    out_dir = sys.argv[1]
    device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    results = {kind: check(kind, device) for kind in ("llama", "gpt2")}
    with open(os.path.join(out_dir, f"fsdp_rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(results, fh, indent=1, sort_keys=True)
    if dist.get_rank() == 0:
        print(json.dumps(results, indent=1, sort_keys=True))
    dist.barrier()  # every rank done before the group goes: gloo aborts a rank whose peer tore down first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Results are written. Skip interpreter teardown: with torch 2.13 + gloo on CPU, a rank sometimes aborts there
    # ("terminate called without an active exception", a C++ thread destroyed at exit) after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
