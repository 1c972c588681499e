"""Tests for hf_localist.training.penalty: the group-lasso penalty on Q/K head slices (docs/design.md section 4).

    penalty = sum_l sum_h sum_{i != b(h)} lambda_{l,h,i} * ( ||W_Q^(l,h) U_i||_F + ||W_K^(l,kv(h)) U_i||_F )
    prox:     W_g <- max(0, 1 - lr * lambda / ||W_g||) * W_g

The reference values are written here from the raw weights (``q_proj.weight``, GPT-2's ``c_attn.weight``, ...)
with ``torch.linalg.norm``, independently of ``hf_localist.arch.qk``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import HIDDEN, build_model, random_block_ids, random_ids

import hf_localist as hl
from hf_localist.errors import LocalistConfigError, LocalistError, UnsupportedArchitectureError
from hf_localist.training.penalty import group_norms, kkt_ratios, penalty, penalty_weights, prox_step
from hf_localist.training.subspaces import calibrate_subspaces, head_blocks, layer_subspaces

# Tiny Llama from helpers: hidden 32, 2 layers, 4 query heads, 2 K/V heads (D = 8). With 3 active blocks and
# general_head_fraction 0.25, the 2 K groups are fewer than the blocks, so heads take blocks one by one:
# b = [1, 2, 3, 0] (head 3 general). Coordinate rank 32 // 4 = 8: block j owns coordinates 8j..8j+7.
HEAD_BLOCKS = [1, 2, 3, 0]
RANK = 8
ACTIVE = [1, 2, 3]


def _cfg(**kw):
    base = dict(alpha=0.0, block_assignment="explicit", max_blocks=3, general_head_fraction=0.25, penalty="prox",
                penalty_lambda=1.0)
    base.update(kw)
    return hl.LocalistConfig(**base)


def _llama(seed=0, **kw):
    model = build_model("llama", seed=seed)
    return model, hl.apply_localist(model, _cfg(**kw))


def _coord_basis(hidden=HIDDEN, rank=RANK, n=3):
    eye = torch.eye(hidden)
    return torch.stack([eye[:, (j + 1) * rank: (j + 2) * rank] for j in range(n)])  # (n, E, r)


# ---------------------------------------------------------------------------------- raw per-head weights
def raw_qk(model, model_type: str, layer: int):
    """[(D, E) per query head], [(D, E) per K head] read straight from the modeling weights."""
    cfg = model.config
    if model_type == "gpt2":
        e, h = cfg.n_embd, cfg.n_head
        d, h_kv = e // h, h
        w = model.transformer.h[layer].attn.c_attn.weight  # (E, 3E), columns [Q | K | V]
        return ([w[:, i * d:(i + 1) * d].T for i in range(h)],
                [w[:, e + i * d: e + (i + 1) * d].T for i in range(h_kv)])
    h, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // h
    attn = model.model.layers[layer].self_attn
    if model_type == "phi3":
        w = attn.qkv_proj.weight  # rows [Q (H*D) | K (H_kv*D) | V]
        return ([w[i * d:(i + 1) * d] for i in range(h)], [w[h * d + i * d: h * d + (i + 1) * d] for i in range(h_kv)])
    wq, wk = attn.q_proj.weight, attn.k_proj.weight
    return [wq[i * d:(i + 1) * d] for i in range(h)], [wk[i * d:(i + 1) * d] for i in range(h_kv)]


def formula_penalty(model, model_type, bases, head_block, active, lam, first_local_layer=0):
    """The written formula, term by term: bases (L, n, E, r), head_block[h] = b(h), scalar lambda."""
    total = 0.0
    n_layers = bases.shape[0]
    for layer in range(first_local_layer, n_layers):
        q_heads, k_heads = raw_qk(model, model_type, layer)
        rep = len(q_heads) // len(k_heads)
        for h, b in enumerate(head_block):
            if b == 0:
                continue
            for j, blk in enumerate(active):
                if blk == b:
                    continue
                u = bases[layer, j]
                total = total + lam * torch.linalg.norm(q_heads[h] @ u)
                # K: the head's K group counts unless a reader of that K head owns block blk or is general.
                readers = [head_block[g] for g in range(len(head_block)) if g // rep == h // rep]
                if not any(r in (0, blk) for r in readers):
                    total = total + lam * torch.linalg.norm(k_heads[h // rep] @ u)
    return total


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------- head assignment
def test_head_blocks_assignment():
    assert head_blocks(4, 2, ACTIVE, 0.25).tolist() == HEAD_BLOCKS  # fewer K groups than blocks: per head
    assert head_blocks(4, 2, [1, 2], 0.0).tolist() == [1, 1, 2, 2]  # heads sharing a K head share a block
    assert head_blocks(8, 8, [2, 5], 0.5).tolist() == [2, 5, 2, 5, 0, 0, 0, 0]
    assert head_blocks(4, 4, [], 0.25).tolist() == [0, 0, 0, 0]


def test_head_blocks_every_block_gets_a_head_when_general_heads_take_k_groups():
    # 8 heads, 4 K heads, 4 blocks, the default general fraction: the 2 general heads take K group 3, and grouping
    # the other 6 heads by K group would give only 3 blocks heads (block 4 none: its queries had no owning head).
    assert head_blocks(8, 4, [1, 2, 3, 4], 0.25).tolist() == [1, 2, 3, 4, 1, 2, 0, 0]
    for h, h_kv, n, frac in [(16, 4, 4, 0.25), (8, 4, 4, 0.25), (12, 4, 3, 0.5), (8, 2, 2, 0.5), (32, 8, 4, 0.25)]:
        active = list(range(1, n + 1))
        blocks = head_blocks(h, h_kv, active, frac)
        assert set(blocks.tolist()) - {0} == set(active), (h, h_kv, n, frac, blocks.tolist())
        assert int((blocks == 0).sum()) == int(frac * h)
    # Enough K groups left for the blocks: still by K group (heads sharing a K head share a block).
    by_group = [b for b in (1, 2, 3, 4, 1, 2) for _ in range(4)]
    assert head_blocks(32, 8, [1, 2, 3, 4], 0.25).tolist() == by_group + [0] * 8


def test_penalty_weights_masks_general_heads_own_blocks_and_early_layers():
    _, handle = _llama(penalty_lambda=0.3, first_local_layer=1)
    lam = penalty_weights(handle)
    assert lam.shape == (2, 4, 3)
    assert torch.count_nonzero(lam[0]) == 0  # below first_local_layer
    for h, b in enumerate(HEAD_BLOCKS):
        for j, blk in enumerate(ACTIVE):
            expected = 0.0 if b == 0 or b == blk else 0.3
            assert lam[1, h, j].item() == pytest.approx(expected)


# ---------------------------------------------------------------------------------- the proximal step
def _check_prox(handle, model, bases, lam, lr, atol):
    """Runs one prox step and checks every group of every layer/head against the formula."""
    stats_before = group_norms(handle)
    q_before = [[w.detach().clone() for w in raw_qk(model, "llama", layer)[0]] for layer in range(2)]
    k_before = [[w.detach().clone() for w in raw_qk(model, "llama", layer)[1]] for layer in range(2)]
    weights = penalty_weights(handle)
    stats = prox_step(handle, lr)
    first = handle.config.first_local_layer
    n_zero = n_shrunk = 0
    for layer in range(2):
        q_after, k_after = raw_qk(model, "llama", layer)
        # Per-group lambda: Q from penalty_weights' rule written out; K summed over the query heads reading it.
        for kind, before, after in (("q", q_before[layer], q_after), ("k", k_before[layer], k_after)):
            for head, (w0, w1) in enumerate(zip(before, after)):
                for j, blk in enumerate(ACTIVE):
                    if layer < first:
                        lam_g = 0.0
                    elif kind == "q":
                        b = HEAD_BLOCKS[head]
                        lam_g = 0.0 if b in (0, blk) else lam
                    else:
                        readers = [HEAD_BLOCKS[h] for h in range(4) if h // 2 == head]
                        # exempt when a reader owns the block or is general (penalty._k_weights)
                        lam_g = 0.0 if any(b in (0, blk) for b in readers) else sum(lam for b in readers)
                    u = bases[layer, j]
                    n0, n1 = torch.linalg.norm(w0 @ u), torch.linalg.norm(w1 @ u)
                    if lam_g == 0.0:
                        torch.testing.assert_close(w1 @ u, w0 @ u, atol=atol, rtol=0)
                    elif n0 <= lr * lam_g:
                        n_zero += 1
                        assert n1 <= atol
                        assert bool((stats.zero_q if kind == "q" else stats.zero_k)[layer, head, j])
                    else:
                        n_shrunk += 1
                        torch.testing.assert_close(w1 @ u, (1 - lr * lam_g / n0) * (w0 @ u), atol=atol, rtol=1e-5)
                        torch.testing.assert_close(n1, n0 - lr * lam_g, atol=atol, rtol=1e-5)
                        assert not bool((stats.zero_q if kind == "q" else stats.zero_k)[layer, head, j])
                # The part outside every block subspace (general features) never moves.
                p_out = torch.eye(HIDDEN) - sum(bases[layer, j] @ bases[layer, j].T for j in range(3))
                torch.testing.assert_close(w1 @ p_out, w0 @ p_out, atol=atol, rtol=0)
    assert stats.num_penalised == int((weights > 0).sum()) + int((stats.penalised_k).sum())
    return n_zero, n_shrunk, stats_before


def test_prox_step_coordinate_subspaces_exact():
    model, handle = _llama(penalty_lambda=1.0, first_local_layer=1)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():  # make sure both regimes occur: one tiny Q group, one large K group
        attn.q_proj.weight[0:8, 16:24] *= 0.05  # head 0, block 2 (coordinates 16..23)
        attn.k_proj.weight[0:8, 24:32] *= 3.0  # K head 0, block 3 (lambda 2: read by heads 0 and 1)
    layer0_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    layer0_k = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    general_head = attn.q_proj.weight[24:32].detach().clone()
    bases = _coord_basis().expand(2, 3, HIDDEN, RANK)
    lr = 0.9
    n_zero, n_shrunk, _ = _check_prox(handle, model, bases, 1.0, lr, atol=0.0)
    assert n_zero >= 1 and n_shrunk >= 1
    # Exact zeros, exactly untouched weights.
    assert torch.count_nonzero(attn.q_proj.weight[0:8, 16:24]) == 0
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, layer0_q)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, layer0_k)
    assert torch.equal(attn.q_proj.weight[24:32], general_head)


def test_prox_step_k_groups_carry_summed_lambdas_and_spare_their_readers_blocks():
    model, handle = _llama(penalty_lambda=0.5)
    w_k0 = model.model.layers[0].self_attn.k_proj.weight[0:8].detach().clone()  # K head 0: read by heads 0 and 1
    # K head 1: read by heads 2 (block 3) and 3 (general)
    w_k1 = model.model.layers[0].self_attn.k_proj.weight[8:16].detach().clone()
    lr = 0.1
    prox_step(handle, lr)
    new0 = model.model.layers[0].self_attn.k_proj.weight[0:8]
    new1 = model.model.layers[0].self_attn.k_proj.weight[8:16]
    # K head 0: blocks 1 and 2 are owned by its readers (exempt); block 3 carries both readers' lambdas.
    # K head 1: read by a general head, so never penalised.
    for (w0, w1, lams) in ((w_k0, new0, [0.0, 0.0, 1.0]), (w_k1, new1, [0.0, 0.0, 0.0])):
        for j, lam in enumerate(lams):
            cols = slice(8 * (j + 1), 8 * (j + 2))
            n0 = torch.linalg.norm(w0[:, cols])
            assert torch.linalg.norm(w1[:, cols]).item() == pytest.approx(max(0.0, n0.item() - lr * lam), abs=1e-6)


def test_prox_step_pca_subspaces():
    model, handle = _llama(penalty_lambda=1.0, subspace="pca", first_local_layer=1)
    ids = random_ids(6, 16, seed=3)
    blocks = random_block_ids(6, 16, num_blocks=3, seed=3)
    loader = [{"input_ids": ids[i:i + 2], "block_ids": blocks[i:i + 2]} for i in range(0, 6, 2)]
    bases = calibrate_subspaces(handle, loader)
    assert bases.shape == (2, 3, HIDDEN, RANK)
    assert torch.equal(layer_subspaces(handle), bases)
    for layer in range(2):
        flat = bases[layer].permute(1, 0, 2).reshape(HIDDEN, 3 * RANK)  # all subspaces side by side
        torch.testing.assert_close(flat.T @ flat, torch.eye(3 * RANK), atol=1e-5, rtol=0)  # orthonormal, mutually
    n_zero, n_shrunk, _ = _check_prox(handle, model, bases, 1.0, lr=1.4, atol=2e-6)
    assert n_zero >= 1 and n_shrunk >= 1
    norms = group_norms(handle)
    last = handle.state.last_prox
    zeroed = [float(got[layer][zero[layer]].detach().max()) for got, zero in ((norms.q, last.zero_q),
              (norms.k, last.zero_k)) for layer in (0, 1) if bool(zero[layer].any())]
    assert zeroed and max(zeroed) < 1e-6  # the groups the step reports as zero are exactly zero


@pytest.mark.parametrize("shared_first", [True, False])
def test_pca_subspaces_leave_shared_directions_general(shared_first):
    """Layer-0 inputs built from RANK directions every block varies along (D, variance 25 each) and one per block
    (e_b, variance 4): with ``shared_first`` no block subspace holds any of D and each holds its own e_b; without it
    the first block's subspace takes D (its top directions, orthogonalised first), which the penalty would then take
    from every head that does not own block 1."""
    model, handle = _llama(penalty_lambda=1.0, subspace="pca")
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(HIDDEN, RANK + 3, generator=g))
    shared, e = basis[:, :RANK], basis[:, RANK:]  # (E, r), (E, 3): orthonormal
    vocab = model.get_input_embeddings().weight
    block_of = torch.arange(vocab.shape[0]) % 3  # token t belongs to block 1 + t % 3
    with torch.no_grad():
        z, w = torch.randn(vocab.shape[0], RANK, generator=g), torch.randn(vocab.shape[0], generator=g)
        noise = 0.05 * torch.randn(vocab.shape, generator=g)
        vocab.copy_(5 * z @ shared.T + 2 * w[:, None] * e[:, block_of].T + noise)  # (V, E)
    ids = random_ids(16, 16, seed=1)
    bases = calibrate_subspaces(handle, [{"input_ids": ids, "block_ids": 1 + block_of[ids]}], shared_first=shared_first)
    layer0 = bases[0]  # (3, E, r)
    held = [float(torch.linalg.matrix_norm(u.T @ shared) ** 2) for u in layer0]  # how many of the D each holds
    if shared_first:
        assert max(held) < 0.1
        for j in range(3):
            assert float(torch.linalg.norm(layer0[j].T @ e[:, j])) > 0.9
    else:
        assert held[0] > RANK / 2


def test_prox_step_zero_lr_is_identity_and_bad_lr():
    model, handle = _llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prox_step(handle, 0.0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for bad in (-1e-3, float("nan")):
        with pytest.raises(LocalistError, match="lr"):
            prox_step(handle, bad)


def test_kkt_ratios_on_zero_groups():
    model, handle = _llama(penalty_lambda=2.0)
    stats = prox_step(handle, 10.0)  # lr * lambda = 20: every penalised group becomes zero
    assert stats.num_zero == stats.num_penalised > 0
    assert kkt_ratios(handle, stats).numel() == 0  # no gradient yet
    ids = random_ids(2, 10, seed=4)
    out = model(input_ids=ids, labels=ids, block_ids=random_block_ids(2, 10, seed=4))
    out.loss.backward()
    ratios = kkt_ratios(handle, stats)
    assert ratios.numel() == stats.num_zero
    # Reference: ||G U_i|| / lambda_g on each zero group, from the raw gradients.
    lam = penalty_weights(handle)
    expected = []
    for layer in range(2):
        attn = model.model.layers[layer].self_attn
        gq, gk = attn.q_proj.weight.grad, attn.k_proj.weight.grad
        for h in range(4):
            for j in range(3):
                if stats.zero_q[layer, h, j]:
                    group = gq[h * 8:(h + 1) * 8, 8 * (j + 1): 8 * (j + 2)]
                    expected.append(torch.linalg.norm(group) / lam[layer, h, j])
        for kv in range(2):
            for j in range(3):
                if stats.zero_k[layer, kv, j]:
                    lam_k = lam[layer, 2 * kv: 2 * kv + 2, j].sum()
                    expected.append(torch.linalg.norm(gk[kv * 8:(kv + 1) * 8, 8 * (j + 1): 8 * (j + 2)]) / lam_k)
    torch.testing.assert_close(torch.sort(ratios).values, torch.sort(torch.stack(expected)).values)


# ---------------------------------------------------------------------------------- the loss term
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_penalty_gradient_matches_written_formula(model_type):
    model = build_model(model_type, seed=1)
    handle = hl.apply_localist(model, _cfg(penalty="loss", penalty_lambda=0.7, first_local_layer=1))
    h = handle.spec.num_heads(model.config)
    h_kv = handle.spec.num_kv_heads(model.config)
    blocks = head_blocks(h, h_kv, ACTIVE, 0.25).tolist()
    bases = _coord_basis().expand(2, 3, HIDDEN, RANK)
    pen = penalty(handle)
    ref = formula_penalty(model, model_type, bases, blocks, ACTIVE, 0.7, first_local_layer=1)
    torch.testing.assert_close(pen, ref, atol=1e-5, rtol=1e-5)
    model.zero_grad(set_to_none=True)
    pen.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    ref.backward()
    want = _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(torch.count_nonzero(g) for g in want.values())


def test_penalty_gradient_matches_formula_pca():
    model, handle = _llama(penalty="loss", penalty_lambda=0.4, subspace="pca")
    ids, blocks = random_ids(4, 16, seed=5), random_block_ids(4, 16, seed=5)
    bases = calibrate_subspaces(handle, [{"input_ids": ids, "block_ids": blocks}])
    pen = penalty(handle)
    ref = formula_penalty(model, "llama", bases, HEAD_BLOCKS, ACTIVE, 0.4)
    torch.testing.assert_close(pen, ref, atol=1e-5, rtol=1e-5)
    pen.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    ref.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


def _data_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_loss_mode_adds_penalty_to_outputs():
    """The value of outputs.loss is the data loss (what every Trainer logs); its gradient is that of
    data + coef * penalty (what every Trainer optimises)."""
    model, handle = _llama(penalty="loss", penalty_lambda=0.05, localist_loss_coef=0.5)
    ids, blocks = random_ids(2, 12, seed=6), random_block_ids(2, 12, seed=6)
    model.train()
    handle.update(penalty="none")
    data_out = model(input_ids=ids, labels=ids, block_ids=blocks)
    model.zero_grad(set_to_none=True)
    data_out.loss.backward()
    data_grads = _grads(model)
    handle.update(penalty="loss")
    out = model(input_ids=ids, labels=ids, block_ids=blocks)
    pen = penalty(handle)
    assert out.localist_loss is not None and not out.localist_loss.requires_grad
    torch.testing.assert_close(out.localist_loss, pen.detach())
    assert float(pen.detach()) > 1.0  # a penalty large enough that adding its value would show
    assert torch.equal(out.loss.detach(), data_out.loss.detach())  # the value: the data loss, bit for bit
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    (0.5 * penalty(handle)).backward()
    pen_grads = _grads(model)
    assert any(torch.count_nonzero(g) for g in pen_grads.values())
    for name in got:
        torch.testing.assert_close(got[name], data_grads[name] + pen_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # Eval mode, no_grad, or penalty != 'loss': the data loss alone.
    model.eval()
    out_eval = model(input_ids=ids, labels=ids, block_ids=blocks)
    assert getattr(out_eval, "localist_loss", None) is None
    torch.testing.assert_close(out_eval.loss, _data_loss(out_eval.logits, ids))
    model.train()
    with torch.no_grad():
        assert getattr(model(input_ids=ids, labels=ids, block_ids=blocks), "localist_loss", None) is None
    handle.update(penalty="prox")
    assert getattr(model(input_ids=ids, labels=ids, block_ids=blocks), "localist_loss", None) is None


def _accumulate(model, ids, labels, blocks, chunks, num_items):
    model.zero_grad(set_to_none=True)
    losses = []
    for part in torch.chunk(torch.arange(ids.shape[0]), chunks):
        kw = {} if num_items is None else {"num_items_in_batch": num_items}
        out = model(input_ids=ids[part], labels=labels[part], block_ids=blocks[part], **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
    return losses, _grads(model)


def _trainer_num_items(model, batches, tmp_path):
    """``num_items_in_batch`` exactly as transformers' Trainer counts it for this model (shifted or not)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs
    return trainer._get_num_items_in_batch(batches, torch.device("cpu"))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gradient_accumulation_with_num_items_in_batch(model_type, tmp_path):
    coef = 0.5
    model = build_model(model_type, seed=0)
    handle = hl.apply_localist(model, _cfg(penalty="loss", penalty_lambda=0.05, localist_loss_coef=coef))
    ids, blocks = random_ids(4, 10, seed=7), random_block_ids(4, 10, seed=7)
    labels = ids.clone()
    labels[0, 5:] = -100  # micro-batches with different numbers of label tokens
    labels[1, 8:] = -100
    labels[3, :4] = -100
    n_items = _trainer_num_items(model, [{"input_ids": ids[:2], "labels": labels[:2]},
                                         {"input_ids": ids[2:], "labels": labels[2:]}], tmp_path)
    model.train()
    full_losses, full_grads = _accumulate(model, ids, labels, blocks, 1, n_items)
    micro_losses, micro_grads = _accumulate(model, ids, labels, blocks, 2, n_items)
    torch.testing.assert_close(sum(micro_losses), full_losses[0], atol=1e-6, rtol=1e-5)
    for name in full_grads:
        torch.testing.assert_close(micro_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # The penalty part alone: micro-batch shares add up to one penalty, and so do their gradients.
    handle.update(penalty="none")
    data_losses, data_grads = _accumulate(model, ids, labels, blocks, 2, n_items)
    handle.update(penalty="loss")
    pen = penalty(handle)
    for got, data in zip(micro_losses, data_losses):  # the loss values are the data losses
        assert torch.equal(got, data)
    model.zero_grad(set_to_none=True)
    (coef * pen).backward()
    pen_grads = _grads(model)
    assert any(torch.count_nonzero(g) for g in pen_grads.values())
    for name in pen_grads:
        torch.testing.assert_close(micro_grads[name] - data_grads[name], pen_grads[name], atol=1e-6, rtol=1e-4,
                                   msg=name)


def test_without_num_items_each_micro_batch_carries_the_full_penalty():
    coef = 2.0
    model, handle = _llama(penalty="loss", penalty_lambda=0.05, localist_loss_coef=coef)
    model.train()
    ids, blocks = random_ids(4, 10, seed=8), random_block_ids(4, 10, seed=8)
    model.zero_grad(set_to_none=True)
    (coef * penalty(handle)).backward()
    pen_grads = _grads(model)
    for part in (slice(0, 2), slice(2, 4)):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids[part], labels=ids[part], block_ids=blocks[part])
        out.loss.backward()
        got = _grads(model)
        handle.update(penalty="none")
        model.zero_grad(set_to_none=True)
        data = model(input_ids=ids[part], labels=ids[part], block_ids=blocks[part])
        data.loss.backward()
        data_grads = _grads(model)
        handle.update(penalty="loss")
        assert torch.equal(out.loss.detach(), data.loss.detach())
        for name in got:
            torch.testing.assert_close(got[name], data_grads[name] + pen_grads[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- bad input
def test_config_rejects_bad_training_fields():
    with pytest.raises(LocalistConfigError, match="penalty_lambda"):
        hl.LocalistConfig(penalty_lambda=-0.1)
    for bad in (0.0, -1.0):
        with pytest.raises(LocalistConfigError, match="kappa"):
            hl.LocalistConfig(kappa=bad)
    with pytest.raises(LocalistConfigError, match="alpha_train"):
        hl.LocalistConfig(alpha_train=1.5)
    with pytest.raises(LocalistConfigError, match="localist_loss_coef"):
        hl.LocalistConfig(localist_loss_coef=-1)
    with pytest.raises(LocalistConfigError, match="general_head_fraction"):
        hl.LocalistConfig(general_head_fraction=1.0)
    with pytest.raises(LocalistConfigError, match="penalty"):
        hl.LocalistConfig(penalty="l2")
    with pytest.raises(LocalistConfigError, match="subspace_rank"):
        hl.LocalistConfig(subspace_rank=0)
    cfg = hl.LocalistConfig()
    with pytest.raises(LocalistConfigError, match="penalty_lambda"):
        cfg.penalty_lambda = -1.0


def test_subspace_rank_too_large_names_the_field():
    _, handle = _llama(penalty="loss", subspace_rank=9)  # 3 blocks + general group of rank 9 need 36 > 32
    with pytest.raises(LocalistConfigError, match="subspace_rank"):
        penalty(handle)
    _, handle = _llama(penalty="prox", subspace_rank=HIDDEN + 1)
    with pytest.raises(LocalistConfigError, match="subspace_rank"):
        prox_step(handle, 0.1)
    _, handle = _llama(penalty="loss", subspace="pca", subspace_rank=HIDDEN + 1)
    loader = [{"input_ids": random_ids(2, 12, seed=1), "block_ids": random_block_ids(2, 12, seed=1)}]
    with pytest.raises(LocalistConfigError, match="subspace_rank"):
        calibrate_subspaces(handle, loader)


def test_threshold_mode_without_threshold_is_a_clear_error():
    _, handle = _llama(lambda_mode="threshold")
    with pytest.raises(LocalistError, match="apply_threshold|lambda_threshold"):
        penalty(handle)
    with pytest.raises(LocalistError, match="lambda_threshold"):
        prox_step(handle, 0.1)
    handle.state.lambda_threshold = torch.ones(2, 4, 2)  # wrong number of blocks
    with pytest.raises(LocalistError, match="shape"):
        penalty(handle)
    handle.state.lambda_threshold = torch.full((2, 4, 3), 2.0)
    handle.update(alpha_train=0.5, kappa=1.5)
    lam = penalty_weights(handle)
    assert float(lam.max()) == pytest.approx(0.5 * 1.5 * 2.0)


def test_pca_without_calibration_is_a_clear_error():
    _, handle = _llama(subspace="pca")
    with pytest.raises(LocalistError, match="calibrate_subspaces"):
        penalty(handle)


def test_calibration_without_tokens_of_a_block_names_it():
    _, handle = _llama(subspace="pca")
    ids = random_ids(2, 8, seed=9)
    blocks = torch.tensor([[0, 1, 1, 2, 2, 1, 1, 2]] * 2)  # no token of block 3
    with pytest.raises(LocalistError, match="block 3"):
        calibrate_subspaces(handle, [{"input_ids": ids, "block_ids": blocks}])


def test_penalty_on_architecture_without_qk_projections():
    from hf_localist.arch import registry

    hl.register_localist_arch("granite", q_proj="wq", k_proj="wk", layout="linear", overwrite=True)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model("granite", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(cfg)
        with pytest.raises(UnsupportedArchitectureError, match="wq"):
            hl.apply_localist(model, _cfg(penalty="loss"))
        # The right names but a layout that does not fit the weights: a project error, not a torch view error.
        hl.register_localist_arch("granite", q_proj="q_proj", k_proj=None, layout="neox_interleaved", overwrite=True)
        handle = hl.apply_localist(model, _cfg(penalty="loss"))
        with pytest.raises(UnsupportedArchitectureError, match="neox_interleaved"):
            penalty(handle)
    finally:
        registry._REGISTRY.pop("granite", None)


def test_loss_mode_warns_when_penalised_weights_are_frozen():
    """LoRA on V only: the Q/K weights the penalty reads are frozen and carry no adapter delta."""
    peft = pytest.importorskip("peft")
    model = build_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["v_proj"], lora_alpha=4))
    hl.apply_localist(lora, _cfg(penalty="loss", penalty_lambda=0.1))
    lora.train()
    ids = random_ids(2, 8, seed=10)
    with pytest.warns(UserWarning, match="no effect"):
        out = lora(input_ids=ids, labels=ids, block_ids=random_block_ids(2, 8, seed=10))
    assert out.localist_loss > 0
