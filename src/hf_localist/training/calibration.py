"""``estimate_constants``: measure every constant of the theory on calibration batches (docs/design.md section 5).

Measured per localised layer ``l`` (and head ``h`` / block ``i`` where it varies):

- ``tau``: ``1 / scaling`` of the layer;
- ``delta``: per query and head, min anchor logit minus max logit outside the anchors, on the raw logits
  ``z = q.k`` (before temperature and before the localist bias), anchors = the visible anchors of the query's
  target block, sink excluded; reported as min / p5 / median over queries;
- ``R_x``: p99 of ``||x||`` over tokens, ``x`` the input of the Q/K projections;
- ``sigma_X``: largest singular value of block ``i``'s centred inputs divided by ``sqrt(|X_i|)``;
- ``rho_max``: largest ``||U_i^T U_j||_2`` over active blocks ``i != j``;
- ``L_l``: p99 over tokens of the norm of the loss gradient at the head output (needs labels; a causal LM uses
  ``labels = input_ids`` when the batch has none);
- ``|X_i|``: mean number of positions of block ``i`` per sequence.

The report also evaluates, query by query, the pointer-fidelity and entropy bounds on the *applied* logits
(the model's logits plus the localist bias at the current dial, i.e. margins widened by ``-log(1 - alpha_l)``)
next to the measured ``PF_t`` and ``H_t``, and gives the fraction of (query, head) pairs for which each holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .. import theory
from ..attention.backends import base_mask_as_float, block_bias, repeat_kv
from ..errors import LocalistError
from ..utils import atomic_write_text
from .subspaces import LayerInputs, layer_subspaces, run_batches


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x[torch.isfinite(x)].float()
    if x.numel() == 0:
        return {"min": float("nan"), "p5": float("nan"), "median": float("nan"), "n": 0}
    return {"min": float(x.min()), "p5": float(torch.quantile(x, 0.05)), "median": float(x.median()),
            "n": int(x.numel())}


@dataclass
class ConstantsReport:
    """Measured constants, with :meth:`threshold` and :meth:`bounds`. All plain floats / nested lists."""

    layers: list[int]
    active_blocks: list[int]
    tau: list[float]
    delta: list[dict[str, float]]  # per layer: min / p5 / median / n over (query, head)
    delta_per_head: list[list[dict[str, float]]]  # [layer][head]
    R_x: list[float]
    sigma_X: list[list[float]]  # [layer][block]
    rho_max: list[float]
    L_l: list[list[float]]  # [layer][head]
    X_size: list[float]  # [block]
    bound_checks: list[dict[str, float]] = field(default_factory=list)  # per layer

    def threshold(self, delta_stat: str = "p5") -> torch.Tensor:
        """(L, H, n) ``lambda_threshold`` per (layer, head, block), with the head's ``delta_stat`` margin."""
        if delta_stat not in ("min", "p5", "median"):
            raise LocalistError(f"threshold(delta_stat={delta_stat!r}): choose 'min', 'p5' or 'median'")
        missing = [self.layers[li] for li, row in enumerate(self.L_l) if any(not math.isfinite(v) for v in row)]
        if missing:
            raise LocalistError(
                f"threshold() needs L_l (loss-gradient norms at the head outputs), not measured for layers {missing}: "
                "run estimate_constants(model, loader, with_grad=True) with batches that give a data loss"
            )
        rows = []
        for li in range(len(self.layers)):
            per_head = []
            for h, lh in enumerate(self.L_l[li]):
                d = self.delta_per_head[li][h][delta_stat]
                d = 0.0 if d != d else d  # a head with no measurable margin: no exponential discount
                per_head.append([
                    float(theory.lambda_threshold(lh, self.R_x[li], self.sigma_X[li][j], max(self.X_size[j], 0.0),
                                                  self.tau[li], min(self.rho_max[li], 1 - 1e-6), d))
                    for j in range(len(self.active_blocks))
                ])
            rows.append(per_head)
        return torch.tensor(rows)

    def apply_threshold(self, handle, delta_stat: str = "p5") -> torch.Tensor:
        """Use ``threshold()`` as the per-group lambda of ``lambda_mode='threshold'`` on ``handle``."""
        thr = self.threshold(delta_stat)
        handle.state.lambda_threshold = thr
        return thr

    def bounds(self) -> list[dict[str, float]]:
        """Per layer: mean predicted PF bound vs measured PF, mean H bound vs measured H, fraction holding."""
        return self.bound_checks

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text)
        return text


class _Probe:
    """Collects margins, bound checks and head-output gradient norms inside localist_attention."""

    def __init__(self, handle, with_grad: bool):
        self.handle = handle
        self.with_grad = with_grad
        self.delta: dict[int, list[torch.Tensor]] = {}  # (n_query_heads, H) chunks
        self.checks: dict[int, list[torch.Tensor]] = {}
        self.grad_norms: dict[int, list[torch.Tensor]] = {}
        self.tau: dict[int, float] = {}

    @torch.no_grad()
    def __call__(self, layer, module, query, key, attention_mask, layout, scaling, alpha_l, out, ctx):
        state = self.handle.state
        self.tau[layer] = 1.0 / scaling
        b, h, t, _ = query.shape
        k = repeat_kv(key, h // key.shape[1])
        z = torch.matmul(query.float(), k.float().transpose(2, 3))  # (B, H, T, S) raw logits q.k
        base = base_mask_as_float(attention_mask, layout, t, k.shape[2])
        visible = ~torch.isneginf(base.expand(b, 1, t, k.shape[2]))
        bias = block_bias(layout, alpha_l, state.config.beta_anchor)  # (B, 1, T, S)
        visible = visible & ~torch.isneginf(bias)
        total = ctx.block_ids.shape[1]
        target = ctx.target_ids[:, total - t:]  # (B, T)
        not_sink = ~layout.key_is_sink()[:, None, None, :]  # (B, 1, 1, S)
        valid = visible & not_sink  # (B, 1, T, S)
        own = layout.k_anchor[:, None, :] & (layout.k_blocks[:, None, :] == target[:, :, None])  # (B, T, S)
        anchors = own[:, None] & valid  # (B, 1, T, S)
        delta = theory.margin(z, anchors, valid)  # (B, H, T) raw margin
        q_ok = (target >= 1) & ctx.query_valid[:, total - t:] & (anchors.sum(-1)[:, 0] >= 1)  # (B, T)
        self.delta.setdefault(layer, []).append(delta.permute(0, 2, 1)[q_ok])  # (n, H)
        # Bound check on the applied logits z * scaling + bias (margins in units of tau = 1).
        applied = z * scaling + bias
        d_eff = theory.margin(applied, anchors, valid)
        n_vis = valid.sum(-1).expand(b, h, t).float()
        n_anchor = anchors.sum(-1).expand(b, h, t).float()
        probs = torch.softmax(applied.masked_fill(~visible, float("-inf")), dim=-1)
        pf = theory.pointer_fidelity(probs, anchors.expand_as(probs), exclude=(~not_sink).expand_as(probs))
        ent = theory.attention_entropy(probs, valid.expand_as(probs), exclude=None)
        ok = q_ok[:, None, :].expand(b, h, t) & (n_vis >= n_anchor) & torch.isfinite(pf) & torch.isfinite(ent)
        pf_b = theory.pointer_fidelity_bound(1.0, d_eff[ok], n_vis[ok], n_anchor[ok].clamp_min(1))
        h_b = theory.entropy_bound(1.0, d_eff[ok], n_vis[ok], n_anchor[ok].clamp_min(1))
        self.checks.setdefault(layer, []).append(torch.stack([pf_b, pf[ok], h_b, ent[ok]], dim=1))
        if self.with_grad and out.requires_grad:
            valid_q = ctx.query_valid[:, total - t:]

            def hook(grad, layer=layer, valid_q=valid_q):
                # grad (B, T, H, D): norm per (token, head) of the loss gradient at the head output.
                self.grad_norms.setdefault(layer, []).append(grad.detach().float().norm(dim=-1)[valid_q].cpu())

            out.register_hook(hook)


def estimate_constants(model_or_handle, loader: Iterable, max_batches: int | None = None,
                       with_grad: bool = True) -> ConstantsReport:
    """Measure delta, tau, R_x, sigma_X, rho_max, L_l and |X_i| on ``loader`` (dicts of model inputs)."""
    handle = getattr(model_or_handle, "localist_handle", model_or_handle)
    if not hasattr(handle, "state"):
        raise LocalistError("estimate_constants needs a model patched by apply_localist (or its LocalistHandle)")
    cfg = handle.config
    active = cfg.active_block_list()
    n_layers = len(handle.attention_modules)
    probe = _Probe(handle, with_grad)
    was_training = handle.base.training
    handle.base.eval()
    block_counts = torch.zeros(len(active))
    n_seq = 0
    hooks = []
    saved_grads: dict = {}
    if with_grad:
        # The backward passes below must not disturb gradients the caller holds: set them aside, restore after.
        saved_grads = {p: p.grad for p in handle.base.parameters() if p.grad is not None}
        for p in saved_grads:
            p.grad = None
        # L_l is a gradient at the head outputs: it needs a graph even when every weight is frozen (an inference
        # model, peft adapters elsewhere), so let the input embeddings' output require grad (transformers'
        # enable_input_require_grads trick), for this call only.
        embeddings = handle.base.get_input_embeddings() if hasattr(handle.base, "get_input_embeddings") else None
        if embeddings is not None:
            def _require_grad(_module, _args, output):
                if isinstance(output, torch.Tensor) and not output.requires_grad and output.is_floating_point():
                    output.requires_grad_(True)

            hooks.append(embeddings.register_forward_hook(_require_grad))
    try:
        with LayerInputs(handle) as inputs, handle.probe(probe):
            for batch, out, call in run_batches(handle, loader, max_batches, with_grad=with_grad):
                ids = call.block_ids
                valid = call.query_valid
                for j, blk in enumerate(active):
                    block_counts[j] += ((ids == blk) & valid).sum().item()
                n_seq += ids.shape[0]
                if with_grad:
                    loss = getattr(out, "loss", None)
                    if loss is None and getattr(out, "logits", None) is None:
                        raise LocalistError(
                            f"estimate_constants(with_grad=True) needs a data loss to measure L_l, but "
                            f"{type(handle.base).__name__} returned neither loss nor logits: pass labels in the "
                            "batches, use a model with an LM head, or with_grad=False (then threshold() is unavailable)"
                        )
                    if loss is None:
                        logits = out.logits[:, :-1]
                        labels = batch["input_ids"][:, 1:]
                        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 labels.reshape(-1))
                    if loss.requires_grad:
                        loss.backward()
                    handle.base.zero_grad(set_to_none=True)
    finally:
        handle.base.train(was_training)
        for hook in hooks:
            hook.remove()
        if with_grad:
            handle.base.zero_grad(set_to_none=True)
            for p, grad in saved_grads.items():
                p.grad = grad
    if n_seq == 0:
        raise LocalistError("estimate_constants: the calibration loader yielded no batch")

    subspaces = layer_subspaces(handle)
    h = handle.spec.num_heads(handle.base.config)
    layers = list(range(n_layers))
    report = ConstantsReport(layers=layers, active_blocks=active, tau=[], delta=[], delta_per_head=[], R_x=[],
                             sigma_X=[], rho_max=[], L_l=[], X_size=(block_counts / n_seq).tolist())
    for layer in layers:
        x, blocks = inputs.by_block(layer)
        report.tau.append(probe.tau.get(layer, float("nan")))
        d = torch.cat(probe.delta[layer]) if probe.delta.get(layer) else torch.empty(0, h)
        report.delta.append(_quantiles(d.flatten()))
        report.delta_per_head.append([_quantiles(d[:, hh]) for hh in range(h)])
        report.R_x.append(float(torch.quantile(x.norm(dim=1), 0.99)))
        sig = []
        for blk in active:
            xb = x[blocks == blk]
            if xb.shape[0] < 2:
                raise LocalistError(
                    f"calibration data hold {xb.shape[0]} token(s) of block {blk}: sigma_X needs at least 2; add "
                    f"examples of that block or drop it from LocalistConfig.active_blocks={active}"
                )
            xb = xb - xb.mean(0, keepdim=True)
            sig.append(float(torch.linalg.matrix_norm(xb, ord=2) / xb.shape[0] ** 0.5))
        report.sigma_X.append(sig)
        u = subspaces[layer]
        overlaps = [float(torch.linalg.matrix_norm(u[i].T @ u[j], ord=2))
                    for i in range(len(active)) for j in range(len(active)) if i != j]
        report.rho_max.append(max(overlaps) if overlaps else 0.0)
        g = torch.cat(probe.grad_norms[layer]) if probe.grad_norms.get(layer) else None
        report.L_l.append([float(torch.quantile(g[:, hh], 0.99)) for hh in range(h)] if g is not None and g.numel()
                          else [float("nan")] * h)
        checks = torch.cat(probe.checks[layer]) if probe.checks.get(layer) else torch.empty(0, 4)
        if checks.numel():
            pf_b, pf, h_b, ent = checks.unbind(1)
            report.bound_checks.append({
                "n": int(checks.shape[0]), "pf_bound_mean": float(pf_b.mean()), "pf_measured_mean": float(pf.mean()),
                "pf_bound_holds": float((pf >= pf_b - 1e-5).float().mean()),
                "entropy_bound_mean": float(h_b.mean()), "entropy_measured_mean": float(ent.mean()),
                "entropy_bound_holds": float((ent <= h_b + 1e-5).float().mean()),
            })
        else:
            report.bound_checks.append({"n": 0})
    return report
