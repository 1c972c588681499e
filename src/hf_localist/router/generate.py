"""Generation of ``LocalistRouterModel``: hard routing (each specialist's own ``generate``) and mixtures (soft /
top_k: one KV cache per specialist, next-token distributions mixed at every step). ``d`` is the routing decision
of the prompt (``RoutingDecision``); ``model_of(m)`` returns specialist ``m`` as a callable causal LM."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32 / float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def to_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts moved to left padding (real tokens last, in order): a decoder continues a prompt from its
    last position, which for a right-padded row is padding (the shorter prompt got a wrong continuation)."""
    if mask.shape[1] == 0 or bool((mask[:, -1] != 0).all()):
        return ids, mask
    order = torch.argsort((mask != 0).to(torch.int8), dim=1, stable=True)  # pads first, both groups keep their order
    return ids.gather(1, order), mask.gather(1, order)


def cache_kwarg(model: Any) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``cache`` since transformers 5.24 (where
    ``past_key_values`` is deprecated), else ``past_key_values``."""
    forward = getattr(model, "forward", None)
    if forward is None:  # BaseOnly: the pool's base model
        forward = getattr(getattr(getattr(model, "pool", None), "base", None), "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, read by its current name first (the old one logs a deprecation)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def generate_hard(model_of: Callable[[int], Any], d, ids, mask, pos, opts: dict) -> torch.Tensor:
    """Hard routing: each group of inputs runs its specialist's own ``generate`` (its KV cache, its sampling)."""
    kw = {k: opts[k] for k in ("max_new_tokens", "do_sample", "eos_token_id", "pad_token_id")}
    if opts["do_sample"]:
        kw.update({k: opts[k] for k in ("temperature", "top_k", "top_p") if opts[k] is not None})
    pieces = {}
    for m in d.chosen[:, 0].unique().tolist():
        idx = (d.chosen[:, 0] == m).nonzero().squeeze(1)
        pieces[m] = (idx, model_of(m).generate(
            input_ids=ids[idx], attention_mask=mask[idx], **kw))
    width = max(p.shape[1] for _, p in pieces.values())
    out = ids.new_full((ids.shape[0], width), opts["pad_token_id"])
    for idx, p in pieces.values():
        out[idx, : p.shape[1]] = p
    return out

def generate_mixture(model_of: Callable[[int], Any], d, ids, mask, pos, opts: dict) -> torch.Tensor:
    """soft / top_k: one KV cache per specialist; each step mixes next-token distributions,
    ``log sum_m w_m p_m`` over the routed specialists, then picks (greedy) or samples with the warpers."""
    warpers = LogitsProcessorList()
    if opts["do_sample"]:
        if opts["temperature"] not in (None, 1.0):
            warpers.append(TemperatureLogitsWarper(opts["temperature"]))
        if opts["top_k"]:
            warpers.append(TopKLogitsWarper(opts["top_k"]))
        if opts["top_p"] is not None and opts["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(opts["top_p"]))
    eos = opts["eos_token_id"]
    eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=ids.device)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if pos is None else pos
    state = {}
    for m in d.chosen.unique().tolist():
        sel = d.chosen == m
        rows = sel.any(1).nonzero().squeeze(1)
        state[m] = [rows, torch.where(sel, d.log_weights, 0.0).sum(1)[rows], None]
    seq, finished = ids, torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    step_ids, step_pos = ids, pos
    for _ in range(opts["max_new_tokens"]):
        mixed = None
        for m, (rows, log_w, cache) in state.items():
            model = model_of(m)
            out = model(input_ids=step_ids[rows], attention_mask=mask[rows], position_ids=step_pos[rows],
                        use_cache=True, **{cache_kwarg(model): cache})
            state[m][2] = output_cache(out)
            lp = upcast(out.logits[:, -1]).log_softmax(-1) + log_w[:, None]
            mixed = lp.new_full((ids.shape[0], lp.shape[-1]), -torch.inf) if mixed is None else mixed
            mixed = mixed.index_copy(0, rows, torch.logaddexp(mixed[rows], lp))
        if opts["do_sample"]:
            scores = warpers(seq, mixed)
            nxt = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        else:
            nxt = mixed.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, opts["pad_token_id"]), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        finished = finished | torch.isin(nxt, eos)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt[:, None]
    return seq
