"""Exponential concentration: attention entropy H_t and pointer fidelity PF_t against the margin delta/tau and the dial.

docs/design.md section 5 bounds the attention of a query by the margin ``delta`` of its anchors (min anchor logit minus
max logit outside the anchors) over the temperature ``tau``:

    leak = (N-A) e^(-delta/tau) / (A + (N-A) e^(-delta/tau))  <=  ((N-A)/A) e^(-delta/tau)
    PF_t >= 1 - leak,     H_t <= h_b(leak) + (1 - leak) ln A + leak ln(N - A)

and the dial adds ``-log(1 - alpha)`` to every margin over other-block keys. Two measurements:

1. *Controlled logits*: rows of logits built with a known margin (delta/tau from -4 to 12, N in {16, 64, 256} keys,
   A in {1, 4} anchors, tau in {0.5, 1, 2}, random spread below the extremes, plus the worst case where every
   non-anchor ties at the maximum), measured with ``hf_localist.theory`` (``margin``, ``pointer_fidelity``,
   ``attention_entropy``) and compared query by query with ``pointer_fidelity_bound`` / ``entropy_bound``.
2. *A tiny Llama with known blocks* (random init, explicit block ids, anchor bonus ``beta_anchor``) across the dial:
   a probe inside the localist attention (``handle.probe(...)``) records per (query, head) the applied margin, the
   attention weights the layer computes and the bounds; ``handle.record()`` gives the recorder's PF/H for the same
   forward (they must agree), and ``estimate_constants(..., with_grad=False).bounds()`` the library's own check.

Run: ``python experiments/concentration.py [--quick] [--write_docs]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "concentration"
TOL = 1e-5  # float32 attention: a bound "holds" when measured PF >= bound - TOL (H <= bound + TOL)


# ------------------------------------------------------------------------------------------- controlled logits
def controlled(quick: bool, seed: int) -> dict:
    import torch

    from hf_localist import theory

    g = torch.Generator().manual_seed(seed)
    deltas = torch.linspace(-4.0, 12.0, 17 if quick else 65, dtype=torch.float64)  # delta / tau
    reps = 8 if quick else 40
    rows = []
    for n_keys in (16, 64, 256):
        for n_anchor in (1, 4):
            for tau in (0.5, 1.0, 2.0):
                for d in deltas.tolist():
                    # reps random rows + 1 worst-case row (every non-anchor ties at the max, every anchor at the min)
                    z = torch.zeros(reps + 1, n_keys, dtype=torch.float64)
                    spread = torch.rand(reps, 1, generator=g, dtype=torch.float64) * 6.0
                    noise = torch.rand(reps, n_keys, generator=g, dtype=torch.float64) * spread
                    z[:reps] = -noise  # non-anchors at or below 0 ...
                    z[:reps, n_anchor] = 0.0  # ... with one exactly at the max 0
                    z[:reps, :n_anchor] = d * tau + noise[:, :n_anchor]  # anchors at or above delta ...
                    z[:reps, 0] = d * tau  # ... with one exactly at the min
                    z[reps, :n_anchor] = d * tau
                    anchor = torch.zeros(n_keys, dtype=torch.bool)
                    anchor[:n_anchor] = True
                    anchor = anchor.expand_as(z)
                    probs = torch.softmax(z / tau, dim=-1)
                    delta = theory.margin(z, anchor)
                    pf = theory.pointer_fidelity(probs, anchor)
                    ent = theory.attention_entropy(probs)
                    pf_b = theory.pointer_fidelity_bound(tau, delta, n_keys, n_anchor)
                    h_b = theory.entropy_bound(tau, delta, n_keys, n_anchor)
                    worst = torch.zeros(reps + 1, dtype=torch.bool)
                    worst[reps] = True
                    rows.append(torch.stack([
                        torch.full_like(pf, n_keys), torch.full_like(pf, n_anchor), torch.full_like(pf, tau),
                        delta / tau, pf, pf_b, ent, h_b, worst.double()], dim=1))
    data = torch.cat(rows)
    n, a, tau, d_tau, pf, pf_b, ent, h_b, worst = data.unbind(1)
    worst = worst.bool()
    margin_error = float((d_tau - deltas.repeat_interleave(reps + 1).repeat(18)).abs().max())
    by_delta = []
    for d in deltas.tolist():
        sel = (d_tau - d).abs() < 1e-9
        by_delta.append({"delta_over_tau": d, "pf_mean": float(pf[sel].mean()),
                         "pf_bound_mean": float(pf_b[sel].mean()),
                         "entropy_mean": float(ent[sel].mean()), "entropy_bound_mean": float(h_b[sel].mean())})
    return {
        "n_rows": int(data.shape[0]),
        "margin_max_abs_error": margin_error,  # theory.margin recovers the constructed delta
        "pf_bound_holds": float((pf >= pf_b - 1e-12).double().mean()),
        "entropy_bound_holds": float((ent <= h_b + 1e-12).double().mean()),
        # Worst case (ties): the PF bound is attained exactly (it is the exact leak, not just an upper bound).
        "pf_bound_gap_worst_case_max": float((pf[worst] - pf_b[worst]).abs().max()),
        # For delta >= 0 the entropy bound is attained by the ties too; for delta < 0 it is clamped to ln N.
        "entropy_bound_gap_worst_case_max": float((h_b[worst & (d_tau >= 0)] - ent[worst & (d_tau >= 0)]).abs().max()),
        "pf_gap_random_mean": float((pf[~worst] - pf_b[~worst]).mean()),
        "by_delta": by_delta,
        "_points": {"n": n, "a": a, "d_tau": d_tau, "pf": pf, "pf_b": pf_b, "ent": ent, "h_b": h_b, "worst": worst},
    }


# ------------------------------------------------------------------------------------------- tiny Llama, dial
def _block_layout(batch: int, seq: int, n_blocks: int, g):
    import torch

    rows = []
    for _ in range(batch):
        row = [0]  # BOS: the sink, general block
        cur = 0
        while len(row) < seq:
            nxt = int(torch.randint(1, n_blocks + 1, (1,), generator=g))
            if nxt == cur:
                continue
            cur = nxt
            row += [cur] * int(torch.randint(4, 13, (1,), generator=g))
        rows.append(row[:seq])
    return torch.tensor(rows)


class MarginProbe:
    """Per (query, head): applied margin (tau units), N, A, PF and H of the softmax the layer computes, bounds."""

    def __init__(self, handle):
        self.handle = handle
        self.rows = []

    def __call__(self, layer, module, query, key, attention_mask, layout, scaling, alpha_l, out, call):
        import torch

        from hf_localist import theory
        from hf_localist.attention.backends import base_mask_as_float, block_bias, repeat_kv

        with torch.no_grad():
            state = self.handle.state
            b, h, t, _ = query.shape
            k = repeat_kv(key, h // key.shape[1])
            z = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # z / tau
            base = base_mask_as_float(attention_mask, layout, t, k.shape[2])
            bias = block_bias(layout, alpha_l, state.config.beta_anchor)
            applied = z + bias + base
            visible = ~torch.isneginf(applied)  # (B, H, T, S)
            not_sink = ~layout.key_is_sink()[:, None, None, :]
            valid = visible & not_sink
            total = call.block_ids.shape[1]
            target = call.target_ids[:, total - t:]
            own = layout.k_anchor[:, None, :] & (layout.k_blocks[:, None, :] == target[:, :, None])  # (B, T, S)
            anchors = own[:, None] & valid
            probs = torch.softmax(applied, dim=-1)
            d_eff = theory.margin(applied, anchors, valid)  # tau = 1 on applied logits
            n_vis = valid.sum(-1).double()
            n_anc = anchors.sum(-1).double()
            pf = theory.pointer_fidelity(probs, anchors, exclude=~not_sink.expand_as(probs))
            ent = theory.attention_entropy(probs, valid)
            ok = (target >= 1)[:, None, :] & (n_anc >= 1) & (n_vis >= n_anc) & torch.isfinite(pf) & torch.isfinite(ent)
            pf_b = theory.pointer_fidelity_bound(1.0, d_eff[ok].double(), n_vis[ok], n_anc[ok])
            h_b = theory.entropy_bound(1.0, d_eff[ok].double(), n_vis[ok], n_anc[ok])
            self.rows.append(torch.stack([torch.full_like(pf_b, float(layer)), torch.full_like(pf_b, alpha_l),
                                          d_eff[ok].double(), n_vis[ok], n_anc[ok], pf[ok].double(), pf_b,
                                          ent[ok].double(), h_b], dim=1))
            # per-query PF averaged over heads (for the cross-check against the recorder)
            self.head_mean_pf = getattr(self, "head_mean_pf", {})
            self.head_mean_pf[layer] = torch.where(ok.all(1), pf.mean(1), torch.nan)


def tiny_llama_dial(quick: bool, seed: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_localist as hl
    from hf_localist.training.calibration import estimate_constants

    n_blocks, layers, batch, seq = 4, 2, (4 if quick else 16), (48 if quick else 96)
    beta_anchor = 6.0
    alphas = [0.0, 0.5, 0.9, 0.99, 1.0] if quick else [0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 0.99, 0.999, 1.0]
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
                      initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit", max_blocks=n_blocks,
                                                        beta_anchor=beta_anchor, backend="dense"))
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    ids[:, 0] = 1
    blocks = _block_layout(batch, seq, n_blocks, g)
    probe = MarginProbe(handle)
    per_alpha, recorder_gap = [], 0.0
    with handle.probe(probe):
        for alpha in alphas:
            start = len(probe.rows)
            with torch.no_grad(), handle.dial(alpha), handle.record() as rec:
                model(input_ids=ids, block_ids=blocks)
            summary = rec.summary()
            for layer in range(layers):
                ref = rec.per_query(layer, "pointer_fidelity")
                mine = probe.head_mean_pf[layer]
                both = ~torch.isnan(ref) & ~torch.isnan(mine)
                recorder_gap = max(recorder_gap, float((ref[both] - mine[both].float()).abs().max()))
            data = torch.cat(probe.rows[start:])
            _, _, d_eff, n_vis, n_anc, pf, pf_b, ent, h_b = data.unbind(1)
            with handle.dial(alpha):
                lib = estimate_constants(handle, [{"input_ids": ids, "block_ids": blocks}], with_grad=False).bounds()
            per_alpha.append({
                "alpha": alpha, "n": int(data.shape[0]),
                "margin_median": float(d_eff.median()), "margin_p5": float(torch.quantile(d_eff, 0.05)),
                "pf_mean": float(pf.mean()), "pf_bound_mean": float(pf_b.mean()),
                "entropy_mean": float(ent.mean()), "entropy_bound_mean": float(h_b.mean()),
                "pf_bound_holds": float((pf >= pf_b - TOL).double().mean()),
                "entropy_bound_holds": float((ent <= h_b + TOL).double().mean()),
                "pf_recorder_mean": summary["mean"]["pointer_fidelity"],
                "entropy_recorder_mean": summary["mean"]["entropy"],
                "block_mass_recorder_mean": summary["mean"]["block_mass"],
                "library_pf_bound_holds": min(c["pf_bound_holds"] for c in lib),
                "library_entropy_bound_holds": min(c["entropy_bound_holds"] for c in lib),
            })
    data = torch.cat(probe.rows)
    # Per (query, head) of layer 0 (whose input does not depend on the dial): PF never decreases when the dial goes
    # up (anchor bonus up, other blocks down). Later layers read inputs that the dial changed, so no such guarantee.
    first = data[data[:, 0] == 0]
    per_query = first[:, 5].reshape(len(alphas), -1)
    monotone = float((per_query[1:] >= per_query[:-1] - TOL).double().mean())
    later = data[data[:, 0] == layers - 1][:, 5].reshape(len(alphas), -1)
    monotone_last = float((later[1:] >= later[:-1] - TOL).double().mean())
    return {"layers": layers, "batch": batch, "seq": seq, "n_blocks": n_blocks, "beta_anchor": beta_anchor,
            "alphas": alphas, "per_alpha": per_alpha, "recorder_pf_max_abs_gap": recorder_gap,
            "pf_monotone_in_alpha_fraction": monotone,
            "pf_monotone_in_alpha_fraction_last_layer": monotone_last,
            "pf_bound_holds": float((data[:, 5] >= data[:, 6] - TOL).double().mean()),
            "entropy_bound_holds": float((data[:, 7] <= data[:, 8] + TOL).double().mean()),
            "_points": data}


# ------------------------------------------------------------------------------------------- figures
def figures(ctrl: dict, dial: dict, directory: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    p = ctrl["_points"]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = p["d_tau"].numpy()
    # Universal form of the PF bound: (1 - PF) * A / (N - A) <= e^(-delta/tau).
    norm_leak = ((1 - p["pf"]) * p["a"] / (p["n"] - p["a"])).clamp_min(1e-14).numpy()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(x), size=min(len(x), 2500), replace=False)
    w = p["worst"].numpy()
    ax = axes[0]
    ax.scatter(x[pick], norm_leak[pick], s=3, alpha=0.3, color="tab:blue", label="random rows (measured)")
    ax.scatter(x[w], norm_leak[w], s=6, color="tab:red", label="ties (worst case)")
    grid = np.linspace(x.min(), x.max(), 200)
    ax.plot(grid, np.exp(-grid), color="k", lw=1.5, label=r"bound $e^{-\delta/\tau}$")
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 1e3)
    ax.set_xlabel(r"margin $\delta/\tau$")
    ax.set_ylabel(r"$(1-\mathrm{PF}_t)\cdot A/(N-A)$")
    ax.set_title("Controlled logits: leak vs margin")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    for n_keys, color in ((16, "tab:green"), (64, "tab:orange"), (256, "tab:purple")):
        sel = (p["n"] == n_keys) & (p["a"] == 1)
        sel_np = sel.numpy()
        idx = np.flatnonzero(sel_np)
        idx = rng.choice(idx, size=min(len(idx), 400), replace=False)
        ax.scatter(x[idx], p["ent"].numpy()[idx], s=3, alpha=0.3, color=color)
        from hf_localist import theory

        ax.plot(grid, theory.entropy_bound(1.0, grid, n_keys, 1), color=color, lw=1.5, label=f"bound, N={n_keys}, A=1")
    ax.set_xlabel(r"margin $\delta/\tau$")
    ax.set_ylabel(r"$H_t$ (nats)")
    ax.set_title("Controlled logits: entropy vs margin")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(C.save_figure(fig, directory, "concentration_controlled.png"))

    data = dial["_points"].numpy()
    layer, alpha, d_eff, n_vis, n_anc, pf, pf_b, ent, h_b = data.T
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    cmap = plt.get_cmap("viridis")
    alphas = dial["alphas"]
    pick = rng.choice(len(pf), size=min(len(pf), 1200), replace=False)
    colors = np.array([cmap(alphas.index(a) / max(len(alphas) - 1, 1)) for a in alpha[pick]])
    ax = axes[0]
    finite = np.isfinite(d_eff[pick])
    nl = np.clip((1 - pf[pick]) * n_anc[pick] / np.maximum(n_vis[pick] - n_anc[pick], 1), 1e-14, None)
    ax.scatter(d_eff[pick][finite], nl[finite], s=3, c=colors[finite])
    grid = np.linspace(np.nanmin(d_eff[np.isfinite(d_eff)]), np.nanmax(d_eff[np.isfinite(d_eff)]), 200)
    ax.plot(grid, np.exp(-grid), color="k", lw=1.5, label=r"bound $e^{-\delta/\tau}$")
    ax.set_yscale("log")
    ax.set_ylim(1e-9, 1e3)
    ax.set_xlabel(r"applied margin $\delta/\tau$ (dial included)")
    ax.set_ylabel(r"$(1-\mathrm{PF}_t)\cdot A/(N-A)$")
    ax.set_title("Tiny Llama: leak vs margin (colour = dial)")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    ax.scatter(pf_b[pick], pf[pick], s=3, c=colors)
    ax.plot([0, 1], [0, 1], color="k", lw=1)
    ax.set_xlabel("PF bound (per query, head)")
    ax.set_ylabel(r"measured PF$_t$")
    ax.set_title("PF: every point on or above y = x")
    ax = axes[2]
    rows = dial["per_alpha"]
    xa = np.arange(len(rows))
    ax.plot(xa, [r["pf_mean"] for r in rows], "o-", color="tab:blue", label="PF measured (mean)")
    ax.plot(xa, [r["pf_bound_mean"] for r in rows], "--", color="tab:blue", label="PF bound (mean)")
    ax.plot(xa, [r["block_mass_recorder_mean"] for r in rows], "s-", color="tab:gray", ms=3, label="BM (recorder)")
    ax2 = ax.twinx()
    ax2.plot(xa, [r["entropy_mean"] for r in rows], "o-", color="tab:red", label="H measured (mean)")
    ax2.plot(xa, [r["entropy_bound_mean"] for r in rows], "--", color="tab:red", label="H bound (mean)")
    ax2.set_ylabel("H_t (nats)", color="tab:red")
    ax.set_xticks(xa, [f"{r['alpha']:g}" for r in rows], fontsize=7)
    ax.set_xlabel(r"dial $\alpha$")
    ax.set_ylabel("PF / BM")
    ax.set_title(f"Across the dial (beta_anchor = {dial['beta_anchor']:g})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    paths.append(C.save_figure(fig, directory, "concentration_dial.png"))
    del torch
    return paths


# ------------------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    c, d = res["controlled"], res["tiny_llama"]
    lines = [
        "## Exponential concentration (`experiments/concentration.py`)",
        "",
        f"Command: `python experiments/concentration.py --write_docs` (seed {res['seed']}, 1 torch thread; "
        f"wall time {res['wall_s']:.0f} s, CPU time {res['cpu_s']:.0f} s, on a 2-core CPU shared with other jobs).",
        "",
        "**Question.** Do attention entropy `H_t` and pointer fidelity `PF_t` concentrate exponentially in the anchor "
        "margin `delta/tau`, as the bounds of docs/design.md section 5 say, and does the dial widen the margins?",
        "",
        "**Setup.** (1) *Controlled logits*: "
        f"{c['n_rows']} rows of logits with a constructed margin (`delta/tau` in [-4, 12], N in {{16, 64, 256}} keys, "
        "A in {1, 4} anchors, tau in {0.5, 1, 2}; random spread below the max / above the min, plus one worst-case "
        "row per setting in which all non-anchors tie at the max and all anchors at the min), measured with "
        "`hf_localist.theory`. (2) *Tiny Llama* (hidden 64, "
        f"{d['layers']} layers, 4 heads, random init with `initializer_range=0.2`, untrained), {d['batch']} random "
        f"sequences of {d['seq']} tokens, BOS in block 0 then runs of 4-12 tokens from {d['n_blocks']} recurring "
        "blocks (explicit block ids; the anchor of a run is its first position), anchor bonus "
        f"`beta_anchor = {d['beta_anchor']:g}`, dense backend. A probe in the localist attention records, per "
        "(query, head), the applied margin (logits / tau plus the dial's bias, sink excluded), the number of "
        "visible keys N and anchors A, and the PF and H of the softmax the layer computes. The probe's PF "
        f"agrees with `handle.record()` to {d['recorder_pf_max_abs_gap']:.1e}.",
        "",
        "**Controlled logits.**",
        "",
        "| check | value |",
        "| --- | ---: |",
        f"| `theory.margin` recovers the constructed `delta/tau` (max abs error) | {c['margin_max_abs_error']:.1e} |",
        f"| fraction of rows with `PF_t >= 1 - leak` | {c['pf_bound_holds']:.4f} |",
        f"| fraction of rows with `H_t <= entropy_bound` | {c['entropy_bound_holds']:.4f} |",
        f"| worst case (ties): max abs(PF - bound) | {c['pf_bound_gap_worst_case_max']:.1e} |",
        f"| worst case (ties), delta >= 0: max abs(H - bound) | {c['entropy_bound_gap_worst_case_max']:.1e} |",
        f"| random rows: mean slack PF - bound | {c['pf_gap_random_mean']:.3f} |",
        "",
        "| delta/tau | PF mean | PF bound mean | H mean | H bound mean |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in c["by_delta"]:
        if abs(row["delta_over_tau"] - round(row["delta_over_tau"] / 2) * 2) < 1e-9:
            lines.append(f"| {row['delta_over_tau']:g} | {row['pf_mean']:.4f} | {row['pf_bound_mean']:.4f} | "
                         f"{row['entropy_mean']:.3f} | {row['entropy_bound_mean']:.3f} |")
    lines += [
        "",
        "![controlled](figures/experiments/concentration_controlled.png)",
        "",
        "**Tiny Llama across the dial** (means over (query, head) pairs of both layers; the margin is the applied "
        "one, in units of tau).",
        "",
        "| dial α | pairs | margin p5 | margin median | PF | PF bound | H (nats) | H bound | BM | PF bound holds | "
        "H bound holds | library check (PF / H) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["per_alpha"]:
        lines.append(
            f"| {r['alpha']:g} | {r['n']} | {r['margin_p5']:.2f} | {r['margin_median']:.2f} | {r['pf_mean']:.3f} | "
            f"{r['pf_bound_mean']:.3f} | {r['entropy_mean']:.3f} | {r['entropy_bound_mean']:.3f} | "
            f"{r['block_mass_recorder_mean']:.3f} | {r['pf_bound_holds']:.4f} | {r['entropy_bound_holds']:.4f} | "
            f"{r['library_pf_bound_holds']:.4f} / {r['library_entropy_bound_holds']:.4f} |")
    lines += [
        "",
        "![dial](figures/experiments/concentration_dial.png)",
        "",
        "**Reading.**",
        "",
        f"- Both bounds hold for every row and every (query, head) pair measured: fraction "
        f"{c['pf_bound_holds']:.4f} / {c['entropy_bound_holds']:.4f} on controlled logits and "
        f"{d['pf_bound_holds']:.4f} / {d['entropy_bound_holds']:.4f} on the tiny Llama over all dial values "
        "(tolerance 1e-5 for float32 attention); the library's own check (`estimate_constants(...).bounds()`) agrees.",
        "- The PF bound is exact in the worst case: when every non-anchor ties at the maximum logit and every anchor "
        f"at the minimum, the measured PF equals the bound to {c['pf_bound_gap_worst_case_max']:.0e}. So it cannot "
        "be tightened without more information than the margin. The entropy bound is attained there too for "
        f"`delta >= 0` (to {c['entropy_bound_gap_worst_case_max']:.0e}).",
        "- Concentration is exponential: the normalised leak `(1 - PF) A/(N - A)` stays under `e^(-delta/tau)` and "
        "follows its slope where the non-anchors crowd near the max (left panels). With spread-out non-anchor "
        "logits the bound is loose by a wide margin (mean slack "
        f"{c['pf_gap_random_mean']:.2f} in PF): the margin sees only the single largest competitor.",
        "- Where the margin is negative the PF bound is nearly vacuous (close to 0), and the entropy bound is `ln N` "
        "(the clamp in `theory.entropy_bound`: the paper's formula is only valid for `delta >= 0`; without the clamp "
        "it can be violated for negative margins, which the unit tests show).",
        f"- The dial widens the margins as designed (here two terms: `-log(1 - α)` over other-block keys and the "
        f"anchor bonus `α·{d['beta_anchor']:g}` over everything else): the median applied margin rises from "
        f"{d['per_alpha'][0]['margin_median']:.2f} at α = 0 to {d['per_alpha'][-1]['margin_median']:.2f} at α = 1, "
        f"PF from {d['per_alpha'][0]['pf_mean']:.3f} to {d['per_alpha'][-1]['pf_mean']:.3f} and H falls from "
        f"{d['per_alpha'][0]['entropy_mean']:.3f} to {d['per_alpha'][-1]['entropy_mean']:.3f} nats. In layer 0, "
        f"whose input the dial does not change, PF never decreases with α for any (query, head) pair (fraction "
        f"{d['pf_monotone_in_alpha_fraction']:.4f}); in the last layer, whose input the dial does change, it rises "
        f"for {d['pf_monotone_in_alpha_fraction_last_layer']:.2f} of the pairs from one dial value to the next. "
        "At α = 1 the block mass is 1 by construction, but PF is not 1: own-block non-anchor keys and the general "
        "block keep an unbiased logit (only the anchor bonus `α·beta_anchor` separates them), so the margin stays "
        "finite.",
        "- What this does not show: the model is untrained and its logits are random, so this checks the bounds "
        "and the measurement plumbing, not that a trained model has large margins.",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = C.make_parser(NAME, "Exponential concentration of H_t and PF_t in delta/tau and the dial").parse_args(argv)
    C.setup(args)
    out = C.out_dir(args, NAME)
    import time

    cpu0 = time.process_time()
    with C.Timer() as timer:
        ctrl = controlled(args.quick, args.seed)
        dial = tiny_llama_dial(args.quick, args.seed)
        figs = figures(ctrl, dial, out)
    res = {"name": NAME, "quick": args.quick, "seed": args.seed, "wall_s": timer.seconds,
           "cpu_s": time.process_time() - cpu0, "environment": C.environment(),
           "controlled": {k: v for k, v in ctrl.items() if not k.startswith("_")},
           "tiny_llama": {k: v for k, v in dial.items() if not k.startswith("_")},
           "figures": [f.name for f in figs]}
    C.write_json(out / "results.json", res)
    if args.write_docs:
        C.publish(NAME, markdown(res), figs)
    print(f"{NAME}: PF bound holds {ctrl['pf_bound_holds']:.4f} (controlled) / {dial['pf_bound_holds']:.4f} (llama); "
          f"H bound holds {ctrl['entropy_bound_holds']:.4f} / {dial['entropy_bound_holds']:.4f}; "
          f"{timer.seconds:.1f} s -> {out}")
    return res


if __name__ == "__main__":
    main()
