"""Block-KV reuse (docs/howto-block-cache.md): a block encoded once at dial 1 with restart positions, composed into a
cache with others, gives the question the logits and the greedy tokens of the library's own full forward; BlockKV
files round-trip bit for bit; fingerprints, settings and inputs where exactness cannot hold are refused; the
store encodes each block once and keeps its memory within budget."""

from __future__ import annotations

import pytest
import torch
from helpers import DECODER_ARCHS, ENCODER_ARCHS, build_model, random_ids

from hf_localist import (
    BlockKV,
    BlockKVError,
    BlockKVStore,
    LocalistConfig,
    LocalistConfigError,
    LocalistLoadError,
    UnsupportedArchitectureError,
    apply_localist,
    composed_sequence,
)

SINK = 1
SIZES = (5, 7, 3)
# Gemma 2 / 3 have sliding-window layers: exactness needs the sink and the blocks inside the window.
WIDE = {"gemma2": {"sliding_window": 32}, "gemma3_text": {"sliding_window": 32}}


def _model(arch: str, seed: int = 0, **config):
    model = build_model(arch, seed=seed, **WIDE.get(arch, {}))
    fields = dict(alpha=1.0, block_assignment="explicit", block_positions="restart")
    fields.update(config)
    return model, apply_localist(model, LocalistConfig(**fields))


def _docs(seed: int = 0, sizes=SIZES):
    return [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(sizes)]


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_composed_cache_equals_the_full_forward(arch):
    model, handle = _model(arch)
    blocks = [handle.encode_block(d, sink_token_id=SINK) for d in _docs()]
    question = random_ids(1, 4, seed=9)[0]
    ids, bids = composed_sequence(blocks, question)
    with torch.no_grad():
        out = model(input_ids=question[None], cache=handle.compose_cache(blocks)).logits[0]
        ref = model(input_ids=ids, block_ids=bids).logits[0, -question.numel():]
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4, diff
    # generation from the composed cache equals generation from the full forward: the same greedy tokens
    gen = model.generate(question[None], cache=handle.compose_cache(blocks), max_new_tokens=6, do_sample=False)
    full = model.generate(ids, block_ids=bids, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] == question.numel() + 6  # the output holds the question and what was generated
    assert gen[0, -6:].tolist() == full[0, -6:].tolist()


def test_tokens_after_the_blocks_are_general_and_the_history_continues():
    model, handle = _model("llama")
    blocks = [handle.encode_block(d, sink_token_id=SINK) for d in _docs()]
    q1, q2 = random_ids(1, 3, seed=4)[0], random_ids(1, 2, seed=5)[0]
    cache = handle.compose_cache(blocks)
    with torch.no_grad(), handle.capture_layouts() as calls:
        model(input_ids=q1[None], cache=cache)
        second = model(input_ids=q2[None], cache=cache).logits[0]
        ids, bids = composed_sequence(blocks, torch.cat([q1, q2]))
        ref = model(input_ids=ids, block_ids=bids).logits[0, -2:]
    assert calls[0].block_ids[0, -3:].tolist() == [0, 0, 0]
    assert calls[1].block_ids[0].tolist() == bids[0].tolist()
    assert (second - ref).abs().max().item() <= 1e-4


def test_beam_search_from_a_composed_cache_matches_the_full_forward():
    model, handle = _model("qwen2")
    blocks = [handle.encode_block(d, sink_token_id=SINK) for d in _docs()]
    question = random_ids(1, 3, seed=7)[0]
    ids, bids = composed_sequence(blocks, question)
    gen = model.generate(question[None], cache=handle.compose_cache(blocks, batch_size=2), max_new_tokens=4,
                         num_beams=2, do_sample=False)
    full = model.generate(ids, block_ids=bids, max_new_tokens=4, num_beams=2, do_sample=False)
    assert gen[0, -4:].tolist() == full[0, -4:].tolist()


def test_blockkv_save_load_round_trips_bit_for_bit(tmp_path):
    _, handle = _model("mistral")
    kv = handle.encode_block(_docs()[0], sink_token_id=SINK)
    kv.save(tmp_path / "b.safetensors")
    back = BlockKV.load(tmp_path / "b.safetensors")
    assert (back.fingerprint, back.sink_token_id, back.block_positions, back.length) == \
        (kv.fingerprint, kv.sink_token_id, kv.block_positions, kv.length)
    assert torch.equal(back.input_ids, kv.input_ids)
    for name in ("keys", "values", "sink_keys", "sink_values"):
        for a, b in zip(getattr(kv, name), getattr(back, name)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert kv.nbytes == back.nbytes > 0


def test_blockkv_load_refuses_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(LocalistLoadError, match="not a file"):
        BlockKV.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(LocalistLoadError, match="bad.safetensors"):
        BlockKV.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(LocalistLoadError, match="format"):
        BlockKV.load(tmp_path / "foreign.safetensors")


def test_fingerprint_mismatch_is_refused():
    model, handle = _model("llama")
    kv = handle.encode_block(_docs()[0], sink_token_id=SINK)
    other_model, other = _model("llama", seed=1)  # other weights, same config
    with pytest.raises(BlockKVError, match="fingerprint"):
        other.compose_cache([kv])
    with pytest.raises(BlockKVError, match="fingerprint"):  # another sink than blocks[0]'s
        handle.compose_cache([kv, handle.encode_block(_docs()[1], sink_token_id=SINK + 1)])
    handle.update(beta_anchor=0.5)  # changes the keys of a block's tokens
    with pytest.raises(BlockKVError, match="fingerprint"):
        handle.compose_cache([kv])
    handle.update(beta_anchor=0.0)
    handle.compose_cache([kv])  # the same settings again: accepted
    with torch.no_grad():  # an in-place weight change (a training step) changes the fingerprint too
        next(model.parameters()).add_(1e-3)
    with pytest.raises(BlockKVError, match="fingerprint"):
        handle.compose_cache([kv])


def test_settings_where_reuse_is_not_exact_are_refused():
    _, handle = _model("llama", block_positions="continuous")
    with pytest.raises(LocalistConfigError, match="block_positions"):
        handle.encode_block(_docs()[0], sink_token_id=SINK)
    _, handle = _model("llama", alpha=0.5)
    with pytest.raises(LocalistConfigError, match="dial"):
        handle.encode_block(_docs()[0], sink_token_id=SINK)
    with handle.dial(1.0):  # the dial of this thread is 1: accepted
        kv = handle.encode_block(_docs()[0], sink_token_id=SINK)
    with pytest.raises(LocalistConfigError, match="dial"):
        handle.compose_cache([kv])
    _, handle = _model("llama", first_local_layer=1)
    with pytest.raises(LocalistConfigError, match="first_local_layer"):
        handle.encode_block(_docs()[0], sink_token_id=SINK)


def test_sliding_windows_shorter_than_the_prefix_are_refused():
    model = build_model("gemma3_text")  # sliding window of 4 positions
    handle = apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    kv = handle.encode_block(random_ids(1, 3)[0], sink_token_id=SINK)  # 1 + 3 = 4: fits
    with pytest.raises(BlockKVError, match="sliding-window"):
        handle.compose_cache([kv, kv])
    with pytest.raises(BlockKVError, match="sliding-window"):
        handle.encode_block(random_ids(1, 4)[0], sink_token_id=SINK)


@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_encoders_are_refused(arch):
    model = build_model(arch)
    handle = apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit"))
    with pytest.raises(UnsupportedArchitectureError, match="causal"):
        handle.encode_block(random_ids(1, 3)[0], sink_token_id=SINK)


@pytest.mark.parametrize("bad", [[], [[1, 2], [3, 4]], [1.5, 2.0], [1, 100], [-1]])
def test_bad_block_ids_are_refused(bad):
    _, handle = _model("llama")
    with pytest.raises(BlockKVError, match="encode_block"):
        handle.encode_block(bad, sink_token_id=SINK)


def test_compose_refuses_bad_lists_and_too_many_blocks():
    _, handle = _model("llama", max_blocks=2)
    kv = handle.encode_block(_docs()[0], sink_token_id=SINK)
    for bad in ([], kv, [kv, "x"]):
        with pytest.raises(BlockKVError, match="compose_cache"):
            handle.compose_cache(bad)
    with pytest.raises(BlockKVError, match="max_blocks"):
        handle.compose_cache([kv, kv, kv])
    model = build_model("llama")
    model.config.bos_token_id = None
    handle = apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    with pytest.raises(BlockKVError, match="sink_token_id"):
        handle.encode_block(_docs()[0])


def test_store_encodes_once_and_evicts_within_its_budget(tmp_path):
    model, handle = _model("llama")
    docs = _docs(sizes=(6, 6, 6, 6))
    size = handle.encode_block(docs[0], sink_token_id=SINK).nbytes
    store = BlockKVStore(handle, max_bytes=2 * size + size // 2, directory=tmp_path / "kv", sink_token_id=SINK)
    for d in docs:
        store.get(d)
        assert store.nbytes <= store.max_bytes
    assert len(store) == 2 and store.stats["encoded"] == 4 and store.stats["evicted"] == 2
    assert docs[3] in store and docs[2] in store  # the two most recent
    store.get(docs[3])
    assert store.stats["hits"] == 1
    store.get(docs[0])  # evicted from memory, read back from the directory: not encoded again
    assert store.stats["disk_hits"] == 1 and store.stats["encoded"] == 4
    # another process (a new store on the same directory) encodes nothing
    again = BlockKVStore(handle, max_bytes=0, directory=tmp_path / "kv", sink_token_id=SINK)
    question = random_ids(1, 3, seed=8)[0]
    with torch.no_grad():
        out = model(input_ids=question[None], cache=again.compose(docs[:3])).logits
        ids, bids = composed_sequence([again.get(d) for d in docs[:3]], question)
        ref = model(input_ids=ids, block_ids=bids).logits[:, -3:]
    assert again.stats["encoded"] == 0 and len(again) == 0
    assert (out - ref).abs().max().item() <= 1e-4
    with pytest.raises(BlockKVError, match="max_bytes"):
        BlockKVStore(handle, max_bytes=-1)


def test_store_keys_by_model_fingerprint(tmp_path):
    _, handle = _model("llama")
    _, other = _model("llama", seed=1)
    doc = _docs()[0]
    BlockKVStore(handle, directory=tmp_path, sink_token_id=SINK).get(doc)
    store = BlockKVStore(other, directory=tmp_path, sink_token_id=SINK)
    assert doc not in store
    kv = store.get(doc)  # encoded by the other model, not read from the first model's entry
    assert store.stats["encoded"] == 1 and kv.fingerprint != handle.encode_block(doc, sink_token_id=SINK).fingerprint


def test_general_block_bias_rescales_the_question_and_stays_exact():
    model, handle = _model("llama")
    blocks = [handle.encode_block(d, sink_token_id=SINK) for d in _docs()]
    question = random_ids(1, 4, seed=9)[0]
    ids, bids = composed_sequence(blocks, question)
    with torch.no_grad():
        plain = model(input_ids=question[None], cache=handle.compose_cache(blocks)).logits
        handle.update(general_block_bias=-1.5)  # does not change the blocks' keys: the same BlockKVs compose
        out = model(input_ids=question[None], cache=handle.compose_cache(blocks)).logits
        ref = model(input_ids=ids, block_ids=bids).logits[:, -4:]
        zero = model(input_ids=ids, block_ids=bids, localist_alpha=0.0).logits[:, -4:]
        handle.update(alpha=0.0, general_block_bias=0.0)
        unmodified = model(input_ids=ids, block_ids=bids).logits[:, -4:]
    assert (out - ref).abs().max().item() <= 1e-4
    assert (out - plain).abs().max().item() > 1e-3  # the bias changes the question's logits
    assert torch.equal(zero, unmodified)  # dial 0 stays the unmodified model


def test_block_order_does_not_change_the_question():
    model, handle = _model("llama")
    blocks = [handle.encode_block(d, sink_token_id=SINK) for d in _docs()]
    question = random_ids(1, 4, seed=3)
    with torch.no_grad():
        forward = model(input_ids=question, cache=handle.compose_cache(blocks)).logits
        backward = model(input_ids=question, cache=handle.compose_cache(blocks[::-1])).logits
    assert (forward - backward).abs().max().item() <= 1e-5


def test_the_howto_example_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "howto-block-cache.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "howto-block-cache.md", "exec"), {})
    out = capsys.readouterr().out
    assert "{'hits': 2, 'disk_hits': 0, 'encoded': 2, 'evicted': 0}" in out
    diff = float(re.search(r"tensor\(([0-9.e+-]+)", out).group(1))
    assert diff <= 1e-4
