"""Building a router's config from a base and specialists, and opening the base and the specialist pool of a router
(docs/design.md section 7). ``LocalistRouterModel.from_specialists`` / ``from_pretrained`` call these."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig

from ..errors import LocalistConfigError, LocalistLoadError
from . import config as rc
from . import store as rs
from .config import LocalistRouterConfig, resolve_entry_path


def read_model_config(loc: str, what: str):
    """The transformers config of the model at ``loc`` (directory or Hub id); LocalistLoadError naming ``what``."""
    try:
        return AutoConfig.from_pretrained(loc)
    except Exception as e:  # noqa: BLE001
        raise LocalistLoadError(f"{what}: cannot read the model config of {loc!r} ({type(e).__name__}: {e})") from e


def router_config(base: str | os.PathLike, specialists: dict[str, Any], routing: str,
                  config_kwargs: dict) -> LocalistRouterConfig:
    """The config of a new router over ``base`` and ``specialists`` ({name: directory or Hub id, or {"path": ...,
    "recruitment": {...}}}); full checkpoints and peft adapters are told apart by their files."""
    if not isinstance(specialists, dict) or not specialists:
        raise LocalistConfigError(f"specialists={specialists!r}: expected a non-empty dict name -> path")
    base_loc = resolve_entry_path(None, "the base model", os.fspath(base), "reference")
    entries = {}
    for name, spec in specialists.items():
        rc.check_name(name)
        path = spec.get("path") if isinstance(spec, dict) else spec
        if not isinstance(path, (str, os.PathLike)):
            raise LocalistConfigError(f"specialist {name!r}: path={path!r} is not a path or Hub id")
        loc = resolve_entry_path(None, f"specialist {name!r}", os.fspath(path), "reference")
        rec = spec.get("recruitment") if isinstance(spec, dict) else None
        entries[name] = {"path": loc, "kind": rc.detect_kind(loc, f"specialist {name!r}"), "source": "reference",
                         "recruitment": rec or {"method": "given"}}
    base_cfg = read_model_config(base_loc, "the base model")
    text = base_cfg.get_text_config()
    return LocalistRouterConfig(base_model_path=base_loc, specialists=entries, routing=routing,
                                hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                                base_model_type=base_cfg.model_type, **config_kwargs)


def open_specialists(cfg: LocalistRouterConfig, root: str | None,
                     model_kwargs: dict | None = None) -> tuple[rs.SpecialistPool, str]:
    """Load the base, check every specialist's files against it (without loading their weights), and return the lazy
    specialist pool with the base's resolved location."""
    base_loc = resolve_entry_path(root, "the base model", cfg.base_model_path, cfg.base_source)
    try:
        base = rs.load_causal_lm(base_loc, **(model_kwargs or {}))
    except Exception as e:  # noqa: BLE001
        raise LocalistLoadError(f"the base model: cannot load {base_loc!r} ({type(e).__name__}: {e})") from e
    base.eval().requires_grad_(False)
    text = base.config.get_text_config()
    if (text.hidden_size, text.vocab_size, base.config.model_type) != (cfg.hidden_size, cfg.vocab_size,
                                                                       cfg.base_model_type):
        raise LocalistLoadError(
            f"the base model at {base_loc!r} ({base.config.model_type}, hidden {text.hidden_size}, vocab "
            f"{text.vocab_size}) does not match the router config ({cfg.base_model_type}, hidden "
            f"{cfg.hidden_size}, vocab {cfg.vocab_size})")
    paths, kinds = {}, {}
    for name, entry in cfg.specialists.items():
        paths[name] = resolve_entry_path(root, f"specialist {name!r}", entry["path"],
                                         entry.get("source", "reference"))
        kinds[name] = entry["kind"]
        rs.check_specialist(name, paths[name], entry["kind"], base)
    return rs.SpecialistPool(base, paths, kinds, cfg, model_kwargs), base_loc
