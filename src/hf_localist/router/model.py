"""``LocalistRouterModel``: hierarchical recruitment over a base and specialist checkpoints (docs/design.md section 7).

A base causal LM, specialists that are full checkpoints or peft adapters on the base, and a router: a small
classifier (linear or 1-hidden-layer MLP, the model's only parameters) on the base's last hidden states, mean-pooled
over the non-padding tokens (standardised by saved feature statistics). Routing modes:

- ``hard``: the argmax specialist alone runs on each input; ``logits`` are that specialist's own logits;
- ``soft``: the next-token distribution is the mixture ``sum_m pi_m p_m``; ``logits`` are its log-probabilities
  ``logsumexp_m(log pi_m + log p_m)`` (so ``softmax(logits)`` is the mixture);
- ``top_k``: the same over the ``routing_k`` most probable specialists, with ``pi`` renormalised over them.

Specialists load lazily and are cached (least recently used ones are released past ``max_loaded_specialists``);
adapter specialists share the one base model (peft multi-adapter), which also computes the routing features
with its adapters disabled. Only the router's parameters require gradients: a ``Trainer`` on the mixture loss
(soft / top_k) trains the router; specialists are trained on their own.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForCausalLMLoss

from ..errors import LocalistConfigError, LocalistError, LocalistLoadError
from ..savedir import verify_directory
from . import config as rc
from . import store as rs
from .confidence import BASE, calibrate_confidence
from .config import (
    LocalistRouterConfig,
    LocalistRouterGenerateOutput,
    LocalistRouterOutput,
    RoutingDecision,
    resolve_entry_path,
)
from .generate import generate_hard, generate_mixture, prepare_generation, to_left_padding
from .loading import open_specialists, router_config
from .mixture import mixture_log_probs
from .recruit import domain_entropy, fit_router, init_router_from_prompts, recruit_specialist

logger = logging.getLogger(__name__)

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


class LocalistRouterModel(PreTrainedModel):
    """A router over a base causal LM and domain specialists. Build with :meth:`from_specialists`, fit with
    :meth:`fit_router` or :meth:`init_router_from_prompts`, save / load / push like any Hugging Face model."""

    config_class = LocalistRouterConfig
    base_model_prefix = "localist_router"
    main_input_name = "input_ids"
    accepts_loss_kwargs = True

    def __init__(self, config: LocalistRouterConfig):
        super().__init__(config)
        if not config.hidden_size or not config.specialists:
            raise LocalistConfigError("a LocalistRouterConfig needs hidden_size and at least one specialist: build "
                                      "the router with LocalistRouterModel.from_specialists(base, specialists)")
        self.router = self._make_head(len(config.specialists))
        self.register_buffer("feature_mean", torch.zeros(config.hidden_size))
        self.register_buffer("feature_scale", torch.ones(config.hidden_size))
        self.register_buffer("router_fitted", torch.zeros((), dtype=torch.uint8))
        self._pool: rs.SpecialistPool | None = None
        self._root: str | None = None
        self.tokenizer = None
        self.post_init()

    def _make_head(self, n_out: int) -> nn.Module:
        h, hid = self.config.hidden_size, self.config.router_hidden_size
        if hid:
            return nn.Sequential(nn.Linear(h, hid), nn.GELU(), nn.Linear(hid, n_out))
        return nn.Linear(h, n_out)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.zeros_(self.feature_mean)
            init.ones_(self.feature_scale)
            init.zeros_(self.router_fitted)

    @property
    def output_layer(self) -> nn.Linear:
        return self.router[-1] if isinstance(self.router, nn.Sequential) else self.router

    # ------------------------------------------------------------------ construction and loading
    @classmethod
    def from_specialists(cls, base: str | os.PathLike, specialists: dict[str, Any], routing: str = "hard", *,
                         tokenizer: Any = None, model_kwargs: dict | None = None,
                         **config_kwargs: Any) -> "LocalistRouterModel":
        """A router over ``base`` (directory or Hub id) and ``specialists`` ({name: directory or Hub id, or
        {"path": ..., "recruitment": {...}}}); full checkpoints and peft adapters (adapter_config.json) are told
        apart by their files. ``config_kwargs`` set other LocalistRouterConfig fields (routing_k, ...);
        ``model_kwargs`` go to ``from_pretrained`` of the base and of full specialists (dtype, device_map, ...;
        the router moves to the base's device)."""
        config = router_config(base, specialists, routing, config_kwargs)
        model = cls(config)
        model._attach(None, tokenizer, model_kwargs)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        tokenizer: Any = None, model_kwargs: dict | None = None,
                        allow_local_references: bool = False, **kwargs: Any) -> "LocalistRouterModel":
        """Load a router saved by :meth:`save_pretrained` (a directory or a Hub repo) with its specialists.
        Router settings (``routing``, ``routing_k``, ``max_loaded_specialists``, ...) may be overridden by keyword.

        A saved config can name any local directory as a ``reference`` (the default of ``save_pretrained``): such
        entries load only with ``allow_local_references=True`` (you trust the directory the router came from), and
        never for a router fetched from the Hub. References to Hub ids and copies inside the router directory
        (``copy_specialists=True``) need no opt-in."""
        path = os.fspath(pretrained_model_name_or_path)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        fetched = not os.path.isdir(path)
        if not fetched:
            root = path
            verify_directory(root)  # a killed or tampered save is refused naming the file (savedir.py)
        elif os.path.isabs(path) or path.startswith("."):
            raise LocalistLoadError(f"no saved router at {path!r}: the directory does not exist")
        else:
            try:
                root = snapshot_download(path, **hub)
            except Exception as e:  # noqa: BLE001
                raise LocalistLoadError(f"cannot fetch the router repo {path!r} ({type(e).__name__}: {e}); the Hub "
                                        "is unreachable from here, or the repo does not exist") from e
        raw = rc.read_json(os.path.join(root, "config.json"), f"router {path!r}")
        if raw.get("model_type") != LocalistRouterConfig.model_type:
            raise LocalistLoadError(f"{path!r} is a {raw.get('model_type')!r} checkpoint, not a LocalistRouterModel "
                                    f"(model_type {LocalistRouterConfig.model_type!r})")
        config = kwargs.pop("config", None)
        if not isinstance(config, LocalistRouterConfig):
            config = LocalistRouterConfig.from_pretrained(root)
        for key in [k for k in kwargs if k in rc.OVERRIDABLE]:  # e.g. routing="soft", max_loaded_specialists=2
            setattr(config, key, kwargs.pop(key))
        # Refuse escaping paths (and, unless allowed, references to local directories) before any weight is read.
        rc.check_entry_paths(config, root, path, fetched, allow_local_references)
        kwargs.pop("use_safetensors", None)
        try:
            model = super().from_pretrained(root, *model_args, config=config, use_safetensors=True, **kwargs)
        except LocalistError:
            raise
        except Exception as e:  # noqa: BLE001
            raise LocalistLoadError(f"cannot load the router weights of {path!r} ({type(e).__name__}: {e})") from e
        model._attach(root, tokenizer, model_kwargs)
        return model

    def _attach(self, root: str | None, tokenizer: Any, model_kwargs: dict | None = None) -> None:
        """Load the base, check every specialist's files against it, set up the lazy specialist pool."""
        self._root = root
        self._pool, base_loc = open_specialists(self.config, root, model_kwargs)
        base = self._pool.base
        if self.feature_mean.device.type != "meta" and self.feature_mean.device != base.device:
            self.to(base.device)
        self.tokenizer = tokenizer if tokenizer is not None else rs.find_tokenizer(root, base_loc)
        if self.router_fitted.device.type != "meta" and not int(self.router_fitted):
            logger.info("router not fitted yet: call fit_router(...) or init_router_from_prompts(...)")

    # ------------------------------------------------------------------ specialists
    @property
    def specialist_names(self) -> list[str]:
        return self.config.specialist_names

    @property
    def base_model_loaded(self) -> nn.Module:
        return self._pool.base

    def base_only(self):
        """Context manager yielding the base model with every adapter disabled (the model the router reads)."""
        return self._pool.base_only()

    @property
    def loaded_specialists(self) -> list[str]:
        """Names of the specialists in memory, least recently used first."""
        return list(self._pool.loaded)

    def get_specialist(self, name: str) -> nn.Module:
        """The specialist ``name`` as a callable causal LM (for an adapter: the shared base with it active)."""
        self._index_of(name)
        return self._pool.get(name)

    def load_specialists(self, names: Sequence[str] | None = None) -> None:
        """Load (and so fully check) the given specialists now, instead of on first use."""
        for name in names or self.specialist_names:
            self.get_specialist(name)

    def _specialist_at(self, m: int) -> nn.Module:
        """Specialist ``m`` as a callable causal LM; ``BASE`` (-1, a below-threshold input): the base alone."""
        return rs.BaseOnly(self._pool) if m == BASE else self._pool.get(self.specialist_names[m])

    def _index_of(self, name: Any) -> int:
        names = self.specialist_names
        if isinstance(name, str):
            if name not in names:
                raise LocalistConfigError(f"unknown specialist {name!r}; the router has {names}")
            return names.index(name)
        if isinstance(name, bool) or not isinstance(name, int) or not 0 <= name < len(names):
            raise LocalistConfigError(f"specialist index {name!r} is out of range for {len(names)} specialists {names}")
        return int(name)

    def add_specialist(self, name: str, path: str | os.PathLike, recruitment: dict | None = None,
                       init_row: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add a specialist; the router's output layer grows by one row (``init_row``: its (weight, bias), else a
        row that never wins until the router is refit)."""
        rc.check_name(name)
        if name in self.specialist_names:
            raise LocalistConfigError(f"specialist {name!r} already exists")
        loc = resolve_entry_path(None, f"specialist {name!r}", os.fspath(path), "reference")
        kind = rc.detect_kind(loc, f"specialist {name!r}")
        rs.check_specialist(name, loc, kind, self._pool.base)
        old = self.output_layer
        new = nn.Linear(old.in_features, old.out_features + 1).to(old.weight)
        with torch.no_grad():
            new.weight[:-1], new.bias[:-1] = old.weight, old.bias
            w, b = init_row if init_row is not None else (torch.zeros(old.in_features), old.bias.min() - 20.0)
            new.weight[-1], new.bias[-1] = w, b
        if isinstance(self.router, nn.Sequential):
            self.router[-1] = new
        else:
            self.router = new
        self.config.specialists = {**self.config.specialists, name: {
            "path": loc, "kind": kind, "source": "reference", "recruitment": recruitment or {"method": "given"}}}
        self._pool.paths[name], self._pool.kinds[name] = loc, kind

    # ------------------------------------------------------------------ routing
    def _prepare(self, input_ids, attention_mask, position_ids):
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise LocalistConfigError(f"input_ids must be a (batch, seq) tensor, got {type(input_ids).__name__} "
                                      f"{tuple(getattr(input_ids, 'shape', ()))}")
        device = self._pool.base.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        if position_ids is None and not bool(mask.bool().all()):  # left padding: count positions from the first token
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return input_ids, mask, position_ids

    def pooled_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H) mean over non-padding tokens of the base's last hidden states (adapters disabled)."""
        input_ids, mask, position_ids = self._prepare(input_ids, attention_mask, position_ids)
        n = self.config.max_router_tokens
        ids, mask = input_ids[:, :n], mask[:, :n]
        kw = {} if position_ids is None else {"position_ids": position_ids[:, :n]}
        with torch.no_grad(), self._pool.base_only() as base:
            backbone = getattr(base, base.base_model_prefix, base)
            if getattr(base, "localist_handle", None) is None:
                h = backbone(input_ids=ids, attention_mask=mask, use_cache=False, **kw).last_hidden_state.float()
            else:  # a localist base computes its blocks in its own (outer) forward: run it, read the backbone's output
                seen = []
                hook = backbone.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state))
                try:
                    base(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
                finally:
                    hook.remove()
                h = seen[-1].float()
        m = mask[..., None].float()
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def router_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.feature_mean) - self.feature_mean) / self.feature_scale
        return self.router(x.to(self.output_layer.weight.dtype)).float()

    def _mode(self, routing: str | None, routing_k: int | None) -> tuple[str, int]:
        mode = self.config.routing if routing is None else routing
        rc._CHECKS["routing"](mode)
        k = self.config.routing_k if routing_k is None else routing_k
        rc._CHECKS["routing_k"](k)
        return mode, min(k, len(self.specialist_names))

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, routing: str | None = None,
              routing_k: int | None = None, route_to: Any = None, router_probs: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, confidence_threshold: float | None = None) -> RoutingDecision:
        """The routing decision for each input (logged at INFO). ``route_to``: force one specialist per input
        (names or indices; oracle routing). ``router_probs`` (B, M): use these probabilities instead of the router.
        ``confidence_threshold`` (hard mode; default ``config.confidence_threshold``): inputs whose top probability
        is below it get ``chosen = BASE`` (-1) and run on the base alone."""
        mode, k = self._mode(routing, routing_k)
        m = len(self.specialist_names)
        if router_probs is not None:
            if not torch.is_tensor(router_probs) or router_probs.shape != (input_ids.shape[0], m):
                shape = tuple(getattr(router_probs, "shape", ()))
                raise LocalistConfigError(f"router_probs has shape {shape}, expected {(input_ids.shape[0], m)} "
                                          "(batch, specialists)")
            probs_in = router_probs.float()
            if not bool(torch.isfinite(probs_in).all()) or bool((probs_in < 0).any()) \
                    or bool((probs_in.sum(-1) <= 0).any()):
                raise LocalistConfigError(
                    "router_probs must be finite and >= 0 with a positive sum per input (they are renormalised); got "
                    f"{router_probs.tolist() if router_probs.numel() <= 16 else 'NaN, infinite or negative values'}")
            logits = probs_in.clamp_min(torch.finfo(torch.float32).tiny).log()
        else:
            logits = self.router_logits_from_features(self.pooled_features(input_ids, attention_mask, position_ids))
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        entropy = torch.special.entr(probs).sum(-1)
        if route_to is not None:
            targets = route_to.tolist() if torch.is_tensor(route_to) else list(route_to)
            if len(targets) != input_ids.shape[0]:
                raise LocalistConfigError(f"route_to has {len(targets)} entries for a batch of {input_ids.shape[0]}")
            mode = "hard"
            chosen = torch.tensor([[self._index_of(t)] for t in targets], device=logits.device)
            log_w = torch.zeros(chosen.shape, device=logits.device)
        elif mode == "hard":
            chosen = logits.argmax(-1, keepdim=True)
            tau = self.config.confidence_threshold if confidence_threshold is None else \
                rc._CHECKS["confidence_threshold"](confidence_threshold)
            if tau > 0:  # not confident enough for any specialist: the base model answers
                chosen = chosen.masked_fill(probs.max(-1, keepdim=True).values < tau, BASE)
            log_w = torch.zeros(chosen.shape, device=logits.device)
        else:
            top = logits.topk(m if mode == "soft" else k, dim=-1)
            chosen = top.indices
            log_w = log_probs.gather(-1, chosen) if mode == "soft" else top.values.log_softmax(-1)
        decision = RoutingDecision(mode, logits, probs, chosen, log_w, entropy)
        self._log_decision(decision)
        return decision

    def _log_decision(self, d: RoutingDecision) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        names = {i: n for i, n in enumerate(self.specialist_names)} | {BASE: "base"}
        rows = [", ".join(f"{names[c]}:{w:.3f}" for c, w in zip(cs, ws)) + f" (H_domain {h:.3f})"
                for cs, ws, h in zip(d.chosen.tolist(), d.log_weights.exp().tolist(), d.domain_entropy.tolist())]
        logger.info("routing (%s) of %d input(s): %s", d.mode, len(rows), " | ".join(rows))

    # ------------------------------------------------------------------ forward
    def _run(self, m: int, ids, mask, pos, **kwargs) -> torch.Tensor:
        model = self._specialist_at(m)
        extra = {} if pos is None else {"position_ids": pos}
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False, **extra, **kwargs).logits

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, routing: str | None = None, routing_k: int | None = None,
                route_to: Any = None, router_probs: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, confidence_threshold: float | None = None,
                num_items_in_batch: Any = None,
                return_dict: bool | None = None, **kwargs: Any) -> LocalistRouterOutput:
        """Route each input, run the chosen specialist(s), mix. ``loss`` (with ``labels``): causal-LM NLL of the
        mixture (of the chosen specialist in hard mode), normalised by ``num_items_in_batch`` when given."""
        input_ids, mask, position_ids = self._prepare(input_ids, attention_mask, position_ids)
        d = self.route(input_ids, mask, routing=routing, routing_k=routing_k, route_to=route_to,
                       router_probs=router_probs, position_ids=position_ids,
                       confidence_threshold=confidence_threshold)
        logits = self._mix(d, input_ids, mask, position_ids, **kwargs)
        loss = None
        if labels is not None:
            if self.training and d.mode == "hard" and not getattr(self, "_warned_hard", False):
                self._warned_hard = True
                logger.warning("hard routing: the loss is the chosen specialist's NLL and does not depend on the "
                               "router (no gradient); train the router with routing='soft' or 'top_k'")
            loss = ForCausalLMLoss(logits, labels.to(logits.device), vocab_size=logits.shape[-1],
                                   num_items_in_batch=num_items_in_batch)
        return LocalistRouterOutput(loss=loss, logits=logits, router_logits=d.router_logits,
                                    router_probs=d.router_probs, chosen=d.chosen,
                                    routing_weights=d.log_weights.exp(), domain_entropy=d.domain_entropy)

    def _mix(self, d: RoutingDecision, ids, mask, pos, **kwargs) -> torch.Tensor:
        def sub(t, idx):
            return None if t is None else t[idx]

        if d.mode != "hard":
            return mixture_log_probs(d.chosen, d.log_weights,
                                     lambda m, rows: self._run(m, ids[rows], mask[rows], sub(pos, rows), **kwargs))
        out = None
        for m in d.chosen[:, 0].unique().tolist():  # one specialist at a time: no need to hold them all in memory
            idx = (d.chosen[:, 0] == m).nonzero().squeeze(1)
            lg = self._run(m, ids[idx], mask[idx], sub(pos, idx), **kwargs)
            out = lg.new_empty((ids.shape[0],) + lg.shape[1:]) if out is None else out
            out[idx] = lg
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 routing: str | None = None, routing_k: int | None = None, route_to: Any = None,
                 router_probs: torch.Tensor | None = None, return_dict_in_generate: bool = False,
                 confidence_threshold: float | None = None, **gen_kwargs: Any):
        """Route once on the prompt, then decode in transformers' own ``generate`` (right-padded prompts are moved
        to left padding first, so the returned prompts are left-padded). hard: each group of inputs runs its
        specialist's own ``generate``; soft / top_k: ``generate`` on the mixture of the routed specialists (one KV
        cache each; the mixture's log-probabilities are the logits that transformers' processors see). Takes
        ``generation_config=`` and transformers' generation arguments (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``,
        ``eos_token_id``, ``logits_processor``, ``stopping_criteria``, ``streamer``, ...); defaults: greedy, 20 new
        tokens, the base's special tokens. A mixture refuses a cache object, a static ``cache_implementation`` and
        model arguments; every mode ``output_attentions`` / ``output_hidden_states`` (LocalistConfigError naming
        them). Returns the sequences (B * returned sequences per input, prompt + new), or a
        LocalistRouterGenerateOutput (with ``scores`` / ``logits`` when asked for)."""
        mode = "hard" if route_to is not None else self._mode(routing, routing_k)[0]
        call = prepare_generation(mode, self._pool.base, gen_kwargs, return_dict_in_generate)
        ids, mask = to_left_padding(*self._prepare(input_ids, attention_mask, None)[:2])  # returned left-padded
        ids, mask, pos = self._prepare(ids, mask, None)  # positions of the left-padded layout
        d = self.route(ids, mask, routing=routing, routing_k=routing_k, route_to=route_to, router_probs=router_probs,
                       position_ids=pos, confidence_threshold=confidence_threshold)
        used = d.chosen.unique().tolist()
        with self._pool.pinned([self.specialist_names[m] for m in used if m != BASE]):
            if d.mode == "hard":
                out = generate_hard(self._specialist_at, d, ids, mask, call)
            else:
                out = generate_mixture(self._specialist_at, d, ids, mask, call, self._pool.base,
                                       self.config.vocab_size)
        if call.config.return_dict_in_generate:
            return LocalistRouterGenerateOutput(sequences=out.sequences, router_probs=d.router_probs, chosen=d.chosen,
                                                domain_entropy=d.domain_entropy, scores=out.scores, logits=out.logits)
        return out.sequences

    # ------------------------------------------------------------------ fitting and recruitment
    def fit_router(self, dataset: Any, **kwargs: Any) -> dict[str, Any]:
        """Fit the router on domain-labelled data (see :func:`hf_localist.router.recruit.fit_router`)."""
        return fit_router(self, dataset, **kwargs)

    def calibrate_confidence(self, data: Any, **kwargs: Any) -> dict[str, Any]:
        """Set ``config.confidence_threshold`` from labelled data (see
        :func:`hf_localist.router.confidence.calibrate_confidence`)."""
        return calibrate_confidence(self, data, **kwargs)

    def init_router_from_prompts(self, prompts: dict[str, Sequence[Any]], **kwargs: Any) -> dict[str, Any]:
        """Initialise the router from a few example prompts per specialist (class-mean prototypes)."""
        return init_router_from_prompts(self, prompts, **kwargs)

    def domain_entropy(self, data: Any, **kwargs: Any) -> torch.Tensor:
        """H_domain (nats) of each input of ``data`` (texts or token id lists)."""
        return domain_entropy(self, data, **kwargs)

    def recruit_specialist(self, data: Any, **kwargs: Any):
        """LLM-level recruitment (see :func:`hf_localist.router.recruit.recruit_specialist`)."""
        return recruit_specialist(self, data, **kwargs)

    # ------------------------------------------------------------------ saving and the Hub
    def save_pretrained(self, save_directory: str | os.PathLike, *, copy_specialists: bool = False,
                        **kwargs: Any) -> None:
        """Write config.json and the router weights (safetensors) atomically. Specialists (and the base) are
        saved as references (absolute paths / Hub ids), or copied into ``specialists/<name>/`` and ``base/`` with
        ``copy_specialists=True`` (a self-contained directory)."""
        if kwargs.pop("push_to_hub", False):
            raise LocalistConfigError("use router.push_to_hub(repo_id): it pushes the router and every specialist")
        rs.save_router(self, os.fspath(save_directory), copy_specialists,
                       lambda tmp: PreTrainedModel.save_pretrained(self, tmp, **kwargs))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: Any = None,
                    commit_message: str | None = None, create_pr: bool = False, revision: str | None = None,
                    push_base: bool | None = None, specialist_repo: str = "{repo_id}-{name}") -> dict[str, Any]:
        """Push every specialist held locally to its own repo (``specialist_repo`` formatted with repo_id and
        name; a model card each), the base to ``{repo_id}-base`` when it is local (``push_base``), then the router
        (config pointing at those repos, weights, tokenizer, model card). Returns {repo: commit} per push."""
        return rs.push_router(self, repo_id, private=private, token=token, commit_message=commit_message,
                              create_pr=create_pr, revision=revision, push_base=push_base,
                              specialist_repo=specialist_repo)


try:
    AutoConfig.register(LocalistRouterConfig.model_type, LocalistRouterConfig, exist_ok=True)
    AutoModel.register(LocalistRouterConfig, LocalistRouterModel, exist_ok=True)
    AutoModelForCausalLM.register(LocalistRouterConfig, LocalistRouterModel, exist_ok=True)
except ValueError as e:  # pragma: no cover - another class already holds the key
    logger.warning("could not register LocalistRouterModel with the Auto classes: %s", e)
