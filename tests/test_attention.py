"""Localist attention: parity at alpha = 0, the bias formula, hard mode vs an independent reference, backends agree,
attention weights, and the diagnostics recorder."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    LAYERS,
    PAD,
    assert_close_scaled,
    build_model,
    left_pad_mask,
    main_output,
    precise_dtype,
    random_block_ids,
    random_ids,
    reference_mask,
)

import hf_localist as hl
from hf_localist.attention.recorder import DiagnosticsRecorder

B, T = 3, 14


def _is_causal(model_type: str) -> bool:
    return hl.get_arch_spec(model_type).causal


def _inputs(padded: bool, seed: int = 0, batch: int = B, seq: int = T):
    ids = random_ids(batch, seq, seed=seed)
    blocks = random_block_ids(batch, seq, num_blocks=3, seed=seed)
    # Row 0 always has a non-contiguous layout: block 1 reappears after block 2, and block 0 in between.
    blocks[0] = torch.tensor(([0, 1, 1, 2, 2, 1, 1, 0, 3, 3, 1, 2, 2, 2] * 3)[:seq])
    mask = None
    if padded:
        pads = [0, 3, 5][:batch] + [0] * max(0, batch - 3)
        mask = left_pad_mask(batch, seq, pads)
        ids = ids.masked_fill(mask == 0, PAD)
    return ids, blocks, mask


def _valid(mask: torch.Tensor | None, batch: int = B, seq: int = T) -> torch.Tensor:
    return torch.ones(batch, seq, dtype=torch.bool) if mask is None else mask.bool()


def _reference_inputs(model, ref_mask: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """The forward arguments that give the unpatched ``model`` the 4-D reference mask ``ref_mask`` (B, 1, T, T).

    - Models with sliding-window layers (Gemma 2 / 3) take one mask per layer type (a dict, as ``generate`` prepares
      it): the sliding layers' mask is ``ref_mask`` within the window (key index > query index - window), as
      transformers' own ``sliding_window_overlay``; so the windows are part of the reference.
    - OPT derives its learned absolute positions from the 2-D attention mask (cumulative count of the valid tokens):
      with a 4-D mask it would read the mask as positions, so the positions the 2-D mask gives are passed.
    """
    config = model.config
    attention_mask = ref_mask
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and layer_types and "sliding_attention" in layer_types:
        t = ref_mask.shape[-1]
        idx = torch.arange(t)
        outside = idx[None, :] <= idx[:, None] - window  # (T, T): key too far behind the query
        attention_mask = {"full_attention": ref_mask,
                          "sliding_attention": ref_mask.masked_fill(outside, float("-inf"))}
    out = {"attention_mask": attention_mask}
    if config.model_type == "opt":
        valid = torch.ones(ref_mask.shape[0], ref_mask.shape[-1], dtype=torch.long) if mask is None else mask.long()
        out["position_ids"] = (valid.cumsum(1) * valid - 1).long()
    return out


# ---------------------------------------------------------------------------------------------------------- alpha = 0
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_alpha0_is_bit_identical_to_sdpa(arch, padded):
    model = build_model(arch)
    ids, blocks, mask = _inputs(padded)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, attention_mask=mask))
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    assert model.config._attn_implementation == "localist"
    with torch.no_grad():
        out = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
    assert torch.equal(out, ref)
    assert handle.state.backend_counts == {"passthrough": LAYERS}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_alpha0_is_bit_identical_to_eager(arch, padded):
    """A model loaded with attn_implementation='eager' stays eager (and causal) at alpha = 0."""
    model = build_model(arch, attn_implementation="eager")
    ids, blocks, mask = _inputs(padded)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, attention_mask=mask))
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    with torch.no_grad():
        out = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
    valid = _valid(mask)
    assert torch.equal(out[valid], ref[valid])
    assert handle.state.backend_counts == {"passthrough": LAYERS}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_no_information_flows_from_the_future(decoder_arch, impl, alpha):
    model = build_model(decoder_arch, attn_implementation=impl)
    hl.apply_localist(model, hl.LocalistConfig(alpha=alpha, block_assignment="explicit"))
    ids, blocks, _ = _inputs(False, batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 100
    with torch.no_grad():
        a = main_output(model(input_ids=ids, block_ids=blocks))
        b = main_output(model(input_ids=changed, block_ids=blocks))
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_alpha0_default_config_is_bit_identical(arch):
    model = build_model(arch)
    ids = random_ids(2, T)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids))
    hl.apply_localist(model, alpha=0.0)  # default config for the architecture (segment assignment)
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids)), ref)


def test_progressive_schedule_layers_below_l0_pass_through(arch):
    model = build_model(arch)
    ids, blocks, _ = _inputs(False)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
    cfg = hl.LocalistConfig(alpha=1.0, schedule="progressive", schedule_power=3, first_local_layer=1,
                            block_assignment="explicit")
    handle = hl.apply_localist(model, cfg)
    assert handle.layer_alphas() == [0.0, 1.0]
    with torch.no_grad():
        out = model(input_ids=ids, block_ids=blocks, output_hidden_states=True)
    # Layer 0 is below first_local_layer: its output is the sdpa model's, bit for bit.
    assert torch.equal(out.hidden_states[1], ref.hidden_states[1])
    # Layer 1 is localised (hard): the final output changes.
    assert not torch.allclose(main_output(out), main_output(ref), atol=1e-4)
    # The whole progressive schedule at alpha = 0 is the sdpa model.
    handle.set_dial(0.0)
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks)), main_output(ref))


# --------------------------------------------------------------------------------- hard and soft vs the reference mask
@pytest.mark.parametrize("backend", ["dense", "segment", "auto"])
@pytest.mark.parametrize("case", ["plain", "padded_anchor_bonus"])
def test_hard_mode_matches_reference_block_mask(arch, backend, case):
    """alpha = 1 equals the unpatched sdpa model given the block mask of docs/design.md section 3 as a 4-D float
    mask."""
    padded = case != "plain"
    beta = 0.7 if padded else 0.0
    model = build_model(arch)
    ids, blocks, mask = _inputs(padded)
    ref_mask = reference_mask(blocks, alpha=1.0, beta_anchor=beta, causal=_is_causal(arch), attention_mask=mask)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, **_reference_inputs(model, ref_mask, mask)))
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, beta_anchor=beta, backend=backend,
                                                        block_assignment="explicit"))
    with torch.no_grad():
        out = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
    valid = _valid(mask)
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    expected = {"dense"} if backend == "dense" else {"segment"}
    if backend == "auto" and "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
        expected = {"dense", "segment"}  # docs/design.md: 'auto' runs a hard sliding-window layer (prefill) dense
    assert set(handle.state.backend_counts) == expected
    # Sanity: the mask matters (hard mode is not the dense model).
    with torch.no_grad():
        plain = main_output(build_model(arch)(input_ids=ids, attention_mask=mask))
    assert not torch.allclose(out[valid], plain[valid], atol=1e-4)


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_soft_dial_matches_reference_bias(arch, alpha):
    model = build_model(arch)
    ids, blocks, mask = _inputs(True, seed=1)
    ref_mask = reference_mask(blocks, alpha=alpha, beta_anchor=0.5, causal=_is_causal(arch), attention_mask=mask)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, **_reference_inputs(model, ref_mask, mask)))
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=alpha, beta_anchor=0.5, block_assignment="explicit"))
    with torch.no_grad():
        out = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
    valid = _valid(mask)
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert set(handle.state.backend_counts) == {"dense"}


def test_soft_bias_formula_on_attention_weights(arch):
    """Layer-0 weights at alpha are the alpha = 0 weights reweighted by exp(bias) and renormalised, where the bias is
    log(1 - alpha) on other blocks (not block 0, not the sink), alpha * beta_anchor on the query's own anchors, and
    nothing for queries of block 0."""
    alpha, beta = 0.6, 0.8
    model = build_model(arch)
    ids, blocks, mask = _inputs(True, seed=2)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, beta_anchor=beta, block_assignment="explicit"))
    with torch.no_grad():
        p0 = model(input_ids=ids, attention_mask=mask, block_ids=blocks, output_attentions=True).attentions[0]
        handle.set_dial(alpha)
        pa = model(input_ids=ids, attention_mask=mask, block_ids=blocks, output_attentions=True).attentions[0]
    bias = reference_mask(blocks, alpha=alpha, beta_anchor=beta, causal=_is_causal(arch), attention_mask=mask)
    expected = p0.double() * bias.double().exp()
    expected = expected / expected.sum(-1, keepdim=True)
    valid = _valid(mask)
    torch.testing.assert_close(pa.double()[valid[:, None].expand_as(pa[..., 0])],
                               expected[valid[:, None].expand_as(pa[..., 0])], atol=1e-5, rtol=1e-4)
    # Block-0 queries are not biased at all.
    q0 = (blocks == 0) & valid
    torch.testing.assert_close(pa.transpose(1, 2)[q0], p0.transpose(1, 2)[q0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------- segment and flex vs dense
def _forward_backward(model, ids, blocks, mask, weight):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = main_output(model(inputs_embeds=embeds, attention_mask=mask, block_ids=blocks))
    valid = _valid(mask, *ids.shape)
    loss = (out * weight)[valid].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), embeds.grad.clone(), grads


SEGMENT_CASES = {
    "per_row_layouts": dict(padded=False, beta=0.0),
    "left_padding": dict(padded=True, beta=0.0),
    "anchor_bonus": dict(padded=False, beta=0.9),
    "padding_and_anchor_bonus": dict(padded=True, beta=0.5),
}


def _check_segment_equals_dense(arch, padded, beta, seed=0):
    """Same outputs, input gradients and parameter gradients (in float64: equal up to rounding)."""
    dtype = precise_dtype(arch)
    model = build_model(arch).to(dtype)
    ids, blocks, mask = _inputs(padded, seed=seed)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, beta_anchor=beta, backend="dense",
                                                        block_assignment="explicit"))
    out_shape = main_output(model(input_ids=ids[:, :2], block_ids=blocks[:, :2])).shape
    weight = torch.randn(ids.shape[0], ids.shape[1], out_shape[-1], generator=torch.Generator().manual_seed(5),
                         dtype=dtype)
    d_out, d_in, d_grads = _forward_backward(model, ids, blocks, mask, weight)
    handle.update(backend="segment")
    handle.state.backend_counts.clear()
    s_out, s_in, s_grads = _forward_backward(model, ids, blocks, mask, weight)
    assert set(handle.state.backend_counts) == {"segment"}
    valid = _valid(mask)
    assert_close_scaled(s_out[valid], d_out[valid])
    assert_close_scaled(s_in, d_in)
    assert d_in.abs().max() > 0
    assert set(s_grads) == set(d_grads) and d_grads
    for name in d_grads:
        assert_close_scaled(s_grads[name], d_grads[name], msg=name)


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # llama: GQA (4 query heads, 2 kv heads)
def test_segment_equals_dense_outputs_and_gradients(model_type, case):
    _check_segment_equals_dense(model_type, **SEGMENT_CASES[case])


def test_segment_equals_dense_every_architecture(arch):
    _check_segment_equals_dense(arch, padded=True, beta=0.4, seed=3)


def test_segment_single_block_and_all_general():
    """Degenerate layouts: every position in block 0, or every position in one block."""
    for fill in (0, 2):
        model = build_model("llama")
        ids = random_ids(2, T)
        blocks = torch.full((2, T), fill)
        handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, backend="dense", block_assignment="explicit"))
        with torch.no_grad():
            ref = main_output(model(input_ids=ids, block_ids=blocks))
            handle.update(backend="segment")
            torch.testing.assert_close(main_output(model(input_ids=ids, block_ids=blocks)), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_flex_equals_dense_hard_mode(model_type):
    model = build_model(model_type).double()
    ids, blocks, mask = _inputs(True, seed=4)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, backend="dense", block_assignment="explicit"))
    with torch.no_grad():
        ref = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
        handle.update(backend="flex", flex_compile=False)
        handle.state.backend_counts.clear()
        out = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
        # And without a padding mask (causality applied by the backend itself).
        out_nomask = main_output(model(input_ids=ids, block_ids=blocks))
        handle.update(backend="dense")
        ref_nomask = main_output(model(input_ids=ids, block_ids=blocks))
    assert handle.state.backend_counts.get("flex") == 2 * LAYERS
    valid = _valid(mask)
    assert_close_scaled(out[valid], ref[valid])
    assert_close_scaled(out_nomask, ref_nomask)


# ------------------------------------------------------------------------------------------------- attention weights
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_output_attentions_rows_sum_to_one(arch, alpha):
    model = build_model(arch)
    ids, blocks, mask = _inputs(True, seed=6)
    hl.apply_localist(model, hl.LocalistConfig(alpha=alpha, block_assignment="explicit"))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, block_ids=blocks, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == LAYERS
    valid = _valid(mask)
    for weights in out.attentions:
        assert weights.shape == (B, 4, T, T)
        sums = weights.sum(-1).transpose(1, 2)[valid]  # (n_valid, H)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        assert (weights >= 0).all()
        # Padding keys get no weight from valid queries.
        key_pad = (~valid)[:, None, None, :] & valid[:, None, :, None]
        assert (weights.masked_select(key_pad) == 0).all()
        if _is_causal(arch):
            future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)[None, None] & valid[:, None, :, None]
            assert (weights.masked_select(future) == 0).all()
        if alpha == 1.0:
            # Hard mode: a query of block b >= 1 gives zero weight to other blocks (except the sink).
            forbidden = torch.isneginf(reference_mask(blocks, 1.0, causal=_is_causal(arch), attention_mask=mask))
            forbidden &= valid[:, None, :, None]
            assert (weights.masked_select(forbidden.expand_as(weights)) == 0).all()
    # Without output_attentions no weights come back.
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, block_ids=blocks)
    assert not plain.attentions


# ---------------------------------------------------------------------------------------------- diagnostics recorder
def _hand_metrics(weights, blocks, target, valid):
    """H_t, PF_t, BM_t computed with Python loops from the attention weights (B, H, T, S)."""
    b_, h_, t_, s_ = weights.shape
    res = {m: torch.full((b_, t_), math.nan, dtype=torch.float64)
           for m in ("entropy", "pointer_fidelity", "block_mass")}
    for r in range(b_):
        sink = int(valid[r].long().argmax())
        ids = blocks[r].tolist()
        anchors = [ids[s] >= 1 and (s == 0 or ids[s - 1] != ids[s]) for s in range(s_)]
        for t in range(t_):
            if not valid[r, t]:
                continue
            ents, pfs, bms = [], [], []
            for h in range(h_):
                p = [float(weights[r, h, t, s]) if s != sink else 0.0 for s in range(s_)]
                z = sum(p)
                if z <= 0:
                    break
                p = [x / z for x in p]
                ents.append(-sum(x * math.log(x) for x in p if x > 0))
                tb = int(target[r, t])
                pfs.append(sum(p[s] for s in range(s_) if ids[s] == tb and anchors[s]))
                bms.append(sum(p[s] for s in range(s_) if ids[s] == tb))
            else:
                res["entropy"][r, t] = sum(ents) / h_
                if int(target[r, t]) >= 1:
                    res["pointer_fidelity"][r, t] = sum(pfs) / h_
                    res["block_mass"][r, t] = sum(bms) / h_
    return res


def test_recorder_on_a_hand_made_case():
    """One query, two heads, five keys; key 0 is the sink; block layout [0, 1, 1, 2, 1]."""
    probs = torch.tensor([[[[0.5, 0.1, 0.1, 0.2, 0.1]], [[0.2, 0.4, 0.0, 0.2, 0.2]]]])  # (1, 2, 1, 5)
    k_blocks = torch.tensor([[0, 1, 1, 2, 1]])
    k_anchor = torch.tensor([[False, True, False, True, True]])
    k_sink = torch.tensor([[True, False, False, False, False]])
    rec = DiagnosticsRecorder()
    rec.record(0, probs, q_blocks=torch.tensor([[1]]), q_target=torch.tensor([[1]]), k_blocks=k_blocks,
               k_anchor=k_anchor, k_is_sink=k_sink, q_valid=torch.tensor([[True]]))
    # Head 0 without the sink: [0.2, 0.2, 0.4, 0.2]; head 1: [0.5, 0, 0.25, 0.25].
    h0 = -(3 * 0.2 * math.log(0.2) + 0.4 * math.log(0.4))
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert rec.values(0, "entropy").item() == pytest.approx((h0 + h1) / 2, abs=1e-6)
    assert rec.values(0, "pointer_fidelity").item() == pytest.approx(((0.2 + 0.2) + (0.5 + 0.25)) / 2, abs=1e-6)
    assert rec.values(0, "block_mass").item() == pytest.approx(((0.2 + 0.2 + 0.2) + (0.5 + 0.25)) / 2, abs=1e-6)
    # Target block 2 instead of the own block: PF = BM = mass on key 3.
    rec2 = DiagnosticsRecorder()
    rec2.record(0, probs, q_blocks=torch.tensor([[1]]), q_target=torch.tensor([[2]]), k_blocks=k_blocks,
                k_anchor=k_anchor, k_is_sink=k_sink, q_valid=torch.tensor([[True]]))
    assert rec2.values(0, "pointer_fidelity").item() == pytest.approx((0.4 + 0.25) / 2, abs=1e-6)
    assert rec2.values(0, "block_mass").item() == pytest.approx((0.4 + 0.25) / 2, abs=1e-6)
    assert rec2.values(0, "entropy").item() == pytest.approx((h0 + h1) / 2, abs=1e-6)
    # Target block 0: PF/BM undefined; a padding query: nothing defined.
    rec3 = DiagnosticsRecorder()
    rec3.record(0, probs, q_blocks=torch.tensor([[1]]), q_target=torch.tensor([[0]]), k_blocks=k_blocks,
                k_anchor=k_anchor, k_is_sink=k_sink, q_valid=torch.tensor([[True]]))
    assert rec3.values(0, "pointer_fidelity").numel() == 0 and rec3.values(0, "entropy").numel() == 1
    rec3.record(1, probs, q_blocks=torch.tensor([[1]]), q_target=torch.tensor([[1]]), k_blocks=k_blocks,
                k_anchor=k_anchor, k_is_sink=k_sink, q_valid=torch.tensor([[False]]))
    assert all(rec3.values(1, m).numel() == 0 for m in ("entropy", "pointer_fidelity", "block_mass"))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_recorder_matches_hand_computation_on_a_model(model_type, alpha):
    model = build_model(model_type)
    ids, blocks, mask = _inputs(True, seed=7)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=alpha, block_assignment="explicit"))
    target = torch.where(blocks == 1, torch.full_like(blocks, 3), blocks)  # block-1 queries point at block 3
    with torch.no_grad(), handle.record() as rec:
        out = model(input_ids=ids, attention_mask=mask, block_ids=blocks, output_attentions=True)
        model(input_ids=ids, attention_mask=mask, block_ids=blocks, target_block_ids=target)
    assert rec.layers == list(range(LAYERS))
    valid = _valid(mask)
    for layer in range(LAYERS):
        own = _hand_metrics(out.attentions[layer], blocks, blocks, valid)
        other = _hand_metrics(out.attentions[layer], blocks, target, valid)
        for metric in own:
            torch.testing.assert_close(rec.per_query(layer, metric, call=0).double(), own[metric], atol=1e-5,
                                       rtol=1e-4, equal_nan=True)
            torch.testing.assert_close(rec.per_query(layer, metric, call=1).double(), other[metric], atol=1e-5,
                                       rtol=1e-4, equal_nan=True)
        # target_block_ids changes PF and BM of the retargeted queries, not the entropy.
        moved = (blocks == 1) & valid
        assert not torch.allclose(rec.per_query(layer, "block_mass", 0)[moved],
                                  rec.per_query(layer, "block_mass", 1)[moved])
        torch.testing.assert_close(rec.per_query(layer, "entropy", 0), rec.per_query(layer, "entropy", 1),
                                   equal_nan=True)
    summary = rec.summary()
    assert set(summary["layers"]) == set(range(LAYERS))
    assert all(math.isfinite(v) for v in summary["mean"].values())
    # The recorder is detached after the block: later calls record nothing.
    n = len(rec.values(0, "entropy"))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, block_ids=blocks)
    assert len(rec.values(0, "entropy")) == n


def test_own_block_mass_rises_with_alpha(arch):
    model = build_model(arch)
    ids, blocks, mask = _inputs(True, seed=8)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    layer0, overall = [], []
    for alpha in (0.0, 0.25, 0.5, 0.75, 0.95, 1.0):
        handle.set_dial(alpha)
        with torch.no_grad(), handle.record() as rec:
            model(input_ids=ids, attention_mask=mask, block_ids=blocks)
        layer0.append(rec.summary()["layers"][0]["block_mass"])
        overall.append(rec.summary()["mean"]["block_mass"])
    # Layer 0 sees the same logits at every alpha: its own-block mass rises strictly.
    assert all(a < b for a, b in zip(layer0, layer0[1:])), layer0
    assert all(a <= b + 1e-6 for a, b in zip(overall, overall[1:])), overall
    # With block 0 and the sink the only other visible keys in hard mode, BM + mass on block 0 = 1 at alpha = 1.
    assert overall[-1] > overall[0]


def test_recorder_records_nothing_outside_the_block():
    model = build_model("llama")
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.5, block_assignment="explicit"))
    ids, blocks, _ = _inputs(False)
    with torch.no_grad(), handle.record() as rec:
        pass
    with torch.no_grad():
        model(input_ids=ids, block_ids=blocks)
    assert rec.layers == []
    with pytest.raises(hl.LocalistConfigError, match="nope"):
        rec.values(0, "nope")
