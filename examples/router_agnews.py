"""Hierarchical recruitment on bundled AG News: a base, one specialist per topic, a router (docs/design.md section 7).

    python examples/router_agnews.py            # full run, about 1.5 minutes on one CPU thread
    python examples/router_agnews.py --quick    # about 1 minute

1. a word-level tokenizer and a tiny ``LlamaForCausalLM`` from a config (``hf_localist.demo.run`` helpers), trained
   briefly on articles of all four topics (World, Sports, Business, Sci/Tech): the *base*;
2. one specialist per topic, trained briefly from the base on that topic's articles: a full fine-tune
   (``--specialist full``, the default) or a LoRA adapter on the base (``--specialist lora``);
3. ``LocalistRouterModel.from_specialists(base, {topic: path})``; the router (a linear layer on the base's
   mean-pooled last hidden states) is fit on the training articles' topic labels (``fit_router``), and, for
   comparison, initialised from 5 example articles per topic (``init_router_from_prompts``);
4. held-out perplexity of the base alone and of hard, soft, top-2 and oracle routing (oracle: each article goes
   to its own topic's specialist), routing accuracy against the topic labels, mean H_domain;
5. a short generation per routing mode, and the router saved with copies of its specialists.

Writes ``results.json`` and ``table.md`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

from hf_localist import LocalistRouterModel
from hf_localist.demo.run import TOPIC_TITLES, TOPICS, build_model, build_tokenizer, load_articles, pad_batch


@dataclass
class Settings:
    base_steps: int = 250  # about 4 epochs: the held-out optimum (longer training overfits the 960 articles)
    specialist_steps: int = 60
    batch_size: int = 16
    base_lr: float = 3e-3
    specialist_lr: float = 3e-4  # full fine-tune; a gentle rate: 240 articles per topic overfit fast
    lora_lr: float = 1e-3
    lora_r: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    max_article_tokens: int = 64
    train_articles: int | None = None  # None: all 960
    test_articles: int | None = None  # None: all 100
    prompts_per_topic: int = 5


MODES = {"full": Settings(), "quick": Settings(base_steps=120, specialist_steps=30),
         "tiny": Settings(base_steps=3, specialist_steps=2, batch_size=4, hidden_size=32, intermediate_size=64,
                          lora_r=4, train_articles=80, test_articles=16, prompts_per_topic=2)}


def _encode(tokenizer, articles, max_tokens):
    """[BOS] + the article's first max_tokens word ids, with the topic name."""
    ids = tokenizer([a.text for a in articles])["input_ids"]
    return [(x[: max_tokens + 1], TOPICS[a.topic]) for a, x in zip(articles, ids) if len(x) > 1]


def _subset(articles, n, seed):
    """A class-balanced subset of n articles (all of them when n is None)."""
    if n is None:
        return articles
    rng = random.Random(seed)
    per = [[a for a in articles if a.topic == t] for t in range(len(TOPICS))]
    return [a for pool in per for a in rng.sample(pool, n // len(TOPICS))]


def _train(model, seqs, steps, lr, batch_size, pad_id, seed, desc):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1 if len(params) > 50 else 0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (1.0 - 0.7 * s / max(steps, 1)))
    rng = random.Random(seed)
    model.train()
    losses = []
    for step in range(steps):
        ids, mask = pad_batch(rng.sample(seqs, min(batch_size, len(seqs))), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-10:] or [float("nan")]
    print(f"  {desc}: {steps} steps, final train loss {sum(tail) / len(tail):.3f}", flush=True)
    return sum(tail) / len(tail)


@torch.no_grad()
def _evaluate(fn, seqs, pad_id, batch_size=16):
    """Summed NLL (nats), scored tokens, and per input (most probable specialist, H_domain, router probabilities)
    of fn(ids, mask) -> (logits, router output or None)."""
    nll, count, chosen, entropy, probs = 0.0, 0, [], [], []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i: i + batch_size], pad_id)
        logits, out = fn(ids, mask)
        tok = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        nll += float(tok[keep].sum())
        count += int(keep.sum())
        if out is not None:
            chosen += out.router_probs.argmax(-1).tolist()
            entropy += out.domain_entropy.tolist()
            probs += out.router_probs.tolist()
    return nll, count, chosen, entropy, probs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="shorter training (about 1-2 minutes)")
    group.add_argument("--tiny", action="store_true", help="a few steps on a few articles (tests)")
    parser.add_argument("--specialist", choices=("full", "lora"), default="full",
                        help="full fine-tune of the base (default) or a LoRA adapter on it")
    parser.add_argument("--output-dir", default="./router_agnews")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models gain nothing from more, and on a shared "
                             "machine OpenMP barriers can make each step many times slower)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    s = MODES[mode]
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a renamed transformers helper
    wall = time.perf_counter()
    torch.manual_seed(args.seed)
    out_dir = os.path.abspath(args.output_dir)
    os.makedirs(out_dir, exist_ok=True)

    # 1. data, tokenizer, base ---------------------------------------------------------------------------
    train_articles = _subset(load_articles("train"), s.train_articles, args.seed)
    test_articles = _subset(load_articles("test"), s.test_articles, args.seed + 1)
    tokenizer = build_tokenizer([a.text for a in load_articles("train")])
    pad_id, bos_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    train_enc = _encode(tokenizer, train_articles, s.max_article_tokens)
    test_enc = _encode(tokenizer, test_articles, s.max_article_tokens)
    print(f"[{mode}] {len(train_enc)} training / {len(test_enc)} held-out articles, vocabulary {len(tokenizer)}")
    shape = SimpleNamespace(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                            num_layers=s.num_layers, num_heads=s.num_heads, max_article_tokens=s.max_article_tokens)
    base = build_model(len(tokenizer), shape, bos_id, pad_id, args.seed)
    base.generation_config.pad_token_id = pad_id
    base_loss = _train(base, [x for x, _ in train_enc], s.base_steps, s.base_lr, s.batch_size, pad_id, args.seed,
                       "base (all topics)")
    models_dir = os.path.join(out_dir, "models")
    base.save_pretrained(os.path.join(models_dir, "base"))
    tokenizer.save_pretrained(os.path.join(models_dir, "base"))

    # 2. one specialist per topic ------------------------------------------------------------------------
    from transformers import AutoModelForCausalLM

    paths, spec_losses = {}, {}
    for t, topic in enumerate(TOPICS):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(models_dir, "base"))
        if args.specialist == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
                                                     target_modules="all-linear"))
        seqs = [x for x, label in train_enc if label == topic]
        lr = s.lora_lr if args.specialist == "lora" else s.specialist_lr
        spec_losses[topic] = _train(model, seqs, s.specialist_steps, lr, s.batch_size, pad_id,
                                    args.seed + 10 + t, f"specialist {topic} ({args.specialist})")
        paths[topic] = os.path.join(models_dir, topic)
        model.save_pretrained(paths[topic])

    # 3. the router ----------------------------------------------------------------------------------------
    router = LocalistRouterModel.from_specialists(os.path.join(models_dir, "base"), paths, routing="hard",
                                                  tokenizer=tokenizer, routing_k=2)
    prompts = {topic: [a.text for a in train_articles if TOPICS[a.topic] == topic][: s.prompts_per_topic]
               for topic in TOPICS}
    router.init_router_from_prompts(prompts)
    labels = [TOPICS.index(topic) for _, topic in test_enc]
    seqs = [x for x, _ in test_enc]

    def accuracy() -> float:
        chosen = []
        with torch.no_grad():
            for i in range(0, len(seqs), 16):
                chosen += router.route(*pad_batch(seqs[i: i + 16], pad_id)).chosen[:, 0].tolist()
        return sum(c == y for c, y in zip(chosen, labels)) / len(labels)

    prompt_accuracy = accuracy()
    fit = router.fit_router([(a.text, TOPICS[a.topic]) for a in train_articles])

    # 4. evaluation ----------------------------------------------------------------------------------------
    rows = []
    base_model = router.base_model_loaded

    def run(name, fn, routed=True):
        nll, count, chosen, entropy, probs = _evaluate(fn, seqs, pad_id)
        row = {"mode": name, "perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
        if routed:
            row["routing_accuracy"] = sum(c == y for c, y in zip(chosen, labels)) / len(labels)
            row["mean_pi_true"] = sum(p[y] for p, y in zip(probs, labels)) / len(labels)
            row["mean_H_domain"] = sum(entropy) / len(entropy)
        rows.append(row)
        print(f"  {name:>14}: perplexity {row['perplexity']:.1f}", flush=True)

    with router.base_only():
        run("base alone", lambda i, m: (base_model(input_ids=i, attention_mask=m).logits, None), routed=False)
    for name, kw in (("hard", {"routing": "hard"}), ("soft", {"routing": "soft"}),
                     ("top-2", {"routing": "top_k", "routing_k": 2})):
        run(name, lambda i, m, kw=kw: (lambda out: (out.logits, out))(router(i, attention_mask=m, **kw)))
    offset = [0]

    def oracle(i, m):
        batch = labels[offset[0]: offset[0] + i.shape[0]]
        offset[0] += i.shape[0]
        return router(i, attention_mask=m, route_to=batch).logits, None

    run("oracle (true topic)", oracle, routed=False)

    # 5. generation and saving -----------------------------------------------------------------------------
    prompt = test_articles[0].text.split()[:8]
    ids = tokenizer([" ".join(prompt)], return_tensors="pt")["input_ids"]
    samples = {}
    for name, kw in (("hard", {"routing": "hard"}), ("soft", {"routing": "soft"}),
                     ("top-2", {"routing": "top_k", "routing_k": 2})):
        torch.manual_seed(args.seed)
        gen = router.generate(ids, max_new_tokens=12, do_sample=True, top_k=40, **kw)
        samples[name] = tokenizer.decode(gen[0, ids.shape[1]:])
    router.save_pretrained(os.path.join(out_dir, "router"), copy_specialists=True)

    results = {
        "command": "python examples/router_agnews.py" + ("" if mode == "full" else f" --{mode}")
        + ("" if args.specialist == "full" else " --specialist lora") + (f" --seed {args.seed}" if args.seed else ""),
        "mode": mode, "settings": asdict(s), "specialist": args.specialist, "seed": args.seed,
        "data": {"train_articles": len(train_enc), "test_articles": len(test_enc), "vocab_size": len(tokenizer),
                 "topics": [TOPIC_TITLES[t] for t in TOPICS]},
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "base_final_train_loss": base_loss, "specialist_final_train_loss": spec_losses,
        "router_fit": fit, "prompt_router_accuracy": prompt_accuracy, "rows": rows,
        "generation_prompt": " ".join(prompt), "generations": samples,
        "threads": torch.get_num_threads(), "wall_time_s": time.perf_counter() - wall,
    }
    table = format_table(results)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    print("\n" + table)
    print(f"\nrouter from {s.prompts_per_topic} prompts per topic: routing accuracy {prompt_accuracy:.1%}")
    for name, text in samples.items():
        print(f"{name:>6}: {results['generation_prompt']} | {text}")
    print(f"\n{results['wall_time_s']:.0f} s; results in {out_dir}")
    return results


def format_table(results: dict) -> str:
    lines = [
        "| routing | held-out perplexity | × base | routing accuracy | mean π(true topic) | mean H_domain (nats) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results["rows"][0]["perplexity"]
    for row in results["rows"]:
        acc = f"{row['routing_accuracy']:.1%}" if "routing_accuracy" in row else "–"
        pi = f"{row['mean_pi_true']:.3f}" if "mean_pi_true" in row else "–"
        h = f"{row['mean_H_domain']:.3f}" if "mean_H_domain" in row else "–"
        lines.append(f"| {row['mode']} | {row['perplexity']:.1f} | {row['perplexity'] / base:.3f} "
                     f"| {acc} | {pi} | {h} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
