"""The optimizer's per-coordinate step, so that the proximal step matches the step the optimizer just took.

The proximal step of docs/design.md section 4 shrinks every group by ``lr * lambda``. That is the right amount for
SGD, whose data step is ``lr * grad``: a group stays at zero exactly when ``||grad_g|| <= lambda`` (the KKT
condition, and what ``lambda_threshold`` is calibrated against). Adam and AdamW take the step
``lr * m_hat / (sqrt(v_hat) + eps)`` instead: the gradient divided by its running RMS. With the plain shrink, a small
but persistent gradient moves a zero group by about ``lr`` per step while the prox removes only ``lr * lambda``, so
groups never stay at zero unless lambda is hundreds of times the threshold.

The preconditioned proximal step (as in ProxGen, Yun, Lozano and Yang 2021) applies the prox in the optimizer's own
metric: with the diagonal preconditioner ``P = 1 / (sqrt(v_hat) + eps)`` the shrink becomes ``lr * P * lambda``. A
group here is a subspace projection ``W U_i`` that mixes coordinates, and the group-lasso prox has a closed form
only for a metric that is a scalar on the group, so we use the group's mean preconditioner

    eta_{h,i} = lr * sum_{d,e} P[h, d, e] * w_i[e] / (D * r),      w_i[e] = ||U_i[e, :]||^2,  sum_e w_i[e] = r,

the mean of ``P`` over the head's rows weighted by how much each input coordinate belongs to block ``i``'s subspace
(for coordinate subspaces: exactly the mean over the group's own coordinates). Then
``W_g <- max(0, 1 - eta_{h,i} lambda / ||W_g||) W_g``. A zero group receives the Adam step
``~ lr * P * m_g``, of norm ``~ eta ||grad_g||``, and the prox removes ``eta * lambda``: it stays at zero exactly when
``||grad_g|| <= lambda``, the same condition as under SGD, so one calibrated threshold serves both.

Supported: ``torch.optim.SGD`` (P = 1) and the Adam family (any optimizer whose parameter state holds
``exp_avg_sq`` and whose parameter group holds ``betas`` and ``eps``: ``torch.optim.Adam``, ``AdamW``, fused and
foreach variants, ``amsgrad``). Anything else raises :class:`~hf_localist.errors.LocalistConfigError` unless
``LocalistConfig.prox_preconditioner='none'`` asks for the plain ``lr * lambda`` shrink.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import LocalistConfigError


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or any wrapper with ``.optimizer``)."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, torch.optim.Optimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    return optimizer


def _group_of(optimizer, param) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _kind(optimizer, group: dict, state: dict) -> str:
    if "betas" in group and "eps" in group and "exp_avg_sq" in state:
        return "adam"
    if isinstance(_inner(optimizer), torch.optim.SGD):
        return "sgd"
    raise LocalistConfigError(
        f"LocalistConfig.penalty='prox' with optimizer {type(_inner(optimizer)).__name__}: the proximal step knows the "
        "per-coordinate step of SGD and of the Adam family (Adam, AdamW: the Trainer's default). Use one of them, "
        "use penalty='loss', or set prox_preconditioner='none' for the plain lr * lambda shrink (whether groups "
        "reach zero then depends on the optimizer's step size; docs/training.md)"
    )


def step_scale(optimizer) -> Callable[[torch.nn.Parameter], torch.Tensor | None]:
    """A ``pick`` for ``qk_head_weights``: each parameter -> its per-coordinate step ``lr * P`` (same shape; ``lr``
    everywhere for SGD). Raises ``LocalistConfigError`` for a parameter the optimizer does not train."""
    opt = _inner(optimizer)

    def pick(p):
        if not p.requires_grad:  # frozen: the proximal step does not write it (penalty._frozen_parts)
            return torch.full(p.shape, float("nan"), device=p.device)
        group = _group_of(opt, p)
        if group is None:
            raise LocalistConfigError(
                "LocalistConfig.penalty='prox': a penalised Q/K weight of shape "
                f"{tuple(p.shape)} is not in the optimizer, so the proximal step would change a weight that training "
                "does not: train the Q/K projections, or use penalty='loss' (with adapters it acts on base + delta)"
            )
        state = opt.state.get(p, {})
        lr = float(group["lr"])
        kind = _kind(optimizer, group, state)
        if kind == "sgd":
            return torch.full(p.shape, lr, device=p.device)
        beta2 = float(group["betas"][1])
        step = float(state["step"]) if "step" in state else 0.0
        if step < 1:  # no step taken yet: the optimizer has no second moment, nothing to match
            return torch.full(p.shape, lr, device=p.device)
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
        bias2 = 1.0 - beta2**step
        # torch.optim.Adam(W): denom = sqrt(v) / sqrt(1 - beta2^t) + eps  (the update is lr * m_hat / denom)
        denom = (v.float() / bias2).sqrt_().add_(float(group["eps"]))
        return denom.reciprocal_().mul_(lr)

    return pick


def group_step(scale: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(heads, D, E) per-coordinate step, (n, E, r) bases -> (heads, n) step size ``eta``.

    ``eta_{h,i} = sum_{d,e} scale[h, d, e] w_i[e] / (D r)`` with ``w_i[e] = ||U_i[e, :]||^2``.
    """
    n, _, r = u.shape
    w = u.float().pow(2).sum(-1).T / r  # (E, n): each column sums to 1
    return scale.float().mean(dim=1) @ w.to(scale.device)  # (heads, E) @ (E, n) -> (heads, n)
