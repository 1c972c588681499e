"""Worker of ``tests/test_distributed.py``: short ``LocalistTrainer`` runs, one process or one rank of a DDP run.

    python tests/distributed_worker.py OUT_DIR PER_DEVICE_BATCH                                  # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR PER_DEVICE_BATCH

Three runs, each from the same seed, with global batch ``PER_DEVICE_BATCH * WORLD_SIZE`` and no gradient
accumulation: ``loss`` (group-lasso penalty as a loss term, sequences of different lengths so that every rank
holds a different number of label tokens), ``prox`` (proximal step, a lambda large enough for exact zeros) and
``recruit`` (block recruitment passes on the synthetic clustered language of ``test_recruitment.py``, built by
``helpers.py``). Every rank writes ``OUT_DIR/<run>_rank<r>.pt``: its final parameters, localist state, active blocks
and recruitment decisions.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# The shared test helpers (tests/helpers.py): a script's directory is sys.path[0] already, made explicit here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import PAD, blind_llama, build_model, synthetic  # noqa: E402

import hf_localist as hl  # noqa: E402
from hf_localist.recruitment.recruit import RecruitmentCallback  # noqa: E402
from hf_localist.trainer import LocalistTrainer  # noqa: E402

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

def collate(rows: list[dict]) -> dict:
    """Right-pad to the longest row: attention_mask 0, labels -100, block_ids 0 on padding."""
    length = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list] = {k: [] for k in rows[0]}
    out["attention_mask"] = []
    for r in rows:
        pad = length - len(r["input_ids"])
        out["input_ids"].append(torch.nn.functional.pad(r["input_ids"], (0, pad), value=PAD))
        out["labels"].append(torch.nn.functional.pad(r["labels"], (0, pad), value=-100))
        out["attention_mask"].append(torch.nn.functional.pad(torch.ones_like(r["input_ids"]), (0, pad), value=0))
        if "block_ids" in r:
            out["block_ids"].append(torch.nn.functional.pad(r["block_ids"], (0, pad), value=0))
    return {k: torch.stack(v) for k, v in out.items() if v}


def penalty_data(n: int = 32, seed: int = 0) -> list[dict]:
    """Random sequences of 6..16 tokens with explicit blocks 1..3 (block 0 at BOS)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        t = int(torch.randint(6, 17, (1,), generator=g))
        ids = torch.randint(3, 100, (t,), generator=g)
        blocks = torch.randint(1, 4, (t,), generator=g).sort().values
        blocks[0] = 0
        rows.append({"input_ids": ids, "labels": ids.clone(), "block_ids": blocks})
    return rows


def args_for(out: str, batch: int, **kw) -> TrainingArguments:
    base = dict(output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=8,
                gradient_accumulation_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=2,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                data_seed=0, dataloader_num_workers=0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        base["ddp_backend"] = "gloo"
    base.update(kw)
    return TrainingArguments(**base)


def snapshot(handle, model, extra: dict | None = None) -> dict:
    state = handle.state
    out = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
           "active_blocks": list(handle.config.active_block_list()),
           "centroids": None if state.centroids is None else state.centroids.clone(),
           "block_enabled": None if state.block_enabled is None else state.block_enabled.clone(),
           "subspaces": None if state.subspaces is None else state.subspaces.clone(),
           "zero_groups": None if state.last_prox is None else state.last_prox.num_zero,
           "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    out.update(extra or {})
    return out


def run_penalty(mode: str, out: str, batch: int, accumulation: int = 1) -> dict:
    """``accumulation > 1``: micro-batches of ``batch // accumulation`` (the same global batch per optimizer step)."""
    model = build_model("llama").train()  # the tiny GQA Llama of tests/helpers.py
    lam = 0.05 if mode == "loss" else 50.0  # prox: large enough for exact zeros within the first steps
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit", max_blocks=3,
                                                        penalty=mode, penalty_lambda=lam, localist_loss_coef=1.0,
                                                        general_head_fraction=0.25))
    args = args_for(os.path.join(out, f"{mode}_{accumulation}"), batch // accumulation, max_steps=4,
                    gradient_accumulation_steps=accumulation)
    trainer = LocalistTrainer(model=model, args=args, train_dataset=penalty_data(), data_collator=collate)
    trainer.train()
    return snapshot(handle, model)


def run_recruit(out: str, batch: int) -> dict:
    train, _ = synthetic(128, 3, seed=41)
    held, _ = synthetic(32, 3, seed=42)
    model = blind_llama(3, seed=5)
    # A pass at step 3 accepts three blocks (their groups then go to zero under the prox step); the pass at step 6
    # rejects its near-duplicate proposals.
    rcfg = hl.RecruitmentConfig(every=3, epsilon=0.2, theta_block=0.0, theta_H=0.1, min_cluster_tokens=16,
                                code_length="fixed", bits=1, budget_steps=10, budget_lr=3e-3, replay_fraction=0.5,
                                diagnostic_batches=2, max_tokens=256, patience=2)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, first_local_layer=1, max_blocks=8,
                                                        block_assignment="centroid", assign_threshold=0.3,
                                                        active_blocks=[], recruitment=rcfg, penalty="prox",
                                                        penalty_lambda=0.5))
    trainer = LocalistTrainer(model=model, args=args_for(os.path.join(out, "recruit"), batch, max_steps=6,
                                                         learning_rate=3e-3),
                              train_dataset=[{"input_ids": x, "labels": x} for x in train],
                              eval_dataset=[{"input_ids": x, "labels": x} for x in held])
    trainer.train()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RecruitmentCallback))
    return snapshot(handle, model, {"decisions": cb.decisions})


def main() -> None:
    out, batch = sys.argv[1], int(sys.argv[2])
    runs = sys.argv[3].split(",") if len(sys.argv) > 3 else ["loss", "loss_accum", "prox", "recruit"]
    rank = int(os.environ.get("RANK", "0"))
    for name in runs:
        if name == "recruit":
            result = run_recruit(out, batch)
        elif name == "loss_accum":  # gradient accumulation 2: the loss term's share over micro-batches and ranks
            result = run_penalty("loss", out, batch, accumulation=2)
        else:
            result = run_penalty(name, out, batch)
        torch.save(result, os.path.join(out, f"{name}_rank{rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank done before the group goes: gloo aborts a rank whose peer left first
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Results are written. Skip interpreter teardown: with torch 2.13 + gloo on CPU, a rank sometimes aborts there
    # ("terminate called without an active exception", a C++ thread destroyed at exit) after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
