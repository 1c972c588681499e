"""`LocalistConfig`: every setting of the localist plugin, typed, validated, with help text per field.

The config is a dataclass. Every field carries its help text in ``metadata["help"]`` (so ``HfArgumentParser``
can build a command line from it) and its rule in ``metadata["check"]`` (see ``config_fields``): it is validated
on construction *and* on every later assignment, so ``cfg.alpha = 2`` raises at once, naming the field, and a
typo (``cfg.alfa = 0.3``) raises instead of adding a stray attribute. List fields are stored read-only
(``cfg.block_names.append(...)`` raises: assign a new list). It saves as ``localist_config.json`` (atomically),
loads from such a file, from a model's ``config.json`` that carries a ``localist`` entry, or from any model
directory / Hub id (then it builds defaults for that architecture), and pushes to the Hub through
transformers' ``PushToHubMixin``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModel, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import PushToHubMixin, cached_file

from ..arch.registry import ArchSpec, get_arch_spec
from ..errors import LocalistConfigError, LocalistLoadError, UnsupportedArchitectureError
from ..utils import atomic_write_text
from .fields import Invalid, ValidatedFields, boolean, custom, integer, list_of, number, one_of, plain, spec, text
from .recruitment import RecruitmentConfig

LOCALIST_CONFIG_NAME = "localist_config.json"
#: Attribute of a model's ``PreTrainedConfig`` that carries the localist settings (saved in ``config.json``).
MODEL_CONFIG_KEY = "localist"

SCHEDULES = ("uniform", "progressive")
BACKENDS = ("auto", "dense", "segment", "flex")
BLOCK_ASSIGNMENTS = ("segment", "explicit", "centroid")
BLOCK_POSITIONS = ("continuous", "restart")
PENALTIES = ("none", "loss", "prox")
LAMBDA_MODES = ("fixed", "threshold")
PROX_PRECONDITIONERS = ("auto", "none")
SUBSPACES = ("coordinate", "pca")


def _recruitment(value: Any) -> Any:
    """A RecruitmentConfig, or its dict (as read from JSON) turned into one."""
    if isinstance(value, dict):
        value = RecruitmentConfig.from_dict(value)
    if not isinstance(value, RecruitmentConfig):
        raise Invalid("expected a RecruitmentConfig, its dict, or None")
    return value


@dataclass
class LocalistConfig(ValidatedFields, PushToHubMixin):
    """Settings of localist attention (see docs/design.md sections 1-3).

    Example::

        cfg = LocalistConfig(alpha=0.8, schedule="progressive", schedule_power=3, first_local_layer=2)
        handle = apply_localist(model, cfg)
    """

    alpha: float = field(default=1.0, metadata=spec(
        "The locality dial in [0, 1]. 0 = the unmodified (distributed) model; 1 = fully localist (hard block "
        "mask). A query in block b >= 1 gets log(1 - alpha_l) added to its logits on keys of other blocks.",
        number(0, 1, note="0 = the unmodified model, 1 = the hard block mask")))
    schedule: str = field(default="uniform", metadata=spec(
        "Per-layer dial alpha_l = alpha * s(l). 'uniform': s = 1 on every layer >= first_local_layer. "
        "'progressive': s = ((l - l0 + 1) / (L - l0)) ** schedule_power for l >= l0, else 0.",
        one_of(SCHEDULES)))
    schedule_power: float = field(default=3.0, metadata=spec(
        "The exponent beta of the progressive schedule (> 0; the papers use 1, 3, 5).",
        number(0, open_low=True, note="the papers use 1, 3 or 5")))
    first_local_layer: int = field(default=0, metadata=spec(
        "l0: the first localised layer (0-based). Layers before it are never biased.", integer(0)))
    backend: str = field(default="auto", metadata=spec(
        "'dense' (reference, additive float mask; returns attention weights), 'segment' (hard mode, block-sparse "
        "work, trainable on CPU and GPU), 'flex' (hard mode with flex_attention: CUDA, or CPU without grad), "
        "'auto' (sdpa pass-through where alpha_l = 0, segment/flex for hard layers, dense for soft layers).",
        one_of(BACKENDS)))
    block_assignment: str = field(default="segment", metadata=spec(
        "'segment': block ids come from anchor tokens <blk_NAME> in input_ids (<blk_general> returns to block 0); "
        "'explicit': pass block_ids of shape (batch, seq) to forward.", one_of(BLOCK_ASSIGNMENTS)))
    block_positions: str = field(default="continuous", metadata=spec(
        "Position ids of block tokens. 'continuous': the model's own (index in the sequence; dial 0 is the unmodified "
        "model). 'restart': each block's tokens get the positions they would have if the block were read alone after "
        "the sink and the general tokens before it; general tokens come after the longest block so far (as Parallel "
        "Context Windows). At dial 1 a block then equals the block read alone. Needs block ids before the call "
        "(segment or explicit assignment) and a model whose forward takes position_ids.",
        one_of(BLOCK_POSITIONS)))
    max_blocks: int = field(default=16, metadata=spec(
        "Number of block slots 1..max_blocks (block 0 is the general block).",
        integer(1, note="need at least one block slot; block 0 is the general block")))
    beta_anchor: float = field(default=0.0, metadata=spec(
        "Anchor bonus: alpha_l * beta_anchor is added to the logits of the query's own anchors (>= 0).", number(0)))
    general_block_bias: float = field(default=0.0, metadata=spec(
        "Added (times alpha_l) to the logits of general (block 0) queries for keys inside blocks >= 1, not the sink: "
        "< 0 lowers the attention a question gives many composed blocks (APE-style; runs the dense backend).",
        number()))
    block_names: list[str] = field(default_factory=list, metadata=spec(
        "Names of blocks 1..n, in order (set by add_block_tokens).", list_of(text(nonempty=True), distinct=True)))
    anchor_token_ids: list[int] = field(default_factory=list, metadata=spec(
        "Token id of the anchor <blk_NAME> of block i+1, for segment assignment (set by add_block_tokens).",
        list_of(integer(0))))
    general_token_id: int | None = field(default=None, metadata=spec(
        "Token id of <blk_general>, which returns to block 0 (segment assignment).", integer(0, optional=True)))
    assign_threshold: float = field(default=0.5, metadata=spec(
        "Centroid assignment: a position joins the nearest enabled block when the cosine similarity of its "
        "hidden state (input of layer first_local_layer) to that block's centroid is >= this, in [-1, 1].",
        number(-1, 1, note="a cosine similarity")))
    recruitment: Any = field(default=None, metadata=spec(
        "Block recruitment settings (a RecruitmentConfig or its dict); None disables recruitment.",
        custom(_recruitment, optional=True)))
    flex_compile: bool = field(default=True, metadata=spec(
        "Compile flex_attention with torch.compile (fast kernel; the first call takes seconds).", boolean()))
    # ---- training-time locality (docs/design.md section 4)
    penalty: str = field(default="none", metadata=spec(
        "Group-lasso penalty on Q/K head slices: 'none', 'loss' (the forward adds localist_loss_coef * penalty "
        "to outputs.loss in training mode), or 'prox' (LocalistCallback applies the proximal step after each "
        "optimizer step: exact zeros).", one_of(PENALTIES)))
    prox_preconditioner: str = field(default="auto", metadata=spec(
        "Step size of the proximal step: 'auto' shrinks each group by the optimizer's own step on it (lr for SGD, "
        "lr / (sqrt(v_hat) + eps) averaged over the group for Adam/AdamW; other optimizers are refused), so zeros "
        "appear where the calibrated threshold says; 'none' shrinks by lr * lambda whatever the optimizer.",
        one_of(PROX_PRECONDITIONERS)))
    lambda_mode: str = field(default="fixed", metadata=spec(
        "'fixed': lambda = penalty_lambda; 'threshold': lambda = alpha_train * kappa * lambda_threshold "
        "per (layer, head, block), from estimate_constants(...).threshold().", one_of(LAMBDA_MODES)))
    penalty_lambda: float = field(default=1e-3, metadata=spec(
        "The fixed group-lasso weight lambda (>= 0).", number(0)))
    alpha_train: float = field(default=1.0, metadata=spec(
        "Training-time locality in [0, 1] scaling the threshold lambda (lambda_mode='threshold').", number(0, 1)))
    kappa: float = field(default=1.5, metadata=spec(
        "Safety factor (> 0) on lambda_threshold; the papers suggest 1.5-2.",
        number(0, open_low=True, note="the papers suggest 1.5-2")))
    localist_loss_coef: float = field(default=1.0, metadata=spec(
        "Weight (>= 0) of the penalty added to outputs.loss when penalty='loss'.", number(0)))
    general_head_fraction: float = field(default=0.25, metadata=spec(
        "Fraction in [0, 1) of query heads per layer that stay general (never penalised).",
        number(0, 1, open_high=True, note="at least one head per layer must take a block")))
    subspace: str = field(default="coordinate", metadata=spec(
        "Block feature subspaces U_i: 'coordinate' (fixed coordinate groups, for models trained from "
        "scratch) or 'pca' (top-r principal directions from calibrate_subspaces, for pretrained models).",
        one_of(SUBSPACES)))
    subspace_rank: int | None = field(default=None, metadata=spec(
        "r, the rank of each block subspace; default hidden_size // (n_active_blocks + 1).",
        integer(1, optional=True, note="None for the default")))
    active_blocks: list[int] | None = field(default=None, metadata=spec(
        "Block slots that are active (have heads and subspaces); default 1..len(block_names), or "
        "1..max_blocks when no names are set.",
        list_of(integer(1), distinct=True, sort=True, optional=True, note="block 0 is the general block")))
    model_type: str | None = field(default=None, metadata=spec(
        "model_type of the model this config was built for (filled by apply_localist).", text(optional=True)))
    num_layers: int | None = field(default=None, metadata=spec(
        "Number of attention layers of that model (filled by apply_localist).", integer(0, optional=True)))

    # ------------------------------------------------------------------ validation (see config_fields)
    def __post_init__(self) -> None:
        self._finish_init()

    def _validate_consistency(self) -> None:
        if self.block_positions == "restart" and self.block_assignment == "centroid":
            raise LocalistConfigError(
                "LocalistConfig.block_positions='restart' with block_assignment='centroid' is not possible: centroid "
                "block ids are computed inside the forward, after the positions are used; use block_assignment="
                "'segment' or 'explicit', or block_positions='continuous'"
            )
        if len(self.anchor_token_ids) > self.max_blocks:
            raise LocalistConfigError(
                f"LocalistConfig.anchor_token_ids has {len(self.anchor_token_ids)} anchors but max_blocks="
                f"{self.max_blocks}: raise max_blocks or use fewer blocks"
            )
        if self.block_names and len(self.block_names) != len(self.anchor_token_ids) and self.anchor_token_ids:
            raise LocalistConfigError(
                f"LocalistConfig.block_names has {len(self.block_names)} names but anchor_token_ids has "
                f"{len(self.anchor_token_ids)} ids: they must pair up (use add_block_tokens to set both)"
            )
        if len(self.block_names) > self.max_blocks:
            raise LocalistConfigError(
                f"LocalistConfig.block_names has {len(self.block_names)} blocks but max_blocks={self.max_blocks}"
            )
        if self.general_token_id is not None and self.general_token_id in self.anchor_token_ids:
            raise LocalistConfigError(
                f"LocalistConfig.general_token_id={self.general_token_id} is also an anchor token id"
            )
        if self.active_blocks is not None and self.active_blocks and max(self.active_blocks) > self.max_blocks:
            raise LocalistConfigError(
                f"LocalistConfig.active_blocks={self.active_blocks} has a slot above max_blocks={self.max_blocks}"
            )
        bound = self.__dict__.get("_bound_model")
        if bound is not None and (self.model_type, self.num_layers) != bound:
            raise LocalistConfigError(
                f"LocalistConfig.model_type={self.model_type!r} / num_layers={self.num_layers!r} do not describe the "
                f"model this config is applied to ({bound[0]!r} with {bound[1]} attention layers): they are filled "
                "by apply_localist; for another model build a new config (cfg.copy(model_type=None, num_layers=None))"
            )
        if self.num_layers is not None and self.first_local_layer >= self.num_layers:
            raise LocalistConfigError(
                f"LocalistConfig.first_local_layer={self.first_local_layer} is not below the model's "
                f"num_layers={self.num_layers} attention layers: choose a layer in [0, {self.num_layers - 1}]"
            )

    def bind_to_model(self, model_type: str, num_layers: int) -> None:
        """Fill ``model_type`` and ``num_layers`` from the model this config is applied to and hold them there: a
        later assignment of other values raises (``apply_localist`` calls this on the model's own copy)."""
        previous = self.__dict__.get("_bound_model")
        object.__setattr__(self, "_bound_model", None)
        try:
            self.update(model_type=model_type, num_layers=num_layers)
        except LocalistConfigError:
            object.__setattr__(self, "_bound_model", previous)
            raise
        object.__setattr__(self, "_bound_model", (model_type, num_layers))

    def active_block_list(self) -> list[int]:
        """The active block slots: ``active_blocks``, else 1..len(block_names), else 1..max_blocks."""
        if self.active_blocks is not None:
            return list(self.active_blocks)
        return list(range(1, (len(self.block_names) or self.max_blocks) + 1))

    # ------------------------------------------------------------------ schedule
    def layer_alpha(self, layer: int, num_layers: int | None = None, alpha: float | None = None) -> float:
        """The dial of layer ``layer``: ``alpha_l = alpha * s(l)`` (docs/design.md section 1).

        ``alpha`` is the dial of one call (a per-call override); by default the model-wide ``self.alpha``.
        """
        num_layers = num_layers if num_layers is not None else self.num_layers
        alpha = self.alpha if alpha is None else alpha
        l0 = self.first_local_layer
        if layer < l0:
            return 0.0
        if self.schedule == "uniform" or num_layers is None:
            return alpha
        # s(l) = ((l - l0 + 1) / (L - l0)) ** beta, so s(L - 1) = 1 and s grows towards the last layer.
        return alpha * ((layer - l0 + 1) / (num_layers - l0)) ** self.schedule_power

    def layer_alphas(self, num_layers: int | None = None) -> list[float]:
        n = num_layers if num_layers is not None else self.num_layers
        if n is None:
            raise LocalistConfigError("LocalistConfig.num_layers is unset: pass num_layers or apply to a model first")
        return [self.layer_alpha(layer, n) for layer in range(n)]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if out.get("recruitment") is not None:
            out["recruitment"] = out["recruitment"].to_dict()
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> LocalistConfig:
        if not isinstance(data, dict):
            raise LocalistLoadError(f"a localist config must be a JSON object, got {type(data).__name__}")
        merged = {**data, **overrides}
        cls._reject_unknown(sorted(merged))  # every unknown name at once, each with its close match
        return cls(**merged)

    def copy(self, **overrides: Any) -> LocalistConfig:
        return self.from_dict(self.to_dict(), **overrides)

    def update(self, **fields: Any) -> None:
        """Change several fields at once, in place, validated together (e.g. block names with their ids)."""
        self._assign(fields)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> str:
        """Write ``localist_config.json`` into ``save_directory`` (atomically); optionally push it to the Hub."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise LocalistLoadError(f"save_directory={save_directory!r} is a file: pass a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, LOCALIST_CONFIG_NAME)
        atomic_write_text(path, self.to_json_string())
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory))), **{
                k: v for k, v in kwargs.items() if k in ("commit_message", "private", "token", "revision", "create_pr")
            })
        return path

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **overrides: Any) -> LocalistConfig:
        """Load a localist config.

        ``path_or_id`` may be a directory or Hub id holding ``localist_config.json`` (a localist model, or a peft
        adapter saved from one, see :mod:`hf_localist.patch.adapters`); a model directory / Hub id
        whose ``config.json`` carries a ``localist`` entry (a model saved after ``apply_localist``); or any
        model directory / Hub id with a ``config.json``, for which defaults for that architecture are built
        (the architecture must be supported). Keyword arguments override fields.
        """
        path_or_id = os.fspath(path_or_id)
        hub_kwargs = {k: overrides.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only")
                      if k in overrides}

        def fetch(name: str) -> str | None:
            if os.path.isdir(path_or_id):
                p = os.path.join(path_or_id, name)
                if os.path.lexists(p) and not os.path.isfile(p):
                    raise LocalistLoadError(f"{p!r} is not a regular file (a directory?): remove it and save the "
                                            "config again")
                return p if os.path.isfile(p) else None
            try:
                return cached_file(
                    path_or_id, name, _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False, **hub_kwargs,
                )
            except OSError:
                return None

        if os.path.isfile(path_or_id):
            return cls.from_dict(_read_json(path_or_id), **overrides)
        local = fetch(LOCALIST_CONFIG_NAME)
        if local is not None:
            return cls.from_dict(_read_json(local), **overrides)
        model_cfg = fetch("config.json")
        if model_cfg is None and os.path.isdir(path_or_id) and os.path.isfile(
                os.path.join(path_or_id, "adapter_config.json")):
            raise LocalistLoadError(
                f"{path_or_id!r} is a peft adapter directory without {LOCALIST_CONFIG_NAME}: it was saved by plain "
                "peft, from a wrapper the localist patch did not see. Add the localist files from the trained model "
                "(hf_localist.save_localist_state(model, directory)), or read the settings of the base model instead"
            )
        if model_cfg is None:
            raise LocalistLoadError(
                f"no {LOCALIST_CONFIG_NAME} or config.json found at {path_or_id!r}: pass a directory written by "
                "LocalistConfig.save_pretrained or save_pretrained of a model, or a Hub id reachable from here"
            )
        data = _read_json(model_cfg)
        if isinstance(data.get(MODEL_CONFIG_KEY), dict):
            return cls.from_dict(data[MODEL_CONFIG_KEY], **overrides)
        return cls.for_model_config(data, **overrides)

    @classmethod
    def for_model_config(cls, model_config: Any, **overrides: Any) -> LocalistConfig:
        """Defaults for a model config (a ``PreTrainedConfig`` or its dict): checks the architecture is supported.

        Accepts every architecture ``apply_localist`` accepts: a registered ``model_type``, or one whose layout
        ``apply_localist`` would detect from the model (its attention modules and AttentionInterface support), which
        is checked here on the model built from the config on the meta device (no memory, no weights)."""
        data = model_config if isinstance(model_config, dict) else model_config.to_dict()
        model_type = data.get("model_type")
        spec, num_layers = _arch_of(model_config, data)
        return cls.from_dict({"model_type": spec.model_type if model_type is None else model_type,
                              "num_layers": num_layers}, **overrides)


def _arch_of(model_config: Any, data: dict[str, Any]) -> tuple[ArchSpec, int | None]:
    """(registry entry, number of attention layers) of a model config, as ``apply_localist`` would find them."""
    model_type = data.get("model_type")
    try:
        spec = get_arch_spec(model_type)
    except UnsupportedArchitectureError as not_registered:
        model = _meta_model(model_config, data, not_registered)
        spec = get_arch_spec(model_type, model)  # the registry's error again when nothing is detected
        return spec, sum(1 for m in model.modules() if spec.is_attention_module(m))
    return spec, spec.num_layers_from_config(data)


def _meta_model(model_config: Any, data: dict[str, Any], not_registered: Exception) -> torch.nn.Module:
    """The bare model of a config, built on the meta device (shapes only: nothing allocated, nothing loaded)."""
    model_type = data.get("model_type")
    config = model_config if isinstance(model_config, PreTrainedConfig) else None
    if config is None and isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        config = CONFIG_MAPPING[model_type].from_dict(data)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{not_registered} (model_type={model_type!r} is not a transformers architecture either, so its layout "
            "cannot be detected from the config: load the model and call apply_localist(model), which detects it "
            "from the model's modules)"
        ) from not_registered
    try:
        with torch.device("meta"):
            return AutoModel.from_config(config)
    except Exception as e:  # any failure of the modeling code: detection is then impossible, say why
        raise UnsupportedArchitectureError(
            f"{not_registered} (detection from the config failed: building {type(config).__name__} on the meta "
            f"device raised {type(e).__name__}: {e}; load the model and call apply_localist(model) instead)"
        ) from e


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as e:
        raise LocalistLoadError(f"localist config file {path!r} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LocalistLoadError(
            f"{path!r} is not valid JSON ({type(e).__name__}: {e}): the file is corrupt; re-save it with "
            "LocalistConfig.save_pretrained"
        ) from None
    except OSError as e:
        raise LocalistLoadError(f"cannot read the localist config file {path!r} ({e})") from e
    if not isinstance(data, dict):
        raise LocalistLoadError(f"{path!r} must hold a JSON object, got {type(data).__name__}")
    return data
