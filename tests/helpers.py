"""Shared test helpers: tiny config-built models, random inputs, an independent reference mask, small utilities.

Imported by the test modules (``from helpers import ...``), by ``conftest.py`` (which keeps the pytest fixtures) and
by the worker scripts run as subprocesses (``distributed_worker.py``, ``fsdp_worker.py``). ``tests/`` is on
``sys.path`` because pytest's default ``prepend`` import mode inserts the directory of ``conftest.py`` (and
``conftest.py`` inserts it itself for other import modes); a script run as ``python tests/<worker>.py`` has its own
directory as ``sys.path[0]``.

Every model is tiny (hidden 32, 2 layers, 4 heads, vocab 100), deterministic (``torch.manual_seed``), in eval mode,
with dropout off and ``attn_implementation="sdpa"`` (the reference the localist path must reproduce at alpha = 0).
No helper touches the network.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import hf_localist as hl

#: The repository root (the parent of ``tests/``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
PAD, BOS, EOS = 0, 1, 2

ARCHS = hl.supported_architectures()
ENCODER_ARCHS = [mt for mt in ARCHS if not hl.get_arch_spec(mt).causal]
DECODER_ARCHS = [mt for mt in ARCHS if hl.get_arch_spec(mt).causal]
#: Architectures with grouped-query attention in their tiny config (H_kv = 2 < H = 4).
GQA_ARCHS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo2", "gemma", "gemma2", "gemma3_text", "phi3",
             "phi")
#: Architectures whose modeling code refuses attn_implementation="sdpa" (Gemma 2: softcapping): eager instead.
EAGER_ONLY_ARCHS = ("gemma2",)
#: Sliding window of the tiny Gemma 2 / Gemma 3 configs: shorter than most test sequences, so that it matters.
TINY_WINDOW = 4


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_config(model_type: str, **overrides):
    """A tiny ``PreTrainedConfig`` of ``model_type`` (2 layers, hidden 32, 4 heads, vocab 100, no dropout)."""
    if model_type == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, n_inner=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=64)
    if model_type in GQA_ARCHS:
        kw["num_key_value_heads"] = 2
    if model_type == "mixtral":
        kw.update(num_local_experts=2, num_experts_per_tok=1)
    if model_type in ("gemma", "qwen3", "gemma2", "gemma3_text", "phi"):
        kw["head_dim"] = HIDDEN // HEADS
    if model_type in ("gemma2", "gemma3_text"):
        # One sliding-window layer and one full layer; query_pre_attn_scalar != head_dim, so that a wrong scaling
        # shows. Gemma 2's attention softcap is made small (default 50) so that dropping it would show too. Untied
        # embeddings: tied ones (scaled by sqrt(hidden)) make the tiny model predict its input token again.
        n_layers = overrides.get("num_hidden_layers", LAYERS)
        kw.update(sliding_window=TINY_WINDOW, query_pre_attn_scalar=16, attention_dropout=0.0,
                  tie_word_embeddings=False,
                  layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)])
    if model_type == "gemma2":
        kw["attn_logit_softcapping"] = 2.0
    if model_type == "opt":
        kw.update(ffn_dim=64, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0, init_std=0.2)
    if model_type == "phi":
        kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if model_type == "gpt_neox":
        kw.update(rotary_pct=1.0, hidden_dropout=0.0, attention_dropout=0.0)
    if model_type in ("bert", "roberta"):
        kw.update(type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if model_type == "roberta":
        kw["max_position_embeddings"] = 64 + PAD + 2  # RoBERTa offsets positions by padding_idx + 1
    # A larger init than the default 0.02 gives peaked (not near-uniform) attention, so masks visibly matter.
    kw.update(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build_model(model_type: str, seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
                fixed_length: bool = True, **overrides):
    """A tiny randomly initialised model (``*ForCausalLM`` for decoders, the bare model for encoders), in eval mode.

    ``overrides`` go to :func:`tiny_config`. ``dtype``: cast the weights (``None`` keeps float32).
    ``fixed_length=True`` clears the generation config's ``eos_token_id`` (fixed-length generation in tests) and
    sets its ``pad_token_id``; ``False`` keeps the generation config the model config gives.
    """
    config = tiny_config(model_type, **overrides)
    if model_type in EAGER_ONLY_ARCHS and attn_implementation == "sdpa":
        attn_implementation = "eager"  # the model's own default (it refuses sdpa): the reference of alpha = 0
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if hl.get_arch_spec(model_type).causal else AutoModel
    model = cls.from_config(config, attn_implementation=attn_implementation)
    if fixed_length and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = PAD
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype | None = torch.float64, eos_token_id: int | None = None,
               **overrides) -> LlamaForCausalLM:
    """The tiny Llama (GQA) of :func:`build_model` as the router tests save it: float64 by default (comparisons
    exact up to rounding) and no ``eos_token_id`` in its config either."""
    return build_model("llama", seed=seed, dtype=dtype, eos_token_id=eos_token_id, **overrides)


def apply_explicit(model, **config):
    """``apply_localist`` with explicit block ids (``block_ids=`` in every call); returns the handle."""
    return hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", **config))


def localist_model(model_type: str = "llama", seed: int = 0, **config):
    """``(model, handle)``: a fresh :func:`build_model` patched by :func:`apply_explicit` with ``config``."""
    model = build_model(model_type, seed=seed)
    return model, apply_explicit(model, **config)


def precise_dtype(model_type: str) -> torch.dtype:
    """float64 where the architecture runs in it (exact backend comparisons), else float32 (Mixtral's grouped_mm)."""
    return torch.float32 if model_type == "mixtral" else torch.float64


def word_tokenizer(words: list[str],
                   specials: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]")) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``specials`` get ids 0.. in order, then ``words``.

    Each special among ``[PAD]``, ``[UNK]``, ``[BOS]``, ``[EOS]`` is declared as the matching special token.
    """
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({w: i + len(specials) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {"[PAD]": "pad_token", "[UNK]": "unk_token", "[BOS]": "bos_token", "[EOS]": "eos_token"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{names[s]: s for s in specials if s in names})


# ---------------------------------------------------------------------------------------------- comparisons
def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal up to rounding: tolerance relative to the largest magnitude of ``expected`` (by dtype)."""
    eps = 1e-11 if expected.dtype == torch.float64 else 3e-6
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, atol=eps * scale, rtol=0, msg=msg)


def main_output(out) -> torch.Tensor:
    """``logits`` of a causal LM, else ``last_hidden_state``."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


# ---------------------------------------------------------------------------------------------- inputs
def random_ids(batch: int, seq: int, seed: int = 0, low: int = 3, high: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, seq), generator=g)


def random_block_ids(batch: int, seq: int, num_blocks: int = 3, seed: int = 0) -> torch.Tensor:
    """Random block layouts (values 0..num_blocks), different per row, runs of random length, blocks recurring.

    Every row starts in block 0 and holds at least two different blocks >= 1 (so that the dial has an effect).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < batch:
        row, cur = [], 0
        while len(row) < seq:
            run = int(torch.randint(1, 5, (1,), generator=g))
            row += [cur] * run
            cur = int(torch.randint(0, num_blocks + 1, (1,), generator=g))
        row = row[:seq]
        if len({b for b in row if b >= 1}) >= min(2, num_blocks):
            rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def left_pad_mask(batch: int, seq: int, pads: list[int]) -> torch.Tensor:
    """(batch, seq) 2-D attention mask with ``pads[i]`` padding positions on the left of row i."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return mask


def reference_mask(block_ids: torch.Tensor, alpha: float, beta_anchor: float = 0.0, causal: bool = True,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The additive (B, 1, T, T) float mask of docs/design.md section 3, written independently of the package.

    Causality and the 2-D padding mask give -inf. For a query t in block b >= 1 and a visible key s:
    +log(1 - alpha) when s is in another block j >= 1 (j != b) and is not the sink (the first non-padding token);
    +alpha * beta_anchor when s is an anchor of b (first position of a run of b), not the sink. Queries of block 0
    are not biased. A query row with no visible key (a padding query) gets a zero row, so that no NaN appears.
    """
    b, t = block_ids.shape
    valid = torch.ones(b, t, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    mask = torch.zeros(b, 1, t, t)
    for r in range(b):
        sink = int(valid[r].long().argmax())
        ids = block_ids[r].tolist()
        anchors = [ids[s] >= 1 and (s == 0 or ids[s - 1] != ids[s]) for s in range(t)]
        for q in range(t):
            for s in range(t):
                if (causal and s > q) or not valid[r, s]:
                    mask[r, 0, q, s] = -math.inf
                    continue
                qb, kb = ids[q], ids[s]
                if qb == 0 or s == sink:
                    continue
                if kb >= 1 and kb != qb:
                    mask[r, 0, q, s] += math.log1p(-alpha) if alpha < 1 else -math.inf
                elif kb == qb and anchors[s]:
                    mask[r, 0, q, s] += alpha * beta_anchor
            if torch.isneginf(mask[r, 0, q]).all():
                mask[r, 0, q] = 0.0
    return mask


# ---------------------------------------------------------------------------------------------- synthetic data
#: The clustered language of the recruitment tests: each cluster owns SYNTH_VOCAB tokens ``3 + c * V + j``.
SYNTH_VOCAB, SYNTH_LEN = 16, 64


def synthetic(n: int, k: int, seed: int, q: float = 0.2, p_fav: float = 0.9, clusters: list[int] | None = None):
    """(ids (n, SYNTH_LEN), true cluster of every position (-1 for BOS)). ``clusters`` restricts the clusters used.

    A sequence is BOS then segments of one random cluster of ``k`` (a new segment starts with probability ``q``); a
    segment's first token has a uniform index j, the following ones the sequence's favourite index of that cluster
    with probability ``p_fav`` (see tests/test_recruitment.py).
    """
    v, t = SYNTH_VOCAB, SYNTH_LEN
    g = torch.Generator().manual_seed(seed)
    fav = torch.randint(0, v, (n, k), generator=g)
    new = torch.rand(n, t, generator=g) < q
    new[:, :2] = True
    seg = new.long().cumsum(1)
    pool = torch.tensor(clusters if clusters is not None else list(range(k)))
    clus = pool[torch.randint(0, len(pool), (n, t + 1), generator=g)].gather(1, seg)
    use_fav = (torch.rand(n, t, generator=g) < p_fav) & ~new
    j = torch.where(use_fav, fav.gather(1, clus), torch.randint(0, v, (n, t), generator=g))
    ids = 3 + clus * v + j
    ids[:, 0], clus[:, 0] = BOS, -1
    return ids, clus


def blind_llama(k: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama for :func:`synthetic` with ``k`` clusters: content-blind attention (Q/K weights frozen at zero)
    and frozen, tied embeddings ``e_c + 0.5 f_j`` (a cluster direction plus a shared index direction)."""
    v, hidden = SYNTH_VOCAB, 32
    cfg = LlamaConfig(vocab_size=3 + k * v, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    e = F.normalize(torch.randn(k, hidden, generator=g), dim=-1)
    f = F.normalize(torch.randn(v, hidden, generator=g), dim=-1)
    frozen = [model.model.embed_tokens.weight]
    with torch.no_grad():
        model.model.embed_tokens.weight[3:] = (e[:, None] + 0.5 * f[None]
                                               + 0.05 * torch.randn(k, v, hidden, generator=g)).reshape(k * v, hidden)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.zero_()
                frozen.append(proj.weight)
    for p in frozen:
        p.requires_grad_(False)
    return model


#: Length of a :func:`domain` sequence.
DOMAIN_LEN = 24


def domain(name: str, n: int, seed: int) -> list[list[int]]:
    """``n`` sequences of the router's toy domains: A: tokens 10-39; B: tokens 40-69; C (uncovered): alternating
    A and B tokens. Each starts with BOS and holds DOMAIN_LEN tokens."""
    g = random.Random(seed)
    pick = {"A": lambda i: g.randrange(10, 40), "B": lambda i: g.randrange(40, 70),
            "C": lambda i: g.randrange(10, 40) if i % 2 == 0 else g.randrange(40, 70)}[name]
    return [[1] + [pick(i) for i in range(DOMAIN_LEN - 1)] for _ in range(n)]


# ---------------------------------------------------------------------------------------------- scripts, the Hub
def load_script(relpath: str, module_name: str):
    """Import the script at ``ROOT/relpath`` as module ``module_name`` (registered in ``sys.modules``, where
    dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class FakeHubApi:
    """Stands in for transformers' HfApi: records create_repo / create_commit, reads the committed files."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, **kwargs):  # pragma: no cover - only with revision=
        pass

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as fh:
                files[op.path_in_repo] = fh.read()
        self.commits.append({"repo_id": repo_id, "files": files, "message": commit_message, **kwargs})
        return f"https://hub.invalid/{repo_id}/commit/0"


# ---------------------------------------------------------------------------------------------- router zoo
#: The specialists of the router zoo: a full fine-tune ``alpha`` and two LoRA adapters ``beta`` and ``gamma``.
NAMES = ("alpha", "beta", "gamma")


def save_lora(base_dir, path, seed, targets):
    """A random (non-zero) LoRA adapter on the model in ``base_dir``, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    model.save_pretrained(path)


def build_router_zoo(d):
    """Tiny Llamas in ``d``: a base, a full specialist ``alpha``, LoRA specialists ``beta`` and ``gamma``, and each
    specialist loaded alone (the reference of routing)."""
    from types import SimpleNamespace

    from peft import PeftModel

    paths = {"base": str(d / "base"), **{n: str(d / n) for n in NAMES}}
    tiny_llama(0).save_pretrained(paths["base"])
    tiny_llama(1).save_pretrained(paths["alpha"])
    save_lora(paths["base"], paths["beta"], 2, ["q_proj", "v_proj"])
    save_lora(paths["base"], paths["gamma"], 3, ["o_proj", "gate_proj", "k_proj"])
    alone = {"alpha": LlamaForCausalLM.from_pretrained(paths["alpha"]).eval()}
    for n in ("beta", "gamma"):
        alone[n] = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(paths["base"]), paths[n]).eval()
    return SimpleNamespace(dir=d, paths=paths, alone=alone)


def make_router(zoo, routing="hard", seed=5, names=NAMES, **kw):
    """A router over the zoo with a spread-out random router layer, so that every specialist gets some inputs."""
    router = hl.LocalistRouterModel.from_specialists(zoo.paths["base"], {n: zoo.paths[n] for n in names},
                                                     routing=routing, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.output_layer.weight.copy_(torch.randn(router.output_layer.weight.shape, generator=g) * 0.5)
        router.feature_scale.fill_(0.5)
    return router
