"""Shared fixtures: tiny models of every registered architecture, built from configs (no Hub downloads).

Every model is tiny (hidden 32, 2 layers, 4 heads, vocab 100), deterministic (``torch.manual_seed``), in eval mode,
with dropout off and ``attn_implementation="sdpa"`` (the reference the localist path must reproduce at alpha = 0).
"""

from __future__ import annotations

import os

# Never touch the network: the whole suite runs offline (tests build models from configs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_localist as hl  # noqa: E402

hf_logging.set_verbosity_error()

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP barriers make every op
# 100x slower (a 1 ms forward takes 300 ms): run single-threaded.
torch.set_num_threads(1)

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
PAD, BOS, EOS = 0, 1, 2

ARCHS = hl.supported_architectures()
ENCODER_ARCHS = [mt for mt in ARCHS if not hl.get_arch_spec(mt).causal]
DECODER_ARCHS = [mt for mt in ARCHS if hl.get_arch_spec(mt).causal]
#: Architectures with grouped-query attention in their tiny config (H_kv = 2 < H = 4).
GQA_ARCHS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo2", "gemma", "phi3")


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
    if model_type in ("gemma", "qwen3"):
        kw["head_dim"] = HIDDEN // HEADS
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


def build_model(model_type: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny randomly initialised model (``*ForCausalLM`` for decoders, the bare model for encoders), in eval mode."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if hl.get_arch_spec(model_type).causal else AutoModel
    model = cls.from_config(config, attn_implementation=attn_implementation)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # fixed-length generation in tests
        model.generation_config.pad_token_id = PAD
    return model.eval()


def precise_dtype(model_type: str) -> torch.dtype:
    """float64 where the architecture runs in it (exact backend comparisons), else float32 (Mixtral's grouped_mm)."""
    return torch.float32 if model_type == "mixtral" else torch.float64


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal up to rounding: tolerance relative to the largest magnitude of ``expected`` (by dtype)."""
    eps = 1e-11 if expected.dtype == torch.float64 else 3e-6
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, atol=eps * scale, rtol=0, msg=msg)


def main_output(out) -> torch.Tensor:
    """``logits`` of a causal LM, else ``last_hidden_state``."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


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


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    import transformers.utils.hub as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = FakeHubApi()
    monkeypatch.setattr(hub, "hf_api", lambda: api)

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no model card (offline test)")

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(lambda cls, *a, **k: no_card()))
    return api


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=DECODER_ARCHS)
def decoder_arch(request) -> str:
    return request.param
