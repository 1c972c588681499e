"""``LocalistHandle``: what ``apply_localist`` returns: the dial, diagnostics, block slots, and the exact undo.

The dial: ``handle.set_dial(a)`` is model-wide (every thread, saved with the model); ``with handle.dial(a):`` holds
for the current thread / asyncio task only (context-local, like ``torch.no_grad``), so concurrent callers never see
each other's dial; ``model(..., localist_alpha=a)`` sets the dial of one call. A call's dial is the first of these
that is given, innermost first.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..arch.registry import ArchSpec
from ..attention.call import CallContext, scope_of, scoped
from ..attention.recorder import DiagnosticsRecorder
from ..attention.state import LocalistState
from ..config.localist import MODEL_CONFIG_KEY, LocalistConfig
from ..errors import BlockIdsError, LocalistConfigError, LocalistStateError
from .adapters import unbind_wrapper
from .blockkv import BlockKV, compose_cache, encode_block
from .forward import PatchedMethod, check_alpha
from .slots import activate_block, describe_blocks


class LocalistHandle:
    """What ``apply_localist`` returns: the dial, diagnostics, and the exact undo."""

    def __init__(self, model: nn.Module, base: nn.Module, spec: ArchSpec, state: LocalistState,
                 attention_modules: list[nn.Module], original_impl: str, previous_config_entry: Any):
        self.model = model
        self.base = base
        self.spec = spec
        self.state = state
        self.attention_modules = attention_modules
        self._original_impl = original_impl
        self._previous_config_entry = previous_config_entry
        self._active = True
        #: peft wrappers whose save_pretrained writes the localist files too (patch/adapters.py); undone by revert.
        self.wrappers: list[nn.Module] = []

    # ------------------------------------------------------------------ settings
    @property
    def config(self) -> LocalistConfig:
        return self.state.config

    @property
    def active(self) -> bool:
        return self._active

    def _check_active(self) -> None:
        if not self._active:
            raise LocalistStateError("this LocalistHandle was reverted: call apply_localist again to re-patch")

    def set_dial(self, alpha: float) -> None:
        """Set the dial (validated, in [0, 1]); takes effect on the next forward, no retraining."""
        self._check_active()
        self.state.config.alpha = alpha

    @contextlib.contextmanager
    def dial(self, alpha: float) -> Iterator[LocalistHandle]:
        """``with handle.dial(0.3): ...``: the dial of the calls made inside the block, in this thread / task only.

        Context-local (like ``torch.no_grad``): other threads keep their dial, the model-wide dial
        (``set_dial``, ``config.alpha``) is unchanged, and blocks nest. ``model(..., localist_alpha=a)`` overrides
        it for one call.
        """
        self._check_active()
        with scoped(self.state, alpha=check_alpha(alpha, "handle.dial: alpha")):
            yield self

    def update(self, **fields: Any) -> None:
        """Change several config fields at once (validated together)."""
        self._check_active()
        if "anchor_token_ids" in fields or "general_token_id" in fields:
            cfg = self.state.config
            check_token_ids(cfg, vocabulary_size(self.base),
                            {"anchor_token_ids": fields.get("anchor_token_ids", cfg.anchor_token_ids),
                             "general_token_id": fields.get("general_token_id", cfg.general_token_id)})
        self.state.config.update(**fields)  # model_type / num_layers are bound to the model (bind_to_model)

    def effective_alpha(self) -> float:
        """The dial a call from this thread / task gets now: the innermost ``dial()`` block, else ``config.alpha``."""
        scoped_alpha = scope_of(self.state).alpha
        return self.state.config.alpha if scoped_alpha is None else scoped_alpha

    def layer_alphas(self) -> list[float]:
        """alpha_l of every layer for :meth:`effective_alpha` (the schedule applied)."""
        alpha = self.effective_alpha()
        return [self.state.layer_alpha(layer, alpha) for layer in range(self.state.num_layers)]

    @contextlib.contextmanager
    def record(self) -> Iterator[DiagnosticsRecorder]:
        """Collect H_t, PF_t and BM_t of every localised layer for the forwards inside the block."""
        self._check_active()
        recorder = DiagnosticsRecorder()
        with scoped(self.state, recorder=recorder):  # this thread / task only, as dial()
            yield recorder

    @contextlib.contextmanager
    def probe(self, fn) -> Iterator[None]:
        """Run ``fn(layer, module, query, key, attention_mask, layout, scaling, alpha_l, out, call)`` after every
        localised attention call inside the block (this thread / task); calibration measures margins this way."""
        self._check_active()
        with scoped(self.state, probes=scope_of(self.state).probes + (fn,)):
            yield

    @contextlib.contextmanager
    def capture_layouts(self) -> Iterator[list[CallContext]]:
        """``with handle.capture_layouts() as calls: model(...)``: ``calls[-1].block_ids`` is the (B, L) layout the
        last call used (after centroid assignment), with ``target_ids``, ``anchors``, ``sink``, ``query_valid``."""
        self._check_active()
        calls: list[CallContext] = []
        with scoped(self.state, observers=scope_of(self.state).observers + (calls,)):
            yield calls

    # ------------------------------------------------------------------ blocks
    @torch.no_grad()
    def assign(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (batch, seq) block ids the model uses for these tokens: from the anchor tokens (``segment``), or the
        assignment at layer ``first_local_layer`` from the hidden states (``centroid``; one forward pass).

        ``explicit`` mode takes its block ids from the caller, so there is nothing to assign: ``BlockIdsError``.
        Padding positions (``attention_mask == 0``) get the id the layout gives them; they attend to nothing.
        """
        self._check_active()
        if self.config.block_assignment == "explicit":
            raise BlockIdsError(
                "handle.assign: block_assignment='explicit' takes block ids from each call (block_ids=...); "
                "assign() answers for 'segment' (anchor tokens) and 'centroid' (hidden states)"
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else ""
            raise BlockIdsError(
                f"handle.assign: input_ids must be a (batch, seq) tensor, got {type(input_ids).__name__}{shape}")
        with self.capture_layouts() as calls:
            self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return calls[-1].block_ids.clone()

    def blocks(self) -> list[dict]:
        """Active blocks: slot, name, anchor, centroid, enabled, and how and when each was recruited."""
        return describe_blocks(self)

    def activate_block(self, slot: int, centroid: torch.Tensor | None = None, subspace: torch.Tensor | None = None,
                       enabled: bool = True, info: dict | None = None) -> None:
        """Activate a dormant slot (buffers only: no parameter changes shape). See centroid.activate_block."""
        self._check_active()
        activate_block(self, slot, centroid, subspace, enabled, info)

    # ------------------------------------------------------------------ block-KV reuse
    def encode_block(self, input_ids: Any, sink_token_id: int | None = None) -> BlockKV:
        """Keys and values of a block in every layer, read once at dial 1, for reuse in any prompt that holds it.

        ``input_ids``: the block's tokens, 1-D (or (1, n)), without the sink. The block is read as
        ``[sink] + input_ids`` (``sink_token_id`` defaults to the model config's ``bos_token_id``) with block ids
        ``[0, 1, ..., 1]``. Needs ``block_positions='restart'`` and dial 1 in every layer (see
        :mod:`hf_localist.patch.blockkv`); ``BlockKV.save`` / ``BlockKV.load`` keep it on disk.
        """
        self._check_active()
        return encode_block(self, input_ids, sink_token_id)

    def compose_cache(self, blocks: list[BlockKV], batch_size: int = 1):
        """A transformers ``DynamicCache`` holding ``[sink] + blocks[0] + ... + blocks[-1]`` at dial 1.

        ``model(input_ids=question_ids, cache=cache)`` and ``model.generate(question_ids, cache=cache)`` then
        equal the full forward of ``composed_sequence(blocks, question_ids)``: the question's tokens (and what
        ``generate`` adds) are general (block 0) and see every block. The cache grows with the call: compose a
        fresh one per prompt (composing is a concatenation). ``batch_size``: rows of questions that share these
        blocks (for beam search, rows times ``num_beams``).
        """
        self._check_active()
        return compose_cache(self, blocks, batch_size)

    # ------------------------------------------------------------------ undo
    def revert(self) -> nn.Module:
        """Restore the exact original model: attention implementation, forward (the backbone's too), save_pretrained
        (also of the peft wrappers that got one), config."""
        self._check_active()
        base = self.base
        for module in self.attention_modules:
            for attr in ("_localist_state", "_localist_layer"):
                if attr in module.__dict__:
                    delattr(module, attr)
        patched_methods = [(base, ("forward", "generate", "save_pretrained"))]
        if getattr(self, "_backbone", None) is not None:
            patched_methods.append((self._backbone, ("forward",)))
        for module, attrs in patched_methods:
            for attr in attrs:
                patched = module.__dict__.pop(attr, None)
                if isinstance(patched, PatchedMethod) and patched.previous is not None:
                    module.__dict__[attr] = patched.previous  # an instance-level method there before the patch
        base.__dict__.pop("localist_handle", None)
        for wrapper in getattr(self, "wrappers", []):
            unbind_wrapper(wrapper)
        self.wrappers = []
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        base.set_attn_implementation(self._original_impl)
        if self._previous_config_entry is None:
            if MODEL_CONFIG_KEY in base.config.__dict__:
                delattr(base.config, MODEL_CONFIG_KEY)
        else:
            setattr(base.config, MODEL_CONFIG_KEY, self._previous_config_entry[0])
        self._active = False
        return self.model


def vocabulary_size(base: nn.Module) -> int | None:
    """The number of input embeddings of ``base`` (its live vocabulary, resized embeddings included), or None."""
    get = getattr(base, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None


def check_token_ids(config: LocalistConfig, vocab: int | None, fields: dict | None = None) -> None:
    """Refuse anchor / general token ids outside the model's vocabulary (they could never occur in input_ids)."""
    if vocab is None:
        return
    values = fields if fields is not None else {"anchor_token_ids": config.anchor_token_ids,
                                                 "general_token_id": config.general_token_id}
    ids = list(values.get("anchor_token_ids") or []) + [values.get("general_token_id")]
    bad = [i for i in ids if isinstance(i, int) and not 0 <= i < vocab]
    if bad:
        raise LocalistConfigError(
            f"LocalistConfig token ids {bad} (anchor_token_ids / general_token_id) are outside the model's vocabulary "
            f"of {vocab} tokens: add the tokens first (add_block_tokens(tokenizer, model, names) resizes the "
            "embeddings and returns the ids)")
