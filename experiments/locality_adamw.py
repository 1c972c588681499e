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
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAME = "locality_adamw"
NB = 4  # blocks
LR = 3e-3
BATCH = 16
# Copy task: tokens per block, segment length, residual width, coordinate-group rank.
VB, SEG, E, R = 16, 6, 64, 12
V_COPY = 3 + NB * VB  # PAD, BOS, EOS, then the blocks' token ranges
R_TEXT = 8  # AG News: coordinate-group rank (4 x 8 block features, 32 general features)
SETTINGS = {  # name -> (task, embeddings, subspace)
    "copy/block": ("copy", "block", "coordinate"),
    "copy/random": ("copy", "random", "coordinate"),
    "copy/random-pca": ("copy", "random", "pca"),
    "agnews/topic": ("agnews", "block", "coordinate"),
    "agnews/random": ("agnews", "random", "coordinate"),
    "agnews/random-pca": ("agnews", "random", "pca"),
}


# ---------------------------------------------------------------------------------------------- copy task
def copy_batch(n: int, g) -> dict:
    """input_ids, block_ids, labels (B, 1 + 2 * NB * SEG): BOS, then every block's segment twice, interleaved."""
    import torch

    ids, blocks, labels = [], [], []
    for _ in range(n):
        while True:  # a random order of the 2 * NB segments in which no block follows itself
            order = (torch.randperm(2 * NB, generator=g) % NB + 1).tolist()
            if all(a != b for a, b in zip(order, order[1:])):
                break
        first: dict[int, list[int]] = {}
        row, brow, lrow = [1], [0], [-100]
        for b in order:
            lo = 3 + (b - 1) * VB
            if b not in first:
                first[b] = (lo + torch.randperm(VB, generator=g)[:SEG]).tolist()
                lrow += [-100] * SEG  # new content: nothing to copy
            else:
                lrow += [-100] + first[b][1:]  # the copy's first token follows another block: not predictable
            row += first[b]
            brow += [b] * SEG
        ids.append(row)
        blocks.append(brow)
        labels.append(lrow)
    return {"input_ids": torch.tensor(ids), "block_ids": torch.tensor(blocks), "labels": torch.tensor(labels)}


def copy_model(seed: int, embeddings: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V_COPY, hidden_size=E, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    if embeddings == "block":  # block i's tokens inside its coordinate group [(i) R, (i+1) R), specials in [0, R)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb.zero_()
            emb[:3, :R] = torch.randn(3, R, generator=g)
            for b in range(1, NB + 1):
                lo = 3 + (b - 1) * VB
                emb[lo: lo + VB, b * R:(b + 1) * R] = torch.randn(VB, R, generator=g)
    return model


# ---------------------------------------------------------------------------------------------- AG News
class AgNews:
    """The bundled AG News sample as multi-document sequences: [BOS] ([SEP] article)+, block = topic + 1."""

    def __init__(self, seed: int, max_tokens: int = 32) -> None:
        from hf_localist.demo import run as D

        train = D.load_articles("train")
        test = D.load_articles("test")
        self.tokenizer = D.build_tokenizer([a.text for a in train])
        self.tokenizer.add_tokens(["[SEP]"], special_tokens=True)
        self.sep = self.tokenizer.convert_tokens_to_ids("[SEP]")
        self.bos, self.pad = self.tokenizer.bos_token_id, self.tokenizer.pad_token_id
        self.train = D.encode_articles(self.tokenizer, train, max_tokens)
        self.test = D.encode_articles(self.tokenizer, test, max_tokens)
        self.seed = seed

    def _sequence(self, parts) -> tuple[list[int], list[int]]:
        ids, blocks = [self.bos], [0]
        for topic, toks in parts:
            ids += [self.sep] + toks
            blocks += [topic + 1] * (len(toks) + 1)
        return ids, blocks

    def train_batches(self, n_seq: int) -> list[tuple[list[int], list[int]]]:
        rng = random.Random(self.seed)
        by_topic = [[x for t, x in self.train if t == k] for k in range(NB)]
        out = []
        for _ in range(n_seq):
            topics = rng.sample(range(NB), rng.randint(2, NB))
            out.append(self._sequence([(t, rng.choice(by_topic[t])) for t in topics]))
        return out

    def held_out(self) -> list[tuple[list[int], list[int]]]:
        """Every test article once, in sequences of 2-4 articles of distinct topics."""
        rng = random.Random(self.seed + 1)
        pools = [[x for t, x in self.test if t == k] for k in range(NB)]
        for p in pools:
            rng.shuffle(p)
        out = []
        while sum(1 for p in pools if p) >= 2:
            avail = [t for t in range(NB) if pools[t]]
            chosen = sorted(avail, key=lambda t: (-len(pools[t]), rng.random()))[:min(rng.randint(2, NB), len(avail))]
            rng.shuffle(chosen)
            out.append(self._sequence([(t, pools[t].pop()) for t in chosen]))
        return out

    def collate(self, rows) -> dict:
        import torch

        n = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), n), self.pad)
        blocks = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, (x, b) in enumerate(rows):
            ids[i, :len(x)], blocks[i, :len(b)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(b), 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "block_ids": blocks, "labels": labels}

    def model(self, seed: int, embeddings: str):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=E, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4 * 33 + 8,
                          bos_token_id=self.bos, pad_token_id=self.pad, eos_token_id=None, tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        if embeddings == "block":
            self._topic_embeddings(model, seed)
        return model

    def word_topics(self):
        """(V,) the topic (block id) of every word that is topic-specific in the training articles (more than
        half of its occurrences in one topic, seen at least 3 times), else 0 (general)."""
        import torch

        counts = torch.zeros(len(self.tokenizer), NB)
        for topic, ids in self.train:
            counts[torch.tensor(ids), topic] += 1
        total = counts.sum(1)
        share, top = (counts / total.clamp_min(1)[:, None]).max(1)
        return torch.where((total >= 3) & (share > 0.5), top + 1, torch.zeros_like(top))

    def _topic_embeddings(self, model, seed: int) -> None:
        """The analogue of the copy task's block embeddings for text: a topic-specific word starts inside its
        topic's coordinate group, every other word inside the general coordinates (trainable afterwards)."""
        import torch

        topics = self.word_topics()
        g = torch.Generator().manual_seed(seed + 100)
        general = torch.ones(E, dtype=torch.bool)
        general[R_TEXT:(NB + 1) * R_TEXT] = False
        with torch.no_grad():
            emb = model.get_input_embeddings().weight  # (V, E), tied with the LM head
            std = float(emb.std())
            emb.zero_()
            for word in range(emb.shape[0]):
                b = int(topics[word])
                cols = torch.arange(b * R_TEXT, (b + 1) * R_TEXT) if b else general.nonzero().squeeze(1)
                emb[word, cols] = torch.randn(len(cols), generator=g) * std


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

        handle = localist(self.model(), self.subspace, None, rank=self.rank)
        subspaces = calibrate_subspaces(handle, self.calib) if self.subspace == "pca" else None
        return subspaces, estimate_constants(handle, self.calib).threshold()

    def run(self, multiplier: float | None) -> dict:
        """Train (no penalty, or lambda = multiplier * threshold) and measure at dial 0 on the held-out batches."""
        from transformers import TrainingArguments

        from hf_localist.trainer import LocalistTrainer

        model = self.model()
        handle = localist(model, self.subspace, multiplier, None if multiplier is None else self.threshold,
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
    args = parser.parse_args(argv)
    C.setup(args)
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
                "copy/random-pca": (seeds, 300, copy_m), "agnews/topic": ([args.seed], 200, text_m),
                "agnews/random": ([args.seed], 200, text_m)}
        n_eval = 64
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
    res = {"name": NAME, "quick": args.quick, "plan": {k: {"seeds": v[0], "steps": v[1], "multipliers": v[2]}
                                                         for k, v in plan.items()},
           "lr": LR, "batch": BATCH, "n_eval": n_eval, "environment": C.environment(), "runs": runs,
           "summary": summarise(runs), "recorder_gap_max": max(r["recorder_gap"] for r in runs),
           "wall_s": timer.seconds, "cpu_s": time.process_time() - cpu0}
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


if __name__ == "__main__":
    main()
