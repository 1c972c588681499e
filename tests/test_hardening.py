"""Issue 15 (hardening): no stale state in re-saved checkpoints, bad files and bad inputs refused with the project's
errors, validation that cannot be bypassed, router inputs and references checked, no deprecation warning from our
own code, a CLI that answers in one line. Kills and corruption of every file: tests/test_fault_injection.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import build_model, random_ids

import hf_localist as hl
from hf_localist import savedir
from hf_localist.patch.persistence import BLOCKS_FILE, STATE_FILE


def _with_blocks(seed: int = 0, **config):
    model = build_model("llama", seed=seed)
    handle = hl.apply_localist(model, hl.LocalistConfig(block_assignment="centroid", active_blocks=[], **config))
    torch.manual_seed(seed)
    handle.activate_block(1, centroid=torch.randn(32))
    handle.activate_block(2, centroid=torch.randn(32))
    return model, handle


# ---------------------------------------------------------------------------------------------- finding 1
def test_resaving_a_block_less_model_removes_the_old_state(tmp_path):
    model, _ = _with_blocks()
    model.save_pretrained(tmp_path)
    assert {STATE_FILE, BLOCKS_FILE} <= set(os.listdir(tmp_path))
    other = build_model("llama", seed=1)
    hl.apply_localist(other, hl.LocalistConfig(block_assignment="centroid", active_blocks=[], max_blocks=4))
    other.save_pretrained(tmp_path)
    assert not {STATE_FILE, BLOCKS_FILE} & set(os.listdir(tmp_path))
    again = hl.AutoLocalistModel.from_pretrained(tmp_path).localist_handle
    assert again.config.active_blocks == [] and again.config.max_blocks == 4


def test_unsharded_save_after_a_sharded_one_removes_the_shards(tmp_path):
    model, _ = _with_blocks()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [n for n in os.listdir(tmp_path) if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")  # a file the model save does not own stays
    model.save_pretrained(tmp_path)
    left = set(os.listdir(tmp_path))
    assert not [n for n in left if n.startswith("model-")] and "model.safetensors.index.json" not in left
    assert {"model.safetensors", "tokenizer_config.json"} <= left
    hl.AutoLocalistModel.from_pretrained(tmp_path)


def test_resaving_a_router_with_fewer_specialists_removes_their_copies(zoo, tmp_path):
    from hf_localist import LocalistRouterModel

    full = LocalistRouterModel.from_specialists(zoo.paths["base"], {n: zoo.paths[n] for n in ("alpha", "beta")})
    full.save_pretrained(tmp_path, copy_specialists=True)
    assert sorted(os.listdir(tmp_path / "specialists")) == ["alpha", "beta"]
    fewer = LocalistRouterModel.from_specialists(zoo.paths["base"], {"alpha": zoo.paths["alpha"]})
    fewer.save_pretrained(tmp_path, copy_specialists=True)
    assert os.listdir(tmp_path / "specialists") == ["alpha"]
    fewer.save_pretrained(tmp_path)  # references now: the copies and base/ are stale too
    assert not os.path.exists(tmp_path / "specialists") and not os.path.exists(tmp_path / "base")
    again = LocalistRouterModel.from_pretrained(tmp_path, allow_local_references=True)
    assert again.specialist_names == ["alpha"]


# ---------------------------------------------------------------------------------------------- finding 3
def test_a_missing_state_file_is_refused_even_without_a_manifest(tmp_path):
    model, _ = _with_blocks()
    model.save_pretrained(tmp_path)
    (tmp_path / STATE_FILE).unlink()
    with pytest.raises(hl.LocalistLoadError, match=f"{STATE_FILE}' is missing"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)
    (tmp_path / savedir.MANIFEST_NAME).unlink()  # an unchecked directory: the block record still says it is gone
    with pytest.raises(hl.LocalistLoadError, match=f"{STATE_FILE}' is missing, but {BLOCKS_FILE} says"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)


def test_nan_centroids_are_refused_from_activate_block_and_from_the_state_file(tmp_path):
    from safetensors.torch import load_file, save_file

    model, handle = _with_blocks()
    with pytest.raises(hl.LocalistConfigError, match="NaN or infinite"):
        handle.activate_block(3, centroid=torch.full((32,), float("nan")))
    assert handle.config.active_blocks == [1, 2]
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / STATE_FILE)
    tensors["centroids"][1, 0] = float("nan")
    save_file(tensors, tmp_path / STATE_FILE)
    (tmp_path / savedir.MANIFEST_NAME).unlink()
    with pytest.raises(hl.LocalistLoadError, match="centroids holds NaN"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)


def test_corrupt_weights_name_the_file_without_a_manifest(tmp_path):
    model, _ = _with_blocks()
    model.save_pretrained(tmp_path)
    (tmp_path / savedir.MANIFEST_NAME).unlink()
    (tmp_path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(hl.LocalistLoadError, match="model.safetensors"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)


def test_saving_onto_an_existing_file_is_a_load_error(tmp_path):
    model, _ = _with_blocks()
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(hl.LocalistLoadError, match="afile.*is a file"):
        model.save_pretrained(target)
    assert target.read_text() == "x"


def test_deeply_nested_or_directory_json_is_a_load_error(tmp_path):
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "localist_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(hl.LocalistLoadError, match="localist_config.json.*not valid JSON"):
        hl.LocalistConfig.from_pretrained(tmp_path / "deep")
    (tmp_path / "dir" / "localist_config.json").mkdir(parents=True)
    with pytest.raises(hl.LocalistLoadError, match="localist_config.json' is not a regular file"):
        hl.LocalistConfig.from_pretrained(tmp_path / "dir")
    model, _ = _with_blocks()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / savedir.MANIFEST_NAME).unlink()
    (tmp_path / "m" / BLOCKS_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(hl.LocalistLoadError, match=f"{BLOCKS_FILE}' is corrupt"):
        hl.AutoLocalistModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / savedir.MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(hl.LocalistLoadError, match=f"{savedir.MANIFEST_NAME}' is not a readable"):
        hl.AutoLocalistModel.from_pretrained(tmp_path / "m")


def test_manifest_lists_every_file_the_save_wrote(tmp_path):
    model, _ = _with_blocks()
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / savedir.MANIFEST_NAME).read_text())
    assert manifest["state"] == "complete"
    assert sorted(manifest["files"]) == sorted(n for n in os.listdir(tmp_path) if n != savedir.MANIFEST_NAME)
    assert savedir.verify_directory(str(tmp_path)) == sorted(manifest["files"])
    x = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(hl.AutoLocalistModel.from_pretrained(tmp_path)(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------- finding 4
def test_a_refused_activate_block_changes_nothing():
    model, handle = _with_blocks()
    before = handle.state.centroids.clone()
    x = random_ids(1, 6)
    with torch.no_grad():
        ref = model(x).logits
    for bad in (torch.randn(16), torch.randn(2, 32), torch.randint(0, 3, (32,)), [0.0] * 32):
        with pytest.raises(hl.LocalistConfigError, match="activate_block: centroid"):
            handle.activate_block(3, centroid=bad)
    with pytest.raises(hl.LocalistConfigError, match="enabled"):
        handle.activate_block(3, centroid=torch.randn(32), enabled="yes")
    with pytest.raises(hl.LocalistStateError, match="needs calibrated subspaces"):
        handle.activate_block(3, centroid=torch.randn(32), subspace=torch.randn(2, 32, 4))
    assert torch.equal(handle.state.centroids, before) and handle.config.active_blocks == [1, 2]
    assert 3 not in handle.state.block_info
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref)
    handle.activate_block(3, centroid=torch.randn(32))  # the slot is still free
    assert handle.config.active_blocks == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- finding 5
def test_config_fields_cannot_be_bypassed():
    _, handle = _with_blocks()
    cfg = handle.config
    with pytest.raises(hl.LocalistConfigError, match="cannot change in place"):
        cfg.block_names.append("a")
    with pytest.raises(hl.LocalistConfigError, match="cannot change in place"):
        cfg.active_blocks[0] = 5
    assert cfg.active_blocks == [1, 2]
    with pytest.raises(hl.LocalistConfigError, match="did you mean 'alpha'"):
        cfg.alfa = 0.3
    with pytest.raises(hl.LocalistConfigError, match="did you mean 'alpha'"):
        hl.LocalistConfig(alfa=0.3)
    with pytest.raises(hl.LocalistConfigError, match="unknown RecruitmentConfig"):
        hl.RecruitmentConfig(bogus_field=1)


def test_model_type_and_num_layers_stay_those_of_the_model():
    model, handle = _with_blocks()
    with pytest.raises(hl.LocalistConfigError, match="'gpt2'.*'llama' with 2 attention layers"):
        handle.update(model_type="gpt2")
    with pytest.raises(hl.LocalistConfigError, match="num_layers=8"):
        handle.update(num_layers=8, first_local_layer=5)
    with pytest.raises(hl.LocalistConfigError, match="num_layers=8"):
        handle.config.num_layers = 8
    assert (handle.config.model_type, handle.config.num_layers, handle.config.first_local_layer) == ("llama", 2, 0)
    # the model's copy is bound, a copy made for another model is not
    other = build_model("gpt2")
    hl.apply_localist(other, handle.config.copy(model_type=None, num_layers=None))
    assert other.localist_handle.config.model_type == "gpt2"


def test_anchor_token_ids_beyond_the_vocabulary_are_refused():
    model = build_model("llama")
    with pytest.raises(hl.LocalistConfigError, match=r"\[500\].*vocabulary of 100"):
        hl.apply_localist(model, hl.LocalistConfig(anchor_token_ids=[500], block_names=["a"]))
    handle = hl.apply_localist(model, hl.LocalistConfig(anchor_token_ids=[50], block_names=["a"]))
    with pytest.raises(hl.LocalistConfigError, match=r"\[100\]"):
        handle.update(general_token_id=100)
    assert handle.config.general_token_id is None
    model.resize_token_embeddings(120)  # the live vocabulary counts
    handle.update(anchor_token_ids=[110], block_names=["a"])


# ---------------------------------------------------------------------------------------------- finding 7
def test_router_probs_must_be_a_distribution(zoo):
    from helpers import make_router

    router = make_router(zoo, "soft")
    x = random_ids(2, 6)
    for bad in ([[float("nan"), 1.0, 0.0]] * 2, [[-0.5, 1.0, 0.5]] * 2, [[0.0, 0.0, 0.0]] * 2,
                [[float("inf"), 0.0, 0.0]] * 2):
        with pytest.raises(hl.LocalistConfigError, match="router_probs must be finite and >= 0"):
            router(x, router_probs=torch.tensor(bad))
    with pytest.raises(hl.LocalistConfigError, match="router_probs has shape"):
        router(x, router_probs=[[1.0, 0.0, 0.0]] * 2)
    out = router(x, router_probs=torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))  # renormalised
    torch.testing.assert_close(out.router_probs[0], torch.tensor([1.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------------------------- finding 8
def test_router_references_to_local_directories_need_an_opt_in(zoo, tmp_path):
    from helpers import make_router

    from hf_localist import LocalistRouterModel

    router = make_router(zoo)
    router.save_pretrained(tmp_path / "ref")
    with pytest.raises(hl.LocalistLoadError, match="allow_local_references=True"):
        LocalistRouterModel.from_pretrained(tmp_path / "ref")
    assert LocalistRouterModel.from_pretrained(tmp_path / "ref", allow_local_references=True).specialist_names
    router.save_pretrained(tmp_path / "copy", copy_specialists=True)  # self-contained: no opt-in
    LocalistRouterModel.from_pretrained(tmp_path / "copy")


def test_a_hub_router_never_refers_to_local_directories(zoo, tmp_path, monkeypatch):
    from helpers import make_router

    from hf_localist import LocalistRouterModel
    from hf_localist.router import model as router_model

    make_router(zoo).save_pretrained(tmp_path / "snapshot")
    monkeypatch.setattr(router_model, "snapshot_download", lambda repo, **kw: str(tmp_path / "snapshot"))
    with pytest.raises(hl.LocalistLoadError, match="fetched from the Hub.*local path"):
        LocalistRouterModel.from_pretrained("org/router", allow_local_references=True)


def test_a_symlink_out_of_a_copied_specialist_is_refused(zoo, tmp_path):
    from helpers import make_router

    from hf_localist import LocalistRouterModel

    make_router(zoo).save_pretrained(tmp_path / "r", copy_specialists=True)
    weights = tmp_path / "r" / "specialists" / "alpha" / "model.safetensors"
    outside = tmp_path / "outside.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    (tmp_path / "r" / savedir.MANIFEST_NAME).unlink()  # the manifest would refuse it first (not a regular file)
    with pytest.raises(hl.LocalistLoadError, match="alpha.*symbolic link.*outside the saved router"):
        LocalistRouterModel.from_pretrained(tmp_path / "r")


def test_an_unreachable_hub_id_says_unreachable(monkeypatch):
    from hf_localist.router.config import detect_kind

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hl.LocalistLoadError, match="unreachable"):
        detect_kind("someone/not-in-the-cache-xyz", "specialist 'x'")


# ---------------------------------------------------------------------------------------------- finding 9 (part)
@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_router_generation_with_right_padding_continues_each_prompt(zoo, routing):
    from helpers import make_router

    router = make_router(zoo, routing)
    a, b = random_ids(1, 6, seed=1)[0], random_ids(1, 4, seed=2)[0]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :4], mask[1, :4] = b, 1  # right padding (SmolLM2's tokenizer default)
    kw = {"route_to": ["alpha", "beta"]} if routing == "hard" else {
        "router_probs": torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])}
    out = router.generate(ids, attention_mask=mask, max_new_tokens=4, **kw)
    for row, prompt in enumerate((a, b)):
        one = {k: v[row: row + 1] if torch.is_tensor(v) else v[row: row + 1] for k, v in kw.items()}
        alone = router.generate(prompt[None], max_new_tokens=4, **one)
        assert out[row, -4:].tolist() == alone[0, -4:].tolist(), (routing, row)


# ---------------------------------------------------------------------------------------------- finding 10
@pytest.fixture
def deprecations(monkeypatch):
    """Every deprecation transformers reports, as warnings (turned into errors) or through its logger."""
    import warnings

    from transformers.utils import generic

    seen: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: seen.append(str(msg)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield seen


def test_router_soft_generation_causes_no_deprecation(zoo, deprecations):
    from helpers import make_router

    router = make_router(zoo, "soft")
    router.generate(random_ids(2, 5), max_new_tokens=3)
    assert not deprecations


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_localist_forwards_cause_no_deprecation(model_type, deprecations):
    model = build_model(model_type)
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit"))
    x = random_ids(1, 6)
    kw = {"use_cache": False} if model_type == "llama" else {}
    with torch.no_grad():
        model(x, block_ids=torch.zeros_like(x), **kw)
    assert not deprecations


# ---------------------------------------------------------------------------------------------- finding 11
def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # (transformers may draw a progress bar before it)
    assert "error:" in last and needle in last, err
    return last


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--threads", "0"], "--threads: expected an integer >= 1"),
    (["demo", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["apply", "--bogus_flag"], "the following arguments are required"),
    (["inspect", "--model_dir", "m", "--text_file", "t", "--max_length", "0"], "--max_length"),
    (["apply", "--model_dir", "m", "--output_dir", "o", "--alpha", "2"], "LocalistConfig.alpha=2.0 is invalid"),
])
def test_cli_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    from hf_localist import cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    assert rc == 2
    _one_line_error(capsys, needle)


def test_cli_train_with_an_unknown_flag_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from hf_localist import cli

    script = tmp_path / "examples" / "train_localist.py"
    script.parent.mkdir()
    script.write_text("from dataclasses import dataclass\nfrom transformers import HfArgumentParser\n"
                      "@dataclass\nclass A:\n    quick: bool = False\n"
                      "def main(argv=None):\n    HfArgumentParser(A).parse_args_into_dataclasses(args=argv)\n")
    monkeypatch.setenv(cli.REPO_ENV, str(tmp_path))
    assert cli.main(["train", "--bogus_flag"]) == 2
    _one_line_error(capsys, "--bogus_flag")


def test_cli_user_errors_exit_1_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from hf_localist import cli

    model = build_model("llama")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage" * 10)
    out = str(tmp_path / "o")
    assert cli.main(["apply", "--model_dir", str(tmp_path / "m"), "--output_dir", out]) == 1
    _one_line_error(capsys, "model.safetensors")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["demo", "--quick", "--output_dir", str(afile)]) == 1
    _one_line_error(capsys, "is a file")
    assert cli.main(["inspect", "--model_dir", str(tmp_path / "m"), "--text_file", str(tmp_path)]) == 1
    _one_line_error(capsys, "is a directory")
    good = build_model("llama")
    good.save_pretrained(tmp_path / "good")
    if os.path.isdir("/proc"):  # not writable, even for root
        assert cli.main(["apply", "--model_dir", str(tmp_path / "good"), "--output_dir", "/proc/x"]) == 1
        _one_line_error(capsys, "/proc")
    with pytest.raises(hl.LocalistLoadError):
        cli.main(["--debug", "apply", "--model_dir", str(tmp_path / "m"), "--output_dir", out])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(hl.LocalistLoadError):
        cli.main(["apply", "--model_dir", str(tmp_path / "m"), "--output_dir", out])


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_router_generate_takes_transformers_generation_arguments(zoo, routing):
    from helpers import make_router
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    class LogSoftmax(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.log_softmax(-1)

    router = make_router(zoo, routing)
    x = random_ids(2, 5, seed=4)
    route = {"route_to": ["alpha", "alpha"]} if routing == "hard" else {
        "router_probs": torch.tensor([[1.0, 0.0, 0.0]] * 2)}  # soft with all weight on alpha = alpha alone
    # both run in transformers' own generate: hard on the specialist, soft on the mixture, whose logits are its
    # log-probabilities, so that the penalty acts on alpha's log-probabilities there
    first = [] if routing == "hard" else [LogSoftmax()]
    penalised = zoo.alone["alpha"].generate(
        x, max_new_tokens=6, do_sample=False, pad_token_id=0,
        logits_processor=LogitsProcessorList(first + [RepetitionPenaltyLogitsProcessor(1.5)]))
    out = router.generate(x, max_new_tokens=6, repetition_penalty=1.5, **route)
    assert out.tolist() == penalised.tolist()
    plain = zoo.alone["alpha"].generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert router.generate(x, max_new_tokens=6, **route).tolist() == plain.tolist()
    cfg = GenerationConfig(max_new_tokens=6, repetition_penalty=1.5, do_sample=False, pad_token_id=0)
    assert router.generate(x, generation_config=cfg, **route).tolist() == out.tolist()
    beams = zoo.alone["alpha"].generate(x, max_new_tokens=3, num_beams=2, no_repeat_ngram_size=2, pad_token_id=0)
    assert router.generate(x, max_new_tokens=3, num_beams=2, no_repeat_ngram_size=2, **route).tolist() == \
        beams.tolist()
    if routing == "soft":  # what a mixture cannot take is refused by name
        with pytest.raises(hl.LocalistConfigError, match=r"soft routing.*'cache'"):
            router.generate(x, max_new_tokens=3, cache=object(), **route)
        with pytest.raises(hl.LocalistConfigError, match=r"cache_implementation='static'"):
            router.generate(x, generation_config=GenerationConfig(cache_implementation="static"), **route)
