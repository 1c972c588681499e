"""``report.md`` and the figure of the pretrained-model demo (:mod:`hf_localist.demo.pretrained`)."""

from __future__ import annotations

import os
from typing import Any

FIGURE = "dial_pretrained.png"


def _dial_table(rows: list[dict], alone: dict[str, float], labels: list[str]) -> str:
    head = "| position policy | dial α | " + " | ".join(labels) + " | all |"
    sep = "| --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |"
    lines = [head, sep]
    for r in rows:
        ppl = r["perplexity"]
        lines.append(f"| {r['policy']} | {r['alpha']:g} | " + " | ".join(f"{ppl.get(k, float('nan')):.2f}"
                                                                     for k in labels) + f" | {ppl['all']:.2f} |")
    lines.append("| each passage alone (reference) | – | " + " | ".join(f"{alone.get(k, float('nan')):.2f}"
                                                                        for k in labels) + f" | {alone['all']:.2f} |")
    return "\n".join(lines)


def _best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["perplexity"]["all"])


def pretrained_report(results: dict[str, Any]) -> str:
    d, r, data = results["dial"], results["routing"], results["data"]
    labels = data["labels"]
    s = results["settings"]
    out = [
        "# hf-localist demo on a pretrained model", "",
        f"Command: `{results['command']}`", "",
        f"Model: `{results['model']['path']}` ({results['model']['model_type']}, "
        f"{results['model']['parameters'] / 1e6:.1f} M parameters). Data: `{data['source']}`, labels {labels} "
        f"(the labels are the blocks: label k is block k + 1). Wall time {results['wall_time_s']:.0f} s on "
        f"{results['machine']['cpu_threads']} thread(s).", "",
        "## 1. The dial", "",
        f"{data['eval_sequences']} held-out sequences of the sink (token id {data['sink_token_id']}) and "
        f"{s['passages']} passages of distinct labels (at most {s['passage_tokens']} tokens each), one block per "
        "passage (`block_assignment='explicit'`). Perplexity per label over each passage's tokens except its first "
        f"(predicted from the previous block), schedule `{s['schedule']}`. *continuous*: the tokens keep their "
        "positions in the long sequence; *restart*: each block is positioned as if read alone after the sink "
        "(`block_positions='restart'`; at dial 1 a block then equals the block read alone). Reference: each "
        "passage read alone after the sink by the unmodified model.", "",
        "### The pretrained model, no training", "",
        _dial_table(d["before_lora"], d["alone"], labels), "",
        f"### After a LoRA fine-tune at dial 1, restart ({d['lora']['steps']} steps, "
        f"{d['lora']['trainable_parameters']:,} trainable parameters; training loss {d['lora']['first_loss']:.3f} "
        f"-> {d['lora']['last_loss']:.3f})", "",
        _dial_table(d["after_lora"], d["alone"], labels), "",
    ]
    b, a = _best(d["before_lora"]), _best(d["after_lora"])
    out += [f"Best setting without training: {b['policy']} at dial {b['alpha']:g} (perplexity "
            f"{b['perplexity']['all']:.2f}; alone {d['alone']['all']:.2f}); after the LoRA fine-tune: {a['policy']} at "
            f"dial {a['alpha']:g} ({a['perplexity']['all']:.2f}).", "", f"![dial]({FIGURE})", ""]
    conf = r["confidence"]
    out += [
        "## 2. Routing between LoRA specialists", "",
        f"One {r['specialist_kind']} per label, behind a `LocalistRouterModel` on the base's pooled last hidden "
        f"states. {r['fit_texts']} texts fit the router, {r['calibration_texts']} calibrate the confidence "
        f"threshold, {r['test_texts']} held-out texts are scored.", "",
        "| router | held-out routing accuracy |", "| --- | ---: |",
        f"| fitted (`fit_router`) | {r['routing_accuracy']:.3f} |",
        f"| prototype, training-free (`init_router_from_prompts`, {r['prototype_prompts_per_label']} prompts per "
        f"label) | {r['prototype_routing_accuracy']:.3f} |", "",
        f"Calibrated threshold (`calibrate_confidence`, target accuracy {conf['target_accuracy']:g}): "
        f"{conf['threshold']:.3f}; on the held-out texts {100 * conf['test_coverage']:.1f}% are routed to a "
        f"specialist, with accuracy {conf['test_routed_accuracy']:.3f}; the rest run on the base.", "",
        "| mode | held-out perplexity |", "| --- | ---: |",
        *[f"| {row['mode']} | {row['perplexity']:.2f} |" for row in r["rows"]], "",
        "Confusion of the fitted router (rows: true label, columns: chosen):", "",
        "| | " + " | ".join(r["labels"]) + " |", "| --- | " + " | ".join("---:" for _ in r["labels"]) + " |",
        *[f"| {lab} | " + " | ".join(str(v) for v in row) + " |" for lab, row in zip(r["labels"], r["confusion"])],
        "", "Part times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["part_times_s"].items()), "",
    ]
    return "\n".join(out)


def write_pretrained_figure(results: dict[str, Any], output_dir: str) -> str:
    """Perplexity (all labels) against the dial, per position policy, before and after LoRA; the alone line."""
    import matplotlib  # optional at import time: the core package does not load matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    d = results["dial"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("before_lora", "-"), ("after_lora", "--")):
        for policy, color in (("continuous", "tab:blue"), ("restart", "tab:orange")):
            rows = [r for r in d[key] if r["policy"] == policy]
            ax.plot([r["alpha"] for r in rows], [r["perplexity"]["all"] for r in rows], style, color=color,
                    marker="o", label=f"{policy}, {'pretrained' if key == 'before_lora' else 'after LoRA'}")
    ax.axhline(d["alone"]["all"], color="gray", linestyle=":", label="each passage alone")
    ax.set_xlabel("dial α")
    ax.set_ylabel("perplexity (all blocks)")
    ax.set_title(f"{results['model']['model_type']}: the dial on multi-passage input")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(output_dir, FIGURE)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return FIGURE
