"""Building blocks of block recruitment (see ``recruitment/recruit.py`` and docs/recruitment.md).

Batches, confusion diagnostics, clustering, proposals (centroid, subspace, code length), snapshots of weights and
localist state, the equal training budget, and per-token held-out scoring. Nothing here decides; ``recruit.py``
strings these together into Algorithm 1.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..arch.qk import projection_module
from ..blocks.centroid import context_features
from ..blocks.ids import anchor_flags
from ..errors import LocalistConfigError, LocalistError
from ..training.subspaces import specific_subspaces, top_directions

#: Batch keys recruitment feeds to the model. Block ids are never passed: centroid assignment computes them.
BATCH_KEYS = ("input_ids", "attention_mask", "labels")


# ---------------------------------------------------------------------------------------------- batches
def clean_batch(batch: dict, device: torch.device | None = None) -> dict:
    """input_ids, attention_mask and labels (labels default to input_ids with padding ignored) on ``device``.

    ``batch``: any mapping (a dict, or the ``BatchEncoding`` that transformers' data collators return)."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise LocalistConfigError("recruitment batches must be dicts with an 'input_ids' tensor of shape (batch, seq), "
                                  f"got {type(batch).__name__}")
    ids = batch["input_ids"]
    if ids.dim() == 1:
        ids = ids[None]
    out = {"input_ids": ids}
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        out["attention_mask"] = mask if mask.dim() == 2 else mask[None]
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        out["labels"] = labels if labels.dim() == 2 else labels[None]
    else:
        labels = ids.clone()
        if "attention_mask" in out:
            labels = labels.masked_fill(out["attention_mask"] == 0, -100)
        out["labels"] = labels
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def split_rows(batch: dict) -> list[dict]:
    """One dict of 1-D tensors per sequence, without trailing padding (so rows of any batch can be re-batched)."""
    rows = []
    mask = batch.get("attention_mask")
    for i in range(batch["input_ids"].shape[0]):
        n = (int(mask[i].nonzero().max()) + 1 if mask is not None and bool(mask[i].any())
             else batch["input_ids"].shape[1])
        rows.append({k: v[i, :n].detach().cpu() for k, v in batch.items()})
    return rows


def collate_rows(rows: Sequence[dict], pad_id: int = 0) -> dict:
    """Right-pad rows to one batch (attention_mask 0 and labels -100 on padding)."""
    length = max(r["input_ids"].shape[0] for r in rows)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        n = r["input_ids"].shape[0]
        pad = length - n
        out["input_ids"].append(F.pad(r["input_ids"], (0, pad), value=pad_id))
        mask = r.get("attention_mask", torch.ones(n, dtype=torch.long))
        out["attention_mask"].append(F.pad(mask, (0, pad), value=0))
        out["labels"].append(F.pad(r.get("labels", r["input_ids"]), (0, pad), value=-100))
    return {k: torch.stack(v) for k, v in out.items()}


class BatchSource:
    """Samples batches reproducibly: from a list of batches, or from an indexable dataset with a collate function."""

    def __init__(self, batches: Sequence[dict] | None = None, dataset: Any = None, collate_fn: Callable | None = None,
                 batch_size: int = 8) -> None:
        self.batches = list(batches) if batches is not None else None
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, max(int(batch_size), 1)

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else len(self.dataset)

    def sample(self, n: int, gen: torch.Generator) -> list[dict]:
        if n <= 0 or len(self) == 0:
            return []
        if self.batches is not None:
            idx = torch.randperm(len(self.batches), generator=gen).tolist()
            idx = (idx * (n // len(idx) + 1))[:n]
            return [clean_batch(self.batches[i]) for i in idx]
        out = []
        for _ in range(n):
            idx = torch.randint(0, len(self.dataset), (self.batch_size,), generator=gen).tolist()
            out.append(clean_batch(self.collate_fn([self.dataset[i] for i in idx])))
        return out


def batches_of(data: Any, batch_size: int) -> list[dict]:
    """A list of batches from batches, a DataLoader, or examples with 1-D ``input_ids``."""
    items = list(data)
    if not items:
        return []
    if (isinstance(items[0], Mapping) and isinstance(items[0].get("input_ids"), torch.Tensor)
            and items[0]["input_ids"].dim() == 1):
        rows = [{k: torch.as_tensor(v) for k, v in it.items() if k in ("input_ids", "attention_mask", "labels")}
                for it in items]
        return [collate_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return [clean_batch(b) for b in items]


def write_log(path: str | None, decisions: Sequence[dict]) -> None:
    if not path or not decisions:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for d in decisions:
            fh.write(json.dumps(d, default=_jsonable, sort_keys=True) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return float(v) if isinstance(v, (int, float)) else str(v)


# ---------------------------------------------------------------------------------------------- diagnostics
@dataclass
class Confused:
    """Confused tokens of one pass: states at layer l0 (and every layer for pca), and where they came from."""

    x: torch.Tensor  # (n, E) assignment features: input of layer l0's Q projection (its running mean, assign_horizon)
    layers: torch.Tensor | None  # (L, n, E) inputs of every layer's Q projection (subspace='pca'), else None
    seq: torch.Tensor  # (n,) index into ``rows`` of the token's sequence
    rows: list[dict]  # the diagnostic sequences
    n_queries: int = 0  # queries with a defined entropy
    n_confused: int = 0  # before subsampling
    n_nonfinite: int = 0  # valid queries whose entropy is NaN/inf (ignored; the sink-only first query is one)
    max_len: int = 1  # longest valid sequence (N of p_max)
    mean_entropy: float = float("nan")


def anchors_visible(block_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) |A_b(t)|: anchors of the block of position t at positions <= t (0 for block 0)."""
    anchors = anchor_flags(block_ids)
    out = torch.zeros_like(block_ids)
    for b in block_ids.unique().tolist():
        if b >= 1:
            own = block_ids == b
            out = torch.where(own, (anchors & own).long().cumsum(dim=1), out)
    return out


def confusion(handle, rec, call, t: int, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query confusion of the forward just recorded in ``rec`` (its last ``t`` positions), all (B, T) on CPU.

    ``call`` is that forward's layout (``handle.capture_layouts()``).

    Returns ``(H_t, valid, confused)``: H_t averaged over the localised layers ``l >= first_local_layer``; valid
    queries (not padding); ``confused = valid & isfinite(H_t) & (H_t > ln max(|A_b(t)|, 1) + epsilon)``.
    """
    local = [layer for layer in rec.layers if layer >= handle.config.first_local_layer]
    if not local:
        raise LocalistError("recruitment needs diagnostics of a localised layer: none was recorded")
    ent = torch.stack([rec.per_query(layer, "entropy") for layer in local]).mean(dim=0)  # (B, T)
    blocks = call.block_ids[:, -t:].cpu()
    valid = call.query_valid[:, -t:].cpu()
    bound = torch.log(anchors_visible(blocks).clamp_min(1).double()).float() + epsilon
    return ent, valid, valid & torch.isfinite(ent) & (ent > bound)


def collect_confused(handle, batches: Sequence[dict], epsilon: float, max_tokens: int, with_layers: bool,
                     gen: torch.Generator) -> Confused:
    """Run ``batches``, record H_t, keep confused tokens: ``H_t > ln max(|A_b(t)|, 1) + epsilon``.

    H_t is the recorder's per-query entropy averaged over the localised layers (``l >= first_local_layer``); a
    NaN/inf entropy (undefined query, or corrupt diagnostics) never counts as confused. At most
    ``ceil(max_tokens / len(batches))`` confused tokens per batch are kept (a seeded random subset).
    """
    l0 = handle.config.first_local_layer
    model = handle.model
    device = next(handle.base.parameters()).device
    n_layers = len(handle.attention_modules)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, module in enumerate(handle.attention_modules):
        if with_layers or layer == l0:
            def hook(_m, args, layer=layer):
                captured[layer] = args[0].detach()
            hooks.append(projection_module(module, handle.spec.q_proj).register_forward_pre_hook(hook))
    per_batch = max(1, math.ceil(max_tokens / max(len(batches), 1)))
    xs, lays, seqs, rows = [], [], [], []
    res = Confused(x=torch.empty(0), layers=None, seq=torch.empty(0, dtype=torch.long), rows=rows)
    ent_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = clean_batch(batch, device)
            captured.clear()
            with torch.no_grad(), handle.record() as rec, handle.capture_layouts() as calls:
                model(**{k: v for k, v in batch.items() if k != "labels"})
            ent, valid, confused = confusion(handle, rec, calls[-1], batch["input_ids"].shape[1], epsilon)
            finite = torch.isfinite(ent)
            res.n_nonfinite += int((valid & ~finite).sum())  # includes each sequence's first (sink-only) query
            res.n_queries += int((valid & finite).sum())
            ent_sum += float(ent[valid & finite].sum())
            res.max_len = max(res.max_len, int(valid.sum(dim=1).max()))
            idx = confused.nonzero()  # (m, 2) (row, position)
            res.n_confused += idx.shape[0]
            if idx.shape[0] > per_batch:
                idx = idx[torch.randperm(idx.shape[0], generator=gen)[:per_batch].sort().values]
            if idx.shape[0] == 0:
                continue
            offset = len(rows)
            rows.extend(split_rows({k: v.cpu() for k, v in batch.items()}))
            r, p = idx[:, 0].to(device), idx[:, 1].to(device)
            # Cluster what centroid assignment compares with the centroids: with assign_horizon > 1 the causal running
            # mean of the states (blocks/centroid.py), else the states themselves.
            feats, _ = context_features(captured[l0], calls[-1].query_valid[:, -captured[l0].shape[1]:],
                                        handle.config.assign_horizon)
            xs.append(feats[r, p].float().cpu())
            if with_layers:
                lays.append(torch.stack([captured[layer][r, p].float().cpu() for layer in range(n_layers)]))
            seqs.append(idx[:, 0] + offset)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if xs:
        res.x, res.seq = torch.cat(xs), torch.cat(seqs)
        res.layers = torch.cat(lays, dim=1) if with_layers else None
    res.mean_entropy = ent_sum / res.n_queries if res.n_queries else float("nan")
    return res


# ---------------------------------------------------------------------------------------------- clustering
def choose_clusters(x: torch.Tensor, k_max: int, min_silhouette: float, seed: int,
                    max_silhouette_samples: int = 2000) -> tuple[torch.Tensor, int, float]:
    """k-means on the L2-normalised states (cosine geometry, as centroid assignment), k by silhouette in 2..k_max.

    k = 1 rule: one cluster (all tokens) when k_max < 2, when there are fewer than 4 tokens, or when the best
    silhouette is below ``min_silhouette`` (no cluster structure). Returns (labels (n,), k, best silhouette or nan).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = x.shape[0]
    ones = torch.zeros(n, dtype=torch.long)
    k_max = min(k_max, n - 1)
    if k_max < 2 or n < 4:
        return ones, 1, float("nan")
    z = F.normalize(x.double(), dim=-1).numpy()
    best = (float("-inf"), None, 1)
    for k in range(2, k_max + 1):
        km = KMeans(n_clusters=k, n_init=3, random_state=seed % (2 ** 32)).fit(z)
        if len(set(km.labels_.tolist())) < 2:
            continue
        s = float(silhouette_score(z, km.labels_, sample_size=min(n, max_silhouette_samples),
                                   random_state=seed % (2 ** 32)))
        if s > best[0] + 1e-9:
            best = (s, km.labels_, k)
    if best[1] is None or best[0] < min_silhouette:
        return ones, 1, best[0] if best[1] is not None else float("nan")
    return torch.as_tensor(best[1], dtype=torch.long), best[2], best[0]


# ---------------------------------------------------------------------------------------------- proposals
@dataclass
class Proposal:
    cluster: int
    size: int
    slot: int
    centroid: torch.Tensor  # (E,) unit norm
    subspace: torch.Tensor | None  # (L, E, r) or None
    rows: list[int]  # diagnostic sequences holding the cluster's tokens
    k_params: int = 0
    dL_model: float = 0.0
    lam: Any = None
    info: dict = field(default_factory=dict)


def code_length(k: int, n: int, mode: str, bits: int) -> float:
    """Model code length of ``k`` new parameters in nats: 'bic' k/2 ln n, 'fixed' k * bits * ln 2."""
    if mode == "bic":
        return 0.5 * k * math.log(max(n, 1))
    return k * bits * math.log(2.0)


def count_params(hidden: int, rank: int, n_counted_layers: int, subspace: str) -> int:
    """Free parameters of a block: its centroid (E) plus, for 'pca', an orthonormal E x r basis per counted layer
    (E r - r (r + 1) / 2, the dimension of the Stiefel manifold); 0 for a fixed coordinate group."""
    k = hidden
    if subspace == "pca":
        k += n_counted_layers * (hidden * rank - rank * (rank + 1) // 2)
    return k


def pca_basis(x: torch.Tensor, rank: int) -> torch.Tensor:
    """(n, E) -> (E, r) top-r principal directions of the centred rows (padded by svd when n < r)."""
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    return top_directions(xc, rank).float().contiguous()


def specific_basis(inside: torch.Tensor, outside: torch.Tensor, rank: int) -> torch.Tensor:
    """A proposed block's subspace at one layer: (n_in, E), (n_out, E) inputs -> (E, r).

    The directions in which the cluster's inputs hold more energy than the other confused tokens', outside the
    directions both share (``specific_subspaces``, as ``calibrate_subspaces`` does for the initial blocks), so that a
    recruited block does not take what every token needs. Falls back to the cluster's top principal directions
    (:func:`pca_basis`) when fewer than 2 other tokens exist (one cluster of every confused token) or the shared
    directions and the two bases do not fit (``3 r > E``).
    """
    e = inside.shape[1]
    if outside.shape[0] < 2 or 3 * rank > e:
        return pca_basis(inside, rank)
    moments = [x.double().T @ x.double() / x.shape[0] for x in (inside, outside)]  # (E, E) each
    return specific_subspaces(moments, rank)[0].float().contiguous()


def coordinate_group(hidden: int, rank: int, slot: int, taken: torch.Tensor | None) -> torch.Tensor | None:
    """(E, r) coordinates [slot r, (slot + 1) r); the first free group when that one overlaps ``taken``."""
    eye = torch.eye(hidden)
    groups = list(range(1, hidden // rank))
    for g in [slot] + [g for g in groups if g != slot]:
        if (g + 1) * rank > hidden:
            continue
        u = eye[:, g * rank: (g + 1) * rank]
        if taken is None or taken.shape[1] == 0 or float((taken.T @ u).abs().max()) < 1e-6:
            return u
    return None


# ---------------------------------------------------------------------------------------------- snapshots
def snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the trainable parameters (what a budget changes). Restore with :func:`restore_weights`."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_weights(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in snap:
            p.copy_(snap[n])


def snapshot_state(handle) -> dict:
    s, cfg = handle.state, handle.config

    def c(t):
        return None if t is None else t.detach().clone()

    return {"active_blocks": copy.copy(cfg.active_blocks), "subspace_rank": cfg.subspace_rank,
            "centroids": c(s.centroids), "block_enabled": c(s.block_enabled), "subspaces": c(s.subspaces),
            "lambda_threshold": c(s.lambda_threshold), "block_info": copy.deepcopy(s.block_info)}


def restore_state(handle, snap: dict) -> None:
    s = handle.state
    handle.config.update(active_blocks=snap["active_blocks"], subspace_rank=snap["subspace_rank"])
    for name in ("centroids", "block_enabled", "subspaces", "lambda_threshold"):
        setattr(s, name, None if snap[name] is None else snap[name].clone())
    s.block_info = copy.deepcopy(snap["block_info"])


# ---------------------------------------------------------------------------------------------- budget and scoring
def train_budget(handle, batches: Sequence[dict], lr: float, seed: int, max_grad_norm: float = 1.0) -> bool:
    """AdamW on the trainable parameters over ``batches`` (one step each); False if a loss was not finite."""
    model = handle.model
    device = next(handle.base.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return True
    opt = torch.optim.AdamW(params, lr=lr)
    was_training = model.training
    model.train()
    torch.manual_seed(seed)  # dropout, inside the caller's fork_rng
    try:
        for batch in batches:
            loss = model(**clean_batch(batch, device)).loss
            if not torch.isfinite(loss):
                return False
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return True


@torch.no_grad()
def score_tokens(handle, batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (nats) of the held-out next tokens, and the block of each predicting (query) position."""
    model = handle.model
    device = next(handle.base.parameters()).device
    nlls, blocks = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = clean_batch(batch, device)
            with handle.capture_layouts() as calls:
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            logits = getattr(out, "logits", None)
            if logits is None:
                raise LocalistError("recruitment scores next-token likelihood: the model must return logits")
            t = batch["input_ids"].shape[1]
            target = batch["labels"][:, 1:]
            keep = target != -100
            if "attention_mask" in batch:
                keep &= batch["attention_mask"][:, :-1].bool()
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none")
            nlls.append(nll[keep].double().cpu())
            blocks.append(calls[-1].block_ids[:, -t:][:, :-1][keep].cpu())
    finally:
        model.train(was_training)
    if not nlls:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    return torch.cat(nlls), torch.cat(blocks)
