"""Per-call state: what one forward call of a localist model needs, created for that call and passed down with it.

transformers passes extra keyword arguments of a model's ``forward`` down to the attention function of every layer
(as it does with its own attention kwargs). The patched outer ``forward`` builds one :class:`CallContext` for the
call and passes it as the keyword argument ``localist_call`` (:data:`CALL_KWARG`), so every localised layer reads
the layout of *its own* call: two threads calling one model, a deep copy of the model, and gradient checkpointing
(whose recomputation replays each layer with the keyword arguments of its own call) each see their own layout.
Nothing about one call is stored on the model.

Settings scoped to a block of code (``with handle.dial(a)``, ``with handle.record()``, the probes of calibration,
``generate``'s prompt mode) are *context-local*: a :class:`contextvars.ContextVar` per thread / asyncio task, like
``torch.no_grad``. They are read once, when a call starts, into its :class:`CallContext`.

The dial of one call resolves as: the forward argument ``localist_alpha=`` if given, else the innermost
``with handle.dial(a):`` of the current thread / task, else the model-wide ``config.alpha`` (``handle.set_dial``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..blocks.ids import anchor_flags

#: Keyword argument that carries the :class:`CallContext` from the outer forward down to the attention function.
CALL_KWARG = "localist_call"


@dataclass
class CallContext:
    """Block layout of the whole sequence of one forward call (cached positions included), and its settings."""

    block_ids: torch.Tensor  # (B, L) L = cached + new positions
    target_ids: torch.Tensor  # (B, L) target block of each position (own block unless target_block_ids given)
    anchors: torch.Tensor  # (B, L) bool
    sink: torch.Tensor  # (B,) position of the first non-padding token
    query_valid: torch.Tensor  # (B, L) bool: not padding
    alpha: float = 1.0  # the dial of this call (see the module docstring for how it resolves)
    recorder: Any = None  # the DiagnosticsRecorder of the innermost ``handle.record()``, or None
    # calibration probes: probe(layer, module, query, key, mask, layout, scaling, alpha_l, out, call)
    probes: tuple = ()
    centroid_from: int | None = None  # centroid mode: first position whose block layer l0's pre-hook assigns
    # The soft-mode additive mask of the latest (alpha, shapes, base mask): equal for the layers of one call, so it is
    # built once per call instead of once per layer. One entry (a (B, 1, T, S) tensor); cleared when the call returns.
    mask_cache: dict = field(default_factory=dict)

    def set_block_ids(self, full: torch.Tensor) -> None:
        """Replace the layout (centroid assignment): anchors follow; targets follow unless given separately."""
        own_target = self.target_ids is self.block_ids
        self.block_ids = full
        self.anchors = anchor_flags(full)
        if own_target:
            self.target_ids = full


@dataclass(frozen=True)
class Scope:
    """Context-local settings of one patched model in the current thread / task (immutable: nested scopes copy)."""

    alpha: float | None = None  # innermost handle.dial(a), or None for the model-wide dial
    recorder: Any = None
    probes: tuple = ()
    observers: tuple = ()  # lists that receive the CallContext of every finished outer call (capture_calls)
    generating: int = 0  # depth of generate() calls: there, block_ids given to generate() are the prompt's
    # penalty='loss' is added by the caller (LocalistSFTTrainer.compute_loss), not by the model's forward: a direct
    # backbone call (TRL's fused LM head) does not warn that the penalty is missing from its loss
    penalty_by_caller: bool = False


# One variable for every model: {id(state): Scope}. Keys are only present inside a ``with`` block, which holds a
# reference to the state, so an id is never reused while its entry exists.
_SCOPES: contextvars.ContextVar[dict] = contextvars.ContextVar("hf_localist_scopes", default={})
# The CallContext of the outer forward in progress in this thread / task: the fallback for a registered architecture
# whose modeling code does not pass forward kwargs down to the attention function.
_CURRENT: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("hf_localist_call", default=None)


def scope_of(state: Any) -> Scope:
    return _SCOPES.get().get(id(state), _EMPTY)


_EMPTY = Scope()


@contextlib.contextmanager
def scoped(state: Any, **changes: Any) -> Iterator[Scope]:
    """Within the block, ``scope_of(state)`` has ``changes`` applied (this thread / task only)."""
    scopes = dict(_SCOPES.get())
    scopes[id(state)] = dataclasses.replace(scopes.get(id(state), _EMPTY), **changes)
    token = _SCOPES.set(scopes)
    try:
        yield scopes[id(state)]
    finally:
        _SCOPES.reset(token)


@contextlib.contextmanager
def current_call(call: CallContext) -> Iterator[CallContext]:
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def call_from_kwargs(kwargs: dict) -> CallContext | None:
    """The CallContext of the call an attention function or module hook runs in (kwargs first, then the fallback)."""
    call = kwargs.get(CALL_KWARG)
    return call if call is not None else _CURRENT.get()
