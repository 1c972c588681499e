"""The compiled flex path: one BlockMask per distinct layout, shared by the layers, and no recompilation when only
the block layout changes between steps (same shapes). Forward only: torch 2.13 has no flex backward on CPU; on CUDA
the same code path trains (``benchmarks/gpu/run.sh``)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import hf_localist as hl
from hf_localist.attention import backends
from hf_localist.attention import flex as backend_flex

T = 192


def _layout(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, T), generator=g)
    blocks = torch.zeros(2, T, dtype=torch.long)
    for j, cut in enumerate(sorted(torch.randint(1, T, (3,), generator=g).tolist())):
        blocks[:, cut:] = j + 1
    return ids, blocks


@pytest.mark.slow
def test_compiled_flex_builds_one_mask_per_layout_and_compiles_once(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, backend="flex", block_assignment="explicit"))
    builds = []
    real = backend_flex._flex_block_mask
    monkeypatch.setattr(backend_flex, "_flex_block_mask", lambda *a: builds.append(1) or real(*a))
    backends.clear_plan_cache()
    outs = []
    with torch.no_grad():
        for seed in (0, 1, 2, 0):  # three layouts, then the first again
            ids, blocks = _layout(seed)
            outs.append(model(input_ids=ids, block_ids=blocks).logits)
            if seed == 0 and len(outs) == 1:
                graphs = counters["stats"]["unique_graphs"]
        recompiled = counters["stats"]["unique_graphs"] - graphs
        handle.update(flex_compile=False)
        ids, blocks = _layout(0)
        eager = model(input_ids=ids, block_ids=blocks).logits
    assert handle.state.backend_counts["flex"] == 5 * 3
    assert len(builds) == 3, "one BlockMask per distinct layout (shared by the 3 layers, reused for a repeated one)"
    assert graphs >= 1 and recompiled == 0, "a new layout must not recompile"
    torch.testing.assert_close(outs[3], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], eager, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs[1], outs[2])
