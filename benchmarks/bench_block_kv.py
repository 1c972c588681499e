"""Time to first token with cached blocks (block-KV reuse) against a full dial-0 sdpa prefill, on SmolLM2-135M.

    python benchmarks/bench_block_kv.py [--docs 1,2,4,8] [--doc_tokens 512] [--question_tokens 32] [--rounds 3]
                                        [--workdir DIR] [--threads N] [--text FILE]

For n documents of ``--doc_tokens`` tokens (consecutive pieces of a text file; by default the bundled demo CSV's
articles joined, or any --text FILE) plus a ``--question_tokens``-token question:

- ``full``: the unmodified model (sdpa) prefills ``[sink] + documents + question`` and gives the next token's logits;
- ``cached``: the documents' keys and values are in a :class:`hf_localist.BlockKVStore` (encoded before timing);
  ``store.compose(documents)`` builds the cache and the localist model (dial 1, restart positions) runs the question.

Both end with the logits of the first new token. Speed is a ratio measured in one run (rounds interleaved, median
of per-round ratios, 25-75% range): the machine is shared. Also printed: the one-time encode cost per document and
the store's memory per 1k tokens.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import environment, interleaved, table  # noqa: E402

from hf_localist import BlockKVStore, LocalistConfig, apply_localist, fetch_checkpoint  # noqa: E402
from hf_localist.demo.passages import sink_token_id  # noqa: E402
from hf_localist.demo.run import data_path  # noqa: E402


def corpus_tokens(tok, path: str | None, needed: int) -> list[int]:
    if path:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    else:
        with open(data_path(), newline="", encoding="utf-8") as fh:
            text = "\n\n".join(row["text"] for row in csv.DictReader(fh))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise SystemExit(f"the text has {len(ids)} tokens, {needed} are needed: pass a longer --text")
    return ids[:needed]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", default="1,2,4,8", help="comma-separated document counts")
    p.add_argument("--doc_tokens", type=int, default=512)
    p.add_argument("--question_tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the checkpoint is converted (default: a temporary dir)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--text", default=None, help="a text file to cut documents from (default: the bundled CSV)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.docs.split(",")]
    work = args.workdir or tempfile.mkdtemp(prefix="bench_block_kv_")
    path = fetch_checkpoint("smollm2-135m", os.path.join(work, "smollm2"))
    tok = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    handle = apply_localist(local, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart",
                                                  max_blocks=max(counts)))
    sink = sink_token_id(tok)
    ids = corpus_tokens(tok, args.text, max(counts) * args.doc_tokens + args.question_tokens)
    docs = [ids[i * args.doc_tokens:(i + 1) * args.doc_tokens] for i in range(max(counts))]
    question = torch.tensor([ids[-args.question_tokens:]])
    store = BlockKVStore(handle, max_bytes=8 << 30, sink_token_id=sink)
    with torch.no_grad():
        handle.encode_block(docs[0][:8], sink_token_id=sink)  # warm-up; digests the weights once (the fingerprint)
        t = time.perf_counter()
        for d in docs:
            store.get(d)
        encode_s = (time.perf_counter() - t) / len(docs)
    per_1k = store.nbytes / (len(docs) * args.doc_tokens) * 1000 / 2**20
    print(environment())
    print(f"encode: {encode_s:.2f} s per {args.doc_tokens}-token document (once); store memory "
          f"{per_1k:.1f} MiB per 1k tokens (fp32, {local.config.num_hidden_layers} layers, "
          f"{local.config.num_key_value_heads} kv heads)")
    rows = []
    for n in counts:
        full_ids = torch.tensor([[sink] + [t for d in docs[:n] for t in d]]).long()
        full_ids = torch.cat([full_ids, question], dim=1)

        def full():
            with torch.no_grad():
                return plain(input_ids=full_ids).logits[:, -1]

        def cached():
            with torch.no_grad():
                return local(input_ids=question, cache=store.compose(docs[:n])).logits[:, -1]

        def compose_only():
            return store.compose(docs[:n])

        same = torch.argmax(full()) == torch.argmax(cached())
        timing = interleaved({"full": full, "cached": cached, "compose": compose_only}, rounds=args.rounds)
        lo, hi = timing.ratio_iqr("full", "cached")
        rows.append([n, full_ids.shape[1], f"{timing.median_ms('full'):.0f}", f"{timing.median_ms('cached'):.0f}",
                     f"{timing.median_ms('compose'):.0f}", f"{timing.ratio('full', 'cached'):.1f}x [{lo:.1f}-{hi:.1f}]",
                     "yes" if bool(same) else "no"])
        print(rows[-1], flush=True)
    print(table(["docs", "prompt tokens", "full prefill ms", "cached TTFT ms", "of which compose ms",
                 "speedup (full / cached)", "same first token"], rows))


if __name__ == "__main__":
    main()
