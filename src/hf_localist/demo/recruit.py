"""Part 2 of ``hf-localist demo``: recruit blocks from none on the bundled articles, without anchor tokens.

A tiny Llama reads sequences of 2-4 AG News articles of different topics, concatenated with no anchor token, so
nothing in the text says where a topic starts. It runs with ``block_assignment='centroid'``, ``active_blocks=[]``
and the dial at 1: at first every position is in the general block 0 and attention is unchanged. While it trains,
a recruitment pass (Algorithm 1, :func:`hf_localist.recruitment.recruit.run_pass`) runs every ``every`` steps: it
clusters the states of confused tokens, proposes blocks, trains the model with and without them for the same budget and
keeps the blocks whose held-out gain pays their code length (``dL_total <= -theta_block``).

The model is a normal one by default: learnable Q and K, trained with AdamW. Tokens join blocks from context
(``assign_horizon``: a running mean of the assigning layer's states; ``assign_min_run``: a block switch needs a run
of positions) and recruited blocks do not see unassigned tokens (``unassigned_visible=False``), so one block is a
restriction. ``freeze_qk=True`` gives the older content-blind model (Q and K zero and frozen: every query attends
uniformly, so only a block can focus it), on which blocks pay more easily but follow word classes, not topics
(docs/recruitment.md).

Afterwards the held-out articles are run once more and every token's block is read off: each recruited block is
reported with its *top tokens* and its *purity* against the AG News topic labels.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .. import theory
from ..config.localist import LocalistConfig
from ..config.recruitment import RecruitmentConfig
from ..patch.apply import apply_localist
from ..patch.slots import activate_block
from ..recruitment.ops import BatchSource, choose_clusters, collect_confused, restore_state, snapshot_state
from ..recruitment.recruit import prepare, run_pass
from ..utils import pad_right


@dataclass
class RecruitSettings:
    """Every knob of the recruitment part (full run defaults)."""

    steps: int = 240  # optimiser steps of the recruiting model
    every: int = 80  # a recruitment pass every this many steps
    batch_size: int = 16
    lr: float = 3e-3
    hidden_size: int = 32  # small: a block's code length is hidden/2 ln n nats (BIC on its centroid)
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_article_tokens: int = 48
    chunk_tokens: int = 8  # 0: articles one after the other; > 0: interleaved in runs of this many words
    heldout_train_fraction: float = 0.25  # training articles held out (with the test split) to score proposals
    freeze_qk: bool = False  # True: content-blind attention (Q = K = 0, frozen): only blocks can localise
    alpha: float = 1.0  # the dial while recruiting and training (1: a block's queries see only their block)
    first_local_layer: int = 1  # l0: the layer whose Q input assigns tokens to blocks (and the first localised one)
    max_blocks: int = 6
    assign_threshold: float = 0.0  # low: the blocks take almost every token, little is left in block 0
    # RecruitmentConfig
    epsilon: float = 0.2
    theta_block: float = 20.0
    min_cluster_tokens: int = 64
    min_silhouette: float = 0.1  # RecruitmentConfig.min_silhouette: below it all confused tokens form one cluster
    max_clusters: int = 2  # k <= 2: two large blocks that split the tokens between them (see the report)
    budget_steps: int = 40
    budget_lr: float = 3e-3
    replay_fraction: float = 0.5
    diagnostic_batches: int = 4
    max_tokens: int = 2048
    patience: int = 2  # passes in a row that accept nothing before recruitment stops (the model is still learning)
    assign_horizon: float = 4.0  # LocalistConfig.assign_horizon (assignment from context; 1 = per token)
    assign_min_run: int = 2  # LocalistConfig.assign_min_run (continuity of assignment)
    unassigned_visible: bool = False  # LocalistConfig.unassigned_visible (False: blocks do not see block-0 tokens)
    source_batches: int = 48  # fixed training batches the passes sample diagnostics and replay from
    top_tokens: int = 8
    min_token_count: int = 3  # a word needs this many held-out occurrences in a block to be a top token


# ---------------------------------------------------------------------------------------------- data
def plain_sequence(parts: Sequence[tuple[int, list[int]]], bos_id: int, chunk: int = 0,
                   rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """``[BOS]`` and the articles without anchors, and each position's topic (-1 for [BOS]).

    ``chunk=0``: the articles one after the other. ``chunk > 0``: a news ticker: each article is cut into runs of
    ``chunk`` words and the runs of all articles are interleaved at random (``rng``), each article's runs in order.
    """
    if chunk > 0:
        rng = rng or random.Random(0)
        queues = [[(t, x[i: i + chunk]) for i in range(0, len(x), chunk)] for t, x in parts]
        parts = []
        while any(queues):
            parts.append(rng.choice([q for q in queues if q]).pop(0))
    ids, topics = [bos_id], [-1]
    for topic, x in parts:
        ids.extend(x)
        topics.extend([topic] * len(x))
    return ids, topics


def group_articles(encoded: Sequence[tuple[int, list[int]]], rng: random.Random, n_topics: int) -> list[list]:
    """Every article once, in groups of 2-4 articles of distinct topics (the held-out layout of the dial part).
    With fewer than 2 topics (unlabelled text) the groups are 2-4 articles in a random order."""
    if n_topics < 2:
        items = list(encoded)
        rng.shuffle(items)
        groups = []
        while items:
            groups.append([items.pop() for _ in range(min(rng.randint(2, 4), len(items)))])
        return groups
    pools = [[x for t, x in encoded if t == k] for k in range(n_topics)]
    for pool in pools:
        rng.shuffle(pool)
    groups: list[list] = []
    while sum(map(len, pools)):
        available = [t for t in range(n_topics) if pools[t]]
        k = min(rng.randint(2, 4), len(available))
        chosen = sorted(available, key=lambda t: (-len(pools[t]), rng.random()))[:k]
        rng.shuffle(chosen)
        groups.append([(t, pools[t].pop()) for t in chosen])
    return groups


def make_batch(seqs: Sequence[list[int]], pad_id: int) -> dict:
    ids, mask = pad_right(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class PlainSampler:
    """Endless training sequences of 2-4 articles of distinct topics, without anchors (with fewer than 2 topics:
    2-4 random articles)."""

    def __init__(self, encoded, bos_id: int, n_topics: int, seed: int, chunk: int = 0):
        self.by_topic = [[x for t, x in encoded if t == k] for k in range(n_topics)]
        self.bos_id, self.rng, self.chunk = bos_id, random.Random(seed), chunk

    def sequence(self) -> list[int]:
        if len(self.by_topic) < 2:
            pool = self.by_topic[0]
            parts = [(0, self.rng.choice(pool)) for _ in range(self.rng.randint(2, 4))]
            return plain_sequence(parts, self.bos_id, self.chunk, self.rng)[0]
        topics = self.rng.sample(range(len(self.by_topic)), self.rng.randint(2, min(4, len(self.by_topic))))
        parts = [(t, self.rng.choice(self.by_topic[t])) for t in topics]
        return plain_sequence(parts, self.bos_id, self.chunk, self.rng)[0]


# ---------------------------------------------------------------------------------------------- model
def build_model(vocab: int, s: RecruitSettings, bos_id: int, pad_id: int, seed: int):
    """A tiny Llama; with ``freeze_qk`` its Q and K projections are zero and frozen (uniform causal attention)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_heads, max_position_embeddings=4 * s.max_article_tokens + 8,
                         bos_token_id=bos_id, pad_token_id=pad_id, eos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if s.freeze_qk:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.zero_()
                    proj.weight.requires_grad_(False)
    return model


@torch.no_grad()
def heldout_nll(model, batches: Sequence[dict]) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of scored tokens."""
    model.eval()
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["labels"][:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
        keep = target != -100
        nll += float(tok[keep].sum())
        n += int(keep.sum())
    return nll, n


@torch.no_grad()
def block_assignments(handle, batches: Sequence[dict], topics: Sequence[list[int]]) -> list[tuple[int, int, int]]:
    """(token id, topic, block) of every held-out article token (not [BOS], not padding)."""
    out = []
    row = 0
    handle.model.eval()
    for b in batches:
        with handle.capture_layouts() as calls:
            handle.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        blocks = calls[-1].block_ids[:, -b["input_ids"].shape[1]:].cpu()
        for i in range(b["input_ids"].shape[0]):
            for pos, topic in enumerate(topics[row]):
                if topic >= 0:
                    out.append((int(b["input_ids"][i, pos]), topic, int(blocks[i, pos])))
            row += 1
    return out


def describe_recruited(assign: Sequence[tuple[int, int, int]], slots: Sequence[int], tokenizer, n_topics: int,
                       top: int, min_count: int) -> list[dict]:
    """Per recruited block: size, topic counts, majority topic, purity and top tokens.

    Top tokens rank the words of the block by ``p(w | block) * ln lift`` with ``lift = p(w | block) / p(w)`` (the
    word's share of the block's tokens over its share of all held-out tokens): words over-represented in the block,
    weighted by how much of the block they make up. Only words with lift > 1 and at least ``min_count``
    occurrences in the block qualify.
    """
    total = Counter(t for t, _, _ in assign)
    n_all = max(len(assign), 1)
    rows = []
    for slot in slots:
        mine = [(t, k) for t, k, b in assign if b == slot]
        counts = Counter(t for t, _ in mine)
        per_topic = [sum(1 for _, k in mine if k == j) for j in range(n_topics)]
        n = len(mine)
        major = max(range(n_topics), key=lambda j: per_topic[j]) if n else None
        scored = []
        for tok, c in counts.items():
            lift = (c / n) / (total[tok] / n_all)
            if c >= min_count and lift > 1.0:
                scored.append((c / n * math.log(lift), tok, c, lift))
        scored.sort(key=lambda x: (-x[0], x[1]))
        rows.append({
            "slot": slot, "tokens": n, "share_of_tokens": n / n_all, "topic_counts": per_topic,
            "majority_topic": major, "purity": (per_topic[major] / n) if n else None,
            "top_tokens": [{"token": tokenizer.convert_ids_to_tokens(tok), "count": c, "in_block": c / total[tok],
                            "lift": lift} for _, tok, c, lift in scored[:top]],
        })
    return rows


def scan_proposals(handle, rcfg: RecruitmentConfig, source: BatchSource, step: int, held_batches, held_topics,
                   tokenizer, n_topics: int, s: RecruitSettings) -> list[dict]:
    """The clusters the pass at ``step`` will propose, described like blocks (top tokens, purity).

    Repeats the pass's first steps with its seed (the same diagnostic batches, confused tokens and k-means, so the
    same clusters), makes each kept cluster a block for a moment (its centroid: the normalised mean of the
    cluster's unit vectors, as in the pass) and reads off which held-out tokens it would take. The model and its
    localist state are restored afterwards. Call it just before ``run_pass(..., step=step)``.
    """
    prepare(handle)
    cfg = handle.config
    gen = torch.Generator().manual_seed(rcfg.seed + step)
    active = cfg.active_block_list()
    dormant = [k for k in range(len(cfg.block_names) + 1, cfg.max_blocks + 1) if k not in active]
    diag = source.sample(rcfg.diagnostic_batches, gen)
    longest = max(int(b["attention_mask"].sum(dim=1).max()) for b in diag)
    room = min(len(dormant), int(theory.p_max(longest, rcfg.H_min, rcfg.theta_H)) - len(active))
    if room <= 0:
        return []
    conf = collect_confused(handle, diag, rcfg.epsilon, rcfg.max_tokens, False, gen)
    if conf.x.shape[0] == 0:
        return []
    labels, k, _ = choose_clusters(conf.x, min(room, rcfg.max_clusters), rcfg.min_silhouette, rcfg.seed + step)
    sizes = torch.bincount(labels, minlength=k)
    kept = [c for c in sorted(range(k), key=lambda c: (-int(sizes[c]), c)) if int(sizes[c]) >= rcfg.min_cluster_tokens]
    snap = snapshot_state(handle)
    try:
        slots = []
        for c, slot in zip(kept, dormant):
            z = torch.nn.functional.normalize(conf.x[labels == c].double(), dim=-1)
            activate_block(handle, slot, torch.nn.functional.normalize(z.mean(0), dim=0).float())
            slots.append(slot)
        assign = block_assignments(handle, held_batches, held_topics)
        rows = describe_recruited(assign, slots, tokenizer, n_topics, s.top_tokens, s.min_token_count)
    finally:
        restore_state(handle, snap)
    for row, c in zip(rows, kept):
        row.update(cluster=c, cluster_size=int(sizes[c]), step=step)
    return rows


# ---------------------------------------------------------------------------------------------- the run
def run_recruitment(tokenizer, train_enc, test_enc, s: RecruitSettings, seed: int, n_topics: int,
                    progress: bool = True, vocab_size: int | None = None, model=None, bos_id: int | None = None,
                    pad_id: int | None = None) -> dict[str, Any]:
    """Train the centroid-mode model with recruitment passes every ``s.every`` steps; returns every number.

    ``vocab_size``: rows of the model's embedding table (default ``len(tokenizer)``; the demo passes the size
    before the anchor tokens were added, since this model never sees them). ``model``: a causal LM to use instead
    of the tiny Llama (a pretrained model, e.g. with LoRA adapters: only its trainable parameters train);
    ``bos_id`` / ``pad_id``: the sequence start and padding ids (default the tokenizer's).
    """
    start = time.perf_counter()
    bos_id = tokenizer.bos_token_id if bos_id is None else bos_id
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    rng = random.Random(seed + 10)
    train_enc = [(t, x[: s.max_article_tokens]) for t, x in train_enc]
    order = list(range(len(train_enc)))
    rng.shuffle(order)
    cut = int(len(order) * s.heldout_train_fraction)
    test_enc = [(t, x[: s.max_article_tokens]) for t, x in test_enc] + [train_enc[i] for i in order[:cut]]
    train_enc = [train_enc[i] for i in sorted(order[cut:])]
    if model is None:
        model = build_model(vocab_size or len(tokenizer), s, bos_id, pad_id, seed)
    rcfg = RecruitmentConfig(
        every=s.every, epsilon=s.epsilon, theta_block=s.theta_block, min_cluster_tokens=s.min_cluster_tokens,
        max_clusters=s.max_clusters, min_silhouette=s.min_silhouette, budget_steps=s.budget_steps,
        budget_lr=s.budget_lr,
        replay_fraction=s.replay_fraction, diagnostic_batches=s.diagnostic_batches, max_tokens=s.max_tokens,
        patience=s.patience, seed=seed, code_length="bic")
    config = LocalistConfig(alpha=s.alpha, block_assignment="centroid", active_blocks=[], max_blocks=s.max_blocks,
                            first_local_layer=s.first_local_layer, assign_threshold=s.assign_threshold,
                            assign_horizon=s.assign_horizon, assign_min_run=s.assign_min_run,
                            unassigned_visible=s.unassigned_visible, backend="dense", recruitment=rcfg)
    handle = apply_localist(model, config)

    sampler = PlainSampler(train_enc, bos_id, n_topics, seed + 11, s.chunk_tokens)
    source = BatchSource(batches=[make_batch([sampler.sequence() for _ in range(s.batch_size)], pad_id)
                                  for _ in range(s.source_batches)])
    groups = group_articles(test_enc, random.Random(seed + 12), n_topics)
    held = [plain_sequence(g, bos_id, s.chunk_tokens, rng) for g in groups]
    held_batches = [make_batch([ids for ids, _ in held[i: i + 8]], pad_id) for i in range(0, len(held), 8)]
    held_topics = [topics for _, topics in held]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.1)
    losses, timeline, decisions, proposals = [], [], [], []
    passes = empty = 0
    done = None
    bar = tqdm(range(1, s.steps + 1), desc="recruit: train + passes", unit="step", disable=not progress)
    for step in bar:
        model.train()
        batch = make_batch([sampler.sequence() for _ in range(s.batch_size)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.2f}", blocks=len(config.active_block_list()))
        if step % s.every or done:
            continue
        before = len(config.active_block_list())
        nll_before, n_tok = heldout_nll(model, held_batches)
        bar.set_postfix(loss=f"{losses[-1]:.2f}", blocks=before, recruiting="...")
        t0 = time.perf_counter()
        scanned = scan_proposals(handle, rcfg, source, step, held_batches, held_topics, tokenizer, n_topics, s)
        res = run_pass(handle, rcfg, source, held_batches, step=step, pass_index=passes)
        verdict = {d["cluster"]: d for d in res.decisions if d.get("cluster") is not None}
        for row in scanned:
            d = verdict.get(row["cluster"], {})
            row.update(accepted=bool(d.get("accepted")), reason=d.get("reason"), dL_total=d.get("dL_total"))
        proposals.append(scanned)
        passes += 1
        nll_after, _ = heldout_nll(model, held_batches)
        for d in res.decisions:
            decisions.append({k: (v if not isinstance(v, torch.Tensor) else v.tolist()) for k, v in d.items()
                              if k in ("step", "pass", "slot", "cluster", "cluster_size", "dL_data", "dL_model",
                                       "dL_total", "accepted", "reason", "heldout_tokens", "set_dL_total",
                                       "confused_tokens", "p_max")})
        timeline.append({
            "step": step, "pass": passes - 1, "blocks_before": before, "blocks_after": len(config.active_block_list()),
            "accepted": len(res.accepted), "rejected": sum(1 for d in res.decisions if d.get("slot") is not None
                                                          and not d["accepted"]),
            "heldout_nll_before": nll_before / n_tok, "heldout_nll_after": nll_after / n_tok,
            "pass_time_s": time.perf_counter() - t0,
            **{k: v for k, v in res.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        })
        empty = 0 if res.accepted else empty + 1  # the termination rule of RecruitmentCallback
        if res.stop_reason:
            done = res.stop_reason
        elif empty >= rcfg.patience:
            done = "pass_accepted_nothing"
    bar.close()

    slots = config.active_block_list()
    nll, n_tok = heldout_nll(model, held_batches)
    for slot in slots:  # the same weights with every block disabled: what the blocks themselves change
        handle.state.block_enabled[slot] = False
    nll_off, _ = heldout_nll(model, held_batches)
    for slot in slots:
        handle.state.block_enabled[slot] = True
    assign = block_assignments(handle, held_batches, held_topics)
    blocks = describe_recruited(assign, slots, tokenizer, n_topics, s.top_tokens, s.min_token_count)
    for row in blocks:
        info = handle.state.block_info.get(row["slot"], {})
        row.update({k: info.get(k) for k in ("recruited_at_step", "cluster_size", "dL_data", "dL_model", "dL_total")})
    covered = sum(r["tokens"] for r in blocks)
    weighted = sum(r["purity"] * r["tokens"] for r in blocks if r["purity"] is not None)
    tail = losses[-10:] or [float("nan")]
    return {
        "settings": asdict(s), "recruitment_config": rcfg.to_dict(),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "heldout_sequences": len(held), "heldout_tokens": n_tok,
        "final_train_loss": sum(tail) / len(tail), "train_losses": [round(x, 4) for x in losses],
        "passes": passes, "stop_reason": done or "training_ended",
        "timeline": timeline, "decisions": decisions, "blocks": blocks, "n_blocks": len(slots),
        "proposals_by_pass": proposals, "proposals": proposals[-1] if proposals else [],
        "coverage": covered / max(len(assign), 1), "weighted_purity": weighted / covered if covered else None,
        "heldout_nll": nll / n_tok, "heldout_nll_blocks_disabled": nll_off / n_tok,
        "time_s": time.perf_counter() - start,
    }
