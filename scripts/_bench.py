"""What every benchmark script shares: the synthetic >= 2 GB Mixtral-layout model (made once, under
a lock, so concurrent benchmarks do not build it twice), dropping the page cache for cold reads, the
machine and command line stored with each result, and a digest of a written model's weights."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

BENCH_DIR = Path("/tmp/lowmoe-bench")
BENCH_MODEL = BENCH_DIR / "mix2g"


def ensure_model(path: Path = BENCH_MODEL, layers: int = 16, hidden: int = 1024, inter: int = 3584) -> Path:
    """Synthesize the benchmark model at ``path`` unless it is already there (~2.9 GB with the defaults)."""
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors.index.json").is_file():
            from lowmoe.toy.synth import synth_model

            synth_model(path, "mixtral", layers=layers, hidden_size=hidden, intermediate_size=inter, experts=8, top_k=2,
                        dtype="bfloat16", shard_size="1GB")
    return path


def drop_caches() -> bool:
    """Drop the OS page cache (needs root); False where that is not allowed (reads are then warm)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def machine() -> dict:
    """The machine a figure was measured on (stored with every result under docs/results/)."""
    import datetime
    import platform

    import torch

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) * 1024 / 2**30, 1)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": mem, "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 1),  # other jobs on a shared machine move wall times
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")}


def save_result(path, data: dict) -> None:
    """Store a benchmark's figures (with its command and machine) as indented JSON, folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def command_line() -> str:
    """This script's command line as stored with its result (``python script args``, shell-quoted)."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def weights_digest(out) -> str:
    """sha256 over a written model's ``*.safetensors`` in name order, read in 16 MiB pieces (a shard
    is never held whole)."""
    h = hashlib.sha256()
    for p in sorted(Path(out).glob("*.safetensors")):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
