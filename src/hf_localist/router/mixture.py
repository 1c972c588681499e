"""The soft / top_k mixture of specialists as a causal LM that transformers' own ``generate`` drives.

``mixture_log_probs`` is the mixture of docs/design.md section 7: ``log sum_m w_m p_m`` over the specialists routed
to each input (``w`` the router weights, ``p_m`` specialist m's next-token distribution). ``LocalistRouterModel``'s
forward uses it on whole sequences; :class:`MixtureLM` wraps it for ``GenerationMixin.generate``: its forward runs
each routed specialist on its own rows of the batch with its own KV cache (held together in a :class:`MixtureCache`)
and returns the mixture's log-probabilities as logits, so that ``softmax(logits)`` is the mixture and every logits
processor, warper, stopping criterion, streamer and decoding mode of transformers acts on it. A ``MixtureLM`` is built
for one ``generate`` call (it holds that call's routing decision) and dropped after it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import LocalistConfigError, LocalistStateError
from ..patch.cache import output_cache


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32 / float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def forward_parameters(model: Any) -> set[str]:
    """Names of the keyword arguments ``model``'s forward declares (empty when its signature cannot be read)."""
    forward = getattr(model, "forward", None)
    if forward is None:  # BaseOnly: the pool's base model
        forward = getattr(getattr(getattr(model, "pool", None), "base", None), "forward", None)
    try:
        return set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_kwarg(model: Any) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``cache`` since transformers 5.24 (where
    ``past_key_values`` is deprecated), else ``past_key_values``."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def mixture_log_probs(chosen: torch.Tensor, log_weights: torch.Tensor,
                      logits_of: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``log sum_m w_m softmax(logits_m)`` per input: ``chosen`` (B, k) the routed specialists, ``log_weights``
    (B, k) their log-weights, ``logits_of(m, rows)`` specialist m's logits (len(rows), T, V) on those rows of the
    batch. One specialist runs at a time (they need not all be in memory). Returns (B, T, V)."""
    acc = None
    for m in chosen.unique().tolist():
        sel = chosen == m
        rows = sel.any(1).nonzero().squeeze(1)
        log_w = torch.where(sel, log_weights, torch.zeros_like(log_weights)).sum(1)[rows]
        log_p = upcast(logits_of(m, rows)).log_softmax(-1)  # (R, T, V)
        acc = log_p.new_full((chosen.shape[0],) + log_p.shape[1:], -torch.inf) if acc is None else acc
        acc = acc.index_copy(0, rows, torch.logaddexp(acc[rows], log_w.to(log_p)[:, None, None] + log_p))
    return acc


class MixtureCache:
    """One KV cache per routed specialist, each over that specialist's rows of the batch (``rows``, sorted), built by
    the specialist's own forward. What ``generate`` asks of a cache: its length, beam reordering (a beam never leaves
    its input, and all beams of an input are routed alike, so each specialist reorders within its own rows) and
    cropping (assisted decoding, deferred stop checks). Each specialist's cache is the DynamicCache transformers'
    ``generate`` would give that specialist."""

    is_compileable = False  # dynamic caches of several models: no static shapes to compile against

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, Any]] = {}  # m -> (rows (R,), the specialist's cache)
        self.recording = False

    def get(self, m: int, model: Any) -> Any:
        """Specialist m's cache; a new one for ``model`` on its first call (recording its past when asked to)."""
        entry = self.entries.get(m)
        if entry is not None:
            return entry[1]
        config = getattr(model, "config", None)
        if config is None:
            return None  # the model builds its own cache
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        if self.recording:
            cache.activate_past_recording()
        return cache

    def set(self, m: int, rows: torch.Tensor, cache: Any) -> None:
        self.entries[m] = (rows, cache)

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # attention caches: generate may slice the prompt against the cached length

    @property
    def is_croppable(self) -> bool:
        return all(getattr(c, "is_croppable", False) for _, c in self.entries.values())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        for _, cache in self.entries.values():
            return cache.get_seq_length(layer_idx)
        return 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for rows, cache in self.entries.values():
            source = beam_idx.to(rows.device)[rows]  # (R,) the rows each of these rows continues
            local = torch.searchsorted(rows, source)
            if bool((local >= rows.shape[0]).any()) or not torch.equal(rows[local.clamp(max=rows.shape[0] - 1)],
                                                                         source):
                raise LocalistStateError("beam reordering moved a beam to an input routed to other specialists; "
                                         "the beams of one input must come from that input")
            cache.reorder_cache(local)

    def crop(self, tokens_to_remove: int) -> None:
        for _, cache in self.entries.values():
            cache.crop(tokens_to_remove)

    def activate_past_recording(self) -> None:
        """Assisted decoding calls this before the first forward: caches made later record their past too."""
        self.recording = True
        for _, cache in self.entries.values():
            if hasattr(cache, "activate_past_recording"):
                cache.activate_past_recording()


class MixtureConfig(PreTrainedConfig):
    """What ``generate`` reads of a mixture's config: a decoder-only LM over the specialists' vocabulary."""

    model_type = "localist_router_mixture"

    def __init__(self, vocab_size: int = 0, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class MixtureLM(PreTrainedModel, GenerationMixin):
    """The router's soft / top_k mixture for one ``generate`` call: ``chosen`` (B, k) and ``log_weights`` (B, k) the
    routing decision of the B prompts, ``model_of(m)`` specialist m as a causal LM, ``base`` the base model (its
    device and generation defaults). Rows expanded by ``generate`` (beams, ``num_return_sequences``: each input
    repeated in place) share their input's routing."""

    config_class = MixtureConfig
    main_input_name = "input_ids"

    def __init__(self, chosen: torch.Tensor, log_weights: torch.Tensor, model_of: Callable[[int], Any], base: Any,
                 vocab_size: int):
        super().__init__(MixtureConfig(vocab_size=vocab_size))
        self.chosen, self.log_weights, self.model_of = chosen, log_weights, model_of
        self._device = base.device
        defaults = getattr(base, "generation_config", None)
        self.generation_config = GenerationConfig.from_dict(defaults.to_dict()) if defaults is not None \
            else GenerationConfig()

    @property
    def device(self) -> torch.device:  # no parameters of its own: the specialists' device
        return self._device

    def _routing_of(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.chosen.shape[0]
        if batch % n:
            raise LocalistStateError(f"a batch of {batch} rows cannot be the {n} routed prompts expanded")
        r = batch // n
        return self.chosen.repeat_interleave(r, 0), self.log_weights.repeat_interleave(r, 0)  # (batch, k)

    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict, *args: Any,
                                      **kwargs: Any) -> None:
        # transformers would build one DynamicCache from a model config; a mixture needs one cache per specialist.
        if generation_config.use_cache is not False and model_kwargs.get("cache") is None:
            model_kwargs["cache"] = MixtureCache()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: MixtureCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                return_dict: bool = True) -> CausalLMOutputWithPast:
        """Logits (B, T', V): the mixture's log-probabilities at the last ``logits_to_keep`` positions (all when 0),
        each specialist run on its rows with its cache in ``cache`` (a new one when ``use_cache`` and none given)."""
        if cache is not None and not isinstance(cache, MixtureCache):
            raise LocalistConfigError(f"a router mixture takes its own MixtureCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = MixtureCache()
        chosen, log_weights = self._routing_of(input_ids.shape[0])

        def logits_of(m: int, rows: torch.Tensor) -> torch.Tensor:
            model = self.model_of(m)
            params = forward_parameters(model)
            kw: dict[str, Any] = {}
            if attention_mask is not None:
                kw["attention_mask"] = attention_mask[rows]
            if position_ids is not None:
                kw["position_ids"] = position_ids[rows]
            if logits_to_keep and "logits_to_keep" in params:
                kw["logits_to_keep"] = logits_to_keep
            if use_cache:
                kw[cache_kwarg(model)] = cache.get(m, model)
            out = model(input_ids=input_ids[rows], use_cache=bool(use_cache), **kw)
            if use_cache:
                cache.set(m, rows, output_cache(out))
            return out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits

        logits = mixture_log_probs(chosen, log_weights, logits_of)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)
