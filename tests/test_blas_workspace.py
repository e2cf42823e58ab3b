"""cuBLAS workspaces count against --max-vram: torch keeps one per computing thread from its caching
allocator (``torch.cuda.max_memory_allocated`` counts it). Measured on an H200 (session 10): a budget
of a third of a 200 MB model was passed by 4 x 32 MiB, one per wave thread. The plan now books one
for the main thread and one per wave chunk's thread; these tests plan for a CUDA device from the
index alone, with the workspace size standing in for the card's."""

from __future__ import annotations

import types

import pytest
import torch

from lowmoe.engine import budget as budget_mod
from lowmoe.engine import device as device_mod
from lowmoe.engine.budget import SAFETY, plan_budget, plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import ConfigError

BIG = dict(layers=4, hidden_size=256, intermediate_size=2048, experts=8, top_k=2, shard_size="50MB")
WS = 32 << 20
CUDA = torch.device("cuda", 0)


@pytest.fixture
def workspace(monkeypatch):
    """Plans for CUDA see a workspace of ``size["bytes"]`` (32 MiB, Hopper's default, unless changed)."""
    size = {"bytes": WS}
    monkeypatch.setattr(budget_mod, "blas_workspace_bytes", lambda d: size["bytes"] if d.type == "cuda" else 0)
    return size


@pytest.mark.parametrize("major, env, want", [
    (9, None, 32 << 20), (10, None, 32 << 20), (12, None, 32 << 20),
    (8, None, 4096 * 1024 * 2 + 16 * 1024 * 8), (7, None, 4096 * 1024 * 2 + 16 * 1024 * 8),
    (9, ":4096:2:16:8", 4096 * 1024 * 2 + 16 * 1024 * 8), (9, ":1024:1", 1 << 20), (8, "junk", 4096 * 1024 * 2 + 16 * 1024 * 8),
])
def test_workspace_size_follows_torch(monkeypatch, major, env, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(major=major))
    if env is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", env)
    assert device_mod.blas_workspace_bytes(CUDA) == want


def test_a_cpu_has_no_workspace(monkeypatch):
    assert device_mod.blas_workspace_bytes(torch.device("cpu")) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # planning for a GPU on a CPU box
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert device_mod.blas_workspace_bytes(CUDA) == 32 << 20
    device_mod.release_blas_workspaces(torch.device("cpu"))  # nothing to give back, no error


def _lazy(ck, max_vram, **kw):
    return plan_lazy_budget(ck, device=CUDA, dtype=torch.float32, batch_size=4, seq_len=32, max_vram=max_vram,
                            num_chunks=4, **kw)


def test_a_third_of_the_model_holds_with_the_workspaces(synth_dir, workspace):
    """The GPU test's case: with 32 MiB a thread, four wave threads no longer fit, so the layer runs its
    chunks one at a time, in smaller groups, and the planned peak (workspace included) stays inside."""
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    budget = ck.total_bytes() // 3
    workspace["bytes"] = 0
    before = _lazy(ck, budget)
    assert before.wave_chunks == 4  # what ran on the H200: 4 wave threads, 5 workspaces unplanned
    workspace["bytes"] = WS
    plan = _lazy(ck, budget)
    assert plan.wave_chunks == 1
    assert plan.blas_workspace_bytes == WS and plan.device_terms["blas_workspaces"] == WS
    assert plan.device_peak_bytes <= budget * (1 - SAFETY)
    assert all(p.group_size < 8 and p.device_bytes >= WS for p in plan.layers.values())
    assert max(p.group_size for p in plan.layers.values()) < max(p.group_size for p in before.layers.values())


def test_waves_book_one_workspace_per_chunk_thread(synth_dir, workspace):
    """With 32 MiB a thread, this small model's layers fit whole before waves fit; with 1 MiB
    (CUBLAS_WORKSPACE_CONFIG=:1024:1) a layer run in groups takes its chunks in waves, and each
    chunk's thread has its workspace booked."""
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    workspace["bytes"] = ws = 1 << 20
    budget = ck.total_bytes() // 3
    plan = _lazy(ck, budget)
    assert plan.wave_chunks > 1 and any(p.chunked and p.group_size < 8 for p in plan.layers.values())
    assert plan.blas_workspace_bytes == (1 + plan.wave_chunks) * ws == plan.device_terms["blas_workspaces"]
    assert plan.device_peak_bytes == sum(plan.device_terms.values())
    assert plan.device_peak_bytes <= budget * (1 - SAFETY)


def test_without_a_budget_the_main_thread_has_one(synth_dir, workspace):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    plan = _lazy(ck, None)
    assert plan.wave_chunks == 1 and plan.blas_workspace_bytes == WS
    workspace["bytes"] = 0
    assert plan.device_peak_bytes == _lazy(ck, None).device_peak_bytes + WS


def test_a_budget_too_small_for_the_workspace_says_so(synth_dir, workspace):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    with pytest.raises(ConfigError, match=r"--max-vram .*cuBLAS workspace"):
        _lazy(ck, 30 << 20)


def test_whole_layer_plan_leaves_room_for_the_workspace(synth_dir, workspace):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    kw = dict(device=CUDA, dtype=torch.float32, batch_size=4, seq_len=32, max_vram=ck.total_bytes())
    with_ws = plan_budget(ck, **kw)
    workspace["bytes"] = 0
    without = plan_budget(ck, **kw)
    assert with_ws.blas_workspace_bytes == WS and without.blas_workspace_bytes == 0
    assert with_ws.weights_budget == without.weights_budget - WS
    assert with_ws.device_peak_bytes <= ck.total_bytes() * (1 - SAFETY)


def test_eep_population_plan_leaves_room_for_the_workspace(synth_dir, workspace):
    """EEP's population evaluator computes on one thread: its plan holds one workspace beside the
    candidate blocks, and every layer's planned peak stays inside the budget."""
    from lowmoe.engine.budget import plan_population

    ck = Checkpoint(synth_dir("mixtral", **BIG))
    budget = ck.total_bytes() // 2
    run = plan_budget(ck, device=CUDA, dtype=torch.float32, batch_size=4, seq_len=32, max_vram=budget)
    pop = plan_population(ck, run, num_experts=4, batch_size=4, seq_len=32)
    assert pop.plan.blas_workspace_bytes == WS
    assert all(p.device_bytes >= WS + pop.plan.activation_bytes for p in pop.layers.values())
    assert pop.plan.device_peak_bytes <= budget * (1 - SAFETY)
    workspace["bytes"] = 0
    without = plan_population(ck, plan_budget(ck, device=CUDA, dtype=torch.float32, batch_size=4, seq_len=32,
                                              max_vram=budget), num_experts=4, batch_size=4, seq_len=32)
    assert pop.plan.weights_budget == without.plan.weights_budget - WS
