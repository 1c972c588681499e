"""Does the group-lasso penalty localise attention? Own-block mass and PF at dial 0 against lambda, under AdamW.

The penalty of docs/design.md section 4 takes from every head ``h`` the features of the blocks it does not own
(``||W_Q^(l,h) U_i|| + ||W_K^(l,kv(h)) U_i||`` for ``i != b(h)``); with the AdamW-aware proximal step those groups
reach exact zero. This script asks whether that shows in the attention itself, at dial 0 (no attention bias): the
block mass ``BM_t`` (attention on the query's own block, sink dropped) and pointer fidelity ``PF_t`` (attention on
the anchors of the own block: the first position of each of its runs) of held-out sequences, measured with the
library's recorder (``handle.record()``; per head through ``_locality_probe.py``), averaged

* over all heads (what ``handle.record()`` reports), and
* over the heads that own the query's block (``b(h)`` = the query's block, ``training/subspaces.head_blocks``),
  and over the other heads,

per layer, against ``lambda = m * lambda_threshold`` (calibrated with ``estimate_constants`` on the untrained model,
``lambda_mode='threshold'``, ``kappa = m``, ``alpha_train = 1``), and without penalty (same seed, data, steps).

Tasks (both with explicit block ids, 4 blocks, every head owning a block: ``general_head_fraction = 0``):

* ``copy``: the interleaved copy task. A tiny Qwen2 (hidden 64, 2 layers, 8 heads, 4 K/V heads: GQA, each K head
  read by the 2 heads of one block), vocabulary = 4 token ranges of 16 tokens, one per block. A sequence is BOS and
  8 segments of 6 tokens: each block's segment appears twice, the second time repeating the first exactly, in an
  interleaved random order (no block twice in a row); the loss is on the copied segments (from their second token),
  so the data reward attending to the own block's earlier segment (an induction pattern). Three settings:
  ``block`` embeddings (token ``v`` of block ``i`` initialised inside block ``i``'s coordinate group, trainable: the
  premise of ``subspace='coordinate'``), ``random`` embeddings (default init, trainable) with coordinate subspaces,
  and ``random`` with ``subspace='pca'`` (``calibrate_subspaces`` on the untrained model).
* ``agnews``: multi-document real text. A tiny Llama (hidden 64, 2 layers, 8 heads, 4 K/V heads) trained from
  scratch on sequences of 2-4 articles of the bundled AG News sample (``hf_localist.demo``'s word-level tokenizer),
  each article opened by a ``[SEP]`` token, one block per article (block id = its topic, distinct in a sequence);
  coordinate and PCA subspaces.

Every run: ``LocalistTrainer`` (the Trainer's default AdamW, lr 3e-3 linear decay, batch 16), dial 0 in training.

Run: ``python experiments/locality_adamw.py [--quick] [--write_docs]``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "locality_adamw"
from _locality_tasks import NB, R_TEXT, AgNews, R, copy_batch, copy_model  # noqa: E402

LR = 3e-3
BATCH = 16
SETTINGS = {  # name -> (task, embeddings, subspace)
    "copy/block": ("copy", "block", "coordinate"),
    "copy/random": ("copy", "random", "coordinate"),
    "copy/random-pca": ("copy", "random", "pca"),
    "copy/random-pca-block-order": ("copy", "random", "pca_block_order"),
    "agnews/topic": ("agnews", "block", "coordinate"),
    "agnews/random": ("agnews", "random", "coordinate"),
}


# ---------------------------------------------------------------------------------------------- runs
class _Rows:
    """A torch Dataset over prepared rows (dicts of tensors, or (ids, blocks) pairs for a collate function)."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def localist(model, subspace: str, multiplier: float | None, thr=None, subspaces=None, rank: int = R):
    """apply_localist at dial 0 with the penalty of one run (None: no penalty); explicit blocks, no general heads."""
    import hf_localist as hl

    handle = hl.apply_localist(model, hl.LocalistConfig(
        alpha=0.0, block_assignment="explicit", max_blocks=NB, penalty="none" if multiplier is None else "prox",
        lambda_mode="fixed" if thr is None else "threshold", kappa=multiplier or 1.0, alpha_train=1.0,
        general_head_fraction=0.0, subspace_rank=rank, subspace=subspace))
    if subspaces is not None:
        handle.state.subspaces = subspaces.clone()
    if thr is not None:
        handle.state.lambda_threshold = thr.clone()
    return handle


class Task:
    """One setting of SETTINGS with its data: builds models, calibrates, trains and measures runs."""

    def __init__(self, name: str, seed: int, steps: int, n_eval: int, work_dir: Path) -> None:
        import torch

        self.name, self.seed, self.steps, self.work_dir = name, seed, steps, work_dir
        self.task, self.embeddings, self.subspace = SETTINGS[name]
        # pca_block_order: subspace='pca' calibrated with shared_first=False (the library's earlier calibration)
        self.config_subspace = "pca" if self.subspace.startswith("pca") else self.subspace
        self.rank = R if self.task == "copy" else R_TEXT
        if self.task == "copy":
            rows = copy_batch(steps * BATCH, torch.Generator().manual_seed(seed + 1))
            self.train_rows = [{k: v[i] for k, v in rows.items()} for i in range(rows["input_ids"].shape[0])]
            self.collate = None
            held = copy_batch(n_eval, torch.Generator().manual_seed(seed + 999))
            self.eval_batches = [{k: v[i: i + 32] for k, v in held.items()} for i in range(0, n_eval, 32)]
            self.calib = [copy_batch(BATCH, torch.Generator().manual_seed(seed + 50 + i)) for i in range(4)]
        else:
            self.data = AgNews(seed)
            self.train_rows = self.data.train_batches(steps * BATCH)
            self.collate = self.data.collate
            held = self.data.held_out()[:n_eval]
            self.eval_batches = [self.data.collate(held[i: i + 8]) for i in range(0, len(held), 8)]
            self.calib = [self.data.collate(self.train_rows[i * BATCH:(i + 1) * BATCH]) for i in range(4)]
        self.subspaces, self.threshold = self._calibrate()

    def model(self):
        if self.task == "copy":
            return copy_model(self.seed, self.embeddings)
        return self.data.model(self.seed, self.embeddings)

    def _calibrate(self):
        """PCA subspaces (if any) and lambda_threshold (L, H, n), both measured on the untrained model."""
        from hf_localist.training.calibration import estimate_constants
        from hf_localist.training.subspaces import calibrate_subspaces

        handle = localist(self.model(), self.config_subspace, None, rank=self.rank)
        subspaces = (calibrate_subspaces(handle, self.calib, shared_first=self.subspace == "pca")
                     if self.config_subspace == "pca" else None)
        return subspaces, estimate_constants(handle, self.calib).threshold()

    def run(self, multiplier: float | None) -> dict:
        """Train (no penalty, or lambda = multiplier * threshold) and measure at dial 0 on the held-out batches."""
        from transformers import TrainingArguments

        from hf_localist.trainer import LocalistTrainer

        model = self.model()
        handle = localist(model, self.config_subspace, multiplier, None if multiplier is None else self.threshold,
                          self.subspaces, self.rank)
        args = TrainingArguments(
            output_dir=str(self.work_dir), max_steps=self.steps,
            per_device_train_batch_size=BATCH, learning_rate=LR, logging_steps=self.steps, save_strategy="no",
            report_to=[], seed=self.seed, use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0)
        start = time.perf_counter()
        trainer = LocalistTrainer(model=model, args=args, train_dataset=_Rows(self.train_rows),
                                  data_collator=self.collate)
        trainer.train()
        out = {"setting": self.name, "seed": self.seed, "multiplier": multiplier,
               "train_s": time.perf_counter() - start}
        out.update(measure(model, handle, self.eval_batches, copy_queries=self.task == "copy"))
        out.update(group_stats(handle, multiplier is not None))
        return out


def measure(model, handle, batches: list[dict], copy_queries: bool = False) -> dict:
    """Held-out data loss, and per layer at dial 0: BM / PF over all heads, owning and other heads, uniform BM,
    sink mass, the fraction of each block's layer-input energy in its own subspace; ``copy_queries``: also BM / PF
    of the owning heads on the queries that must copy (their next token is a copy target)."""
    import torch
    from _locality_probe import per_head_metrics

    from hf_localist.arch.qk import head_counts
    from hf_localist.training.subspaces import LayerInputs, head_blocks, layer_subspaces

    model.eval()
    h, h_kv, _ = head_counts(handle)
    owner = head_blocks(h, h_kv, handle.config.active_block_list(), handle.config.general_head_fraction)  # (H,)
    sums: dict = {}
    nll = count = 0.0
    gap = 0.0

    def add(layer, key, values):
        s = sums.setdefault(layer, {}).setdefault(key, [0.0, 0])
        s[0] += float(values.sum())
        s[1] += int(values.numel())

    with LayerInputs(handle) as inputs:
        for batch in batches:
            with torch.no_grad():
                out = model(**batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(out.loss) * n
            count += n
            inputs_only = {k: v for k, v in batch.items() if k != "labels"}
            copy_mask = None
            if copy_queries:  # query t predicts token t + 1: a copy query when labels[t + 1] is a copy target
                copy_mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
                copy_mask[:, :-1] = batch["labels"][:, 1:] != -100
            for layer, r in per_head_metrics(model, handle, inputs_only, 0.0).items():
                bm, pf, sink = r["block_mass"], r["pointer_fidelity"], r["sink_mass"]  # (B, H, T)
                ok = ~torch.isnan(bm)
                own = (owner[None, :, None] == r["q_blocks"][:, None, :]) & ok
                gap = max(gap, float((bm.nanmean(1) - r["layer_bm"]).abs().nan_to_num().max()))
                for key, sel in (("all", ok), ("own", own), ("other", ok & ~own)):
                    add(layer, f"bm_{key}", bm[sel])
                    add(layer, f"pf_{key}", pf[sel])
                    add(layer, f"sink_{key}", sink[sel])
                add(layer, "bm_uniform", r["uniform_bm"][~torch.isnan(r["uniform_bm"])])
                if copy_mask is not None:
                    sel = own & copy_mask[:, None, :]
                    add(layer, "bm_own_copy", bm[sel])
                    add(layer, "pf_own_copy", pf[sel])
                    add(layer, "bm_all_copy", bm[ok & copy_mask[:, None, :]])
    layers = {}
    u_all = layer_subspaces(handle)
    active = handle.config.active_block_list()
    for layer, s in sums.items():
        row = {k: v[0] / max(v[1], 1) for k, v in s.items()}
        x, blocks = inputs.by_block(layer)  # (N, E) inputs of the Q/K projections, (N,) block ids
        u = u_all[layer].to(x.dtype)  # (n, E, r)
        energy = (torch.einsum("ne,ber->bnr", x, u) ** 2).sum(-1) / (x ** 2).sum(-1).clamp_min(1e-30)  # (n, N)
        fracs = [float(energy[j][blocks == b].mean()) for j, b in enumerate(active) if bool((blocks == b).any())]
        others = [float((energy.sum(0) - energy[j])[blocks == b].mean()) for j, b in enumerate(active)
                  if bool((blocks == b).any())]
        row["own_subspace_energy"] = sum(fracs) / len(fracs)
        row["other_subspace_energy"] = sum(others) / len(others)
        row["own_subspace_energy_by_block"] = fracs  # per active block (with tokens), in block order
        layers[str(layer)] = row
    return {"loss": nll / max(count, 1), "layers": layers, "recorder_gap": gap}


def group_stats(handle, penalised: bool) -> dict:
    """Zero groups (of the last proximal step), penalised / own-block group norms, mean lambda."""
    from hf_localist.training.penalty import group_norms, penalty_weights

    lam = penalty_weights(handle)
    norms = group_norms(handle)
    mask = (lam > 0) if penalised else _would_penalise(handle)
    q = norms.q.detach()
    out = {"off_group_norm": float(q[mask].mean()), "own_group_norm": float(q[~mask].mean())}
    stats = handle.state.last_prox if penalised else None
    if stats is not None:
        out.update({"zero_groups": stats.num_zero, "penalised_groups": stats.num_penalised,
                    "zero_fraction": stats.num_zero / max(stats.num_penalised, 1),
                    "lambda_mean": float(lam[mask].mean())})
    return out


def _would_penalise(handle):
    """(L, H, n) the groups a penalty would cover (for the unpenalised runs' norms)."""
    import torch

    from hf_localist.arch.qk import head_counts
    from hf_localist.training.subspaces import head_blocks

    h, h_kv, _ = head_counts(handle)
    active = handle.config.active_block_list()
    owner = head_blocks(h, h_kv, active, handle.config.general_head_fraction)
    mask = (owner[:, None] != torch.tensor(active)[None, :]) & (owner[:, None] != 0)
    return mask[None].expand(len(handle.attention_modules), *mask.shape)


# ---------------------------------------------------------------------------------------------- summary
METRICS = ("bm_all", "bm_own", "bm_other", "pf_all", "pf_own", "pf_other", "bm_uniform", "sink_all", "sink_other",
           "own_subspace_energy", "other_subspace_energy", "bm_own_copy", "pf_own_copy", "bm_all_copy")


def summarise(runs: list[dict]) -> list[dict]:
    """Mean over seeds per (setting, multiplier)."""
    rows = []
    keys = []
    for r in runs:
        if (r["setting"], r["multiplier"]) not in keys:
            keys.append((r["setting"], r["multiplier"]))
    for setting, m in keys:
        rs = [r for r in runs if r["setting"] == setting and r["multiplier"] == m]

        def mean(values):
            values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
            return float(sum(values) / len(values)) if values else None

        row = {"setting": setting, "multiplier": m, "n_seeds": len(rs), "loss": mean([r["loss"] for r in rs]),
               "zero_fraction": mean([r.get("zero_fraction") for r in rs]),
               "lambda_mean": mean([r.get("lambda_mean") for r in rs]),
               "off_group_norm": mean([r["off_group_norm"] for r in rs]),
               "own_group_norm": mean([r["own_group_norm"] for r in rs]), "layers": {}}
        for layer in rs[0]["layers"]:
            row["layers"][layer] = {k: mean([r["layers"][layer].get(k) for r in rs]) for k in METRICS}
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    parser = C.make_parser(NAME, "Does the group-lasso penalty localise attention at dial 0 (own-block mass, PF) "
                           "under AdamW?", render=True)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=None,
                        help="run only these settings (default: all)")
    parser.add_argument("--merge", action="store_true", help="replace the runs of --settings in the results.json "
                        "already in --out_dir and keep the others")
    args = parser.parse_args(argv)
    C.setup(args)
    import json
    import tempfile

    from transformers.utils import logging as hf_logging

    out = C.out_dir(args, NAME)
    if args.render:
        return render(args, out)
    hf_logging.set_verbosity_error()
    cpu0 = time.process_time()
    if args.quick:
        plan = {"copy/block": ([args.seed], 40, [1.0]), "agnews/random": ([args.seed], 8, [1.0])}
        n_eval = 16
    else:
        copy_m, text_m = [1e-3, 1e-2, 0.1, 1.0, 10.0], [1e-2, 0.1, 1.0, 10.0]
        seeds = [args.seed, args.seed + 1]
        plan = {"copy/block": (seeds, 300, copy_m), "copy/random": (seeds, 300, copy_m),
                "copy/random-pca": (seeds, 300, copy_m), "copy/random-pca-block-order": (seeds, 300, copy_m),
                "agnews/topic": ([args.seed], 200, text_m), "agnews/random": ([args.seed], 200, text_m)}
        n_eval = 64
    if args.settings:
        plan = {k: v for k, v in plan.items() if k in args.settings}
    kept, kept_plan = [], {}
    if args.merge:
        if not (out / "results.json").is_file():
            from hf_localist.errors import LocalistConfigError

            raise LocalistConfigError(f"--merge: no {out / 'results.json'}; run without --merge first")
        old = json.loads((out / "results.json").read_text())
        kept = [r for r in old["runs"] if r["setting"] not in plan]
        kept_plan = {k: v for k, v in old["plan"].items() if k not in plan}
    runs = []
    with C.Timer() as timer, tempfile.TemporaryDirectory() as work:
        for setting, (seeds, steps, mults) in plan.items():
            for seed in seeds:
                task = Task(setting, seed, steps, n_eval, Path(work))
                for m in [None] + mults:
                    r = task.run(m)
                    runs.append(r)
                    layers = " ".join(f"L{k}: all {v['bm_all']:.3f} own {v['bm_own']:.3f}" for k, v in
                                      r["layers"].items())
                    print(f"{setting} seed {seed} m={m}: loss {r['loss']:.3f} zero {r.get('zero_fraction')} "
                          f"BM {layers} ({r['train_s']:.0f} s)", flush=True)
    merged = {}
    if args.merge:  # the wall/CPU time of the first run stays; this run's is recorded next to it
        merged = {"wall_s": old["wall_s"], "cpu_s": old["cpu_s"], "merged_settings": sorted(plan),
                  "merged_wall_s": timer.seconds}
    runs = kept + runs
    res = {"name": NAME, "quick": args.quick, "plan": {**kept_plan, **{k: {"seeds": v[0], "steps": v[1],
                                                                           "multipliers": v[2]}
                                                                       for k, v in plan.items()}},
           "lr": LR, "batch": BATCH, "n_eval": n_eval, "environment": C.environment(), "runs": runs,
           "summary": summarise(runs), "recorder_gap_max": max(r["recorder_gap"] for r in runs),
           "wall_s": timer.seconds, "cpu_s": time.process_time() - cpu0}
    res.update(merged)
    C.write_json(out / "results.json", res)  # first: the figures and the docs can be re-rendered from it
    res["reading"] = reading(res)
    figs = figures(res, out)
    res["figures"] = [f.name for f in figs]
    C.write_json(out / "results.json", res)
    if args.write_docs:
        C.publish(NAME, markdown(res), figs)
    print(f"{NAME}: {len(runs)} runs in {timer.seconds:.0f} s -> {out}")
    return res


def render(args, out: Path) -> dict:
    import json

    res = json.loads((out / "results.json").read_text())
    res["summary"] = summarise(res["runs"])
    res["reading"] = reading(res)
    figs = figures(res, out)
    res["figures"] = [f.name for f in figs]
    C.write_json(out / "results.json", res)
    if args.write_docs:
        C.publish(NAME, markdown(res), figs)
    return res


# ---------------------------------------------------------------------------------------------- figures and docs
def _rows(res: dict, setting: str) -> list[dict]:
    return [r for r in res["summary"] if r["setting"] == setting]


def _x(rows: list[dict]) -> list[float]:
    """x positions: the multipliers, and 'none' one decade left of the smallest."""
    ms = [r["multiplier"] for r in rows if r["multiplier"] is not None]
    left = min(ms) / 10 if ms else 1.0
    return [left if r["multiplier"] is None else r["multiplier"] for r in rows]


def figures(res: dict, directory: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if s in res["plan"]]
    fig, axes = plt.subplots(2, len(settings), figsize=(3.3 * len(settings), 6.2), squeeze=False)
    for col, setting in enumerate(settings):
        rows = _rows(res, setting)
        x = _x(rows)
        for row, metric in enumerate(("bm", "pf")):
            ax = axes[row][col]
            for heads, color in (("all", "tab:blue"), ("own", "tab:orange"), ("other", "tab:gray")):
                for layer, style in (("0", "o--"), ("1", "s-")):
                    y = [r["layers"][layer][f"{metric}_{heads}"] for r in rows]
                    label = {"all": "all heads", "own": "owning heads", "other": "other heads"}[heads]
                    ax.plot(x, y, style, color=color, ms=4, lw=1.2, label=f"{label}, layer {layer}")
            if metric == "bm":
                ax.axhline(rows[0]["layers"]["0"]["bm_uniform"], color="k", lw=0.8, ls=":", label="uniform attention")
            ax.set_xscale("log")
            ax.set_xticks(x)
            ax.set_xticklabels(["none" if r["multiplier"] is None else f"{r['multiplier']:g}" for r in rows],
                               fontsize=7)
            ax.set_xlabel(r"$\lambda / \lambda_{threshold}$")
            ax.set_title(setting, fontsize=9)
            ax.set_ylabel("own-block mass BM (dial 0)" if metric == "bm" else "pointer fidelity PF (dial 0)")
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return [C.save_figure(fig, directory, f"{NAME}.png")]


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pair(row: dict, key: str) -> str:
    return f"{_f(row['layers']['0'][key])} / {_f(row['layers']['1'][key])}"


def _uniform(res: dict, task: str) -> float | None:
    rows = [r for r in res["summary"] if r["setting"].startswith(task)]
    return rows[0]["layers"]["0"]["bm_uniform"] if rows else None


def table(res: dict, setting: str) -> list[str]:
    copy = setting.startswith("copy")
    head = ("| lambda / threshold | zero groups | held-out loss | BM all heads | BM owning | BM other | PF all heads | "
            "PF owning | own-subspace energy |")
    lines = [head + (" BM owning, copy queries (layer 1) |" if copy else ""),
             "| ---: " * (9 + copy) + "|"]
    for r in _rows(res, setting):
        m = "none" if r["multiplier"] is None else f"{r['multiplier']:g}"
        zero = "–" if r["zero_fraction"] is None else f"{r['zero_fraction']:.2f}"
        cells = [m, zero, _f(r["loss"]), _pair(r, "bm_all"), _pair(r, "bm_own"), _pair(r, "bm_other"),
                 _pair(r, "pf_all"), _pair(r, "pf_own"), _pair(r, "own_subspace_energy")]
        if copy:
            cells.append(_f(r["layers"]["1"]["bm_own_copy"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(res: dict) -> str:
    plan = res["plan"]
    copy_steps = next((v["steps"] for k, v in plan.items() if k.startswith("copy")), None)
    text_steps = next((v["steps"] for k, v in plan.items() if k.startswith("agnews")), None)
    lines = [
        f"## Does the penalty localise attention? (`experiments/{NAME}.py`)",
        "",
        f"Command: `python experiments/{NAME}.py --write_docs` (1 torch thread; wall time {res['wall_s']:.0f} s, CPU "
        f"time {res['cpu_s']:.0f} s, on a 2-core CPU shared with other jobs"
        + (f"; {res['merged_wall_s']:.0f} s more for the settings rerun with `--settings "
           f"{' '.join(res['merged_settings'])} --merge`" if res.get("merged_settings") else "") + ").",
        "",
        "**Question.** Under AdamW (the Trainer's default) with the AdamW-aware proximal step, off-block Q/K groups "
        "go exactly to zero. Does that raise the attention on the query's own block at dial 0 (no attention bias): "
        "block mass `BM` and pointer fidelity `PF`, measured on held-out sequences with the library's recorder?",
        "",
        "**Setup.** 4 blocks with explicit block ids; every head owns a block (`general_head_fraction=0`, 8 heads and "
        "4 K/V heads: the 2 heads that read one K head own one block). `lambda = m * lambda_threshold` "
        "(`estimate_constants` on the untrained model, `lambda_mode='threshold'`, `kappa = m`), `penalty='prox'`, "
        f"`LocalistTrainer` (default AdamW, lr {res['lr']:g} with linear decay, batch {res['batch']}), dial 0 in "
        "training and measurement; *none* = the same training without penalty.",
        "",
        f"- *Interleaved copy task* ({copy_steps} steps, seeds {plan.get('copy/block', {}).get('seeds')}, mean shown): "
        "a tiny Qwen2 (hidden 64, 2 layers), vocabulary = 4 token ranges of 16 tokens, one per block; BOS and 8 "
        "segments of 6 tokens, each block's segment twice (the second an exact repeat), interleaved at random "
        "without a block following itself; the loss is on the repeats (from their second token). `copy/block`: "
        "each block's tokens initialised inside its coordinate group (rank 12; trainable), the premise of "
        "`subspace='coordinate'`; `copy/random`: default (random) embeddings, coordinate subspaces; "
        "`copy/random-pca`: random embeddings, `subspace='pca'` calibrated on the untrained model; "
        "`copy/random-pca-block-order`: the same with the earlier calibration (`shared_first=False`: each block's "
        "top principal directions, orthogonalised in block order).",
        f"- *Multi-document real text* ({text_steps} steps, 1 seed): a tiny Llama (hidden 64, 2 layers) trained from "
        "scratch on 2-4 articles of the bundled AG News sample per sequence (word-level tokenizer of "
        "`hf_localist.demo`, articles cut at 32 words, each opened by `[SEP]`), block = the article (its topic: "
        "distinct within a sequence), coordinate groups of rank 8. `agnews/random`: default embeddings; "
        "`agnews/topic`: every topic-specific word (more than half of its training occurrences in one topic) "
        "initialised inside its topic's coordinate group, other words in the general coordinates.",
        "",
        "Columns: `BM` / `PF` as `layer 0 / layer 1`, averaged over all heads (= `handle.record()`; the per-head "
        f"values reproduce it to {res['recorder_gap_max']:.1e}), over the heads that own the query's block "
        "(`b(h)` = its block, 2 of 8), and over the other heads. PF's anchors are the first positions of the own "
        "block's runs (the library's default). *Own-subspace energy*: the fraction of `||x||^2` of a block's "
        "layer inputs (the input of the Q/K projections) inside that block's subspace `U_i`, at the end of "
        "training: the penalty can only separate blocks as far as this is high. *Zero groups*: penalised Q/K "
        "groups exactly zero after the last proximal step. Uniform attention gives `BM` "
        f"{_f(_uniform(res, 'copy'))} on the copy task and {_f(_uniform(res, 'agnews'))} on AG News (mean over "
        "queries).",
        "",
    ]
    for setting in [s for s in SETTINGS if s in plan]:
        lines += [f"`{setting}`", ""] + table(res, setting) + [""]
    lines += [f"![locality against lambda](figures/experiments/{NAME}.png)", "", "**Reading.**", ""]
    lines += res["reading"]
    return "\n".join(lines)


def _get(res: dict, setting: str, m):
    return next((r for r in res["summary"] if r["setting"] == setting and r["multiplier"] == m), None)


def _arrow(a: dict, b: dict, layer: str, key: str) -> str:
    return f"{_f(a['layers'][layer][key])} -> {_f(b['layers'][layer][key])}"


def reading(res: dict) -> list[str]:
    """The reading of the numbers (each bullet only when its settings ran)."""
    lines = []
    cb0, cb1 = _get(res, "copy/block", None), _get(res, "copy/block", 1.0)
    if cb0 and cb1:
        ms = [r["multiplier"] for r in _rows(res, "copy/block") if r["multiplier"] is not None]
        low = _get(res, "copy/block", min(ms))
        lines.append(
            "- **The penalty localises the heads that own the query's block, when the block's features are in its "
            "subspace** (`copy/block`, none -> m = 1): owning heads' BM "
            f"{_arrow(cb0, cb1, '0', 'bm_own')} (layer 0) and {_arrow(cb0, cb1, '1', 'bm_own')} (layer 1), on the "
            f"queries that must copy (layer 1) {_f(cb0['layers']['1']['bm_own_copy'])} -> "
            f"{_f(cb1['layers']['1']['bm_own_copy'])}; owning heads' PF {_arrow(cb0, cb1, '1', 'pf_own')} (layer 1; "
            "a copy query looks for the position after its token's first occurrence, not for the segment's first "
            "position, so PF is low on those queries in every run). "
            f"Held-out loss {_f(cb0['loss'])} -> {_f(cb1['loss'])}: at 300 steps the restriction helps the tiny model "
            f"learn the copy. The owning heads' BM grows from the smallest multiplier (m = {min(ms):g}: layer 1 "
            f"{_f(low['layers']['1']['bm_own'])}, zero groups {_f(low['zero_fraction'], '.2f')}) and is flat from "
            "m = 0.01: under AdamW the preconditioned shrink is large for groups whose gradient is small, long "
            "before they are exactly zero. From the multiplier where every group is zero from the first steps on, "
            "the runs coincide.")
        lines.append(
            "- **It does not raise the mean over all heads** (layer 0 "
            f"{_arrow(cb0, cb1, '0', 'bm_all')}, layer 1 {_arrow(cb0, cb1, '1', 'bm_all')}). The 6 of 8 heads that do "
            "not own the query's block lose it: at layer 0 their BM is "
            f"{_f(cb1['layers']['0']['bm_other'])}, the value of uniform attention "
            f"({_f(cb1['layers']['0']['bm_uniform'])}). This is structural, not a matter of lambda: once head h "
            "reads no feature of block i (Q and K groups of U_i at zero), the keys of block i and of every other "
            "block h does not own reach its logits through the general features only, so for a block-i query the "
            "head cannot tell its own block from the others; with one block per head, only the 1/K of the heads "
            "that own a query's block can localise it. The locality the penalty creates is the owning heads' "
            "(measure it there); locality of every head at dial 0 needs the dial.")
    cr0, cr1 = _get(res, "copy/random", None), _get(res, "copy/random", 1.0)
    if cr0 and cr1:
        lines.append(
            "- **Zero groups without locality: coordinate subspaces on random embeddings** (`copy/random`). Every "
            f"penalised group is exactly zero at m = 1 ({_f(cr1['zero_fraction'], '.2f')}), yet owning heads' BM "
            f"goes {_arrow(cr0, cr1, '0', 'bm_own')} (layer 0) and {_arrow(cr0, cr1, '1', 'bm_own')} (layer 1), all "
            f"heads {_arrow(cr0, cr1, '1', 'bm_all')} (layer 1), and the loss {_f(cr0['loss'])} -> "
            f"{_f(cr1['loss'])}. A block's layer-0 inputs have only {_f(cr1['layers']['0']['own_subspace_energy'])} "
            "of their energy in its coordinate group (about r / E = 12 / 64 for random vectors): the groups are not "
            "the block's features, so the penalty only takes 3/4 of the input coordinates from every head. The "
            "issue's earlier measurement (a tiny Qwen2 on a copy task: 0.407 with the penalty against 0.468 "
            "without) points the same way.")
    cp0, cp1 = _get(res, "copy/random-pca", None), _get(res, "copy/random-pca", 1.0)
    if cp0 and cp1:
        own0, own1 = (cp1["layers"][k]["bm_own"] - cp0["layers"][k]["bm_own"] for k in ("0", "1"))
        verdict = "localise layer 0 a little, not layer 1" if own0 > 0.02 and own1 < 0 else "do not help either"
        lines.append(
            f"- **Calibrated (PCA) subspaces on the same random embeddings** (`copy/random-pca`) {verdict}: "
            "they hold more of a block's layer-0 energy than coordinate groups "
            f"({_f(cp1['layers']['0']['own_subspace_energy'])} against "
            f"{_f(cr1['layers']['0']['own_subspace_energy']) if cr1 else '–'}), but a block's 16 random token "
            "vectors span more directions than the rank-12 subspace and the embeddings move in training (layer 1 "
            "inputs, calibrated on the untrained model: "
            f"{_f(cp1['layers']['1']['own_subspace_energy'])}); owning heads' BM {_arrow(cp0, cp1, '0', 'bm_own')} "
            f"(layer 0) and {_arrow(cp0, cp1, '1', 'bm_own')} (layer 1), loss {_f(cp0['loss'])} -> "
            f"{_f(cp1['loss'])}.")
    cb0, cb1 = _get(res, "copy/random-pca-block-order", None), _get(res, "copy/random-pca-block-order", 1.0)
    if cp1 and cb0 and cb1:
        lines.append(
            "- **Shared directions kept general halve the damage** (`copy/random-pca` against "
            "`copy/random-pca-block-order`, the calibration before `shared_first`): at m = 1 the loss is "
            f"{_f(cp1['loss'])} against {_f(cb1['loss'])} (no penalty: {_f(cb0['loss'])}); owning heads' BM "
            f"{_f(cp1['layers']['0']['bm_own'])} against {_f(cb1['layers']['0']['bm_own'])} (layer 0) and "
            f"{_f(cp1['layers']['1']['bm_own'])} against {_f(cb1['layers']['1']['bm_own'])} (layer 1). In block "
            "order the first block's subspace took the directions every block varies along, and the penalty took "
            "them from every other head; kept general, they stay with every head. It does not make the blocks' "
            "features separable: layer 1 still loses locality.")
    an = [(s, _get(res, s, None), _get(res, s, 1.0)) for s in ("agnews/topic", "agnews/random")]
    an = [(s, a, b) for s, a, b in an if a and b]
    if an:
        parts = "; ".join(
            f"`{s}`: all heads {_arrow(a, b, '1', 'bm_all')}, owning {_arrow(a, b, '1', 'bm_own')} (layer 1), "
            f"own-subspace energy {_f(b['layers']['0']['own_subspace_energy'])}, loss {_f(a['loss'])} -> "
            f"{_f(b['loss'])}" for s, a, b in an)
        lines.append(
            "- **Multi-document text: no localisation from the penalty** (none -> m = 1; " + parts + "): changes of "
            "a few hundredths either way, the same in owning and other heads. Which article a word belongs to is "
            "not a feature of its embedding (most words are not topic-specific, and the topic-specific ones carry "
            "little of the energy even when initialised in their topic's group: own-subspace energy about 0.1), so "
            "no head can tell its own block's keys from its inputs.")
    lines.append(
        "- **Design consequences.** (1) Read the penalty's locality on the owning heads (`BM`/`PF` with `b(h)` = "
        "the query's block), not on the all-heads mean of `handle.record()`. (2) The penalty separates blocks only "
        "as far as each block's features lie in its subspace. In a model trained from scratch, coordinate "
        "subspaces need embeddings built that way (tokens of block i in its coordinate group); with random "
        "embeddings neither coordinate groups nor subspaces calibrated at initialisation hold the blocks' features "
        "(`copy/random`, `copy/random-pca`), and text whose blocks are documents has no such features to put "
        "there. (A pretrained model whose inputs separate the blocks is what `subspace='pca'` is for; not tested "
        "here.) (3) `head_blocks` gave no head to some blocks when general heads "
        "took whole K groups (8 heads, 4 K heads, 4 blocks, the default `general_head_fraction=0.25`: block 4 had "
        "no owning head, so the penalty could localise none of its queries); it now falls back to one head at a "
        "time, as it already did with fewer K heads than blocks.")
    return lines


if __name__ == "__main__":
    main()
