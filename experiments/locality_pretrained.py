"""Does the group-lasso penalty localise a *pretrained* model's attention? SmolLM2-135M, AdamW, PCA subspaces.

    python experiments/locality_pretrained.py --model SMOLLM2_DIR --data_dir DATA [--write_docs]
    python experiments/locality_pretrained.py --model SMOLLM2_DIR --data_dir DATA --quick

``experiments/locality_adamw.py`` found that the penalty localises the heads that own a query's block only when the
block's features lie in its subspace, which tiny models trained from scratch on text do not give. A pretrained
model's layer inputs carry what the text is about (``experiments/topic_features.py``), and ``subspace='pca'``
(subspaces calibrated on the model's own layer inputs per block) is meant for that case. This script tests it:

* SmolLM2-135M, its Q and K projections trainable (everything else frozen, so the proximal step is exact: the
  weights it writes are the weights that are saved), ``LocalistTrainer`` with the Trainer's default AdamW (lr
  ``--lr``, linear decay), dial 0 in training and measurement;
* multi-document AG News (``ag_news/test.csv`` of ``--data_dir``): sequences of the sink token and 2-4 articles of
  distinct topics, each cut at 40 tokens; block = the article's topic (explicit block ids), 4 blocks, every head
  owning a block (``general_head_fraction=0``);
* ``subspace='pca'`` (``calibrate_subspaces`` on the untrained model, rank ``hidden // 5``; ``--subspace
  pca_block_order`` its earlier behaviour, ``shared_first=False``), ``lambda = m *
  lambda_threshold`` (``estimate_constants``, ``lambda_mode='threshold'``), ``penalty='prox'``; *none* = the same
  training without penalty;
* measured on held-out sequences at dial 0 (``locality_adamw.measure``): own-block mass ``BM`` and pointer fidelity
  ``PF`` over all heads and over the heads that own the query's block, the fraction of a block's layer-input energy
  in its own subspace, exact-zero groups, held-out loss. Per-layer values are averaged over the 30 layers.
"""

from __future__ import annotations

import csv
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import locality_adamw as LA  # noqa: E402
from _locality_tasks import collate_blocks as collate  # noqa: E402

NAME = "locality_pretrained"
NB = 4
MAX_ARTICLE = 40
KEYS = ("bm_all", "bm_own", "bm_other", "pf_all", "pf_own", "bm_uniform", "own_subspace_energy")


def load_articles(data_dir: Path, tok) -> list[tuple[int, list[int]]]:
    src = data_dir / "ag_news" / "test.csv"
    if not src.is_file():
        from hf_localist.errors import LocalistLoadError

        raise LocalistLoadError(f"--data_dir {data_dir}: no ag_news/test.csv in it; pass the shared data folder")
    with open(src, newline="", encoding="utf-8") as fh:
        rows = [(int(r[0]) - 1, f"{r[1]} {r[2]}") for r in csv.reader(fh)]
    return [(t, tok(" " + text.strip())["input_ids"][:MAX_ARTICLE]) for t, text in rows]


def load_sources(data_dir: Path, tok) -> list[tuple[int, list[int]]]:
    """``--blocks source``: passages of 4 sources as (block - 1, ids): AG News World/Business, AG News
    Sports/Sci-Tech, Tiny Shakespeare paragraphs, SST-2 dev reviews (3 sentences joined); at most MAX_ARTICLE
    tokens, at least 20."""
    need = [data_dir / "tinyshakespeare" / "input.txt", data_dir / "sst2" / "dev.tsv"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        from hf_localist.errors import LocalistLoadError

        raise LocalistLoadError(f"--data_dir {data_dir}: missing {missing}; pass the shared data folder")
    out = [(0 if t in (0, 2) else 1, x) for t, x in load_articles(data_dir, tok)]
    for text in need[0].read_text(encoding="utf-8").split("\n\n"):
        out.append((2, tok(" " + text.strip())["input_ids"][:MAX_ARTICLE]))
    reviews = [line.split("\t")[0] for line in need[1].read_text(encoding="utf-8").splitlines()[1:]]
    for i in range(0, len(reviews) - 2, 3):
        out.append((3, tok(" " + " ".join(reviews[i: i + 3]))["input_ids"][:MAX_ARTICLE]))
    return [(b, x) for b, x in out if len(x) >= 20]


def sequences(articles, n: int, sink: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    by_topic = [[x for t, x in articles if t == k] for k in range(NB)]
    out = []
    for _ in range(n):
        ids, blocks = [sink], [0]
        for t in rng.sample(range(NB), rng.randint(2, NB)):
            x = rng.choice(by_topic[t])
            ids += x
            blocks += [t + 1] * len(x)
        out.append((ids, blocks))
    return out


def load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "k_proj.weight")))
    return model


def discriminative_subspaces(handle, batches: list[dict], rank: int):
    """(L, n_blocks, E, r): per layer and block, the top-``rank`` eigenvectors of ``M_i - mean_j M_j`` (``M_i`` the
    second moment of block i's layer inputs, unit-normalised), each block's basis made orthogonal to the earlier
    blocks' (``complement_basis``): the directions in which block i's inputs hold more energy than the average
    block's, unlike PCA of each block's inputs, whose top directions all blocks share."""
    import torch

    from hf_localist.training.subspaces import LayerInputs, complement_basis, run_batches

    was_training = handle.base.training
    handle.base.eval()
    try:
        with LayerInputs(handle) as rec:
            for _batch, _out, _call in run_batches(handle, batches):
                pass
    finally:
        handle.base.train(was_training)
    active = handle.config.active_block_list()
    out = []
    for layer in range(len(handle.attention_modules)):
        x, blocks = rec.by_block(layer)
        x = torch.nn.functional.normalize(x.double(), dim=-1)  # (N, E)
        moments = [x[blocks == b].T @ x[blocks == b] / max(int((blocks == b).sum()), 1) for b in active]  # (E, E)
        mean = sum(moments) / len(moments)
        taken, bases = None, []
        for m in moments:
            _, vecs = torch.linalg.eigh(m - mean)  # ascending eigenvalues
            u = complement_basis(vecs[:, -rank:].flip(-1), taken)
            bases.append(u)
            taken = u if taken is None else torch.cat([taken, u], dim=1)
        out.append(torch.stack(bases).float())
    return torch.stack(out)


def main(argv=None) -> dict:
    parser = C.make_parser(NAME, __doc__.split("\n\n")[0], render=True)
    parser.add_argument("--model", required=True, help="SmolLM2-135M directory (hf_localist.fetch_checkpoint)")
    parser.add_argument("--data_dir", required=True, help="the shared data folder (ag_news/test.csv)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--multipliers", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--subspace", choices=("pca", "pca_block_order", "discriminative"), default="pca",
                        help="pca: calibrate_subspaces (shared directions general, each block's specific ones); "
                        "pca_block_order: calibrate_subspaces(shared_first=False), each block's top principal "
                        "directions orthogonalised in block order (the library's earlier calibration); "
                        "discriminative: the directions where a block's inputs have more energy than the average "
                        "block's (top eigenvectors of M_i - mean_j M_j, M = E[x x^T] per block), orthogonalised")
    parser.add_argument("--blocks", choices=("topic", "source"), default="topic",
                        help="topic: 4 AG News topics; source: AG News World/Business, AG News Sports/Sci-Tech, "
                        "Tiny Shakespeare, SST-2 reviews (tinyshakespeare/input.txt, sst2/dev.tsv of --data_dir)")
    parser.add_argument("--rank", type=int, default=None, help="subspace rank per block (default hidden // 5: the "
                        "4 blocks and the general features share the hidden size equally)")
    args = parser.parse_args(argv)
    if args.render:  # the docs section from the results.json in --out_dir (runs of several ranks may be merged)
        import json

        results = json.loads((C.out_dir(args, NAME) / "results.json").read_text())
        C.publish(NAME, markdown(results), [])
        return results
    C.setup(args)
    from transformers import AutoConfig, AutoTokenizer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from hf_localist import LocalistTrainer
    from hf_localist.demo.passages import sink_token_id
    from hf_localist.training.calibration import estimate_constants
    from hf_localist.training.subspaces import calibrate_subspaces

    hf_logging.set_verbosity_error()
    if args.quick:
        args.steps, args.multipliers = 4, args.multipliers[-1:]
    tok = AutoTokenizer.from_pretrained(args.model)
    sink = sink_token_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else sink
    articles = (load_sources if args.blocks == "source" else load_articles)(Path(args.data_dir), tok)
    random.Random(args.seed).shuffle(articles)
    held_articles, train_articles = articles[:400], articles[400:]
    train = sequences(train_articles, args.steps * args.batch, sink, args.seed + 1)
    n_eval = 8 if args.quick else 32
    held = sequences(held_articles, n_eval, sink, args.seed + 2)
    eval_batches = [collate(held[i: i + 8], pad) for i in range(0, n_eval, 8)]
    calib = [collate(train[i * args.batch:(i + 1) * args.batch], pad) for i in range(4)]
    hidden = AutoConfig.from_pretrained(args.model).hidden_size
    rank = args.rank or hidden // (NB + 1)
    directory = C.out_dir(args, NAME)
    wall = time.perf_counter()

    handle = LA.localist(load_model(args.model), "pca", None, rank=rank)
    subspaces = (discriminative_subspaces(handle, calib, rank) if args.subspace == "discriminative"
                 else calibrate_subspaces(handle, calib, shared_first=args.subspace == "pca"))
    handle.state.subspaces = subspaces.clone()  # what estimate_constants reads (calibrate_subspaces stores it too)
    threshold = estimate_constants(handle, calib).threshold()
    runs = []
    for m in [None, *args.multipliers]:
        model = load_model(args.model)
        handle = LA.localist(model, "pca", m, None if m is None else threshold, subspaces, rank)
        targs = TrainingArguments(output_dir=str(directory / "trainer"), max_steps=args.steps,
                                  per_device_train_batch_size=args.batch, learning_rate=args.lr,
                                  logging_steps=args.steps, save_strategy="no", report_to=[], seed=args.seed,
                                  use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                                  dataloader_num_workers=0)
        t0 = time.perf_counter()
        LocalistTrainer(model=model, args=targs, train_dataset=LA._Rows(train),
                        data_collator=lambda rows: collate(rows, pad)).train()
        run = {"multiplier": m, "rank": rank, "subspace": args.subspace, "blocks": args.blocks,
               "train_s": time.perf_counter() - t0}
        run.update(LA.measure(model, handle, eval_batches))
        run.update(LA.group_stats(handle, m is not None))
        layers = run["layers"].values()
        run["mean"] = {k: sum(r[k] for r in layers) / len(layers) for k in KEYS}
        runs.append(run)
        z = run.get("zero_fraction")
        print(f"m={m}: loss {run['loss']:.4f}, zero groups {z if z is None else round(z, 3)}, "
              + ", ".join(f"{k} {v:.3f}" for k, v in run["mean"].items()) + f" ({run['train_s']:.0f} s)", flush=True)
    results = {"name": NAME, "quick": args.quick, "seed": args.seed, "steps": args.steps, "batch": args.batch,
               "lr": args.lr, "rank": rank, "eval_sequences": n_eval, "runs": runs,
               "environment": C.environment(), "wall_time_s": time.perf_counter() - wall}
    C.write_json(directory / "results.json", results)
    if args.write_docs:
        C.publish(NAME, markdown(results), [])
    return results


def markdown(res: dict) -> str:
    kinds = sorted({f"`{r.get('subspace', 'pca')}` of rank {r.get('rank', res['rank'])}" for r in res["runs"]})
    lines = [
        "## Does the penalty localise a pretrained model? (`experiments/locality_pretrained.py`)",
        "",
        f"Command: `python experiments/{NAME}.py --model SMOLLM2_DIR --data_dir DATA [--rank R] [--subspace "
        "pca_block_order|discriminative] [--blocks source] [--multipliers M ...] --write_docs`, one command per "
        "(blocks, subspace, rank), "
        f"merged (seed {res['seed']}; {res['steps']} steps of {res['batch']} sequences, lr {res['lr']:g}; "
        f"{res['wall_time_s']:.0f} s of training in all). SmolLM2-135M with only its Q/K projections trainable, the "
        "Trainer's default AdamW, "
        f"subspaces {', '.join(kinds)} per block, 4 blocks with explicit ids, one per passage (*topic*: the 4 AG "
        "News topics; *source*, `--blocks source`: AG News World/Business, AG News Sports/Sci-Tech, Tiny "
        "Shakespeare, SST-2 reviews), dial 0 in training and measurement; "
        f"{res['eval_sequences']} held-out sequences. Means over the 30 "
        "layers; *owning heads* are the heads whose block is the query's. `pca` is `calibrate_subspaces` (shared "
        "directions general, each block's specific directions), `pca_block_order` the same with "
        "`shared_first=False` (each block's top principal directions, orthogonalised in block order: the "
        "library's calibration before `shared_first`); the per-block energies are in block order (block 1 first).",
        "",
        "| blocks | subspace | rank | lambda / threshold | zero groups | held-out loss | BM all heads | "
        "BM owning heads | BM other heads | PF all | PF owning | BM of uniform attention | own-subspace energy | "
        "energy per other block's subspace | own-subspace energy per block |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["runs"]:
        m = r["mean"]
        z = r.get("zero_fraction")
        label = "none" if r["multiplier"] is None else format(r["multiplier"], "g")
        zeros = "–" if z is None else f"{z:.2f}"
        lines.append(f"| {r.get('blocks', 'topic')} | {r.get('subspace', 'pca')} | {r.get('rank', res['rank'])} | "
                     f"{label} | {zeros} | "
                     f"{r['loss']:.3f} | "
                     f"{m['bm_all']:.3f} | {m['bm_own']:.3f} | {m['bm_other']:.3f} | {m['pf_all']:.3f} | "
                     f"{m['pf_own']:.3f} | {m['bm_uniform']:.3f} | {m['own_subspace_energy']:.3f} | "
                     f"{_other_energy(r):.3f} | {_energy_by_block(r)} |")
    lines += ["", reading(res)]
    return "\n".join(lines)


def _energy_by_block(run: dict) -> str:
    """Mean over layers of each block's own-subspace energy, blocks in order ("–" for runs without it)."""
    per = [x["own_subspace_energy_by_block"] for x in run["layers"].values() if "own_subspace_energy_by_block" in x]
    if not per or any(len(p) != len(per[0]) for p in per):
        return "–"
    return " / ".join(f"{sum(p[j] for p in per) / len(per):.2f}" for j in range(len(per[0])))


def _other_energy(run: dict) -> float:
    """Mean over layers of a block's layer-input energy in *one* other block's subspace (the sum over the others
    divided by their number)."""
    layers = run["layers"].values()
    return sum(x["other_subspace_energy"] for x in layers) / len(layers) / (NB - 1)


def reading(res: dict) -> str:
    """What the table says, from its own numbers: none against the largest multiplier, per subspace and rank."""
    parts = []
    def key(r):
        return r.get("blocks", "topic"), r.get("subspace", "pca"), r.get("rank", res["rank"])

    for blocks, kind, rank in sorted({key(r) for r in res["runs"]}):
        runs = [r for r in res["runs"] if key(r) == (blocks, kind, rank)]
        base = next((r for r in runs if r["multiplier"] is None), None)
        pen = [r for r in runs if r["multiplier"] is not None]
        if base is None or not pen:
            continue
        top = max(pen, key=lambda r: r["multiplier"])
        low = min(pen, key=lambda r: r["multiplier"])
        own, other = base["mean"]["own_subspace_energy"], _other_energy(base)
        rose = top["mean"]["bm_own"] > base["mean"]["bm_own"] + 0.01
        parts.append(
            f"{blocks} blocks, {kind}, rank {rank}: at lambda = {low['multiplier']:g} x threshold "
            f"{low.get('zero_fraction', 0):.0%} of the penalised groups are exactly zero; owning heads' BM "
            f"{base['mean']['bm_own']:.3f} -> {top['mean']['bm_own']:.3f} ({'up' if rose else 'not up'}), other "
            f"heads {base['mean']['bm_other']:.3f} -> {top['mean']['bm_other']:.3f} (uniform attention: "
            f"{base['mean']['bm_uniform']:.3f}), held-out loss {base['loss']:.3f} -> {top['loss']:.3f}; a block holds "
            f"{own:.3f} of its layer-input energy in its own subspace and {other:.3f} in each other block's "
            f"({'the subspaces separate the blocks' if own > 1.2 * other else 'no separation'})")
    return ("**Reading.** " + "; ".join(parts) + ". Where a block's inputs hold as much energy in another block's "
            "subspace as in their own, the zero groups take features every head needs, not features that tell the "
            "blocks apart.") if parts else ""


if __name__ == "__main__":
    main(sys.argv[1:])
