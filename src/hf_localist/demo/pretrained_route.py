"""Part 2 of the pretrained-model demo: LoRA specialists per label on the user's base, behind a router.

Each label gets a LoRA adapter (peft) trained briefly on that label's training texts, one text per input
(``[sink] text``). ``LocalistRouterModel.from_specialists`` puts them behind a router on the base's pooled hidden
states. Two routers are measured on the held-out texts: the fitted one (``fit_router`` on the training labels) and
the training-free prototype router (``init_router_from_prompts`` with ``prompts_per_label`` texts per label). The
confidence threshold is calibrated (``calibrate_confidence``) on a held-out part of the training texts: the lowest
threshold at which the routed inputs reach ``target_accuracy``; below it an input goes to the base.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..router.model import LocalistRouterModel
from ..router.recruit import features
from ..utils import pad_right
from .passages import LabeledText, sink_token_id, token_nll


@dataclass
class PretrainedRouteSettings:
    train_per_label: int = 250  # router fit texts per label (the specialists train on the same texts)
    test_per_label: int = 50
    calibration_fraction: float = 0.2  # of the training texts, held out to calibrate the confidence threshold
    max_tokens: int = 64
    specialist_steps: int = 10
    specialist_batch_size: int = 4
    lr: float = 1e-3
    lora_r: int = 8
    prompts_per_label: int = 8  # the prototype router's examples per label
    # A 576-wide feature on 200 texts per label: the default fit (weight decay 1e-3, 300 steps) reaches training
    # accuracy 1.0 and 0.72-0.79 held out on SmolLM2 / AG News; strong decay and fewer steps 0.86 (as an L2
    # logistic regression with C = 0.01 does: 0.88). See docs/real-models.md.
    router_steps: int = 100
    router_weight_decay: float = 10.0
    target_accuracy: float = 0.95
    eval_batch_size: int = 16


def specialist_name(label: str) -> str:
    """A valid specialist name for a label value (``3`` -> ``label_3``; ``Sci/Tech`` -> ``Sci_Tech``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.-")[:60]
    return name if name and not name[0].isdigit() else f"label_{name or 'x'}"


def _train_adapter(base, seqs, s: PretrainedRouteSettings, pad_id: int, seed: int, out_dir: str, bar) -> tuple:
    from peft import LoraConfig, get_peft_model  # peft is a dependency; imported where adapters are made

    model = get_peft_model(base, LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(s.specialist_steps):
        ids, mask = pad_right(rng.sample(seqs, min(s.specialist_batch_size, len(seqs))), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
    model.eval()
    model.save_pretrained(out_dir)
    return model.unload(), float(loss.detach())  # unload(): the base without LoRA layers, for the next adapter


def _accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(-1) == y).float().mean())


@torch.no_grad()
def _nll(fn, seqs, pad_id: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i: i + batch_size], pad_id)
        nll = token_nll(fn(ids, mask, i), ids)[:, 2:]  # the sink and the first text token are not scored
        keep = mask[:, 2:].bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


def run_pretrained_routing(model_dir: str, tokenizer, text: LabeledText, s: PretrainedRouteSettings, seed: int,
                           progress: bool = True, keep_dir: str | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    sink = sink_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sink
    names = {label: specialist_name(label) for label in text.labels}
    if len(set(names.values())) < len(names):
        names = {label: f"label_{i}" for i, label in enumerate(text.labels)}

    def enc(texts):
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[sink] + x[: s.max_tokens] for x in ids if len(x) >= 2]

    train = {label: enc(text.train[label][: s.train_per_label]) for label in text.labels}
    test = [(x, k) for k, label in enumerate(text.labels) for x in enc(text.test[label][: s.test_per_label])]
    work = keep_dir or tempfile.mkdtemp(prefix="hf_localist_demo_route_")
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        n_params = sum(p.numel() for p in base.parameters())
        losses, paths = {}, {}
        bar = tqdm(total=len(names) * s.specialist_steps, desc="route: LoRA specialists", unit="step",
                   disable=not progress)
        for j, label in enumerate(text.labels):
            paths[names[label]] = os.path.join(work, names[label])
            base, losses[names[label]] = _train_adapter(base, train[label], s, pad_id, seed + 10 + j,
                                                        paths[names[label]], bar)
        bar.close()
        del base
        router = LocalistRouterModel.from_specialists(model_dir, paths, routing="hard", tokenizer=tokenizer,
                                                      model_kwargs={"dtype": torch.float32})
        router.load_specialists()
        order = router.specialist_names
        label_of = {names[label]: label for label in text.labels}
        fit_rows, cal_rows = [], []
        for label in text.labels:
            n_cal = int(len(train[label]) * s.calibration_fraction)
            cal_rows += [(x, names[label]) for x in train[label][:n_cal]]
            fit_rows += [(x, names[label]) for x in train[label][n_cal:]]
        y_test = torch.tensor([order.index(names[text.labels[k]]) for _, k in test])
        x_test = features(router, [x for x, _ in test])

        t0 = time.perf_counter()
        prompts = {names[label]: train[label][: s.prompts_per_label] for label in text.labels}
        router.init_router_from_prompts(prompts)
        proto_acc = _accuracy(router.router_logits_from_features(x_test).softmax(-1), y_test)
        proto_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit = router.fit_router(fit_rows, steps=s.router_steps, weight_decay=s.router_weight_decay, seed=seed)
        fit_time = time.perf_counter() - t0
        probs = router.router_logits_from_features(x_test).softmax(-1)
        fitted_acc = _accuracy(probs, y_test)
        calibration = router.calibrate_confidence(cal_rows, target_accuracy=s.target_accuracy)
        confident = probs.max(-1).values >= router.config.confidence_threshold
        routed_acc = _accuracy(probs[confident], y_test[confident]) if bool(confident.any()) else float("nan")

        seqs = [x for x, _ in test]
        truth = [order[int(i)] for i in y_test]
        modes = {
            "base alone": lambda i, m, k: router.base_model_loaded(input_ids=i, attention_mask=m).logits,
            "router (hard)": lambda i, m, k: router(i, attention_mask=m, confidence_threshold=0.0).logits,
            "router (hard, base below the threshold)": lambda i, m, k: router(i, attention_mask=m).logits,
            "oracle (true label)": lambda i, m, k: router(i, attention_mask=m,
                                                          route_to=truth[k: k + i.shape[0]]).logits,
        }
        rows = []
        for mode, fn in tqdm(modes.items(), desc="route: evaluate", unit="mode", disable=not progress):
            if mode == "base alone":
                with router.base_only():
                    nll = _nll(fn, seqs, pad_id, s.eval_batch_size)
            else:
                nll = _nll(fn, seqs, pad_id, s.eval_batch_size)
            rows.append({"mode": mode, "nll": nll, "perplexity": math.exp(nll)})
        confusion = [[0] * len(order) for _ in order]
        for c, y in zip(probs.argmax(-1).tolist(), y_test.tolist()):
            confusion[y][c] += 1
    finally:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "settings": asdict(s), "specialists": order, "labels": [label_of[n] for n in order],
        "specialist_kind": f"LoRA r={s.lora_r} on the base ({s.specialist_steps} steps)",
        "specialist_final_train_loss": losses, "base_parameters": n_params,
        "fit_texts": len(fit_rows), "calibration_texts": len(cal_rows), "test_texts": len(test),
        "routing_accuracy": fitted_acc, "prototype_routing_accuracy": proto_acc,
        "prototype_prompts_per_label": s.prompts_per_label, "prototype_time_s": proto_time,
        "router_fit": fit, "router_fit_time_s": fit_time, "confidence": {
            **calibration, "test_coverage": float(confident.float().mean()), "test_routed_accuracy": routed_acc},
        "rows": rows, "confusion": confusion, "time_s": time.perf_counter() - start,
    }
