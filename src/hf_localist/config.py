"""`LocalistConfig`: every setting of the localist plugin, typed, validated, with help text per field.

The config is a dataclass. Every field carries its help text in ``metadata["help"]`` (so ``HfArgumentParser``
can build a command line from it) and is validated on construction *and* on every later assignment, so
``cfg.alpha = 2`` raises at once, naming the field. It saves as ``localist_config.json`` (atomically),
loads from such a file, from a model's ``config.json`` that carries a ``localist`` entry, or from any model
directory / Hub id (then it builds defaults for that architecture), and pushes to the Hub through
transformers' ``PushToHubMixin``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import PushToHubMixin

from .errors import LocalistConfigError, LocalistLoadError
from .utils import atomic_write_text

LOCALIST_CONFIG_NAME = "localist_config.json"
#: Attribute of a model's ``PreTrainedConfig`` that carries the localist settings (saved in ``config.json``).
MODEL_CONFIG_KEY = "localist"

SCHEDULES = ("uniform", "progressive")
BACKENDS = ("auto", "dense", "segment", "flex")
BLOCK_ASSIGNMENTS = ("segment", "explicit", "centroid")
PENALTIES = ("none", "loss", "prox")
LAMBDA_MODES = ("fixed", "threshold")
SUBSPACES = ("coordinate", "pca")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class LocalistConfig(PushToHubMixin):
    """Settings of localist attention (see DESIGN.md sections 1-3).

    Example::

        cfg = LocalistConfig(alpha=0.8, schedule="progressive", schedule_power=3, first_local_layer=2)
        handle = apply_localist(model, cfg)
    """

    alpha: float = field(
        default=1.0,
        metadata=_help(
            "The locality dial in [0, 1]. 0 = the unmodified (distributed) model; 1 = fully localist (hard block "
            "mask). A query in block b >= 1 gets log(1 - alpha_l) added to its logits on keys of other blocks."
        ),
    )
    schedule: str = field(
        default="uniform",
        metadata=_help(
            "Per-layer dial alpha_l = alpha * s(l). 'uniform': s = 1 on every layer >= first_local_layer. "
            "'progressive': s = ((l - l0 + 1) / (L - l0)) ** schedule_power for l >= l0, else 0."
        ),
    )
    schedule_power: float = field(
        default=3.0, metadata=_help("The exponent beta of the progressive schedule (> 0; the papers use 1, 3, 5).")
    )
    first_local_layer: int = field(
        default=0, metadata=_help("l0: the first localised layer (0-based). Layers before it are never biased.")
    )
    backend: str = field(
        default="auto",
        metadata=_help(
            "'dense' (reference, additive float mask; returns attention weights), 'segment' (hard mode, block-sparse "
            "work, trainable on CPU and GPU), 'flex' (hard mode with flex_attention: CUDA, or CPU without grad), "
            "'auto' (sdpa pass-through where alpha_l = 0, segment/flex for hard layers, dense for soft layers)."
        ),
    )
    block_assignment: str = field(
        default="segment",
        metadata=_help(
            "'segment': block ids come from anchor tokens <blk_NAME> in input_ids (<blk_general> returns to block 0); "
            "'explicit': pass block_ids of shape (batch, seq) to forward."
        ),
    )
    max_blocks: int = field(
        default=16, metadata=_help("Number of block slots 1..max_blocks (block 0 is the general block).")
    )
    beta_anchor: float = field(
        default=0.0,
        metadata=_help("Anchor bonus: alpha_l * beta_anchor is added to the logits of the query's own anchors (>= 0)."),
    )
    block_names: list[str] = field(
        default_factory=list, metadata=_help("Names of blocks 1..n, in order (set by add_block_tokens).")
    )
    anchor_token_ids: list[int] = field(
        default_factory=list,
        metadata=_help("Token id of the anchor <blk_NAME> of block i+1, for segment assignment (set by add_block_tokens)."),
    )
    general_token_id: int | None = field(
        default=None, metadata=_help("Token id of <blk_general>, which returns to block 0 (segment assignment).")
    )
    assign_threshold: float = field(
        default=0.5,
        metadata=_help("Centroid assignment: a position joins the nearest enabled block when the cosine similarity of its "
                       "hidden state (input of layer first_local_layer) to that block's centroid is >= this, in [-1, 1]."),
    )
    recruitment: Any = field(
        default=None,
        metadata=_help("Block recruitment settings (a RecruitmentConfig or its dict); None disables recruitment."),
    )
    flex_compile: bool = field(
        default=True,
        metadata=_help("Compile flex_attention with torch.compile (fast kernel; the first call takes seconds)."),
    )
    # ---- training-time locality (DESIGN.md section 4)
    penalty: str = field(
        default="none",
        metadata=_help(
            "Group-lasso penalty on Q/K head slices: 'none', 'loss' (the forward adds localist_loss_coef * penalty "
            "to outputs.loss in training mode), or 'prox' (LocalistCallback applies the proximal step after each "
            "optimizer step: exact zeros)."
        ),
    )
    lambda_mode: str = field(
        default="fixed",
        metadata=_help("'fixed': lambda = penalty_lambda; 'threshold': lambda = alpha_train * kappa * lambda_threshold "
                       "per (layer, head, block), from estimate_constants(...).threshold()."),
    )
    penalty_lambda: float = field(default=1e-3, metadata=_help("The fixed group-lasso weight lambda (>= 0)."))
    alpha_train: float = field(
        default=1.0, metadata=_help("Training-time locality in [0, 1] scaling the threshold lambda (lambda_mode='threshold').")
    )
    kappa: float = field(default=1.5, metadata=_help("Safety factor (> 0) on lambda_threshold; the papers suggest 1.5-2."))
    localist_loss_coef: float = field(
        default=1.0, metadata=_help("Weight (>= 0) of the penalty added to outputs.loss when penalty='loss'.")
    )
    general_head_fraction: float = field(
        default=0.25, metadata=_help("Fraction in [0, 1) of query heads per layer that stay general (never penalised).")
    )
    subspace: str = field(
        default="coordinate",
        metadata=_help("Block feature subspaces U_i: 'coordinate' (fixed coordinate groups, for models trained from "
                       "scratch) or 'pca' (top-r principal directions from calibrate_subspaces, for pretrained models)."),
    )
    subspace_rank: int | None = field(
        default=None, metadata=_help("r, the rank of each block subspace; default hidden_size // (n_active_blocks + 1).")
    )
    active_blocks: list[int] | None = field(
        default=None,
        metadata=_help("Block slots that are active (have heads and subspaces); default 1..len(block_names), or "
                       "1..max_blocks when no names are set."),
    )
    model_type: str | None = field(
        default=None, metadata=_help("model_type of the model this config was built for (filled by apply_localist).")
    )
    num_layers: int | None = field(
        default=None, metadata=_help("Number of attention layers of that model (filled by apply_localist).")
    )

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self._initialised = True
        for f in dataclasses.fields(self):
            self._validate_field(f.name, getattr(self, f.name))
        self._validate_consistency()

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_initialised", False) and name in self._field_names():
            previous = getattr(self, name)
            try:
                value = self._validate_field(name, value)
                object.__setattr__(self, name, value)
                self._validate_consistency()
            except LocalistConfigError:
                object.__setattr__(self, name, previous)  # a rejected assignment leaves the config unchanged
                raise
            return
        object.__setattr__(self, name, value)

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def _validate_field(self, name: str, value: Any) -> Any:
        def bad(why: str) -> LocalistConfigError:
            return LocalistConfigError(f"LocalistConfig.{name}={value!r} is invalid: {why}")

        if name == "recruitment":
            if value is None:
                return value
            from .recruitment_config import RecruitmentConfig

            if isinstance(value, dict):
                value = RecruitmentConfig.from_dict(value)
            if not isinstance(value, RecruitmentConfig):
                raise bad("expected a RecruitmentConfig, its dict, or None")
            object.__setattr__(self, name, value)
            return value
        if name == "assign_threshold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise bad("expected a cosine similarity in [-1, 1]")
            object.__setattr__(self, name, float(value))
            return float(value)
        if name in ("alpha", "beta_anchor", "schedule_power", "penalty_lambda", "alpha_train", "kappa",
                    "localist_loss_coef", "general_head_fraction"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad("expected a finite number")
            if name == "alpha" and not 0.0 <= value <= 1.0:
                raise bad("the dial must lie in [0, 1] (0 = unmodified model, 1 = hard block mask)")
            if name == "beta_anchor" and value < 0:
                raise bad("the anchor bonus must be >= 0")
            if name == "schedule_power" and value <= 0:
                raise bad("the progressive schedule exponent must be > 0 (the papers use 1, 3 or 5)")
            if name in ("penalty_lambda", "localist_loss_coef") and value < 0:
                raise bad("must be >= 0")
            if name == "alpha_train" and not 0.0 <= value <= 1.0:
                raise bad("must lie in [0, 1]")
            if name == "kappa" and value <= 0:
                raise bad("the safety factor must be > 0 (the papers suggest 1.5-2)")
            if name == "general_head_fraction" and not 0.0 <= value < 1.0:
                raise bad("must lie in [0, 1): at least one head per layer must take a block")
            object.__setattr__(self, name, float(value))
            return float(value)
        choices = {"schedule": SCHEDULES, "backend": BACKENDS, "block_assignment": BLOCK_ASSIGNMENTS,
                   "penalty": PENALTIES, "lambda_mode": LAMBDA_MODES, "subspace": SUBSPACES}
        if name in choices:
            if value not in choices[name]:
                raise bad(f"choose one of {list(choices[name])}")
            return value
        if name in ("first_local_layer", "max_blocks", "num_layers", "general_token_id"):
            if value is None and name in ("num_layers", "general_token_id"):
                return value
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("expected an integer")
            if name == "max_blocks" and value < 1:
                raise bad("need at least one block slot")
            if value < 0:
                raise bad("must be >= 0")
            return value
        if name == "block_names":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise bad("expected a list of non-empty strings")
            if len(set(value)) != len(value):
                raise bad("block names must be unique")
            object.__setattr__(self, name, list(value))
            return list(value)
        if name == "subspace_rank":
            if value is None:
                return value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad("expected a positive integer (or null for the default)")
            return value
        if name == "active_blocks":
            if value is None:
                return value
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
            ) or len(set(value)) != len(value):
                raise bad("expected a list of distinct block slots >= 1 (block 0 is the general block)")
            object.__setattr__(self, name, sorted(value))
            return sorted(value)
        if name == "anchor_token_ids":
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise bad("expected a list of non-negative token ids")
            object.__setattr__(self, name, list(value))
            return list(value)
        if name == "flex_compile":
            if not isinstance(value, bool):
                raise bad("expected true or false")
            return value
        if name == "model_type":
            if value is not None and not isinstance(value, str):
                raise bad("expected a string")
            return value
        return value

    def _validate_consistency(self) -> None:
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
        if self.num_layers is not None and self.first_local_layer >= self.num_layers:
            raise LocalistConfigError(
                f"LocalistConfig.first_local_layer={self.first_local_layer} is not below the model's "
                f"num_layers={self.num_layers} attention layers: choose a layer in [0, {self.num_layers - 1}]"
            )

    def active_block_list(self) -> list[int]:
        """The active block slots: ``active_blocks``, else 1..len(block_names), else 1..max_blocks."""
        if self.active_blocks is not None:
            return list(self.active_blocks)
        return list(range(1, (len(self.block_names) or self.max_blocks) + 1))

    # ------------------------------------------------------------------ schedule
    def layer_alpha(self, layer: int, num_layers: int | None = None, alpha: float | None = None) -> float:
        """The dial of layer ``layer``: ``alpha_l = alpha * s(l)`` (DESIGN.md section 1).

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
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
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
        unknown = sorted(set(merged) - cls._field_names())
        if unknown:
            raise LocalistConfigError(
                f"unknown LocalistConfig field(s) {unknown}; known fields: {sorted(cls._field_names())}"
            )
        return cls(**merged)

    def copy(self, **overrides: Any) -> LocalistConfig:
        return self.from_dict(self.to_dict(), **overrides)

    def update(self, **fields: Any) -> None:
        """Change several fields at once, in place, validated together (e.g. block names with their ids)."""
        new = self.copy(**fields)
        for k in self._field_names():  # the validated values (to_dict() would turn a RecruitmentConfig into a dict)
            object.__setattr__(self, k, getattr(new, k))

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

        ``path_or_id`` may be a directory or Hub id holding ``localist_config.json``; a model directory / Hub id
        whose ``config.json`` carries a ``localist`` entry (a model saved after ``apply_localist``); or any
        model directory / Hub id with a ``config.json``, for which defaults for that architecture are built
        (the architecture must be supported). Keyword arguments override fields.
        """
        from transformers.utils import cached_file

        path_or_id = os.fspath(path_or_id)
        hub_kwargs = {k: overrides.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in overrides}

        def fetch(name: str) -> str | None:
            if os.path.isdir(path_or_id):
                p = os.path.join(path_or_id, name)
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
        """Defaults for a model config (a ``PreTrainedConfig`` or its dict): checks the architecture is supported."""
        from .registry import get_arch_spec

        data = model_config if isinstance(model_config, dict) else model_config.to_dict()
        model_type = data.get("model_type")
        spec = get_arch_spec(model_type)
        num_layers = spec.num_layers_from_config(data)
        return cls.from_dict({"model_type": model_type, "num_layers": num_layers}, **overrides)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as e:
        raise LocalistLoadError(f"localist config file {path!r} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalistLoadError(
            f"{path!r} is not valid JSON ({e}): the file is corrupt; re-save it with LocalistConfig.save_pretrained"
        ) from e
    if not isinstance(data, dict):
        raise LocalistLoadError(f"{path!r} must hold a JSON object, got {type(data).__name__}")
    return data
