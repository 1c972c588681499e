"""The proximal step under adaptive optimizers (training/precondition.py; docs/training.md).

    W_g <- max(0, 1 - eta_{h,i} lambda / ||W_g||) W_g,
    eta_{h,i} = sum_{d,e} lr P[h, d, e] ||U_i[e, :]||^2 / (D r),    P = 1 / (sqrt(v_hat) + eps)  (Adam), 1 (SGD)
"""

from __future__ import annotations

import pytest
import torch
from helpers import HIDDEN, build_model, load_script, random_block_ids, random_ids

import hf_localist as hl
from hf_localist.errors import LocalistConfigError
from hf_localist.training.penalty import group_norms, penalty_weights, prox_step
from hf_localist.training.precondition import group_step
from hf_localist.training.subspaces import layer_subspaces

RANK = 8


def _cfg(**kw):
    base = dict(alpha=0.0, block_assignment="explicit", max_blocks=3, general_head_fraction=0.25, penalty="prox",
                penalty_lambda=0.5)
    base.update(kw)
    return hl.LocalistConfig(**base)


def _train_one_step(model, opt, seed=0):
    ids, blocks = random_ids(4, 12, seed=seed), random_block_ids(4, 12, seed=seed)
    model.train()
    opt.zero_grad()
    model(input_ids=ids, labels=ids, block_ids=blocks).loss.backward()
    opt.step()


def test_group_step_is_the_weighted_mean_step_over_the_group():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(3, 4, HIDDEN, generator=g)  # (heads, D, E)
    eye = torch.eye(HIDDEN)
    coord = torch.stack([eye[:, (j + 1) * RANK: (j + 2) * RANK] for j in range(3)])  # (n, E, r)
    eta = group_step(scale, coord)
    for h in range(3):
        for j in range(3):  # coordinate subspaces: the plain mean over the group's own coordinates
            want = scale[h][:, (j + 1) * RANK: (j + 2) * RANK].mean()
            torch.testing.assert_close(eta[h, j], want)
    q, _ = torch.linalg.qr(torch.randn(HIDDEN, 2 * 3, generator=g))  # a rotated (PCA-like) pair of subspaces
    u = q.T.reshape(3, 2, HIDDEN).transpose(1, 2)  # (n, E, r=2), orthonormal
    eta = group_step(scale, u)
    for h in range(3):
        for j in range(3):
            w = u[j].pow(2).sum(-1)  # (E,) sums to r
            torch.testing.assert_close(eta[h, j], (scale[h] * w).sum() / (scale.shape[1] * 2))


def test_prox_step_under_adamw_shrinks_by_adams_own_step():
    model = build_model("llama", seed=1)
    handle = hl.apply_localist(model, _cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        _train_one_step(model, opt, seed=step)
    wq = model.model.layers[1].self_attn.q_proj.weight
    before = wq.detach().clone()
    state, group = opt.state[wq], opt.param_groups[0]
    beta2, eps, t = group["betas"][1], group["eps"], float(state["step"])
    p = 1.0 / ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)  # (H*D, E)
    lam = penalty_weights(handle)[1]  # (H, n)
    u = layer_subspaces(handle)[1]  # (n, E, r)
    prox_step(handle, 1e-2, optimizer=opt)
    d = before.shape[0] // 4
    expected = before.clone()
    for h in range(4):
        rows = slice(h * d, (h + 1) * d)
        for j in range(3):
            if lam[h, j] == 0:
                continue
            w = u[j].pow(2).sum(-1)  # (E,)
            eta = 1e-2 * (p[rows] * w).sum() / (d * u.shape[-1])
            g = before[rows] @ u[j]  # (D, r)
            s = torch.clamp(1 - eta * lam[h, j] / torch.linalg.norm(g), min=0.0)
            expected[rows] -= (1 - s) * g @ u[j].T
    torch.testing.assert_close(wq.detach(), expected, atol=1e-6, rtol=1e-5)
    assert not torch.equal(wq.detach(), before)


def test_prox_step_with_sgd_is_the_plain_step():
    torch.manual_seed(0)
    a, b = build_model("llama", seed=2), build_model("llama", seed=2)
    ha, hb = hl.apply_localist(a, _cfg()), hl.apply_localist(b, _cfg())
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    _train_one_step(a, opt)
    b.load_state_dict(a.state_dict())
    prox_step(ha, 0.1, optimizer=opt)
    prox_step(hb, 0.1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-7, rtol=1e-6, msg=name)


def test_unknown_optimizer_is_refused_unless_asked_for_the_plain_step():
    model = build_model("llama", seed=3)
    handle = hl.apply_localist(model, _cfg())
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    _train_one_step(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LocalistConfigError, match="Adagrad.*prox_preconditioner='none'"):
        prox_step(handle, 0.1, optimizer=opt)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing written
    handle.update(prox_preconditioner="none")
    prox_step(handle, 0.1, optimizer=opt)
    with pytest.raises(LocalistConfigError, match="prox_preconditioner"):
        hl.LocalistConfig(prox_preconditioner="adam")


def test_weights_outside_the_optimizer_are_refused():
    model = build_model("llama", seed=4)
    handle = hl.apply_localist(model, _cfg())
    q = model.model.layers[0].self_attn.q_proj.weight
    opt = torch.optim.AdamW([p for p in model.parameters() if p is not q], lr=1e-2)
    _train_one_step(model, opt)
    with pytest.raises(LocalistConfigError, match="not in the optimizer"):
        prox_step(handle, 1e-2, optimizer=opt)


# ---------------------------------------------------------------------------------- zeros where the threshold says
@pytest.fixture(scope="module")
def threshold_task():
    """The synthetic task of experiments/threshold.py, and its calibrated lambda_threshold (seed 0)."""
    torch.set_num_threads(1)
    task = load_script("experiments/threshold.py", "threshold_experiment")
    _, report = task.calibrate(0)
    return task, report.threshold()


def _train(task, threshold, multiplier, preconditioner="auto", steps=240, lr=1e-2):
    """AdamW + prox with lambda = multiplier * threshold; returns (zero Q groups per step, penalised mask)."""
    model, handle = task.synthetic_model(0, "threshold", kappa=multiplier)
    handle.state.lambda_threshold = threshold.clone()
    handle.update(prox_preconditioner=preconditioner)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pen = penalty_weights(handle) > 0
    g = torch.Generator().manual_seed(1)
    model.train()
    zeros = []
    for _ in range(steps):
        loss = model(**task.synthetic_batch(16, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        prox_step(handle, lr, optimizer=opt)
        zeros.append((group_norms(handle).q.detach() == 0) & pen)
    return torch.stack(zeros), pen


@pytest.mark.slow
def test_adamw_groups_stay_zero_above_the_calibrated_threshold_and_not_far_below(threshold_task):
    task, threshold = threshold_task
    zeros, pen = _train(task, threshold, 1.5, steps=300)  # kappa 1.5: the documented safety factor
    per_step = zeros.flatten(1)[:, pen.flatten()]  # (steps, penalised groups)
    assert bool(per_step[-1].all()), "every penalised group is exactly zero at the end"
    # Calibrated on the untrained model, the threshold is exceeded while the model learns to retrieve across blocks
    # (groups re-open, as under SGD: docs/experiments.md); once the loss settles they stay exactly zero.
    assert bool(per_step[-80:].all()), "exactly zero, and staying zero, over the last 80 AdamW steps"
    far_below, _ = _train(task, threshold, 0.01, steps=200)
    assert float(far_below[-1][pen].double().mean()) <= 0.1  # far below the threshold: (almost) no zeros
    # The plain lr * lambda shrink (the step before preconditioning) gives no zeros at 10x the threshold.
    plain, _ = _train(task, threshold, 10.0, preconditioner="none", steps=200)
    assert not bool(plain[-1][pen].any())
