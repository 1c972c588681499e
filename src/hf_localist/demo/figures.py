"""The figures of ``hf-localist demo`` (matplotlib, Agg backend): PNG files next to ``report.md``.

Each function takes plain numbers from ``results.json`` and writes one file; none computes anything new.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

FIGURES = {
    "attention_mass": "attention_mass.png",
    "dial": "dial_entropy_fidelity.png",
    "recruitment": "recruitment_timeline.png",
    "blocks": "recruited_blocks.png",
    "confusion": "routing_confusion.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _heat(ax, matrix, rows: Sequence[str], cols: Sequence[str], fmt: str, vmax: float | None = None, cmap="Blues"):
    im = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    top = vmax if vmax is not None else max(max(r) for r in matrix) or 1.0
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * top else "black")
    return im


def attention_mass_figure(mass: dict[str, Any], titles: Sequence[str], path: str) -> str:
    """One heatmap per dial value: mean attention mass from each topic block's queries to each block."""
    plt = _plt()
    panels = mass["by_alpha"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _heat(ax, panel["matrix"], titles, titles, ".2f", vmax=1.0)
        ax.set_title(f"dial α = {panel['alpha']:g}", fontsize=9)
        ax.set_xlabel("key block", fontsize=8)
    axes[0][0].set_ylabel("query block", fontsize=8)
    fig.suptitle(f"Attention mass by block ({mass['model']}; sink excluded, rows sum to 1)", fontsize=9)
    return _save(fig, path)


def dial_figure(runs: Sequence[dict[str, Any]], label, path: str) -> str:
    """H_t, PF_t and BM_t against the dial, one line per trained model; perplexity ratio in a third panel."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for run in runs:
        xs = [r["alpha"] for r in run["sweep"]]
        name = label(run["train_alpha"])
        axes[0].plot(xs, [r["entropy"] for r in run["sweep"]], marker="o", label=name)
        axes[1].plot(xs, [r["pointer_fidelity"] for r in run["sweep"]], marker="o", label=f"PF_t, {name}")
        axes[1].plot(xs, [r["block_mass"] for r in run["sweep"]], marker="s", ls="--", label=f"BM_t, {name}")
        base = run["sweep"][0]["perplexity"]
        axes[2].plot(xs, [r["perplexity"] / base for r in run["sweep"]], marker="o", label=name)
    axes[0].set_title("attention entropy H_t (nats)", fontsize=9)
    axes[1].set_title("pointer fidelity PF_t and block mass BM_t", fontsize=9)
    axes[2].set_title("perplexity / perplexity at α=0", fontsize=9)
    for ax in axes:
        ax.set_xlabel("dial α")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def recruitment_figure(rec: dict[str, Any], path: str) -> str:
    """Active blocks against the training step, and every proposal's dL_total against -theta_block."""
    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [0] + [t["step"] for t in rec["timeline"]]
    counts = [0] + [t["blocks_after"] for t in rec["timeline"]]
    last = len(rec["train_losses"])
    ax0.step(steps + [last], counts + counts[-1:], where="post", color="tab:blue")
    ax0.set_xlabel("training step")
    ax0.set_ylabel("active blocks", color="tab:blue")
    ax0.set_ylim(-0.2, max(counts + [1]) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax0.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax0.set_xlim(0, max(last, 1))
    if rec["timeline"]:
        twin = ax0.twinx()
        xs = [t["step"] for t in rec["timeline"]]
        twin.plot(xs, [t["heldout_nll_before"] for t in rec["timeline"]], marker="o", color="tab:orange",
                  label="held-out NLL before the pass")
        twin.plot(xs, [t["heldout_nll_after"] for t in rec["timeline"]], marker="s", ls="--", color="tab:red",
                  label="after the pass")
        twin.legend(fontsize=7, loc="upper right")
        twin.set_ylabel("held-out NLL (nats/token)", color="tab:orange")
    ax0.set_title("blocks recruited while training", fontsize=9)
    props = [d for d in rec["decisions"] if d.get("dL_total") is not None]
    for ok, colour, name in ((True, "tab:green", "accepted"), (False, "tab:red", "rejected")):
        pts = [d for d in props if bool(d["accepted"]) == ok]
        ax1.scatter([d["step"] for d in pts], [d["dL_total"] for d in pts], color=colour, label=name, s=22)
    joint = [(t["step"], t["nll_with"] - t["nll_without"]
              + sum(d["dL_model"] for d in props if d["step"] == t["step"]))
             for t in rec["timeline"] if "nll_with" in t and "nll_without" in t]
    if joint:
        ax1.scatter([j[0] for j in joint], [j[1] for j in joint], marker="x", color="k", s=40,
                    label="all proposals together")
    ax1.axhline(-rec["recruitment_config"]["theta_block"], color="k", ls="--", lw=1, label="-θ_block")
    ax1.axhline(0.0, color="grey", lw=0.5)
    ax1.set_xlabel("training step (pass)")
    ax1.set_ylabel("dL_total = dL_data + dL_model (nats)")
    ax1.set_title("proposals: accepted iff dL_total ≤ -θ_block", fontsize=9)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    return _save(fig, path)


def blocks_figure(rec: dict[str, Any], titles: Sequence[str], path: str) -> str:
    """Topic make-up of the held-out tokens each recruited (or, if none, proposed) block takes."""
    plt = _plt()
    blocks = rec["blocks"] or rec.get("proposals", [])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(blocks) + 2), 3.2))
    names = [f"{'block' if rec['blocks'] else 'proposal'} {b['slot']}" for b in blocks]
    bottom = [0.0] * len(blocks)
    for j, title in enumerate(titles):
        share = [b["topic_counts"][j] / max(b["tokens"], 1) for b in blocks]
        ax.bar(names, share, bottom=bottom, label=title)
        bottom = [a + b for a, b in zip(bottom, share)]
    ax.set_ylabel("share of the block's held-out tokens")
    ax.set_ylim(0, 1.0)
    ax.set_title("topic make-up of the recruited blocks" if rec["blocks"] else "topic make-up of the proposals",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def confusion_figure(route: dict[str, Any], titles: Sequence[str], path: str) -> str:
    """Held-out articles by true topic (rows) and the specialist the router picks (columns)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    _heat(ax, route["confusion"], titles, titles, "d")
    ax.set_xlabel("routed to specialist")
    ax.set_ylabel("true topic")
    ax.set_title(f"routing confusion (accuracy {route['routing_accuracy']:.0%})", fontsize=9)
    return _save(fig, path)


def write_figures(results: dict[str, Any], output_dir: str, titles: Sequence[str], label) -> dict[str, str]:
    """Every figure the results allow; returns {key: file name}."""
    out = {}
    out["attention_mass"] = attention_mass_figure(results["attention_mass"], titles,
                                                  os.path.join(output_dir, FIGURES["attention_mass"]))
    out["dial"] = dial_figure(results["runs"], label, os.path.join(output_dir, FIGURES["dial"]))
    rec = results.get("recruitment")
    if rec is not None:
        out["recruitment"] = recruitment_figure(rec, os.path.join(output_dir, FIGURES["recruitment"]))
        if rec["blocks"] or rec.get("proposals"):
            out["blocks"] = blocks_figure(rec, titles, os.path.join(output_dir, FIGURES["blocks"]))
    route = results.get("routing")
    if route is not None and route.get("confusion"):
        out["confusion"] = confusion_figure(route, titles, os.path.join(output_dir, FIGURES["confusion"]))
    return {k: os.path.basename(v) for k, v in out.items()}
