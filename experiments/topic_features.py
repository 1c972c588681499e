"""How much topic do the assignment features carry? The purity ceiling of recruited blocks on AG News.

    python experiments/topic_features.py --model SMOLLM2_DIR --data_dir DATA [--write_docs]
    python experiments/topic_features.py --model SMOLLM2_DIR --quick

Recruitment clusters assignment features and makes each cluster a block (docs/recruitment.md), so the best a block
can do is what k-means finds in those features. This probe skips recruitment: it runs a pretrained model over
sequences of 4 AG News articles joined without any marker, takes the assignment features exactly as centroid
assignment computes them (``hf_localist.blocks.centroid.context_features``: the input of a layer, as a causal
running mean over ``assign_horizon`` positions), fits k-means with k clusters on the first half of the sequences
(unit vectors, as centroid assignment compares them by cosine), assigns the tokens of the other half to the nearest
centroid and reports their token-weighted topic purity (chance: about 0.3 for k = 4 on balanced topics).
Positions 0-7 of every sequence are left out (no context yet).
"""

from __future__ import annotations

import csv
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "topic_features"


def load_sequences(data_dir: Path, tok, n_seq: int, max_article: int, seed: int):
    src = data_dir / "ag_news" / "train_sample_5k.csv"
    if not src.is_file():
        from hf_localist.errors import LocalistLoadError

        raise LocalistLoadError(f"--data_dir {data_dir}: no ag_news/train_sample_5k.csv in it; pass the shared data "
                                "folder")
    with open(src, newline="", encoding="utf-8") as fh:
        rows = [(text, int(label)) for text, label in csv.reader(fh)]
    random.Random(seed).shuffle(rows)
    ids, topics = [], []
    for s in range(n_seq):
        seq, lab = [], []
        for text, label in rows[4 * s: 4 * s + 4]:
            t = tok(" " + text.strip())["input_ids"][:max_article]
            seq += t
            lab += [label] * len(t)
        ids.append(seq)
        topics.append(lab)
    n = min(map(len, ids))
    return [s[:n] for s in ids], [t[:n] for t in topics]


def purity(pred, labels) -> float:
    import numpy as np

    total = sum(int(np.bincount(labels[pred == c], minlength=4).max()) for c in np.unique(pred))
    return total / max(len(labels), 1)


def main(argv=None) -> dict:
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a pretrained causal-LM directory (e.g. SmolLM2-135M)")
    parser.add_argument("--data_dir", required=True, help="the shared data folder (ag_news/train_sample_5k.csv)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="assigning layers (default: 6 spread "
                        "over the model)")
    parser.add_argument("--horizons", type=float, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 6])
    args = parser.parse_args(argv)
    _common.setup(args)
    import numpy as np
    import torch
    from sklearn.cluster import KMeans
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_localist.blocks.centroid import context_features

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    layers = args.layers or sorted({round(n_layers * f) for f in (0.1, 0.3, 0.5, 0.7, 0.85)} | {n_layers - 1})
    n_seq = 16 if args.quick else 64
    ids, topics = load_sequences(Path(args.data_dir), tok, n_seq, 80, args.seed)
    wall = time.perf_counter()
    x = torch.tensor(ids)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states  # hidden[l]: the input of layer l, (B, T, E)
    labels = np.array(topics)[:, 8:]
    half = n_seq // 2
    rows = []
    for layer in layers:
        for h in args.horizons:
            feats, _ = context_features(hidden[layer], torch.ones(x.shape, dtype=torch.bool), h)  # (B, T, E)
            f = torch.nn.functional.normalize(feats[:, 8:].float(), dim=-1).numpy()
            fit, test = f[:half].reshape(-1, f.shape[-1]), f[half:].reshape(-1, f.shape[-1])
            for k in args.ks:
                km = KMeans(k, n_init=3, random_state=args.seed).fit(fit)
                c = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
                pred = (test @ c.T).argmax(axis=1)
                rows.append({"layer": layer, "horizon": h, "k": k,
                             "purity": purity(pred, labels[half:].reshape(-1))})
                print(f"layer {layer} horizon {h:g} k {k}: purity {rows[-1]['purity']:.3f}", flush=True)
    best = max(rows, key=lambda r: r["purity"])
    results = {"name": NAME, "quick": args.quick, "seed": args.seed, "model": Path(args.model).name,
               "layers": n_layers, "sequences": n_seq, "tokens_per_sequence": x.shape[1], "rows": rows,
               "best": best, "environment": _common.environment(), "wall_time_s": time.perf_counter() - wall}
    directory = _common.out_dir(args, NAME)
    _common.write_json(directory / "results.json", results)
    print(f"best: layer {best['layer']} horizon {best['horizon']:g} k {best['k']}: purity {best['purity']:.3f}")
    if args.write_docs:
        _common.publish(NAME, markdown(results), [])
    return results


def markdown(res: dict) -> str:
    hs = sorted({r["horizon"] for r in res["rows"]})
    ks = sorted({r["k"] for r in res["rows"]})
    lines = [
        "## Topic in the assignment features (the purity ceiling of recruited blocks)",
        "",
        f"Command: `python experiments/{NAME}.py --model SMOLLM2_DIR --data_dir DATA --write_docs` (seed "
        f"{res['seed']}; {res['sequences']} sequences of 4 AG News articles, {res['tokens_per_sequence']} tokens "
        "each; k-means fit on half of them, purity on the other half).",
        "",
        "Token-weighted topic purity of nearest-centroid clusters of the assignment features "
        "(`context_features` of the input of the layer, horizon = `assign_horizon`; chance about 0.3):",
        "",
        "| layer | " + " | ".join(f"h={h:g}, k={k}" for h in hs for k in ks) + " |",
        "| ---: | " + " | ".join("---:" for _ in hs for _ in ks) + " |",
    ]
    for layer in sorted({r["layer"] for r in res["rows"]}):
        cells = []
        for h in hs:
            for k in ks:
                v = [r["purity"] for r in res["rows"] if r["layer"] == layer and r["horizon"] == h and r["k"] == k]
                cells.append(f"{v[0]:.3f}" if v else "–")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    b = res["best"]
    lines += ["", f"Best: layer {b['layer']} of {res['layers']}, horizon {b['horizon']:g}, k = {b['k']}: purity "
              f"**{b['purity']:.3f}**. A recruited block is a cluster of these features, so its purity on this text "
              "cannot be expected above this ceiling."]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
