"""Head-to-block assignment and block feature subspaces ``U_i`` (docs/design.md section 4).

- :func:`head_blocks`: each query head of a localised layer gets a block ``b(h)`` (round-robin over the active
  blocks, by key/value group so that heads sharing a K head share a block), a fraction stays general (0).
- :func:`coordinate_subspaces`: fixed coordinate groups (models trained from scratch): with rank ``r``, general
  features are coordinates ``[0, r)`` and the j-th active block owns ``[(j+1) r, (j+2) r)``.
- :func:`calibrate_subspaces`: for pretrained models, from each block's hidden states at the layer input (the input
  of the Q/K projections): the directions in which a block's inputs hold more energy than the other blocks', outside
  the ``r`` directions all blocks share (which stay general), orthogonalised across blocks.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..arch.qk import input_size
from ..attention.call import call_from_kwargs
from ..errors import LocalistConfigError, LocalistError


def head_blocks(num_heads: int, num_kv_heads: int, active_blocks: list[int], general_fraction: float) -> torch.Tensor:
    """(H,) block of each query head; 0 = general (never penalised).

    The last ``floor(general_fraction * H)`` heads are general; the others take ``active[g mod n]`` where ``g`` is
    the head's key/value group (``h // (H / H_kv)``), so every head that reads one K head has the same block. When
    the non-general heads span fewer K groups than there are blocks, they take ``active[h mod n]`` (one head at a
    time), so that every block gets heads whenever there are at least ``n`` non-general heads.
    """
    n_general = math.floor(general_fraction * num_heads)
    blocks = torch.zeros(num_heads, dtype=torch.long)
    if not active_blocks:
        return blocks
    group = torch.arange(num_heads) // (num_heads // num_kv_heads)
    # K groups the non-general heads read: the general heads (the last ones) may take whole groups, and counting
    # those would leave blocks without a head (8 heads, 4 K heads, 4 blocks, fraction 0.25: block 4 had none).
    n_groups = len(torch.unique(group[: num_heads - n_general]))
    key = group if n_groups >= len(active_blocks) else torch.arange(num_heads)
    for h in range(num_heads - n_general):
        blocks[h] = active_blocks[int(key[h]) % len(active_blocks)]
    return blocks


def default_rank(hidden: int, n_active: int, rank: int | None) -> int:
    r = rank if rank is not None else hidden // (n_active + 1)
    if r < 1 or r * (n_active + 1) > hidden:
        raise LocalistConfigError(
            f"LocalistConfig.subspace_rank={rank!r}: {n_active} block subspaces of rank {r} plus the general group "
            f"need {r * (n_active + 1)} features but hidden_size is {hidden}; lower subspace_rank or active blocks"
        )
    return r


def coordinate_subspaces(hidden: int, n_active: int, rank: int | None = None) -> torch.Tensor:
    """(n_active, E, r) orthonormal bases: block j (0-based among the active ones) owns coordinates (j+1)r..(j+2)r."""
    r = default_rank(hidden, n_active, rank)
    if n_active == 0:
        return torch.zeros(0, hidden, r)  # no active block: nothing to penalise (recruitment starts here)
    eye = torch.eye(hidden)
    return torch.stack([eye[:, (j + 1) * r: (j + 2) * r] for j in range(n_active)])


def orthogonalise(bases: list[torch.Tensor], tol: float = 1e-4, start: torch.Tensor | None = None) -> torch.Tensor:
    """Make the subspaces mutually orthogonal: each basis loses its components in the earlier ones (and in
    ``start`` (E, m), an orthonormal basis of directions no subspace may hold).

    The rest is re-orthonormalised through its left singular vectors (same span as a QR of it). Directions that
    (nearly) vanish because the basis overlapped the earlier subspaces (singular value below ``tol``; few tokens,
    or directions shared by every block) are replaced by directions of the orthogonal complement of everything
    taken so far, so every basis keeps its rank and ``U_i^T U_j = 0`` holds to rounding.
    """
    out: list[torch.Tensor] = []
    for u in bases:
        parts = ([] if start is None else [start.to(u.dtype)]) + out
        taken = torch.cat(parts, dim=1) if parts else None
        out.append(complement_basis(u, taken, tol))
    return torch.stack(out)


def complement_basis(u: torch.Tensor, taken: torch.Tensor | None, tol: float = 1e-4) -> torch.Tensor | None:
    """Orthonormal (E, r) basis: ``u`` minus its components in ``taken`` (E, m), completed from the complement.

    None when the complement of ``taken`` is too small for rank r.
    """
    e, r = u.shape
    if taken is None or taken.shape[1] == 0:
        taken = u.new_zeros(e, 0)
    if taken.shape[1] + r > e:
        return None
    for _ in range(2):  # twice: re-orthogonalisation keeps the rounding error at machine precision
        u = u - taken @ (taken.T @ u)
    left, sv, _ = torch.linalg.svd(u, full_matrices=False)
    q = left[:, sv > tol]
    if q.shape[1] < r:
        complete, _ = torch.linalg.qr(torch.cat([taken, q], dim=1), mode="complete")
        q = torch.cat([q, complete[:, taken.shape[1] + q.shape[1]:][:, : r - q.shape[1]]], dim=1)
    return q[:, :r].contiguous()


class LayerInputs:
    """Collects the input of each layer's Q projection, with the block id of every position.

    The input of a layer's attention module is its Q projection's input; a pre-hook on the module (with kwargs)
    also receives the layout of the call it runs in (``localist_call``).
    """

    def __init__(self, handle) -> None:
        self.handle = handle
        self.chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hooks = []

    def __enter__(self) -> LayerInputs:
        for layer, module in enumerate(self.handle.attention_modules):
            self._hooks.append(module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def _hook(self, layer: int):
        def hook(_module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach()  # (B, T, E)
            call = call_from_kwargs(kwargs)
            if call is None:
                raise LocalistError("LayerInputs: a layer ran outside a call of the patched model")
            blocks = call.block_ids[:, -x.shape[1]:]
            valid = call.query_valid[:, -x.shape[1]:]
            self.chunks.setdefault(layer, []).append((x[valid].float().cpu(), blocks[valid].cpu()))
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def by_block(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [c[0] for c in self.chunks.get(layer, [])]
        bs = [c[1] for c in self.chunks.get(layer, [])]
        if not xs:
            raise LocalistError(f"no inputs were recorded at layer {layer}: is the calibration data empty?")
        return torch.cat(xs), torch.cat(bs)


def run_batches(handle, loader: Iterable, max_batches: int | None = None, with_grad: bool = False):
    """Run the patched model over ``loader`` (dicts of tensors); yields each batch, its output and its layout
    (the :class:`~hf_localist.attention.call.CallContext` the call used)."""
    model = handle.model
    device = next(handle.base.parameters()).device
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()), handle.capture_layouts() as calls:
            out = model(**batch)
        yield batch, out, calls[-1]


def calibrate_subspaces(handle, loader: Iterable, rank: int | None = None, max_batches: int | None = None,
                        shared_first: bool = True) -> torch.Tensor:
    """Per layer, an orthonormal rank-``r`` subspace per active block from the layer inputs; stored on the handle.

    ``shared_first`` (default): the ``r`` directions every block's inputs hold most energy along
    (:func:`shared_directions`: a pretrained model's outlier dimensions, the common mean, token identity) are
    *general*: no block subspace holds them, so the penalty never takes them from a head (as coordinates ``[0, r)``
    for ``subspace='coordinate'``). Each block's subspace is then the directions in which its inputs hold more
    energy than the other blocks' (:func:`specific_subspaces`). ``False``: each block's top principal directions
    (of its inputs centred on its own mean), orthogonalised in block order, as calibration did before this option
    existed: the first active block's subspace then takes what every block varies along and the penalty removes
    those features from every head that does not own that block.

    Returns (L, n_active, E, r). Raises :class:`LocalistError` when the data hold no token of an active block.
    """
    cfg = handle.config
    active = cfg.active_block_list()
    was_training = handle.base.training
    handle.base.eval()
    try:
        with LayerInputs(handle) as rec:
            for _batch, _out, _call in run_batches(handle, loader, max_batches):
                pass
    finally:
        handle.base.train(was_training)
    per_layer = []
    for layer in range(len(handle.attention_modules)):
        x, blocks = rec.by_block(layer)
        x = x.double()  # float64: the projections and re-orthogonalisation keep U_i^T U_j = 0 to 1e-6 in float32
        r = default_rank(x.shape[1], len(active), rank if rank is not None else cfg.subspace_rank)
        rows = []
        for b in active:
            xb = x[blocks == b]  # (N_b, E)
            if xb.shape[0] == 0:
                raise LocalistError(
                    f"calibration data hold no token of block {b} (layer {layer}): add examples of that block or "
                    f"remove it from LocalistConfig.active_blocks={active}"
                )
            rows.append(xb)
        if shared_first and active:
            per_layer.append(specific_subspaces([xb.T @ xb / xb.shape[0] for xb in rows], r).float())  # E[x x^T]
        else:
            per_layer.append(orthogonalise([top_directions(xb - xb.mean(dim=0), r) for xb in rows]).float())
    subspaces = torch.stack(per_layer)
    handle.state.subspaces = subspaces
    return subspaces


def shared_directions(moments: list[torch.Tensor], r: int) -> torch.Tensor:
    """(E, r) orthonormal: the ``r`` directions along which *every* block's inputs hold the most energy.

    ``moments`` are the blocks' second moments ``M_b = E[x x^T]`` (E, E). Candidates are the eigenvectors ``v`` of
    ``M = mean_b M_b``; each is scored by the least energy any block has along it, ``min_b v^T M_b v``, and the
    ``r`` best are kept. Ranking by ``M`` alone would also take a direction that only one block uses (energy ``s``
    in one block of ``n`` is ``s / n`` in ``M``): that is the block's feature, not a shared one. When the blocks
    share fewer than ``r`` directions, the rest are the best of the others by the same score.
    """
    pooled = sum(moments) / len(moments)  # (E, E)
    _, vecs = torch.linalg.eigh(pooled)  # (E, E), eigenvectors as columns
    least = torch.stack([(vecs * (m @ vecs)).sum(0) for m in moments]).min(dim=0).values  # (E,) min_b v^T M_b v
    return vecs[:, least.argsort(descending=True)[:r]].contiguous()


def specific_subspaces(moments: list[torch.Tensor], r: int) -> torch.Tensor:
    """(n, E, r): per block, the directions outside the shared ones along which it holds more energy than the others.

    With ``G`` the shared directions (:func:`shared_directions`) and ``P = I - G G^T``, block ``b``'s basis is the
    top ``r`` eigenvectors of ``P (M_b - mean_{j != b} M_j) P - c G G^T`` (``c`` = the trace of ``sum_b M_b``, which
    ranks G last): its own features first (positive eigenvalues; a block's mean offset from the others is one), then
    directions no block prefers (about 0), other blocks' features last (negative). A block with fewer than ``r``
    features of its own fills its rank with neutral directions, not with another block's. The bases are then made
    mutually orthogonal and orthogonal to G (:func:`orthogonalise`).
    """
    shared = shared_directions(moments, r)  # (E, r)
    proj = torch.eye(shared.shape[0], dtype=shared.dtype) - shared @ shared.T  # (E, E)
    total, n = sum(moments), len(moments)  # (E, E)
    last = float(torch.trace(total)) * (shared @ shared.T)  # (E, E)
    bases = []
    for m in moments:
        contrast = m - (total - m) / (n - 1) if n > 1 else m  # M_b - mean_{j != b} M_j
        _, vecs = torch.linalg.eigh(proj @ contrast @ proj - last)  # ascending eigenvalues
        bases.append(vecs[:, -r:].flip(-1))  # (E, r), largest first
    return orthogonalise(bases, start=shared)


def top_directions(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, E) rows -> (E, r): the top-``r`` right singular vectors (principal directions of centred rows)."""
    # full_matrices only when there are fewer rows than r (the basis is then padded from the complement later); it
    # would build a (rows x rows) U otherwise.
    _, _, vh = torch.linalg.svd(x, full_matrices=x.shape[0] < r)
    return vh[:r].T.contiguous()


def layer_subspaces(handle) -> torch.Tensor:
    """(L, n_active, E, r) bases in use: calibrated ones if present, else coordinate groups."""
    cfg = handle.config
    stored = getattr(handle.state, "subspaces", None)
    n_active = len(cfg.active_block_list())
    if stored is not None and stored.shape[1] == n_active:
        return stored
    if cfg.subspace == "pca":
        raise LocalistError(
            "LocalistConfig.subspace='pca' needs calibrated subspaces: call calibrate_subspaces(handle, loader) first"
        )
    hidden = input_size(handle)
    key = (hidden, n_active, cfg.subspace_rank, len(handle.attention_modules))
    cached = handle.__dict__.get("_coordinate_subspaces")
    if cached is None or cached[0] != key:
        basis = coordinate_subspaces(hidden, n_active, cfg.subspace_rank)
        cached = (key, basis.unsqueeze(0).expand(len(handle.attention_modules), *basis.shape))
        handle._coordinate_subspaces = cached  # derived from the config: rebuilt when the key changes
    return cached[1]
