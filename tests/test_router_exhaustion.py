"""LLM-level recruitment's second trigger: the chosen specialist's block recruitment is exhausted (docs/design.md s. 7).

Specialists here are localist full checkpoints saved with ``save_pretrained`` after ``apply_localist``: the router
must load them localist (dial, blocks and recruitment status), which is what lets it see that their block
recruitment cannot grow any more.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import domain, tiny_llama
from peft import LoraConfig
from transformers import LlamaForCausalLM

from hf_localist import LocalistConfig, LocalistConfigError, LocalistRouterModel, RecruitmentConfig, apply_localist
from hf_localist.recruitment.recruit import set_status
from hf_localist.router.exhaustion import block_recruitment_status, confused_fractions, exhausted_inputs
from hf_localist.utils import pad_right

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _fine_tune(base_dir, name: str, seed: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(base_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data, g = domain(name, 200, seed), random.Random(seed)
    for _ in range(40):
        x, _ = pad_right(g.sample(data, 16), 0)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _localist(model, **recruitment):
    # No anchor tokens in these domains: every token is in block 0, whose confusion bound is ln 1 + epsilon.
    return apply_localist(model, LocalistConfig(alpha=1.0, max_blocks=2, recruitment=RecruitmentConfig(**recruitment)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("exhaustion")
    tiny_llama(0, torch.float32, initializer_range=0.02).save_pretrained(d / "base")
    # A: localist, every slot active (default active_blocks = 1..max_blocks) and its recruitment recorded as done.
    a = _fine_tune(d / "base", "A", 1)
    handle = _localist(a)
    set_status(handle, done=True, stop_reason="pass_accepted_nothing", passes=3, step=300)
    a.save_pretrained(d / "A")
    # B: localist with free slots and recruitment still running: not exhausted.
    b = _fine_tune(d / "base", "B", 2)
    apply_localist(b, LocalistConfig(alpha=1.0, max_blocks=4, block_assignment="centroid", active_blocks=[],
                                     recruitment=RecruitmentConfig()))
    b.save_pretrained(d / "B")
    return d


def make_router(zoo, **kw):
    router = LocalistRouterModel.from_specialists(zoo / "base", {"A": zoo / "A", "B": zoo / "B"}, theta_block=1.0,
                                                  theta_ratio=50, **kw)
    router.fit_router([(s, "A") for s in domain("A", 60, 3)] + [(s, "B") for s in domain("B", 60, 4)])
    return router


def test_status_reasons_and_localist_specialists_load_localist(zoo):
    router = make_router(zoo)
    a, b = router.get_specialist("A"), router.get_specialist("B")
    assert a.localist_handle.config.alpha == 1.0 and b.localist_handle.config.block_assignment == "centroid"
    assert a.localist_handle.state.recruitment_status["stop_reason"] == "pass_accepted_nothing"  # saved, reloaded
    s = block_recruitment_status(a, 24, "A")
    assert (s.exhausted, s.reason, s.active_blocks, s.free_slots) == (True, "pass_accepted_nothing", 2, 0)
    s = block_recruitment_status(b, 24, "B")
    assert (s.exhausted, s.reason, s.free_slots, s.p_max) == (False, "recruiting", 4, math.ceil(math.log(24) / 0.1))
    plain = tiny_llama(3, torch.float32)
    assert block_recruitment_status(plain, 24).reason == "not_localist"
    apply_localist(plain, LocalistConfig(alpha=1.0))
    assert block_recruitment_status(plain, 24).reason == "no_recruitment"
    # Read from the settings alone: every slot taken, or p_max already reached (H_min above ln N: p_max = 0).
    full = _localist(tiny_llama(4, torch.float32)).model
    assert block_recruitment_status(full, 24).reason == "no_free_slot"
    bounded = tiny_llama(5, torch.float32)
    apply_localist(bounded, LocalistConfig(alpha=1.0, max_blocks=4, block_assignment="centroid", active_blocks=[],
                                           recruitment=RecruitmentConfig(H_min=5.0)))
    s = block_recruitment_status(bounded, 24)
    assert (s.exhausted, s.reason, s.p_max) == (True, "p_max_reached", 0)


def test_exhausted_inputs_flags_only_confused_inputs_of_exhausted_specialists(zoo):
    router = make_router(zoo)
    seqs = domain("A", 10, 5) + domain("B", 10, 6)
    chosen = torch.tensor([0] * 10 + [1] * 10)
    frac = confused_fractions(router.get_specialist("A"), seqs[:10], 0, 0.2)
    assert frac.shape == (10,) and bool(((frac >= 0) & (frac <= 1)).all())
    flagged, records = exhausted_inputs(router, seqs, chosen, pad_id=0, min_confused_fraction=0.5)
    assert flagged == [i for i in range(10) if frac[i] >= 0.5] and flagged, frac
    by_name = {r["name"]: r for r in records}
    assert by_name["A"]["exhausted"] and by_name["A"]["flagged"] == len(flagged)
    assert not by_name["B"]["exhausted"] and by_name["B"]["flagged"] == 0 and by_name["B"]["routed_inputs"] == 10
    # A margin no entropy can pass: the specialist is exhausted but not confused, so nothing is flagged.
    assert exhausted_inputs(router, seqs, chosen, pad_id=0, epsilon=100.0)[0] == []
    with pytest.raises(LocalistConfigError, match="min_confused_fraction=0"):
        exhausted_inputs(router, seqs, chosen, pad_id=0, min_confused_fraction=0)
    with pytest.raises(LocalistConfigError, match="epsilon=-1"):
        exhausted_inputs(router, seqs, chosen, pad_id=0, epsilon=-1)


def test_recruitment_from_the_exhausted_trigger_alone(zoo, tmp_path):
    router = make_router(zoo)
    log = tmp_path / "log.jsonl"
    lora = LoraConfig(r=1, lora_alpha=2, target_modules=["lm_head"])
    kw = dict(output_dir=tmp_path / "new", lora_config=lora, train_steps=60, lr=2e-2, n_clusters=1, log_path=log)
    # Inputs the router is sure of (H_domain ~ 0), sent to A: only the exhausted trigger can flag them.
    data = domain("C", 60, 7)
    with torch.no_grad():
        sure = [s for s in data if router(torch.tensor([s])).chosen[0, 0] == 0]
    assert len(sure) >= 16, "the fixture should route most C inputs to A"
    by_entropy = router.recruit_specialist(sure, trigger="entropy", gamma=1.0, **kw)
    assert by_entropy.n_confused == 0 and by_entropy.decisions == [] and by_entropy.n_exhausted == 0
    res = router.recruit_specialist(sure, trigger="exhausted", **kw)
    assert res.n_entropy == 0 and res.n_exhausted == res.n_confused >= 16
    assert [s["name"] for s in res.specialist_status] == ["A"] and res.specialist_status[0]["exhausted"]
    (dec,) = res.decisions
    assert dec["by_trigger"] == {"entropy": 0, "exhausted": dec["cluster_size"]}
    assert dec["accepted"] and res.accepted == ["recruited_0"], dec["dL_total"]
    scan = [json.loads(x) for x in log.read_text().splitlines() if '"llm_recruitment_scan"' in x][-1]
    assert scan["trigger"] == "exhausted" and scan["n_exhausted_trigger"] == res.n_exhausted
    assert scan["specialists"][0]["reason"] == "pass_accepted_nothing"
    with pytest.raises(LocalistConfigError, match="trigger='blocks'"):
        router.recruit_specialist(sure, trigger="blocks")


def test_lora_specialists_on_a_localist_base(tmp_path):
    """A localist base comes back localist inside the router, and a LoRA specialist on it runs with the base's blocks:
    hard routing equals the adapter applied to the base loaded with AutoLocalistModel."""
    from peft import PeftModel, get_peft_model

    from hf_localist import AutoLocalistModel

    base = tiny_llama(0, torch.float64)
    # Anchor tokens 3 and 4 open blocks 1 and 2 (segment assignment): the text itself carries the blocks.
    apply_localist(base, LocalistConfig(alpha=1.0, anchor_token_ids=[3, 4], block_names=["a", "b"]))
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = get_peft_model(AutoLocalistModel.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    router = LocalistRouterModel.from_specialists(tmp_path / "base", {"lora": tmp_path / "lora",
                                                                      "plain": tmp_path / "base"})
    assert router.base_model_loaded.localist_handle.config.anchor_token_ids == [3, 4]
    x = torch.tensor([[1, 3, 10, 11, 12, 4, 20, 21, 3, 13], [1, 4, 30, 31, 3, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        out = router(x, route_to=["lora", "lora"])
        alone = PeftModel.from_pretrained(AutoLocalistModel.from_pretrained(tmp_path / "base"), tmp_path / "lora")
        ref = alone(input_ids=x).logits
        alone.base_model.model.localist_handle.set_dial(0.0)
        distributed = alone(input_ids=x).logits
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-10)
    assert not torch.allclose(ref, distributed), "the blocks must change the specialist's output"


def test_candidates_on_a_localist_base_train_under_its_blocks(tmp_path, monkeypatch):
    from hf_localist.router import recruit as router_recruit

    base = tiny_llama(0, torch.float32)
    apply_localist(base, LocalistConfig(alpha=1.0, anchor_token_ids=[3, 4], block_names=["a", "b"]))
    base.save_pretrained(tmp_path / "base")
    plain = tiny_llama(1, torch.float32)
    plain.save_pretrained(tmp_path / "other")
    router = LocalistRouterModel.from_specialists(tmp_path / "base", {"x": tmp_path / "other", "y": tmp_path / "base"},
                                                  theta_block=0.0, theta_ratio=50)
    trained = []
    real = router_recruit._train_candidate

    def spy(*a, **kw):
        model, k, n = real(*a, **kw)
        trained.append(model)
        return model, k, n

    monkeypatch.setattr(router_recruit, "_train_candidate", spy)
    data = [[1, 3] + [10 + (i * 7 + j) % 50 for j in range(14)] for i in range(24)]
    router.recruit_specialist(data, gamma=0.0, n_clusters=1, min_cluster_size=8, train_steps=2,
                              lora_config=LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"]),
                              output_dir=tmp_path / "new")
    (candidate,) = trained
    inner = candidate.base_model.model  # PeftModel -> LoraModel -> the causal LM
    assert inner.localist_handle.config.anchor_token_ids == [3, 4]
