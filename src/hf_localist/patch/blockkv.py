"""Block-KV reuse at dial 1: encode a block once, reuse its keys and values in any prompt that contains it.

At dial 1 with ``block_positions="restart"`` a block token sees only the sink, the general tokens before it and its
own block, at the positions it would have if the block were read alone after the sink (docs/design.md section 12).
So in a prompt ``[sink] + block_1 + ... + block_n + question`` the keys and values of block ``j`` in every layer are
those of ``[sink] + block_j`` read alone: :meth:`LocalistHandle.encode_block` computes them once
(:class:`BlockKV`), :meth:`LocalistHandle.compose_cache` concatenates ``sink + block_1 + ... + block_n`` into a
transformers ``DynamicCache`` and the question's tokens are then the only prefill. The question's tokens (and what
``generate`` adds) are general (block 0): they see every block, exactly as in the full forward.

Exactness needs, and these functions check: a causal decoder, ``block_positions="restart"``, every layer at
alpha_l = 1 (dial 1, no layer below ``first_local_layer``), and sliding windows (Gemma 2 / 3) longer than the composed
prefix. A :class:`BlockKV` carries a fingerprint of the model (config and a digest of every weight and buffer), of the
localist settings that shape a block's keys (position policy, anchor bonus) and of the sink token; composing blocks
whose fingerprint differs from the model's is refused.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from ..config.localist import MODEL_CONFIG_KEY
from ..errors import BlockKVError, LocalistConfigError, LocalistLoadError, UnsupportedArchitectureError
from ..utils import atomic_write
from .cache import cache_length, track_cache

if TYPE_CHECKING:  # annotations only
    from .handle import LocalistHandle

#: Version of the BlockKV file format (safetensors metadata ``format``).
BLOCKKV_FORMAT = "1"


@dataclass(frozen=True)
class BlockKV:
    """Keys and values of one block in every layer, as read alone after the sink at dial 1.

    ``keys[l]`` / ``values[l]`` are (H_kv, n, D) for the block's ``n`` tokens; ``sink_keys[l]`` / ``sink_values[l]``
    (H_kv, 1, D) are the sink's (the same for every block of one model). ``fingerprint`` identifies the model and
    settings that produced them (see the module docstring).
    """

    input_ids: torch.Tensor  # (n,) the block's tokens (without the sink)
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    sink_keys: tuple[torch.Tensor, ...]
    sink_values: tuple[torch.Tensor, ...]
    sink_token_id: int
    block_positions: str
    fingerprint: str

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes held by the block's keys and values (the sink's included)."""
        tensors = (*self.keys, *self.values, *self.sink_keys, *self.sink_values)
        return sum(t.numel() * t.element_size() for t in tensors) + self.input_ids.numel() * 8

    def to(self, device: torch.device | str) -> BlockKV:
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return BlockKV(self.input_ids, move(self.keys), move(self.values), move(self.sink_keys),
                       move(self.sink_values), self.sink_token_id, self.block_positions, self.fingerprint)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the block to one safetensors file (atomically: the old file stays whole if writing fails)."""
        tensors = {"input_ids": self.input_ids.contiguous()}
        for layer in range(self.num_layers):
            tensors[f"keys.{layer}"] = self.keys[layer].contiguous()
            tensors[f"values.{layer}"] = self.values[layer].contiguous()
            tensors[f"sink_keys.{layer}"] = self.sink_keys[layer].contiguous()
            tensors[f"sink_values.{layer}"] = self.sink_values[layer].contiguous()
        metadata = {"format": BLOCKKV_FORMAT, "fingerprint": self.fingerprint, "sink_token_id": str(self.sink_token_id),
                    "block_positions": self.block_positions, "num_layers": str(self.num_layers)}
        tensors = {name: t.detach().cpu() for name, t in tensors.items()}
        atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> BlockKV:
        """Read a block written by :meth:`save`; a missing, corrupt or foreign file raises ``LocalistLoadError``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise LocalistLoadError(f"BlockKV.load: {path!r} is not a file (write one with BlockKV.save)")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LocalistLoadError(f"BlockKV.load: {path!r} is not a readable safetensors file ({exc})") from exc
        if meta.get("format") != BLOCKKV_FORMAT:
            raise LocalistLoadError(
                f"BlockKV.load: {path!r} has format {meta.get('format')!r}, expected {BLOCKKV_FORMAT!r}: it was not "
                "written by BlockKV.save of this version; encode the block again"
            )
        try:
            n = int(meta["num_layers"])
            parts = {name: tuple(tensors[f"{name}.{layer}"] for layer in range(n))
                     for name in ("keys", "values", "sink_keys", "sink_values")}
            return cls(tensors["input_ids"], parts["keys"], parts["values"], parts["sink_keys"], parts["sink_values"],
                       int(meta["sink_token_id"]), meta["block_positions"], meta["fingerprint"])
        except (KeyError, ValueError) as exc:
            raise LocalistLoadError(f"BlockKV.load: {path!r} lacks {exc} (a truncated or foreign file)") from exc


# ---------------------------------------------------------------------- fingerprint
# model -> (signature of its tensors, digest): the digest of 135M weights takes ~1 s, the signature a few ms.
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Model config keys that name or place a model without changing what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation",
                         "_attn_implementation_autoset", MODEL_CONFIG_KEY, "architectures", "_commit_hash", "dtype",
                         "torch_dtype", "use_cache", "output_attentions", "output_hidden_states", "return_dict")


def _tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> tuple | None:
    try:  # an in-place change (optimizer step, load_state_dict) bumps a tensor's version
        return tuple((name, t.data_ptr(), t._version) for name, t in tensors)
    except RuntimeError:  # inference tensors have no version counter: digest every time
        return None


def weights_digest(model: torch.nn.Module) -> str:
    """blake2b digest of every parameter and buffer (name, dtype, shape, bytes); cached until a tensor changes."""
    tensors = _tensors(model)
    signature = _signature(tensors)
    hit = _DIGESTS.get(model)
    if signature is not None and hit is not None and hit[0] == signature:
        return hit[1]
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.detach().contiguous().cpu()
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    digest = h.hexdigest()
    if signature is not None:
        _DIGESTS[model] = (signature, digest)
    return digest


def fingerprint(handle: LocalistHandle, sink_token_id: int) -> str:
    """What a block's keys and values depend on: model config and weights, position policy, anchor bonus, sink."""
    config = {k: v for k, v in handle.base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    cfg = handle.config
    parts = {"config": config, "weights": weights_digest(handle.model), "block_positions": cfg.block_positions,
             "beta_anchor": cfg.beta_anchor, "sink_token_id": int(sink_token_id), "format": BLOCKKV_FORMAT}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


# ---------------------------------------------------------------------- checks
def check_reusable(handle: LocalistHandle, what: str) -> None:
    """Refuse settings under which a block's keys would depend on what is outside it (module docstring)."""
    cfg = handle.config
    if not handle.spec.causal:
        raise UnsupportedArchitectureError(
            f"{what}: {handle.spec.model_type!r} is not a causal decoder; block-KV reuse needs causal attention"
        )
    if cfg.block_positions != "restart":
        raise LocalistConfigError(
            f"{what}: LocalistConfig.block_positions={cfg.block_positions!r}: a block's keys depend on where it sits "
            "unless every block restarts its positions; set block_positions='restart' (handle.update(...))"
        )
    alpha = handle.effective_alpha()
    if alpha < 1.0:
        raise LocalistConfigError(
            f"{what}: the dial is {alpha}: block-KV reuse is exact at dial 1 only (blocks see nothing of each other); "
            "call handle.set_dial(1.0) or run inside `with handle.dial(1.0):`"
        )
    low = [layer for layer, a in enumerate(handle.layer_alphas()) if a < 1.0]
    if low:
        raise LocalistConfigError(
            f"{what}: layers {low} run below alpha_l = 1 (first_local_layer={cfg.first_local_layer}, "
            f"schedule={cfg.schedule!r}): there a block sees the other blocks; set first_local_layer=0 and "
            "schedule='uniform' for block-KV reuse"
        )


def _sliding_windows(model_config: Any) -> list[int | None]:
    """The sliding window of each layer of the cache transformers builds for this model (None: full attention)."""
    cache = DynamicCache(config=model_config)
    return [getattr(layer, "sliding_window", None) for layer in cache.layers]


def _check_windows(model_config: Any, prefix_len: int, what: str) -> None:
    # In the full forward a key at index s is visible to the query at index p only if p - s < W: every block token
    # sees the sink (index 0) only if the whole prefix fits in the window, 1 + sum(n_j) <= W.
    windows = [w for w in _sliding_windows(model_config) if w is not None]
    if windows and prefix_len > min(windows):
        raise BlockKVError(
            f"{what}: the sink and the blocks take {prefix_len} positions but this model has sliding-window layers of "
            f"{min(windows)} positions: a block token beyond the window would not see the sink in the full forward, "
            f"so reused keys would not be exact; keep the sink plus the blocks within {min(windows)} tokens"
        )


def as_block_ids(input_ids: Any, what: str, vocab: int | None) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise BlockKVError(
            f"{what}: input_ids of shape {tuple(ids.shape)} and dtype {ids.dtype}: pass the block's token ids as a "
            "non-empty 1-D integer tensor or list (or shape (1, n)), without the sink token"
        )
    ids = ids.long()
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise BlockKVError(f"{what}: token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    return ids


def sink_id(handle: LocalistHandle, sink_token_id: int | None) -> int:
    if sink_token_id is None:
        sink_token_id = getattr(handle.base.config, "bos_token_id", None)
        if isinstance(sink_token_id, (list, tuple)):
            sink_token_id = sink_token_id[0] if sink_token_id else None
    if isinstance(sink_token_id, bool) or not isinstance(sink_token_id, int):
        raise BlockKVError(
            f"sink_token_id={sink_token_id!r}: the model config has no bos_token_id; pass the token every composed "
            "prompt starts with (e.g. tokenizer.bos_token_id) as sink_token_id="
        )
    return sink_token_id


def _cache_kwargs(handle: LocalistHandle, cache: DynamicCache) -> dict:
    # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``: pass the name this forward takes.
    params = inspect.signature(handle.base.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


# ---------------------------------------------------------------------- encode / compose
@torch.no_grad()
def encode_block(handle: LocalistHandle, input_ids: Any, sink_token_id: int | None = None) -> BlockKV:
    """Keys and values of ``[sink] + input_ids`` read alone at dial 1; see :meth:`LocalistHandle.encode_block`."""
    check_reusable(handle, "encode_block")
    model_config = handle.base.config
    ids = as_block_ids(input_ids, "encode_block", getattr(model_config, "vocab_size", None))
    sink = sink_id(handle, sink_token_id)
    _check_windows(model_config, ids.numel() + 1, "encode_block")
    device = next(handle.base.parameters()).device
    seq = torch.cat([torch.tensor([sink]), ids])[None].to(device)  # (1, n + 1)
    block_ids = torch.ones_like(seq)
    block_ids[:, 0] = 0  # the sink is general; the block's tokens are block 1
    cache = DynamicCache(config=model_config)
    handle.base(input_ids=seq, block_ids=block_ids, localist_alpha=1.0, use_cache=True,
                **_cache_kwargs(handle, cache))
    keys, values = [], []
    for layer in cache.layers:  # (1, H_kv, n + 1, D) each
        keys.append(layer.keys[0].clone())
        values.append(layer.values[0].clone())
    return BlockKV(input_ids=ids.cpu(), keys=tuple(k[:, 1:] for k in keys), values=tuple(v[:, 1:] for v in values),
                   sink_keys=tuple(k[:, :1] for k in keys), sink_values=tuple(v[:, :1] for v in values),
                   sink_token_id=sink, block_positions=handle.config.block_positions,
                   fingerprint=fingerprint(handle, sink))


def composed_sequence(blocks: Sequence[BlockKV], question_ids: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, block_ids)``, each (1, L): the full sequence a composed cache stands for, for the full forward.

    ``[sink] + block_1 + ... + block_n (+ question)`` with block ids ``0, 1..1, 2..2, ..., n..n (, 0..0)``: at dial 1
    ``model(input_ids, block_ids=block_ids)`` gives the logits a composed cache gives (to float rounding).
    """
    blocks = _check_blocks(blocks, "composed_sequence")
    ids = [torch.tensor([blocks[0].sink_token_id])] + [b.input_ids.cpu() for b in blocks]
    bids = [torch.zeros(1, dtype=torch.long)] + [torch.full((b.length,), j + 1) for j, b in enumerate(blocks)]
    if question_ids is not None:
        q = as_block_ids(question_ids, "composed_sequence", None)
        ids.append(q.cpu())
        bids.append(torch.zeros_like(q.cpu()))
    return torch.cat(ids)[None], torch.cat(bids)[None]


def _check_blocks(blocks: Any, what: str) -> list[BlockKV]:
    if isinstance(blocks, BlockKV) or not isinstance(blocks, (list, tuple)) or not blocks:
        raise BlockKVError(f"{what}: blocks={type(blocks).__name__}: pass a non-empty list of BlockKV")
    for i, b in enumerate(blocks):
        if not isinstance(b, BlockKV):
            raise BlockKVError(f"{what}: blocks[{i}] is a {type(b).__name__}, not a BlockKV (from encode_block)")
    return list(blocks)


@torch.no_grad()
def compose_cache(handle: LocalistHandle, blocks: Sequence[BlockKV], batch_size: int = 1) -> DynamicCache:
    """A ``DynamicCache`` holding ``[sink] + block_1 + ... + block_n``; see :meth:`LocalistHandle.compose_cache`."""
    check_reusable(handle, "compose_cache")
    blocks = _check_blocks(blocks, "compose_cache")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BlockKVError(f"compose_cache: batch_size={batch_size!r} must be an integer >= 1 (rows of questions)")
    cfg = handle.config
    if len(blocks) > cfg.max_blocks:
        raise BlockKVError(
            f"compose_cache: {len(blocks)} blocks but LocalistConfig.max_blocks={cfg.max_blocks}: each block needs "
            "its own block id; compose fewer blocks or raise max_blocks"
        )
    sink = blocks[0].sink_token_id
    expected = fingerprint(handle, sink)
    for i, b in enumerate(blocks):
        if b.fingerprint != expected:
            raise BlockKVError(
                f"compose_cache: blocks[{i}] has fingerprint {b.fingerprint[:12]}..., this model and settings "
                f"{expected[:12]}... (another model, other weights, another sink token than blocks[0]'s {sink}, "
                "or other block_positions / beta_anchor): encode the block again with this model"
            )
    n_layers = len(_sliding_windows(handle.base.config))
    if any(b.num_layers != n_layers for b in blocks):
        raise BlockKVError(f"compose_cache: a block has {blocks[0].num_layers} layers, the model {n_layers}")
    prefix_len = 1 + sum(b.length for b in blocks)
    _check_windows(handle.base.config, prefix_len, "compose_cache")
    device = next(handle.base.parameters()).device
    cache = DynamicCache(config=handle.base.config)
    for layer in range(n_layers):
        k = torch.cat([blocks[0].sink_keys[layer].to(device)] + [b.keys[layer].to(device) for b in blocks], dim=1)
        v = torch.cat([blocks[0].sink_values[layer].to(device)] + [b.values[layer].to(device) for b in blocks], dim=1)
        shape = (batch_size,) + tuple(k.shape)  # (B, H_kv, L, D)
        cache.layers[layer].update(k[None].expand(shape).contiguous(), v[None].expand(shape).contiguous())
    _, block_ids = composed_sequence(blocks)
    track_cache(cache)
    cache._localist_block_ids = block_ids.to(device).expand(batch_size, -1).contiguous()
    cache._localist_sink = torch.zeros(batch_size, dtype=torch.long, device=device)
    # Tokens after the composed blocks are general (block 0), not a continuation of the last block.
    cache._localist_continue = torch.zeros(batch_size, dtype=torch.long, device=device)
    if cache_length(cache) != prefix_len:  # pragma: no cover - a cache class that does not keep what it is given
        raise BlockKVError(f"compose_cache: the cache holds {cache_length(cache)} positions, expected {prefix_len}")
    return cache
