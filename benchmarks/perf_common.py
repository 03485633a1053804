"""Shared helpers of the performance benchmarks (inference.py, server_load.py, training_speed.py):
machine description, latency summaries, peak memory, Markdown tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from xray_textseg.backbones import cpuinfo  # noqa: E402


def cpu_model() -> str:
    return cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_generation() -> dict:
    """CPU family / model numbers and the vector units that matter for the encoder. A virtual machine's
    "model name" can hide the host generation: two "AMD EPYC" hosts measured 2.4x apart here (see
    docs/performance.md)."""
    fields = cpuinfo()
    if not fields:
        return {}
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return {"cpu_family": fields.get("cpu family"), "cpu_model_number": fields.get("model"),
            "cpu_flags": sorted(set(fields.get("flags", "").split()) & set(wanted))}


def machine_info(device=None) -> dict:
    """CPU model, cores, load average (other jobs on the machine inflate CPU timings), torch, GPU."""
    import torch

    info = {
        "cpu": cpu_model(),
        **cpu_generation(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def summary(values_s: list[float]) -> dict:
    """p50 / p95 / mean / min / max in milliseconds (numpy's linear percentile: with few repeats p95 is
    close to the maximum)."""
    v = np.asarray(values_s, dtype=float) * 1e3
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "p50_ms": round(float(np.percentile(v, 50)), 1),
            "p95_ms": round(float(np.percentile(v, 95)), 1), "mean_ms": round(float(v.mean()), 1),
            "min_ms": round(float(v.min()), 1), "max_ms": round(float(v.max()), 1)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb(pid: int | None = None, children: bool = True) -> float:
    """Current RSS of a process (default: this one) and, with ``children``, of all its descendants."""
    import psutil

    proc = psutil.Process(pid or os.getpid())
    procs = [proc] + (proc.children(recursive=True) if children else [])
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with (key, header) columns; missing values print as '-'."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, data: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
