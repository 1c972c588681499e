"""Draw the bundled demo data: a small, class-balanced sample of AG News.

Reads ``ag_news/train_sample_5k_b.csv`` from ``--data_dir`` (the shared data folder; ``--source`` is the same option)
and writes ``src/hf_localist/data/ag_news_sample.csv`` with columns ``split,label,topic,text``:
240 articles per class with ``split=train`` and 25 per class with ``split=test`` (held out), drawn with a fixed
seed, so rerunning this script reproduces the file byte for byte.

    python examples/make_demo_data.py --data_dir DATA                   # default sizes, seed 0
    python examples/make_demo_data.py --data_dir DATA --train 240 --test 25
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["world", "sports", "business", "scitech"]  # labels 0.0 .. 3.0 of the source file


def draw(source: Path, n_train: int, n_test: int, seed: int) -> list[dict[str, str]]:
    by_label: dict[int, list[str]] = {i: [] for i in range(len(TOPICS))}
    seen: set[str] = set()
    with open(source, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = row["text"].strip()
            if text in seen:  # AG News has a few exact duplicates: keep the first
                continue
            seen.add(text)
            by_label[int(float(row["label"]))].append(text)
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    for label, texts in by_label.items():
        picked = rng.sample(texts, n_train + n_test)
        for i, text in enumerate(picked):
            split = "train" if i < n_train else "test"
            out.append({"split": split, "label": str(label), "topic": TOPICS[label], "text": text})
    rng.shuffle(out)
    out.sort(key=lambda r: r["split"] != "train")  # train rows first (stable: shuffled within each split)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", "--source", dest="source", type=Path, required=True,
                        help="the shared data folder holding ag_news/train_sample_5k_b.csv")
    parser.add_argument("--output", type=Path, default=REPO / "src" / "hf_localist" / "data" / "ag_news_sample.csv")
    parser.add_argument("--train", type=int, default=240, help="training articles per class")
    parser.add_argument("--test", type=int, default=25, help="held-out articles per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = draw(args.source / "ag_news" / "train_sample_5k_b.csv", args.train, args.test, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "label", "topic", "text"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows ({args.output.stat().st_size:,} bytes) to {args.output}")


if __name__ == "__main__":
    main()
