"""LocalistConfig: fields and help, validation on construction and assignment, the schedule, JSON round trips,
building defaults from a model config or directory, and push_to_hub (offline)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from helpers import ARCHS, LAYERS, build_model, tiny_config
from transformers import HfArgumentParser

import hf_localist as hl
from hf_localist.config.localist import LOCALIST_CONFIG_NAME


def test_defaults_and_help_text():
    cfg = hl.LocalistConfig()
    assert cfg.alpha == 1.0 and cfg.schedule == "uniform" and cfg.backend == "auto"
    assert cfg.block_assignment == "segment" and cfg.first_local_layer == 0 and cfg.beta_anchor == 0.0
    for f in dataclasses.fields(hl.LocalistConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"


def test_hf_argument_parser_builds_a_command_line():
    (cfg,) = HfArgumentParser(hl.LocalistConfig).parse_args_into_dataclasses(
        ["--alpha", "0.4", "--schedule", "progressive", "--schedule_power", "5", "--block_names", "a", "b",
         "--anchor_token_ids", "7", "8", "--flex_compile", "false"])
    assert cfg.alpha == 0.4 and cfg.schedule == "progressive" and cfg.schedule_power == 5.0
    assert cfg.block_names == ["a", "b"] and cfg.anchor_token_ids == [7, 8] and cfg.flex_compile is False


@pytest.mark.parametrize("field,value", [("alpha", 1), ("alpha", 0), ("beta_anchor", 2), ("schedule_power", 1)])
def test_numbers_are_stored_as_floats(field, value):
    cfg = hl.LocalistConfig(**{field: value})
    assert isinstance(getattr(cfg, field), float)
    setattr(cfg, field, value)
    assert isinstance(getattr(cfg, field), float) and getattr(cfg, field) == value


def test_assignment_is_validated_and_a_rejected_value_leaves_the_config_unchanged():
    cfg = hl.LocalistConfig(alpha=0.5, num_layers=4, first_local_layer=1, block_names=["a", "b"],
                            anchor_token_ids=[5, 6])
    before = cfg.to_dict()
    bad = [("alpha", 1.5), ("alpha", float("nan")), ("alpha", "0.5"), ("alpha", True), ("schedule", "cubic"),
           ("backend", "cuda"), ("first_local_layer", 4), ("first_local_layer", -1), ("max_blocks", 0),
           ("block_names", ["a"]), ("block_names", ["a", "a"]), ("anchor_token_ids", [5, -6]),
           ("general_token_id", 5), ("beta_anchor", -0.1), ("schedule_power", 0), ("flex_compile", "yes"),
           ("num_layers", 1), ("block_assignment", "centroids")]
    for name, value in bad:
        with pytest.raises(hl.LocalistConfigError, match=name):
            setattr(cfg, name, value)
        assert cfg.to_dict() == before, f"rejected {name}={value!r} changed the config"
    cfg.alpha = 0.25
    assert cfg.alpha == 0.25


def test_update_changes_fields_together_or_not_at_all():
    cfg = hl.LocalistConfig()
    cfg.update(block_names=["x", "y"], anchor_token_ids=[10, 11], general_token_id=12)
    assert cfg.block_names == ["x", "y"] and cfg.anchor_token_ids == [10, 11]
    with pytest.raises(hl.LocalistConfigError):
        cfg.update(alpha=0.3, block_names=["x"])  # names and ids no longer pair up
    assert cfg.alpha == 1.0 and cfg.block_names == ["x", "y"]
    with pytest.raises(hl.LocalistConfigError, match="unknown"):
        cfg.update(alhpa=0.3)


def test_uniform_and_progressive_schedules():
    cfg = hl.LocalistConfig(alpha=0.8, first_local_layer=1, num_layers=4)
    assert cfg.layer_alphas() == [0.0, 0.8, 0.8, 0.8]
    cfg.update(schedule="progressive", schedule_power=3)
    expected = [0.0] + [0.8 * ((layer - 1 + 1) / (4 - 1)) ** 3 for layer in (1, 2, 3)]
    assert cfg.layer_alphas() == pytest.approx(expected)
    assert cfg.layer_alphas()[-1] == pytest.approx(0.8)  # s(L - 1) = 1
    cfg.update(schedule_power=1, first_local_layer=0)
    assert cfg.layer_alphas() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert cfg.layer_alphas(num_layers=2) == pytest.approx([0.4, 0.8])
    with pytest.raises(hl.LocalistConfigError, match="num_layers"):
        hl.LocalistConfig().layer_alphas()


def test_dict_and_json_round_trip(tmp_path):
    cfg = hl.LocalistConfig(alpha=0.3, schedule="progressive", schedule_power=5, first_local_layer=1, backend="segment",
                            block_names=["law", "med"], anchor_token_ids=[101, 102], general_token_id=103,
                            beta_anchor=0.5, max_blocks=4, flex_compile=False, model_type="llama", num_layers=2)
    assert hl.LocalistConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.copy() == cfg and cfg.copy() is not cfg
    assert cfg.copy(alpha=0.9).alpha == 0.9 and cfg.alpha == 0.3
    path = cfg.save_pretrained(tmp_path / "cfg")
    assert os.path.basename(path) == LOCALIST_CONFIG_NAME
    assert json.loads(open(path).read())["block_names"] == ["law", "med"]
    assert hl.LocalistConfig.from_pretrained(tmp_path / "cfg") == cfg
    assert hl.LocalistConfig.from_pretrained(path) == cfg  # the file itself
    assert hl.LocalistConfig.from_pretrained(tmp_path / "cfg", alpha=0.6).alpha == 0.6  # overrides
    # Saving again replaces the file atomically (no temporary files are left).
    cfg.alpha = 0.7
    cfg.save_pretrained(tmp_path / "cfg")
    assert os.listdir(tmp_path / "cfg") == [LOCALIST_CONFIG_NAME]
    assert hl.LocalistConfig.from_pretrained(tmp_path / "cfg").alpha == 0.7


def test_from_pretrained_on_a_plain_model_dir_builds_defaults(arch, tmp_path):
    model = build_model(arch)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / LOCALIST_CONFIG_NAME).exists()
    cfg = hl.LocalistConfig.from_pretrained(tmp_path)
    assert cfg.model_type == arch and cfg.num_layers == LAYERS
    assert cfg == hl.LocalistConfig(model_type=arch, num_layers=LAYERS)
    cfg = hl.LocalistConfig.from_pretrained(tmp_path, alpha=0.2, first_local_layer=1)
    assert cfg.alpha == 0.2 and cfg.first_local_layer == 1
    with pytest.raises(hl.LocalistConfigError, match="first_local_layer"):
        hl.LocalistConfig.from_pretrained(tmp_path, first_local_layer=LAYERS)


def test_for_model_config_accepts_a_config_object_or_dict():
    for arch in ARCHS:
        config = tiny_config(arch, **({"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3}))
        assert hl.LocalistConfig.for_model_config(config).num_layers == 3
        assert hl.LocalistConfig.for_model_config(config.to_dict()).model_type == arch


def test_from_pretrained_reads_the_localist_entry_of_config_json(tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, alpha=0.35, schedule="progressive")
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / LOCALIST_CONFIG_NAME)  # only config.json's "localist" entry is left
    cfg = hl.LocalistConfig.from_pretrained(tmp_path)
    assert cfg.alpha == 0.35 and cfg.schedule == "progressive" and cfg.model_type == "llama"


def test_push_to_hub_offline(fake_hub, tmp_path):
    cfg = hl.LocalistConfig(alpha=0.45, block_names=["a"], anchor_token_ids=[3])
    cfg.push_to_hub("someone/localist-cfg", commit_message="add config", private=True)
    assert fake_hub.repos[0][0] == "someone/localist-cfg" and fake_hub.repos[0][1].get("private") is True
    commit = fake_hub.commits[-1]
    assert commit["repo_id"] == "someone/localist-cfg" and commit["message"] == "add config"
    pushed = json.loads(commit["files"][LOCALIST_CONFIG_NAME])
    assert hl.LocalistConfig.from_dict(pushed) == cfg
    # save_pretrained(push_to_hub=True) writes locally and pushes.
    cfg.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/other")
    assert (tmp_path / "local" / LOCALIST_CONFIG_NAME).exists()
    assert fake_hub.commits[-1]["repo_id"] == "someone/other"
    assert json.loads(fake_hub.commits[-1]["files"][LOCALIST_CONFIG_NAME])["alpha"] == 0.45


# ------------------------------------------------------------------ the shared validation idiom (config_fields)
def test_a_typo_attribute_raises_naming_the_close_match():
    cfg = hl.LocalistConfig(alpha=0.5)
    with pytest.raises(hl.LocalistConfigError, match=r"unknown LocalistConfig field.*'alfa'.*did you mean 'alpha'"):
        cfg.alfa = 0.3
    assert not hasattr(cfg, "alfa") and cfg.alpha == 0.5
    rcfg = hl.RecruitmentConfig()
    with pytest.raises(hl.LocalistConfigError, match=r"'evrey'.*did you mean 'every'"):
        rcfg.evrey = 10
    # A PreTrainedConfig carries extra attributes by design: only a near-miss of its own fields is refused.
    router_cfg = hl.LocalistRouterConfig()
    with pytest.raises(hl.LocalistConfigError, match=r"'routng'.*did you mean 'routing'"):
        router_cfg.routng = "soft"
    router_cfg.some_extra_setting = 1
    assert router_cfg.routing == "hard" and router_cfg.some_extra_setting == 1


def test_an_unknown_keyword_raises_a_config_error():
    with pytest.raises(hl.LocalistConfigError, match=r"'alhpa'.*did you mean 'alpha'"):
        hl.LocalistConfig(alhpa=0.5)
    with pytest.raises(hl.LocalistConfigError, match=r"'budget_step'.*did you mean 'budget_steps'"):
        hl.RecruitmentConfig(budget_step=5)
    with pytest.raises(hl.LocalistConfigError, match=r"'routing_kk'.*did you mean 'routing_k'"):
        hl.LocalistRouterConfig(routing_kk=3)
    assert hl.LocalistRouterConfig(unrelated_extra=1).unrelated_extra == 1  # as PreTrainedConfig allows


def test_list_fields_cannot_be_mutated_past_validation():
    cfg = hl.LocalistConfig(block_names=["a", "b"], anchor_token_ids=[5, 6], active_blocks=[2, 1])
    before = cfg.to_dict()
    for mutate in (lambda: cfg.block_names.append("c"), lambda: cfg.anchor_token_ids.extend([7]),
                   lambda: cfg.anchor_token_ids.__setitem__(0, -1), lambda: cfg.active_blocks.pop()):
        with pytest.raises(hl.LocalistConfigError, match="assign a new list"):
            mutate()
    assert cfg.to_dict() == before
    names = ["x", "y"]
    cfg.update(block_names=names, anchor_token_ids=[8, 9])
    names.append("z")  # the config stored a copy
    assert cfg.block_names == ["x", "y"] and cfg.active_blocks == [1, 2]
    with pytest.raises(hl.LocalistConfigError, match="pair up"):
        cfg.block_names += ["z"]  # a new list, assigned back: validated (no anchor id for "z")
    assert cfg.block_names == ["x", "y"]
    # Plain lists in to_dict() and JSON; equality, copies and pickling still work.
    assert type(cfg.to_dict()["block_names"]) is list and json.loads(cfg.to_json_string())["block_names"] == ["x", "y"]
    import copy
    import pickle

    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    router_cfg = hl.LocalistRouterConfig(specialists={"b": {"path": "/b", "kind": "full"},
                                                      "a": {"path": "/a", "kind": "full"}})
    with pytest.raises(hl.LocalistConfigError, match="assign a new list"):
        router_cfg.specialist_order.append("c")
    assert router_cfg.specialist_order == ["b", "a"] and type(router_cfg.to_dict()["specialist_order"]) is list


@pytest.mark.parametrize("cls,field,value", [
    (hl.LocalistConfig, "max_blocks", 0), (hl.RecruitmentConfig, "every", 0), (hl.LocalistRouterConfig, "routing_k", 0),
])
def test_one_rule_reads_the_same_in_every_class(cls, field, value):
    # integer(1) in all three: the same message, naming the class, the field, the value and what is allowed.
    expected = rf"^{cls.__name__}\.{field}=0 is invalid: expected an integer >= 1\b"
    with pytest.raises(hl.LocalistConfigError, match=expected):
        cls(**{field: value})
    cfg = cls()
    before = cfg.to_dict()
    with pytest.raises(hl.LocalistConfigError, match=expected):
        setattr(cfg, field, value)
    assert cfg.to_dict() == before  # a rejected assignment changes nothing


def test_choice_and_range_rules_share_one_message_style():
    from hf_localist.config.fields import number, one_of, validate_field

    for owner in ("LocalistConfig", "RecruitmentConfig", "LocalistRouterConfig"):
        with pytest.raises(hl.LocalistConfigError, match=rf"^{owner}\.x='z' is invalid: choose one of \['a', 'b'\]$"):
            validate_field(owner, "x", "z", one_of(("a", "b")))
        with pytest.raises(hl.LocalistConfigError, match=rf"^{owner}\.x=2 is invalid: expected a finite number in "
                                                         r"\[0, 1\)$"):
            validate_field(owner, "x", 2, number(0, 1, open_high=True))
    assert validate_field("C", "x", 1, number(0, 1)) == 1.0 and isinstance(validate_field("C", "x", 1, number()), float)


def test_hf_argument_parser_builds_from_recruitment_config_too():
    (rcfg,) = HfArgumentParser(hl.RecruitmentConfig).parse_args_into_dataclasses(["--every", "7", "--epsilon", "0"])
    assert rcfg.every == 7 and rcfg.epsilon == 0.0
    for f in dataclasses.fields(hl.RecruitmentConfig):
        assert set(f.metadata) == {"help"}, f"{f.name}: argparse would receive {sorted(f.metadata)}"
