"""Where a router's specialists live: the lazy LRU pool, checks of specialist files against the base, copies,
model cards and pushing to the Hub (docs/design.md section 7)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter, OrderedDict
from typing import Any, Sequence

import torch
import transformers.utils.hub as hf_hub
from huggingface_hub import CommitOperationAdd, snapshot_download
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import LocalistConfigError, LocalistLoadError
from ..patch.auto import AutoLocalistModel, has_localist_state
from ..savedir import check_save_target, commit_directory, staging_directory
from .config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LocalistRouterConfig,
    detect_kind,
    locate,
    read_json,
    resolve_entry_path,
)

logger = logging.getLogger("hf_localist.router.model")


def load_causal_lm(path: str, **kwargs: Any) -> nn.Module:
    """A causal LM from a local directory or Hub id; one saved after ``apply_localist`` comes back localist (its
    dial, blocks and recruitment state), so that hard routing keeps the specialist's locality (docs/design.md
    section 7)."""
    if os.path.isdir(path) and has_localist_state(path):
        return AutoLocalistModel.from_pretrained(path, use_safetensors=True, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)


class SpecialistPool:
    """Loads specialists on first use; keeps at most ``config.max_loaded_specialists`` (LRU; read at each load, so
    it can be changed at any time), never releasing pinned ones."""

    def __init__(self, base: nn.Module, paths: dict[str, str], kinds: dict[str, str], config: LocalistRouterConfig,
                 model_kwargs: dict | None = None):
        self.base, self.paths, self.kinds, self.config = base, paths, kinds, config
        self.model_kwargs = {"dtype": base.dtype, **(model_kwargs or {})}
        self.loaded: OrderedDict[str, nn.Module] = OrderedDict()
        self.peft = None  # a PeftModel around ``base`` once an adapter is loaded
        self.pins: Counter = Counter()

    def get(self, name: str) -> nn.Module:
        if name not in self.loaded:
            self._load(name)
            self.trim(keep=name)
        self.loaded.move_to_end(name)
        if self.kinds[name] == "adapter":
            self.peft.set_adapter(name, inference_mode=True)  # frozen: only the router trains
        return self.loaded[name]

    def _load(self, name: str) -> None:
        path = self.paths[name]
        try:  # loading must not move the caller's RNG stream; peft 0.21 calls a renamed transformers helper
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = self._read(name, path)
        except Exception as e:  # noqa: BLE001 - any failure of a specialist's files is reported by name
            if self.peft is not None and name in getattr(self.peft, "peft_config", {}):
                with contextlib.suppress(Exception):
                    self.peft.delete_adapter(name)
            raise LocalistLoadError(f"specialist {name!r}: cannot load {path!r} ({type(e).__name__}: {e})") from e
        self.loaded[name] = model
        logger.info("loaded specialist %r (%s) from %s", name, self.kinds[name], path)

    def _read(self, name: str, path: str) -> nn.Module:
        if self.kinds[name] == "adapter":
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            return self.base
        model = load_causal_lm(path, **self.model_kwargs)
        return model.to(self.base.device).eval().requires_grad_(False)

    def release(self, name: str) -> None:
        self.loaded.pop(name)
        if self.kinds[name] == "adapter":
            with warnings.catch_warnings():  # "adapter X was active ...": get() sets the active adapter each time
                warnings.simplefilter("ignore", UserWarning)
                self.peft.delete_adapter(name)
        logger.info("released specialist %r (least recently used)", name)

    def trim(self, keep: str | None = None) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.config.max_loaded_specialists:
                break
            if not self.pins[name] and name != keep:
                self.release(name)

    @contextlib.contextmanager
    def pinned(self, names: Sequence[str]):
        self.pins.update(names)
        try:
            yield
        finally:
            self.pins.subtract(names)
            self.trim()

    @contextlib.contextmanager
    def base_only(self):
        """The base model with every adapter disabled."""
        if self.peft is not None and self.peft.peft_config:
            with self.peft.disable_adapter():
                yield self.base
        else:
            yield self.base


class BaseOnly:
    """The pool's base model with every adapter disabled, as a callable causal LM with ``generate`` (what a
    below-threshold input runs on)."""

    def __init__(self, pool: SpecialistPool):
        self.pool = pool

    def __call__(self, *args: Any, **kwargs: Any):
        with self.pool.base_only() as base:
            return base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        with self.pool.base_only() as base:
            return base.generate(*args, **kwargs)


def find_tokenizer(root: str | None, base_loc: str):
    for loc in (root, base_loc):
        if loc and os.path.isdir(loc) and any(os.path.isfile(os.path.join(loc, f))
                                              for f in ("tokenizer.json", "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(loc)
            except Exception as e:  # noqa: BLE001
                logger.warning("could not load the tokenizer in %s (%s)", loc, e)
    return None


def save_router(router: Any, save_directory: str, copy_specialists: bool, save_weights) -> None:
    """See ``LocalistRouterModel.save_pretrained``: everything is written into a staging sibling directory, then
    committed under a checksummed manifest (``savedir.commit_directory``): copies of specialists and of the base that
    this save does not write (a dropped specialist, ``base/`` of an earlier copying save) are removed."""

    save_directory = check_save_target(save_directory)
    tmp = staging_directory(save_directory)
    cfg = router.config
    saved = (cfg.base_model_path, cfg.base_source, cfg.specialists)
    try:
        base_loc = resolve_entry_path(router._root, "the base model", cfg.base_model_path, cfg.base_source)
        specs = {}
        for name, entry in cfg.specialists.items():
            loc = router._pool.paths[name]
            if copy_specialists:
                _copy_model_dir(loc, os.path.join(tmp, "specialists", name), f"specialist {name!r}")
                specs[name] = {**entry, "path": f"specialists/{name}", "source": "copy"}
            else:
                specs[name] = {**entry, "path": loc, "source": "reference"}
        if copy_specialists:
            _copy_model_dir(base_loc, os.path.join(tmp, "base"), "the base model")
        cfg.base_model_path, cfg.base_source = ("base", "copy") if copy_specialists else (base_loc, "reference")
        cfg.specialists = specs
        save_weights(tmp)
        if router.tokenizer is not None:
            router.tokenizer.save_pretrained(tmp)
        commit_directory(tmp, save_directory, _router_file, deep=("specialists", "base"))
    finally:
        cfg.base_model_path, cfg.base_source, cfg.specialists = saved
        shutil.rmtree(tmp, ignore_errors=True)


def _router_file(rel: str) -> bool:
    """Files of a saved router that a later save replaces or removes: its config and weights, and the copies of
    specialists and of the base (other files in the directory are kept)."""
    return rel in ("config.json", "model.safetensors") or rel.startswith(("specialists/", "base/"))


def _copy_model_dir(src: str, dst: str, what: str) -> None:
    if not os.path.isdir(src):
        try:
            src = snapshot_download(src)
        except Exception as e:  # noqa: BLE001
            raise LocalistLoadError(f"{what}: cannot copy {src!r} ({type(e).__name__}: {e})") from e
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".tmp-*", "README.md"))


# ---------------------------------------------------------------------------------------------- model cards
def describe_recruitment(info: dict | None) -> str:
    info = info or {}
    if info.get("method") == "recruit_specialist":
        return (f"recruited by `recruit_specialist`: a k-means cluster of {info.get('cluster_size')} inputs with "
                f"H_domain > {info.get('gamma')} ln M; candidate {info.get('candidate', 'lora')} trained "
                f"{info.get('train_steps')} steps; dL_data = {info.get('dL_data', float('nan')):.1f} nats, "
                f"dL_model = {info.get('dL_model', float('nan')):.1f} nats, dL_total = "
                f"{info.get('dL_total', float('nan')):.1f} <= -theta_LLM = {-info.get('theta_LLM', float('nan')):.1f}")
    note = info.get("note")
    return "given to `LocalistRouterModel.from_specialists`" + (f" ({note})" if note else "")


def router_card(repo_id: str, config: LocalistRouterConfig, repos: dict[str, str], base_repo: str) -> str:
    names = config.specialist_names
    kinds = {"adapter": "LoRA / peft adapter on the base", "full": "full checkpoint"}
    rows = "\n".join(f"| {n} | `{repos[n]}` | {kinds[config.specialists[n]['kind']]} | "
                     f"{describe_recruitment(config.specialists[n].get('recruitment'))} |" for n in names)
    mode = config.routing + (f" (k = {config.routing_k})" if config.routing == "top_k" else "")
    head = "linear layer" if not config.router_hidden_size else f"MLP (hidden {config.router_hidden_size})"
    return f"""---
library_name: transformers
tags:
- hf_localist
- localist-router
base_model: {base_repo}
---

# {repo_id}

A hierarchical localist model (`hf_localist.LocalistRouterModel`): a router on the pooled last-layer hidden
states of the base `{base_repo}` sends each input to domain specialists.

- **Routing mode:** {mode}. `hard`: the most probable specialist alone runs; `soft`: mixture of every
  specialist's next-token distribution weighted by the router; `top_k`: mixture over the k most probable,
  renormalised. The output also carries the router probabilities and H_domain = -sum pi ln pi (nats).
- **Router:** a {head} over {config.hidden_size}-dim mean-pooled hidden states; its weights are this repo's
  `model.safetensors`.
- **Domains ({len(names)}):** {', '.join(names)}.

| specialist (domain) | repo | kind | how it was recruited |
| --- | --- | --- | --- |
{rows}

```python
import hf_localist
from hf_localist import LocalistRouterModel
router = LocalistRouterModel.from_pretrained("{repo_id}")
out = router(input_ids)              # logits, router_probs, chosen, domain_entropy
ids = router.generate(input_ids, max_new_tokens=50)
```
"""


def specialist_card(repo_id: str, name: str, entry: dict, router_repo: str, base_repo: str) -> str:
    kind = "a LoRA / peft adapter on the base" if entry["kind"] == "adapter" else "a full causal-LM checkpoint"
    alone = ("`peft.PeftModel.from_pretrained(base, repo)`" if entry["kind"] == "adapter"
             else "`AutoModelForCausalLM.from_pretrained(repo)`")
    extra = f"\nbase_model: {base_repo}" if entry["kind"] == "adapter" else ""
    return f"""---
library_name: {'peft' if entry['kind'] == 'adapter' else 'transformers'}
tags:
- hf_localist
- localist-specialist{extra}
---

# {repo_id}

Specialist `{name}` (domain `{name}`) of the localist router [`{router_repo}`](https://huggingface.co/{router_repo}):
{kind}; base `{base_repo}`.

- **How it was recruited:** {describe_recruitment(entry.get('recruitment'))}.
- Load it through the router (`LocalistRouterModel.from_pretrained("{router_repo}")`), or alone with
  {alone}.
"""


# ---------------------------------------------------------------------------------------------- specialist checks
def _unwrap(module: Any) -> Any:
    """The plain module under peft wrappers (LoRA layers keep it as ``base_layer``, modules_to_save as
    ``original_module``)."""
    for attr in ("base_layer", "original_module"):
        while hasattr(module, attr) and getattr(module, attr) is not None:
            module = getattr(module, attr)
    return module


def _compare_arch(what: str, raw: dict, base: Any) -> None:
    text = base.config.get_text_config()
    model_type = raw.get("model_type")
    vocab = raw.get("vocab_size", (raw.get("text_config") or {}).get("vocab_size"))
    if model_type != base.config.model_type:
        raise LocalistLoadError(f"{what}: architecture {model_type!r} differs from the base's "
                                f"{base.config.model_type!r}; a specialist must be a checkpoint of the base's "
                                "architecture or a peft adapter on the base")
    if vocab != text.vocab_size:
        raise LocalistLoadError(f"{what}: vocabulary size {vocab} differs from the base's {text.vocab_size}; every "
                                "specialist must share the base's tokenizer and vocabulary")


def _open_safetensors(path: str, what: str):
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LocalistLoadError(f"{what}: {path!r} is not a readable safetensors file ({e})") from e


def _check_adapter_tensors(path: str, what: str, base: Any) -> None:
    modules = dict(base.named_modules())
    vocab = base.config.get_text_config().vocab_size
    with _open_safetensors(path, what) as fh:
        for key in fh.keys():
            shape = tuple(fh.get_slice(key).get_shape())
            name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if ".lora_" in name:
                mod_name, role = name.split(".lora_", 1)
                expected = None
                mod = modules.get(mod_name)
                if mod is None:
                    raise LocalistLoadError(f"{what}: the adapter targets module {mod_name!r}, which the base "
                                            f"({base.config.model_type}) lacks: it was made for another architecture")
                mod = _unwrap(mod)
                if role.startswith("A.") and hasattr(mod, "in_features"):
                    expected = (shape[0], mod.in_features)
                elif role.startswith("B.") and hasattr(mod, "out_features"):
                    expected = (mod.out_features, shape[1])
                elif role.startswith("embedding_A") and hasattr(mod, "num_embeddings"):
                    expected = (shape[0], mod.num_embeddings)
                elif role.startswith("embedding_B") and hasattr(mod, "embedding_dim"):
                    expected = (mod.embedding_dim, shape[1])
            else:
                mod_name, _, attr = name.rpartition(".")
                mod = modules.get(mod_name)
                param = getattr(_unwrap(mod), attr, None) if mod is not None else None
                expected = tuple(param.shape) if torch.is_tensor(param) else None
            if expected is not None and expected != shape:
                hint = " (a different vocabulary)" if vocab in expected or vocab in shape else ""
                raise LocalistLoadError(f"{what}: adapter tensor {key!r} has shape {shape}, but the base needs "
                                        f"{expected}{hint}: the adapter was trained on another architecture or "
                                        "vocabulary than the base")


def check_specialist(name: str, loc: str, kind: str, base: Any) -> None:
    """Check a specialist's files against the loaded base without loading its weights: kind, architecture,
    vocabulary, safetensors headers, adapter tensor shapes. Raises LocalistLoadError naming the specialist."""
    what = f"specialist {name!r}"
    found = detect_kind(loc, what)
    if found != kind:
        raise LocalistLoadError(f"{what}: the router config says kind={kind!r}, but {loc!r} holds a {found!r} model")
    if kind == "full":
        _compare_arch(what, read_json(locate(loc, "config.json", what), what), base)
        weights = locate(loc, "model.safetensors", what, required=False)
        if weights is None and locate(loc, "model.safetensors.index.json", what, required=False) is None:
            raise LocalistLoadError(f"{what}: {loc!r} holds no safetensors weights (model.safetensors); only "
                                    "safetensors checkpoints are loaded (no pickle)")
        if weights is not None:
            with _open_safetensors(weights, what):
                pass
        return
    acfg = read_json(locate(loc, ADAPTER_CONFIG, what), what)
    if not isinstance(acfg.get("peft_type"), str):
        raise LocalistLoadError(f"{what}: {ADAPTER_CONFIG} in {loc!r} has no 'peft_type'")
    ref = acfg.get("base_model_name_or_path")
    if isinstance(ref, str) and os.path.isfile(os.path.join(ref, "config.json")):
        _compare_arch(f"{what} (trained on {ref!r})", read_json(os.path.join(ref, "config.json"), what), base)
    _check_adapter_tensors(locate(loc, ADAPTER_WEIGHTS, what), what, base)


# ---------------------------------------------------------------------------------------------- the Hub
def _push_dir(api: Any, src: str, repo_id: str, readme: str, opts: dict, adapter_base: str | None = None) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".tmp-*", "README.md"))
        if adapter_base is not None:  # the pushed adapter points at the pushed (or referenced) base
            acfg = read_json(os.path.join(tmp, ADAPTER_CONFIG), repo_id)
            acfg["base_model_name_or_path"] = adapter_base
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
                json.dump(acfg, fh, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(readme)
        return _commit(api, tmp, repo_id, opts)


def _commit(api: Any, folder: str, repo_id: str, opts: dict) -> Any:
    ops = []
    for dirpath, _, files in os.walk(folder):
        for f in sorted(files):
            full = os.path.join(dirpath, f)
            ops.append(CommitOperationAdd(path_in_repo=os.path.relpath(full, folder).replace(os.sep, "/"),
                                          path_or_fileobj=full))
    if opts["revision"] is not None and not opts["revision"].startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=opts["revision"], token=opts["token"], exist_ok=True)
    return api.create_commit(repo_id=repo_id, operations=ops, commit_message=opts["commit_message"] or
                             f"Upload {repo_id} (hf_localist router)", token=opts["token"],
                             create_pr=opts["create_pr"], revision=opts["revision"])


def push_router(router: Any, repo_id: str, *, private: bool | None, token: Any, commit_message: str | None,
                create_pr: bool, revision: str | None, push_base: bool | None, specialist_repo: str) -> dict[str, Any]:
    """See ``LocalistRouterModel.push_to_hub``."""

    api = hf_hub.hf_api()
    opts = {"token": token, "commit_message": commit_message, "create_pr": create_pr, "revision": revision}
    cfg = router.config

    def create(rid: str) -> str:
        return api.create_repo(rid, private=private, token=token, exist_ok=True).repo_id

    repo_id = create(repo_id)
    base_loc = resolve_entry_path(router._root, "the base model", cfg.base_model_path, cfg.base_source)
    push_base = os.path.isdir(base_loc) if push_base is None else push_base
    commits: dict[str, Any] = {}
    base_repo = base_loc
    if push_base:
        if not os.path.isdir(base_loc):
            raise LocalistConfigError(f"push_base=True but the base {base_loc!r} is already a Hub repo")
        base_repo = create(f"{repo_id}-base")
        card = (f"---\nlibrary_name: transformers\ntags:\n- hf_localist\n---\n\n# {base_repo}\n\nThe base model of "
                f"the localist router [`{repo_id}`](https://huggingface.co/{repo_id}).\n")
        commits[base_repo] = _push_dir(api, base_loc, base_repo, card, opts)
    elif os.path.isdir(base_loc):
        logger.warning("the pushed router refers to the local base %r: pass push_base=True", base_loc)
    repos: dict[str, str] = {}
    for name, entry in cfg.specialists.items():
        loc = router._pool.paths[name]
        if not os.path.isdir(loc):  # already on the Hub: keep the reference
            repos[name] = loc
            continue
        target = create(specialist_repo.format(repo_id=repo_id, name=name))
        commits[target] = _push_dir(api, loc, target, specialist_card(target, name, entry, repo_id, base_repo), opts,
                                    adapter_base=base_repo if entry["kind"] == "adapter" else None)
        repos[name] = target
    saved = (cfg.base_model_path, cfg.base_source, cfg.specialists)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg.base_model_path, cfg.base_source = base_repo, "reference"
            cfg.specialists = {n: {**e, "path": repos[n], "source": "reference"} for n, e in cfg.specialists.items()}
            PreTrainedModel.save_pretrained(router, tmp)
            readme = router_card(repo_id, cfg, repos, base_repo)
        finally:
            cfg.base_model_path, cfg.base_source, cfg.specialists = saved
        if router.tokenizer is not None:
            router.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(readme)
        commits[repo_id] = _commit(api, tmp, repo_id, opts)
    return commits
