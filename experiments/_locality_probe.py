"""Per-head own-block attention mass and pointer fidelity at a given dial, with the library's recorder definitions.

``handle.record()`` averages BM_t / PF_t over the heads of a layer. Here the same recorder
(:class:`hf_localist.DiagnosticsRecorder`) is fed one head at a time, with the layout of the call (captured by a
``handle.probe``) and the attention weights the model returns (``output_attentions=True``), which gives per (query,
head) values; averaging them over every head reproduces the layer's recorder value exactly (checked by
``measure``), and averaging over the heads that own the query's block gives the locality the penalty is designed for.
"""

from __future__ import annotations

import torch


class _LayoutProbe:
    """``handle.probe`` callback: keeps each layer's layout and the call's target ids."""

    def __init__(self) -> None:
        self.layouts: dict[int, tuple] = {}

    def __call__(self, layer, module, query, key, attention_mask, layout, scaling, alpha_l, out, call):
        q_len = query.shape[2]
        total = call.block_ids.shape[1]
        self.layouts[layer] = (layout.q_blocks, call.target_ids[:, total - q_len:], layout.k_blocks,
                               layout.k_anchor, layout.key_is_sink(), call.query_valid[:, total - q_len:])


@torch.no_grad()
def per_head_metrics(model, handle, batch: dict, alpha: float = 0.0) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"block_mass", "pointer_fidelity": (B, H, T) NaN where undefined, "layer_bm", "layer_pf": (B, T) the
    recorder's own head average, "uniform_bm": (B, T) block mass of uniform attention over the visible non-sink keys,
    "q_blocks": (B, T)}} for one forward of ``batch`` at dial ``alpha``."""
    from hf_localist import DiagnosticsRecorder

    probe = _LayoutProbe()
    with handle.dial(alpha), handle.record() as rec, handle.probe(probe):
        out = model(**batch, output_attentions=True)
    result = {}
    for layer, weights in enumerate(out.attentions):  # (B, H, T, S) each
        if layer not in probe.layouts:
            continue
        q_blocks, q_target, k_blocks, k_anchor, k_sink, q_valid = probe.layouts[layer]
        bms, pfs = [], []
        for head in range(weights.shape[1]):
            one = DiagnosticsRecorder()
            one.record(layer, weights[:, head: head + 1], q_blocks, q_target, k_blocks, k_anchor, k_sink, q_valid)
            bms.append(one.per_query(layer, "block_mass"))
            pfs.append(one.per_query(layer, "pointer_fidelity"))
        t, s = weights.shape[-2:]
        causal = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]  # (T, S): full forward, no cache
        visible = causal[None] & q_valid[:, None, :].cpu() & ~k_sink[:, None, :].cpu()  # (B, T, S): keys seen
        in_target = (k_blocks[:, None, :] == q_target[:, :, None]).cpu()  # (B, T, S)
        uniform = (visible & in_target).sum(-1) / visible.sum(-1).clamp_min(1)
        sink_mass = (weights.float() * k_sink[:, None, None, :]).sum(-1).cpu()  # (B, H, T)
        result[layer] = {"block_mass": torch.stack(bms, dim=1), "pointer_fidelity": torch.stack(pfs, dim=1),
                         "sink_mass": sink_mass,
                         "layer_bm": rec.per_query(layer, "block_mass"),
                         "layer_pf": rec.per_query(layer, "pointer_fidelity"),
                         "uniform_bm": torch.where(torch.isnan(rec.per_query(layer, "block_mass")), torch.nan,
                                                   uniform.float().cpu()),
                         "q_blocks": q_target.cpu()}
    return result
