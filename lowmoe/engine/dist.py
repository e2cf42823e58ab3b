"""Several processes on ``torch.distributed``: which one this is, and the few collectives lowmoe uses.

A run launched by ``torchrun`` (or ``python -m torch.distributed.run``, or ``accelerate launch``)
finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` in its environment;
``init`` joins the process group (``env://`` rendezvous) and every rank then takes part in the same
collectives in the same order. Without those variables (or with ``WORLD_SIZE=1``) nothing is
initialised and every call here is a no-op on a group of one.

What travels between the ranks is small Python objects (candidate plans, fitness records, a search
state), never tensors, so the collectives are the ``*_object`` ones on a gloo group, also when the
ranks compute on GPUs (``LOWMOE_DIST_BACKEND=nccl`` picks NCCL instead; each rank then pins
``cuda:LOCAL_RANK`` first, as NCCL's object collectives need). gloo reports a peer that died as an
error at once; a peer that hangs is caught by the group's timeout (``LOWMOE_DIST_TIMEOUT`` seconds,
default 1800: one collective waits at most that long for the slowest rank). Either way the
surviving ranks raise ``DistributedError`` (one line, exit 1) instead of a traceback, and a
launcher's SIGTERM (torchrun stops the other workers when one fails) becomes the same error.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from ..errors import ConfigError, DistributedError

log = logging.getLogger(__name__)

ENV_TIMEOUT = "LOWMOE_DIST_TIMEOUT"  # seconds a collective waits for the slowest rank
ENV_BACKEND = "LOWMOE_DIST_BACKEND"  # gloo (default) or nccl
DEFAULT_TIMEOUT_S = 1800.0
FINAL_WAIT_S = 7 * 24 * 3600.0  # close(): how long a finished rank waits for the others (rank 0 writing)
BACKENDS = ("gloo", "nccl")
RESUME_HINT = "rerun the same command with --resume (with any number of processes) to continue"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Group:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the output (search state, plan, checkpoint, report)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th one, from index ``rank`` (strided)."""
        return list(items[self.rank::self.world])

    # ---- collectives (each one a no-op on a group of one) -----------------------------------------
    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj``, on every rank (the others pass anything, e.g. None)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        self._call(what, torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def all_gather(self, obj: Any, what: str) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        self._call(what, torch.distributed.all_gather_object, out, obj)
        return out

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except DistributedError:
            raise
        except (RuntimeError, OSError, ValueError) as e:  # DistBackendError, DistNetworkError are RuntimeErrors
            first = " ".join(str(e).split())[:160]
            raise DistributedError(f"rank {self.rank} of {self.world}: another process of the run stopped or stopped answering "
                                   f"while {what} ({type(e).__name__}: {first}); {RESUME_HINT}") from None

    def split(self, fn: Callable[[list[T]], list[R]], what: str,
              needs: Callable[[list[T]], list[list[str]]] | None = None) -> Callable[[list[T]], list[R]]:
        """``fn`` over a list, each item run on one rank and the results gathered back into the list's
        order: every rank gets every result. ``fn`` must give an item the same result on any rank (the
        EEP fitness of a candidate depends only on the candidate).

        Which rank runs an item: without ``needs``, the strided ``share``. With it, ``needs(items)``
        names, per item, the units of work this rank would have to do for it (EEP: the hidden-state
        streams it has not cached); those are gathered and every rank computes the same ``assign``:
        work a rank already holds (a parent's stream) is not redone elsewhere, units two items share
        are done once, and the ranks' loads stay even."""
        if not self.distributed:
            return fn

        def run(items: list[T]) -> list[R]:
            items = list(items)
            if needs is None:
                owner = [i % self.world for i in range(len(items))]
            else:
                owner = assign(self.all_gather(needs(items), what))
            mine = [it for it, r in zip(items, owner) if r == self.rank]
            got = list(fn(mine)) if mine else []
            if len(got) != len(mine):
                raise RuntimeError(f"{what}: {len(got)} results for {len(mine)} items")
            parts = [iter(p) for p in self.all_gather(got, what)]
            return [next(parts[r]) for r in owner]

        return run


def assign(needs: list[list[list[str]]]) -> list[int]:
    """The rank of each item, from ``needs[rank][item]`` (the units of work that rank would do for it).

    Items with the most work go first. Each goes to the rank where it adds the fewest units (those
    not already planned there: a parent's cached streams, a prefix shared with an item placed
    before), among the ranks it leaves within an even share of the work (the items' smallest needs
    summed, over the ranks); when it fits under none, to the rank that finishes it first. Ties: the
    lighter rank, then the lower one. A function of ``needs`` only: the same answer on every rank."""
    world = len(needs)
    n = len(needs[0]) if needs else 0
    planned: list[set[str]] = [set() for _ in range(world)]
    load = [0] * world
    owner = [0] * n
    least = [min(len(needs[r][i]) for r in range(world)) for i in range(n)]
    cap = sum(least) / max(world, 1)
    for i in sorted(range(n), key=lambda i: (-least[i], i)):
        extra = [sum(1 for u in needs[r][i] if u not in planned[r]) for r in range(world)]
        fits = [r for r in range(world) if load[r] + extra[r] <= cap]
        if fits:
            r = min(fits, key=lambda r: (extra[r], load[r], r))
        else:
            r = min(range(world), key=lambda r: (load[r] + extra[r], load[r], r))
        planned[r].update(needs[r][i])
        load[r] += extra[r]
        owner[i] = r
    return owner


SINGLE = Group()
_current: Group = SINGLE
_owned = False  # whether ``init`` created the process group (``close`` destroys only that one)
_leaving = None  # a gloo group with the FINAL_WAIT_S timeout, for close()'s barrier only


def current() -> Group:
    """The group ``init`` joined (a group of one when the process was not launched as several)."""
    return _current


def from_env(env=None) -> Group:
    """The group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1") or 1)
        rank = int(env.get("RANK", "0") or 0)
        local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} RANK={env.get('RANK')!r} LOCAL_RANK="
                          f"{env.get('LOCAL_RANK')!r}: expected integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"WORLD_SIZE={world} RANK={rank}: expected 0 <= RANK < WORLD_SIZE (as torchrun sets them)")
    return Group(rank, world, local)


def timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{ENV_TIMEOUT}={raw!r}: expected seconds (e.g. 1800)") from None
    if t <= 0:
        raise ConfigError(f"{ENV_TIMEOUT}={raw!r}: must be > 0 seconds")
    return t


def init(device: torch.device) -> Group:
    """Join the process group torchrun set up (once per process); a group of one when not launched so.

    ``device``: this rank's compute device (``device_for``); a CUDA one becomes the current device."""
    global _current, _owned, _leaving
    group = from_env()
    if not group.distributed:
        _current = SINGLE
        return SINGLE
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # joined already (by us or the caller)
        _current = Group(torch.distributed.get_rank(), torch.distributed.get_world_size(), group.local_rank)
        return _current
    backend = os.environ.get(ENV_BACKEND, "gloo") or "gloo"
    if backend not in BACKENDS:
        raise ConfigError(f"{ENV_BACKEND}={backend!r}: choose one of {', '.join(BACKENDS)}")
    if not torch.distributed.is_available():
        raise ConfigError(f"WORLD_SIZE={group.world}: this torch build has no torch.distributed; launch one process")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={group.world} but {', '.join(missing)} not set: launch with torchrun "
                          "(it sets the rendezvous variables), or set them yourself")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif backend == "nccl":
        raise ConfigError(f"{ENV_BACKEND}=nccl needs --device cuda (the run computes on {device})")
    t = timeout_s()
    try:
        torch.distributed.init_process_group(backend=backend, rank=group.rank, world_size=group.world,
                                             timeout=datetime.timedelta(seconds=t))
    except (RuntimeError, OSError, ValueError) as e:
        first = " ".join(str(e).split())[:160]
        raise DistributedError(f"rank {group.rank} of {group.world}: could not join the process group at "
                               f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {t:.0f}s "
                               f"({type(e).__name__}: {first})") from None
    _current, _owned = group, True
    # the barrier before leaving waits longer than a collective may (rank 0 writing the output): a group
    # of its own, gloo whatever the backend (it carries no data)
    _leaving = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=FINAL_WAIT_S))
    _stop_on_sigterm(group)
    log.info("distributed run: rank %d of %d (local rank %d), %s collectives, timeout %.0fs",
             group.rank, group.world, group.local_rank, backend, t)
    return group


def device_for(name: str | None, group: Group) -> str | None:
    """The ``--device`` this rank computes on: ``cuda`` (or ``auto`` on a machine with CUDA) becomes
    ``cuda:LOCAL_RANK`` when there are several processes; an explicit ``cuda:N`` or ``cpu`` is kept."""
    s = (name or "auto").strip().lower()
    if group.distributed and s in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{group.local_rank}"
    return name


def close(wait: bool = True) -> None:
    """Leave the process group ``init`` created (idempotent; a group the caller made is left alone).

    ``wait``: first wait until every rank is leaving too (a barrier; rank 0 gets there once it has
    written the output). A rank that tears its group down while a peer still holds it can abort as
    the process exits (gloo's threads: "terminate called without an active exception"), and torchrun
    takes that for a failure and stops the others, rank 0 in the middle of its output. The wait is
    not the collectives' timeout (writing the output may take longer): a peer that died ends it at
    once, one that hangs after ``FINAL_WAIT_S``. ``wait=False`` on the way out of an error, where a
    peer may be gone or hung."""
    global _current, _owned, _leaving
    if _owned and torch.distributed.is_initialized():
        if wait:
            try:
                torch.distributed.barrier(group=_leaving)
            except (RuntimeError, OSError, ValueError, DistributedError) as e:  # a peer gone: leave anyway
                log.warning("rank %d: leaving the process group without the other ranks (%s)", _current.rank,
                            " ".join(str(e).split())[:160])
        try:
            torch.distributed.destroy_process_group()
        except (RuntimeError, ValueError):  # a peer already gone: nothing left to tear down cleanly
            pass
        if threading.current_thread() is threading.main_thread():
            # on the way out of an error (wait=False) the error is about to be printed: the launcher's SIGTERM,
            # which follows a failed peer, must not kill the process before its one line is out (torchrun sends
            # SIGKILL after its grace period if it never exits)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if wait else signal.SIG_IGN)
    _current, _owned, _leaving = SINGLE, False, None


def _stop_on_sigterm(group: Group) -> None:
    """torchrun stops the surviving workers with SIGTERM when one fails: say so in one line."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):  # noqa: ARG001
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise DistributedError(f"rank {group.rank} of {group.world}: stopped by the launcher (SIGTERM), most likely "
                               f"because another rank failed (see its error above); {RESUME_HINT}")

    signal.signal(signal.SIGTERM, stop)
