"""Generation of ``LocalistRouterModel``: hard routing (each specialist's own ``generate``) and mixtures (soft /
top_k: one KV cache per specialist, next-token distributions mixed at every step). ``d`` is the routing decision
of the prompt (``RoutingDecision``); ``model_of(m)`` returns specialist ``m`` as a callable causal LM."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32 / float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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
                        past_key_values=cache, use_cache=True)
            state[m][2] = out.past_key_values
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
