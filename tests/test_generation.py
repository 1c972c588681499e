"""Generation: with a KV cache, localist models generate exactly what a full recompute of the sequence gives.

The block ids of cached positions are kept with the cache (and follow beam reordering); new tokens continue the
current block (explicit mode) or follow the anchor tokens (segment mode); left-padded batches give the same tokens
as one-by-one runs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PAD, build_model, left_pad_mask, localist_model, random_block_ids, random_ids
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hf_localist as hl
from hf_localist.blocks.ids import segment_block_ids

P, NEW = 8, 8  # prompt length, new tokens
DIALS = [0.7, 1.0]
ANCHORS, GENERAL = [90, 91, 92], 93


def _segment(model_type: str, alpha: float):
    model = build_model(model_type)
    cfg = hl.LocalistConfig(alpha=alpha, block_names=["a", "b", "c"], anchor_token_ids=ANCHORS,
                            general_token_id=GENERAL)
    return model, hl.apply_localist(model, cfg)


def _prompt(batch: int = 2, seed: int = 0):
    return random_ids(batch, P, seed=seed, high=90), random_block_ids(batch, P, seed=seed)


def _gen(model, ids, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))
    kw.setdefault("do_sample", False)
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **kw)


def _manual_greedy(model, ids, blocks=None, steps=NEW):
    """Greedy decoding by recomputing the whole sequence at every step (no cache)."""
    seq = ids
    for _ in range(steps):
        kw = {} if blocks is None else {"block_ids": blocks}
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False, **kw).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if blocks is not None:
            blocks = torch.cat([blocks, blocks[:, -1:]], dim=1)  # new tokens continue the current block
    return seq


# ------------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("alpha", DIALS)
def test_greedy_with_cache_equals_full_recompute(decoder_arch, alpha):
    model, handle = localist_model(decoder_arch, alpha=alpha)
    ids, blocks = _prompt()
    cached = _gen(model, ids, block_ids=blocks, use_cache=True)
    assert cached.shape == (2, P + NEW)
    assert torch.equal(cached, _manual_greedy(model, ids, blocks))
    assert torch.equal(_gen(model, ids, block_ids=blocks, use_cache=False), cached)
    # Localisation changes what is generated (the test is not vacuous).
    handle.set_dial(0.0)
    plain = _manual_greedy(model, ids, blocks)
    handle.set_dial(alpha)
    assert not torch.equal(plain, cached)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_alpha0_generation_equals_the_unpatched_model(decoder_arch, impl):
    ids, blocks = _prompt(seed=4)
    model = build_model(decoder_arch, attn_implementation=impl)
    plain = _gen(model, ids)
    plain_beam = _gen(model, ids, num_beams=3)
    hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    assert torch.equal(_gen(model, ids, block_ids=blocks), plain)
    assert torch.equal(_gen(model, ids, block_ids=blocks, num_beams=3), plain_beam)


@pytest.mark.parametrize("alpha", DIALS)
def test_sampling_with_cache_equals_manual_loop(alpha):
    model, _ = localist_model("llama", alpha=alpha)
    ids, blocks = _prompt()
    torch.manual_seed(123)
    cached = _gen(model, ids, block_ids=blocks, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(123)
    uncached = _gen(model, ids, block_ids=blocks, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                    use_cache=False)
    assert torch.equal(cached, uncached)
    # The same sampling RNG in a loop that recomputes the whole sequence each step.
    torch.manual_seed(123)
    seq, bl = ids, blocks
    for _ in range(NEW):
        with torch.no_grad():
            logits = model(input_ids=seq, block_ids=bl, use_cache=False).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        seq, bl = torch.cat([seq, nxt], 1), torch.cat([bl, bl[:, -1:]], 1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3", "phi3"])
@pytest.mark.parametrize("alpha", DIALS)
def test_beam_search_with_cache_equals_without(model_type, alpha):
    model, _ = localist_model(model_type, alpha=alpha)
    ids, blocks = _prompt(seed=1)
    cached = _gen(model, ids, block_ids=blocks, num_beams=3, num_return_sequences=2, use_cache=True)
    uncached = _gen(model, ids, block_ids=blocks, num_beams=3, num_return_sequences=2, use_cache=False)
    assert cached.shape == (4, P + NEW)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------------------------ segment mode
class ForceTokens(LogitsProcessor):
    """Force token ``tok`` when the sequence has length ``at`` (e.g. an anchor generated mid-way)."""

    def __init__(self, schedule: dict[int, int]):
        self.schedule = schedule

    def __call__(self, input_ids, scores):
        tok = self.schedule.get(input_ids.shape[1])
        if tok is not None:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, tok] = 0.0
        return scores


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha", DIALS)
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_segment_mode_anchor_mid_generation(model_type, alpha, mode):
    model, handle = _segment(model_type, alpha)
    ids, _ = _prompt()
    ids[:, 2] = ANCHORS[0]  # the prompt opens block 1
    force = LogitsProcessorList([ForceTokens({P + 2: ANCHORS[1], P + 5: GENERAL, P + 6: ANCHORS[2]})])
    kw = dict(logits_processor=force, return_dict_in_generate=True)
    if mode == "beam":
        kw["num_beams"] = 3
    out = _gen(model, ids, use_cache=True, **kw)
    seq = out.sequences
    assert (seq[:, P + 2] == ANCHORS[1]).all() and (seq[:, P + 5] == GENERAL).all()
    uncached = _gen(model, ids, use_cache=False, logits_processor=force, num_beams=kw.get("num_beams", 1))
    assert torch.equal(seq, uncached)
    # The cache carries the block ids of every cached position: those of a full segment assignment. (After beam
    # search it holds every beam; the forced anchors make all beams share one layout.)
    expected = segment_block_ids(seq[:, :-1], ANCHORS, GENERAL)
    cached = out.past_key_values._localist_block_ids
    assert torch.equal(cached, expected if mode == "greedy" else expected[:1].expand_as(cached))
    assert expected[0, P + 2:P + 5].tolist() == [2, 2, 2] and expected[0, P + 5] == 0
    if mode == "greedy":
        assert torch.equal(seq, _manual_greedy_segment(model, ids, force))


class AnchorInSomeRows(LogitsProcessor):
    """At the lengths in ``at``, give ``tok`` the best score of every other row (beam), tying with that row's best
    token: anchored and un-anchored continuations compete, so beams end up in different blocks."""

    def __init__(self, at: tuple[int, ...], tok: int):
        self.at, self.tok = at, tok

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] in self.at:
            rows = torch.arange(input_ids.shape[0]) % 2 == 0
            scores = scores.clone()
            scores[rows, self.tok] = scores[rows].max(dim=-1).values
        return scores


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_beam_search_with_beams_in_different_blocks(model_type):
    """Beam reordering must carry the block ids of the cached positions along with the keys and values."""
    model, _ = _segment(model_type, 1.0)
    ids, _ = _prompt(seed=3)
    ids[:, 1] = ANCHORS[0]
    force = LogitsProcessorList([AnchorInSomeRows(at=(P + 1, P + 3, P + 5), tok=ANCHORS[1])])
    kw = dict(num_beams=4, num_return_sequences=4, logits_processor=force, return_dict_in_generate=True)
    out = _gen(model, ids, use_cache=True, **kw)
    uncached = _gen(model, ids, use_cache=False, **kw).sequences
    assert torch.equal(out.sequences, uncached)
    layouts = {tuple(r) for r in segment_block_ids(out.sequences, ANCHORS, GENERAL).tolist()}
    assert len(layouts) > 1  # the returned beams really are in different blocks


def _manual_greedy_segment(model, ids, force):
    seq = ids
    for _ in range(NEW):
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, force(seq, logits).argmax(-1, keepdim=True)], dim=1)
    return seq


# ------------------------------------------------------------------------------------------------ cache bookkeeping
def test_cached_block_ids_are_kept_and_extended():
    model, handle = localist_model("llama", alpha=0.8)
    ids, blocks = _prompt()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, block_ids=blocks, past_key_values=cache, use_cache=True)
        assert torch.equal(cache._localist_block_ids, blocks)
        nxt = random_ids(2, 1, seed=9)
        # No block ids for the new token: it continues the current block.
        step = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        assert torch.equal(cache._localist_block_ids, torch.cat([blocks, blocks[:, -1:]], 1))
        # Block ids for the new token only.
        new_block = torch.tensor([[3], [0]])
        model(input_ids=nxt, past_key_values=cache, block_ids=new_block, use_cache=True)
        assert torch.equal(cache._localist_block_ids, torch.cat([blocks, blocks[:, -1:], new_block], 1))
        # Equal to a full forward.
        full_ids = torch.cat([ids, nxt], 1)
        full = model(input_ids=full_ids, block_ids=torch.cat([blocks, blocks[:, -1:]], 1)).logits[:, -1]
    torch.testing.assert_close(step[:, -1], full, atol=1e-5, rtol=1e-4)


def test_cache_reorder_and_crop_keep_block_ids_in_step():
    model, _ = localist_model("llama", alpha=1.0)
    ids, blocks = _prompt()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, block_ids=blocks, past_key_values=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(cache._localist_block_ids, blocks.flip(0))
        cache.reorder_cache(torch.tensor([1, 0]))
        # crop(0) is a no-op for the cache (transformers calls it during generation): the block ids stay.
        cache.crop(0)
        assert torch.equal(cache._localist_block_ids, blocks)
        cache.crop(-2)
        assert cache.get_seq_length() == P - 2
        assert torch.equal(cache._localist_block_ids, blocks[:, :-2])
        # Re-feeding the cropped positions (with their block ids) gives the full forward's logits.
        step = model(input_ids=ids[:, -2:], block_ids=blocks[:, -2:], past_key_values=cache, use_cache=True)
        full = model(input_ids=ids, block_ids=blocks)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ left padding
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha", DIALS)
@pytest.mark.parametrize("assignment", ["explicit", "segment"])
def test_left_padded_batch_equals_per_example(model_type, alpha, assignment):
    if assignment == "explicit":
        model, _ = localist_model(model_type, alpha=alpha)
    else:
        model, _ = _segment(model_type, alpha)
    lengths = [P, 5, 6]
    prompts = [random_ids(1, n, seed=10 + i, high=90) for i, n in enumerate(lengths)]
    blocks = [random_block_ids(1, n, seed=20 + i) for i, n in enumerate(lengths)]
    if assignment == "segment":
        for p in prompts:
            p[0, 1] = ANCHORS[0]
            p[0, -2] = ANCHORS[1]
    mask = left_pad_mask(3, P, [P - n for n in lengths])
    batch_ids = torch.full((3, P), PAD)
    batch_blocks = torch.zeros(3, P, dtype=torch.long)
    for i, n in enumerate(lengths):
        batch_ids[i, P - n:] = prompts[i][0]
        batch_blocks[i, P - n:] = blocks[i][0]
    kw = (lambda b: {"block_ids": b}) if assignment == "explicit" else (lambda b: {})
    batched = _gen(model, batch_ids, attention_mask=mask, **kw(batch_blocks))
    for i, n in enumerate(lengths):
        single = _gen(model, prompts[i], **kw(blocks[i]))
        assert torch.equal(batched[i, P:], single[0, n:]), f"row {i}"


def test_unpatched_model_left_padding_sanity():
    """The property above holds for the plain model too (so failures there are the plugin's)."""
    model = build_model("gpt2")
    a, b = random_ids(1, 5, seed=1), random_ids(1, P, seed=2)
    batch = torch.cat([torch.cat([torch.full((1, P - 5), PAD), a], 1), b])
    out = _gen(model, batch, attention_mask=left_pad_mask(2, P, [P - 5, 0]))
    assert torch.equal(out[0, P:], _gen(model, a)[0, 5:])


# ---------------------------------------------------------------------------------------------- block ids vs history
def test_generate_refuses_block_ids_shorter_than_the_prompt():
    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit"))
    ids = random_ids(1, 8)
    blocks = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2]])
    with pytest.raises(hl.BlockIdsError, match="block ids for 3 positions but the prompt has 8"):
        model.generate(ids, block_ids=blocks[:, :3], max_new_tokens=2, do_sample=False)
    with pytest.raises(hl.BlockIdsError):  # as the forward does
        model(ids, block_ids=blocks[:, :3])
    model.generate(ids, block_ids=blocks, max_new_tokens=2, do_sample=False)  # the whole prompt: accepted


def test_block_ids_that_contradict_the_cache_are_refused():
    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit"))
    ids = random_ids(1, 8)
    blocks = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2]])
    with torch.no_grad():
        cache = DynamicCache()
        model(ids[:, :6], block_ids=blocks[:, :6], use_cache=True, cache=cache)
        other = blocks.clone()
        other[0, 2] = 2  # position 2 was cached as block 1
        with pytest.raises(hl.BlockIdsError, match="contradict"):
            model(ids[:, 6:], block_ids=other, cache=cache)
        with pytest.raises(hl.BlockIdsError, match="length 4"):  # neither the new tokens (2) nor all of them (8)
            model(ids[:, 6:], block_ids=blocks[:, :4], cache=cache)
        out = model(ids[:, 6:], block_ids=blocks, cache=cache).logits  # consistent full-length ids: accepted
    with torch.no_grad():
        ref = model(ids, block_ids=blocks).logits[:, 6:]
    assert (out - ref).abs().max().item() <= 1e-4
