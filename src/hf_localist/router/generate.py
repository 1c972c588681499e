"""Generation of ``LocalistRouterModel``: hard routing (each specialist's own ``generate``) and mixtures (soft /
top_k: one KV cache per specialist, next-token distributions mixed at every step). ``d`` is the routing decision
of the prompt (``RoutingDecision``); ``model_of(m)`` returns specialist ``m`` as a callable causal LM."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import LocalistConfigError

#: What the soft / top_k mixture loop implements; hard routing passes every argument to the specialist's own
#: ``generate`` (transformers' loop: logits processors, stopping criteria, streamers, ``generation_config``).
MIXTURE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                "repetition_penalty")
#: GenerationConfig entries that say nothing about decoding (or that the loop needs not honour).
_IGNORED = {"transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id", "use_cache"}


def generation_options(mode: str, base: Any, gen_kwargs: dict) -> dict:
    """The decoding options of one ``router.generate`` call: defaults from the base's generation config, then a
    ``generation_config=`` argument, then keyword arguments. Hard routing keeps every other argument for the
    specialists' ``generate`` (``opts["extra"]``); a mixture refuses what its loop does not implement."""
    gen_kwargs = dict(gen_kwargs)
    given = gen_kwargs.pop("generation_config", None)
    if given is not None and not isinstance(given, GenerationConfig):
        raise LocalistConfigError(f"generation_config must be a transformers GenerationConfig, got "
                                  f"{type(given).__name__}")
    gcfg = getattr(base, "generation_config", None)
    opts = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None,
            "eos_token_id": getattr(gcfg, "eos_token_id", None), "pad_token_id": getattr(gcfg, "pad_token_id", None),
            "repetition_penalty": None}
    if given is not None:
        diff = {k: v for k, v in given.to_diff_dict().items() if k not in _IGNORED}
        if mode != "hard":
            unsupported = sorted(set(diff) - set(MIXTURE_KEYS))
            if unsupported:
                raise LocalistConfigError(f"{mode} routing: generation_config sets {unsupported}, which the mixture "
                                          f"loop does not implement (it supports {list(MIXTURE_KEYS)}); hard routing "
                                          "passes every generation argument to transformers")
        opts.update({k: v for k, v in diff.items() if k in MIXTURE_KEYS})
    extra = {k: gen_kwargs.pop(k) for k in list(gen_kwargs) if k not in MIXTURE_KEYS}
    if extra and mode != "hard":
        raise LocalistConfigError(f"{mode} routing: generate() got unsupported argument(s) {sorted(extra)}; the "
                                  f"mixture loop supports {list(MIXTURE_KEYS)} and generation_config= (hard routing "
                                  "passes every transformers generation argument to the specialist's generate)")
    opts.update(gen_kwargs)
    if given is not None:
        extra["generation_config"] = given
    opts["extra"] = extra
    if opts["pad_token_id"] is None:
        opts["pad_token_id"] = base.config.get_text_config().pad_token_id or 0
    return opts


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
    if opts["repetition_penalty"] is not None:
        kw["repetition_penalty"] = opts["repetition_penalty"]
    kw.update(opts.get("extra", {}))  # anything else transformers' generate takes
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
    penalty = LogitsProcessorList()
    if opts["repetition_penalty"] not in (None, 1.0):
        penalty.append(RepetitionPenaltyLogitsProcessor(opts["repetition_penalty"]))
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
        mixed = penalty(seq, mixed)  # on the mixture's log-probabilities, as transformers does on logits
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
