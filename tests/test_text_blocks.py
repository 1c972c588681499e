"""Tests for hf_localist.blocks.text / chat / collator: block ids built from pieces, character spans and chat
messages, padding on either side, the errors for bad input, the data collator (with a real Trainer step), and one
end-to-end forward of a localist Llama at alpha 1. The tokenizer is ``helpers.word_tokenizer`` (fast, offsets, a
BOS token, no chat template: the chat tests set a small one)."""

from __future__ import annotations

import pytest
import torch
from helpers import localist_model, word_tokenizer
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from hf_localist.blocks import LocalistDataCollator, block_ids_from_spans, encode_blocks, encode_chat, pad_block_ids
from hf_localist.config.localist import LocalistConfig
from hf_localist.errors import BlockIdsError

WORDS = ["paris", "is", "in", "france", "rome", "italy", "where", "?", "the", "capital", "big", "end", "user",
         "<system>", "<user>", "<assistant>", "</s>", "<doc>", "</doc>", "rules"]
BOS = 2  # [PAD]=0, [UNK]=1, [BOS]=2, then WORDS


@pytest.fixture
def tok():
    return word_tokenizer(WORDS)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- encode_blocks
def test_encode_blocks_one_example(tok):
    enc = encode_blocks(tok, [(1, "paris is in france"), (2, "rome is in italy")], general="where is rome ?")
    assert set(enc) == {"input_ids", "attention_mask", "block_ids"}
    assert enc["input_ids"].shape == enc["block_ids"].shape == (1, 13)
    expected = [BOS] + ids_of(tok, "paris is in france rome is in italy where is rome ?")
    assert enc["input_ids"][0].tolist() == expected
    assert enc["block_ids"][0].tolist() == [0] + [1] * 4 + [2] * 4 + [0] * 4
    assert enc["attention_mask"].all()
    assert enc["block_ids"].dtype == torch.long


def test_encode_blocks_names_general_pieces_and_lists(tok):
    cfg = LocalistConfig(block_names=["geo", "rules"], max_blocks=4)
    enc = encode_blocks(tok, [(0, "the"), ("rules", "the rules"), ("geo", "paris")], config=cfg, return_tensors=None)
    assert enc["block_ids"] == [0, 0, 2, 2, 1]  # flat lists for one example without tensors, like tokenizer(text)
    enc = encode_blocks(tok, [("a", "paris"), ("b", "rome")], block_names={"a": 3, "b": 1}, add_sink=False)
    assert enc["block_ids"][0].tolist() == [3, 1]  # no BOS: the first token is the sink
    assert encode_blocks(tok, [(1, "paris")], add_sink=7)["input_ids"][0].tolist() == [7, ids_of(tok, "paris")[0]]


def test_encode_blocks_without_bos_token():
    tok = word_tokenizer(WORDS, specials=("[PAD]", "[UNK]"))
    enc = encode_blocks(tok, [(1, "paris is"), (2, "rome")])
    assert enc["input_ids"][0].tolist() == ids_of(tok, "paris is rome")
    assert enc["block_ids"][0].tolist() == [1, 1, 2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_blocks_batch_padding(tok, side):
    tok.padding_side = side
    enc = encode_blocks(tok, [[(1, "paris is in france"), (2, "rome")], [(2, "italy")]], general=["where ?", None])
    assert enc["input_ids"].shape == enc["block_ids"].shape == enc["attention_mask"].shape == (2, 8)
    rows = [([0] + [1] * 4 + [2] + [0, 0]), [0, 2]]
    pad = [0] * 6
    assert enc["block_ids"][0].tolist() == rows[0]
    assert enc["block_ids"][1].tolist() == (pad + rows[1] if side == "left" else rows[1] + pad)
    mask = enc["attention_mask"][1].tolist()
    assert mask == ([0] * 6 + [1, 1] if side == "left" else [1, 1] + [0] * 6)
    assert (enc["input_ids"][enc["attention_mask"] == 0] == tok.pad_token_id).all()
    # The sink is the first non-padding token: BOS in every row.
    first = enc["attention_mask"].argmax(1)
    assert enc["input_ids"].gather(1, first[:, None]).flatten().tolist() == [BOS, BOS]


def test_encode_blocks_padding_options(tok):
    enc = encode_blocks(tok, [[(1, "paris")], [(1, "rome is")]], pad_to_multiple_of=4, padding_side="left")
    assert enc["block_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    ragged = encode_blocks(tok, [[(1, "paris")], [(1, "rome is")]], padding=False, return_tensors=None)
    assert ragged["block_ids"] == [[0, 1], [0, 1, 1]]
    with pytest.raises(BlockIdsError, match="padding=True"):
        encode_blocks(tok, [[(1, "paris")], [(1, "rome is")]], padding=False)
    nopad = word_tokenizer(WORDS, specials=("[UNK]", "[BOS]"))
    assert encode_blocks(nopad, [[(1, "paris")], [(2, "rome")]])["block_ids"].tolist() == [[0, 1], [0, 2]]
    with pytest.raises(BlockIdsError, match="pad_token"):
        encode_blocks(nopad, [[(1, "paris")], [(1, "rome is")]])


@pytest.mark.parametrize("pieces, kwargs, match", [
    ([(1, "paris"), (-1, "rome")], {}, "block id -1"),
    ([(1, "paris"), (5, "rome")], {"config": LocalistConfig(max_blocks=4)}, "max_blocks=4"),
    ([("geo", "paris")], {}, "unknown"),
    ([("geo", "paris")], {"block_names": ["rules"]}, "unknown"),
    ([(1.0, "paris")], {}, "must be an int"),
    ([(True, "paris")], {}, "must be an int"),
    ([(1, "paris"), (2, "")], {}, "gives no token"),
    ([(1, "paris"), (2, 3)], {}, r"\(block, text\) pair"),
    ("paris", {}, r"\(block, text\) pairs"),
    ([[(1, "paris")], [(1, "rome")]], {"general": "where"}, "one text"),
    ([(1, "paris")], {"general": ["where"]}, "single example"),
    ([(1, "paris")], {"block_names": "geo"}, "list of names"),
    ([(1, "paris")], {"add_sink": "yes"}, "add_sink"),
])
def test_encode_blocks_errors(tok, pieces, kwargs, match):
    with pytest.raises(BlockIdsError, match=match):
        encode_blocks(tok, pieces, **kwargs)


# ---------------------------------------------------------------------------------------------- spans
TEXT = "paris is in france rome is in italy where is rome ?"


def test_spans_assign_tokens(tok):
    spans = [(0, 18, 1), (19, 35, "b")]
    enc = block_ids_from_spans(tok, TEXT, spans, block_names={"b": 2})
    assert enc["input_ids"][0].tolist() == [BOS] + ids_of(tok, TEXT)
    assert enc["block_ids"][0].tolist() == [0] + [1] * 4 + [2] * 4 + [0] * 4
    # A span that starts inside a word still takes it (its first character is inside); "aris" -> "paris" is not.
    enc = block_ids_from_spans(tok, TEXT, [(1, 18, 1), (18, 23, 2)], add_sink=False)
    assert enc["block_ids"][0].tolist()[:6] == [0, 1, 1, 1, 2, 0]  # " rome": its leading space is skipped


def test_spans_batch_left_padding(tok):
    tok.padding_side = "left"
    enc = block_ids_from_spans(tok, ["paris is", TEXT], [[(0, 5, 1)], [(0, 18, 1), (19, 35, 2)]])
    assert enc["block_ids"][0].tolist() == [0] * 10 + [0, 1, 0]  # 13 tokens in the longest row
    assert enc["attention_mask"][0].tolist() == [0] * 10 + [1, 1, 1]


def test_spans_match_whitespace_owning_tokens():
    # Tokens that carry the space before a word (SentencePiece's "▁rome", byte-level BPE): offsets (18, 23).
    from hf_localist.blocks.text import assign_tokens

    text = "paris is rome"
    blocks, counts = assign_tokens(text, [(0, 5), (5, 8), (8, 13)], [(0, 8, 1, 0), (9, 13, 2, 1)])
    assert blocks == [1, 1, 2] and counts == [2, 1]
    assert assign_tokens(text, [(0, 0), (0, 5)], [(0, 5, 1, 0)])[0] == [0, 1]  # added specials: block 0


@pytest.mark.parametrize("spans, match", [
    ([(0, 5, 1), (3, 10, 2)], "overlap"),
    ([(0, 5, 1), (40, 60, 2)], "out of range"),
    ([(-1, 5, 1)], "out of range"),
    ([(5, 5, 1)], "out of range"),
    ([(6, 4, 1)], "out of range"),
    ([(5, 6, 1)], "no token"),  # a single space: no token starts there
    ([(0, 5)], "triple"),
    ([(0.0, 5, 1)], "integer"),
    ([(0, 5, "geo")], "unknown"),
    ("0 5 1", "list of"),
])
def test_spans_errors(tok, spans, match):
    with pytest.raises(BlockIdsError, match=match) as err:
        block_ids_from_spans(tok, TEXT, spans)
    if match in ("overlap", "out of range", "no token"):
        assert repr(tuple(spans[-1])) in str(err.value)  # the message names the bad span


def test_spans_need_fast_tokenizer_and_matching_batch(tok):
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(BlockIdsError, match="fast tokenizer"):
        block_ids_from_spans(SlowTokenizer(), TEXT, [(0, 5, 1)])
    with pytest.raises(BlockIdsError, match="one span list per text"):
        block_ids_from_spans(tok, [TEXT, TEXT], [[(0, 5, 1)]])


# ---------------------------------------------------------------------------------------------- chat
TEMPLATE = ("{% for d in documents or [] %}<doc> {{ d.title }} {{ d.text }} </doc> {% endfor %}"
            "{% for m in messages %}<{{ m.role }}> {{ m.content }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture
def chat_tok(tok):
    tok.chat_template = TEMPLATE
    return tok


def test_chat_message_blocks(chat_tok):
    msgs = [{"role": "system", "content": "rules", "block": 0}, {"role": "user", "content": "paris is big"},
            {"role": "user", "content": "user end"}]  # contents that also occur in the template's glue
    enc = encode_chat(chat_tok, msgs, add_generation_prompt=True)
    ref = chat_tok.apply_chat_template([{k: v for k, v in m.items() if k != "block"} for m in msgs],
                                       add_generation_prompt=True, tokenize=True)
    assert enc["input_ids"][0].tolist() == ref["input_ids"]  # the template's own tokens, no extra BOS
    toks = chat_tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert toks[:5] == ["<system>", "rules", "</s>", "<user>", "paris"]
    assert enc["block_ids"][0].tolist() == [0, 0, 0, 0, 2, 2, 2, 0, 0, 3, 3, 0, 0]
    enc = encode_chat(chat_tok, msgs, glue="block", add_generation_prompt=True)
    # Each block takes the glue before it: "</s> <user>" after the previous content; the generation prompt is general.
    assert enc["block_ids"][0].tolist() == [0, 0, 2, 2, 2, 2, 2, 3, 3, 3, 3, 0, 0]


def test_chat_block_per_options_and_names(chat_tok):
    msgs = [{"role": "system", "content": "rules"}, {"role": "user", "content": "paris"},
            {"role": "assistant", "content": "france"}]
    by_role = encode_chat(chat_tok, msgs, block_per={"user": "geo", "assistant": 2}, block_names=["geo"])
    assert by_role["block_ids"][0].tolist() == [0, 0, 0, 0, 1, 0, 0, 2, 0]
    listed = encode_chat(chat_tok, msgs, block_per=[0, 3, 0])
    assert listed["block_ids"][0].tolist() == [0, 0, 0, 0, 3, 0, 0, 0, 0]
    general = encode_chat(chat_tok, msgs, block_per=None, add_sink=True)
    assert general["input_ids"][0, 0] == BOS and general["block_ids"].sum() == 0


def test_chat_documents(chat_tok):
    docs = [{"title": "france", "text": "paris is in france"}, {"title": "italy", "text": "rome", "block": 4}]
    msgs = [{"role": "user", "content": "where is rome ?"}]
    enc = encode_chat(chat_tok, msgs, documents=docs)  # auto: documents are blocks, messages general
    toks = chat_tok.convert_ids_to_tokens(enc["input_ids"][0])
    blocks = enc["block_ids"][0].tolist()
    assert list(zip(toks, blocks))[:9] == [("<doc>", 0), ("france", 0), ("paris", 1), ("is", 1), ("in", 1),
                                           ("france", 1), ("</doc>", 0), ("<doc>", 0), ("italy", 0)]
    assert blocks[9] == 4 and sum(blocks[10:]) == 0
    both = encode_chat(chat_tok, msgs, documents=docs, block_per="message")
    assert set(both["block_ids"][0].tolist()) == {0, 1, 4, 3}  # message 0 after the 2 documents: block 3


def test_chat_batch_left_padding(chat_tok):
    chat_tok.padding_side = "left"
    convs = [[{"role": "user", "content": "paris"}], [{"role": "user", "content": "rome is big"}]]
    enc = encode_chat(chat_tok, convs)  # "<user> paris </s>" and "<user> rome is big </s>"
    assert enc["block_ids"].tolist() == [[0, 0, 0, 1, 0], [0, 1, 1, 1, 0]]
    assert enc["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]


def test_chat_trimming_template(chat_tok):
    chat_tok.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content | trim }} </s> {% endfor %}"
    enc = encode_chat(chat_tok, [{"role": "user", "content": "  paris is  "}])
    assert enc["block_ids"][0].tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("template, messages, match", [
    (None, [{"role": "user", "content": "paris"}], "no chat template"),
    ("{% for m in messages %}{{ m.content | upper }} {% endfor %}", [{"role": "user", "content": "paris"}],
     "changes the contents"),
    ("{% for m in messages %}{{ m.content }} {{ m.content }} {% endfor %}", [{"role": "user", "content": "paris"}],
     "2 times"),
    ("{% for m in messages %}<user> {% endfor %}", [{"role": "user", "content": "paris"}], "0 times"),
    (TEMPLATE, [{"role": "user", "content": ""}], "gives no token"),
    (TEMPLATE, [{"role": "user", "content": ["paris"]}], "only str contents"),
    (TEMPLATE, [{"role": "user", "content": "paris", "block": 99}], "max_blocks"),
    (TEMPLATE, [{"role": "user", "content": "paris"}, "rome"], "list of dicts"),
])
def test_chat_errors(tok, template, messages, match):
    tok.chat_template = template
    with pytest.raises(BlockIdsError, match=match):
        encode_chat(tok, messages, config=LocalistConfig(max_blocks=4))


def test_chat_other_errors(chat_tok):
    msgs = [{"role": "user", "content": "paris"}]
    with pytest.raises(BlockIdsError, match="glue"):
        encode_chat(chat_tok, msgs, glue="none")
    with pytest.raises(BlockIdsError, match="one block per message"):
        encode_chat(chat_tok, msgs, block_per=[1, 2])
    with pytest.raises(BlockIdsError, match="block_per"):
        encode_chat(chat_tok, msgs, block_per="role")
    with pytest.raises(BlockIdsError, match="'text'"):
        encode_chat(chat_tok, msgs, documents=[{"title": "paris"}])


# ---------------------------------------------------------------------------------------------- collator
def _features(tok):
    rows = [[(1, "paris is in france"), (2, "rome")], [(2, "italy")], [(1, "the capital")]]
    return [dict(encode_blocks(tok, r, return_tensors=None)) for r in rows]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_block_ids(tok, side):
    tok.padding_side = side
    feats = _features(tok)
    batch = LocalistDataCollator(tok)(feats)
    assert batch["input_ids"].shape == batch["block_ids"].shape == batch["labels"].shape == (3, 6)
    lengths = [len(f["input_ids"]) for f in feats]
    assert batch["block_ids"].tolist() == pad_block_ids([f["block_ids"] for f in feats], [6] * 3, side)
    for i, n in enumerate(lengths):
        kept = batch["attention_mask"][i].bool()
        assert batch["block_ids"][i][kept].tolist() == feats[i]["block_ids"] and kept.sum() == n
        assert (batch["block_ids"][i][~kept] == 0).all() and (batch["labels"][i][~kept] == -100).all()
    assert "block_ids" in feats[0]  # the dataset's features are not modified


def test_collator_wraps_other_collators_and_target_ids(tok):
    feats = _features(tok)
    for f in feats:
        f["target_block_ids"] = torch.tensor(f["block_ids"])  # tensors as from datasets' torch format
        f["labels"] = 1
    collator = LocalistDataCollator(collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8))
    batch = collator(feats)
    assert batch["block_ids"].shape == batch["target_block_ids"].shape == (3, 8)
    assert torch.equal(batch["block_ids"], batch["target_block_ids"])
    assert batch["labels"].tolist() == [1, 1, 1]
    assert set(LocalistDataCollator(tok, language_modeling=False)(_features(tok))) == {
        "input_ids", "attention_mask", "block_ids"}


def test_collator_errors(tok):
    feats = _features(tok)
    feats[1]["block_ids"] = feats[1]["block_ids"][:-1]
    with pytest.raises(BlockIdsError, match="example 1 has 1 block_ids for 2 input_ids"):
        LocalistDataCollator(tok)(feats)
    feats = _features(tok)
    del feats[2]["block_ids"]
    with pytest.raises(BlockIdsError, match="in 2 of 3 features"):
        LocalistDataCollator(tok)(feats)
    with pytest.raises(BlockIdsError, match="tokenizer or a collator"):
        LocalistDataCollator()
    with pytest.raises(BlockIdsError, match="padding_side"):
        LocalistDataCollator(collator=lambda f: f)
    with pytest.raises(BlockIdsError, match="truncate"):
        pad_block_ids([[1, 1, 1]], [2], "right")


def test_collator_in_trainer(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    model, _ = localist_model("llama", alpha=1.0, max_blocks=4)
    data = datasets.Dataset.from_list(_features(tok))
    seen = []
    # A hook, not a wrapped forward: Trainer keeps the columns that model.forward's signature names.
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("block_ids")), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, data_collator=LocalistDataCollator(tok)).train()
    assert seen and seen[0] is not None and seen[0].shape == (3, 6)  # block_ids survived remove_unused_columns


# ---------------------------------------------------------------------------------------------- end to end
def test_encode_blocks_forward_at_alpha_one(tok):
    model, _ = localist_model("llama", alpha=1.0, max_blocks=4, block_positions="restart")
    tok.padding_side = "left"
    enc = encode_blocks(tok, [[(1, "paris is in france"), (2, "rome is in italy")], [(2, "rome")]],
                        general=["where is rome ?", "where ?"])
    with torch.no_grad():
        out = model(**enc)
        alone = model(**encode_blocks(tok, [(2, "rome is in italy")]))
    assert out.logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(out.logits).all()
    # At alpha 1 with restarted positions, block 2 sees only the sink and itself: its logits equal block 2 alone.
    torch.testing.assert_close(out.logits[0, 5:9], alone.logits[0, 1:], atol=1e-4, rtol=0)
