"""Part 3 of ``hf-localist demo``: route between topic specialists with ``LocalistRouterModel``.

The base is the demo's plain model (trained at dial 0 in part 1, unpatched). Each topic gets a *specialist*: a
brief full fine-tune of the base on that topic's training articles. A fifth fine-tune on all four topics with the
same budget is the control: it shows how much of a specialist's gain is only the extra training (and the change
of format: here an input is one article, ``[BOS] article``, with no anchor token). The router (a linear layer on
the base's mean-pooled last hidden states) is fit on the training articles' topic labels; then every held-out
article is scored by the base, the control, and the router in hard, soft and top-2 mode, and by oracle routing
(each article sent to its own topic's specialist). Checkpoints go to a temporary directory that is removed
afterwards (``keep_dir`` keeps them).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from ..router.model import LocalistRouterModel
from ..utils import pad_right


@dataclass
class RouteSettings:
    specialist_steps: int = 40  # optimiser steps per specialist (and for the all-topic control)
    batch_size: int = 16
    lr: float = 3e-4  # a gentle rate: 240 articles per topic overfit fast
    router_steps: int = 300  # full-batch steps of the router fit
    eval_batch_size: int = 16


_pad = pad_right  # right-padded (input_ids, attention_mask)


def fine_tune(model, seqs: Sequence[list[int]], s: RouteSettings, pad_id: int, seed: int, bar=None) -> float:
    """AdamW with a short warm-up and linear decay; returns the mean training loss of the last 10 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.1)
    warm = max(1, s.specialist_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * (1.0 - 0.7 * k / max(s.specialist_steps, 1)))
    rng = random.Random(seed)
    model.train()
    losses = []
    for _ in range(s.specialist_steps):
        ids, mask = _pad(rng.sample(list(seqs), min(s.batch_size, len(seqs))), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
    model.eval()
    tail = losses[-10:] or [float("nan")]
    return sum(tail) / len(tail)


@torch.no_grad()
def _score(fn: Callable, seqs: Sequence[list[int]], pad_id: int, batch_size: int):
    """Summed NLL, scored tokens, and per input the router's argmax, probabilities and H_domain (if routed)."""
    nll, count, chosen, probs, entropy = 0.0, 0, [], [], []
    for i in range(0, len(seqs), batch_size):
        ids, mask = _pad(seqs[i: i + batch_size], pad_id)
        logits, out = fn(ids, mask, i)
        tok = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        nll += float(tok[keep].sum())
        count += int(keep.sum())
        if out is not None:
            chosen += out.router_probs.argmax(-1).tolist()
            probs += out.router_probs.tolist()
            entropy += out.domain_entropy.tolist()
    return nll, count, chosen, probs, entropy


def run_routing(base_model, tokenizer, train_articles, test_articles, topics: Sequence[str],
                s: RouteSettings, seed: int, max_tokens: int, progress: bool = True,
                keep_dir: str | None = None) -> dict[str, Any]:
    """Specialists, router, evaluation (see the module docstring). ``base_model`` is a plain causal LM."""


    start = time.perf_counter()
    pad_id = tokenizer.pad_token_id
    enc = lambda arts: [(tokenizer(a.text)["input_ids"][: max_tokens + 1], a.topic) for a in arts]  # noqa: E731
    train, test = [x for x in enc(train_articles) if len(x[0]) > 1], [x for x in enc(test_articles) if len(x[0]) > 1]
    work = keep_dir or tempfile.mkdtemp(prefix="hf_localist_demo_route_")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' own bars (loading weights, writing shards) per checkpoint
    try:
        base_dir = os.path.join(work, "base")
        base_model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        jobs = [(name, [x for x, t in train if t == k]) for k, name in enumerate(topics)]
        jobs.append(("all_topics", [x for x, _ in train]))
        paths, losses = {}, {}
        bar = tqdm(total=len(jobs) * s.specialist_steps, desc="route: fine-tune specialists", unit="step",
                   disable=not progress)
        for j, (name, seqs) in enumerate(jobs):
            bar.set_postfix(specialist=name)
            model = AutoModelForCausalLM.from_pretrained(base_dir)
            losses[name] = fine_tune(model, seqs, s, pad_id, seed + 100 + j, bar)
            paths[name] = os.path.join(work, name)
            model.save_pretrained(paths[name])
            del model
        bar.close()
        control = AutoModelForCausalLM.from_pretrained(paths.pop("all_topics")).eval()

        router = LocalistRouterModel.from_specialists(base_dir, {n: paths[n] for n in topics}, routing="hard",
                                                      tokenizer=tokenizer, routing_k=2)
        router.load_specialists()
        t0 = time.perf_counter()
        fit = router.fit_router([(x, topics[t]) for x, t in train], steps=s.router_steps, seed=seed)
        fit_time = time.perf_counter() - t0
        labels = [t for _, t in test]
        seqs = [x for x, _ in test]
        base = router.base_model_loaded
        modes: list[tuple[str, Callable, bool]] = [
            ("base alone", lambda i, m, k: (base(input_ids=i, attention_mask=m).logits, None), False),
            ("all-topic fine-tune (control)", lambda i, m, k: (control(input_ids=i, attention_mask=m).logits, None),
             False),
        ]
        for name, kw in (("hard", {"routing": "hard"}), ("soft", {"routing": "soft"}),
                         ("top-2", {"routing": "top_k", "routing_k": 2})):
            modes.append((name, lambda i, m, k, kw=kw: (lambda o: (o.logits, o))(router(i, attention_mask=m, **kw)),
                          True))
        modes.append(("oracle (true topic)", lambda i, m, k: (router(
            i, attention_mask=m, route_to=[topics[t] for t in labels[k: k + i.shape[0]]]).logits, None), False))
        rows, confusion = [], None
        for name, fn, routed in tqdm(modes, desc="route: evaluate", unit="mode", disable=not progress):
            if name == "base alone":
                with router.base_only():
                    nll, count, chosen, probs, entropy = _score(fn, seqs, pad_id, s.eval_batch_size)
            else:
                nll, count, chosen, probs, entropy = _score(fn, seqs, pad_id, s.eval_batch_size)
            row = {"mode": name, "perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
            if routed:
                row["routing_accuracy"] = sum(c == y for c, y in zip(chosen, labels)) / len(labels)
                row["mean_pi_true"] = sum(p[y] for p, y in zip(probs, labels)) / len(labels)
                row["mean_H_domain"] = sum(entropy) / len(entropy)
                if confusion is None:  # the router's argmax: the same in every mode
                    confusion = [[0] * len(topics) for _ in topics]
                    for c, y in zip(chosen, labels):
                        confusion[y][c] += 1
            rows.append(row)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "settings": asdict(s), "specialists": list(topics), "specialist_kind": "full fine-tune of the base",
        "specialist_final_train_loss": losses, "train_articles": len(train), "test_articles": len(test),
        "router_fit": fit, "router_fit_time_s": fit_time, "rows": rows, "confusion": confusion,
        "routing_accuracy": rows[2]["routing_accuracy"], "time_s": time.perf_counter() - start,
    }
