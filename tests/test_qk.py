"""Tests for hf_localist.arch.qk: per-head Q/K weight views read and write the right weights for every layout.

The reference is the model's own projection: a forward hook captures the projection module's output, which is
sliced per head exactly as the modeling code does (GPT-2 splits ``c_attn`` into three E-wide parts, Phi-3 takes the
first H*D columns as Q and the next H_kv*D as K, GPT-NeoX views the fused output as (..., H, 3*D)).
"""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHS, build_model, random_ids

import hf_localist as hl
from hf_localist.arch.qk import head_counts, kv_head_of, projection_module, qk_head_weights
from hf_localist.errors import UnsupportedArchitectureError

QK_ARCHS = list(ARCHS)
REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gpt_neox", "bert", "roberta")


def test_required_architectures_are_registered():
    assert set(REQUIRED) <= set(QK_ARCHS)


def _zero_qk_biases(handle) -> None:
    """Biases are laid out like the weight rows; zeroing them makes the projection output exactly x @ W.T."""
    spec = handle.spec
    with torch.no_grad():
        for module in handle.attention_modules:
            for name in (spec.q_proj, spec.k_proj):
                if name is None:
                    continue
                bias = getattr(projection_module(module, name), "bias", None)
                if bias is not None:
                    bias.zero_()


class ProjectionCapture:
    """Captures the input and output of the Q (and K) projection of one layer."""

    def __init__(self, handle, layer: int):
        self.handle, self.layer = handle, layer
        self.hooks = []
        self.x = None
        self.q_out = None
        self.k_out = None

    def __enter__(self):
        spec, module = self.handle.spec, self.handle.attention_modules[self.layer]

        def q_hook(_m, args, out):
            self.x, self.q_out = args[0].detach().clone(), out.detach().clone()

        def k_hook(_m, _args, out):
            self.k_out = out.detach().clone()

        self.hooks.append(projection_module(module, spec.q_proj).register_forward_hook(q_hook))
        if spec.k_proj is not None:
            self.hooks.append(projection_module(module, spec.k_proj).register_forward_hook(k_hook))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def per_head(self):
        """(q (B, T, H, D), k (B, T, H_kv, D)) sliced as the modeling code does."""
        h, h_kv, d = head_counts(self.handle)
        layout = self.handle.spec.layout
        out = self.q_out
        lead = out.shape[:-1]
        if layout == "linear":
            return out.view(*lead, h, d), self.k_out.view(*lead, h_kv, d)
        if layout == "conv1d_fused":
            e = out.shape[-1] // 3
            q, k, _v = out.split(e, dim=-1)
            return q.view(*lead, h, d), k.view(*lead, h_kv, d)
        if layout == "fused_qkv":
            q = out[..., : h * d]
            k = out[..., h * d: h * d + h_kv * d]
            return q.view(*lead, h, d), k.view(*lead, h_kv, d)
        if layout == "neox_interleaved":
            per = out.view(*lead, h, 3 * d)
            return per[..., :d], per[..., d: 2 * d]
        raise AssertionError(layout)

    def v_part(self):
        """The value part of a fused output (unchanged when Q/K heads are written); None for separate projections."""
        h, h_kv, d = head_counts(self.handle)
        layout = self.handle.spec.layout
        out = self.q_out
        if layout == "conv1d_fused":
            return out.split(out.shape[-1] // 3, dim=-1)[2]
        if layout == "fused_qkv":
            return out[..., h * d + h_kv * d:]
        if layout == "neox_interleaved":
            return out.view(*out.shape[:-1], h, 3 * d)[..., 2 * d:]
        return None


def _patched(model_type: str, seed: int = 0):
    model = build_model(model_type, seed=seed)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit", max_blocks=3))
    _zero_qk_biases(handle)
    return model, handle


def _forward(model, ids):
    with torch.no_grad():
        model(input_ids=ids, block_ids=torch.zeros_like(ids))


@pytest.mark.parametrize("model_type", QK_ARCHS)
def test_head_slices_match_projection_output(model_type):
    model, handle = _patched(model_type)
    h, h_kv, d = head_counts(handle)
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert h_kv < h  # GQA exercised where the architecture supports it
    ids = random_ids(2, 7, seed=1)
    for layer in range(len(handle.attention_modules)):
        with ProjectionCapture(handle, layer) as cap:
            _forward(model, ids)
        q_ref, k_ref = cap.per_head()
        wq, wk = qk_head_weights(handle, layer)
        e = cap.x.shape[-1]
        assert wq.shape == (h, d, e) and wk.shape == (h_kv, d, e)
        for head in range(h):
            torch.testing.assert_close(cap.x @ wq[head].T, q_ref[..., head, :], atol=1e-5, rtol=1e-5)
        for head in range(h_kv):
            torch.testing.assert_close(cap.x @ wk[head].T, k_ref[..., head, :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", QK_ARCHS)
@pytest.mark.parametrize("which", ["q", "k"])
def test_writing_through_view_changes_exactly_that_head(model_type, which):
    model, handle = _patched(model_type)
    h, h_kv, d = head_counts(handle)
    ids = random_ids(2, 7, seed=2)
    layer = len(handle.attention_modules) - 1
    with ProjectionCapture(handle, layer) as before:
        _forward(model, ids)
    q0, k0 = before.per_head()
    target = 1 if which == "q" else h_kv - 1
    with torch.no_grad():
        wq, wk = qk_head_weights(handle, layer)
        (wq if which == "q" else wk)[target].zero_()
    with ProjectionCapture(handle, layer) as after:
        _forward(model, ids)
    q1, k1 = after.per_head()
    changed, same = (q1, q0) if which == "q" else (k1, k0)
    other_new, other_old = (k1, k0) if which == "q" else (q1, q0)
    n_heads = h if which == "q" else h_kv
    assert torch.count_nonzero(changed[..., target, :]) == 0
    assert not torch.allclose(same[..., target, :], torch.zeros_like(same[..., target, :]))
    for head in range(n_heads):
        if head != target:
            torch.testing.assert_close(changed[..., head, :], same[..., head, :], atol=0, rtol=0)
    torch.testing.assert_close(other_new, other_old, atol=0, rtol=0)
    if before.v_part() is not None:
        torch.testing.assert_close(after.v_part(), before.v_part(), atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_views_share_storage_and_carry_gradients(model_type):
    model, handle = _patched(model_type)
    wq, wk = qk_head_weights(handle, 0)
    spec = handle.spec
    weight = projection_module(handle.attention_modules[0], spec.q_proj).weight
    assert wq.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()  # a view, not a copy
    assert qk_head_weights(handle, 0, grad=True) == (None, None)  # before any backward
    (wq.sum() + 2 * wk.sum()).backward()
    gq, gk = qk_head_weights(handle, 0, grad=True)
    assert torch.equal(gq, torch.ones_like(gq))
    assert torch.equal(gk, 2 * torch.ones_like(gk))
    # Every Q/K entry of the weight gets a gradient and nothing else does (V untouched).
    assert int(torch.count_nonzero(weight.grad)) == gq.numel() + (gk.numel() if spec.k_proj is None else 0)


def test_peft_wrapped_projection_reads_base_layer():
    peft = pytest.importorskip("peft")
    model = build_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], lora_alpha=4))
    handle = hl.apply_localist(lora, hl.LocalistConfig(alpha=0.0, block_assignment="explicit", max_blocks=3))
    wq, _ = qk_head_weights(handle, 0)
    base_weight = handle.attention_modules[0].q_proj.base_layer.weight
    h, _, d = head_counts(handle)
    torch.testing.assert_close(wq, base_weight.view(h, d, -1))


def test_kv_head_of_follows_repeat_kv():
    assert kv_head_of(4, 2).tolist() == [0, 0, 1, 1]
    assert kv_head_of(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert kv_head_of(4, 4).tolist() == [0, 1, 2, 3]


def test_unknown_layout_is_a_clear_error():
    import dataclasses

    model, handle = _patched("llama")
    handle.spec = dataclasses.replace(handle.spec, layout="mystery")
    with pytest.raises(UnsupportedArchitectureError, match="mystery"):
        qk_head_weights(handle, 0)
