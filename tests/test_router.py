"""LocalistRouterModel (docs/design.md section 7): routing modes, generation, persistence, the Hub, recruitment, errors.

Tiny config-built Llama models (vocab 100, hidden 32) are saved into temporary directories: a base, a full
specialist ``alpha`` and two LoRA specialists ``beta`` and ``gamma``, in float64 so that comparisons are exact up
to rounding.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil

import pytest
import torch
from helpers import NAMES, domain, load_script, make_router, random_ids, save_lora, tiny_llama
from peft import LoraConfig
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaForCausalLM,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_localist import LocalistConfigError, LocalistLoadError, LocalistRouterConfig, LocalistRouterModel
from hf_localist.utils import pad_right

# peft 0.21 calls a transformers helper that 5.23 renamed.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def alone_logits(zoo, name, x, **kw):
    with torch.no_grad():
        return zoo.alone[name](input_ids=x, **kw).logits


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------- routing modes
def test_hard_routing_equals_the_chosen_specialist_alone(zoo, caplog):
    router = make_router(zoo, "hard")
    x = random_ids(6, 10)
    with caplog.at_level(logging.INFO, logger="hf_localist.router.model"):
        out = router(x)
    assert out.chosen.shape == (6, 1) and len(set(out.chosen[:, 0].tolist())) >= 2
    assert "routing (hard)" in caplog.text
    for i, m in enumerate(out.chosen[:, 0].tolist()):
        close(out.logits[i], alone_logits(zoo, NAMES[m], x[i: i + 1])[0])
    assert torch.equal(out.chosen[:, 0], out.router_probs.argmax(-1))
    close(out.routing_weights, torch.ones(6, 1))
    p = out.router_probs
    close(out.domain_entropy, -(p * p.log()).sum(-1), 1e-6)
    forced = router(x, route_to=["gamma"] * 6)  # oracle / forced routing
    close(forced.logits, alone_logits(zoo, "gamma", x))


def test_soft_routing_equals_the_explicit_mixture(zoo):
    router = make_router(zoo, "soft")
    x = random_ids(6, 10, seed=1)
    out = router(x)
    p = out.router_probs.double()
    mixture = sum(p[:, m, None, None] * alone_logits(zoo, n, x).softmax(-1) for m, n in enumerate(NAMES))
    close(out.logits.exp(), mixture, 1e-7)  # the router's weights are float32
    close(out.logits, mixture.log(), 1e-6)
    assert out.chosen.shape == (6, 3)
    close(out.routing_weights, out.router_probs.gather(1, out.chosen), 1e-6)


def test_top_k_renormalises_over_the_k_most_probable(zoo):
    router = make_router(zoo, "top_k", routing_k=2)
    x = random_ids(6, 10, seed=2)
    out = router(x)
    top = out.router_probs.topk(2, dim=-1)
    assert torch.equal(out.chosen, top.indices)
    w = top.values / top.values.sum(-1, keepdim=True)
    close(out.routing_weights, w, 1e-6)
    close(out.routing_weights.sum(-1), torch.ones(6), 1e-6)
    expected = torch.zeros_like(out.logits)
    for i in range(6):
        for j in range(2):
            name = NAMES[int(top.indices[i, j])]
            expected[i] += w[i, j].double() * alone_logits(zoo, name, x[i: i + 1])[0].softmax(-1)
    close(out.logits.exp(), expected, 1e-7)


def test_mixture_loss_uses_num_items_and_trains_the_router(zoo):
    router = make_router(zoo, "soft")
    x = random_ids(4, 8, seed=3)
    labels = x.clone()
    labels[0, :3] = -100
    out = router(x, labels=labels)
    log_mix = out.logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    nll = -log_mix.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep]
    close(out.loss, nll.mean(), 1e-6)
    summed = router(x, labels=labels, num_items_in_batch=torch.tensor(int(keep.sum()) * 2))
    close(summed.loss, nll.sum() / (2 * keep.sum()), 1e-6)
    summed.loss.backward()
    assert router.output_layer.weight.grad is not None and router.output_layer.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in router.base_model_loaded.parameters())


def test_router_trains_in_a_trainer(zoo, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    router = make_router(zoo, "top_k", routing_k=2)
    x = random_ids(8, 10, seed=9)
    before = router.output_layer.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.1,
                             gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=router, args=args, train_dataset=Dataset.from_dict({"input_ids": x.tolist(),
                                                                                "labels": x.tolist()}))
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    assert (router.output_layer.weight - before).abs().max() > 1e-3


def test_mlp_router_fits_on_a_dataset_and_round_trips(zoo, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    router = make_router(zoo, "soft", router_hidden_size=16)
    assert isinstance(router.router, torch.nn.Sequential)
    x = random_ids(12, 8, seed=10)
    x[:6, :4] = 5  # two recognisable groups
    features = Features({"input_ids": Sequence(Value("int64")), "label": ClassLabel(names=["alpha", "beta"])})
    data = Dataset.from_dict({"input_ids": x.tolist(), "label": [0] * 6 + [1] * 6}, features=features)
    result = router.fit_router(data, label_smoothing=0.0)
    assert result["train_accuracy"] == 1.0 and result["counts"] == {"alpha": 6, "beta": 6, "gamma": 0}
    router.save_pretrained(tmp_path / "mlp")
    loaded = LocalistRouterModel.from_pretrained(tmp_path / "mlp", allow_local_references=True)
    close(loaded(x).logits, router(x).logits)
    assert int(loaded.router_fitted) == 1
    out = router.init_router_from_prompts({n: [random_ids(2, 6, seed=i)[0], random_ids(2, 6, seed=i)[1]]
                                           for i, n in enumerate(NAMES)})
    assert out["event"] == "fit_router"  # an MLP router is fitted on the prompts


def test_prototype_router_from_prompts(zoo):
    router = make_router(zoo)
    groups = {n: [random_ids(1, 8, seed=20 + 3 * i + j)[0] for j in range(3)] for i, n in enumerate(NAMES)}
    for i, n in enumerate(NAMES):  # a domain = prompts that share some content
        for p in groups[n]:
            p[1::2] = 10 + 30 * i
    router.init_router_from_prompts(groups)
    for i, n in enumerate(NAMES):  # each prompt routes to its own specialist (nearest prototype)
        assert router(torch.stack(groups[n])).chosen[:, 0].tolist() == [i] * 3


def test_padding_does_not_change_routing_or_outputs(zoo):
    router = make_router(zoo, "soft")
    x = random_ids(1, 7, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    a, b = router(x), router(padded, attention_mask=mask)
    close(b.router_probs, a.router_probs, 1e-6)
    close(b.logits[:, 3:], a.logits, 1e-8)


# ---------------------------------------------------------------------------------------------- generation
def _left_padded():
    x = random_ids(3, 6, seed=7)
    mask = torch.ones_like(x)
    x[1, :2], mask[1, :2] = 0, 0
    return x, mask


@pytest.mark.parametrize("mode", ["hard", "soft", "top_k"])
def test_generate_equals_step_by_step_recomputation(zoo, mode):
    router = make_router(zoo, mode, routing_k=2)
    x, mask = _left_padded()
    gen = router.generate(x, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    d = router.route(x, mask)
    assert torch.equal(gen.chosen, d.chosen)
    seq, m = x, mask
    fixed = {"route_to": d.chosen[:, 0]} if mode == "hard" else {"router_probs": d.router_probs}
    for _ in range(6):
        nxt = router(seq, attention_mask=m, **fixed).logits[:, -1].argmax(-1)
        seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones(3, 1, dtype=m.dtype)], 1)
    assert torch.equal(gen.sequences, seq)


def test_mixture_sampling_equals_recomputation_and_stops_at_eos(zoo):
    router = make_router(zoo, "soft")
    x, mask = _left_padded()
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    gen = router.generate(x, attention_mask=mask, max_new_tokens=6, **kw)
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    probs = router.route(x, mask).router_probs
    torch.manual_seed(123)
    seq, m = x, mask
    for _ in range(6):
        scores = warp(seq, router(seq, attention_mask=m, router_probs=probs).logits[:, -1])
        nxt = torch.multinomial(scores.softmax(-1), 1)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones(3, 1, dtype=m.dtype)], 1)
    assert torch.equal(gen, seq)
    # eos: a row stops at its eos, later positions are padding, earlier ones unchanged
    greedy = router.generate(x, attention_mask=mask, max_new_tokens=6)
    eos = int(greedy[0, 6 + 2])
    stopped = router.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    for row in range(3):
        new = greedy[row, 6:].tolist()
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert stopped[row, 6: 6 + cut].tolist() == new[:cut]
        assert all(t == 0 for t in stopped[row, 6 + cut:].tolist())


# ---------------------------------------------------------------------------------------------- persistence
def test_save_load_gives_identical_outputs_and_lru_cache(zoo, tmp_path):
    names = ("gamma", "alpha", "beta")  # not sorted: config.json sorts keys, the router's output order must survive
    router = make_router(zoo, "soft", names=names, max_loaded_specialists=1)
    x = random_ids(6, 10, seed=8)
    ref = router(x)
    assert len(router.loaded_specialists) == 1  # least recently used specialists released
    router.save_pretrained(tmp_path / "ref")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "ref"))
    loaded = LocalistRouterModel.from_pretrained(tmp_path / "ref", max_loaded_specialists=4,
                                                 allow_local_references=True)
    assert loaded.specialist_names == list(names)
    close(loaded(x).logits, ref.logits)
    close(loaded(x).router_probs, ref.router_probs, 0)
    assert len(loaded.loaded_specialists) == 3
    router.save_pretrained(tmp_path / "copy", copy_specialists=True)
    shutil.move(str(tmp_path / "copy"), str(tmp_path / "moved"))  # a copy is self-contained
    cfg = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert cfg["specialists"]["beta"]["path"] == "specialists/beta" and cfg["base_model_path"] == "base"
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "moved")
    assert isinstance(auto, LocalistRouterModel) and isinstance(AutoConfig.from_pretrained(tmp_path / "moved"),
                                                                 LocalistRouterConfig)
    close(auto(x).logits, ref.logits)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_push_to_hub_uploads_router_and_every_specialist(zoo, fake_hub):
    router = make_router(zoo, "top_k", routing_k=2)
    router.push_to_hub("org/router")
    commits = {c["repo_id"]: c["files"] for c in fake_hub.commits}
    assert set(commits) == {"org/router", "org/router-base", *(f"org/router-{n}" for n in NAMES)}
    assert [r for r, _ in fake_hub.repos][0] == "org/router"
    files = commits["org/router"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    cfg = json.loads(files["config.json"])
    assert cfg["base_model_path"] == "org/router-base"
    assert {n: e["path"] for n, e in cfg["specialists"].items()} == {n: f"org/router-{n}" for n in NAMES}
    card = files["README.md"].decode()
    assert "top_k (k = 2)" in card and all(n in card for n in NAMES) and "given to" in card
    assert {"config.json", "model.safetensors", "README.md"} <= set(commits["org/router-alpha"])
    for n in ("beta", "gamma"):
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(commits[f"org/router-{n}"])
        acfg = json.loads(commits[f"org/router-{n}"]["adapter_config.json"])
        assert acfg["base_model_name_or_path"] == "org/router-base"
        assert "How it was recruited" in commits[f"org/router-{n}"]["README.md"].decode()


# ---------------------------------------------------------------------------------------------- recruitment
@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    d = tmp_path_factory.mktemp("domains")
    tiny_llama(0, torch.float32, initializer_range=0.02).save_pretrained(d / "base")
    for name, seed in (("A", 1), ("B", 2)):  # full fine-tunes of the base on their domain
        model = LlamaForCausalLM.from_pretrained(d / "base")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data, g = domain(name, 200, seed), random.Random(seed)
        for _ in range(60):
            x, _ = pad_right(g.sample(data, 16), 0)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(d / name)
    return d


def test_recruitment_adds_a_specialist_for_an_uncovered_domain_only(domains, tmp_path, fake_hub):
    router = LocalistRouterModel.from_specialists(domains / "base", {"A": domains / "A", "B": domains / "B"},
                                                  theta_block=1.0, theta_ratio=50)
    router.fit_router([(s, "A") for s in domain("A", 80, 3)] + [(s, "B") for s in domain("B", 80, 4)])
    lora = LoraConfig(r=1, lora_alpha=2, target_modules=["lm_head"])
    kw = dict(output_dir=tmp_path / "recruited", lora_config=lora, train_steps=60, lr=2e-2)
    # Covered domains alone: the router is sure of them, nothing is confused, nothing is recruited.
    covered = router.recruit_specialist(domain("A", 40, 5) + domain("B", 40, 6), **kw)
    assert covered.accepted == [] and covered.n_confused < 8 and router.specialist_names == ["A", "B"]
    # Forcing a candidate on a covered domain (gamma = 0: every input is confused): rejected by dL_total.
    forced = router.recruit_specialist(domain("A", 60, 7), gamma=0.0, n_clusters=1, **kw)
    assert forced.accepted == [] and len(forced.decisions) == 1
    assert forced.decisions[0]["dL_total"] > -forced.theta_llm
    # An uncovered domain mixed in: one specialist is recruited, on a cluster made of that domain.
    log = tmp_path / "recruit.jsonl"
    data = domain("A", 40, 8) + domain("B", 40, 9) + domain("C", 80, 10)
    res = router.recruit_specialist(data, log_path=log, **kw)
    assert res.accepted == ["recruited_0"] and router.specialist_names == ["A", "B", "recruited_0"]
    dec = next(x for x in res.decisions if x["accepted"])
    assert sum(i >= 80 for i in dec["members"]) >= 0.9 * len(dec["members"])
    assert dec["dL_total"] == pytest.approx(dec["dL_data"] + dec["dL_model"])
    assert dec["dL_total"] <= -res.theta_llm == -50.0
    assert dec["dL_model"] == pytest.approx(dec["k_params"] / 2 * math.log(dec["n"]))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["event"] == "llm_recruitment_scan" and any(x.get("accepted") for x in lines)
    # The new specialist serves its domain; the covered domains keep theirs.
    assert (router(torch.tensor(domain("C", 40, 11))).chosen[:, 0] == 2).float().mean() >= 0.6
    assert (router(torch.tensor(domain("A", 40, 12))).chosen[:, 0] == 0).float().mean() >= 0.8
    router.push_to_hub("org/news")
    card = next(c for c in fake_hub.commits if c["repo_id"] == "org/news-recruited_0")["files"]["README.md"].decode()
    assert "recruited by `recruit_specialist`" in card


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_routing_mode_and_bad_settings(zoo):
    with pytest.raises(LocalistConfigError, match="banana"):
        LocalistRouterModel.from_specialists(zoo.paths["base"], {"alpha": zoo.paths["alpha"]}, routing="banana")
    router = make_router(zoo)
    with pytest.raises(LocalistConfigError, match="sideways"):
        router(random_ids(6, 10), routing="sideways")
    with pytest.raises(LocalistConfigError, match="routing='x'"):
        router.config.routing = "x"
    assert router.config.routing == "hard"
    with pytest.raises(LocalistConfigError, match="theta_ratio=20"):
        LocalistRouterConfig(theta_ratio=20)
    with pytest.raises(LocalistConfigError, match="500"):
        router.recruit_specialist([[1, 2, 3]], r=500)
    with pytest.raises(LocalistConfigError, match="'delta'"):
        router(random_ids(6, 10), route_to=["delta"] * 6)
    with pytest.raises(LocalistConfigError, match="cache_implementation"):  # one dynamic cache per specialist
        router.generate(random_ids(6, 10), routing="soft", cache_implementation="static")
    with pytest.raises(LocalistConfigError, match="no specialist"):
        router.fit_router([(random_ids(6, 10)[0], "alpha"), (random_ids(6, 10)[1], "zeta")])
    with pytest.raises(LocalistConfigError, match="zeta"):
        router.fit_router([(random_ids(6, 10)[0], "alpha"), (random_ids(6, 10)[1], "zeta")])
    with pytest.raises(LocalistConfigError, match="gamma"):
        router.init_router_from_prompts({"alpha": [random_ids(6, 10)[0]], "beta": [random_ids(6, 10)[1]]})
    with pytest.raises(LocalistConfigError, match="tokenizer"):
        router.fit_router([("some text", "alpha")])


def test_specialist_with_another_vocabulary_or_architecture(zoo, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = zoo.paths["base"]
    tiny_llama(1, vocab_size=120).save_pretrained(tmp_path / "wide")
    with pytest.raises(LocalistLoadError, match=r"'wide'.*vocabulary size 120"):
        LocalistRouterModel.from_specialists(base, {"wide": tmp_path / "wide"})
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "g")
    with pytest.raises(LocalistLoadError, match=r"'other'.*architecture 'gpt2'"):
        LocalistRouterModel.from_specialists(base, {"other": tmp_path / "g"})
    tiny_llama(2, hidden_size=48).save_pretrained(tmp_path / "base48")
    save_lora(str(tmp_path / "base48"), tmp_path / "lora48", 4, ["q_proj"])
    with pytest.raises(LocalistLoadError, match=r"'lora48'.*shape"):
        LocalistRouterModel.from_specialists(base, {"lora48": tmp_path / "lora48"})


def test_missing_or_corrupt_specialist_files(zoo, tmp_path):
    base = zoo.paths["base"]
    with pytest.raises(LocalistLoadError, match=r"'ghost'.*does not exist"):
        LocalistRouterModel.from_specialists(base, {"ghost": tmp_path / "nowhere"})
    shutil.copytree(zoo.paths["alpha"], tmp_path / "a")
    os.remove(tmp_path / "a" / "model.safetensors")
    with pytest.raises(LocalistLoadError, match=r"'a'.*no safetensors"):
        LocalistRouterModel.from_specialists(base, {"a": tmp_path / "a"})
    shutil.copytree(zoo.paths["alpha"], tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LocalistLoadError, match=r"'b'.*safetensors"):
        LocalistRouterModel.from_specialists(base, {"b": tmp_path / "b"})
    shutil.copytree(zoo.paths["beta"], tmp_path / "c")
    (tmp_path / "c" / "adapter_config.json").write_text("{broken")
    with pytest.raises(LocalistLoadError, match=r"'c'.*corrupt"):
        LocalistRouterModel.from_specialists(base, {"c": tmp_path / "c"})
    # Corrupted after the router was built: the lazy load reports the specialist by name.
    shutil.copytree(zoo.paths["alpha"], tmp_path / "d")
    router = LocalistRouterModel.from_specialists(base, {"d": tmp_path / "d", "beta": zoo.paths["beta"]})
    data = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "d" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LocalistLoadError, match="specialist 'd'"):
        router(random_ids(6, 10), route_to=["d"] * 6)


def test_saved_router_refuses_escaping_paths_and_names_missing_specialists(zoo, tmp_path):
    make_router(zoo).save_pretrained(tmp_path / "r", copy_specialists=True)
    cfg_path = tmp_path / "r" / "config.json"
    good = json.loads(cfg_path.read_text())

    def load_with(edit):
        cfg = json.loads(json.dumps(good))
        edit(cfg)
        cfg_path.write_text(json.dumps(cfg))
        # a hand-edited config no longer matches the save's manifest (test_fault_injection): without the manifest
        # the directory loads unchecked, and the path checks below are what stands between it and the disk
        (tmp_path / "r" / "localist_manifest.json").unlink(missing_ok=True)
        return LocalistRouterModel.from_pretrained(tmp_path / "r")

    with pytest.raises(LocalistLoadError, match=r"'beta'.*escapes"):
        load_with(lambda c: c["specialists"]["beta"].update(path="../beta"))
    with pytest.raises(LocalistLoadError, match=r"'beta'.*absolute"):
        load_with(lambda c: c["specialists"]["beta"].update(path=zoo.paths["beta"]))
    with pytest.raises(LocalistLoadError, match=r"base model.*escapes"):
        load_with(lambda c: c.update(base_model_path="specialists/../../base"))
    with pytest.raises(LocalistLoadError, match=r"'gamma'.*escapes"):
        load_with(lambda c: c["specialists"]["gamma"].update(path="../../x", source="reference"))
    cfg_path.write_text(json.dumps(good))
    shutil.rmtree(tmp_path / "r" / "specialists" / "gamma")
    with pytest.raises(LocalistLoadError, match="specialist 'gamma'"):
        LocalistRouterModel.from_pretrained(tmp_path / "r")
    with pytest.raises(LocalistLoadError, match="'llama'"):
        LocalistRouterModel.from_pretrained(zoo.paths["base"])


# ---------------------------------------------------------------------------------------------- the example
@pytest.mark.slow
def test_router_example_runs_in_tiny_mode(tmp_path):
    module = load_script("examples/router_agnews.py", "router_agnews")
    threads = torch.get_num_threads()
    try:
        results = module.main(["--tiny", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [r["mode"] for r in results["rows"]] == ["base alone", "hard", "soft", "top-2", "oracle (true topic)"]
    assert all(math.isfinite(r["perplexity"]) for r in results["rows"])
    assert (tmp_path / "table.md").exists() and (tmp_path / "router" / "specialists" / "sports").is_dir()
    reloaded = LocalistRouterModel.from_pretrained(tmp_path / "router")
    assert reloaded.specialist_names == ["world", "sports", "business", "scitech"]
