"""Tests for hf_localist.training.calibration: ``estimate_constants`` measures the constants of docs/design.md
section 5.

The bound functions themselves are proven in test_theory.py; here the plumbing is checked: shapes, values that
can be recomputed independently (tau, delta from the attention weights, R_x, sigma_X, |X_i|, rho_max), the
threshold, and that the predicted bounds hold query by query on a real model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import HIDDEN, build_model, localist_model, random_block_ids, random_ids

from hf_localist.arch.qk import projection_module
from hf_localist.errors import LocalistError
from hf_localist.training.calibration import ConstantsReport, estimate_constants
from hf_localist.training.penalty import penalty_weights
from hf_localist.training.subspaces import calibrate_subspaces

H, D, L = 4, HIDDEN // 4, 2
ACTIVE = [1, 2, 3]


def _batches(n=3, batch=2, seq=16, seed=0):
    out = []
    for i in range(n):
        ids = random_ids(batch, seq, seed=seed + i)
        blocks = random_block_ids(batch, seq, num_blocks=3, seed=seed + i)
        blocks[:, 0] = 0  # the sink is a general token: every block query sees its own run's anchor
        out.append({"input_ids": ids, "block_ids": blocks})
    return out


def _handle(model_type="llama", alpha=0.5, **kw):
    return localist_model(model_type, alpha=alpha, max_blocks=3, **kw)


@pytest.fixture(scope="module")
def llama_report():
    model, handle = _handle()
    loader = _batches()
    return model, handle, loader, estimate_constants(model, loader)


def test_report_shapes_and_tau(llama_report):
    _, _, _, rep = llama_report
    n = len(ACTIVE)
    assert rep.layers == [0, 1] and rep.active_blocks == ACTIVE
    assert len(rep.tau) == len(rep.delta) == len(rep.R_x) == len(rep.rho_max) == len(rep.bound_checks) == L
    assert [len(row) for row in rep.delta_per_head] == [H] * L
    assert [len(row) for row in rep.sigma_X] == [n] * L
    assert [len(row) for row in rep.L_l] == [H] * L
    assert len(rep.X_size) == n
    for value in rep.tau:
        assert value == pytest.approx(D ** 0.5)
    for stats in rep.delta:
        assert set(stats) == {"min", "p5", "median", "n"} and stats["n"] > 0
        assert stats["min"] <= stats["p5"] <= stats["median"]
    assert all(r > 0 for r in rep.R_x)
    assert all(s > 0 and math.isfinite(s) for row in rep.sigma_X for s in row)
    assert all(g > 0 and math.isfinite(g) for row in rep.L_l for g in row)
    assert all(abs(r) < 1e-6 for r in rep.rho_max)  # coordinate subspaces are orthogonal


def test_report_values_recomputed_independently(llama_report):
    model, handle, loader, rep = llama_report
    # Layer inputs (input of the Q projection) and the attention weights at the same dial (0.5). The applied logits
    # are z / tau + bias with bias = log(1 - alpha) on keys of other blocks, so raw margins are
    # tau * differences of (log p - bias).
    xs = {layer: [] for layer in range(L)}
    hooks = [projection_module(m, "q_proj").register_forward_pre_hook(
        lambda _m, args, layer=i: xs[layer].append(args[0].detach().reshape(-1, HIDDEN)))
        for i, m in enumerate(handle.attention_modules)]
    margins = {layer: [] for layer in range(L)}
    try:
        log_keep = math.log(1 - handle.config.alpha)
        with torch.no_grad():
            for batch in loader:
                out = model(**batch, output_attentions=True)
                ids = batch["block_ids"]
                for layer, p in enumerate(out.attentions):
                    for b in range(ids.shape[0]):
                        row = ids[b].tolist()
                        anchors = [s >= 1 and row[s] >= 1 and row[s - 1] != row[s] for s in range(len(row))]
                        for t in range(len(row)):
                            if row[t] == 0:
                                continue
                            a = [s for s in range(1, t + 1) if anchors[s] and row[s] == row[t]]
                            o = [s for s in range(1, t + 1) if s not in a]
                            if not a or not o:
                                continue
                            bias = torch.tensor([log_keep if row[s] >= 1 and row[s] != row[t] else 0.0
                                                 for s in range(len(row))])
                            logp = p[b, :, t].log() - bias
                            margins[layer].append(D ** 0.5 * (logp[:, a].min(-1).values - logp[:, o].max(-1).values))
    finally:
        for hook in hooks:
            hook.remove()
    for layer in range(L):
        m = torch.cat(margins[layer])
        assert rep.delta[layer]["n"] == m.numel()
        assert rep.delta[layer]["min"] == pytest.approx(float(m.min()), abs=1e-4)
        assert rep.delta[layer]["median"] == pytest.approx(float(m.median()), abs=1e-4)
        x = torch.cat(xs[layer])
        assert rep.R_x[layer] == pytest.approx(float(torch.quantile(x.norm(dim=1), 0.99)), rel=1e-5)
        blocks = torch.cat([b["block_ids"].reshape(-1) for b in loader])
        for j, blk in enumerate(ACTIVE):
            xb = x[blocks == blk]
            xb = xb - xb.mean(0)
            sigma = torch.linalg.svdvals(xb)[0] / xb.shape[0] ** 0.5
            assert rep.sigma_X[layer][j] == pytest.approx(float(sigma), rel=1e-4)
    n_seq = sum(b["block_ids"].shape[0] for b in loader)
    for j, blk in enumerate(ACTIVE):
        assert rep.X_size[j] == pytest.approx(float((blocks == blk).sum()) / n_seq)


def test_threshold_shape_values_and_apply(llama_report):
    _, handle, _, rep = llama_report
    thr = rep.threshold()
    assert thr.shape == (L, H, len(ACTIVE))
    assert torch.isfinite(thr).all() and (thr > 0).all()
    layer, head, j = 1, 2, 0
    d = rep.delta_per_head[layer][head]["p5"]
    expected = 2 * rep.L_l[layer][head] * rep.R_x[layer] * rep.sigma_X[layer][j] * math.sqrt(rep.X_size[j]) / (
        rep.tau[layer] * (1 - rep.rho_max[layer])) * math.exp(-d / rep.tau[layer])
    assert thr[layer, head, j].item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(rep.threshold("min") >= rep.threshold("median"))  # smaller margin, larger lambda
    with pytest.raises(LocalistError, match="delta_stat"):
        rep.threshold("max")
    # apply_threshold feeds lambda_mode='threshold': lambda = alpha_train * kappa * threshold where penalised.
    handle.update(lambda_mode="threshold", alpha_train=0.5, kappa=2.0, general_head_fraction=0.25)
    try:
        applied = rep.apply_threshold(handle)
        assert torch.equal(applied, thr)
        lam = penalty_weights(handle)
        on = lam > 0
        assert on.any()
        torch.testing.assert_close(lam[on], (0.5 * 2.0 * thr)[on])
    finally:
        handle.update(lambda_mode="fixed")
        handle.state.lambda_threshold = None


def test_bounds_hold_for_every_recorded_query(llama_report):
    model, handle, loader, rep = llama_report
    checks = rep.bounds()
    assert len(checks) == L
    with torch.no_grad(), handle.record() as rec:
        for batch in loader:
            model(**batch)
    summary = rec.summary()["layers"]
    for layer, c in enumerate(checks):
        assert c["n"] > 0
        assert c["pf_bound_holds"] == 1.0
        assert c["entropy_bound_holds"] == 1.0
        assert c["pf_bound_mean"] <= c["pf_measured_mean"]
        assert c["entropy_bound_mean"] >= c["entropy_measured_mean"]
        # The measured PF next to the bound is the recorder's PF at the same dial (every block query has an anchor).
        assert c["pf_measured_mean"] == pytest.approx(summary[layer]["pointer_fidelity"], abs=1e-5)


def test_bounds_hold_with_anchor_bonus_and_hard_dial():
    for alpha, beta in ((0.9, 2.0), (1.0, 0.0)):
        model, _ = _handle(alpha=alpha, beta_anchor=beta)
        rep = estimate_constants(model, _batches(), with_grad=False)
        for c in rep.bounds():
            assert c["n"] > 0 and c["pf_bound_holds"] == 1.0 and c["entropy_bound_holds"] == 1.0
        assert all(math.isnan(g) for row in rep.L_l for g in row)  # no gradients requested


def test_pca_subspaces_have_no_overlap():
    model, handle = _handle(subspace="pca")
    loader = _batches(seed=3)
    calibrate_subspaces(handle, loader)
    rep = estimate_constants(handle, loader, with_grad=False)
    assert all(0 <= r < 1e-5 for r in rep.rho_max)
    with pytest.raises(LocalistError, match="with_grad"):  # L_l is unmeasured without gradients
        rep.threshold()


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_other_layouts_and_encoders(model_type):
    model, _ = _handle(model_type)
    loader = _batches(n=2, seed=7)
    if model_type == "bert":  # no LM head: no data loss, so no L_l
        with pytest.raises(LocalistError, match="with_grad=False"):
            estimate_constants(model, loader)
        rep = estimate_constants(model, loader, with_grad=False)
    else:
        rep = estimate_constants(model, loader)
        assert torch.isfinite(rep.threshold()).all()
    assert rep.tau == [pytest.approx(D ** 0.5)] * L
    assert all(c["pf_bound_holds"] == 1.0 for c in rep.bounds())


def test_report_to_json_round_trip(tmp_path, llama_report):
    _, _, _, rep = llama_report
    path = tmp_path / "constants.json"
    text = rep.to_json(str(path))
    data = json.loads(path.read_text())
    assert json.loads(text) == data
    again = ConstantsReport(**data)
    torch.testing.assert_close(again.threshold(), rep.threshold())


def test_calibration_data_missing_a_block_is_named():
    model, handle = _handle()
    loader = _batches(n=1)
    loader[0]["block_ids"] = loader[0]["block_ids"].clamp(max=2)  # no token of block 3
    with pytest.raises(LocalistError, match="block 3"):
        estimate_constants(model, loader)
    with pytest.raises(LocalistError, match="no batch"):
        estimate_constants(model, [])
    with pytest.raises(LocalistError, match="apply_localist"):
        estimate_constants(build_model("llama"), loader)
    # The failed calls left no probe behind (a forward runs the pass-through path again) and restored the flag.
    handle.state.backend_counts.clear()
    with torch.no_grad(), handle.dial(0.0):
        model(**loader[0])
    assert set(handle.state.backend_counts) == {"passthrough"}
    assert not model.training


def test_estimate_constants_keeps_training_mode_and_gradients():
    model, handle = _handle()
    model.train()
    ids = random_ids(2, 8, seed=1)
    model(input_ids=ids, labels=ids, block_ids=random_block_ids(2, 8, seed=1)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rep = estimate_constants(model, _batches(n=1))
    assert model.training
    assert rep.L_l[0][0] > 0
    for n, p in model.named_parameters():  # the caller's accumulated gradients are untouched
        assert torch.equal(p.grad, grads[n]), n


def test_estimate_constants_on_frozen_model_measures_L_l(llama_report):
    model, _ = _handle()
    model.requires_grad_(False)
    rep = estimate_constants(model, _batches())
    for row, ref in zip(rep.L_l, llama_report[3].L_l):  # same model and data, trainable weights
        assert row == pytest.approx(ref, rel=1e-4)
    assert torch.isfinite(rep.threshold()).all()
    assert all(p.grad is None for p in model.parameters())
    ids = random_ids(1, 6)
    assert not model.model.embed_tokens(ids).requires_grad  # the temporary hook is gone


def test_pca_calibration_does_not_build_a_tokens_by_tokens_matrix(monkeypatch):
    model, handle = _handle(subspace="pca")
    real_svd = torch.linalg.svd
    shapes = []

    def spy(a, full_matrices=True, **kw):
        u, s, vh = real_svd(a, full_matrices=full_matrices, **kw)
        shapes.append((tuple(a.shape), tuple(u.shape)))
        return u, s, vh

    monkeypatch.setattr(torch.linalg, "svd", spy)
    loader = [{"input_ids": random_ids(8, 64, seed=i), "block_ids": torch.randint(1, 4, (8, 64))} for i in range(2)]
    bases = calibrate_subspaces(handle, loader)
    assert shapes and all(u[1] <= a[1] for a, u in shapes)  # U is (tokens, min(tokens, E)), not (tokens, tokens)
    assert bases.shape == (L, 3, HIDDEN, HIDDEN // 4)
    # Fewer tokens than the rank: the basis is completed to r orthonormal directions.
    few = [{"input_ids": random_ids(1, 10, seed=0), "block_ids": torch.tensor([[0, 1, 1, 1, 2, 2, 2, 3, 3, 3]])}]
    bases = calibrate_subspaces(handle, few)
    flat = bases[0].permute(1, 0, 2).reshape(HIDDEN, -1)
    torch.testing.assert_close(flat.T @ flat, torch.eye(flat.shape[1]), atol=1e-5, rtol=0)


def test_orthogonalise_keeps_rank_when_subspaces_overlap():
    from hf_localist.training.subspaces import orthogonalise

    g = torch.Generator().manual_seed(0)
    a, _ = torch.linalg.qr(torch.randn(32, 6, generator=g))
    b, _ = torch.linalg.qr(torch.cat([a[:, :4], torch.randn(32, 2, generator=g)], dim=1))  # shares 4 directions
    out = orthogonalise([a, a.clone(), b])  # the second one is entirely inside the first
    flat = out.permute(1, 0, 2).reshape(32, -1)
    torch.testing.assert_close(flat.T @ flat, torch.eye(18), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0] @ out[0].T, a @ a.T, atol=1e-5, rtol=0)  # the first keeps its span
    # What b has outside the earlier subspaces survives in span(out[2]).
    earlier = torch.cat([out[0], out[1]], dim=1)
    new = b - earlier @ (earlier.T @ b)
    assert torch.linalg.matrix_norm(new) > 0.5
    torch.testing.assert_close(out[2] @ (out[2].T @ new), new, atol=1e-5, rtol=0)
