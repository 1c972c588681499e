"""The two tasks of ``locality_adamw.py``: the interleaved copy task and multi-document AG News, with their models.

Both have 4 blocks with explicit block ids. See the docstring of ``locality_adamw.py`` for what they test.
"""

from __future__ import annotations

import random

NB = 4  # blocks
# Copy task: tokens per block, segment length, residual width, coordinate-group rank.
VB, SEG, E, R = 16, 6, 64, 12
V_COPY = 3 + NB * VB  # PAD, BOS, EOS, then the blocks' token ranges
R_TEXT = 8  # AG News: coordinate-group rank (4 x 8 block features, 32 general features)

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
def collate_blocks(rows, pad: int) -> dict:
    """(ids, block ids) pairs -> a right-padded batch with ``block_ids`` and labels (-100 on padding)."""
    import torch

    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad)
    blocks = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, (x, b) in enumerate(rows):
        ids[i, :len(x)], blocks[i, :len(b)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(b), 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "block_ids": blocks, "labels": labels}


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
        return collate_blocks(rows, self.pad)

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
