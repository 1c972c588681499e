"""Threshold calibration: does group-lasso localisation switch on at the predicted lambda_threshold?

docs/design.md section 5 predicts, from constants measured on calibration batches,

    lambda_threshold = 2 L_l R_x sigma_X sqrt(|X_i|) / (tau (1 - rho_max)) * exp(-delta/tau)

per (layer, head, block): above it the proximal group-lasso step keeps the off-block Q/K groups of a head at exactly
zero; below it the data gradient pulls them back. For a zero group the exact condition (KKT, with plain gradient steps
and the prox step ``W_g <- max(0, 1 - lr lambda / ||W_g||) W_g``) is ``||grad_g L_data|| <= lambda``.

Setup: the synthetic task of ``tests/test_trainer.py`` (3 known blocks on coordinate groups of a 48-wide residual
stream, frozen block-structured embeddings, every later run must retrieve a key token that lives in *another* block,
so the data pull attention across blocks). The constants are measured on the untrained model
(``estimate_constants`` -> ``report.threshold()``, the documented workflow: calibrate, then train with
``lambda_mode='threshold'``), and the model is trained with ``lambda = m * lambda_threshold`` for multipliers m
below and above 1 (``kappa = m``, ``alpha_train = 1``), with AdamW (the Trainer's default optimizer; the proximal step
preconditioned by AdamW's own per-coordinate step, ``training/precondition.py``), with SGD (the setting the threshold
is derived for), and with AdamW and the plain ``lr * lambda`` shrink (``prox_preconditioner='none'``, the behaviour
before the preconditioned step). At the end: the fraction of off-block groups that are exactly zero, their norms next
to the own-block groups, KKT ratios ``||grad_g L_data|| / lambda_g``, and PF / BM of the cross-block queries.

Run: ``python experiments/threshold.py [--quick] [--write_docs]``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "threshold"
# The synthetic task (tests/test_trainer.py): residual width, rank of a block group, blocks, tokens per block,
# key tokens per block, run length.
E_S, R_S, NB_S, VB_S, NK_S, RUN_S = 48, 12, 3, 12, 4, 5
V_S = 3 + NB_S * VB_S


def synthetic_batch(n: int, g):
    """input_ids, block_ids, labels (HF convention: logits[t] is scored against labels[t + 1]).

    BOS + three runs of 5 tokens, one per block in random order; the first run opens with a key token, and every
    position of the later runs must predict that key. A trailing pad token carries the last position's label.
    """
    import torch

    ids, blocks, labels = [], [], []
    for _ in range(n):
        row, brow, lrow, key = [1], [0], [-100, -100], None
        for b in (torch.randperm(NB_S, generator=g) + 1).tolist():
            lo = 3 + (b - 1) * VB_S
            toks = lo + NK_S + torch.randint(0, VB_S - NK_S, (RUN_S,), generator=g)
            if key is None:
                toks[0] = lo + int(torch.randint(0, NK_S, (1,), generator=g))
                key = int(toks[0])
                lrow += [-100] * RUN_S
            else:
                lrow += [key] * RUN_S
            row += toks.tolist()
            brow += [b] * RUN_S
        ids.append(row + [0])
        blocks.append(brow + [brow[-1]])
        labels.append(lrow)
    return {"input_ids": torch.tensor(ids), "block_ids": torch.tensor(blocks), "labels": torch.tensor(labels)}


def synthetic_model(seed: int, lambda_mode: str = "fixed", lam: float = 0.0, kappa: float = 1.5):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_localist as hl

    cfg = LlamaConfig(vocab_size=V_S, hidden_size=E_S, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:3, :R_S] = torch.randn(3, R_S, generator=g)
        for b in range(1, NB_S + 1):
            lo = 3 + (b - 1) * VB_S
            emb[lo: lo + VB_S, b * R_S:(b + 1) * R_S] = torch.randn(VB_S, R_S, generator=g)
    model.model.embed_tokens.weight.requires_grad_(False)
    handle = hl.apply_localist(model, hl.LocalistConfig(
        alpha=0.0, block_assignment="explicit", max_blocks=NB_S, penalty="prox", penalty_lambda=lam,
        lambda_mode=lambda_mode, alpha_train=1.0, kappa=kappa, general_head_fraction=0.0, subspace_rank=R_S))
    return model, handle


def _grad_group_norms(handle):
    """(L, H, n) and (L, H_kv, n): ||grad_g|| of every Q / K group, from the weights' current .grad."""
    import torch

    from hf_localist.arch.qk import qk_head_weights
    from hf_localist.training.penalty import _project
    from hf_localist.training.subspaces import layer_subspaces

    u = layer_subspaces(handle)
    qs, ks = [], []
    for layer in range(len(handle.attention_modules)):
        gq, gk = qk_head_weights(handle, layer, grad=True)
        qs.append(torch.linalg.vector_norm(_project(gq, u[layer]), dim=(-2, -1)))
        ks.append(torch.linalg.vector_norm(_project(gk, u[layer]), dim=(-2, -1)))
    return torch.stack(qs), torch.stack(ks)


def locality(model, handle) -> dict:
    """PF and BM per layer of the queries that must retrieve a key from another block (later runs), at dial 0."""
    import torch

    b = synthetic_batch(32, torch.Generator().manual_seed(999))
    target = torch.where(b["labels"].roll(-1, dims=1) == -100, torch.zeros_like(b["block_ids"]), b["block_ids"])
    with torch.no_grad(), handle.dial(0.0), handle.record() as rec:
        model(input_ids=b["input_ids"], block_ids=b["block_ids"], target_block_ids=target)
    return {str(layer): {"pf": row["pointer_fidelity"], "bm": row["block_mass"]}
            for layer, row in rec.summary()["layers"].items()}


def train_run(seed: int, optimizer: str, multiplier: float | None, threshold, steps: int, lr: float,
              track: bool = False) -> dict:
    """Train with lambda = multiplier * threshold (None: no penalty); return the end-of-training measurements."""
    import torch

    from hf_localist.training.penalty import group_norms, kkt_ratios, penalty_weights, prox_step

    if multiplier is None:
        model, handle = synthetic_model(seed, "fixed", 0.0)
    else:
        model, handle = synthetic_model(seed, "threshold", kappa=multiplier)
        handle.state.lambda_threshold = threshold.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw-plain":
        handle.update(prox_preconditioner="none")
    # weight_decay=0: the Trainer's default for AdamW.
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lam = penalty_weights(handle)  # (L, H, n); Q groups; K groups carry the same (one K head per query head)
    pen = lam > 0
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    max_grad_at_zero = torch.zeros(lam.shape)  # per Q group: largest data gradient norm seen while the group was 0
    stats = None
    for _ in range(steps):
        loss = model(**synthetic_batch(16, g)).loss
        opt.zero_grad()
        loss.backward()
        if track and multiplier is not None:
            gq, _ = _grad_group_norms(handle)
            was_zero = group_norms(handle).q.detach() == 0
            max_grad_at_zero = torch.where(was_zero, torch.maximum(max_grad_at_zero, gq), max_grad_at_zero)
        opt.step()
        if multiplier is not None:
            stats = prox_step(handle, lr, optimizer=opt)
    # Data-loss gradient at the final weights (a fresh, larger batch) for the KKT check.
    opt.zero_grad()
    final_loss = model(**synthetic_batch(64, torch.Generator().manual_seed(seed + 7))).loss
    final_loss.backward()
    gq, gk = _grad_group_norms(handle)
    norms = group_norms(handle)
    q, k = norms.q.detach(), norms.k.detach()
    out = {"seed": seed, "optimizer": optimizer, "multiplier": multiplier, "final_loss": float(final_loss.detach()),
           "own_group_norm_mean": float(q[~pen].mean())}
    if multiplier is not None:
        zq, zk = stats.zero_q, stats.zero_k
        ratios = kkt_ratios(handle, stats)
        nonzero_ratio = (gq / lam.clamp_min(1e-30))[pen & ~zq]
        out.update({
            "zero_fraction": float((zq[pen].sum() + zk[pen].sum()) / (2 * pen.sum())),
            "zero_fraction_q": float(zq[pen].double().mean()), "zero_fraction_k": float(zk[pen].double().mean()),
            "off_group_norm_mean": float(torch.cat([q[pen], k[pen]]).mean()),
            "off_grad_norm_zero_mean": (float(torch.cat([gq[pen & zq], gk[pen & zk]]).mean())
                                        if bool(zq.any()) else None),
            "off_grad_norm_nonzero_mean": (float(torch.cat([gq[pen & ~zq], gk[pen & ~zk]]).mean())
                                           if bool((pen & ~zq).any()) else None),
            "own_grad_norm_mean": float(gq[~pen].mean()),
            "kkt_ratio_max": float(ratios.max()) if ratios.numel() else None,
            "kkt_holds_fraction": float((ratios <= 1 + 1e-6).double().mean()) if ratios.numel() else None,
            "nonzero_grad_over_lambda_median": float(nonzero_ratio.median()) if nonzero_ratio.numel() else None,
            "lambda_mean": float(lam[pen].mean()),
            "_max_grad_at_zero": max_grad_at_zero, "_zero_q": zq, "_pen": pen,
        })
    model.eval()
    out["locality"] = locality(model, handle)
    return out


def calibrate(seed: int):
    import torch

    from hf_localist.training.calibration import estimate_constants

    model, handle = synthetic_model(seed)
    loader = [synthetic_batch(16, torch.Generator().manual_seed(50 + seed * 10 + i)) for i in range(4)]
    return handle, estimate_constants(handle, loader)


def figures(res: dict, runs: list, directory: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for opt, color in (("adamw", "tab:orange"), ("sgd", "tab:blue"), ("adamw-plain", "tab:gray")):
        rows = [r for r in res["summary"] if r["optimizer"] == opt]
        m = [r["multiplier"] for r in rows]
        axes[0].plot(m, [r["zero_fraction"] for r in rows], "o-", color=color, label=f"{opt.upper()}")
        axes[1].plot(m, [r["off_group_norm_mean"] for r in rows], "o-", color=color, label=f"{opt.upper()} off-block")
        axes[1].plot(m, [r["own_group_norm_mean"] for r in rows], "s--", color=color, ms=3,
                     label=f"{opt.upper()} own-block")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=1, ls=":")
        ax.set_xlabel(r"$\lambda / \lambda_{threshold}$ (predicted)")
    axes[0].set_ylabel("off-block groups exactly 0")
    axes[0].set_title("Localisation vs lambda")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("mean group norm (end)")
    axes[1].set_title("Group norms at the end")
    axes[1].legend(fontsize=6)
    ax = axes[2]
    thr = np.asarray(res["predicted"]["threshold_penalised"])
    emp = np.asarray(res["empirical"]["max_grad_at_zero"])
    ax.scatter(thr, emp, s=12, color="tab:blue")
    lo, hi = min(thr.min(), emp[emp > 0].min() if (emp > 0).any() else thr.min()) / 2, max(thr.max(), emp.max()) * 2
    ax.plot([lo, hi], [lo, hi], color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"predicted $\lambda_{threshold}$ per (layer, head, block)")
    ax.set_ylabel(r"max $\|\nabla_g L_{data}\|$ while zero")
    ax.set_title(f"SGD, m = {res['empirical']['multiplier']:g}: needed vs predicted")
    fig.tight_layout()
    paths.append(C.save_figure(fig, directory, "threshold.png"))
    return paths


def _fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(res: dict) -> str:
    p = res["predicted"]
    lines = [
        "## Threshold calibration (`experiments/threshold.py`)",
        "",
        f"Command: `python experiments/threshold.py --write_docs` (seeds {res['seeds']}, 1 torch thread; wall time "
        f"{res['wall_s']:.0f} s, CPU time {res.get('cpu_s', float('nan')):.0f} s, on a 2-core CPU shared with other "
        "jobs).",
        "",
        "**Question.** Above the predicted `lambda_threshold` (docs/design.md section 5), does the proximal "
        "group-lasso step keep every off-block Q/K group exactly zero, and below it not?",
        "",
        "**Setup.** The synthetic task of `tests/test_trainer.py`: a 2-layer Llama (hidden 48, 4 heads, one K head per "
        "query head, no general heads), 3 blocks whose tokens live on coordinate groups of the residual stream "
        "(rank 12, frozen embeddings, `subspace='coordinate'`), sequences BOS + three runs of 5 tokens; every later "
        "run must predict a key token that sits in the first run, i.e. in *another* block, so the data pull the "
        "heads across blocks. The constants are measured once per seed on the untrained model with "
        "`estimate_constants` (4 batches of 16), and `report.threshold()` (p5 margin per head) is installed with "
        "`lambda_mode='threshold'`; the model then trains "
        f"{res['steps']} steps (batch 16) with `lambda = m * lambda_threshold` (`kappa = m`, `alpha_train = 1`) and "
        f"the prox step after every optimizer step: AdamW (lr {res['lr_adam']:g}, weight decay 0, the prox step "
        "preconditioned by AdamW's step), SGD (lr "
        f"{res['lr_sgd']:g}, the setting the threshold is derived for), and AdamW with the plain lr * lambda shrink "
        "(`prox_preconditioner='none'`, seed 0 only). 16 penalised Q groups and 16 penalised K groups (2 layers x 4 "
        "heads x 2 other blocks).",
        "",
        "**Predicted threshold** (seed 0; constants per layer):",
        "",
        "| layer | tau | delta p5 (raw) | R_x | sigma_X (blocks 1-3) | rho_max | L_l (heads) | lambda_threshold of the "
        "penalised (head, block) groups |",
        "| ---: | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for li, row in enumerate(p["per_layer"]):
        lines.append(
            f"| {li} | {row['tau']:.3f} | {row['delta_p5']:.3f} | {row['R_x']:.2f} | "
            f"{', '.join(f'{s:.2f}' for s in row['sigma_X'])} | {row['rho_max']:.1e} | "
            f"{', '.join(f'{v:.1e}' for v in row['L_l'])} | "
            f"{', '.join(f'h{h}/b{b}: {v:.4f}' for h, b, v in row['penalised'])} |")
    lines += [
        "",
        f"Mean `|X_i|` = {', '.join(f'{x:.2f}' for x in p['X_size'])} positions per sequence. Threshold after the "
        f"same number of steps without penalty (for comparison, not used): median "
        f"{res['predicted_after_training']['median']:.4f}, range {res['predicted_after_training']['min']:.4f} - "
        f"{res['predicted_after_training']['max']:.4f} (at init: median {p['median']:.4f}, range {p['min']:.4f} - "
        f"{p['max']:.4f}).",
        "",
        "**End of training** (mean over seeds; norms are Frobenius norms of the groups; KKT ratio = "
        "`||grad_g L_data|| / lambda_g` on a fresh batch of 64, for the zero groups; BM/PF of the queries that must "
        "look across blocks, own block as target, dial 0, layer 0 / layer 1):",
        "",
        "| optimizer | m = λ/λ* | off-block groups = 0 | off-block norm | own-block norm | grad norm, zero groups | "
        "grad norm, non-zero off-block | KKT max (zero groups) | data loss | BM L0 / L1 | PF L0 / L1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    base = res["baseline"]
    for opt in ("adamw", "sgd", "adamw-plain"):
        b = base.get(opt)
        if b is None:
            continue
        lines.append(f"| {opt.upper()} | no penalty | – | – | {b['own_group_norm_mean']:.3f} | – | – | – | "
                     f"{b['final_loss']:.3f} | {b['bm0']:.3f} / {b['bm1']:.3f} | {b['pf0']:.3f} / {b['pf1']:.3f} |")
        for r in [r for r in res["summary"] if r["optimizer"] == opt]:
            lines.append(
                f"| {opt.upper()} | {r['multiplier']:g} | {r['zero_fraction']:.3f} | {r['off_group_norm_mean']:.4f} | "
                f"{r['own_group_norm_mean']:.3f} | {_fmt(r['off_grad_norm_zero_mean'], '.1e')} | "
                f"{_fmt(r['off_grad_norm_nonzero_mean'], '.1e')} | {_fmt(r['kkt_ratio_max'])} | "
                f"{r['final_loss']:.3f} | {r['bm0']:.3f} / {r['bm1']:.3f} | {r['pf0']:.3f} / {r['pf1']:.3f} |")
    e = res["empirical"]
    lines += [
        "",
        "![threshold](figures/experiments/threshold.png)",
        "",
        "Right panel: for SGD at m = "
        f"{e['multiplier']:g} (all groups at zero), the largest data-gradient norm each off-block Q group felt while "
        "it was exactly zero (the lambda it actually needed to stay there) against its predicted threshold. "
        f"Predicted >= needed for {e['predicted_covers_fraction']:.3f} of the groups; needed / predicted: median "
        f"{e['ratio_median']:.2f}, max {e['ratio_max']:.2f}.",
        "",
        "**Reading.**",
        "",
    ]
    lines += res["reading"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = C.make_parser(NAME, "Does group-lasso localisation switch on at the predicted lambda_threshold?",
                           render=True)
    args = parser.parse_args(argv)
    C.setup(args)
    import time

    import torch

    out = C.out_dir(args, NAME)
    if args.render:
        return render(args, out)
    cpu0 = time.process_time()
    seeds = [args.seed] if args.quick else [args.seed, args.seed + 1, args.seed + 2]
    steps = 300 if args.quick else 600
    lr_sgd, lr_adam = 0.3, 1e-2
    mult_sgd = [0.1, 10.0] if args.quick else [0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 10.0]
    mult_adam = [0.1, 10.0] if args.quick else mult_sgd
    mult_plain = [] if args.quick else [1.0, 10.0, 100.0, 1000.0]
    with C.Timer() as timer:
        runs, thresholds, reports = [], {}, {}
        for seed in seeds:
            handle, rep = calibrate(seed)
            thresholds[seed] = rep.threshold()
            reports[seed] = rep
            from hf_localist.training.penalty import penalty_weights

            handle.state.lambda_threshold = thresholds[seed]
            handle.update(lambda_mode="threshold", kappa=1.0)
            pen = penalty_weights(handle) > 0
            for opt, mults in (("adamw", mult_adam), ("sgd", mult_sgd),
                               ("adamw-plain", mult_plain if seed == seeds[0] else [])):
                if not mults:
                    continue
                lr = lr_sgd if opt == "sgd" else lr_adam
                runs.append(train_run(seed, opt, None, None, steps, lr))
                for m in mults:
                    track = opt == "sgd" and seed == seeds[0] and m == max(mult_sgd)
                    runs.append(train_run(seed, opt, m, thresholds[seed], steps, lr, track))
        # Threshold the same constants give after training without penalty (seed 0), for comparison.
        model, handle = synthetic_model(seeds[0])
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr_sgd)
        g = torch.Generator().manual_seed(seeds[0] + 1)
        for _ in range(steps):
            loss = model(**synthetic_batch(16, g)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        from hf_localist.training.calibration import estimate_constants

        loader = [synthetic_batch(16, torch.Generator().manual_seed(50 + seeds[0] * 10 + i)) for i in range(4)]
        thr_trained = estimate_constants(handle, loader).threshold()[pen]

    rep0, thr0 = reports[seeds[0]], thresholds[seeds[0]]
    per_layer = []
    for li in range(len(rep0.layers)):
        per_layer.append({
            "tau": rep0.tau[li], "delta_p5": rep0.delta[li]["p5"], "R_x": rep0.R_x[li], "sigma_X": rep0.sigma_X[li],
            "rho_max": rep0.rho_max[li], "L_l": rep0.L_l[li],
            "penalised": [(h, rep0.active_blocks[j], float(thr0[li, h, j])) for h in range(thr0.shape[1])
                          for j in range(thr0.shape[2]) if bool(pen[li, h, j])],
        })
    thr_pen = thr0[pen]
    summary = []
    for opt, mults in (("adamw", mult_adam), ("sgd", mult_sgd), ("adamw-plain", mult_plain)):
        for m in mults:
            rs = [r for r in runs if r["optimizer"] == opt and r["multiplier"] == m]

            def mean(key, rs=rs):
                vals = [r[key] for r in rs if r.get(key) is not None]
                return float(sum(vals) / len(vals)) if vals else None

            row = {"optimizer": opt, "multiplier": m, "n_seeds": len(rs)}
            for key in ("zero_fraction", "zero_fraction_q", "zero_fraction_k", "off_group_norm_mean",
                        "own_group_norm_mean", "off_grad_norm_zero_mean", "off_grad_norm_nonzero_mean", "final_loss",
                        "lambda_mean", "nonzero_grad_over_lambda_median", "kkt_holds_fraction"):
                row[key] = mean(key)
            kkts = [r["kkt_ratio_max"] for r in rs if r["kkt_ratio_max"] is not None]
            row["kkt_ratio_max"] = max(kkts) if kkts else None
            row["zero_fraction_min_over_seeds"] = min(r["zero_fraction"] for r in rs)
            for layer in ("0", "1"):
                row[f"bm{layer}"] = float(sum(r["locality"][layer]["bm"] for r in rs) / len(rs))
                row[f"pf{layer}"] = float(sum(r["locality"][layer]["pf"] for r in rs) / len(rs))
            summary.append(row)
    baseline = {}
    for opt in ("adamw", "sgd", "adamw-plain"):
        rs = [r for r in runs if r["optimizer"] == opt and r["multiplier"] is None]
        if rs:
            baseline[opt] = {"final_loss": sum(r["final_loss"] for r in rs) / len(rs),
                             "own_group_norm_mean": sum(r["own_group_norm_mean"] for r in rs) / len(rs),
                             **{f"{k}{layer}": sum(r["locality"][layer][k] for r in rs) / len(rs)
                                for k in ("bm", "pf") for layer in ("0", "1")}}
    # Needed vs predicted lambda: a run with every group at zero (the largest SGD multiplier), seed 0.
    m_emp = max(mult_sgd)
    emp_run = next(r for r in runs if r["optimizer"] == "sgd" and r["multiplier"] == m_emp and r["seed"] == seeds[0])
    needed = emp_run["_max_grad_at_zero"][pen]
    covers = float((thr_pen >= needed).double().mean())
    ratio = needed / thr_pen
    empirical = {"multiplier": m_emp, "max_grad_at_zero": needed.tolist(), "predicted_covers_fraction": covers,
                 "ratio_median": float(ratio.median()), "ratio_max": float(ratio.max())}
    sgd = [r for r in summary if r["optimizer"] == "sgd"]
    above = [r for r in sgd if r["multiplier"] >= 1.0]
    below = [r for r in sgd if r["multiplier"] < 1.0]
    transition = next((r["multiplier"] for r in sgd if r["zero_fraction_min_over_seeds"] == 1.0), None)
    adam = [r for r in summary if r["optimizer"] == "adamw"]
    adam_transition = next((r["multiplier"] for r in adam if r["zero_fraction_min_over_seeds"] == 1.0), None)
    plain = [r for r in summary if r["optimizer"] == "adamw-plain"]
    plain_transition = next((r["multiplier"] for r in plain if r["zero_fraction_min_over_seeds"] == 1.0), None)
    res = {
        "name": NAME, "quick": args.quick, "seeds": seeds, "steps": steps, "lr_sgd": lr_sgd, "lr_adam": lr_adam,
        "environment": C.environment(),
        "predicted": {"per_layer": per_layer, "X_size": rep0.X_size, "threshold_penalised": thr_pen.tolist(),
                      "median": float(thr_pen.median()), "min": float(thr_pen.min()), "max": float(thr_pen.max()),
                      "delta": rep0.delta},
        "predicted_after_training": {"median": float(thr_trained.median()), "min": float(thr_trained.min()),
                                     "max": float(thr_trained.max())},
        "summary": summary, "baseline": baseline, "empirical": empirical,
        "sgd_all_zero_above_threshold": all(r["zero_fraction_min_over_seeds"] == 1.0 for r in above),
        "sgd_max_zero_fraction_below_half_threshold": max(
            [r["zero_fraction"] for r in sgd if r["multiplier"] <= 0.5] or [float("nan")]),
        "sgd_transition_multiplier": transition, "adam_transition_multiplier": adam_transition,
        "adamw_plain_transition_multiplier": plain_transition,
        "adamw_max_zero_fraction_below_half_threshold": max(
            [r["zero_fraction"] for r in adam if r["multiplier"] <= 0.5] or [float("nan")]),
        "wall_s": timer.seconds, "cpu_s": time.process_time() - cpu0,
    }
    res["reading"] = reading(res, below)
    figs = figures(res, runs, out)
    res["figures"] = [f.name for f in figs]
    C.write_json(out / "results.json", res)
    if args.write_docs:
        C.publish(NAME, markdown(res), figs)
    print(f"{NAME}: predicted threshold median {res['predicted']['median']:.4g}; SGD all-zero from m = {transition}; "
          f"AdamW from m = {adam_transition} (plain shrink: {plain_transition}); {timer.seconds:.1f} s -> {out}")
    return res


def render(args, out: Path) -> dict:
    import json

    res = json.loads((out / "results.json").read_text())
    res["reading"] = reading(res)
    figs = figures(res, None, out)
    C.write_json(out / "results.json", res)
    if args.write_docs:
        C.publish(NAME, markdown(res), figs)
    return res


def reading(res: dict, below: list | None = None) -> list[str]:
    sgd = [r for r in res["summary"] if r["optimizer"] == "sgd"]
    adam = [r for r in res["summary"] if r["optimizer"] == "adamw"]
    plain = [r for r in res["summary"] if r["optimizer"] == "adamw-plain"]
    t = res["sgd_transition_multiplier"]
    e = res["empirical"]
    lines = []
    at1 = next((r for r in sgd if r["multiplier"] == 1.0), None)
    if t is not None and at1 is not None:
        partial = ", ".join("%.2f at m = %g" % (r["zero_fraction"], r["multiplier"])
                            for r in sgd if r["multiplier"] < t)
        kkts = [r["kkt_ratio_max"] for r in sgd if r["multiplier"] >= t and r["kkt_ratio_max"] is not None]
        lines.append(
            f"- With SGD the predicted threshold is the right order of magnitude, and slightly low: at m = 1 "
            f"{at1['zero_fraction']:.2f} of the off-block groups end exactly zero, and all of them (every seed) from "
            f"m = {t:g} on; below, the fraction falls ({partial}). The safety factor kappa = 1.5-2 that docs/design.md "
            f"suggests is what it took here. For the zero groups the KKT condition holds on a fresh batch at m >= "
            f"{t:g} (max ratio {max(kkts) if kkts else float('nan'):.2f}); ratios a little above 1 at smaller m are "
            "batch noise (the prox step saw other batches).")
    lines.append(
        f"- The threshold does not bound the gradient *during* training: the right panel shows that, while "
        f"exactly zero, the off-block groups met data gradients {e['ratio_median']:.1f}x (median) up to "
        f"{e['ratio_max']:.0f}x their predicted threshold (predicted >= needed for "
        f"{e['predicted_covers_fraction']:.2f} of the groups). At init the loss barely depends on attention (L_l is "
        "tiny); once the model starts retrieving the key, gradients grow, groups re-open, and the prox step zeroes "
        "them again as the loss converges. So 'zero at the end' holds from about 2x the prediction; staying zero all "
        f"along would need at least about {e['ratio_max']:.0f}x.")
    if adam:
        at = res["adam_transition_multiplier"]
        partial = ", ".join("%.2f at m = %g" % (r["zero_fraction"], r["multiplier"]) for r in adam
                            if at is None or r["multiplier"] < at)
        kkts = [r["kkt_ratio_max"] for r in adam if at is not None and r["multiplier"] >= at
                and r["kkt_ratio_max"] is not None]
        lines.append(
            "- With AdamW and the preconditioned proximal step, groups are exactly zero at the end for every seed "
            f"from m = {_fmt(at, 'g')} on (SGD: from m = {_fmt(t, 'g')}); below that: {partial or 'none'}. The zero "
            "groups satisfy the KKT condition on a fresh batch (max ratio "
            f"{_fmt(max(kkts) if kkts else None, '.2f')}). The shrink uses AdamW's own step on the group "
            "(lr / (sqrt(v_hat) + eps), averaged over the group), so a zero "
            "group stays zero exactly when its data gradient is below lambda, the condition the threshold is "
            "calibrated for: the same multipliers work for SGD and AdamW.")
    if plain:
        pt = res.get("adamw_plain_transition_multiplier")
        lam = next((r["lambda_mean"] for r in plain if r["multiplier"] == pt), None)
        lines.append(
            f"- With AdamW and the plain shrink lr * lambda (`prox_preconditioner='none'`, the step before this "
            f"change) groups reach exact zero only from m = {_fmt(pt, 'g')} (lambda about {_fmt(lam, '.2g')}): Adam "
            "normalises each coordinate's step to about lr whatever the gradient, so the unpreconditioned prox must be "
            "about 1/sqrt(v) times larger to win.")
    r1 = next((r for r in sgd if r["multiplier"] == max(x["multiplier"] for x in sgd)), None)
    b = res["baseline"].get("sgd")
    if r1 and b:
        lines.append(
            f"- Zero groups are not concentrated attention. With every off-block group at zero (SGD, m = "
            f"{r1['multiplier']:g}) the block mass of the cross-block queries in layer 0 is {r1['bm0']:.3f} "
            f"against {b['bm0']:.3f} without penalty (PF {r1['pf0']:.3f} against {b['pf0']:.3f}): a head that "
            "cannot read a block's features gives that block's queries near-uniform attention (q = 0), not "
            f"attention on their own block. The data loss stays at {r1['final_loss']:.3f} (without penalty "
            f"{b['final_loss']:.3f}): layer 1 reads the residual stream after layer 0 has mixed it, which the "
            "coordinate subspaces do not cover, and still retrieves the key (under Adam at large lambda its block "
            "mass on the own block even drops). The penalty enforces what it says (no head reads another block's "
            "features at the layer input); locality of attention itself needs the dial.")
    pa = res["predicted_after_training"]
    lines.append(
        f"- The threshold depends on when it is measured: on the untrained model it is "
        f"{res['predicted']['min']:.4f} - {res['predicted']['max']:.4f}; after unpenalised training it spans "
        f"{pa['min']:.4f} - {pa['max']:.1f} (L_l shrinks as the loss converges, while some heads' p5 margins become "
        "very negative and exp(-delta/tau) blows up). We calibrate before training, as the documented workflow does.")
    return lines


if __name__ == "__main__":
    main()
