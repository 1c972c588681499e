"""The patched ``forward`` / ``generate`` / ``save_pretrained`` of a localist model, as picklable objects.

:class:`LocalistForward` turns ``block_ids`` / anchor tokens / the dial of one call into a
:class:`~hf_localist.attention.call.CallContext` and passes it down with the call (keyword argument ``localist_call``);
the block ids of cached positions travel with the KV cache object (:mod:`hf_localist.patch.cache`), so generation equals
a full forward over the whole sequence. The patches are instances of small classes (not closures), so a patched
model survives ``copy.deepcopy`` (the copy runs its own weights) and ``torch.save`` / ``torch.load``.

The backbone (``model.base_model``) gets a :class:`LocalistBackboneForward`: it passes the layout of the model's call
on, or builds one when the backbone is called directly (TRL's fused LM head does that).

Higher layers extend the forward's output without this module importing them: ``register_output_hook`` (the
training penalty adds ``localist_loss`` to ``outputs.loss`` this way).
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

import torch

from ..attention.call import CALL_KWARG, CallContext, call_from_kwargs, current_call, scope_of, scoped
from ..blocks.ids import anchor_flags, segment_block_ids, validate_block_ids
from ..blocks.positions import restart_positions
from ..errors import BlockIdsError, LocalistConfigError, LocalistStateError
from .cache import cache_arg, cache_length, output_cache, track_cache

#: Forward keyword arguments the patch adds (advertised in the signature, so that ``generate`` passes them on).
EXTRA_FORWARD_ARGS = ("block_ids", "target_block_ids", "localist_alpha")

# name -> fn(handle, out, bound_arguments, kwargs) -> out, run after every outer forward (see register_output_hook).
_OUTPUT_HOOKS: dict[str, Callable] = {}


def register_output_hook(name: str, fn: Callable) -> None:
    """Run ``fn(handle, out, bound_arguments, kwargs) -> out`` after every patched forward (idempotent by name)."""
    _OUTPUT_HOOKS[name] = fn


class PatchedMethod:
    """Base of the patched methods: the model, its state, and the instance attribute it replaced (if any)."""

    name = ""

    def __init__(self, base: torch.nn.Module, state: Any, previous: Any = None):
        self.base = base
        self.state = state
        self.previous = previous  # an instance-level method that was there before the patch (restored on revert)

    # No read-through of __func__ & co.: accelerate re-wraps a forward that has no __func__ (keeping this patch),
    # and would bypass the patch by re-binding the class function if it had one.
    def original(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return getattr(type(self.base), self.name).__get__(self.base)


class LocalistForward(PatchedMethod):
    """``model.forward`` of a localist model: builds the call's CallContext and passes it down with the call."""

    name = "forward"

    @property
    def __signature__(self) -> inspect.Signature:
        # generate() and Trainer read the forward's signature: advertise block_ids / target_block_ids / localist_alpha.
        signature = inspect.signature(self.original())
        params = list(signature.parameters.values())
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in EXTRA_FORWARD_ARGS
                 if n not in signature.parameters]
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        return signature.replace(parameters=rest + extra + var_kw)

    def __call__(self, *args: Any, **kwargs: Any):
        if CALL_KWARG in kwargs:
            raise LocalistStateError(
                f"{CALL_KWARG!r} is set by the localist forward itself: do not pass it to model(...)"
            )
        return self.run(args, kwargs, output_hooks=True)

    def run(self, args: tuple, kwargs: dict, output_hooks: bool):
        """Build the call's layout, run the original forward with it, then the output hooks if ``output_hooks``."""
        block_ids = kwargs.pop("block_ids", None)
        target_block_ids = kwargs.pop("target_block_ids", None)
        alpha = check_alpha(kwargs.pop("localist_alpha", None))
        original = self.original()
        bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        scope = scope_of(self.state)
        call = build_call(self.state, scope, bound, block_ids, target_block_ids, alpha)
        if self.state.config.block_positions == "restart":
            restart_kwargs(original, bound, kwargs, call, generating=scope.generating > 0)
        kwargs[CALL_KWARG] = call
        try:
            with current_call(call):
                out = original(*args, **kwargs)
        finally:
            call.mask_cache.clear()  # do not hold a (B, 1, T, S) mask between calls
        if output_hooks:
            handle = self.base.__dict__.get("localist_handle")
            for hook in _OUTPUT_HOOKS.values():
                out = hook(handle, out, bound, kwargs)
        cache = output_cache(out)
        if cache is None:
            cache = cache_arg(bound)
        if cache is not None and not isinstance(cache, (tuple, list)):
            track_cache(cache)
            cache._localist_block_ids = call.block_ids
            cache._localist_sink = call.sink
            cache.__dict__.pop("_localist_continue", None)  # the history now ends in what followed the blocks
        for observer in scope.observers:
            observer.append(call)
        return out


class LocalistBackboneForward(LocalistForward):
    """``forward`` of the backbone of a localist model (``model.base_model``, e.g. the ``LlamaModel`` inside
    ``LlamaForCausalLM``).

    Called by the model's own forward, it gets the call's layout (``localist_call``) and passes it on unchanged.
    Called directly, as TRL's trainers do (their fused LM head, ``trl.trainer.utils.add_fused_lm_head``, runs
    ``model.base_model(...)`` and projects the hidden states itself), it builds the layout from ``block_ids`` / the
    anchor tokens like the model's forward. The output hooks do not run there: a backbone output has no loss, so a
    ``penalty='loss'`` term cannot be added; a warning says so in training (``LocalistSFTTrainer`` adds it itself).
    """

    def __call__(self, *args: Any, **kwargs: Any):
        if call_from_kwargs(kwargs) is not None:  # the kwarg, or (modeling code that drops kwargs) the outer call
            given = [name for name in EXTRA_FORWARD_ARGS if kwargs.get(name) is not None]
            if given:
                raise LocalistStateError(
                    f"{given} passed to the backbone inside a call of the model's forward, which already built the "
                    "call's block layout: pass them to the model's forward"
                )
            return self.original()(*args, **kwargs)  # inside the model's forward: the layout is already built
        if (self.state.config.penalty == "loss" and self.base.training and torch.is_grad_enabled()
                and not scope_of(self.state).penalty_by_caller):
            warnings.warn(
                "hf_localist: penalty='loss' adds the penalty to outputs.loss of the model's forward, but the backbone "
                "was called directly (TRL's fused LM head does this), so the penalty is not in this loss: use "
                "hf_localist.integrations.trl.LocalistSFTTrainer, or penalty='prox' with LocalistCallback",
                UserWarning, stacklevel=2,
            )
        return self.run(args, kwargs, output_hooks=False)


class LocalistGenerate(PatchedMethod):
    """``model.generate``: marks its forwards, where ``block_ids`` describe the prompt (see build_call)."""

    name = "generate"

    def __call__(self, *args: Any, **kwargs: Any):
        check_prompt_block_ids(args, kwargs)
        composed_prompt_mask(args, kwargs)
        with scoped(self.state, generating=scope_of(self.state).generating + 1):
            return self.original()(*args, **kwargs)


def _prompt_ids(args: tuple, kwargs: dict) -> Any:
    ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids", kwargs.get("inputs"))
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def check_prompt_block_ids(args: tuple, kwargs: dict) -> None:
    """``generate(ids, block_ids=b)``: ``b`` gives every prompt position its block, as ``model(ids, block_ids=b)``
    requires (inside generate, shorter block ids mean "the prompt's", so a short ``b`` would go unnoticed)."""
    ids, blocks = _prompt_ids(args, kwargs), kwargs.get("block_ids")
    if ids is None or not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        return
    past = cache_length(cache_arg(kwargs))
    allowed = (ids.shape[1],) if past == 0 else (ids.shape[1], past + ids.shape[1])
    if blocks.shape[1] not in allowed:
        raise BlockIdsError(
            f"generate(..., block_ids=...) got block ids for {blocks.shape[1]} positions but the prompt has "
            f"{ids.shape[1]}{f' (after {past} cached)' if past else ''}: pass one block id per prompt token, shape "
            f"({ids.shape[0]}, {ids.shape[1]})"
        )


def composed_prompt_mask(args: tuple, kwargs: dict) -> None:
    """``generate(question_ids, cache=compose_cache(...))``: give transformers the mask of the whole sequence.

    transformers restarts from a filled cache when ``input_ids`` hold the whole sequence, or only the new tokens
    with an ``attention_mask`` of the whole sequence. A composed cache has no token ids of its own, so the mask of
    its positions (all valid) is prepended to the question's.
    """
    cache = cache_arg(kwargs)
    if cache is None or getattr(cache, "_localist_continue", None) is None:
        return
    ids = _prompt_ids(args, kwargs)
    if ids is None:
        return
    past = cache_length(cache)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if mask.shape[1] == ids.shape[1]:
        kwargs["attention_mask"] = torch.cat(
            [torch.ones(mask.shape[0], past, dtype=mask.dtype, device=mask.device), mask], dim=1)


def restart_kwargs(original: Callable, bound: dict, kwargs: dict, call: CallContext, generating: bool) -> None:
    """Set ``position_ids`` of the ``"restart"`` policy (see :mod:`hf_localist.blocks.positions`) in ``kwargs``."""
    if "position_ids" not in inspect.signature(original).parameters:
        raise LocalistConfigError(
            f"LocalistConfig.block_positions='restart' needs a model whose forward takes position_ids; "
            f"{type(getattr(original, '__self__', original)).__name__}.forward does not: use "
            "block_positions='continuous'"
        )
    if bound.get("position_ids") is not None and not generating:  # generate() computes its own continuous ones
        raise LocalistConfigError(
            "position_ids were passed with LocalistConfig.block_positions='restart', which computes them from the "
            "block ids: drop position_ids, or set block_positions='continuous' to use yours"
        )
    positions = restart_positions(call.block_ids, call.query_valid, call.sink)  # (B, total)
    new_len = (bound.get("input_ids") if bound.get("input_ids") is not None else bound["inputs_embeds"]).shape[1]
    kwargs["position_ids"] = positions[:, -new_len:]
    if bound.get("attention_mask") is None and cache_length(cache_arg(bound)) == 0:
        # Without a 2-D mask transformers reads non-increasing position_ids as packed sequences and would cut the
        # attention at every restart: an all-ones mask keeps the model's own masking (causal, padding-free).
        kwargs["attention_mask"] = call.query_valid.long()


def check_alpha(alpha: Any, name: str = "localist_alpha") -> float | None:
    """A dial given for one call or one ``with`` block: None, or a number in [0, 1]."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        alpha = float(alpha)
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
            or not 0 <= alpha <= 1):
        raise LocalistConfigError(
            f"{name}={alpha!r} must be a number in [0, 1] (0 = the unmodified model, 1 = fully localist; None for "
            "the model-wide dial)"
        )
    return float(alpha)


def _resolve_alpha(call_alpha: float | None, scoped_alpha: float | None, model_alpha: float) -> float:
    # The forward argument, else the innermost ``with handle.dial(a)`` of this thread / task, else the model's dial.
    if call_alpha is not None:
        return call_alpha
    return scoped_alpha if scoped_alpha is not None else model_alpha


def _check_history(given: torch.Tensor, history: torch.Tensor, name: str) -> None:
    """Block ids given again for cached positions must be the ones those positions were computed with."""
    n = min(given.shape[1], history.shape[1])
    if not torch.equal(given[:, :n], history[:, :n]):
        bad = int((given[:, :n] != history[:, :n]).any(dim=0).nonzero()[0, 0])
        raise BlockIdsError(
            f"{name} contradict the block ids the KV cache was computed with (first at position {bad}: "
            f"{given[:, bad].tolist()} vs {history[:, bad].tolist()}): cached keys cannot change block; start from an "
            "empty cache to use other block ids"
        )


def build_call(state: Any, scope: Any, bound: dict, block_ids: Any, target_block_ids: Any,
               alpha: float | None) -> CallContext:
    """The CallContext of one forward: block ids of every position (cached ones from the cache), targets, sink."""
    cfg = state.config
    input_ids = bound.get("input_ids")
    embeds = bound.get("inputs_embeds")
    ref = input_ids if input_ids is not None else embeds
    if ref is None:
        raise BlockIdsError("forward needs input_ids or inputs_embeds to lay out blocks")
    batch, new_len = ref.shape[0], ref.shape[1]
    device = ref.device
    cache = cache_arg(bound)
    past_len = cache_length(cache)
    prev = getattr(cache, "_localist_block_ids", None) if past_len > 0 else None
    if prev is not None:
        if prev.shape[1] < past_len:
            prev = None
        else:
            prev = prev[:, :past_len]
            if prev.shape[0] != batch:
                raise BlockIdsError(
                    f"the cache holds block ids for batch {prev.shape[0]} but the input has batch {batch}")
    total = past_len + new_len

    full = None
    centroid_from = None
    known = prev  # block ids of the first positions, before those computed below
    generating = scope.generating > 0
    if block_ids is not None and generating and isinstance(block_ids, torch.Tensor) and block_ids.dim() == 2 \
            and 0 < block_ids.shape[1] < total:
        # Inside generate(), block_ids are the prompt's, handed again at every step while the sequence grows (with
        # or without a cache): positions after the prompt continue the current block / follow the anchor tokens.
        n = block_ids.shape[1]
        prompt = validate_block_ids(block_ids, "block_ids", batch, (n,), cfg.max_blocks).to(device)
        if past_len > 0 and prev is None:
            raise BlockIdsError(
                f"the KV cache holds {past_len} positions without block ids: run the prefill through the patched model"
            )
        if prev is not None:
            _check_history(prompt, prev.to(device), "generate(..., block_ids=...)")
        if n > past_len:
            known = prompt if prev is None else torch.cat([prev.to(device), prompt[:, past_len:]], dim=1)
        block_ids = None
    if block_ids is not None:
        if prev is not None and isinstance(block_ids, torch.Tensor) and block_ids.dim() == 2 \
                and block_ids.shape[-1] not in (new_len, total):
            raise BlockIdsError(
                f"block_ids of length {block_ids.shape[-1]} with {past_len} cached positions and {new_len} new ones: "
                f"pass the block ids of the new tokens (shape ({batch}, {new_len})) or of the whole sequence "
                f"(({batch}, {total})), or none to continue the current block"
            )
        else:
            block_ids = validate_block_ids(block_ids, "block_ids", batch, (new_len, total), cfg.max_blocks).to(device)
            if block_ids.shape[1] == total and prev is not None:
                _check_history(block_ids, prev.to(device), "block_ids")
            if block_ids.shape[1] == total:
                full = block_ids
            elif prev is None and past_len > 0:
                raise BlockIdsError(
                    f"the KV cache holds {past_len} positions without block ids: pass block_ids for the whole "
                    f"sequence (shape ({batch}, {total}))"
                )
            else:
                full = block_ids if prev is None else torch.cat([prev.to(device), block_ids], dim=1)
    if full is None:
        if past_len > 0 and prev is None:
            raise BlockIdsError(
                f"the KV cache holds {past_len} positions without block ids: run the prefill through the patched model"
            )
        k = known.shape[1] if known is not None else 0  # positions [k, total) are laid out here
        last = known[:, -1].to(device) if k > 0 else torch.zeros(batch, dtype=torch.long, device=device)
        follow = getattr(cache, "_localist_continue", None) if past_len > 0 else None
        if follow is not None and k == past_len and follow.shape[0] == batch:
            last = follow.to(device)  # a composed cache (compose_cache): what follows the blocks is general
        rest = total - k
        if cfg.block_assignment == "centroid":
            # Placeholder: layer l0's pre-hook assigns positions [k, total) from their hidden states.
            new = torch.zeros(batch, rest, dtype=torch.long, device=device)
            centroid_from = k
        elif cfg.block_assignment == "segment":
            if input_ids is None:
                raise BlockIdsError(
                    "block_assignment='segment' reads anchor tokens from input_ids: pass input_ids or block_ids")
            new = segment_block_ids(input_ids[:, new_len - rest:], cfg.anchor_token_ids, cfg.general_token_id,
                                    start=last)
        elif k > 0:
            new = last[:, None].expand(batch, rest)  # generated tokens continue the current block
        else:
            raise BlockIdsError(
                "block_assignment='explicit' needs block_ids of shape (batch, seq) in the forward call; or use "
                "block_assignment='segment' with anchor tokens (add_block_tokens)"
            )
        full = new if k == 0 else torch.cat([known.to(device), new], dim=1)

    if target_block_ids is not None:
        n = target_block_ids.shape[-1] if isinstance(target_block_ids, torch.Tensor) else 0
        if generating and 0 < n < total and target_block_ids.dim() == 2:  # the prompt's, as for block_ids
            target = validate_block_ids(target_block_ids, "target_block_ids", batch, (n,), cfg.max_blocks)
            target_block_ids = torch.cat([target.to(device), full[:, n:]], dim=1)
        target = validate_block_ids(target_block_ids, "target_block_ids", batch, (new_len, total), cfg.max_blocks)
        target = target.to(device)
        if target.shape[1] == new_len and past_len:
            target = torch.cat([full[:, :past_len], target], dim=1)
    else:
        target = full

    mask2d = bound.get("attention_mask")
    if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and mask2d.shape[1] == total:
        valid = mask2d.to(device).bool()
        sink = valid.long().argmax(dim=1)  # first non-padding position
    else:
        valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        sink = getattr(cache, "_localist_sink", None) if past_len else None
        sink = (sink.to(device) if sink is not None and sink.shape[0] == batch
                else torch.zeros(batch, dtype=torch.long, device=device))
    return CallContext(block_ids=full, target_ids=target, anchors=anchor_flags(full), sink=sink, query_valid=valid,
                       alpha=_resolve_alpha(alpha, scope.alpha, cfg.alpha),
                       recorder=scope.recorder, probes=scope.probes, centroid_from=centroid_from)
