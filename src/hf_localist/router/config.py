"""``LocalistRouterConfig``, the router's output types, and the resolution of specialist paths
(docs/design.md section 7).

The config is a transformers ``PreTrainedConfig`` (``model_type = "localist_router"``), so a router saves as a
``config.json`` and loads through ``AutoConfig``. Each field carries help text and its rule in its metadata
(``config_fields``) and is validated on construction and on assignment (``LocalistConfigError`` naming the field
and the value).

A specialist entry is a dict ``{"path", "kind", "source", "recruitment"}``:

- ``path``: for ``source="reference"`` an absolute local directory or a Hub id; for ``source="copy"`` a path
  relative to the saved router directory (``specialists/<name>``) that must not leave it;
- ``kind``: ``"full"`` (a causal-LM checkpoint) or ``"adapter"`` (a peft adapter on the base);
- ``recruitment``: how the specialist joined the router (``{"method": "given"}`` or the numbers of
  ``recruit_specialist``), written into the model cards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedConfig
from transformers.utils import ModelOutput, cached_file

from ..config.fields import (
    Invalid,
    ValidatedFields,
    custom,
    integer,
    list_of,
    number,
    one_of,
    plain,
    spec,
    text,
    validate_field,
)
from ..config.recruitment import RecruitmentConfig
from ..errors import LocalistConfigError, LocalistLoadError
from ..utils import read_json_object

ROUTING_MODES = ("hard", "soft", "top_k")
KINDS = ("full", "adapter")
SOURCES = ("reference", "copy")
R_RANGE = (50.0, 200.0)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(name: Any) -> str:
    """A specialist name: it becomes a directory (``specialists/<name>``) and a repo suffix (``<repo>-<name>``)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or len(name) > 64:
        raise LocalistConfigError(
            f"specialist name {name!r} is invalid: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit (it names a directory and a Hub repo suffix)")
    return name


def _specialists(value: Any) -> Any:
    if not isinstance(value, dict):
        raise Invalid("expected a dict name -> {'path', 'kind', 'source', 'recruitment'}")
    for name, entry in value.items():
        check_name(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise Invalid(f"specialist {name!r} needs a non-empty 'path'", {name: entry})
        if entry.get("kind") not in KINDS:
            raise Invalid(f"specialist {name!r}: 'kind' must be one of {list(KINDS)}", {name: entry})
        if entry.get("source", "reference") not in SOURCES:
            raise Invalid(f"specialist {name!r}: 'source' must be one of {list(SOURCES)}", {name: entry})
        unknown = sorted(set(entry) - {"path", "kind", "source", "recruitment"})
        if unknown:
            raise Invalid(f"specialist {name!r}: unknown key(s) {unknown}", {name: entry})
    return value


#: r of theta_LLM = r * theta_block (docs/design.md section 7).
THETA_RATIO = number(*R_RANGE)


class LocalistRouterConfig(ValidatedFields, PreTrainedConfig):
    """Settings of a ``LocalistRouterModel``: the base, the specialists, the router and the routing mode.

    Like every ``PreTrainedConfig`` it may carry extra attributes (transformers sets some, ``from_pretrained``
    keeps unknown keys of ``config.json``), so only a near-miss of one of its own fields (``routng="soft"``) is
    refused as a typo.
    """

    model_type = "localist_router"
    _closed = False
    _ready_flag = "_post_init_done"  # transformers' own flag, already kept out of config.json

    base_model_path: str | None = field(default=None, metadata=spec(
        "The base causal LM: an absolute local directory, a Hub id, or 'base' (a copy inside the saved router "
        "directory). Its pooled hidden states feed the router."))
    base_source: str = field(default="reference", metadata=spec(
        "'reference' or 'copy' (see base_model_path).", one_of(SOURCES)))
    specialists: dict | None = field(default=None, metadata=spec(
        "name -> {'path', 'kind' ('full'|'adapter'), 'source' ('reference'|'copy'), 'recruitment'}; the order is "
        "the order of the router's outputs.", custom(_specialists, optional=True)))
    specialist_order: list | None = field(default=None, metadata=spec(
        "The specialists' names in router-output order (config.json sorts dict keys, so the order is kept here; "
        "set automatically).", list_of(text(nonempty=True), distinct=True, optional=True)))
    routing: str = field(default="hard", metadata=spec(
        "'hard' (argmax: only the chosen specialist runs), 'soft' (mixture of all specialists' next-token "
        "distributions weighted by the router), 'top_k' (mixture over the routing_k most probable, renormalised).",
        one_of(ROUTING_MODES)))
    routing_k: int = field(default=2, metadata=spec(
        "k of top_k routing (>= 1; capped at the number of specialists).", integer(1)))
    confidence_threshold: float = field(default=0.0, metadata=spec(
        "Hard routing: an input whose top router probability is below this runs on the base model (adapters "
        "disabled) instead of a specialist, in [0, 1]; 0 sends every input to a specialist. "
        "LocalistRouterModel.calibrate_confidence sets it from labelled data.", number(0, 1)))
    router_hidden_size: int = field(default=0, metadata=spec(
        "0: the router is a linear layer on pooled base hidden states; > 0: a 1-hidden-layer MLP of this width "
        "(GELU).", integer(0)))
    hidden_size: int | None = field(default=None, metadata=spec(
        "Hidden size of the base (the router's input width).", integer(1, optional=True)))
    vocab_size: int | None = field(default=None, metadata=spec(
        "Vocabulary size of the base (every specialist's).", integer(1, optional=True)))
    base_model_type: str | None = field(default=None, metadata=spec(
        "model_type of the base (every specialist's)."))
    max_loaded_specialists: int = field(default=4, metadata=spec(
        "Specialists kept in memory (least recently used ones are released past it; >= 1).", integer(1)))
    max_router_tokens: int = field(default=512, metadata=spec(
        "The router reads at most this many leading tokens of an input (>= 1).", integer(1)))
    gamma: float = field(default=0.8, metadata=spec(
        "recruit_specialist: an input is confused if H_domain > gamma ln M (in [0, 1]).", number(0, 1)))
    theta_ratio: float = field(default=100.0, metadata=spec(
        "r in theta_LLM = r * theta_block, in [50, 200] (docs/design.md section 7).", THETA_RATIO))
    theta_block: float | None = field(default=None, metadata=spec(
        "theta_block in nats (>= 0); None: the RecruitmentConfig default.", number(0, optional=True)))

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._finish_init()
        if self.specialists is not None:  # the dict in router-output order (config.json sorted its keys)
            order = self.specialist_order if self.specialist_order is not None else list(self.specialists)
            self._assign({"specialists": {n: self.specialists[n] for n in order}, "specialist_order": order})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "specialists" and self.__dict__.get(self._ready_flag, False):
            # A new dict brings its own order; both change together (or neither).
            self._assign({name: value, "specialist_order": list(value) if isinstance(value, dict) else None})
            return
        super().__setattr__(name, value)

    def _validate_consistency(self) -> None:
        if self.specialists is not None and self.specialist_order is not None \
                and sorted(self.specialist_order) != sorted(self.specialists):
            raise LocalistConfigError(
                f"LocalistRouterConfig.specialist_order={list(self.specialist_order)!r} is invalid: must list exactly "
                f"the specialists {sorted(self.specialists)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: plain(v) for k, v in super().to_dict().items()}  # plain lists, as from any PreTrainedConfig

    # ------------------------------------------------------------------ helpers
    @property
    def specialist_names(self) -> list[str]:
        return list(self.specialists or {})

    @property
    def theta_llm(self) -> float:
        """theta_LLM = r * theta_block (nats)."""
        return self.theta_ratio * resolve_theta_block(self.theta_block)


def resolve_theta_block(theta_block: float | None) -> float:
    if theta_block is None:
        return float(RecruitmentConfig().theta_block)
    return float(theta_block)


def check_r(value: Any) -> float:
    """r of theta_LLM = r * theta_block must lie in [50, 200]."""
    return validate_field("LocalistRouterConfig", "theta_ratio", value, THETA_RATIO)


#: field -> check(value) by the field's rule, for per-call overrides (``router(ids, routing="soft")``).
_CHECKS = {name: partial(validate_field, "LocalistRouterConfig", name, rule=rule)
           for name, rule in LocalistRouterConfig._field_rules.items()}
#: Fields that ``LocalistRouterModel.from_pretrained(path, **kwargs)`` may override (not the model-defining ones).
OVERRIDABLE = ("routing", "routing_k", "confidence_threshold", "max_loaded_specialists", "max_router_tokens", "gamma",
               "theta_ratio", "theta_block")


# ---------------------------------------------------------------------------------------------- paths
def resolve_entry_path(root: str | None, what: str, path: str, source: str) -> str:
    """The location to load ``what`` (a specialist or the base) from: a local directory or a Hub id.

    ``copy`` paths are relative to ``root`` (the saved router directory) and must stay inside it; ``reference``
    paths are absolute local directories or Hub ids. Anything else ('../x', an absolute copy path) is refused.
    """
    if source == "copy":
        if root is None:
            raise LocalistLoadError(f"{what}: path {path!r} is a copy inside a saved router directory, but no "
                                    "directory is known here (load the router with from_pretrained)")
        if os.path.isabs(path) or path.startswith(("~", "\\")) or re.match(r"^[A-Za-z]:", path):
            raise LocalistLoadError(f"{what}: the copy path {path!r} is absolute; a copied model must live inside "
                                    f"the saved router directory {root!r} (e.g. 'specialists/<name>')")
        norm = os.path.normpath(path)
        if norm == ".." or norm.startswith(".." + os.sep) or norm in (".", ""):
            raise LocalistLoadError(f"{what}: the copy path {path!r} escapes the saved router directory {root!r}")
        full = os.path.realpath(os.path.join(root, norm))
        if not _inside(full, root):
            raise LocalistLoadError(f"{what}: the copy path {path!r} resolves to {full!r}, outside the saved router "
                                    f"directory {root!r}")
        _check_no_escaping_links(full, root, what)
        return full
    if os.path.isabs(path):
        return path
    if os.path.isdir(path) and root is None:  # a relative local path given by the user (not from a saved config)
        return os.path.abspath(path)
    parts = path.replace("\\", "/").split("/")
    if ".." in parts or "." in parts or path.startswith(("./", "~")):
        raise LocalistLoadError(f"{what}: the path {path!r} escapes the router directory; a reference must be an "
                                "absolute local directory or a Hub id")
    try:
        validate_repo_id(path)
    except HFValidationError as e:
        raise LocalistLoadError(f"{what}: {path!r} is neither an existing local directory nor a valid Hub id ({e})") \
            from e
    return path


def check_entry_paths(config: LocalistRouterConfig, root: str, path: str, fetched: bool,
                      allow_local_references: bool) -> None:
    """Refuse, before anything is loaded, every entry of a saved router that escapes its directory, and
    ``reference`` entries naming local directories unless ``allow_local_references`` (never for a router fetched
    from the Hub: its config must not make this machine read an arbitrary local directory)."""
    entries = [("the base model", config.base_model_path, config.base_source)]
    entries += [(f"specialist {n!r}", e["path"], e.get("source", "reference")) for n, e in config.specialists.items()]
    for what, entry_path, source in entries:
        if source == "reference" and is_local_reference(entry_path):
            if fetched:
                raise LocalistLoadError(
                    f"{what}: the router fetched from the Hub ({path!r}) refers to the local path {entry_path!r}; "
                    "a Hub router may only refer to Hub ids or to copies inside its repo")
            if not allow_local_references:
                raise LocalistLoadError(
                    f"{what}: the saved router {path!r} refers to the local directory {entry_path!r} (source "
                    "'reference'); load it with LocalistRouterModel.from_pretrained(..., allow_local_references=True) "
                    "if you trust that directory, or save the router with save_pretrained(..., copy_specialists=True) "
                    "to make it self-contained")
        resolve_entry_path(root, what, entry_path, source)


def is_local_reference(path: str) -> bool:
    """Whether a ``reference`` entry names a local directory (an absolute path) rather than a Hub id."""
    return os.path.isabs(path) or path.startswith(("~", "\\")) or bool(re.match(r"^[A-Za-z]:", path))


def _inside(full: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(full), real_root]) == real_root


def _check_no_escaping_links(directory: str, root: str, what: str) -> None:
    """A copied model must not read files from outside the router directory through a symbolic link in it."""
    if not os.path.isdir(directory):
        return
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) and not _inside(full, root):
                raise LocalistLoadError(
                    f"{what}: {full!r} is a symbolic link to {os.path.realpath(full)!r}, outside the saved router "
                    f"directory {root!r}; a copied model must hold its own files (save the router again with "
                    "copy_specialists=True)")


def read_json(path: str, what: str) -> dict:
    """The JSON object of ``path`` (``utils.read_json_object``), the error naming ``what`` it belongs to."""
    try:
        return read_json_object(path, "re-save it with save_pretrained")
    except LocalistLoadError as e:
        raise LocalistLoadError(f"{what}: {e}") from None


def locate(path: str, filename: str, what: str, required: bool = True) -> str | None:
    """``path/filename`` for a local directory, else the cached or downloaded Hub file (None if absent)."""
    if os.path.isdir(path):
        full = os.path.join(path, filename)
        if os.path.isfile(full):
            return full
        if required:
            raise LocalistLoadError(f"{what}: {full!r} is missing")
        return None
    if os.path.isabs(path):
        raise LocalistLoadError(f"{what}: the directory {path!r} does not exist")
    try:
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError) as e:
        raise LocalistLoadError(f"{what}: cannot reach {filename} of the Hub repo {path!r} ({e})") from e


def detect_kind(path: str, what: str) -> str:
    """'adapter' when ``path`` holds adapter_config.json, 'full' when it holds config.json; else an error."""
    if locate(path, ADAPTER_CONFIG, what, required=False):
        return "adapter"
    if locate(path, "config.json", what, required=False):
        return "full"
    if not os.path.isdir(path):
        # cached_file answers None both for a file the repo lacks and for a Hub it cannot reach: tell them apart.
        try:
            cached_file(path, "config.json")
        except OSError as e:
            cause = e.__cause__
            if isinstance(cause, (EntryNotFoundError, RepositoryNotFoundError)) \
                    and not isinstance(cause, LocalEntryNotFoundError):  # (offline: "not in the cache")
                raise LocalistLoadError(f"{what}: the Hub repo {path!r} does not exist or holds neither config.json "
                                        f"nor {ADAPTER_CONFIG}") from e
            raise LocalistLoadError(f"{what}: the Hub repo {path!r} is unreachable from here and not in the local "
                                    f"cache ({e.__class__.__name__}: {' '.join(str(e).split())[:200]}); connect, "
                                    "or download it first (HF_HUB_OFFLINE is set?)") from e
    raise LocalistLoadError(f"{what}: {path!r} holds neither config.json (a full checkpoint) nor {ADAPTER_CONFIG} "
                            "(a peft adapter)")


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class LocalistRouterOutput(ModelOutput):
    """``logits`` (B, T, V): the chosen specialist's logits (hard) or the mixture's log-probabilities (soft/top_k);
    ``router_probs`` (B, M); ``chosen`` (B, k) specialist indices (most probable first); ``routing_weights`` (B, k)
    their mixture weights; ``domain_entropy`` (B,) H_domain = -sum pi ln pi in nats."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    chosen: torch.LongTensor | None = None
    routing_weights: torch.Tensor | None = None
    domain_entropy: torch.Tensor | None = None


@dataclass
class LocalistRouterGenerateOutput(ModelOutput):
    """``router.generate(..., return_dict_in_generate=True)``: the sequences (B * returned sequences per input,
    prompt + new), the routing of the B prompts, and with ``output_scores`` / ``output_logits`` transformers' per-step
    processed scores / raw logits (for soft / top_k the raw logits are the mixture's log-probabilities; for hard
    routing a step that an input's specialist did not run, because all its inputs had stopped, is NaN)."""

    sequences: torch.LongTensor | None = None
    router_probs: torch.Tensor | None = None
    chosen: torch.LongTensor | None = None
    domain_entropy: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class RoutingDecision:
    mode: str
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    chosen: torch.LongTensor  # (B, k)
    log_weights: torch.Tensor  # (B, k)
    domain_entropy: torch.Tensor  # (B,)
