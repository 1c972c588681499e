"""``report.md`` of ``hf-localist demo``: every number comes from the run's results dict (``results.json``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence


def _f(v: Any, fmt: str = ".1f") -> str:
    return "–" if v is None else format(v, fmt)


def _img(results: dict, key: str, alt: str) -> str:
    name = results.get("figures", {}).get(key)
    return f"![{alt}]({name})" if name else f"(figure `{key}` not written)"


# ---------------------------------------------------------------------------------------------- tables
def train_label(alpha: float) -> str:
    kind = "localist" if alpha >= 1.0 else ("distributed" if alpha == 0.0 else "partial")
    return f"α={alpha:g} ({kind})"


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the sweep: one row per (trained-at, dial) pair."""
    lines = ["| trained at | dial α | perplexity | × ppl at α=0 | H_t (nats) | PF_t | BM_t |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        base = run["sweep"][0]["perplexity"]
        for row in run["sweep"]:
            lines.append(
                f"| {train_label(run['train_alpha'])} | {row['alpha']:.2f} | {row['perplexity']:.1f} | "
                f"{row['perplexity'] / base:.3f} | {row['entropy']:.3f} | {row['pointer_fidelity']:.3f} | "
                f"{row['block_mass']:.3f} |")
    return "\n".join(lines)


def printed_tables(results: dict[str, Any], table: str, titles: Sequence[str]) -> str:
    """What ``hf-localist demo`` prints: the dial table, the recruited blocks, the routing table."""
    out = [table]
    if results.get("recruitment"):
        rec = results["recruitment"]
        out += [f"\nrecruitment: {rec['n_blocks']} block(s) from none ({rec['stop_reason']})",
                blocks_table(rec, titles)]
    if results.get("routing"):
        out += ["", routing_table(results["routing"])]
    return "\n".join(out)

def mass_table(mass: dict[str, Any], titles: Sequence[str]) -> str:
    """Diagonal (own-block mass) per topic and dial value."""
    lines = ["| dial α | " + " | ".join(f"{t} → {t}" for t in titles) + " | mean |",
             "| ---: | " + " | ".join("---:" for _ in titles) + " | ---: |"]
    for panel in mass["by_alpha"]:
        diag = [panel["matrix"][i][i] for i in range(len(titles))]
        lines.append(f"| {panel['alpha']:.2f} | " + " | ".join(f"{v:.3f}" for v in diag)
                     + f" | {sum(diag) / len(diag):.3f} |")
    return "\n".join(lines)


def timeline_table(rec: dict[str, Any]) -> str:
    lines = ["| step | pass | blocks before → after | accepted | rejected | confused tokens | k-means k (silhouette) "
             "| held-out NLL before → after (nats/token) | pass time (s) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in rec["timeline"]:
        k = f"{int(t['clusters'])} ({_f(t.get('silhouette'), '.2f')})" if "clusters" in t else "–"
        lines.append(f"| {t['step']} | {t['pass']} | {t['blocks_before']} → {t['blocks_after']} | {int(t['accepted'])} "
                     f"| {t['rejected']} | {int(t.get('confused_tokens', 0)):,} | {k} | "
                     f"{t['heldout_nll_before']:.4f} → {t['heldout_nll_after']:.4f} | {t['pass_time_s']:.0f} |")
    return "\n".join(lines)


def decisions_table(rec: dict[str, Any]) -> str:
    lines = ["| step | slot | cluster size | held-out tokens in block | dL_data | dL_model | dL_total | decision |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for d in rec["decisions"]:
        lines.append(f"| {d['step']} | {_f(d.get('slot'), 'd')} | {_f(d.get('cluster_size'), ',')} | "
                     f"{_f(d.get('heldout_tokens'), ',')} | {_f(d.get('dL_data'))} | {_f(d.get('dL_model'))} | "
                     f"{_f(d.get('dL_total'))} | {'**accepted**' if d.get('accepted') else d.get('reason')} |")
    return "\n".join(lines)


def blocks_table(rec: dict[str, Any], titles: Sequence[str]) -> str:
    """The recruited blocks (or, when none was accepted, the last pass's proposals) with top tokens and purity."""
    blocks = rec["blocks"] or rec.get("proposals") or []
    kind = "block" if rec["blocks"] else "proposal (rejected)"
    lines = ["| " + kind + " | held-out tokens (share) | majority topic | purity | topic make-up "
             "(" + " / ".join(titles) + ") | top tokens |",
             "| ---: | ---: | --- | ---: | --- | --- |"]
    for b in blocks:
        make_up = " / ".join(f"{c / max(b['tokens'], 1):.0%}" for c in b["topic_counts"])
        major = titles[b["majority_topic"]] if b["majority_topic"] is not None else "–"
        words = ", ".join(f"`{t['token']}`" for t in b["top_tokens"]) or "–"
        lines.append(f"| {b['slot']} | {b['tokens']:,} ({b['share_of_tokens']:.0%}) | {major} "
                     f"| {_f(b['purity'], '.2f')} | {make_up} | {words} |")
    if not blocks:
        lines.append("| – | – | – | – | – | no block was recruited and no cluster was proposed |")
    return "\n".join(lines)


def routing_table(route: dict[str, Any]) -> str:
    lines = [
        "| routing | held-out perplexity | × base | routing accuracy | mean π(true topic) | mean H_domain (nats) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = route["rows"][0]["perplexity"]
    for row in route["rows"]:
        acc = f"{row['routing_accuracy']:.1%}" if "routing_accuracy" in row else "–"
        lines.append(f"| {row['mode']} | {row['perplexity']:.1f} | {row['perplexity'] / base:.3f} | {acc} | "
                     f"{_f(row.get('mean_pi_true'), '.3f')} | {_f(row.get('mean_H_domain'), '.3f')} |")
    return "\n".join(lines)


def confusion_table(route: dict[str, Any], titles: Sequence[str]) -> str:
    lines = ["| true topic \\ routed to | " + " | ".join(titles) + " | articles |",
             "| --- | " + " | ".join("---:" for _ in titles) + " | ---: |"]
    for t, row in zip(titles, route["confusion"]):
        lines.append(f"| {t} | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sections
def _dial_section(results: dict, table: str, titles: Sequence[str], label: Callable) -> list[str]:
    s, d = results["settings"], results["data"]
    runs = "; ".join(f"{label(r['train_alpha'])}: {r['train_time_s']:.0f} s" for r in results["runs"])
    losses = "; ".join(f"{label(r['train_alpha'])}: {r['final_train_loss']:.2f}" for r in results["runs"])
    out = [
        "## 1. The dial",
        f"**Data.** {d['train_articles']} training and {d['test_articles']} held-out AG News articles (bundled, "
        "class-balanced; the 4 topics World, Sports, Business, Sci/Tech are the 4 blocks). Each sequence is `[BOS]` "
        "followed by 2-4 articles of different topics, each opened by its topic's anchor token (`<blk_world>`, "
        "`<blk_sports>`, `<blk_business>`, `<blk_scitech>`), so `block_assignment='segment'` finds the blocks from "
        f"the token ids. Word-level tokenizer of {d['vocab_size']:,} lower-cased words ({d['unk_rate']:.1%} of the "
        "held-out tokens are `[UNK]`).",
        f"**Model.** `LlamaForCausalLM` from a config: {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{s['num_heads']} heads, {results['model_parameters']:,} parameters. Two copies, same initial weights and "
        f"same batches, trained from scratch for {s['steps']} steps of {s['batch_size']} sequences, one with the "
        "dial at 1 (hard block mask on the `segment` backend: each article attends only to itself and `[BOS]`), "
        f"one at 0 (the plain model). Training time: {runs}. Final training loss (nats, mean of the last 10 "
        f"steps): {losses}.",
        f"**Evaluation.** {d['eval_sequences']} held-out multi-topic sequences ({d['eval_tokens']:,} scored tokens). "
        "The dial is swept at inference time on the trained weights, with no retraining. For scale: an add-one "
        f"unigram model of the training tokens has perplexity {results['unigram_perplexity']:.1f} on the same tokens.",
        table,
        "Columns:\n"
        "- **trained at**: the dial during training (`α=1`: localist, a hard block mask; `α=0`: the plain model).\n"
        "- **dial α**: the dial at evaluation, the same on every layer (uniform schedule). A query in block b gets "
        "`log(1 - α)` added to its attention logits on keys of the other blocks: α=0 is the unmodified model, α=1 a "
        "hard block mask.\n"
        "- **perplexity**: exp of the mean next-token negative log-likelihood (nats) over the held-out article "
        "tokens; anchor tokens and padding are not scored.\n"
        "- **× ppl at α=0**: perplexity divided by the same model's perplexity at dial 0.\n"
        "- **H_t**: attention entropy of a query in nats, with the attention sink (`[BOS]`) dropped and the rest "
        "renormalised; averaged over heads, layers and queries. Lower is more focused.\n"
        "- **PF_t** (pointer fidelity): the attention mass a query puts on its own block's anchor token (sink "
        "excluded).\n"
        "- **BM_t** (block mass): the attention mass a query puts on its own block (sink excluded). It is 1 at α=1 by "
        "construction; below 1 it shows how much the query reads from the other articles.",
        _img(results, "dial", "H_t, PF_t, BM_t and relative perplexity against the dial"),
        "The same sweep as a figure: entropy falls and block mass rises as the dial goes up, for both models; the "
        "right panel shows what it costs (or gains) in perplexity.",
    ]
    mass = results.get("attention_mass")
    if mass:
        out += [
            f"**Attention mass between blocks** ({mass['model']}, the plain model, dial turned up at inference). "
            "Row i, column j: the attention that queries of topic i put on the positions of topic j, sink excluded "
            "and renormalised, averaged over heads, layers and queries; each row sums to 1 and the diagonal is the "
            "topic's mean block mass BM_t. Off-diagonal mass is attention to the other articles of the sequence "
            "(only topics present in the same sequence can receive any).",
            _img(results, "attention_mass", "attention mass from each block's queries to each block"),
            mass_table(mass, titles),
        ]
    return out


def _purity_note(rec: dict) -> str:
    props = [b for rows in rec.get("proposals_by_pass", []) for b in rows if b["purity"] is not None]
    if not props:
        return ""
    mean = sum(b["purity"] for b in props) / len(props)
    text = f"The proposals' mean purity against the topic labels is {mean:.2f} (chance: about 0.25)"
    if rec["settings"]["freeze_qk"]:
        return text + (": the states at the input of the assigning layer of a content-blind model are mostly the "
                       "token's own embedding plus an average over everything before it, so the confused tokens "
                       "cluster by their role in the sentence (function words and punctuation against names and "
                       "content words), not by topic; the top tokens below show it. ")
    return text + (": a model this small carries little topic in its assigning layer, even as a running mean over "
                   "the text so far (docs/recruitment.md measures the ceiling with a pretrained model). ")


def _no_block_explanation(rec: dict) -> str:
    """Why nothing was accepted, in the run's own numbers."""
    scored = [d for d in rec["decisions"] if d.get("dL_total") is not None]
    text = f"**Result: no block was recruited** (stop: `{rec['stop_reason']}`). "
    if not scored:
        return text + "No cluster was large enough to be proposed and scored."
    best = min(scored, key=lambda d: d["dL_data"])
    text += (f"The largest gain of a single proposal was dL_data = {best['dL_data']:.1f} nats (step {best['step']}, "
             f"slot {best['slot']}), against a code length of {best['dL_model']:.1f} nats per block. ")
    joint = [t for t in rec["timeline"] if "nll_with" in t and "nll_without" in t]
    if joint:
        t = min(joint, key=lambda t: t["nll_with"] - t["nll_without"])
        cost = sum(d["dL_model"] for d in scored if d["step"] == t["step"])
        gain = t["nll_without"] - t["nll_with"]
        text += (f"Together, the {int(t['clusters'])} proposals of the pass at step {t['step']} changed the summed "
                 f"held-out NLL by {-gain:+.1f} nats (all proposals against none, same budget), against "
                 f"{cost:.1f} nats of code length for all of them. ")
    if any(d["reason"] == "not_confirmed" for d in scored):
        text += ("Algorithm 1 credits each block only with the change on the tokens it takes: the block whose "
                 "queries gain passed, the others (which make its restriction possible by taking the other tokens "
                 "out of block 0) did not pay for themselves. Re-trained alone (the confirm arm) the passing block "
                 "then failed: next to the general block a single block restricts nothing, since its queries still "
                 "see every block-0 token, so its gain exists only next to the blocks that were rejected. ")
    else:
        text += "No proposal lowered the NLL of its own tokens by more than its code length plus θ_block. "
    text += _purity_note(rec)
    return text


def _assignment_note(s: dict) -> str:
    """How tokens join blocks beyond the nearest centroid: context, continuity, the rest group."""
    parts = []
    if s.get("assign_horizon", 1.0) > 1:
        parts.append(f"the compared state is a causal running mean over about {s['assign_horizon']:g} positions "
                     "(`assign_horizon`), so a token joins a block by what the text so far is about")
    if s.get("assign_min_run", 1) > 1:
        parts.append(f"a token's block changes only after {s['assign_min_run']} positions in a row point to the same "
                     "new block (`assign_min_run`)")
    if not s.get("unassigned_visible", True):
        parts.append("the queries of a recruited block do not see block-0 tokens (`unassigned_visible=False`), so one "
                     "block is already a restriction")
    return ("Assignment from context: " + "; ".join(parts) + ". ") if parts else ""


def _recruit_section(rec: dict, titles: Sequence[str]) -> list[str]:
    s, r = rec["settings"], rec["recruitment_config"]
    layout = (f"interleaved like a news ticker: each article is cut into runs of {s['chunk_tokens']} words and the "
              "runs of the 2-4 articles are shuffled together (each article's runs stay in order)"
              if s["chunk_tokens"] else "one after the other")
    qk = ("**content-blind**: its Q and K projections are zero and frozen, so every query attends uniformly to "
          "everything before it and cannot focus on its own article by itself; a block (whose queries see only "
          "their block, block 0 and the sink) is the only way to focus" if s["freeze_qk"]
          else "trained normally (learnable Q and K)")
    out = [
        "## 2. Recruiting blocks from none",
        f"**Setup.** A second tiny Llama ({s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{rec['model_parameters']:,} parameters, {rec['trainable_parameters']:,} trainable) reads sequences of 2-4 "
        f"articles of different topics with **no anchor tokens**, {layout}. The model is {qk}. It runs with "
        f"`block_assignment='centroid'`, `active_blocks=[]`, `max_blocks={s['max_blocks']}`, the dial at "
        f"{s.get('alpha', 1.0):g} and "
        f"`first_local_layer={s['first_local_layer']}`: a token joins the block whose centroid is nearest (cosine ≥ "
        f"`assign_threshold={s['assign_threshold']}`) to its state at the input of layer {s['first_local_layer']}'s "
        "Q projection, else stays in the general block 0. " + _assignment_note(s) + "At step 0 there is no block. "
        "It trains for "
        f"{s['steps']} steps of {s['batch_size']} sequences; every {s['every']} steps a recruitment pass "
        "(`hf_localist.recruitment.recruit.run_pass`, Algorithm 1) runs: confused tokens (`H_t > ln max(|A|, 1) + ε`, "
        f"ε = {r['epsilon']}) are clustered (k-means on unit vectors, k ≤ {r['max_clusters']} by silhouette), "
        "each cluster of at least "
        f"{r['min_cluster_tokens']} tokens becomes a proposed block, the model is trained with and without the "
        f"proposals for the same budget ({r['budget_steps']} steps at lr {r['budget_lr']:g}, "
        f"{r['replay_fraction']:.0%} replay) and a block is accepted iff "
        f"`dL_total = dL_data + dL_model ≤ -θ_block` with θ_block = {r['theta_block']:g} nats. `dL_data` is the "
        "change of the summed held-out NLL on the tokens the block takes, `dL_model = k/2 ln n` the BIC code length "
        f"of its {s['hidden_size']} centroid coordinates (n = held-out tokens). Proposals are scored on "
        f"{rec['heldout_sequences']} held-out sequences ({rec['heldout_tokens']:,} tokens: the 100 test articles "
        f"and {s['heldout_train_fraction']:.0%} of the training articles, never trained on). Recruitment stops "
        f"after {r['patience']} pass(es) in a row that accept nothing, when no slot is free, or when training ends "
        f"(stop: `{rec['stop_reason']}`). Time: {rec['time_s']:.0f} s.",
        "**Timeline.** One row per pass; `confused tokens` counts the diagnostic tokens over the threshold.",
        timeline_table(rec),
        _img({"figures": rec.get("_figures", {})}, "recruitment", "recruitment timeline"),
        "**Every decision** (dL in nats; negative dL_data means the block lowered the held-out NLL):",
        decisions_table(rec),
    ]
    n = rec["n_blocks"]
    if n:
        out += [
            f"**Result: {n} block(s) recruited** (stop: `{rec['stop_reason']}`). Held-out NLL "
            f"{rec['heldout_nll']:.4f} nats/token with the blocks, {rec['heldout_nll_blocks_disabled']:.4f} with the "
            f"same weights and the blocks disabled. The blocks take {rec['coverage']:.0%} of the held-out tokens; the "
            "rest stay in block 0. Token-weighted purity over the blocks: "
            f"{_f(rec['weighted_purity'], '.2f')} (chance, always guessing one topic: about 0.25). An accepting "
            "pass keeps the weights of the arm that trained with the blocks, or the weights from before the pass if "
            "those score better with the blocks, and accepts nothing if both are worse than the model before the "
            "pass. " + _purity_note(rec),
        ]
    else:
        out.append(_no_block_explanation(rec))
    out += [
        "**Blocks.** For each block: the held-out article tokens it takes, its topic make-up and **purity** (the "
        "share of its tokens from its majority topic; 1 = a single topic), and its **top tokens**: words ranked by "
        "`p(w | block) · ln lift`, with `lift = p(w | block) / p(w)` (the word's share of the block's tokens over its "
        f"share of all held-out tokens; at least {s['min_token_count']} occurrences, lift > 1).",
        blocks_table(rec, titles),
        _img({"figures": rec.get("_figures", {})}, "blocks", "topic make-up of the blocks"),
    ]
    return out


def _route_section(route: dict, titles: Sequence[str]) -> list[str]:
    s, fit = route["settings"], route["router_fit"]
    acc = fit.get("train_accuracy", fit.get("accuracy"))
    return [
        "## 3. Routing between specialists",
        "**Setup.** The base is the plain model of part 1 (trained at dial 0, unpatched). Each topic gets a "
        f"specialist, a full fine-tune of the base for {s['specialist_steps']} steps of {s['batch_size']} "
        f"articles of that topic (lr {s['lr']:g}); a fifth fine-tune on all four topics with the same budget is the "
        "control (it separates specialisation from extra training and from the change of format: an input here is "
        "one article, `[BOS] article`, without an anchor). `LocalistRouterModel.from_specialists` puts a linear "
        "router on the base's mean-pooled last hidden states, fit with `fit_router` on the "
        f"{route['train_articles']} training articles' topic labels ({s['router_steps']} full-batch steps; "
        f"training accuracy {_f(acc, '.1%') if acc is not None else '–'}). Then each of the "
        f"{route['test_articles']} held-out articles is scored. Time: {route['time_s']:.0f} s.",
        routing_table(route),
        "- **hard**: the router's top specialist alone scores the article; **soft**: the mixture `Σ_m π_m p_m` of "
        "all four specialists' next-token distributions; **top-2**: the mixture over the two most probable, π "
        "renormalised; **oracle**: each article goes to its own topic's specialist (an upper bound for hard "
        "routing).\n"
        "- **perplexity** over every next token of the held-out articles; **× base**: relative to the base alone.\n"
        "- **routing accuracy**: share of articles whose most probable specialist is their topic's; **mean "
        "π(true topic)**: the router's probability of the right specialist; **H_domain** = `-Σ π_m ln π_m` (nats; "
        "ln 4 = 1.386 is a uniform router).",
        _reading(route),
        _img({"figures": route.get("_figures", {})}, "confusion", "routing confusion matrix"),
        "Rows: the true topic of the held-out article; columns: the specialist the router ranks first (the same in "
        "the hard, soft and top-2 rows); the diagonal is the routing accuracy.",
        confusion_table(route, titles),
    ]


def _reading(route: dict) -> str:
    ppl = {row["mode"]: row["perplexity"] for row in route["rows"]}
    base, oracle = ppl["base alone"], ppl["oracle (true topic)"]
    gap = base - oracle
    if gap <= 0:
        return (f"Reading: the specialists do not beat the base here (oracle {oracle:.1f} against {base:.1f}), so "
                "routing cannot gain anything.")
    parts = ", ".join(f"{name} {base - ppl[name]:.1f} ({(base - ppl[name]) / gap:.0%})"
                      for name in ("hard", "top-2", "soft", "all-topic fine-tune (control)"))
    return (f"Reading: the oracle is {gap:.1f} perplexity points below the base; of these, {parts}. The router "
            "reads only the mean-pooled last hidden states of a tiny base trained on 960 articles, which carry "
            "little topic information, so it is often unsure or wrong; mixing (soft, top-2) hedges against that.")


def report_markdown(results: dict[str, Any], table: str, titles: Sequence[str], label: Callable) -> str:
    m, t = results["machine"], results.get("part_times_s", {})
    mode = "quick" if results["quick"] else "full"
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
    paragraphs = [
        "# hf_localist demo: the dial, block recruitment and routing on a tiny Llama",
        f"Command: `{results['command']}` ({mode} mode, seed {results['seed']}). Wall time "
        f"{results['wall_time_s']:.0f} s ({parts}) with {m['cpu_threads']} torch CPU thread(s) on a machine with "
        f"{m['cpu_count']} CPU cores; torch {m['torch']}, transformers {m['transformers']}. Three parts: (1) the "
        "locality dial on models trained with topic anchor blocks, (2) blocks recruited from none on articles "
        "without anchors, (3) a router over per-topic specialists.",
    ]
    paragraphs += _dial_section(results, table, titles, label)
    figs = results.get("figures", {})
    if results.get("recruitment"):
        paragraphs += _recruit_section({**results["recruitment"], "_figures": figs}, titles)
    if results.get("routing"):
        paragraphs += _route_section({**results["routing"], "_figures": figs}, titles)
    paragraphs.append("All numbers, the settings and the training losses are in `results.json` next to this file. "
                      "Per-layer dial diagnostics come from `handle.record()` (`DiagnosticsRecorder.summary()`).")
    return "\n\n".join(paragraphs) + "\n"
