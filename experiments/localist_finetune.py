"""Quality of full locality on a real model: LoRA fine-tunes of SmolLM2 at dial 1 against a dense LoRA fine-tune.

The follow-up papers (docs/design.md, top) report 1.89x the dense perplexity for their best (progressive) schedule,
GPT-2 on one book. Here a pretrained checkpoint gets the same LoRA budget (steps, batch, lr, rank, targets, AdamW =
the Trainer's default optimizer, linear decay, same adapter initialisation and batch order) in every arm:

- ``dense``: dial 0 during training (the unmodified attention), evaluated at dial 0: the reference;
- ``uniform``: dial 1 on every layer, ``block_positions="restart"`` (each block then reads like the passage alone);
- ``progressive``: dial 1 with ``schedule="progressive"`` (alpha_l = ((l+1)/L)^beta): only the last layer is fully
  local; positions ``continuous`` by default (``restart`` below alpha_l = 1 is harmful, docs/real-models.md);
- ``lasso``: ``uniform`` plus the group-lasso loss term (``penalty="loss"``, fixed ``penalty_lambda``, PCA block
  subspaces from ``calibrate_subspaces``). It runs only where the penalty reaches the adapter (the penalty then acts
  on base + LoRA delta); where it cannot, the arm is reported as pending instead of trained without effect.

Data (``--data_dir``, the layout of real_dial.py: ``ag_news/test.csv``, ``tinyshakespeare/input.txt``,
``sst2/dev.tsv``), ``--layout mixed`` (default): a sequence is the sink and ``--passages`` passages of distinct
sources (AG News topics, Shakespeare, SST-2 reviews), one block per passage (``block_assignment="explicit"``).
``--layout one_text``: the sink and consecutive Tiny Shakespeare chunks, one block each (one text cut into blocks,
as the papers' one-book setting: locality now cuts context the model can use). Held-out sequences come from texts
disjoint from the training texts (the first ``eval_texts`` per source; one_text: the first chunks of the play).
Held-out perplexity: NLL over each passage's tokens except its first (:mod:`hf_localist.demo.passages`). BM/PF are
measured with ``handle.record()`` on the held-out forward.

Run: ``python experiments/localist_finetune.py --model SMOLLM2_DIR --data_dir DATA [--quick] [--write_docs]``; the
checkpoint comes from ``hf-localist fetch smollm2-135m --output_dir SMOLLM2_DIR``. Prints a markdown table and writes
``results.json`` (and a figure) to ``--out_dir``. ``--arms A B --merge`` adds (or reruns) arms in the results.json
already there, with the same settings (the lasso arm may change ``--penalty_lambda``); ``--render`` rebuilds the table,
the figure and, with ``--write_docs``, the docs section from that results.json. The sections in docs/experiments.md
come from ``--steps 100 --batch 2`` (a 2-core CPU shared with other jobs), one seed.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from localist_finetune_report import NAME, OWN, print_table, publish, summarise  # noqa: E402
from real_dial import load_sources  # noqa: E402

ARMS = ("dense", "uniform", "progressive", "lasso")


@dataclass
class Settings:
    steps: int = 120
    batch: int = 4
    lr: float = 1e-3
    warmup: int = 10
    lora_r: int = 8
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    passages: int = 4
    passage_tokens: int = 96
    eval_sequences: int = 24
    eval_texts: int = 16  # held-out texts per source (the first ones); training uses the next train_texts
    train_texts: int = 150
    eval_batch: int = 4
    beta: float = 1.0
    progressive_positions: str = "continuous"
    penalty_lambda: float = 1e-4
    calib_batches: int = 4
    log_every: int = 20


QUICK = Settings(steps=2, batch=2, warmup=0, passage_tokens=24, eval_sequences=2, eval_texts=4, train_texts=8,
                 eval_batch=2, calib_batches=1, log_every=2)


def arm_fields(arm: str, s: Settings) -> dict:
    """LocalistConfig fields an arm trains at (and is evaluated at)."""
    uniform = dict(alpha=1.0, schedule="uniform", block_positions="restart")
    return {"dense": dict(alpha=0.0, schedule="uniform", block_positions="continuous"),
            "uniform": uniform,
            "progressive": dict(alpha=1.0, schedule="progressive", schedule_power=s.beta,
                                block_positions=s.progressive_positions),
            "lasso": uniform}[arm]


def eval_settings(s: Settings) -> dict[str, dict]:
    return {"dial 0": arm_fields("dense", s), "uniform dial 1": arm_fields("uniform", s),
            "progressive dial 1": arm_fields("progressive", s)}




# ------------------------------------------------------------------------------------------- data
def one_text_sequences(chunks: list[list[int]], sink: int, n: int, passages: int, starts: list[int]):
    """Sequences of ``passages`` consecutive chunks of one text (block ids 1..passages, label = position)."""
    from hf_localist.demo.passages import PassageSequence

    out = []
    for k in starts[:n]:
        ids, blocks, spans = [sink], [0], []
        for j, chunk in enumerate(chunks[k: k + passages]):
            spans.append((f"p{j + 1}", len(ids), len(ids) + len(chunk)))
            ids += chunk
            blocks += [j + 1] * len(chunk)
        out.append(PassageSequence(ids, blocks, spans))
    return out


def stripped(sources: dict[str, list[str]]) -> dict[str, list[str]]:
    """Texts without leading/trailing blanks: a Tiny Shakespeare piece cut at a fixed line count can start with the
    blank line between two speeches, and a newline right after the sink gives SmolLM2 gradient spikes of 100x and
    more (layers 0-1 v/o) that the restart arms, where every passage starts after the sink, would hit often."""
    return {k: [t.strip() for t in v] for k, v in sources.items()}


def build_data(tok, data_dir: Path, s: Settings, layout: str, seed: int) -> dict:
    """Held-out and training sequences from disjoint texts; the held-out set does not depend on the seed."""
    import random

    from hf_localist import LocalistConfigError
    from hf_localist.demo.passages import encode_passages, passage_sequences, sink_token_id

    sink = sink_token_id(tok)
    n_train = s.steps * s.batch
    if layout == "one_text":
        n_eval_chunks = s.eval_sequences * s.passages
        texts = stripped(load_sources(data_dir, per_source=n_eval_chunks + s.train_texts * s.passages))["shakespeare"]
        chunks = encode_passages(tok, {"t": texts}, ["t"], s.passage_tokens)["t"]
        held, train = chunks[:n_eval_chunks], chunks[n_eval_chunks:]
        if len(train) < s.passages:
            raise LocalistConfigError(f"--data_dir {data_dir}: {len(chunks)} text chunks, too few for "
                                      f"{s.eval_sequences} held-out sequences and training")
        rng = random.Random(seed)
        labels = [f"p{j + 1}" for j in range(s.passages)]
        eval_seqs = one_text_sequences(held, sink, s.eval_sequences, s.passages, list(range(0, len(held), s.passages)))
        train_seqs = one_text_sequences(train, sink, n_train, s.passages,
                                        [rng.randrange(len(train) - s.passages + 1) for _ in range(n_train)])
        return {"labels": labels, "sink": sink, "eval": eval_seqs, "train": train_seqs}
    sources = stripped(load_sources(data_dir, per_source=s.eval_texts + s.train_texts))
    labels = list(sources)
    held = encode_passages(tok, {k: v[: s.eval_texts] for k, v in sources.items()}, labels, s.passage_tokens)
    train = encode_passages(tok, {k: v[s.eval_texts:] for k, v in sources.items()}, labels, s.passage_tokens)
    for name, pools in (("held-out", held), ("training", train)):
        empty = [k for k in labels if not pools[k]]
        if empty:
            raise LocalistConfigError(f"--data_dir {data_dir}: no {name} passage of >= 8 tokens for source(s) "
                                      f"{empty}; lower --eval_texts or check the data folder")
    return {"labels": labels, "sink": sink,
            "eval": passage_sequences(held, labels, sink, s.eval_sequences, s.passages, seed=0),
            "train": passage_sequences(train, labels, sink, n_train, s.passages, seed=seed + 1)}


def calibration_sequences(data: dict, n: int) -> list:
    """The first ``n`` training sequences, more if needed until every block (source) has tokens in them."""
    seen, out = set(), []
    for q in data["train"]:
        if len(out) >= n and seen >= set(data["labels"]):
            break
        out.append(q)
        seen.update(label for label, _, _ in q.spans)
    return out


def batches(seqs, pad: int, size: int):
    """Dicts of padded tensors (input_ids, attention_mask, block_ids) for calibration."""
    from hf_localist.utils import pad_right

    for i in range(0, len(seqs), size):
        chunk = seqs[i: i + size]
        ids, mask = pad_right([q.input_ids for q in chunk], pad)
        blocks, _ = pad_right([q.block_ids for q in chunk], 0)
        yield {"input_ids": ids, "attention_mask": mask, "block_ids": blocks}


# ------------------------------------------------------------------------------------------- model, train, eval
def load_model(model_dir: str, n_blocks: int | None = None, fields_: dict | None = None,
               subspace: str = "coordinate"):
    """The checkpoint in float32; patched (returns (model, handle)) unless ``n_blocks`` is None (returns the model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_localist import LocalistConfig, apply_localist

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if n_blocks is None:
        return model
    handle = apply_localist(model, LocalistConfig(block_assignment="explicit", max_blocks=n_blocks,
                                                  subspace=subspace, **fields_))
    return model, handle


def evaluate(model, handle, seqs, labels, fields_: dict, s: Settings, pad: int) -> dict:
    import torch

    from hf_localist.demo.passages import block_nll, perplexities

    handle.update(**{"schedule_power": 3.0, **fields_})
    model.eval()
    with torch.no_grad(), handle.record() as rec:
        totals = block_nll(model, seqs, pad, s.eval_batch)
    ppl = perplexities(totals, labels)
    layers = rec.summary()["layers"]
    alphas = handle.layer_alphas()
    local = [k for k, a in enumerate(alphas) if a > 0]

    def stat(metric, pick, agg):
        vals = [layers[k][metric] for k in pick if k in layers and not math.isnan(layers[k][metric])]
        return agg(vals) if vals else float("nan")

    last = len(alphas) - 1
    return {"perplexity": ppl, "tokens": sum(v[1] for v in totals.values()), "layer_alphas": alphas,
            "bm_local_mean": stat("block_mass", local, statistics.fmean),
            "bm_min": stat("block_mass", range(len(alphas)), min),
            "bm_all_mean": stat("block_mass", range(len(alphas)), statistics.fmean),
            "bm_last": stat("block_mass", [last], statistics.fmean),
            "pf_all_mean": stat("pointer_fidelity", range(len(alphas)), statistics.fmean),
            "pf_last": stat("pointer_fidelity", [last], statistics.fmean),
            "entropy_last": stat("entropy", [last], statistics.fmean)}


def run_arm(arm: str, model_dir: str, tok, data: dict, s: Settings, seed: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from hf_localist import LocalistDataCollator, LocalistTrainer
    from hf_localist.training import penalty
    from hf_localist.training.subspaces import calibrate_subspaces

    lasso = arm == "lasso"
    model, handle = load_model(model_dir, len(data["labels"]), arm_fields(arm, s), "pca" if lasso else "coordinate")
    pad = tok.pad_token_id
    if lasso:
        handle.update(penalty="loss", penalty_lambda=s.penalty_lambda)
        calibrate_subspaces(handle, batches(calibration_sequences(data, s.calib_batches * s.batch), pad, s.batch))
    torch.manual_seed(seed)  # the same adapter initialisation in every arm
    targets = [t for t in s.lora_targets.split(",") if t]
    peft_model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
                                                  target_modules=targets, task_type="CAUSAL_LM"))
    info: dict = {"status": "trained", "fields": arm_fields(arm, s)}
    if lasso:
        info["calibration"] = "shared_first"  # calibrate_subspaces' default (runs without this key predate it)
        peft_model.train()
        start = penalty(handle)
        if not start.requires_grad:
            return {"status": "pending", "reason": "the group-lasso penalty does not reach the LoRA adapter in this "
                    "version of hf_localist (it reads the frozen base Q/K weights), so the arm would train without "
                    "it", "fields": info["fields"]}
        info["penalty_start"] = float(start.detach())
        info["penalty_lambda"] = s.penalty_lambda
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp, C.Timer() as timer:
        args = TrainingArguments(
            output_dir=tmp, max_steps=s.steps, per_device_train_batch_size=s.batch, learning_rate=s.lr,
            lr_scheduler_type="linear", warmup_steps=s.warmup, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=seed,
            data_seed=seed, remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
        rows = [{"input_ids": q.input_ids, "block_ids": q.block_ids} for q in data["train"]]
        trainer = LocalistTrainer(model=peft_model, args=args, train_dataset=rows,
                                  data_collator=LocalistDataCollator(tok), localist_log_every=s.log_every)
        trainer.train()
    log = trainer.state.log_history
    info.update(train_s=timer.seconds, trainable_parameters=sum(p.numel() for p in trainable),
                losses=[(e["step"], e["loss"]) for e in log if "loss" in e],
                grad_norms=[float(e["grad_norm"]) for e in log if "grad_norm" in e],
                train_locality=[{k: v for k, v in e.items() if k.startswith("localist/") or k == "step"}
                                for e in log if any(k.startswith("localist/") for k in e)])
    if lasso:
        with torch.no_grad():
            info["penalty_end"] = float(penalty(handle))
    info["evals"] = {name: evaluate(peft_model, handle, data["eval"], data["labels"], f, s, pad)
                     for name, f in eval_settings(s).items()}
    return info


def pretrained(model_dir: str, tok, data: dict, s: Settings) -> dict:
    """The checkpoint without fine-tuning: each passage read alone (the unpatched model), then every eval setting."""
    from hf_localist import LocalistConfig, apply_localist
    from hf_localist.demo.passages import alone_nll, perplexities

    model = load_model(model_dir).eval()
    out = {"alone": perplexities(alone_nll(model, data["eval"], data["sink"], tok.pad_token_id, s.eval_batch),
                                 data["labels"])}
    handle = apply_localist(model, LocalistConfig(block_assignment="explicit", max_blocks=len(data["labels"]),
                                                  **arm_fields("dense", s)))
    out["evals"] = {name: evaluate(model, handle, data["eval"], data["labels"], f, s, tok.pad_token_id)
                    for name, f in eval_settings(s).items()}
    return out


# ------------------------------------------------------------------------------------------- main
def parse(argv):
    parser = C.make_parser(NAME, __doc__.split("\n")[0], render=True)
    parser.add_argument("--model", help="the SmolLM2 checkpoint directory (hf-localist fetch smollm2-135m)")
    parser.add_argument("--data_dir", help="the shared data folder (ag_news/, tinyshakespeare/, sst2/)")
    parser.add_argument("--layout", choices=("mixed", "one_text"), default="mixed")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: --seed)")
    parser.add_argument("--merge", action="store_true", help="add --arms to the results.json already in --out_dir "
                        "(run with the same settings; its pretrained evaluation and other arms are kept)")
    for f in fields(Settings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=None,
                            help=f"default {getattr(Settings(), f.name)!r} ({getattr(QUICK, f.name)!r} with --quick)")
    return parser.parse_args(argv)


def command(argv: list[str]) -> str:
    """The command line as the docs show it: checkpoint and data as placeholders, no machine-local paths."""
    out, skip = ["python", f"experiments/{NAME}.py"], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--model", "--data_dir", "--out_dir"):
            skip = True
            out += {"--model": ["--model", "SMOLLM2_DIR"], "--data_dir": ["--data_dir", "DATA"]}.get(a, [])
        elif a not in ("--write_docs", "--render") and not a.startswith(("--out_dir=", "--model=", "--data_dir=")):
            out.append(a)
    return " ".join(out)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    C.setup(args)
    name = NAME if args.layout == "mixed" else f"{NAME}_{args.layout}"
    out = C.out_dir(args, name)
    if args.render:
        import json

        res = json.loads((out / "results.json").read_text())
        summarise(res)
        publish(res, out, args.write_docs)
        print_table(res)
        return res
    from transformers import AutoTokenizer

    from hf_localist import LocalistConfigError

    if not args.model or not args.data_dir:
        raise LocalistConfigError("--model and --data_dir are required (unless --render)")
    s = replace(QUICK if args.quick else Settings(),
                **{f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None})
    seeds = args.seeds or [args.seed]
    tok = AutoTokenizer.from_pretrained(args.model)
    cpu0, t0 = time.process_time(), time.perf_counter()
    if args.merge:
        res = merge_target(out, s, args, seeds)
        res["commands"].append(command(argv))
    else:
        res = {"name": name, "quick": args.quick, "layout": args.layout, "seeds": seeds, "arms": [],
               "settings": asdict(s), "commands": [command(argv)], "environment": C.environment(), "runs": {},
               "wall_s": 0.0, "cpu_s": 0.0}
        data = build_data(tok, Path(args.data_dir), s, args.layout, seeds[0])
        res["labels"] = data["labels"]
        res["data"] = {"eval_sequences": len(data["eval"]), "train_sequences": len(data["train"]),
                       "eval_tokens": sum(e - b - 1 for q in data["eval"] for _, b, e in q.spans),
                       "train_tokens": sum(len(q.input_ids) for q in data["train"])}
        print(f"{name}: {len(data['eval'])} held-out sequences ({res['data']['eval_tokens']} scored tokens), "
              f"{len(data['train'])} training sequences", flush=True)
        res["pretrained"] = pretrained(args.model, tok, data, s)
        print("  pretrained: " + ", ".join(f"{e} {r['perplexity']['all']:.2f}" for e, r in
                                          res["pretrained"]["evals"].items())
              + f", alone {res['pretrained']['alone']['all']:.2f}", flush=True)
    res["arms"] = [a for a in ARMS if a in set(res["arms"]) | set(args.arms)]
    for seed in seeds:
        data = build_data(tok, Path(args.data_dir), s, args.layout, seed)
        runs = res["runs"].setdefault(str(seed), {})
        for arm in args.arms:
            runs[arm] = run_arm(arm, args.model, tok, data, s, seed)
            r = runs[arm]
            msg = (f"{r['evals'][OWN[arm]]['perplexity']['all']:.2f} at {OWN[arm]}, {r['train_s']:.0f} s"
                   if r["status"] == "trained" else r["status"])
            print(f"  seed {seed} {arm}: {msg}", flush=True)
            C.write_json(out / "results.json", res)  # partial results survive an interrupted run
    res["wall_s"] += time.perf_counter() - t0
    res["cpu_s"] += time.process_time() - cpu0
    summarise(res)
    publish(res, out, args.write_docs)
    print_table(res)
    print("\n".join(res["reading"]) + f"\n-> {out}", flush=True)
    return res


#: Settings that only the named arm uses: a --merge that reruns that arm may change them (the run records them).
ARM_ONLY = {"lasso": ("penalty_lambda", "calib_batches")}


def merge_target(out: Path, s: Settings, args, seeds: list[int]) -> dict:
    """The results.json to add arms to: it must hold every seed's run with the same settings and layout (except
    the settings only a rerun arm uses, ``ARM_ONLY``; a replaced run is kept under ``replaced``)."""
    import json

    from hf_localist import LocalistConfigError

    path = out / "results.json"
    if not path.exists():
        raise LocalistConfigError(f"--merge: no {path}; run the other arms first (without --merge)")
    res = json.loads(path.read_text())
    free = {f for arm in args.arms for f in ARM_ONLY.get(arm, ())}
    mine = {"settings": {k: v for k, v in asdict(s).items() if k not in free}, "layout": args.layout,
            "seeds": seeds, "quick": args.quick}
    theirs = {k: res.get(k) for k in mine}
    theirs["settings"] = {k: v for k, v in (theirs["settings"] or {}).items() if k not in free}
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
        raise LocalistConfigError(f"--merge: {path} was run with other settings (theirs, yours): {diff}; pass the "
                                  "same flags as that run, or drop --merge to start a new results.json")
    for seed in seeds:
        for arm in args.arms:
            old = res["runs"].get(str(seed), {}).get(arm)
            if old is not None:
                res.setdefault("replaced", []).append({"seed": seed, "arm": arm, "settings": dict(res["settings"]),
                                                       "run": old})
    res["settings"] = asdict(s)
    return res


if __name__ == "__main__":
    main()
