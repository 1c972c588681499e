"""Routing fidelity: hard vs soft vs top-2 routing over localist topic specialists on AG News.

    python experiments/routing_fidelity.py --data_dir DATA --write_docs   # full size, a few minutes on one thread
    python experiments/routing_fidelity.py --quick                        # smoke test (bundled data only)

The pieces of examples/router_agnews.py (docs/router.md): a word-level tokenizer and a tiny Llama base trained on
the 960 bundled AG News training articles of all four topics, one specialist per topic fine-tuned from the base on
that topic's articles, and a ``LocalistRouterModel`` whose linear router is fit on the training labels. Here every
specialist is *localist*: before its fine-tune it gets ``n_blocks`` centroid blocks (k-means of its topic's hidden
states at the input of layer 1, ``block_assignment='centroid'``, ``alpha=1`` on layer 1) and it is fine-tuned under
that mask, so each specialist has its own block partition of the text.

Measured on held-out articles (the bundled 100 test articles, plus up to 300 of the official AG News test split from
``ag_news/test.csv`` in ``--data_dir``, the shared data folder, or from ``--test_csv``; neither given: the bundled
test split only):

* perplexity of the base alone and of hard, soft, top-2 and oracle (true-topic) routing, overall and per topic;
  the headline rows run through ``LocalistRouterModel.forward``; the sweeps reuse each specialist's per-token
  probabilities of the targets (a mixture's NLL needs only those), checked against the forward;
* routing accuracy (the router's argmax against the topic), the confusion matrix, H_domain of right and wrong
  routes, and a sweep of the router temperature (``router_probs = softmax(router_logits / T)``);
* locality inside the specialists, recorded with ``handle.record()``: attention entropy H_t, pointer fidelity PF_t,
  block mass BM_t at the localised layer, and block coverage (share of tokens in a non-general block), for each
  (article topic, specialist) pair; per routing mode, the routing-weighted locality of the specialists that produce
  the prediction, and the weight of the single largest contributor ("attribution": 1 under hard routing).
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "routing_fidelity"
OFFICIAL_TEST = "ag_news/test.csv"  # inside --data_dir
MODE_NAMES = ("base alone", "hard", "soft", "top-2", "oracle")
LOCALITY = ("entropy", "pointer_fidelity", "block_mass", "coverage")


def _example():
    """examples/router_agnews.py as a module (its data, training and evaluation helpers are reused)."""
    path = _common.REPO / "examples" / "router_agnews.py"
    spec = importlib.util.spec_from_file_location("_routing_fidelity_router_agnews", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def official_test_csv(args) -> tuple[str | None, str | None]:
    """The official AG News test.csv to read (``--test_csv``, else ``ag_news/test.csv`` in ``--data_dir``) and the
    option it came from; ``(None, None)`` when neither is given. A given file that is missing is an error."""
    from hf_localist import LocalistLoadError

    if args.test_csv:
        path, option = args.test_csv, "--test_csv"
    elif args.data_dir:
        path, option = os.path.join(args.data_dir, OFFICIAL_TEST), "--data_dir"
    else:
        return None, None
    if not os.path.isfile(path):
        wanted = "an AG News test.csv" if option == "--test_csv" else f"the shared data folder holding {OFFICIAL_TEST}"
        raise LocalistLoadError(f"{option} {getattr(args, option[2:])}: {path} does not exist; pass {wanted} (or "
                                "leave --data_dir and --test_csv out for the bundled test split only)")
    return path, option


def official_test_articles(path: str, per_topic: int, seed: int):
    """``per_topic`` articles per topic from the official AG News test split (labels 1-4 -> topics 0-3)."""
    import csv

    from hf_localist.demo.run import Article, clean_text

    rows = [[] for _ in range(4)]
    with open(path, newline="", encoding="utf-8") as fh:
        for label, title, desc in csv.reader(fh):
            rows[int(label) - 1].append(Article(int(label) - 1, clean_text(f"{title} {desc}")))
    rng = random.Random(seed)
    return [a for pool in rows for a in rng.sample(pool, per_topic)]


# ---------------------------------------------------------------------------------------------- localist specialists
def layer_inputs(model, seqs, pad_id, layer: int, batch_size: int = 32):
    """Hidden states at the input of ``layer``'s Q projection for every real token of ``seqs`` (N, E)."""
    import torch

    got = []
    q_proj = model.model.layers[layer].self_attn.q_proj
    hook = q_proj.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    from hf_localist.demo.run import pad_batch

    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                ids, mask = pad_batch(seqs[i: i + batch_size], pad_id)
                got.clear()
                model(input_ids=ids, attention_mask=mask)
                out.append(got[0][mask.bool()])
    finally:
        hook.remove()
    return torch.cat(out)


def kmeans_centroids(x, n_blocks: int, seed: int, max_points: int = 6000):
    """k-means on L2-normalised states (the cosine geometry of centroid assignment): (n_blocks, E)."""
    import numpy as np
    import torch
    from sklearn.cluster import KMeans

    x = torch.nn.functional.normalize(x.float(), dim=-1)
    if len(x) > max_points:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_points]]
    km = KMeans(n_clusters=n_blocks, n_init=3, random_state=seed).fit(x.numpy().astype(np.float64))
    return torch.nn.functional.normalize(torch.tensor(km.cluster_centers_, dtype=torch.float32), dim=-1)


def coverage_threshold(x, centroids, coverage: float) -> float:
    """The assign_threshold under which a share ``coverage`` of the states ``x`` joins a block."""
    import torch

    sims = (torch.nn.functional.normalize(x.float(), dim=-1) @ centroids.T).max(-1).values
    return float(torch.quantile(sims, 1.0 - coverage))


def make_localist(model, centroids, threshold: float, s):
    """apply_localist with one centroid block per row of ``centroids`` (alpha on layers >= first_local_layer)."""
    import hf_localist as hl

    cfg = hl.LocalistConfig(alpha=s.alpha, first_local_layer=s.first_local_layer, block_assignment="centroid",
                            max_blocks=len(centroids), assign_threshold=threshold, active_blocks=[])
    handle = hl.apply_localist(model, cfg)
    for slot, c in enumerate(centroids, start=1):
        handle.activate_block(slot, centroid=c, info={"source": "k-means of the topic's layer-input states"})
    return handle


def record_specialist(handle, seqs, pad_id, layer: int, batch_size: int = 32):
    """Per input: target log-probs (list of 1-D tensors), and mean H_t, PF_t, BM_t, coverage over its queries."""
    import torch

    from hf_localist.demo.run import pad_batch

    logps, stats = [], {m: [] for m in LOCALITY}
    with torch.no_grad(), handle.record() as rec, handle.capture_layouts() as calls:
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[i: i + batch_size], pad_id)
            logits = handle.model(input_ids=ids, attention_mask=mask).logits.float()
            blocks = calls[-1].block_ids.clone()
            lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for r in range(ids.shape[0]):
                n = int(mask[r].sum())
                logps.append(lp[r, : n - 1].clone())
                stats["coverage"].append(float((blocks[r, 1:n] >= 1).float().mean()) if n > 1 else float("nan"))
            for metric in ("entropy", "pointer_fidelity", "block_mass"):
                v = rec.per_query(layer, metric)  # (B, T), NaN where undefined
                for r in range(ids.shape[0]):
                    row = v[r][~torch.isnan(v[r])]
                    stats[metric].append(float(row.mean()) if row.numel() else float("nan"))
            rec.clear()
    return logps, stats


# ---------------------------------------------------------------------------------------------- mixtures
def mixture_nll(logps, weights, rows=None):
    """Summed NLL and token count of the mixture with per-input weights (N, M) over specialists' target log-probs.

    logps[m][i] is specialist m's log-probability of each target token of input i."""
    import torch

    nll, count = 0.0, 0
    for i in rows if rows is not None else range(len(logps[0])):
        w = weights[i]
        terms = [torch.log(w[m]) + logps[m][i] for m in range(len(logps)) if w[m] > 0]
        mix = torch.logsumexp(torch.stack(terms), dim=0)
        nll -= float(mix.sum())
        count += mix.numel()
    return nll, count


def mode_weights(mode: str, probs, labels):
    """(N, M) weights of each specialist in the prediction under ``mode``."""
    import torch

    n, m = probs.shape
    if mode == "hard":
        return torch.nn.functional.one_hot(probs.argmax(-1), m).float()
    if mode == "oracle":
        return torch.nn.functional.one_hot(torch.tensor(labels), m).float()
    if mode == "soft":
        return probs.clone()
    if mode == "top-2":
        top = probs.topk(2, dim=-1)
        w = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        return w / w.sum(-1, keepdim=True)
    raise ValueError(mode)


def _nanmean(values):
    v = [x for x in values if not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else float("nan")


# ---------------------------------------------------------------------------------------------- main
FULL = dict(base_steps=250, specialist_steps=60, batch_size=16, base_lr=3e-3, specialist_lr=3e-4, hidden_size=128,
            intermediate_size=512, num_layers=2, num_heads=4, max_article_tokens=64, train_articles=None,
            official_test_per_topic=75, n_blocks=4, alpha=1.0, first_local_layer=1, target_coverage=0.5,
            temperatures=[0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0])
QUICK = dict(FULL, base_steps=30, specialist_steps=10, hidden_size=64, intermediate_size=128, train_articles=320,
             official_test_per_topic=0, n_blocks=3, temperatures=[0.25, 1.0, 4.0])


def main(argv=None) -> dict:
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help=f"the shared data folder: extra held-out articles from its "
                        f"{OFFICIAL_TEST} (default: the bundled test split only)")
    parser.add_argument("--test_csv", default=None, help="an official AG News test.csv for the extra held-out "
                        f"articles (overrides --data_dir's {OFFICIAL_TEST})")
    args = parser.parse_args(argv)
    _common.setup(args)
    test_csv, test_option = official_test_csv(args)
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from hf_localist import LocalistRouterModel
    from hf_localist.demo.run import TOPIC_TITLES, TOPICS, build_model, build_tokenizer, load_articles, pad_batch

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    ex = _example()
    s = SimpleNamespace(**(QUICK if args.quick else FULL))
    directory = _common.out_dir(args, NAME)
    models_dir = directory / "models"
    wall = time.perf_counter()

    # 1. data and base (as examples/router_agnews.py) --------------------------------------------------------
    train_articles = ex._subset(load_articles("train"), s.train_articles, args.seed)
    test_articles = load_articles("test")
    test_sources = {"bundled test split": len(test_articles)}
    if s.official_test_per_topic and test_csv:
        extra = official_test_articles(test_csv, s.official_test_per_topic, args.seed)
        test_articles = test_articles + extra
        test_sources["official AG News test split (sampled)"] = len(extra)
    tokenizer = build_tokenizer([a.text for a in load_articles("train")])
    pad_id, bos_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    train_enc = ex._encode(tokenizer, train_articles, s.max_article_tokens)
    test_enc = ex._encode(tokenizer, test_articles, s.max_article_tokens)
    seqs = [x for x, _ in test_enc]
    labels = [TOPICS.index(t) for _, t in test_enc]
    unk = sum(t == tokenizer.unk_token_id for x in seqs for t in x[1:]) / sum(len(x) - 1 for x in seqs)
    print(f"{len(train_enc)} training / {len(test_enc)} held-out articles ({test_sources}), UNK share {unk:.1%}",
          flush=True)
    shape = SimpleNamespace(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                            num_layers=s.num_layers, num_heads=s.num_heads, max_article_tokens=s.max_article_tokens)
    base = build_model(len(tokenizer), shape, bos_id, pad_id, args.seed)
    base.generation_config.pad_token_id = pad_id
    ex._train(base, [x for x, _ in train_enc], s.base_steps, s.base_lr, s.batch_size, pad_id, args.seed, "base")
    base.save_pretrained(models_dir / "base")
    tokenizer.save_pretrained(models_dir / "base")

    # 2. localist specialists ------------------------------------------------------------------------------
    paths, centroids, thresholds, trained_logits = {}, {}, {}, {}
    probe_ids, probe_mask = pad_batch(seqs[:4], pad_id)
    for t, topic in enumerate(TOPICS):
        model = AutoModelForCausalLM.from_pretrained(models_dir / "base")
        topic_seqs = [x for x, label in train_enc if label == topic]
        states = layer_inputs(model, topic_seqs, pad_id, s.first_local_layer)
        centroids[topic] = kmeans_centroids(states, s.n_blocks, args.seed + t)
        thresholds[topic] = coverage_threshold(states, centroids[topic], s.target_coverage)
        make_localist(model, centroids[topic], thresholds[topic], s)
        ex._train(model, topic_seqs, s.specialist_steps, s.specialist_lr, s.batch_size, pad_id, args.seed + 10 + t,
                  f"localist specialist {topic}")
        with torch.no_grad():
            trained_logits[topic] = model(input_ids=probe_ids, attention_mask=probe_mask).logits
        paths[topic] = str(models_dir / topic)  # saved localist: config, centroids and threshold go with the weights
        model.save_pretrained(paths[topic])

    # 3. router; it loads the specialists localist (AutoLocalistModel): their blocks come back ------------------
    router = LocalistRouterModel.from_specialists(str(models_dir / "base"), paths, routing="hard", tokenizer=tokenizer,
                                                  routing_k=2, max_loaded_specialists=len(TOPICS))
    fit = router.fit_router([(a.text, TOPICS[a.topic]) for a in train_articles])
    handles = {}
    for topic in TOPICS:
        handles[topic] = router.get_specialist(topic).localist_handle
        with torch.no_grad():
            again = router.get_specialist(topic)(input_ids=probe_ids, attention_mask=probe_mask).logits
        torch.testing.assert_close(again, trained_logits[topic], rtol=1e-4, atol=1e-4)

    # 4. per specialist: target log-probs and locality on every held-out article -------------------------------
    logps, loc = [], {}
    for topic in TOPICS:
        lp, stats = record_specialist(handles[topic], seqs, pad_id, s.first_local_layer)
        logps.append(lp)
        loc[topic] = stats
    with torch.no_grad(), router.base_only() as base_model:
        base_model = base_model if base_model is not None else router.base_model_loaded
        base_lp = []
        for i in range(0, len(seqs), 32):
            ids, mask = pad_batch(seqs[i: i + 32], pad_id)
            lg = base_model(input_ids=ids, attention_mask=mask).logits.float()
            lp = lg[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            base_lp += [lp[r, : int(mask[r].sum()) - 1] for r in range(ids.shape[0])]
        router_logits = []
        for i in range(0, len(seqs), 32):
            router_logits.append(router.route(*pad_batch(seqs[i: i + 32], pad_id)).router_logits.float())
    router_logits = torch.cat(router_logits)
    probs = router_logits.softmax(-1)
    h_domain = torch.special.entr(probs).sum(-1)
    argmax = probs.argmax(-1)
    correct = (argmax == torch.tensor(labels))

    # 5. headline rows through LocalistRouterModel.forward, checked against the per-token mixture ---------------
    rows = []
    forward_ppl = {}
    for mode, kw in (("hard", {"routing": "hard"}), ("soft", {"routing": "soft"}),
                     ("top-2", {"routing": "top_k", "routing_k": 2}), ("oracle", None)):
        nll, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(seqs), 16):
                ids, mask = pad_batch(seqs[i: i + 16], pad_id)
                if kw is None:
                    out = router(ids, attention_mask=mask, route_to=labels[i: i + 16])
                else:
                    out = router(ids, attention_mask=mask, **kw)
                tok = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                        reduction="none")
                keep = mask[:, 1:].bool()
                nll += float(tok[keep].sum())
                count += int(keep.sum())
        forward_ppl[mode] = math.exp(nll / count)
    weights = {mode: mode_weights(mode, probs, labels) for mode in ("hard", "soft", "top-2", "oracle")}
    n_tok = sum(len(x) for x in base_lp)
    base_nll = -float(sum(x.sum() for x in base_lp))
    by_topic = lambda t: [i for i, y in enumerate(labels) if y == t]  # noqa: E731
    for mode in MODE_NAMES:
        if mode == "base alone":
            ppl = math.exp(base_nll / n_tok)
            per_topic = {TOPICS[t]: math.exp(-float(sum(base_lp[i].sum() for i in by_topic(t)))
                                             / sum(len(base_lp[i]) for i in by_topic(t))) for t in range(len(TOPICS))}
            rows.append({"mode": mode, "perplexity": ppl, "per_topic_perplexity": per_topic})
            continue
        w = weights[mode]
        nll, count = mixture_nll(logps, w)
        ppl = math.exp(nll / count)
        if abs(ppl - forward_ppl[mode]) > 1e-3 * forward_ppl[mode]:
            raise AssertionError(f"{mode}: mixture of per-token probabilities {ppl} != router forward "
                                 f"{forward_ppl[mode]}")
        per_topic = {}
        for t in range(len(TOPICS)):
            a, b = mixture_nll(logps, w, by_topic(t))
            per_topic[TOPICS[t]] = math.exp(a / b)
        row = {"mode": mode, "perplexity": forward_ppl[mode], "per_topic_perplexity": per_topic,
               "attribution": float(w.max(-1).values.mean()),
               "weight_on_true_topic": float(w[torch.arange(len(labels)), torch.tensor(labels)].mean())}
        for metric in LOCALITY:
            vals = torch.tensor([[loc[TOPICS[m]][metric][i] for m in range(len(TOPICS))] for i in range(len(seqs))])
            row[f"locality_{metric}"] = float(torch.nansum(w * vals.nan_to_num(0.0), -1).sum()
                                              / (w * (~vals.isnan()).float()).sum())
        if mode != "oracle":
            row["routing_accuracy"] = float(correct.float().mean())
            row["mean_H_domain"] = float(h_domain.mean())
        rows.append(row)
    base_ppl = rows[0]["perplexity"]
    for row in rows:
        row["x_base"] = row["perplexity"] / base_ppl
        print(f"  {row['mode']:>10}: perplexity {row['perplexity']:.1f}", flush=True)

    # 6. router temperature sweep --------------------------------------------------------------------------
    sweep = []
    for temp in s.temperatures:
        p = (router_logits / temp).softmax(-1)
        entry = {"temperature": temp, "mean_H_domain": float(torch.special.entr(p).sum(-1).mean()),
                 "mean_pi_max": float(p.max(-1).values.mean())}
        for mode in ("hard", "soft", "top-2"):
            nll, count = mixture_nll(logps, mode_weights(mode, p, labels))
            entry[f"perplexity_{mode}"] = math.exp(nll / count)
        sweep.append(entry)

    # 7. locality: article topic x specialist ---------------------------------------------------------------
    matrix = {metric: [[_nanmean([loc[TOPICS[m]][metric][i] for i in by_topic(t)]) for m in range(len(TOPICS))]
                       for t in range(len(TOPICS))] for metric in LOCALITY}
    nll_matrix = [[-float(sum(logps[m][i].sum() for i in by_topic(t))) / sum(len(logps[m][i]) for i in by_topic(t))
                   for m in range(len(TOPICS))] for t in range(len(TOPICS))]
    own_vs_other = {}
    for metric in LOCALITY:
        own = _nanmean([loc[TOPICS[labels[i]]][metric][i] for i in range(len(seqs))])
        other = _nanmean([loc[TOPICS[m]][metric][i] for i in range(len(seqs)) for m in range(len(TOPICS))
                          if m != labels[i]])
        own_vs_other[metric] = {"own_topic_specialist": own, "other_specialists": other}
    confusion = [[int(((torch.tensor(labels) == t) & (argmax == m)).sum()) for m in range(len(TOPICS))]
                 for t in range(len(TOPICS))]
    h_right = h_domain[correct].tolist()
    h_wrong = h_domain[~correct].tolist()

    figures = [figure_routing(confusion, rows, TOPICS, TOPIC_TITLES, directory),
               figure_sweep(sweep, h_right, h_wrong, base_ppl, rows, directory),
               figure_locality(matrix, nll_matrix, TOPICS, TOPIC_TITLES, directory)]
    results = {
        "name": NAME, "quick": args.quick, "seed": args.seed, "settings": vars(s),
        "data": {"train_articles": len(train_enc), "test_articles": len(test_enc), "test_sources": test_sources,
                 "official_test_option": test_option if len(test_sources) > 1 else None,
                 "vocab_size": len(tokenizer), "unk_share_test": unk, "topic_keys": list(TOPICS),
                 "topics": [TOPIC_TITLES[t] for t in TOPICS]},
        "base_parameters": sum(p.numel() for p in base.parameters()), "assign_thresholds": thresholds,
        "router_fit": fit, "rows": rows, "forward_perplexity": forward_ppl,
        "routing_accuracy": float(correct.float().mean()),
        "router_argmax": argmax.tolist(), "labels": labels, "router_probs": probs.tolist(),
        "confusion": confusion, "mean_H_domain_correct": _nanmean(h_right), "mean_H_domain_wrong": _nanmean(h_wrong),
        "temperature_sweep": sweep, "locality_matrix": matrix, "nll_matrix": nll_matrix,
        "locality_own_vs_other": own_vs_other, "environment": _common.environment(),
        "figures": [p.name for p in figures],
    }
    results["reading"] = reading(results)
    results["wall_time_s"] = time.perf_counter() - wall
    _common.write_json(directory / "results.json", results)
    print(f"routing accuracy {results['routing_accuracy']:.1%}; {results['wall_time_s']:.0f} s; results in "
          f"{directory}")
    if args.write_docs:
        _common.publish(NAME, markdown(results), figures)
    return results


# ---------------------------------------------------------------------------------------------- figures
def figure_routing(confusion, rows, topics, titles, directory):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.5]})
    ax = axes[0]
    cm = np.array(confusion, dtype=float)
    norm = cm / cm.sum(1, keepdims=True).clip(min=1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(topics)):
        for j in range(len(topics)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    names = [titles[t] for t in topics]
    ax.set_xticks(range(len(topics)), names, rotation=30)
    ax.set_yticks(range(len(topics)), names)
    ax.set_xlabel("router's argmax (hard route)")
    ax.set_ylabel("true topic")
    acc = np.trace(cm) / cm.sum()
    ax.set_title(f"routing confusion (accuracy {acc:.0%})")
    ax = axes[1]
    width = 0.8 / len(rows)
    for k, row in enumerate(rows):
        vals = [row["per_topic_perplexity"][t] for t in topics]
        ax.bar(np.arange(len(topics)) + (k - (len(rows) - 1) / 2) * width, vals, width, label=row["mode"])
    ax.set_xticks(range(len(topics)), names)
    ax.set_ylabel("held-out perplexity")
    lo = min(min(r["per_topic_perplexity"].values()) for r in rows)
    hi = max(max(r["per_topic_perplexity"].values()) for r in rows)
    ax.set_ylim(lo * 0.9, hi * 1.03)
    ax.set_title("per-topic perplexity by routing mode")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return _common.save_figure(fig, directory, f"{NAME}_routing.png")


def figure_sweep(sweep, h_right, h_wrong, base_ppl, rows, directory):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    temps = [e["temperature"] for e in sweep]
    for mode, c in (("hard", "tab:blue"), ("soft", "tab:orange"), ("top-2", "tab:green")):
        ax.plot(temps, [e[f"perplexity_{mode}"] for e in sweep], "o-", color=c, label=mode)
    oracle = next(r["perplexity"] for r in rows if r["mode"] == "oracle")
    ax.axhline(base_ppl, color="gray", ls="--", lw=1, label="base alone")
    ax.axhline(oracle, color="k", ls=":", lw=1, label="oracle")
    ax.set_xscale("log")
    ax.set_xlabel("router temperature T (router_probs = softmax(logits / T))")
    ax.set_ylabel("held-out perplexity")
    ax2 = ax.twinx()
    ax2.plot(temps, [e["mean_pi_max"] for e in sweep], "s:", color="purple", ms=3, lw=1)
    ax2.set_ylabel("mean max routing weight (purple)", color="purple")
    ax2.set_ylim(0, 1.05)
    ax.set_title("router temperature sweep")
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[1]
    import numpy as np

    bins = np.linspace(0, math.log(4), 16)
    ax.hist([h_right, h_wrong], bins=bins, label=[f"routed right ({len(h_right)})", f"routed wrong ({len(h_wrong)})"],
            color=["tab:green", "tab:red"], alpha=0.8)
    ax.axvline(0.8 * math.log(4), color="k", ls="--", lw=1, label="gamma ln M (gamma = 0.8)")
    ax.set_xlabel("H_domain (nats; ln 4 = 1.386 is uniform)")
    ax.set_ylabel("held-out articles")
    ax.set_title("routing entropy of right and wrong routes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _common.save_figure(fig, directory, f"{NAME}_temperature.png")


def figure_locality(matrix, nll_matrix, topics, titles, directory):
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("coverage", "block coverage"), ("block_mass", "block mass BM_t"),
              ("pointer_fidelity", "pointer fidelity PF_t"), ("entropy", "entropy H_t (nats)"),
              ("nll", "NLL / token (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.3))
    names = [titles[t] for t in topics]
    for ax, (key, title) in zip(axes, panels):
        m = np.array(nll_matrix if key == "nll" else matrix[key], dtype=float)
        ax.imshow(m, cmap="viridis")
        for i in range(len(topics)):
            for j in range(len(topics)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < np.nanmean(m) else "black")
        ax.set_xticks(range(len(topics)), names, rotation=30, fontsize=7)
        ax.set_yticks(range(len(topics)), names if ax is axes[0] else [""] * len(topics), fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("specialist", fontsize=8)
    axes[0].set_ylabel("article topic", fontsize=8)
    fig.tight_layout()
    return _common.save_figure(fig, directory, f"{NAME}_locality.png")


# ---------------------------------------------------------------------------------------------- docs
def _f(x, fmt=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(r: dict) -> str:
    s = r["settings"]
    env = r["environment"]
    srcs = ", ".join(f"{n} from the {k}" for k, n in r["data"]["test_sources"].items())
    option = r["data"].get("official_test_option")
    option_arg = {"--data_dir": " --data_dir DATA", "--test_csv": " --test_csv TEST_CSV"}.get(option, "")
    where = {"--data_dir": f"read from `{OFFICIAL_TEST}` in `--data_dir` (the shared data folder)",
             "--test_csv": "read from `--test_csv` (the official AG News test.csv)"}.get(
        option, "no `--data_dir`: the bundled test split only")
    lines = [
        "## Routing fidelity: hard, soft and top-2 routing over localist specialists",
        "",
        f"Command: `python experiments/{NAME}.py{option_arg} --write_docs` (seed {r['seed']}; "
        f"{r['wall_time_s']:.0f} s wall on {env['torch_threads']} torch thread(s) of a shared {env['cpu_count']}-core "
        f"CPU machine; torch {env['torch']}).",
        "",
        f"**Setup.** As `examples/router_agnews.py` (docs/router.md): a word-level tokenizer "
        f"({r['data']['vocab_size']} words) and a tiny Llama (hidden {s['hidden_size']}, {s['num_layers']} layers) "
        f"trained {s['base_steps']} steps on the {r['data']['train_articles']} bundled AG News training articles (the "
        f"base), one specialist per topic fine-tuned {s['specialist_steps']} steps from the base on its topic, and a "
        "`LocalistRouterModel` with a linear router fit on the training labels (`fit_router`). Unlike the example, "
        f"every specialist is localist: {s['n_blocks']} centroid blocks (k-means of its topic's states at the input "
        f"of layer {s['first_local_layer']}, `block_assignment='centroid'`, `alpha={s['alpha']}` from layer "
        f"{s['first_local_layer']}; `assign_threshold` per specialist such that {s['target_coverage']:.0%} of its "
        "topic's training tokens join a block, the rest stay in the general block 0: "
        + ", ".join(f"{t} {r['assign_thresholds'][t]:.2f}" for t in r["data"]["topic_keys"])
        + "), fine-tuned under that mask; the router's loaded "
        "copies get the same blocks (their logits are checked against the trained models). Held-out: "
        f"{r['data']['test_articles']} articles ({srcs}; {where}; `[BOS]` + first {s['max_article_tokens']} words; "
        f"{r['data']['unk_share_test']:.1%} of their tokens are `[UNK]`).",
        "",
        "| routing | perplexity | × base | routing accuracy | weight on true topic | attribution | "
        "H_t (nats) | PF_t | BM_t | block coverage |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        acc = f"{row['routing_accuracy']:.1%}" if "routing_accuracy" in row else "–"
        lines.append(
            f"| {row['mode']} | {row['perplexity']:.1f} | {row['x_base']:.3f} | {acc} "
            f"| {_f(row.get('weight_on_true_topic'))} | {_f(row.get('attribution'))} "
            f"| {_f(row.get('locality_entropy'))} | {_f(row.get('locality_pointer_fidelity'))} "
            f"| {_f(row.get('locality_block_mass'))} | {_f(row.get('locality_coverage'))} |")
    topics = r["data"]["topic_keys"]
    lines += [
        "",
        "- **routing accuracy**: share of articles whose router argmax is their topic (the hard route; chance 25%). "
        "**weight on true topic**: mean routing weight on the article's own specialist. **attribution**: mean weight "
        "of the largest contributor to the prediction (1 = one specialist's computation explains every token).",
        "- **H_t, PF_t, BM_t** (`handle.record()` at the localised layer, sink excluded, per query then per article) "
        "and **block coverage** (share of tokens assigned to a non-general block): per article, the routing-weighted "
        "mean over the specialists that produce the prediction.",
        "",
        "Per-topic perplexity:",
        "",
        "| routing | " + " | ".join(topics) + " |",
        "| --- | " + " | ".join("---:" for _ in topics) + " |",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['mode']} | " + " | ".join(f"{row['per_topic_perplexity'][t]:.1f}" for t in topics) + " |")
    lines += [
        "",
        "Router temperature sweep (the same router logits divided by T; hard routing does not depend on T):",
        "",
        "| T | mean H_domain | mean max weight | hard | soft | top-2 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in r["temperature_sweep"]:
        lines.append(f"| {e['temperature']:g} | {e['mean_H_domain']:.3f} | {e['mean_pi_max']:.3f} "
                     f"| {e['perplexity_hard']:.1f} | {e['perplexity_soft']:.1f} | {e['perplexity_top-2']:.1f} |")
    ov = r["locality_own_vs_other"]
    lines += [
        "",
        "Locality of an article inside its own topic's specialist vs inside the other specialists (means over "
        "articles):",
        "",
        "| measure | own-topic specialist | other specialists |",
        "| --- | ---: | ---: |",
    ]
    for metric, label in (("entropy", "H_t (nats)"), ("pointer_fidelity", "PF_t"), ("block_mass", "BM_t"),
                          ("coverage", "block coverage")):
        lines.append(f"| {label} | {ov[metric]['own_topic_specialist']:.3f} | {ov[metric]['other_specialists']:.3f} |")
    lines += [
        "",
        f"![routing confusion and per-topic perplexity](figures/experiments/{NAME}_routing.png)",
        "",
        f"![temperature sweep and H_domain of right and wrong routes](figures/experiments/{NAME}_temperature.png)",
        "",
        f"![locality per article topic and specialist](figures/experiments/{NAME}_locality.png)",
        "",
        "**Reading.** " + r["reading"],
    ]
    return "\n".join(lines)


def reading(r: dict) -> str:
    rows = {row["mode"]: row for row in r["rows"]}
    base, oracle = rows["base alone"]["perplexity"], rows["oracle"]["perplexity"]
    gap = base - oracle
    parts = [f"The router's hard route is right for {r['routing_accuracy']:.0%} of the held-out articles "
             f"(chance 25%); routed-right articles have mean H_domain {r['mean_H_domain_correct']:.2f} nats, "
             f"routed-wrong ones {r['mean_H_domain_wrong']:.2f}."]
    if gap > 0:
        rec = {m: (base - rows[m]["perplexity"]) / gap for m in ("hard", "soft", "top-2")}
        parts.append(f"The oracle (true topic) is {gap:.1f} perplexity points below the base; hard routing recovers "
                     f"{rec['hard']:.0%} of that, top-2 {rec['top-2']:.0%}, soft {rec['soft']:.0%}.")
    else:
        parts.append("The localist specialists do not beat the base even with oracle routing here.")
    best_t = min(r["temperature_sweep"], key=lambda e: e["perplexity_soft"])
    parts.append(f"Over the temperature sweep soft routing is best at T = {best_t['temperature']:g} "
                 f"({best_t['perplexity_soft']:.1f}); as T falls, soft and top-2 approach hard routing "
                 "(mean max weight → 1); as T grows, soft approaches the uniform mixture.")
    hard, soft, top2 = rows["hard"], rows["soft"], rows["top-2"]
    parts.append(f"Attribution is what the mode changes: under hard routing every token's prediction is one "
                 f"specialist's computation (attribution 1.0), under top-2 the largest contributor carries "
                 f"{top2['attribution']:.2f} of the weight on average, under soft {soft['attribution']:.2f}. A soft "
                 "prediction mixes several specialists, each with its own block partition of the same text, so no "
                 "single attention pattern or set of anchors explains it: that is the sense in which hard routing "
                 "keeps the specialists' locality guarantees and soft routing is an approximation. Here the "
                 f"mixture's better perplexity ({soft['perplexity']:.1f} vs {hard['perplexity']:.1f}) is bought with "
                 "that attribution.")
    routed = [rows[m] for m in ("hard", "soft", "top-2", "oracle")]
    spread = {m: max(x[f"locality_{m}"] for x in routed) - min(x[f"locality_{m}"] for x in routed)
              for m in ("block_mass", "pointer_fidelity", "coverage", "entropy")}
    ov = r["locality_own_vs_other"]
    parts.append(f"The specialists' attention statistics themselves barely depend on the route: the routing-weighted "
                 f"BM_t, PF_t and block coverage differ by at most {spread['block_mass']:.3f}, "
                 f"{spread['pointer_fidelity']:.3f} and {spread['coverage']:.3f} between the four routed rows "
                 f"(H_t by {spread['entropy']:.3f} nats), and an article inside its own topic's specialist has "
                 f"coverage {ov['coverage']['own_topic_specialist']:.2f}, BM_t "
                 f"{ov['block_mass']['own_topic_specialist']:.2f} and PF_t "
                 f"{ov['pointer_fidelity']['own_topic_specialist']:.2f} against "
                 f"{ov['coverage']['other_specialists']:.2f}, {ov['block_mass']['other_specialists']:.2f} and "
                 f"{ov['pointer_fidelity']['other_specialists']:.2f} inside the others.")
    nll = r["nll_matrix"]
    diag = sum(min(range(len(nll)), key=lambda m: nll[t][m]) == t for t in range(len(nll)))
    parts.append(f"In the topic × specialist matrices the locality measures vary by column (they are properties "
                 f"of each specialist's blocks), while the NLL is lowest on the diagonal for {diag} of {len(nll)} "
                 "topics: the specialists are topic specialists in what they predict, not in how local their "
                 "attention is (plausibly because all four start from one base and their blocks are k-means "
                 "clusters of that "
                 "base's states, which any article falls into). So a misroute costs perplexity, not locality.")
    gamma_ln_m = 0.8 * math.log(4)
    probs = r["router_probs"]
    hd = [-sum(p * math.log(p) for p in row if p > 0) for row in probs]
    ok = [a == y for a, y in zip(r["router_argmax"], r["labels"])]
    above_right = sum(h > gamma_ln_m for h, c in zip(hd, ok) if c) / max(sum(ok), 1)
    above_wrong = sum(h > gamma_ln_m for h, c in zip(hd, ok) if not c) / max(len(ok) - sum(ok), 1)
    parts.append(f"H_domain separates right from wrong routes only weakly here: {above_right:.0%} of the right and "
                 f"{above_wrong:.0%} of the wrong routes are above gamma ln M = {gamma_ln_m:.2f} (the LLM-level "
                 "recruitment threshold): this router, on the pooled states of a "
                 f"{r['base_parameters'] / 1e6:.1f} M-parameter base, is uncertain almost everywhere.")
    return " ".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
