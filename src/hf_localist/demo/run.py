"""The ``hf-localist demo``: the dial, block recruitment and routing on bundled AG News, on CPU.

Three parts, end to end, without any download (``report.md``, ``results.json`` and PNG figures are written to the
output directory):

1. **The dial** (this module). The bundled class-balanced AG News sample (``hf_localist/data/ag_news_sample.csv``;
   4 topics: World, Sports, Business, Sci/Tech), a word-level tokenizer built from its training split, and the 4
   topics as 4 localist blocks: ``add_block_tokens`` adds the anchors ``<blk_world>``, ``<blk_sports>``,
   ``<blk_business>``, ``<blk_scitech>``; a training sequence is ``[BOS]`` and 2-4 articles of different topics,
   each opened by its anchor, so ``block_assignment='segment'`` finds the blocks from the token ids. Two copies of
   the same tiny ``LlamaForCausalLM`` (same initialisation, same batches) train from scratch, one with the dial at
   ``alpha = 1`` (hard block mask, ``segment`` backend) and one at ``alpha = 0`` (the plain model); then the dial
   of each is swept over held-out sequences (perplexity, attention entropy ``H_t``, pointer fidelity ``PF_t``,
   block mass ``BM_t``), and the attention mass between blocks is measured at a few dial values.
2. **Recruiting blocks from none** (:mod:`hf_localist.demo.recruit`): a normal model (learnable Q/K) reads the
   articles without anchors, in centroid mode with no active block and assignment from context, and recruitment
   passes (Algorithm 1) add blocks that pay their code length; each proposal and block is reported with its top
   tokens and its purity against the topic labels.
3. **Routing between specialists** (:mod:`hf_localist.demo.route`): per-topic fine-tunes of the part-1 plain
   model behind a ``LocalistRouterModel``; hard, soft, top-2 and oracle routing, routing accuracy and confusion.

Why two models in part 1: the dial is an inference-time setting, so the interesting questions are what turning
it up does to a model trained without it, and what a model trained under it loses when it is turned back down.
The sample is small (960 training articles): the full budget (160 steps of 16 sequences, about 8 passes over the
articles) is about where held-out perplexity stops improving.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any, Sequence

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from ..blocks.ids import add_block_tokens, segment_block_ids
from ..config.localist import LocalistConfig
from ..patch.apply import LocalistHandle, apply_localist
from ..utils import pad_right
from .figures import write_figures
from .recruit import RecruitSettings, run_recruitment
from .report import format_table, printed_tables, report_markdown
from .report import train_label as _train_label
from .route import RouteSettings, run_routing

TOPICS = ("world", "sports", "business", "scitech")
TOPIC_TITLES = {"world": "World", "sports": "Sports", "business": "Business", "scitech": "Sci/Tech"}
DIAL_VALUES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
MASS_DIAL_VALUES = (0.0, 0.5, 0.9, 1.0)  # dial values of the attention-mass heatmaps
DATA_FILE = "ag_news_sample.csv"
UNK, PAD, BOS = "[UNK]", "[PAD]", "[BOS]"


@dataclass
class DemoSettings:
    """Every knob of the demo (the CLI exposes ``--quick``, ``--seed`` and ``--threads``)."""

    steps: int = 160  # optimiser steps per trained model
    batch_size: int = 16  # sequences per step (each holds 2-4 articles)
    lr: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.3  # linear decay after warm-up, down to this fraction of lr
    weight_decay: float = 0.1
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 4000  # upper bound; every word seen at least min_frequency times fits (~3.9k)
    min_frequency: int = 2
    max_article_tokens: int = 64
    eval_batch_size: int = 8
    train_alphas: tuple[float, ...] = (1.0, 0.0)
    dial_values: tuple[float, ...] = DIAL_VALUES
    mass_dial_values: tuple[float, ...] = MASS_DIAL_VALUES
    recruit: RecruitSettings = field(default_factory=RecruitSettings)
    route: RouteSettings = field(default_factory=RouteSettings)


FULL = DemoSettings()
QUICK = DemoSettings(steps=40, recruit=RecruitSettings(steps=100, every=50, budget_steps=15),
                     route=RouteSettings(specialist_steps=15, router_steps=150))


def plumbing_settings(base: DemoSettings, steps: int) -> DemoSettings:
    """``steps`` training steps in every part and tiny budgets: checks the plumbing in seconds (tests, ``--steps``)."""
    recruit = replace(base.recruit, steps=2 * steps, every=steps, budget_steps=2, diagnostic_batches=2,
                      source_batches=4, min_cluster_tokens=8, heldout_train_fraction=0.0)
    route = replace(base.route, specialist_steps=steps, router_steps=20)
    return replace(base, steps=steps, recruit=recruit, route=route)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Article:
    topic: int  # index into TOPICS
    text: str


def data_path() -> str:
    """Path of the bundled AG News sample (see ``hf_localist/data/README.md``)."""
    return str(resources.files("hf_localist") / "data" / DATA_FILE)


_HTML_REMNANTS = ((" #39;", "'"), ("#39;", "'"), (" quot;", '"'), ("quot;", '"'), (" #36;", " $"),
                  (" amp;", " &"), ("&lt;", "<"), ("&gt;", ">"), ("\\", " "))


def clean_text(text: str) -> str:
    """Undo AG News' HTML-entity remnants (`` #39;`` is an apostrophe, `` #36;`` a dollar sign, ...)."""
    for old, new in _HTML_REMNANTS:
        text = text.replace(old, new)
    return " ".join(text.split())


def load_articles(split: str | None = None) -> list[Article]:
    """The bundled articles of ``split`` ('train', 'test' or None for both), cleaned, in file order."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split={split!r}: choose 'train', 'test' or None")
    with open(data_path(), newline="", encoding="utf-8") as fh:
        return [Article(int(row["label"]), clean_text(row["text"])) for row in csv.DictReader(fh)
                if split is None or row["split"] == split]


def build_tokenizer(texts: Sequence[str], vocab_size: int = 4000, min_frequency: int = 2):
    """A lower-cased word-level tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    ``[UNK]`` = 0, ``[PAD]`` = 1, ``[BOS]`` = 2; ``tokenizer(text)`` prepends ``[BOS]``.
    """

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=[UNK, PAD, BOS], show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, bos_token=BOS)


def encode_articles(tokenizer, articles: Sequence[Article], max_tokens: int) -> list[tuple[int, list[int]]]:
    """(topic, token ids without [BOS]) per article, truncated to ``max_tokens``."""
    ids = tokenizer([a.text for a in articles], add_special_tokens=False)["input_ids"]
    return [(a.topic, x[:max_tokens]) for a, x in zip(articles, ids) if x]


def make_sequence(parts: Sequence[tuple[int, list[int]]], bos_id: int, anchor_ids: Sequence[int]) -> list[int]:
    """``[BOS] <blk_topic1> article1 <blk_topic2> article2 ...``: each article opens its topic's block."""
    seq = [bos_id]
    for topic, ids in parts:
        seq.append(anchor_ids[topic])
        seq.extend(ids)
    return seq


class TrainingSampler:
    """Endless multi-topic training sequences: 2-4 articles of distinct topics, drawn with a seeded RNG."""

    def __init__(self, encoded: Sequence[tuple[int, list[int]]], bos_id: int, anchor_ids: Sequence[int], seed: int):
        self.by_topic = [[ids for t, ids in encoded if t == topic] for topic in range(len(anchor_ids))]
        self.bos_id, self.anchor_ids = bos_id, list(anchor_ids)
        self.rng = random.Random(seed)

    def sequence(self) -> list[int]:
        topics = self.rng.sample(range(len(self.by_topic)), self.rng.randint(2, min(4, len(self.by_topic))))
        return make_sequence([(t, self.rng.choice(self.by_topic[t])) for t in topics], self.bos_id, self.anchor_ids)

    def batch(self, size: int) -> list[list[int]]:
        return [self.sequence() for _ in range(size)]


def held_out_sequences(encoded: Sequence[tuple[int, list[int]]], bos_id: int, anchor_ids: Sequence[int],
                       seed: int) -> list[list[int]]:
    """Every held-out article exactly once, grouped into sequences of 2-4 articles of distinct topics."""
    rng = random.Random(seed)
    pools = [[ids for t, ids in encoded if t == topic] for topic in range(len(anchor_ids))]
    for pool in pools:
        rng.shuffle(pool)
    groups: list[list[tuple[int, list[int]]]] = []
    while sum(len(p) for p in pools) > 0:
        available = [t for t in range(len(pools)) if pools[t]]
        if len(available) < 2:  # leftovers of a single topic: add each to a sequence that lacks that topic
            for t in available:
                for ids in pools[t]:
                    home = next((g for g in groups if t not in {x for x, _ in g}), None)
                    if home is not None:
                        home.append((t, ids))
                pools[t].clear()
            break
        k = min(rng.randint(2, 4), len(available))
        # The fullest topics first (ties at random), so the pools empty together.
        chosen = sorted(available, key=lambda t: (-len(pools[t]), rng.random()))[:k]
        rng.shuffle(chosen)
        groups.append([(t, pools[t].pop()) for t in chosen])
    return [make_sequence(g, bos_id, anchor_ids) for g in groups]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``."""
    return pad_right(seqs, pad_id)


def scored_targets(ids: torch.Tensor, mask: torch.Tensor, anchor_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) bool: positions whose token counts in the loss and the perplexity (not padding, not an anchor,
    not the leading [BOS])."""
    keep = mask.bool() & ~torch.isin(ids, torch.tensor(list(anchor_ids), dtype=ids.dtype))
    keep[:, 0] = False
    return keep


def unigram_perplexity(train: Sequence[Sequence[int]], seqs: Sequence[Sequence[int]], vocab: int,
                       skip: Sequence[int]) -> float:
    """Perplexity of an add-one unigram model of the training tokens on the scored tokens of ``seqs``."""
    skip_set = set(skip)
    counts = Counter(t for s in train for t in s if t not in skip_set)
    total = sum(counts.values()) + vocab
    nll, n = 0.0, 0
    for s in seqs:
        for t in s[1:]:
            if t not in skip_set:
                nll -= math.log((counts[t] + 1) / total)
                n += 1
    return math.exp(nll / max(n, 1))


# ---------------------------------------------------------------------------------------------- model
def build_model(vocab_size: int, settings: DemoSettings, bos_id: int, pad_id: int, seed: int):
    """A tiny ``LlamaForCausalLM`` from a config (random init, seeded)."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads, max_position_embeddings=4 * (settings.max_article_tokens + 1) + 8,
        bos_token_id=bos_id, pad_token_id=pad_id, eos_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _add_block_tokens_quietly(tokenizer, model, config: LocalistConfig) -> LocalistConfig:
    """``add_block_tokens`` without transformers' note about how the resized embeddings are initialised."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return add_block_tokens(tokenizer, model, list(TOPICS), config)
    finally:
        hf_logging.set_verbosity(verbosity)


def train(model, handle: LocalistHandle, sampler: TrainingSampler, settings: DemoSettings, alpha: float,
          pad_id: int, desc: str, progress: bool = True) -> dict[str, Any]:
    """Plain torch loop (AdamW, linear warm-up, then linear decay) with the dial held at ``alpha``."""
    anchor_ids = handle.config.anchor_token_ids
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warm, total = max(settings.warmup_steps, 1), max(settings.steps, 1)
    floor = settings.final_lr_fraction
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (1.0 - (1.0 - floor) * s / total))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    with handle.dial(alpha):
        bar = tqdm(range(settings.steps), desc=desc, unit="step", leave=True, disable=not progress)
        for _ in bar:
            ids, mask = pad_batch(sampler.batch(settings.batch_size), pad_id)
            labels = ids.masked_fill(~scored_targets(ids, mask, anchor_ids), -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    model.eval()
    tail = losses[-10:] or [float("nan")]
    return {"steps": settings.steps, "train_time_s": time.perf_counter() - start,
            "final_train_loss": sum(tail) / len(tail), "train_losses": losses}


@torch.no_grad()
def sweep(model, handle: LocalistHandle, seqs: Sequence[Sequence[int]], dial_values: Sequence[float], pad_id: int,
          batch_size: int, desc: str, progress: bool = True) -> list[dict[str, float]]:
    """Per dial value: perplexity on the scored tokens, and mean H_t, PF_t, BM_t over all layers and queries."""
    anchor_ids = handle.config.anchor_token_ids
    model.eval()
    rows = []
    batches = [pad_batch(seqs[i: i + batch_size], pad_id) for i in range(0, len(seqs), batch_size)]
    for alpha in tqdm(dial_values, desc=desc, unit="alpha", leave=True, disable=not progress):
        nll, count = 0.0, 0
        with handle.dial(alpha), handle.record() as rec:
            for ids, mask in batches:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = ids[:, 1:]
                token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                keep = scored_targets(ids, mask, anchor_ids)[:, 1:]
                nll += float(token_nll[keep].sum())
                count += int(keep.sum())
        summary = rec.summary()["mean"]
        rows.append({"alpha": float(alpha), "perplexity": math.exp(nll / count), "nll": nll / count,
                     "entropy": summary["entropy"], "pointer_fidelity": summary["pointer_fidelity"],
                     "block_mass": summary["block_mass"], "n_tokens": count})
    return rows


@torch.no_grad()
def attention_mass(model, handle: LocalistHandle, seqs: Sequence[Sequence[int]], dial_values: Sequence[float],
                   pad_id: int, batch_size: int, desc: str, progress: bool = True) -> list[dict[str, Any]]:
    """Per dial value: the (topics x topics) matrix of mean attention mass from a block's queries to each block.

    Row i, column j: the attention a query of block i+1 puts on the positions of block j+1, with the sink
    ([BOS]) excluded and the rest renormalised (as for BM_t), averaged over heads, localised layers and the
    queries of block i+1; a row sums to 1 and its diagonal entry is that block's mean BM_t.
    """
    cfg = handle.config
    n = len(cfg.anchor_token_ids)
    l0 = cfg.first_local_layer
    model.eval()
    batches = [pad_batch(seqs[i: i + batch_size], pad_id) for i in range(0, len(seqs), batch_size)]
    out = []
    for alpha in tqdm(dial_values, desc=desc, unit="alpha", leave=True, disable=not progress):
        total = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        count = torch.zeros(n + 1, dtype=torch.float64)
        with handle.dial(alpha):
            for ids, mask in batches:
                attn = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
                blocks = segment_block_ids(ids, cfg.anchor_token_ids, cfg.general_token_id)
                onehot = torch.nn.functional.one_hot(blocks[:, 1:], n + 1).double()  # keys without the sink
                valid = mask.bool() & (blocks >= 1)
                valid[:, 0] = False
                for layer, p in enumerate(attn):
                    if layer < l0:
                        continue
                    p = p[..., 1:].double() * mask[:, None, None, 1:]
                    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
                    mass = torch.einsum("bhts,bsk->btk", p, onehot) / p.shape[1]  # mean over heads
                    total.index_add_(0, blocks[valid], mass[valid])
                    count.index_add_(0, blocks[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
        matrix = (total / count.clamp_min(1)[:, None])[1:, 1:]
        out.append({"alpha": float(alpha), "matrix": [[round(float(v), 4) for v in row] for row in matrix],
                    "queries": [int(c) for c in count[1:]]})
    return out


# ---------------------------------------------------------------------------------------------- report


def run_demo(output_dir: str | os.PathLike = "./demo_report", quick: bool = False, seed: int = 0,
             steps: int | None = None, print_table: bool = True, num_threads: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo; write ``report.md``, ``results.json`` and the PNG figures into ``output_dir``; return the
    results dict.

    ``quick`` uses shorter budgets. ``steps`` runs every part with that many training steps and tiny budgets
    (checks the plumbing; tests). ``num_threads`` sets torch's intra-op CPU threads for the run (restored
    afterwards; None leaves them as they are). ``progress`` shows tqdm progress bars. Deterministic for a seed.
    """
    if num_threads is None:
        return _run_demo(output_dir, quick, seed, steps, print_table, progress)
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _run_demo(output_dir, quick, seed, steps, print_table, progress)
    finally:
        torch.set_num_threads(previous)


def _run_demo(output_dir, quick: bool, seed: int, steps: int | None, print_table: bool,
              progress: bool) -> dict[str, Any]:

    wall = time.perf_counter()
    times: dict[str, float] = {}
    settings = QUICK if quick else FULL
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        settings = plumbing_settings(settings, int(steps))
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)

    # ---- part 1: the dial
    t0 = time.perf_counter()
    train_articles, test_articles = load_articles("train"), load_articles("test")
    tokenizer = build_tokenizer([a.text for a in train_articles], settings.vocab_size, settings.min_frequency)
    bos_id, pad_id, unk_id = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id
    vocab_words = len(tokenizer)
    train_enc = encode_articles(tokenizer, train_articles, settings.max_article_tokens)
    test_enc = encode_articles(tokenizer, test_articles, settings.max_article_tokens)

    runs = []
    initial_state = None
    n_params = 0
    localist_config = None
    mass = None
    plain_model = None
    for train_alpha in settings.train_alphas:
        model = build_model(vocab_words, settings, bos_id, pad_id, seed)
        # The 4 topics become blocks 1..4: anchor tokens <blk_NAME> in the tokenizer, embeddings resized.
        # (For the second copy the tokenizer has the anchors already: same ids; only the embeddings are resized.)
        config = LocalistConfig(backend="segment")  # hard layers: block-sparse segment backend (trainable on CPU)
        config = _add_block_tokens_quietly(tokenizer, model, config)
        localist_config = localist_config or config
        if initial_state is None:
            initial_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            model.load_state_dict(initial_state)  # both copies start from the same weights
        n_params = sum(p.numel() for p in model.parameters())
        handle = apply_localist(model, config)
        anchor_ids = handle.config.anchor_token_ids
        sampler = TrainingSampler(train_enc, bos_id, anchor_ids, seed=seed + 1)
        log = train(model, handle, sampler, settings, train_alpha, pad_id, desc=f"dial: train at α={train_alpha:g}",
                    progress=progress)
        eval_seqs = held_out_sequences(test_enc, bos_id, anchor_ids, seed=seed + 2)
        rows = sweep(model, handle, eval_seqs, settings.dial_values, pad_id, settings.eval_batch_size,
                     desc=f"dial: sweep (trained at α={train_alpha:g})", progress=progress)
        runs.append({"train_alpha": train_alpha, **{k: v for k, v in log.items() if k != "train_losses"},
                     "train_losses": [round(x, 4) for x in log["train_losses"]],
                     "backend_counts": dict(handle.state.backend_counts), "sweep": rows})
        if train_alpha == 0.0:  # the plain model: attention mass by block, then the base of part 3
            mass = {"model": _train_label(train_alpha), "train_alpha": train_alpha,
                    "by_alpha": attention_mass(model, handle, eval_seqs, settings.mass_dial_values, pad_id,
                                               settings.eval_batch_size, "dial: attention mass", progress)}
            plain_model = handle.revert()
    times["dial"] = time.perf_counter() - t0

    anchor_ids = localist_config.anchor_token_ids
    eval_seqs = held_out_sequences(test_enc, bos_id, anchor_ids, seed=seed + 2)
    scored = [t for s in eval_seqs for t in s[1:] if t not in set(anchor_ids)]

    # ---- part 2: recruiting blocks from none (no anchors)
    t0 = time.perf_counter()
    recruitment = run_recruitment(tokenizer, train_enc, test_enc, settings.recruit, seed, len(TOPICS), progress,
                                  vocab_size=vocab_words)  # no anchor tokens in this part
    times["recruit"] = time.perf_counter() - t0

    # ---- part 3: routing between specialists (base: the plain model of part 1)
    t0 = time.perf_counter()
    routing = None
    if plain_model is not None:
        routing = run_routing(plain_model, tokenizer, train_articles, test_articles, TOPICS, settings.route, seed,
                              settings.max_article_tokens, progress)
    times["route"] = time.perf_counter() - t0

    results: dict[str, Any] = {
        "command": "hf-localist demo" + (" --quick" if quick else "") + (f" --seed {seed}" if seed else ""),
        "quick": quick, "seed": seed, "settings": asdict(settings),
        "data": {"source": DATA_FILE, "train_articles": len(train_articles), "test_articles": len(test_articles),
                 "vocab_size": vocab_words, "eval_sequences": len(eval_seqs), "eval_tokens": len(scored),
                 "unk_rate": sum(t == unk_id for t in scored) / max(len(scored), 1),
                 "topics": [TOPIC_TITLES[t] for t in TOPICS]},
        "localist_config": localist_config.to_dict(),
        "model_parameters": n_params,
        "unigram_perplexity": unigram_perplexity([ids for _, ids in train_enc], eval_seqs, len(tokenizer), anchor_ids),
        "runs": runs,
        "attention_mass": mass,
        "recruitment": recruitment,
        "routing": routing,
        "machine": {"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
    }
    if steps is not None:
        results["command"] += f" (steps={steps})"
    table = format_table(runs)
    results["table_markdown"] = table
    titles = [TOPIC_TITLES[t] for t in TOPICS]
    t0 = time.perf_counter()
    results["figures"] = write_figures(results, output_dir, titles, _train_label)
    times["figures"] = time.perf_counter() - t0
    results["part_times_s"] = times
    results["wall_time_s"] = time.perf_counter() - wall
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report_markdown(results, table, titles, _train_label))
    if print_table:
        print(printed_tables(results, table, titles))
        print(f"\nreport: {os.path.join(output_dir, 'report.md')}  ({results['wall_time_s']:.0f} s)")
    return results
