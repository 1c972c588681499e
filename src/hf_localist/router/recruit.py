"""Fitting the router and LLM-level recruitment of specialists (docs/design.md section 7).

- :func:`fit_router`: a classifier on pooled base hidden states, trained on domain-labelled data (labels name
  specialists);
- :func:`init_router_from_prompts`: class-mean prototypes from a few example prompts per specialist;
- :func:`recruit_specialist`: inputs with ``H_domain > gamma ln M``, or routed to a specialist whose block
  recruitment is exhausted and still confused (:mod:`hf_localist.router.exhaustion`), are clustered (k-means on pooled
  hidden states); per cluster a candidate specialist (a LoRA adapter on the base by default) is trained briefly and
  accepted iff ``dL_total = dL_data + dL_model <= -theta_LLM`` with ``theta_LLM = r * theta_block``;
  ``dL_data`` is the change in summed held-out NLL (nats) when the cluster's held-out inputs are routed to the
  candidate instead of the current router, ``dL_model = k/2 ln n`` (BIC; k trainable parameters, n training
  tokens). Each decision is one JSON line (python logging, and ``log_path`` when given).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import LocalistConfigError
from ..utils import pad_right
from .config import check_r, resolve_entry_path, resolve_theta_block
from .exhaustion import exhausted_inputs
from .store import load_causal_lm

TRIGGERS = ("both", "entropy", "exhausted")

logger = logging.getLogger(__name__)

_TEXT_KEYS = ("input_ids", "text")
_LABEL_KEYS = ("label", "labels", "domain")


# ---------------------------------------------------------------------------------------------- data
def encode_inputs(router, data: Any, need_labels: bool) -> tuple[list[list[int]], list[Any] | None]:
    """Token id lists (and labels) from texts, token ids, (x, label) pairs, dicts, dicts of lists or a
    ``datasets.Dataset`` (columns input_ids or text, and label / labels / domain; ClassLabel ints become names)."""
    label_names = None
    features = getattr(data, "features", None)
    if features is not None and hasattr(data, "column_names"):  # datasets.Dataset
        col = next((k for k in _LABEL_KEYS if k in data.column_names), None)
        label_names = getattr(features.get(col), "names", None) if col else None
        data = {k: data[k] for k in data.column_names if k in _TEXT_KEYS + _LABEL_KEYS}
    xs: list[Any]
    labels: list[Any] | None
    if isinstance(data, dict):
        xkey = next((k for k in _TEXT_KEYS if k in data), None)
        lkey = next((k for k in _LABEL_KEYS if k in data), None)
        if xkey is None:
            raise LocalistConfigError(f"the data has keys {sorted(data)}; expected one of {list(_TEXT_KEYS)}")
        xs, labels = list(data[xkey]), (list(data[lkey]) if lkey else None)
    elif isinstance(data, (list, tuple)):
        xs, labels = [], []
        for item in data:
            if isinstance(item, dict):
                xkey = next((k for k in _TEXT_KEYS if k in item), None)
                lkey = next((k for k in _LABEL_KEYS if k in item), None)
                if xkey is None:
                    raise LocalistConfigError(f"a data item has keys {sorted(item)}; expected {list(_TEXT_KEYS)}")
                xs.append(item[xkey])
                labels.append(item.get(lkey) if lkey else None)
            elif isinstance(item, tuple) and len(item) == 2 and not all(isinstance(t, int) for t in item):
                xs.append(item[0])
                labels.append(item[1])
            else:
                xs.append(item)
                labels.append(None)
        if all(label is None for label in labels):
            labels = None
    else:
        raise LocalistConfigError(f"unsupported data of type {type(data).__name__}: give texts, token id lists, "
                                  "(input, label) pairs, dicts or a datasets.Dataset")
    if not xs:
        raise LocalistConfigError("the data is empty")
    if need_labels and (labels is None or any(label is None for label in labels)):
        raise LocalistConfigError("router fit data needs a label (a specialist name) for every input")
    if labels is not None and label_names is not None:
        labels = [label_names[label] if isinstance(label, int) else label for label in labels]
    return [_to_ids(router, x) for x in xs], labels


def _to_ids(router, x: Any) -> list[int]:
    if isinstance(x, str):
        if router.tokenizer is None:
            raise LocalistConfigError("texts need a tokenizer: pass tokenizer= to from_specialists / from_pretrained, "
                                      "or give token ids")
        ids = router.tokenizer(x)["input_ids"]
    elif torch.is_tensor(x):
        ids = x.tolist()
    else:
        ids = list(x)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise LocalistConfigError(f"an input is empty or not a sequence of token ids: {str(x)[:80]!r}")
    return ids[: router.config.max_router_tokens]


def _pad_id(router) -> int:
    return router.base_model_loaded.config.get_text_config().pad_token_id or 0


def features(router, seqs: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
    """(N, H) pooled base hidden states of the token id lists ``seqs``."""
    out = [router.pooled_features(*pad_right(seqs[i: i + batch_size], _pad_id(router)))
           for i in range(0, len(seqs), batch_size)]
    return torch.cat(out)


def _standardise(router, x: torch.Tensor, isotropic: bool) -> None:
    mean = x.mean(0)
    if x.shape[0] < 2:
        scale = torch.ones_like(mean)
    elif isotropic:
        scale = torch.full_like(mean, float(x.var(0, unbiased=False).mean().sqrt().clamp_min(1e-6)))
    else:
        std = x.std(0, unbiased=False)
        scale = std.clamp_min(float(std.median().clamp_min(1e-6)) * 1e-2)
    with torch.no_grad():
        router.feature_mean.copy_(mean)
        router.feature_scale.copy_(scale)


def check_labels(router, labels: Sequence[Any], what: str) -> list[int]:
    names = router.specialist_names
    unknown = sorted({str(label) for label in labels if label not in names})
    if unknown:
        raise LocalistConfigError(f"{what} has label(s) {unknown} that name no specialist; the router's specialists "
                                  f"are {names}")
    return [names.index(label) for label in labels]


# ---------------------------------------------------------------------------------------------- fitting
def fit_router(router, dataset: Any, *, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3,
               label_smoothing: float = 0.1, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Fit the router (re-initialised) on domain-labelled data, full-batch AdamW on the pooled features.

    ``dataset``: texts or token ids with labels naming specialists (see :func:`encode_inputs`). An unknown label
    raises ``LocalistConfigError`` naming it. ``label_smoothing`` (default 0.1) keeps the probabilities from
    saturating on separable domains, so that H_domain stays informative for recruitment. The features and
    labels are kept in memory, so that recruitment can refit the router with a new specialist. Returns and logs
    the training accuracy and loss.
    """
    seqs, labels = encode_inputs(router, dataset, need_labels=True)
    y = torch.tensor(check_labels(router, labels, "the router fit data"))
    x = features(router, seqs, batch_size)
    opts = {"steps": steps, "lr": lr, "weight_decay": weight_decay, "label_smoothing": label_smoothing, "seed": seed}
    result = _fit_on_features(router, x, y, **opts)
    router._fit_cache = {"features": x, "labels": [router.specialist_names[i] for i in y.tolist()], "opts": opts}
    missing = [n for n in router.specialist_names if n not in set(labels)]
    if missing:
        logger.warning("router fit data has no example of specialist(s) %s: they will rarely be chosen", missing)
    logger.info(json.dumps(result))
    return result


def _fit_on_features(router, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, weight_decay: float,
                     label_smoothing: float, seed: int) -> dict[str, Any]:
    _standardise(router, x, isotropic=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in router.router.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.02)
                mod.bias.zero_()
    opt = torch.optim.AdamW(list(router.router.parameters()), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(router.router_logits_from_features(x), y,
                                               label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = router.router_logits_from_features(x)
        router.router_fitted.fill_(1)
    names = router.specialist_names
    return {"event": "fit_router", "n": len(y), "steps": steps, "loss": float(loss.detach()),
            "train_accuracy": float((logits.argmax(-1) == y).float().mean()),
            "counts": {n: int((y == i).sum()) for i, n in enumerate(names)}}


def init_router_from_prompts(router, prompts: dict[str, Sequence[Any]], *, temperature: float = 1.0,
                             batch_size: int = 32) -> dict[str, Any]:
    """Class-mean prototypes: with standardised features z, prototype mu_m and pooled within-class variance s2,
    the router logit of m is (z . mu_m - |mu_m|^2 / 2) / (s2 * temperature) (a nearest-prototype Gaussian
    classifier). Every specialist needs at least one prompt. An MLP router is fitted on the prompts instead."""
    if not isinstance(prompts, dict):
        raise LocalistConfigError(
            f"prompts must be a dict specialist name -> list of prompts, got {type(prompts).__name__}")
    names = router.specialist_names
    check_labels(router, list(prompts), "prompts")
    missing = [n for n in names if not prompts.get(n)]
    if missing:
        raise LocalistConfigError(f"no prompts for specialist(s) {missing}: give at least one per specialist")
    if router.config.router_hidden_size:
        return fit_router(router, [(p, n) for n in names for p in prompts[n]], batch_size=batch_size)
    if not temperature > 0:
        raise LocalistConfigError(f"temperature={temperature!r} must be > 0")
    per = [features(router, [_to_ids(router, p) for p in prompts[n]], batch_size) for n in names]
    _standardise(router, torch.cat(per), isotropic=True)
    z = [(f - router.feature_mean) / router.feature_scale for f in per]
    mu = torch.stack([zi.mean(0) for zi in z])
    within = [((zi - m) ** 2).sum(1) for zi, m in zip(z, mu) if zi.shape[0] > 1]
    s2 = float(torch.cat(within).mean() / mu.shape[1]) if within else 1.0
    s2 = max(s2, 1e-3) * temperature
    layer = router.output_layer
    with torch.no_grad():
        layer.weight.copy_(mu / s2)
        layer.bias.copy_(-(mu ** 2).sum(1) / (2 * s2))
        router.router_fitted.fill_(1)
    result = {"event": "init_router_from_prompts", "prompts": {n: len(prompts[n]) for n in names}, "s2": s2}
    logger.info(json.dumps(result))
    return result


def route_data(router, data: Any, batch_size: int = 32) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """(token id lists, pooled features (N, H), router probabilities (N, M)) of ``data``."""
    seqs, _ = encode_inputs(router, data, need_labels=False)
    x = features(router, seqs, batch_size)
    with torch.no_grad():
        probs = router.router_logits_from_features(x).softmax(-1)
    return seqs, x, probs


def domain_entropy(router, data: Any, batch_size: int = 32) -> torch.Tensor:
    """H_domain = -sum_m pi_m ln pi_m (nats) of each input."""
    return torch.special.entr(route_data(router, data, batch_size)[2]).sum(-1)


# ---------------------------------------------------------------------------------------------- recruitment
@dataclass
class RouterRecruitmentResult:
    """What a recruitment pass saw and decided. ``decisions``: one dict per candidate (also logged)."""

    n_inputs: int
    n_confused: int  # inputs flagged by either trigger
    threshold: float  # gamma ln M (nats)
    theta_llm: float
    decisions: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    n_entropy: int = 0  # flagged by H_domain > gamma ln M
    n_exhausted: int = 0  # flagged by the chosen specialist's exhausted block recruitment
    specialist_status: list[dict[str, Any]] = field(default_factory=list)  # block recruitment per routed-to specialist


def summed_nll(fn, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of scored tokens) of ``fn(ids, mask) -> logits`` over ``seqs``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[i: i + batch_size], pad_id)
            logits = fn(ids, mask)[:, :-1].float()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool()
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return total, count


def _train_candidate(router, seqs, candidate: str, lora_config: Any, steps: int, lr: float, batch_size: int,
                     seed: int):
    cfg = router.config
    base_loc = resolve_entry_path(router._root, "the base model", cfg.base_model_path, cfg.base_source)
    torch.manual_seed(seed)
    # A localist base gives a localist candidate: it trains under the blocks it will run with inside the router.
    model = load_causal_lm(base_loc)
    if candidate == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft 0.21 calls transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, lora_config or LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = _pad_id(router)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            ids, mask = pad_right(rng.sample(list(seqs), min(batch_size, len(seqs))), pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    model.eval()
    return model, sum(p.numel() for p in params), sum(len(s) - 1 for s in seqs)


def _choose_k(z: torch.Tensor, n_clusters: int | None, max_clusters: int, min_size: int, min_silhouette: float,
              seed: int) -> Any:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = z.numpy()
    if n_clusters is not None:
        return KMeans(n_clusters=min(n_clusters, len(x)), n_init=10, random_state=seed).fit(x)
    best, best_score = KMeans(n_clusters=1, n_init=1, random_state=seed).fit(x), min_silhouette
    for k in range(2, min(max_clusters, len(x) // max(min_size, 1)) + 1):
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
        score = float(silhouette_score(x, km.labels_))
        if score > best_score:
            best, best_score = km, score
    return best


def _fit_new_row(router, z_pos: torch.Tensor, z_other: torch.Tensor, y_other: torch.Tensor, steps: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the router's new output row: trained with the old rows frozen, so that the cluster's
    inputs route to the new specialist and the other inputs keep their current specialist."""
    head = router.router
    hidden = head[:-1] if isinstance(head, nn.Sequential) else nn.Identity()
    with torch.no_grad():
        p = hidden(torch.cat([z_pos, z_other]))
        old = router.output_layer(p)
    y = torch.cat([torch.full((len(z_pos),), old.shape[1]), y_other])
    torch.manual_seed(seed)
    w = torch.zeros(p.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.cat([old, (p @ w + b)[:, None]], 1)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def recruit_specialist(router, data: Any, *, output_dir: str | os.PathLike | None = None, gamma: float | None = None,
                       r: float | None = None, theta_block: float | None = None, candidate: str = "lora",
                       lora_config: Any = None, n_clusters: int | None = None, max_clusters: int = 4,
                       min_cluster_size: int = 8, min_silhouette: float = 0.2, train_steps: int = 60,
                       lr: float = 3e-3, batch_size: int = 8, heldout_fraction: float = 0.3,
                       name_prefix: str = "recruited", log_path: str | os.PathLike | None = None,
                       refit_steps: int = 200, seed: int = 0, trigger: str = "both",
                       min_confused_fraction: float = 0.5, epsilon: float | None = None) -> RouterRecruitmentResult:
    """One pass of LLM-level recruitment on unlabelled ``data`` (texts or token id lists).

    Inputs with ``H_domain > gamma ln M`` are clustered (k-means on standardised pooled hidden states; k given by
    ``n_clusters`` or chosen by silhouette up to ``max_clusters``, 1 when no k reaches ``min_silhouette``: a
    single blob split in two scores about 0.1 in these features, so k > 1 needs clearly separated groups);
    clusters under ``min_cluster_size`` are dropped. Per cluster a candidate (``candidate='lora'``: peft
    ``get_peft_model`` on a fresh copy of the base, ``lora_config`` or r=4 on all linear layers; ``'full'``:
    a full fine-tune) is trained ``train_steps`` steps on the cluster minus a held-out share, and accepted iff
    ``dL_total <= -theta_LLM`` (``theta_LLM = r * theta_block``; r in [50, 200], defaults from the config).
    An accepted candidate is saved to ``output_dir/<name>`` and added to the router, whose output layer grows by a
    row fitted so that the cluster routes to it (the old rows frozen); when the router was fitted with
    :func:`fit_router` in this session, the whole router is then refit on that data plus the cluster, labelled
    with the new name. Later clusters are judged against the updated router. "With the candidate routed" means
    the cluster's held-out inputs go to the candidate alone; "without" is the router as it is (its routing mode).
    With a single specialist H_domain is always 0, so nothing is confused by the entropy trigger.

    ``trigger``: which inputs are candidates. ``'entropy'``: ``H_domain > gamma ln M``; ``'exhausted'``: inputs
    routed (argmax) to a specialist whose block recruitment is exhausted and which is still confused on at least
    ``min_confused_fraction`` of their tokens (``H_t > ln max(|A_b(t)|, 1) + epsilon`` inside the specialist;
    ``epsilon`` defaults to the specialist's own; see :mod:`hf_localist.router.exhaustion`); ``'both'`` (default):
    the union. Each decision records which trigger flagged its cluster's members.
    """
    cfg = router.config
    gamma = cfg.gamma if gamma is None else gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise LocalistConfigError(f"gamma={gamma!r} is invalid: expected a number in [0, 1]")
    r = check_r(cfg.theta_ratio if r is None else r)
    theta_block = resolve_theta_block(cfg.theta_block if theta_block is None else theta_block)
    if theta_block < 0:
        raise LocalistConfigError(f"theta_block={theta_block!r} must be >= 0")
    if candidate not in ("lora", "full"):
        raise LocalistConfigError(f"candidate={candidate!r} is invalid: choose 'lora' or 'full'")
    if not 0.0 < heldout_fraction < 1.0:
        raise LocalistConfigError(f"heldout_fraction={heldout_fraction!r} must lie in (0, 1)")
    if trigger not in TRIGGERS:
        raise LocalistConfigError(f"trigger={trigger!r} is invalid: choose one of {list(TRIGGERS)}")
    theta_llm = r * theta_block
    seqs, x, probs = route_data(router, data)
    n_spec = len(router.specialist_names)
    threshold = gamma * math.log(n_spec)
    h = torch.special.entr(probs).sum(-1)
    by_entropy = (h > threshold).nonzero().squeeze(1).tolist() if trigger != "exhausted" else []
    by_exhaustion, statuses = [], []
    if trigger != "entropy" and seqs:
        by_exhaustion, statuses = exhausted_inputs(router, seqs, probs.argmax(-1), pad_id=_pad_id(router),
                                                   epsilon=epsilon, min_confused_fraction=min_confused_fraction)
    confused = sorted(set(by_entropy) | set(by_exhaustion))
    result = RouterRecruitmentResult(len(seqs), len(confused), threshold, theta_llm)
    result.n_entropy, result.n_exhausted, result.specialist_status = len(by_entropy), len(by_exhaustion), statuses
    _log({"event": "llm_recruitment_scan", "n_inputs": len(seqs), "n_confused": len(confused),
          "n_entropy_trigger": len(by_entropy), "n_exhausted_trigger": len(by_exhaustion), "trigger": trigger,
          "specialists": statuses, "threshold": threshold, "gamma": gamma, "M": n_spec, "theta_LLM": theta_llm},
         log_path)
    if len(confused) < min_cluster_size:
        return result
    z = ((x - router.feature_mean) / router.feature_scale).float()
    km = _choose_k(z[confused], n_clusters, max_clusters, min_cluster_size, min_silhouette, seed)
    clusters = [[confused[i] for i in range(len(confused)) if km.labels_[i] == c] for c in range(km.n_clusters)]
    clusters = sorted((c for c in clusters if len(c) >= min_cluster_size), key=len, reverse=True)
    pad = _pad_id(router)
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="localist-recruited-")
        logger.warning("recruit_specialist: no output_dir, accepted specialists go to the temporary %s; save the "
                       "router with copy_specialists=True to keep them", output_dir)
    confused_set, entropy_set, exhausted_set = set(confused), set(by_entropy), set(by_exhaustion)
    for ci, members in enumerate(clusters):
        rng = random.Random(seed + ci)
        members = list(members)
        rng.shuffle(members)
        n_held = min(max(1, round(heldout_fraction * len(members))), len(members) - 1)
        held, train = [seqs[i] for i in members[:n_held]], [seqs[i] for i in members[n_held:]]
        model, k, n = _train_candidate(router, train, candidate, lora_config, train_steps, lr, batch_size, seed + ci)
        nll_with, n_tok = summed_nll(lambda i, m: model(input_ids=i, attention_mask=m).logits, held, pad)
        nll_without, _ = summed_nll(lambda i, m: router(i, attention_mask=m).logits, held, pad)
        d_data, d_model = nll_with - nll_without, 0.5 * k * math.log(max(n, 2))
        accepted = d_data + d_model <= -theta_llm
        name = path = None
        if accepted:
            name = _unique_name(router, name_prefix)
            path = os.path.join(os.fspath(output_dir), name)
            if candidate == "lora":  # adapter_config.json + adapter_model.safetensors (base weights are unchanged)
                model.save_pretrained(path, save_embedding_layers=False)
            else:
                model.save_pretrained(path)
        decision = {"event": "llm_recruitment", "cluster": ci, "cluster_size": len(members), "n_train": len(train),
                    "n_heldout": len(held), "heldout_tokens": n_tok, "nll_without": nll_without, "nll_with": nll_with,
                    "dL_data": d_data, "dL_model": d_model, "dL_total": d_data + d_model, "k_params": k, "n": n,
                    "theta_LLM": theta_llm, "r": r, "theta_block": theta_block, "gamma": gamma,
                    "candidate": candidate, "train_steps": train_steps, "accepted": bool(accepted),
                    "by_trigger": {"entropy": sum(i in entropy_set for i in members),
                                   "exhausted": sum(i in exhausted_set for i in members)},
                    "reason": "accepted" if accepted else "no_gain", "name": name,
                    "path": path, "members": members}
        _log({k_: v for k_, v in decision.items() if k_ != "members"}, log_path)
        result.decisions.append(decision)
        if accepted:
            others = [i for i in range(len(seqs)) if i not in confused_set]
            with torch.no_grad():
                y_other = router.router_logits_from_features(x[others]).argmax(-1) if others else \
                    torch.zeros(0, dtype=torch.long)
            row = _fit_new_row(router, z[members], z[others], y_other, refit_steps, seed)
            info = {"method": "recruit_specialist", **{k_: decision[k_] for k_ in (
                "cluster_size", "gamma", "candidate", "train_steps", "dL_data", "dL_model", "dL_total", "theta_LLM",
                "k_params", "n")}}
            router.add_specialist(name, path, recruitment=info, init_row=row)
            result.accepted.append(name)
            cache = getattr(router, "_fit_cache", None)
            if cache is not None:  # refit the whole router on its fit data plus the cluster, labelled with the new name
                cache["features"] = torch.cat([cache["features"], x[members]])
                cache["labels"] = cache["labels"] + [name] * len(members)
                y_all = torch.tensor([router.specialist_names.index(n) for n in cache["labels"]])
                logger.info(json.dumps({**_fit_on_features(router, cache["features"], y_all, **cache["opts"]),
                                        "event": "refit_router", "new_specialist": name}))
    return result


def _unique_name(router, prefix: str) -> str:
    i = 0
    while f"{prefix}_{i}" in router.specialist_names:
        i += 1
    return f"{prefix}_{i}"


def _log(record: dict[str, Any], log_path: str | os.PathLike | None) -> None:
    line = json.dumps(record, default=float)
    logger.info(line)
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
