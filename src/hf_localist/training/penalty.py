"""The group-lasso penalty on Q/K head slices, as a loss term and as a proximal step (docs/design.md section 4).

    penalty = sum_l sum_h sum_{i != b(h)} lambda_{l,h,i} * ( ||W_Q^(l,h) U_i||_F + ||W_K^(l,kv(h)) U_i||_F )

General heads (b(h) = 0) and layers below ``first_local_layer`` are not penalised. The norm is not squared, which
is what makes whole groups exactly zero under the proximal step

    W_g <- max(0, 1 - lr * lambda / ||W_g||) * W_g,      with W_g = W U_i  (the group's coordinates),

applied as ``W <- W - (1 - s) (W U_i) U_i^T`` (exact for mutually orthogonal subspaces). A K head read by several
query heads carries the sum of their lambdas (the same norm appears once per such head in the penalty). Given the
optimizer, ``lr`` becomes the optimizer's own step on the group (``training/precondition.py``: Adam's ``lr / (sqrt(
v_hat) + eps)``, averaged over the group), so that zeros appear and stay under AdamW where the threshold says.

Adapters (peft LoRA): norms and the loss-mode penalty read the effective weights ``W_0 + delta`` (``arch/qk.py``), so
the penalty's gradient reaches the adapter factors only and the frozen base stays bit-identical. The proximal step
writes weights, and an adapter delta ``scaling * B A`` of rank r cannot in general make a group of ``W_0 + B A``
exactly zero: ``penalty='prox'`` refuses frozen Q/K weights (use ``penalty='loss'`` with adapters, or train the Q/K
projections themselves, e.g. peft ``modules_to_save``).

Sharded parameters (FSDP2, DTensor) are read whole (``qk.qk_head_weights`` all-gathers them), so every norm is the
norm of the full group; the proximal step shrinks the full weight and each rank writes its shard back.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from ..arch.qk import active_adapters, head_counts, kv_head_of, projection_module, qk_head_weights, write_back
from ..errors import LocalistConfigError, LocalistError
from ..patch.forward import register_output_hook
from .precondition import group_step, step_scale
from .subspaces import head_blocks, layer_subspaces


@dataclass
class GroupNorms:
    q: torch.Tensor  # (L, H, n) ||W_Q^(l,h) U_i||_F, differentiable
    k: torch.Tensor  # (L, H_kv, n)


def _head_blocks(handle) -> torch.Tensor:
    cfg = handle.config
    h, h_kv, _ = head_counts(handle)
    return head_blocks(h, h_kv, cfg.active_block_list(), cfg.general_head_fraction)


def penalty_weights(handle) -> torch.Tensor:
    """(L, H, n) lambda_{l,h,i}: 0 for general heads, own blocks and layers below first_local_layer."""
    cfg = handle.config
    active = torch.tensor(cfg.active_block_list(), dtype=torch.long)
    blocks = _head_blocks(handle)  # (H,)
    mask = (blocks[:, None] != 0) & (blocks[:, None] != active[None, :])  # (H, n)
    n_layers = len(handle.attention_modules)
    layer_on = torch.tensor([layer >= cfg.first_local_layer for layer in range(n_layers)])
    mask = layer_on[:, None, None] & mask[None]  # (L, H, n)
    if cfg.lambda_mode == "fixed":
        lam = torch.full(mask.shape, cfg.penalty_lambda)
    else:
        thr = getattr(handle.state, "lambda_threshold", None)
        if thr is None:
            raise LocalistError(
                "LocalistConfig.lambda_mode='threshold' needs lambda_threshold per (layer, head, block): run "
                "report = estimate_constants(model, loader) and handle.set_lambda_threshold(report.threshold())"
            )
        if tuple(thr.shape) != tuple(mask.shape):
            raise LocalistError(
                f"lambda_threshold has shape {tuple(thr.shape)}, expected (L, H, n)={tuple(mask.shape)}")
        lam = cfg.alpha_train * cfg.kappa * thr.float().cpu()
    return torch.where(mask, lam, torch.zeros_like(lam))


def _project(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(heads, D, E) x (n, E, r) -> (heads, n, D, r): every head's coordinates in every block subspace.

    One matmul against the concatenated bases ``[U_1 | ... | U_n]`` (E, n*r) instead of n small ones.
    """
    heads, d, e = w.shape
    n, _, r = u.shape
    u_cat = u.to(w.dtype).permute(1, 0, 2).reshape(e, n * r)  # (E, n*r)
    return (w.reshape(heads * d, e) @ u_cat).view(heads, d, n, r).permute(0, 2, 1, 3)


def _unproject(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(heads, n, D, r) coordinates -> (heads, D, E): sum_i g_i U_i^T."""
    heads, n, d, r = g.shape
    e = u.shape[1]
    u_cat = u.to(g.dtype).permute(1, 0, 2).reshape(e, n * r)
    return (g.permute(0, 2, 1, 3).reshape(heads * d, n * r) @ u_cat.T).view(heads, d, e)


def group_norms(handle) -> GroupNorms:
    """Frobenius norms of every (layer, head, block) group of Q and K, differentiable w.r.t. the weights.

    With peft adapters on the projections, the groups of the effective weights ``W_0 + delta`` (differentiable with
    respect to the adapter factors; the frozen base gets no gradient)."""
    subspaces = layer_subspaces(handle)
    qs, ks = [], []
    for layer in range(len(handle.attention_modules)):
        wq, wk = qk_head_weights(handle, layer, effective=True)
        u = subspaces[layer].to(wq.device)
        qs.append(torch.linalg.vector_norm(_project(wq, u), dim=(-2, -1)))
        ks.append(torch.linalg.vector_norm(_project(wk, u), dim=(-2, -1)))
    return GroupNorms(q=torch.stack(qs), k=torch.stack(ks))


def _k_weights(handle, lam: torch.Tensor) -> torch.Tensor:
    """(L, H, n) -> (L, H_kv, n): each K group carries the lambdas of every query head that reads it.

    With GQA one K head serves several query heads. Its group of block ``i`` is exempt when one of its readers owns
    block ``i`` or is a general head: penalising it would take from that head the very features it keeps (the
    literal sum of docs/design.md section 4 would penalise it; we choose not to, so "general heads are never
    penalised" and "own-block features survive" hold for K as well as Q). With one K head per query head this
    changes nothing.
    """
    h, h_kv, _ = head_counts(handle)
    kv = kv_head_of(h, h_kv)
    out = torch.zeros(lam.shape[0], h_kv, lam.shape[2], dtype=lam.dtype).index_add_(1, kv, lam)
    active = handle.config.active_block_list()
    blocks = _head_blocks(handle)
    exempt = torch.zeros(h_kv, len(active), dtype=torch.bool)
    for head in range(h):
        b = int(blocks[head])
        if b == 0:
            exempt[kv[head]] = True
        elif b in active:
            exempt[kv[head], active.index(b)] = True
    return out.masked_fill(exempt[None], 0.0)


def penalty(handle, norms: GroupNorms | None = None) -> torch.Tensor:
    """The scalar penalty (a differentiable tensor on the weights' device)."""
    norms = norms if norms is not None else group_norms(handle)
    lam = penalty_weights(handle)
    lam_k = _k_weights(handle, lam)
    dev = norms.q.device
    return (lam.to(dev, norms.q.dtype) * norms.q).sum() + (lam_k.to(dev, norms.k.dtype) * norms.k).sum()


@dataclass
class ProxStats:
    zero_q: torch.Tensor  # (L, H, n) bool: penalised groups that are exactly zero after the step
    zero_k: torch.Tensor  # (L, H_kv, n) bool
    penalised_q: torch.Tensor  # (L, H, n) bool
    penalised_k: torch.Tensor  # (L, H_kv, n) bool

    @property
    def num_zero(self) -> int:
        return int(self.zero_q.sum() + self.zero_k.sum())

    @property
    def num_penalised(self) -> int:
        return int(self.penalised_q.sum() + self.penalised_k.sum())


def _shrink(w: torch.Tensor, u: torch.Tensor, lam: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """In place: W_g <- max(0, 1 - eta * lam / ||W_g||) W_g for every (head, block); returns the zero mask.

    ``eta``: the step size, (heads, n) or broadcastable ((1, 1) for a plain ``lr``)."""
    g = _project(w, u)  # (heads, n, D, r)
    norm = torch.linalg.vector_norm(g, dim=(-2, -1))  # (heads, n)
    lam = lam.to(w.device, torch.float32)
    eta = eta.to(w.device, torch.float32)
    scale = torch.where(lam > 0, torch.clamp(1 - eta * lam / norm.float().clamp_min(1e-30), min=0.0),
                        torch.ones_like(lam))
    removed = (1 - scale).to(w.dtype)[..., None, None] * g  # the part of each group the step removes
    w.sub_(_unproject(removed, u))
    return (scale == 0) & (lam > 0)


def _frozen_parts(handle, lam: torch.Tensor, lam_k: torch.Tensor) -> set:
    """``{(layer, "q" | "k")}`` whose weight the proximal step must not write (frozen, or under a peft adapter).

    Refuses (``LocalistConfigError``, before anything is written) when such a weight has a penalised group that is
    not zero: the step would change a weight that training does not (and that an adapter save does not keep). A
    frozen weight whose penalised groups are all zero already (content-blind Q/K frozen at zero) needs no step.
    """
    spec = handle.spec
    frozen: set = set()
    norms = None
    for layer, module in enumerate(handle.attention_modules):
        names = {"q": spec.q_proj, "k": spec.k_proj or spec.q_proj}  # fused layouts: K lives in q_proj's weight
        for part, name in names.items():
            proj = getattr(module, name)
            adapters = active_adapters(proj)
            if not adapters and projection_module(module, name).weight.requires_grad:
                continue
            frozen.add((layer, part))
            norms = norms if norms is not None else group_norms(handle)
            values, weights = (norms.q, lam) if part == "q" else (norms.k, lam_k)
            if bool(((values[layer].cpu() > 0) & (weights[layer] > 0)).any()):
                raise LocalistConfigError(
                    f"LocalistConfig.penalty='prox': layer {layer} {name}.weight is frozen"
                    f"{' (peft adapter ' + repr(adapters) + ' on it)' if adapters else ''}; the proximal step would "
                    "change weights that training does not (and that an adapter save does not keep). With adapters "
                    "use penalty='loss' (it acts on base + adapter delta and trains only the adapter), or train the "
                    "Q/K projections themselves (peft modules_to_save)"
                )
    return frozen


@torch.no_grad()
def prox_step(handle, lr: float | None = None, optimizer=None) -> ProxStats:
    """One proximal step after an optimizer step.

    ``optimizer``: the optimizer that just stepped; the shrink then uses its per-coordinate step
    (``training/precondition.py``; the Adam family and SGD, else ``LocalistConfigError``), and each weight's own
    group learning rate. Without it (or with ``LocalistConfig.prox_preconditioner='none'``), the plain step size
    ``lr``. Only trainable Q/K weights are written; a frozen one with a non-zero penalised group is refused
    (``LocalistConfigError``), before anything is written.
    """
    precondition = optimizer is not None and handle.config.prox_preconditioner != "none"
    if not precondition and (lr is None or not lr >= 0):
        raise LocalistError(f"prox_step: lr={lr!r} must be a number >= 0 (or pass the optimizer)")
    lam = penalty_weights(handle)
    _, h_kv, _ = head_counts(handle)
    lam_k = _k_weights(handle, lam)
    frozen = _frozen_parts(handle, lam, lam_k)
    pick = step_scale(optimizer) if precondition else None
    plain = torch.full((1, 1), float(lr)) if lr is not None else None
    subspaces = layer_subspaces(handle)
    zq, zk = [], []
    for layer in range(len(handle.attention_modules)):
        gathered: dict = {}  # sharded (FSDP2) weights: shrink the full weight, then write each rank's shard back
        wq, wk = qk_head_weights(handle, layer, gathered=gathered)
        u = subspaces[layer].to(wq.device)
        if pick is not None:
            sq, sk = qk_head_weights(handle, layer, pick=pick)  # (H, D, E) / (H_kv, D, E) per-coordinate steps
            eta_q, eta_k = group_step(sq, u), group_step(sk, u)  # (H, n), (H_kv, n)
        else:
            eta_q = eta_k = plain
        for part, w, weights, eta, zeros in (("q", wq, lam[layer], eta_q, zq), ("k", wk, lam_k[layer], eta_k, zk)):
            if (layer, part) in frozen:  # all its penalised groups are zero already (checked): nothing to write
                norm = torch.linalg.vector_norm(_project(w, u), dim=(-2, -1)).cpu()
                zeros.append((norm == 0) & (weights > 0))
            else:
                zeros.append(_shrink(w, u, weights, eta))
        write_back(gathered)
    stats = ProxStats(zero_q=torch.stack(zq).cpu(), zero_k=torch.stack(zk).cpu(), penalised_q=lam > 0,
                      penalised_k=lam_k > 0)
    handle.state.last_prox = stats
    return stats


def kkt_ratios(handle, stats: ProxStats) -> torch.Tensor:
    """``||grad_g L_data|| / lambda_g`` for every zero group (1-D); KKT holds for a zero group iff ratio <= 1.

    Reads the ``.grad`` of the Q/K weights (call it before the optimizer clears them). ``grad_g = G U_i`` is the
    gradient with respect to the group's coordinates.
    """
    lam = penalty_weights(handle)
    _, h_kv, _ = head_counts(handle)
    lam_k = _k_weights(handle, lam)
    subspaces = layer_subspaces(handle)
    ratios = []
    for layer in range(len(handle.attention_modules)):
        gq, gk = qk_head_weights(handle, layer, grad=True)
        if gq is None:
            continue
        u = subspaces[layer].to(gq.device)
        for g, zero, weight in ((gq, stats.zero_q[layer], lam[layer]), (gk, stats.zero_k[layer], lam_k[layer])):
            norm = torch.linalg.vector_norm(_project(g, u), dim=(-2, -1)).cpu()
            ratios.append((norm / weight.clamp_min(1e-30))[zero])
    return torch.cat(ratios) if ratios else torch.empty(0)


def _loss_shifts_labels(model) -> bool:
    """Whether the Trainer counts ``num_items_in_batch`` over ``labels[..., 1:]`` for this model.

    Mirrors ``transformers.Trainer``: labels are counted shifted when the model's ``loss_type`` maps to
    ``ForCausalLMLoss`` (and the model is not encoder-decoder), unshifted otherwise. The micro-batch shares only add
    up to one penalty when they count label tokens exactly as ``num_items_in_batch`` was counted.
    """
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers without the loss mapping
        return bool(getattr(getattr(model, "config", None), "is_decoder", True))
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss


_WITH_LOCALIST_LOSS: dict[type, type] = {}


def _with_localist_loss(out, value: torch.Tensor):
    """``out`` with a ``localist_loss`` entry: an instance of a subclass of its ``ModelOutput`` class that declares the
    field (cached per class), so that the output survives pytree flatten/unflatten (``DistributedDataParallel``
    rebuilds the output as ``type(out)(**dict(out))``: a key that is not a dataclass field makes it raise)."""
    cls = type(out)
    if not dataclasses.is_dataclass(out):
        out["localist_loss"] = value  # a plain dict (or other mapping)
        return out
    if "localist_loss" not in {f.name for f in dataclasses.fields(out)}:
        sub = _WITH_LOCALIST_LOSS.get(cls)
        if sub is None:
            name = f"{cls.__name__}WithLocalistLoss"
            field = ("localist_loss", "torch.FloatTensor | None", dataclasses.field(default=None))
            sub = dataclasses.make_dataclass(name, [field], bases=(cls,), namespace={"__module__": __name__})
            globals()[name] = sub  # importable by name (pickle, pytree serialisation)
            _WITH_LOCALIST_LOSS[cls] = sub
        out = sub(**dict(out.items()))
    out["localist_loss"] = value
    return out


def add_penalty_to_output(handle, out, labels: torch.Tensor | None, num_items_in_batch):
    """Loss mode: the gradient of ``outputs.loss`` becomes that of ``data loss + coef * penalty * share`` while its
    value stays the data loss; ``outputs.localist_loss = penalty``. Returns the output (a subclass instance of the
    model's output class that declares ``localist_loss``; see ``_with_localist_loss``).

    ``loss = data + (term - term.detach())``: the bracket is exactly 0.0 in value, so every Trainer (TRL's too) logs
    the data loss, and it carries the penalty's gradient, so every Trainer optimises the penalised objective. The
    penalty itself is logged as ``localist/penalty`` by ``LocalistCallback``.

    ``share`` keeps the total right under gradient accumulation. When the Trainer passes ``num_items_in_batch``
    (token-normalised loss, summed over micro-batches without dividing by the accumulation steps), each micro-batch
    adds the fraction ``n_micro / num_items_in_batch`` of the penalty, so the micro-batches add up to one penalty.
    Otherwise the Trainer divides every micro-batch loss by the accumulation steps itself, and share = 1.
    """
    cfg = handle.config
    pen = penalty(handle)
    if not pen.requires_grad and bool(penalty_weights(handle).gt(0).any()):
        warnings.warn(
            "hf_localist: penalty='loss' but no penalised Q/K weight requires grad (frozen weights, e.g. peft/LoRA "
            "adapters: the penalty reads the base projection weights), so the penalty term has no effect on training",
            UserWarning, stacklevel=3,
        )
    share = 1.0
    if num_items_in_batch is not None and labels is not None:
        counted = labels[..., 1:] if labels.dim() > 1 and _loss_shifts_labels(handle.base) else labels
        n_micro = (counted != -100).sum()
        total = (num_items_in_batch.to(pen.device) if isinstance(num_items_in_batch, torch.Tensor)
                 else num_items_in_batch)
        share = n_micro.to(pen.device).float() / total
    term = cfg.localist_loss_coef * pen * share
    out["loss"] = out["loss"] + (term - term.detach()).to(out["loss"].dtype)
    return _with_localist_loss(out, pen.detach())


def _loss_mode_output_hook(handle, out, bound: dict, kwargs: dict):
    """Output hook of the patched forward (``register_output_hook``): loss mode in training with grad only."""
    if handle is None or handle.config.penalty != "loss" or not handle.base.training or not torch.is_grad_enabled():
        return out
    if isinstance(out, tuple) or getattr(out, "loss", None) is None:
        return out
    return add_penalty_to_output(handle, out, bound.get("labels"), kwargs.get("num_items_in_batch"))


# The patch layer runs registered hooks after every forward; it never imports this (training) module itself.
register_output_hook("penalty_loss", _loss_mode_output_hook)
