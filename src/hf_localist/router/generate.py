"""Generation of ``LocalistRouterModel``: every routing mode decodes in transformers' own ``generate``.

hard: each group of inputs runs its specialist's own ``generate``; soft / top_k: a :class:`~.mixture.MixtureLM`
(one KV cache per specialist, the mixture's log-probabilities as logits) runs ``GenerationMixin.generate``. Either
way transformers applies the generation config, logits processors and warpers, stopping criteria, streamers, beam
search and sampling. ``d`` is the routing decision of the prompts (``RoutingDecision``); ``model_of(m)`` returns
specialist ``m`` as a causal LM.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import GenerationConfig, GenerationMixin

from ..errors import LocalistConfigError
from .mixture import MixtureLM

#: Arguments of transformers' ``generate`` besides the generation config's fields (handed to it as they are).
GENERATE_ARGUMENTS = frozenset(inspect.signature(GenerationMixin.generate).parameters) - {
    "self", "inputs", "generation_config", "kwargs"} | {"tokenizer", "assistant_tokenizer", "trust_remote_code"}

#: What a mixture (soft / top_k) refuses, with why: it is several models with one cache each.
MIXTURE_REFUSED = {
    "cache": "the mixture builds one KV cache per specialist inside generate; a cache object cannot be passed in",
    "past_key_values": "the mixture builds one KV cache per specialist inside generate; a cache object cannot be "
                       "passed in",
}

#: Generation-config fields that no routing mode can return: the router's output has no attention weights or hidden
#: states (run a specialist's own generate: ``router.get_specialist(name).generate``).
UNRETURNED = ("output_attentions", "output_hidden_states")


@dataclass
class GenerationCall:
    """The settings of one ``router.generate`` call: ``config`` the full generation config, ``arguments`` the other
    arguments of transformers' ``generate`` (logits processors, stopping criteria, streamer, ...)."""

    config: GenerationConfig
    arguments: dict = field(default_factory=dict)

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id


def prepare_generation(mode: str, base: Any, gen_kwargs: dict, return_dict_in_generate: bool) -> GenerationCall:
    """The generation config of one call: the router's defaults (greedy, 20 new tokens, the base's eos / pad / bos
    tokens, pad 0 when it has none), then the fields a ``generation_config=`` argument sets, then keyword arguments
    naming generation-config fields. Everything else is an argument of transformers' ``generate``; hard routing also
    passes model arguments on to the specialists. A mixture refuses what it cannot do, naming the argument."""
    kwargs = dict(gen_kwargs)
    given = kwargs.pop("generation_config", None)
    if given is not None and not isinstance(given, GenerationConfig):
        raise LocalistConfigError(f"generation_config must be a transformers GenerationConfig, got "
                                  f"{type(given).__name__}")
    defaults = getattr(base, "generation_config", None)
    # return_dict_in_generate first: transformers' validation warns about output_scores without it
    config = GenerationConfig(do_sample=False, return_dict_in_generate=bool(return_dict_in_generate), **{
        k: getattr(defaults, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")})
    try:
        if given is not None:
            config.update(**{k: v for k, v in given.to_diff_dict().items() if k != "transformers_version"})
        arguments = config.update(**kwargs)  # the generation-config fields among the keywords; returns the others
    except ValueError as e:  # GenerationConfig.validate: a value it refuses
        raise LocalistConfigError(f"router.generate: invalid generation settings ({e})") from e
    config.return_dict_in_generate = bool(return_dict_in_generate or config.return_dict_in_generate)
    if config.max_new_tokens is None and config.max_length is None:
        config.max_new_tokens = 20
    if config.pad_token_id is None:
        config.pad_token_id = base.config.get_text_config().pad_token_id or 0
    unreturned = [k for k in UNRETURNED if getattr(config, k, None)]
    if unreturned:
        raise LocalistConfigError(f"router.generate: {unreturned} cannot be returned (a router output has no attention "
                                  "weights or hidden states); run one specialist's own generate: "
                                  "router.get_specialist(name).generate(...)")
    if mode != "hard":
        refused = sorted(k for k in arguments if k in MIXTURE_REFUSED and arguments[k] is not None)
        if refused:
            raise LocalistConfigError(f"{mode} routing: generate() argument {refused[0]!r}: "
                                      f"{MIXTURE_REFUSED[refused[0]]} (hard routing passes it to the specialist's "
                                      "own generate)")
        model_args = sorted(k for k in arguments if k not in GENERATE_ARGUMENTS)
        if model_args:
            raise LocalistConfigError(
                f"{mode} routing: generate() got {model_args}, which are neither generation-config fields nor "
                "arguments of transformers' generate; a mixture does not forward model arguments to its specialists "
                "(hard routing does)")
        if config.cache_implementation not in (None, "dynamic"):
            raise LocalistConfigError(f"{mode} routing: cache_implementation={config.cache_implementation!r}: the "
                                      "mixture keeps one dynamic KV cache per specialist (leave it unset)")
    return GenerationCall(config, arguments)


def to_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts moved to left padding (real tokens last, in order): a decoder continues a prompt from its
    last position, which for a right-padded row is padding (the shorter prompt got a wrong continuation)."""
    if mask.shape[1] == 0 or bool((mask[:, -1] != 0).all()):
        return ids, mask
    order = torch.argsort((mask != 0).to(torch.int8), dim=1, stable=True)  # pads first, both groups keep their order
    return ids.gather(1, order), mask.gather(1, order)


@dataclass
class Generated:
    """What a routing mode generated: ``sequences`` (B * n, prompt + new) with n the returned sequences per input;
    ``scores`` / ``logits`` per step (B * rows per input, V) when the config asks for them."""

    sequences: torch.Tensor
    scores: tuple | None = None
    logits: tuple | None = None


def _unpack(out: Any) -> Generated:
    if torch.is_tensor(out):
        return Generated(out)
    return Generated(out.sequences, getattr(out, "scores", None), getattr(out, "logits", None))


def _spread(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of inputs ``idx`` in a batch where each input has ``n`` consecutive rows (beams, returned sequences)."""
    return (idx[:, None] * n + torch.arange(n, device=idx.device)).flatten()


def _merge_steps(pieces: list[tuple[torch.Tensor, tuple | None]], batch: int) -> tuple | None:
    """Per-step (rows, V) tensors of each group merged into (batch * rows per input, V); a step that a group did not
    run (it stopped earlier) is NaN in that group's rows."""
    if any(steps is None for _, steps in pieces):
        return None
    merged = []
    for t in range(max(len(steps) for _, steps in pieces)):
        out = None
        for idx, steps in pieces:
            ref = steps[min(t, len(steps) - 1)]
            n = ref.shape[0] // idx.shape[0]
            out = ref.new_full((batch * n, ref.shape[-1]), torch.nan) if out is None else out
            if t < len(steps):
                out[_spread(idx, n)] = steps[t]
        merged.append(out)
    return tuple(merged)


def generate_hard(model_of: Callable[[int], Any], d, ids: torch.Tensor, mask: torch.Tensor,
                  call: GenerationCall) -> Generated:
    """Hard routing: each group of inputs runs its specialist's own ``generate`` (its KV cache, its sampling)."""
    groups = []
    for m in d.chosen[:, 0].unique().tolist():
        idx = (d.chosen[:, 0] == m).nonzero().squeeze(1)
        out = model_of(m).generate(input_ids=ids[idx], attention_mask=mask[idx], generation_config=call.config,
                                   **call.arguments)
        groups.append((idx, _unpack(out)))
    width = max(g.sequences.shape[1] for _, g in groups)
    n = groups[0][1].sequences.shape[0] // groups[0][0].shape[0]  # sequences returned per input
    seqs = ids.new_full((ids.shape[0] * n, width), call.pad_token_id)
    for idx, g in groups:
        seqs[_spread(idx, n), : g.sequences.shape[1]] = g.sequences
    return Generated(seqs, _merge_steps([(idx, g.scores) for idx, g in groups], ids.shape[0]),
                     _merge_steps([(idx, g.logits) for idx, g in groups], ids.shape[0]))


def generate_mixture(model_of: Callable[[int], Any], d, ids: torch.Tensor, mask: torch.Tensor, call: GenerationCall,
                     base: Any, vocab_size: int) -> Generated:
    """soft / top_k: transformers' ``generate`` on the mixture of the routed specialists (see ``MixtureLM``)."""
    mixture = MixtureLM(d.chosen, d.log_weights, model_of, base, vocab_size)
    return _unpack(mixture.generate(input_ids=ids, attention_mask=mask, generation_config=call.config,
                                    **call.arguments))
