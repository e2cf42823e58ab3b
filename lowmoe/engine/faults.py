"""Fault injection: stop the process at a named step, to prove that a run survives being stopped there.

Where it sits: every step of a run that writes something or finishes a unit of work calls
``point(STEP)`` (the steps are listed in ``STEPS``). Normally that is a dictionary lookup and
nothing happens. With the environment variable set::

    LOWMOE_FAULT=STEP[:N][:ACTION][@RANK]

the N-th time (default 1) the process reaches STEP it (with ``@RANK``: only the process of that
rank in a run on several processes, ``RANK`` as torchrun sets it; the others count and go on)

* ``kill`` (default): exits at once with ``os._exit(FAULT_EXIT)``: no ``finally``, no flush of
  Python's file buffers, no cleanup, from whichever thread reached the step; what a ``kill -9``
  or a power cut leaves behind;
* ``enospc``: raises ``OSError(ENOSPC)`` as a write on a full disk does;
* ``erofs``: raises ``OSError(EROFS)`` as a write to a read-only directory does;
* ``stop``: stops itself with SIGSTOP (resumed by SIGCONT): a run paused mid-way, holding its
  output directory, so a test can start a second process against it.

``tests/test_faults_kill.py`` walks every step: a run killed there, then ``--resume``, must end with
the same bytes as a run that never stopped. The hook is driven by the environment (not by sleeps or
signals) so a step is hit exactly, and the test can check that it was (exit code ``FAULT_EXIT``).
"""

from __future__ import annotations

import errno
import os
import signal
import threading

from ..errors import ConfigError

ENV = "LOWMOE_FAULT"
FAULT_EXIT = 75  # the exit status of a process killed by a fault (distinct from lowmoe's 0/1/2/130)

# step -> where it is (the order a prune reaches them)
STEPS = {
    "tokenize": "calibration text tokenized (engine.calibration.tokenize)",
    "super-experts": "super-expert profile done, before the first layer (methods.oneshot.guards)",
    "embed": "each embedded calibration chunk, before it is cached (engine.stream.Stream.embed)",
    "cache-write": "each activation-cache chunk: written to its temporary name, not yet renamed (engine.cache)",
    "score": "each calibration chunk run through a MoE layer with its scorers watching (engine.stream.Stream.forward)",
    "layer-written": "a layer's tensors written into the shards (the output writer thread done), its manifest entry not yet saved (engine.rundir)",
    "shard-write": "each tensor streamed into an open output shard (engine.writer)",
    "shard-close": "an output shard closed (header written), not yet recorded (engine.writer)",
    "manifest": "the resume manifest written to its temporary name, not yet renamed (engine.rundir)",
    "files": "tensors past the decoder layers written and the tokenizer files copied (engine.rundir.finalize)",
    "config": "config.json written to its temporary name, not yet renamed (engine.rundir.finalize)",
    "shard-rename": "each output shard renamed to its final name (engine.writer.finalize)",
    "index": "the index written to its temporary name, not yet renamed (engine.writer.finalize)",
    "report": "lowmoe_report.json written to its temporary name, not yet renamed (engine.rundir.finalize)",
    "cleanup": "the work directory removed, the manifest not yet (engine.rundir.finalize)",
    "eep-seed": "the EEP seed plan computed, not yet saved (methods.eep.runner)",
    "eep-evaluate": "each layer of an EEP generation's population pass (methods.eep.population)",
    "eep-generation": "an EEP generation evaluated, its search state not yet saved (methods.eep.evolve)",
    "eep-final": "the EEP search finished and picked, before the write (methods.eep.runner)",
}
ACTIONS = ("kill", "enospc", "erofs", "stop")

_hits: dict[str, int] = {}
_lock = threading.Lock()


def parse(spec: str) -> tuple[str, int, str]:
    """``STEP[:N][:ACTION][@RANK]`` -> (step, n, action); ConfigError naming what is wrong."""
    parts = spec.strip().split("@", 1)[0].split(":")
    step, n, action = parts[0], 1, "kill"
    for p in parts[1:]:
        if p.isdigit():
            n = int(p)
        elif p in ACTIONS:
            action = p
        else:
            raise ConfigError(f"{ENV}={spec}: {p!r} is neither a count nor one of {', '.join(ACTIONS)}")
    if step not in STEPS:
        raise ConfigError(f"{ENV}={spec}: unknown step {step!r}; steps: {', '.join(STEPS)}")
    if n < 1:
        raise ConfigError(f"{ENV}={spec}: the count must be >= 1")
    return step, n, action


def parse_rank(spec: str) -> int | None:
    """The ``@RANK`` of a spec (None: any process)."""
    _, at, rank = spec.strip().partition("@")
    if not at:
        return None
    if not rank.isdigit():
        raise ConfigError(f"{ENV}={spec}: '@{rank}' is not a rank (expected @0, @1, ...)")
    return int(rank)


def reset() -> None:
    """Forget how often each step was reached (a new run in the same process counts from zero)."""
    with _lock:
        _hits.clear()


def hits(step: str) -> int:
    return _hits.get(step, 0)


def point(step: str, path=None) -> None:
    """Step ``step`` reached; ``path``: the file being written there (named by a simulated OSError)."""
    spec = os.environ.get(ENV)
    with _lock:
        _hits[step] = _hits.get(step, 0) + 1
        count = _hits[step]
    if not spec:
        return
    want, n, action = parse(spec)
    if want != step or count != n:
        return
    rank = parse_rank(spec)
    if rank is not None and rank != int(os.environ.get("RANK", "0") or 0):
        return
    if action == "kill":
        os._exit(FAULT_EXIT)
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    code = errno.ENOSPC if action == "enospc" else errno.EROFS
    raise OSError(code, os.strerror(code), None if path is None else str(path))
