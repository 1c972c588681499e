"""Helpers of the benchmarks: side-by-side timing, peak-memory probes, markdown tables, tiny models.

Timing: the candidates of one comparison run in the same process, interleaved (round ``r`` runs every candidate
once, in an order that alternates between rounds), after warm-up calls. A ratio is the median over rounds of the
per-round ratio (``t_base / t_candidate`` within the same round), so that slow drifts of a shared machine cancel;
the 25th-75th percentile range of the per-round ratios is reported next to it.

Peak memory: :func:`peak_rss_growth` resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``,
Linux >= 4.0), gives freed heap memory back to the OS (``malloc_trim``), and reads ``VmHWM - VmRSS(before)`` after
one call: the largest growth of resident memory during the call. Run in a fresh subprocess per configuration.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timings:
    times: dict[str, list[float]]  # seconds per round, per candidate

    def median_ms(self, name: str) -> float:
        return statistics.median(self.times[name]) * 1e3

    def ratios(self, num: str, den: str) -> list[float]:
        return sorted(a / b for a, b in zip(self.times[num], self.times[den]))

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of time(num) / time(den) measured in the same round."""
        return statistics.median(self.ratios(num, den))

    def ratio_iqr(self, num: str, den: str) -> tuple[float, float]:
        r = self.ratios(num, den)
        if len(r) < 4:
            return r[0], r[-1]
        q = statistics.quantiles(r, n=4)
        return q[0], q[2]


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Timings:
    """Time every candidate ``rounds`` times, interleaved, after ``warmup`` untimed calls each."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return Timings(times)


def settle_allocator() -> None:
    """Allocate, touch and free one 30 MiB buffer. glibc then serves buffers up to that size from its heap and keeps
    up to twice that much freed memory mapped (its dynamic mmap and trim thresholds), the state a process reaches as
    soon as it has freed its first large tensors, e.g. after one forward call of a model. Without it, the first
    comparisons of a fresh process pay first-touch page faults on every buffer of 128 KiB or more, which penalises
    code that allocates more buffers per call (segment's gathers) in a way that depends on what ran before."""
    buf = torch.empty(30 << 20, dtype=torch.uint8)
    buf.fill_(1)
    del buf


# ------------------------------------------------------------------------------------------------ memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident (the growth is then a lower bound)
        pass


def run_probe(script: str, spec: dict, threads: int) -> dict:
    """Run ``script --probe JSON --threads N`` in a fresh subprocess and return the JSON line it prints.

    A fixed glibc mmap threshold: every buffer >= 64 KiB is mapped on allocation and unmapped on free, so resident
    memory follows the live buffers (with the default dynamic threshold it depends on the allocation history)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, os.path.abspath(script), "--probe", json.dumps(spec), "--threads", str(threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def peak_rss_growth(fn: Callable[[], object]) -> tuple[float, str]:
    """Peak growth of resident memory (MiB) during one call of ``fn``, and the method used.

    Preferred: reset VmHWM through /proc/self/clear_refs and read it after the call. Fallback (no clear_refs):
    sample VmRSS every 0.5 ms from a thread (can miss short peaks)."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        method = "VmHWM"
    except OSError:
        method = "sampled VmRSS"
    before = _proc_status_kib("VmRSS")
    if method == "VmHWM":
        result = fn()
        peak = _proc_status_kib("VmHWM")
    else:
        peak, stop = before, threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _proc_status_kib("VmRSS"))
                time.sleep(0.0005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        result = fn()
        stop.set()
        thread.join()
        peak = max(peak, _proc_status_kib("VmRSS"))
    del result
    return (peak - before) / 1024.0, method


# ------------------------------------------------------------------------------------------------ reporting
def table(header: list[str], rows: list[list[object]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    rule = "|" + "|".join(" ---: " if i else " --- " for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    prefixes = ("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD")
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(prefixes))
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
            f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
            f"ISA {torch.backends.cpu.get_cpu_capability()}; allocator/threading environment: {env or 'defaults'}; "
            f"load average at start {load[0]:.2f}")


# ------------------------------------------------------------------------------------------------ models
def tiny_llama(hidden: int, layers: int, heads: int, head_dim: int, seed: int = 0, vocab: int = 1000,
               intermediate: int | None = None, kv_heads: int | None = None, max_len: int = 8192):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or (hidden * 8 // 3),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      head_dim=head_dim, max_position_embeddings=max_len)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def model_step(model, ids: torch.Tensor, grad: bool, **kwargs):
    """One forward (no grad; returns the logits) or forward+backward on the LM loss of ``ids`` (returns the loss;
    gradients are cleared again). ``kwargs`` go to the model (``block_ids``)."""
    if not grad:
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def equal_blocks(batch: int, seq: int, num_blocks: int) -> torch.Tensor:
    """(batch, seq) block ids 1..num_blocks in equal contiguous runs."""
    return (torch.arange(seq) * num_blocks // seq + 1)[None].expand(batch, seq).contiguous()
