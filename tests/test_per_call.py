"""Per-call state rides the call: threads, copies, pickling, the backbone alone, gradient checkpointing.

Nothing about one forward call is stored on the model: the layout travels as the attention kwarg ``localist_call``,
``handle.dial()`` / ``handle.record()`` are context-local, and every patch is a picklable object.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import (
    ARCHS,
    DECODER_ARCHS,
    LAYERS,
    apply_explicit,
    assert_close_scaled,
    build_model,
    main_output,
    random_block_ids,
    random_ids,
)

import hf_localist as hl

T = 12


# ------------------------------------------------------------------------------------------------ threads
def test_four_threads_with_different_block_ids_and_dials_give_no_wrong_output():
    model = build_model("llama")
    handle = apply_explicit(model, alpha=0.5)
    ids = random_ids(2, T, seed=3)
    layouts = [random_block_ids(2, T, seed=s) for s in range(4)]
    dials = [0.0, 0.3, 0.8, 1.0]
    with torch.no_grad():
        expected = {(i, a): main_output(model(input_ids=ids, block_ids=layouts[i], localist_alpha=a))
                    for i in range(4) for a in dials}
    assert len({round(float(v.double().abs().sum()), 6) for v in expected.values()}) > 8  # the combinations differ
    wrong = [0] * 4
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for step in range(30):
                i, a = (k + step) % 4, dials[(k + 2 * step) % 4]
                with torch.no_grad():
                    if step % 2:  # half the calls through the context-local dial, half through the forward argument
                        with handle.dial(a):
                            out = main_output(model(input_ids=ids, block_ids=layouts[i]))
                    else:
                        out = main_output(model(input_ids=ids, block_ids=layouts[i], localist_alpha=a))
                wrong[k] += int(not torch.equal(out, expected[(i, a)]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert wrong == [0, 0, 0, 0]
    assert handle.config.alpha == 0.5  # no thread changed the model-wide dial


def test_dial_blocks_in_two_threads_do_not_leak_and_restore_nothing_global():
    model = build_model("llama")
    handle = apply_explicit(model, alpha=0.5)
    inside = threading.Barrier(2)
    seen = {}

    def worker(alpha: float) -> None:
        with handle.dial(alpha):
            inside.wait()  # both threads are inside their block now
            seen[alpha] = (handle.effective_alpha(), handle.layer_alphas())
            inside.wait()

    threads = [threading.Thread(target=worker, args=(a,)) for a in (0.0, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0.0] == (0.0, [0.0] * LAYERS) and seen[1.0] == (1.0, [1.0] * LAYERS)
    assert handle.config.alpha == 0.5 and handle.effective_alpha() == 0.5


def test_record_in_one_thread_does_not_collect_another_threads_calls():
    model = build_model("llama")
    handle = apply_explicit(model, alpha=0.5)
    ids, blocks = random_ids(1, T), random_block_ids(1, T)
    started, done = threading.Event(), threading.Event()

    def other() -> None:
        started.wait()
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, block_ids=blocks)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with handle.record() as rec:
        started.set()
        done.wait()
        with torch.no_grad():
            model(input_ids=ids, block_ids=blocks)
    thread.join()
    assert len(rec._per_call[0]["entropy"]) == 1  # only this thread's one call


def test_bad_per_call_dial_is_a_clear_error():
    model = build_model("llama")
    apply_explicit(model, alpha=0.5)
    ids, blocks = random_ids(1, T), random_block_ids(1, T)
    with pytest.raises(hl.LocalistConfigError, match="localist_alpha=1.5"):
        model(input_ids=ids, block_ids=blocks, localist_alpha=1.5)
    with pytest.raises(hl.LocalistConfigError, match="dial"):
        with model.localist_handle.dial(-0.1):
            pass
    with pytest.raises(hl.LocalistStateError, match="localist_call"):
        model(input_ids=ids, block_ids=blocks, localist_call=object())


def test_generate_takes_the_per_call_dial():
    model = build_model("llama")
    handle = apply_explicit(model, alpha=0.0)
    ids, blocks = random_ids(1, 6, seed=5), random_block_ids(1, 6, seed=5)
    kw = dict(max_new_tokens=4, do_sample=False, block_ids=blocks)
    with torch.no_grad():
        with handle.dial(1.0):
            scoped = model.generate(ids, **kw)
        per_call = model.generate(ids, localist_alpha=1.0, **kw)
        handle.set_dial(1.0)
        model_wide = model.generate(ids, **kw)
    assert torch.equal(scoped, model_wide) and torch.equal(per_call, model_wide)


# ------------------------------------------------------------------------------------------------ config
def test_one_config_for_two_models_is_copied():
    cfg = hl.LocalistConfig(alpha=0.4, block_assignment="explicit")
    a, b = build_model("llama"), build_model("llama", seed=1)
    ha, hb = hl.apply_localist(a, cfg), hl.apply_localist(b, cfg)
    ha.set_dial(0.9)
    assert hb.config.alpha == 0.4 and cfg.alpha == 0.4
    assert ha.config is not cfg and hb.config is not ha.config


# ------------------------------------------------------------------------------------------------ copies
def _checked_inputs(model_type):
    ids = random_ids(2, T, seed=2)
    return ids, random_block_ids(2, T, seed=2)


@pytest.mark.parametrize("model_type", ARCHS)
def test_deepcopy_runs_its_own_weights_and_handle(model_type):
    model = build_model(model_type)
    impl = model.config._attn_implementation  # sdpa; eager for a model that refuses sdpa (Gemma 2)
    handle = apply_explicit(model, alpha=0.7)
    ids, blocks = _checked_inputs(model_type)
    with torch.no_grad():
        before = main_output(model(input_ids=ids, block_ids=blocks))
        twin = copy.deepcopy(model)
        assert torch.equal(main_output(twin(input_ids=ids, block_ids=blocks)), before)
        twin_handle = twin.localist_handle
        assert twin_handle is not handle and twin_handle.base is twin and twin_handle.config is not handle.config
        for p in twin.parameters():
            p.mul_(0.5)  # the copy's own weights: its outputs move, the original's do not
        moved = main_output(twin(input_ids=ids, block_ids=blocks))
        assert not torch.allclose(moved, before)
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks)), before)
        twin_handle.set_dial(0.0)
        assert handle.config.alpha == 0.7
        plain = twin_handle.revert()
        assert "forward" not in plain.__dict__ and plain.config._attn_implementation == impl
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks)), before)


@pytest.mark.parametrize("model_type", ARCHS)
def test_torch_save_and_load_of_a_patched_model(model_type):
    model = build_model(model_type)
    impl = model.config._attn_implementation  # sdpa; eager for a model that refuses sdpa (Gemma 2)
    apply_explicit(model, alpha=0.7)
    ids, blocks = _checked_inputs(model_type)
    with torch.no_grad():
        expected = main_output(model(input_ids=ids, block_ids=blocks))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(main_output(loaded(input_ids=ids, block_ids=blocks)), expected)
    assert loaded.localist_handle.base is loaded
    loaded.localist_handle.set_dial(0.0)
    assert model.localist_handle.config.alpha == 0.7
    loaded.localist_handle.revert()
    assert loaded.config._attn_implementation == impl


def test_torch_load_in_a_fresh_process(tmp_path):
    """A new interpreter has no "localist" attention key until the pickled state registers it."""
    model = build_model("llama")
    apply_explicit(model, alpha=0.7)
    ids, blocks = _checked_inputs("llama")
    with torch.no_grad():
        expected = main_output(model(input_ids=ids, block_ids=blocks))
    torch.save({"model": model, "ids": ids, "blocks": blocks, "expected": expected}, tmp_path / "m.pt")
    script = textwrap.dedent(f"""
        import torch
        data = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
        with torch.no_grad():
            out = data["model"](input_ids=data["ids"], block_ids=data["blocks"]).logits
        assert torch.equal(out, data["expected"]), (out - data["expected"]).abs().max()
        print("ok")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ backbone alone
@pytest.mark.parametrize("model_type", DECODER_ARCHS)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_calling_the_backbone_alone_lays_out_its_own_call(model_type, alpha):
    """TRL's fused LM head runs ``model.base_model(...)`` itself: the backbone's patched forward builds the layout of
    that call from its block ids, as the model's forward does (the same hidden states), and needs them as well."""
    model = build_model(model_type)
    handle = apply_explicit(model, alpha=alpha)
    ids, blocks = _checked_inputs(model_type)
    seen = []
    hook = model.base_model.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    with torch.no_grad():
        model(input_ids=ids, block_ids=blocks)  # the backbone passes the model's call on: one layout, one call
        with handle.capture_layouts() as calls:
            direct = model.base_model(input_ids=ids, block_ids=blocks).last_hidden_state
        with pytest.raises(hl.BlockIdsError, match="explicit"):
            model.base_model(input_ids=ids)  # no block ids, no anchor tokens
    hook.remove()
    assert torch.equal(calls[0].block_ids, blocks) and len(calls) == 1
    assert torch.equal(direct, seen[0])


def test_calling_a_decoder_layer_alone_raises():
    model = build_model("llama")
    apply_explicit(model, alpha=1.0)
    ids = random_ids(2, T, seed=2)
    hidden = model.model.embed_tokens(ids)
    rotary = model.model.rotary_emb(hidden, torch.arange(T)[None])
    with torch.no_grad(), pytest.raises(hl.LocalistStateError, match="not an inner sub-module"):
        model.model.layers[0](hidden, position_embeddings=rotary)


def test_revert_restores_the_backbone_forward():
    model = build_model("llama")
    handle = apply_explicit(model, alpha=1.0)
    assert "forward" in model.model.__dict__
    handle.revert()
    assert "forward" not in model.model.__dict__ and "forward" not in model.__dict__


# ------------------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("assignment", ["explicit", "centroid"])
def test_gradient_checkpointing_two_forwards_before_one_backward(assignment):
    ids = [random_ids(2, T, seed=1), random_ids(2, T, seed=2)]
    layouts = [random_block_ids(2, T, seed=1), random_block_ids(2, T, seed=2)]

    def grads(checkpointing: bool):
        model = build_model("llama").double()
        handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, backend="segment", block_assignment=assignment,
                                                            assign_threshold=-1.0))
        if assignment == "centroid":
            g = torch.Generator().manual_seed(0)
            for slot in (1, 2, 3):
                handle.activate_block(slot, centroid=torch.randn(32, generator=g, dtype=torch.float64))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kw = [{"block_ids": b} if assignment == "explicit" else {} for b in layouts]
        with handle.capture_layouts() as calls:
            losses = [model(input_ids=x, labels=x, **k).loss for x, k in zip(ids, kw)]
        assert not torch.equal(calls[0].block_ids, calls[1].block_ids)  # two different layouts
        sum(losses).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed) and len(plain) > 5
    for name in plain:
        assert_close_scaled(checkpointed[name], plain[name], msg=name)
