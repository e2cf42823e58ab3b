"""Page-locked host memory on a GPU pass: booked as torch allocates it, made when first needed, given back.

torch's caching host allocator rounds every pinned block up to the next power of two and caches freed
blocks (``torch.cuda.host_memory_stats``'s documentation). The host plan of a CUDA pass now books
the staging buffers and the layer reader's pinned copies at those sizes; the staging pool makes each
buffer when it is first taken (the first layer waits for one, not three); a pass gives the cached blocks
back when it ends. These tests plan for a CUDA device from the index alone (no GPU needed); the GPU
tests (``tests/test_gpu.py``) check the figures against torch's own statistics."""

from __future__ import annotations

import pytest
import torch

import lowmoe
from lowmoe.engine import budget as budget_mod
from lowmoe.engine import stream as stream_mod
from lowmoe.engine.budget import SAFETY, _lazy_sizes, layer_sizes, plan_budget, plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.device import pinned_bytes
from lowmoe.engine.lazy import StagingPool
from lowmoe.engine.prefetch import IOStats

from .helpers import FAMILIES

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
# a group of 8 experts is 3 x 96 x 160 x 4 bytes x 8 = 1.47 MB: not a power of two
ODD = dict(layers=3, hidden_size=96, intermediate_size=160, experts=8, top_k=2, shard_size="5MB")


@pytest.fixture(autouse=True)
def _no_alloc_conf(monkeypatch):
    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("n, want", [(1, 1), (3, 4), (4096, 4096), (4097, 8192), (805306368, 1 << 30), (0, 0)])
def test_a_pinned_block_is_the_next_power_of_two(n, want):
    assert pinned_bytes(n, CUDA) == want
    assert pinned_bytes(n, CPU) == n, "nothing is pinned on a CPU pass"


@pytest.mark.parametrize("var, conf", [("PYTORCH_CUDA_ALLOC_CONF", "pinned_max_round_threshold_mb:64"),
                                       ("PYTORCH_ALLOC_CONF", "expandable_segments:True,pinned_max_round_threshold_mb:64"),
                                       ("PYTORCH_CUDA_ALLOC_CONF", "pinned_max_cached_size_mb:64")])
def test_torch_settings_that_skip_the_rounding_are_followed(monkeypatch, var, conf):
    monkeypatch.setenv(var, conf)
    assert pinned_bytes(100 << 20, CUDA) == 100 << 20, "above the threshold: as asked"
    assert pinned_bytes(40 << 20, CUDA) == 64 << 20, "below it: rounded"


def _plan(ck, device, **kw):
    return plan_lazy_budget(ck, device=device, dtype=torch.bfloat16, batch_size=2, seq_len=16, num_chunks=2, **kw)


def test_a_cuda_plan_books_pinned_blocks(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **ODD))
    cuda, cpu = _plan(ck, CUDA), _plan(ck, CPU)
    L = next(s for s in _lazy_sizes(ck) if s.num_experts)
    g = cuda.layers[L.idx].group_size
    assert g == L.num_experts  # no budget: the layer is one group
    buf = L.staging_buffer(g)
    assert buf == g * L.exp_stored and buf & (buf - 1), "the test needs a group that is not a power of two"
    assert cuda.host_terms["staging_pool"] == 2 * pinned_bytes(buf, CUDA) > 2 * buf
    assert cuda.staging_bytes == 3 * pinned_bytes(buf, CUDA)  # with layer prefetch: the third buffer
    assert cuda.host_terms["layer_non_expert_pinned"] == sum(pinned_bytes(n, CUDA) for n in L.res_keys) > 0
    assert cuda.host_peak_bytes == sum(cuda.host_terms.values())
    # a CPU pass pins nothing: its plan is as before
    assert "layer_non_expert_pinned" not in cpu.host_terms and cpu.host_terms["staging_pool"] == 2 * buf
    assert cpu.staging_bytes == 3 * buf


def test_a_ram_budget_that_fits_only_unrounded_buffers_takes_smaller_groups(synth_dir, monkeypatch):
    """The budget a plan blind to the rounding would fill with whole-layer groups: planned with torch's
    blocks, the groups shrink until the pinned buffers fit."""
    ck = Checkpoint(synth_dir("mixtral", **ODD))
    with monkeypatch.context() as m:
        m.setattr(budget_mod, "pinned_bytes", lambda n, d: int(n))
        blind = _plan(ck, CUDA)
        max_ram = int(blind.host_peak_bytes / (1 - SAFETY)) + 1
        assert max(p.group_size for p in _plan(ck, CUDA, max_ram=max_ram).layers.values() if p.chunked) == 8
    plan = _plan(ck, CUDA, max_ram=max_ram)
    assert max(p.group_size for p in plan.layers.values() if p.chunked) < 8
    assert plan.host_peak_bytes <= max_ram * (1 - SAFETY)


def test_a_whole_layer_cuda_plan_books_its_pinned_runtime_copy(synth_dir):
    """Passes that read whole layers (EEP, merging, --quant) pin the runtime copy on CUDA, one block a
    tensor: each non-expert tensor, and the experts stacked per name."""
    for arch in ("mixtral", "gpt_oss"):
        ck = Checkpoint(synth_dir(arch, **ODD))
        kw = dict(dtype=torch.bfloat16, batch_size=2, seq_len=16)
        cuda, cpu = plan_budget(ck, device=CUDA, **kw), plan_budget(ck, device=CPU, **kw)
        L = max(layer_sizes(ck), key=lambda s: s.stored_bytes)
        runtime = budget_mod._pinned_runtime_layer(ck, L, CUDA)
        assert cuda.host_layer_bytes == L.stored_bytes + runtime
        assert runtime >= L.stored_bytes, f"{arch}: every tensor is copied into pinned memory"
        assert cuda.host_layer_bytes > cpu.host_layer_bytes


def test_the_staging_pool_makes_a_buffer_when_first_taken():
    stats = IOStats()
    pool = StagingPool(3, 1024, stats=stats)
    shapes = {"w": ((16,), torch.float32)}
    assert pool.held_bytes == 0 and pool.allocations == 1, "sized, nothing made yet"
    pre = pool.try_acquire(shapes)
    assert pool.buffers_made == 1 and pool.held_bytes == 1024
    a, _ = pool.acquire(shapes)
    assert pool.buffers_made == 2
    pool.release(a)
    b, _ = pool.acquire(shapes)
    assert b == a and pool.buffers_made == 2, "a buffer already made is taken before a new one is made"
    assert stats.stages_json()["staging_alloc"]["count"] == 2
    pool.release(b)
    pool.close()
    assert pool.held_bytes == 1024, "close drops the free buffers; the preloaded one is still in use"
    assert pool.peak_bytes == 2048
    pool.release(pre[0])


def test_a_failed_allocation_leaves_the_pool_whole(monkeypatch):
    pool = StagingPool(2, 1024)
    shapes = {"w": ((16,), torch.float32)}
    real = pool._new

    def fail_once(n):
        monkeypatch.setattr(pool, "_new", real)
        raise MemoryError("pinned allocation failed")

    monkeypatch.setattr(pool, "_new", fail_once)
    with pytest.raises(MemoryError):
        pool.acquire(shapes)
    assert pool.in_use == 0
    i, _ = pool.acquire(shapes)
    j, _ = pool.acquire(shapes)
    assert {i, j} == {0, 1}


def test_a_pass_gives_its_pinned_blocks_back(synth_dir, calib_txt, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stream_mod, "release_pinned_cache", lambda d: calls.append(d))
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "o", keep=4, calib=[calib_txt], n_samples=4, seq_len=16,
                       batch_size=2, protect_super_experts=False)  # one pass: its stages are the report's
    assert calls == [torch.device("cpu")]
    made = rep["budget"]["staging_buffers_made"]
    assert 1 <= made <= 3, "each staging buffer made once"
    assert rep["budget"]["staging_buffers_made_ahead"] == 1, "the first one while the pass set up"
    # (the one made ahead is timed too, in the pass's stages or, if it was ready before them, not)
    assert made - 1 <= rep["stages"].get("staging_alloc", {}).get("count", 0) <= made
    assert rep["budget"]["staging_pool_bytes"] > 0
    assert "pinned" not in rep["budget"], "torch's pinned statistics are reported on CUDA only"
    serial = lowmoe.prune(synth_dir("mixtral"), tmp_path / "s", keep=4, calib=[calib_txt], n_samples=4, seq_len=16,
                          batch_size=2, protect_super_experts=False, prefetch=False)
    assert serial["budget"]["staging_buffers_made_ahead"] == 0, "--no-prefetch: nothing made ahead, on no other thread"


def test_eep_population_books_its_pinned_candidate_buffers(synth_dir):
    """Under a budget on CUDA the EEP evaluator keeps a candidate's E' experts (stacked per tensor) and
    its float32 accumulator in page-locked buffers: booked in torch's blocks."""
    from lowmoe.engine.budget import plan_population

    ck = Checkpoint(synth_dir("mixtral", **ODD))
    kw = dict(dtype=torch.bfloat16, batch_size=2, seq_len=16, max_ram=4 << 30)
    L = next(s for s in layer_sizes(ck) if s.num_experts)
    per = [ck.read_bytes(k) for k in ck.adapter.expert_keys(L.layer_idx, 0)]
    cuda = plan_population(ck, plan_budget(ck, device=CUDA, **kw), num_experts=4, batch_size=2, seq_len=16)
    cpu = plan_population(ck, plan_budget(ck, device=CPU, **kw), num_experts=4, batch_size=2, seq_len=16)
    want = sum(pinned_bytes(4 * n, CUDA) for n in per) + pinned_bytes(4 * L.expert_numel, CUDA)
    assert cuda.candidate_host_bytes == want > cpu.candidate_host_bytes == 4 * sum(per) + 4 * L.expert_numel


def test_the_first_buffer_made_ahead_is_the_one_taken():
    pool = StagingPool(3)
    pool.warm(1024)
    assert pool.made_ahead == 1 and pool.held_bytes == 1024 and pool.nbytes == 1024
    pool.warm(1024)
    assert pool.buffers_made == 1, "a free buffer is made already: nothing to do"
    i, _ = pool.acquire({"w": ((16,), torch.float32)})
    assert pool.buffers_made == 1, "the buffer made ahead was taken"
    pool.release(i)
    pool.close()
    pool.warm(1024)
    assert pool.buffers_made == 1, "a closed pool makes nothing"


def test_a_take_while_the_buffer_is_being_made_waits_for_it(monkeypatch):
    """The layer reader asking for its first buffer while the pass's warm-up is still page-locking it
    gets that buffer (the wait is what is left of making it) instead of making a second one."""
    import threading

    pool = StagingPool(2, 1024)
    other, _ = pool.acquire({"w": ((8,), torch.float32)})  # buffer 0, made now and in use
    started, go = threading.Event(), threading.Event()
    real = pool._new

    def slow(n):
        started.set()
        go.wait(5)
        return real(n)

    monkeypatch.setattr(pool, "_new", slow)
    warm = threading.Thread(target=pool.warm, args=(1024,))
    warm.start()
    assert started.wait(5)
    got = []
    taker = threading.Thread(target=lambda: got.append(pool.acquire({"w": ((16,), torch.float32)})))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive(), "it waits for the buffer being made (not 'all buffers in use', not a second one)"
    go.set()
    warm.join(5)
    taker.join(5)
    assert got and got[0][0] != other
    assert pool.buffers_made == 2 and pool.made_ahead == 1


def test_a_failed_warm_up_leaves_the_take_to_report(monkeypatch):
    pool = StagingPool(2)

    def fail(n):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(pool, "_new", fail)
    pool.warm(1024)  # logged, not raised
    assert pool.made_ahead == 0 and pool.in_use == 0
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.acquire({"w": ((16,), torch.float32)})
    assert pool.in_use == 0


@pytest.mark.parametrize("arch, quant", [(a, "none") for a in FAMILIES] + [("deepseek_v3", "fp8"), ("qwen3_moe", "fp8"),
                                                                       ("gpt_oss", "mxfp4")])
def test_the_planned_staging_buffer_holds_what_the_pool_asks_for(synth_dir, arch, quant):
    """The plan books a staging buffer from the index alone; torch rounds the pool's real request up
    to a power of two. Were the plan's figure below the request, the rounded block could be twice
    what was booked: for every family and the FP8 and MXFP4 layouts, it is at least the request."""
    from lowmoe.engine.lazy import ShardFiles, _aligned, _prod, read_lazy_layer

    kw = dict(dtype="bfloat16", quant=quant) if quant != "none" else {}
    if quant == "fp8":
        kw["fp8_block"] = 32
    ck = Checkpoint(synth_dir(arch, hidden_size=64, intermediate_size=64, **kw))
    sizes = {s.idx: s for s in _lazy_sizes(ck)}
    files = ShardFiles(ck.path)
    for L in ck.moe_layers():
        src = read_lazy_layer(ck, files, L).experts
        assert src is not None, f"{arch}/{quant}: layer {L} is read lazily"
        for g in (1, 3, ck.num_experts):
            asked = sum(_aligned(_prod(s) * dt.itemsize) for s, dt in src.buffer_shapes(g).values())
            planned = sizes[L].staging_buffer(g)
            assert asked <= planned, (arch, quant, L, g, asked, planned)
            assert pinned_bytes(asked, CUDA) <= pinned_bytes(planned, CUDA)


# ---- the device warmed up while the pass imports and tokenizes -----------------------------------

def test_warm_up_is_for_a_cuda_pass_with_prefetching():
    from lowmoe.engine.device import warm_up

    assert warm_up(CPU, 1 << 20) is None
    assert warm_up(CUDA, 1 << 20, enabled=False) is None  # --no-prefetch: nothing ahead, nothing on other threads


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure of a CUDA-less torch")
def test_a_failed_warm_up_is_reported_not_raised():
    from lowmoe.engine.device import DeviceWarmUp

    w = DeviceWarmUp(CUDA, 1 << 20)
    w.join()
    assert w.error and "CUDA" in w.error and w.seconds is not None


class _FakeWarmUp:
    def __init__(self):
        self.seconds, self.error = 0.25, None

    def join(self):
        pass

    def report(self):
        return {"s": self.seconds, "error": self.error}


@pytest.mark.parametrize("prefetch", [True, False])
def test_prune_and_score_warm_the_device_up_before_they_tokenize(synth_dir, calib_txt, tmp_path, monkeypatch, prefetch):
    """What a CUDA pass asks for, seen on a CPU: the warm-up starts with the planned staging buffer's
    size before the tokenizer is loaded, and its seconds are in the report's io."""
    import lowmoe.pipeline as pipeline_mod
    import lowmoe.score as score_mod
    from lowmoe.engine import calibration

    calls, order = [], []

    def fake(device, pinned=0, enabled=True):
        order.append("warm_up")
        calls.append((device, pinned, enabled))
        return _FakeWarmUp() if enabled else None

    real_load = calibration.load_tokenizer
    monkeypatch.setattr(stream_mod, "load_tokenizer", lambda p: order.append("tokenizer") or real_load(p))
    monkeypatch.setattr(pipeline_mod, "warm_up", fake)
    monkeypatch.setattr(score_mod, "warm_up", fake)
    src = synth_dir("mixtral")
    opts = dict(calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, prefetch=prefetch, progress=False)
    rep = lowmoe.prune(src, tmp_path / "o", keep=4, protect_super_experts=False, **opts)
    planned = rep["budget"]["plan"]["staging_buffer_bytes"]
    assert planned > 0 and calls[0] == (torch.device("cpu"), planned, prefetch)
    assert order.index("warm_up") < order.index("tokenizer")
    assert (rep["io"].get("device_warm_up") == {"s": 0.25, "error": None}) == prefetch
    srep = score_mod.score(src, out=tmp_path / "s.json", **opts)
    assert calls[-1][2] == prefetch and ("device_warm_up" in srep["io"]) == prefetch
