"""On a CUDA device: the same plan as on CPU, expert chunking exact, --max-vram held.

Every test here is marked ``gpu`` and skipped when CUDA is not available (CI is CPU-only).
"""

from __future__ import annotations

import pytest
import torch

import lowmoe
from lowmoe.engine.budget import build_layer
from lowmoe.engine.experts import ChunkedExperts
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.hf import LayerInputs, ModelSkeleton, MoeProbe, moe_modules, run_layer
from lowmoe.engine.lazy import ShardFiles, StagingPool, read_lazy_layer
from lowmoe.engine.prefetch import DeviceStager
from lowmoe.pipeline import REPORT

from .helpers import dir_digest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OPTS = dict(keep=4, n_samples=16, seq_len=32, batch_size=4, progress=False)
# ~200 MB of fp32 weights: large next to activations, so the budget is about weights
BIG = dict(layers=4, hidden_size=256, intermediate_size=2048, experts=8, top_k=2, shard_size="50MB")


def model_files(path):
    return {k: v for k, v in dir_digest(path).items() if k != REPORT}


@pytest.mark.parametrize("method", ["frequency", "reap"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "toy"])
def test_same_plan_on_cpu_and_gpu(synth_dir, calib_txt, tmp_path, arch, method):
    from lowmoe.toy.tasks import TOY_MODEL

    src = TOY_MODEL if arch == "toy" else synth_dir(arch)
    cpu = lowmoe.prune(src, tmp_path / "cpu", calib=[calib_txt], method=method, device="cpu", **OPTS)
    gpu = lowmoe.prune(src, tmp_path / "gpu", calib=[calib_txt], method=method, device="cuda", **OPTS)
    assert gpu["plan"]["layers"] == cpu["plan"]["layers"]
    for L, s in cpu["scores"].items():
        assert torch.allclose(torch.tensor(gpu["scores"][L]), torch.tensor(s), rtol=1e-4, atol=1e-6), L


def test_chunked_experts_on_cuda_bit_identical(synth_dir):
    src = synth_dir("qwen3_moe", top_k=4)
    ck = Checkpoint(src)
    skel = ModelSkeleton(ck.config, ck.adapter)
    dev = torch.device("cuda")
    rt = ck.adapter.to_runtime(1, ck.read_layer(1), True)
    whole = build_layer(skel, 1, rt, dev, torch.bfloat16)
    chunked = build_layer(skel, 1, rt, dev, torch.bfloat16, group_size=3)
    assert isinstance(moe_modules(ck.adapter, chunked)[2], ChunkedExperts)
    h = torch.randn(2, 16, ck.config["hidden_size"], generator=torch.Generator().manual_seed(0)).to(dev, torch.bfloat16)
    inputs = LayerInputs.build(skel, h, skel.rotary(dev))
    outs = []
    for layer in (whole, chunked):
        calls = []
        cb = calls.append
        with torch.no_grad(), MoeProbe(ck.adapter, layer, cb):
            outs.append(run_layer(skel, layer, 1, h, inputs))
        outs.append(calls[0].routed_output)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_grouped_experts_on_cuda(synth_dir, calib_txt, tmp_path):
    """--experts-impl auto is transformers' grouped GEMM on CUDA: experts in groups give the whole
    module's numbers, the whole module's experts call waits for the device less often than the eager
    loop's (which waits about five times per expert hit), and a prune keeps the experts the CPU keeps."""
    import warnings

    from lowmoe.engine.hf import resolve_experts_impl

    src = synth_dir("qwen3_moe", top_k=4)
    ck = Checkpoint(src)
    dev = torch.device("cuda")
    assert resolve_experts_impl("auto", dev) == "grouped"
    rt = ck.adapter.to_runtime(1, ck.read_layer(1), True)
    h = torch.randn(2, 16, ck.config["hidden_size"], generator=torch.Generator().manual_seed(0)).to(dev, torch.bfloat16)
    syncs = {}
    for impl in ("eager", "grouped"):
        skel = ModelSkeleton(ck.config, ck.adapter, experts=impl)
        whole = build_layer(skel, 1, rt, dev, torch.bfloat16)
        chunked = build_layer(skel, 1, rt, dev, torch.bfloat16, group_size=3)
        inputs = LayerInputs.build(skel, h, skel.rotary(dev))
        outs = []
        for layer in (whole, chunked):
            calls = []
            with torch.no_grad(), MoeProbe(ck.adapter, layer, calls.append):
                run_layer(skel, layer, 1, h, inputs)
            outs.append(calls[0])
        a, b = outs
        assert torch.equal(a.top_k_index, b.top_k_index)
        assert torch.allclose(a.routed_output.float(), b.routed_output.float(), rtol=2e-2,
                              atol=2e-2 * float(a.routed_output.abs().max()))
        experts = moe_modules(ck.adapter, whole)[2]
        x = a.moe_input.reshape(-1, a.moe_input.shape[-1])
        torch.cuda.synchronize()
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                experts(x, a.top_k_index, a.top_k_weights.to(torch.bfloat16))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs[impl] = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs["grouped"] < syncs["eager"], syncs
    cpu = lowmoe.prune(src, tmp_path / "cpu", calib=[calib_txt], device="cpu", **OPTS)
    gpu = lowmoe.prune(src, tmp_path / "gpu", calib=[calib_txt], device="cuda", **OPTS)
    assert gpu["experts_impl"] == "grouped" and cpu["experts_impl"] == "eager"
    assert gpu["plan"]["layers"] == cpu["plan"]["layers"]


def test_stager_copies_on_side_stream():
    st = DeviceStager(torch.device("cuda"))
    src = {"w": torch.randn(64, 64).pin_memory()}
    out = st.stage(src, torch.bfloat16).wait()
    assert out["w"].is_cuda and out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"].cpu(), src["w"].to(torch.bfloat16))


def test_prune_holds_a_third_of_the_model(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral", **BIG)
    budget = Checkpoint(src).total_bytes() // 3
    # fp32: the compute copy is as large as the stored model (in bf16 a third of it would hold every expert)
    ref = lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], device="cuda", dtype="fp32", **OPTS)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rep = lowmoe.prune(src, tmp_path / "bud", calib=[calib_txt], device="cuda", dtype="fp32", max_vram=budget, **OPTS)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ck = Checkpoint(src)
    groups = rep["budget"]["group_sizes"]
    assert groups and max(groups.values()) < ck.num_experts, "expert chunking must engage"
    assert peak <= budget, f"CUDA peak {peak} over the budget {budget}"
    assert rep["budget"]["accounted_peak_bytes"] <= budget
    planned = rep["budget"]["plan"]["device_peak_bytes"]
    assert peak <= planned, f"CUDA peak {peak} over the planned peak {planned} (a term is missing)"
    assert rep["plan"] == ref["plan"]
    assert model_files(tmp_path / "bud") == model_files(tmp_path / "ref")
    # the pinned staging pool: two buffers of one group (stored dtype), a third for the next layer's first
    # group, reused by every layer and group
    per_expert = max(ck.layer_bytes(L) for L in ck.moe_layers()) // ck.num_experts
    assert 0 < rep["budget"]["staging_pool_bytes"] <= 3 * (max(groups.values()) * per_expert + 4096)


def test_lazy_experts_on_cuda_bit_identical(synth_dir):
    src = synth_dir("mixtral", top_k=2)
    ck = Checkpoint(src)
    skel = ModelSkeleton(ck.config, ck.adapter)
    dev = torch.device("cuda")
    lazy = read_lazy_layer(ck, ShardFiles(ck.path), 1)
    whole = build_layer(skel, 1, ck.adapter.to_runtime(1, ck.read_layer(1), True), dev, torch.bfloat16)
    pool = StagingPool(2, pin=True)
    built = build_layer(skel, 1, ck.adapter.to_runtime(1, lazy.resident, True), dev, torch.bfloat16, group_size=3,
                        source=lazy.experts, pool=pool)
    h = torch.randn(2, 16, ck.config["hidden_size"], generator=torch.Generator().manual_seed(0)).to(dev, torch.bfloat16)
    inputs = LayerInputs.build(skel, h, skel.rotary(dev))
    with torch.no_grad():
        ref = run_layer(skel, whole, 1, h, inputs)
        for _ in range(3):
            assert torch.equal(run_layer(skel, built, 1, h, inputs), ref)
    assert pool.allocations == 1 and pool._bufs[0].is_pinned()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_layer_on_cuda_matches_cpu(synth_dir, mode):
    pytest.importorskip("bitsandbytes")
    from lowmoe.engine.quant import build_quantized_layer

    ck = Checkpoint(synth_dir("mixtral", hidden_size=64, intermediate_size=64))
    skel = ModelSkeleton(ck.config, ck.adapter)
    rt = ck.adapter.to_runtime(1, ck.read_layer(1), True)
    h = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for dev in (torch.device("cpu"), torch.device("cuda")):
        layer = build_quantized_layer(skel, 1, rt, dev, torch.float32, mode)  # quantized on dev by bitsandbytes
        x = h.to(dev)
        with torch.no_grad():
            outs.append(run_layer(skel, layer, 1, x, LayerInputs.build(skel, x, skel.rotary(dev))).cpu())
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_quantized_scores_and_streaming_eval_on_cuda(calib_txt):
    pytest.importorskip("bitsandbytes")
    from lowmoe.evaluate import evaluate
    from lowmoe.score import score
    from lowmoe.toy.tasks import TOY_MODEL

    kw = {"calib": [calib_txt], "method": ["frequency", "reap"], "keep": 4, "seq_len": 64, "n_samples": 8, "quant": "nf4",
          "progress": False}
    cpu, gpu = score(TOY_MODEL, device="cpu", **kw), score(TOY_MODEL, device="cuda", **kw)
    for L, e in cpu["layers"].items():
        for m in ("frequency", "reap"):
            assert torch.allclose(torch.tensor(gpu["layers"][L]["scores"][m]), torch.tensor(e["scores"][m]), rtol=1e-3, atol=1e-6)
    ev = {"tasks": "sort", "n": 50, "mode": "streaming", "batch_size": 50, "quant": "nf4", "max_vram": "1GiB"}
    a, b = evaluate(TOY_MODEL, device="cpu", **ev), evaluate(TOY_MODEL, device="cuda", **ev)
    assert sum(x != y for x, y in zip(a["tasks"]["sort"]["correct"], b["tasks"]["sort"]["correct"])) <= 1
    assert b["budget"]["cuda_max_memory_allocated"] < 2**30


def test_activations_stay_on_the_device_and_change_nothing(synth_dir, calib_txt, tmp_path, monkeypatch):
    """Unbudgeted, a small run keeps its activation cache on the GPU (no chunk read back from disk);
    the output is byte-identical to a run whose activations go through the disk."""
    from lowmoe.engine import stream as stream_mod

    src = synth_dir("mixtral")
    mem = lowmoe.prune(src, tmp_path / "mem", calib=[calib_txt], device="cuda", **OPTS)
    assert mem["activations"]["where"] == "cuda" and mem["activations"]["peak_in_memory_bytes"] > 0
    assert mem["io"]["bytes"].get("cache", 0) == 0 or mem["stages"]["cache_read"]["s"] < 1.0
    real = stream_mod.activation_memory
    monkeypatch.setattr(stream_mod, "activation_memory", lambda *a, **k: {**real(*a, **k), "held_bytes": 0, "where": "disk"})
    disk = lowmoe.prune(src, tmp_path / "disk", calib=[calib_txt], device="cuda", **OPTS)
    assert disk["activations"]["where"] == "disk"
    assert model_files(tmp_path / "mem") == model_files(tmp_path / "disk")


def test_nan_in_an_expert_is_found_on_the_device(synth_dir, calib_txt, tmp_path):
    """On CUDA the NaN/Inf check of lazily read experts runs on the device after the copy: it still
    stops the run with the error naming the layer."""
    from lowmoe.errors import CheckpointError

    from .helpers import edit_checkpoint

    import shutil

    src = tmp_path / "model"
    shutil.copytree(synth_dir("mixtral"), src)  # the cached model is shared: poison a copy

    def poison(name, t):
        if ".layers.1." in name and "experts.3." in name and t.is_floating_point():
            t = t.clone()
            t.view(-1)[5] = float("nan")
        return t

    edit_checkpoint(src, poison)
    with pytest.raises(CheckpointError, match="layer 1"):
        lowmoe.prune(src, tmp_path / "out", calib=[calib_txt], device="cuda", **OPTS)


def test_next_layers_first_group_is_staged_on_the_device(synth_dir, calib_txt, tmp_path):
    """On CUDA the next layer's first group is copied on the side stream while this layer runs its last
    pass: the same bytes as --no-prefetch, every later layer staged ahead, lowmoe's books inside the plan."""
    src = synth_dir("mixtral", **BIG)
    kw = dict(OPTS, method="frequency", device="cuda", protect_super_experts=False)
    on = lowmoe.prune(src, tmp_path / "on", calib=[calib_txt], prefetch=True, **kw)
    off = lowmoe.prune(src, tmp_path / "off", calib=[calib_txt], prefetch=False, **kw)
    assert on["budget"]["first_groups_staged_ahead"] == len(Checkpoint(src).moe_layers()) - 1
    assert on["budget"]["accounted_peak_bytes"] <= on["budget"]["plan"]["device_peak_bytes"]
    assert model_files(tmp_path / "on") == model_files(tmp_path / "off")
    assert on["scores"] == off["scores"]


def test_a_pass_gives_its_cublas_workspaces_back(synth_dir, calib_txt, tmp_path):
    """torch keeps a cuBLAS workspace (32 MiB on Hopper) per computing thread; the plan books them and
    the pass releases them at its end, so nothing of it stays allocated (the next pass's peak, or the
    caller's, starts without them)."""
    from lowmoe.engine.device import release_blas_workspaces

    src = synth_dir("mixtral", **BIG)
    budget = Checkpoint(src).total_bytes() // 2
    release_blas_workspaces(torch.device("cuda"))  # what earlier tests' matrix products left
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rep = lowmoe.prune(src, tmp_path / "out", calib=[calib_txt], device="cuda", dtype="fp32", max_vram=budget, **OPTS)
    torch.cuda.synchronize()
    assert rep["budget"]["plan"]["blas_workspace_bytes"] >= 1 << 20
    assert torch.cuda.memory_allocated() <= before
    assert torch.cuda.max_memory_allocated() - before <= budget


def test_pinned_host_memory_is_booked_and_given_back(synth_dir, calib_txt, tmp_path):
    """torch rounds every page-locked block up to a power of two and caches freed ones. The plan books the
    staging buffers and the reader's pinned copies at those sizes (``tests/test_pinned.py``); here torch's
    own statistics are held to it, and after the pass its cache holds nothing of lowmoe's."""
    from lowmoe.engine.device import pinned_stats, release_pinned_cache

    dev = torch.device("cuda")
    release_pinned_cache(dev)  # what earlier tests left cached
    if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        torch.cuda.reset_peak_host_memory_stats()
    if not pinned_stats(dev):
        pytest.skip(f"torch {torch.__version__} keeps no pinned-memory statistics")
    src = synth_dir("mixtral", **BIG)
    rep = lowmoe.prune(src, tmp_path / "out", calib=[calib_txt], device="cuda", dtype="fp32",
                       protect_super_experts=False, **OPTS)  # one pass: its stages are the report's
    plan, pinned = rep["budget"]["plan"], rep["budget"]["pinned"]
    terms = plan["host_terms"]
    booked = sum(terms[k] for k in ("staging_pool", "next_layer_prefetched", "layer_non_expert_pinned", "activation_chunks"))
    assert 0 < pinned["peak_bytes"] <= booked, (pinned, terms)
    made, ahead = rep["budget"]["staging_buffers_made"], rep["budget"]["staging_buffers_made_ahead"]
    assert ahead == 1 and made - ahead <= rep["stages"].get("staging_alloc", {}).get("count", 0) <= made
    assert pinned_stats(dev)["current_bytes"] < 1 << 20, "the pass gave its pinned blocks back"


def test_the_device_warm_up_leaves_the_first_staging_buffer_cached(synth_dir, calib_txt, tmp_path):
    """A pass creates the CUDA context and page-locks its first staging buffer on a thread of its own
    while it imports and tokenizes (``device.DeviceWarmUp``); the pool's buffer of that size then
    comes from torch's cache instead of a new page-locked allocation."""
    from lowmoe.engine.device import DeviceWarmUp, pinned_stats, release_pinned_cache

    dev = torch.device("cuda")
    release_pinned_cache(dev)
    if pinned_stats(dev).get("blocks_made") is None:
        pytest.skip(f"torch {torch.__version__} keeps no pinned-memory statistics")
    n = 48 << 20
    w = DeviceWarmUp(dev, n)
    w.join()
    assert w.error is None and w.seconds > 0
    made = pinned_stats(dev)["blocks_made"]
    buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)  # what the staging pool asks for
    assert pinned_stats(dev)["blocks_made"] == made, "served from the block the warm-up left cached"
    del buf
    release_pinned_cache(dev)
    rep = lowmoe.prune(synth_dir("mixtral", **BIG), tmp_path / "out", calib=[calib_txt], device="cuda", **OPTS)
    assert rep["io"]["device_warm_up"]["error"] is None


def _calls_on_cpu_and_cuda(seed: int, domains: int | None = None) -> dict:
    """One MoE call (64 tokens, 8 experts, top-2, a quarter of the tokens not counted), on the CPU and
    on CUDA, with ``domains`` calibration domains (None: no domain labels)."""
    from lowmoe.engine.hf import MoeCall

    g = torch.Generator().manual_seed(seed)
    T, E, K, H = 64, 8, 2, 16
    logits = torch.randn(T, E, generator=g)
    idx = logits.topk(K, dim=-1).indices
    host = dict(router_logits=logits, top_k_index=idx, top_k_weights=torch.softmax(logits.gather(1, idx), -1),
                moe_input=torch.randn(T, H, generator=g), routed_output=torch.randn(T, H, generator=g),
                token_mask=torch.rand(T, generator=g) > 0.25, expert_outputs=torch.randn(T, K, H, generator=g))
    if domains is not None:
        host["token_domain"] = torch.randint(0, domains, (T,), generator=g)
    return {d: MoeCall(experts=None, num_domains=domains, **{k: v.to(d) for k, v in host.items()}) for d in ("cpu", "cuda")}


def _observe_without_waiting(made: dict, calls: dict) -> None:
    """``made["cuda"]`` observes the CUDA call four times, the last three under
    ``set_sync_debug_mode("error")`` (any host wait raises); ``made["cpu"]`` the CPU call four times."""
    made["cuda"].observe(calls["cuda"])  # first call: the accumulators are made on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            made["cuda"].observe(calls["cuda"])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for _ in range(4):
        made["cpu"].observe(calls["cpu"])


def test_scorers_observe_without_waiting_for_the_device(synth_dir, calib_txt, tmp_path):
    """Every scorer and the super-expert maxima observe a layer's CUDA calls with no host wait
    (``torch.cuda.set_sync_debug_mode("error")`` raises on any); the totals reach the host when the
    layer is read, and they equal the CPU's."""
    from lowmoe.methods.scoring import SCORERS, make_scorer
    from lowmoe.methods.scoring.super_experts import MaximaObserver

    E, K = 8, 2
    calls = _calls_on_cpu_and_cuda(seed=0, domains=2)
    for method in list(SCORERS) + ["maxima"]:
        made = {d: MaximaObserver(E) if method == "maxima" else make_scorer(method, E, K) for d in calls}
        _observe_without_waiting(made, calls)
        if method == "maxima":
            for m in made.values():
                m.commit(0)
            assert torch.equal(made["cuda"].maxima[0], made["cpu"].maxima[0])
        else:
            assert torch.allclose(made["cuda"].scores(), made["cpu"].scores(), rtol=1e-6, atol=1e-9), method
            assert made["cuda"].state()["routed_tokens"] == made["cpu"].state()["routed_tokens"]
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", calib=[calib_txt], device="cuda", method="reap", **OPTS)
    assert rep["plan"]["layers"]


def test_merging_statistics_observe_without_waiting_for_the_device():
    """The merging methods' routing statistics and C-Prune's saliency (``LayerStats``) observe CUDA
    calls with no host wait, and equal the CPU's once read."""
    from lowmoe.methods.merging.stats import LayerStats

    calls = _calls_on_cpu_and_cuda(seed=1)
    E, K = 8, 2
    made = {d: LayerStats(E, K, router_gram=True, saliency=True) for d in calls}
    _observe_without_waiting(made, calls)
    gpu, cpu = made["cuda"], made["cpu"]
    assert gpu.tokens == cpu.tokens and torch.equal(gpu.counts, cpu.counts)
    for name in ("gate_mass", "router_gram", "saliency_sum"):
        assert torch.allclose(getattr(gpu, name), getattr(cpu, name), rtol=1e-6), name


def test_a_layers_chunks_are_queued_without_waiting_for_each(synth_dir, calib_txt, monkeypatch):
    """On CUDA the host waits for a layer's kernels once, at the layer's end (its chunks' NaN/Inf
    checks read together), not after each chunk; CUDA events time the kernels (``compute_device``)."""
    from lowmoe.engine import stream as stream_mod
    from lowmoe.score import score

    waits = []
    orig = stream_mod.synchronize
    monkeypatch.setattr(stream_mod, "synchronize", lambda d: waits.append(d) or orig(d))
    opts = dict(n_samples=16, seq_len=32, batch_size=4, progress=False, dtype="fp32")
    rep = score(synth_dir("mixtral", **BIG), calib=[calib_txt], method="reap", device="cuda", **opts)
    layers = BIG["layers"]
    assert len(waits) == layers, "one wait per layer"
    st = rep["stages"]
    chunks = opts["n_samples"] // opts["batch_size"]
    assert st["compute_device"]["thread"] == "device" and st["compute_device"]["count"] == layers
    assert 0 < st["compute_device"]["s"] <= st["compute"]["s"] + st.get("observe", {}).get("s", 0) + 1.0
    assert st["compute"]["count"] == layers * chunks + layers
    cpu = score(synth_dir("mixtral", **BIG), calib=[calib_txt], method="reap", device="cpu", **opts)
    for L, e in cpu["layers"].items():
        assert torch.allclose(torch.tensor(rep["layers"][L]["scores"]["reap"]), torch.tensor(e["scores"]["reap"]),
                              rtol=1e-3, atol=1e-6), L


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_eep_candidate_built_a_group_at_a_time_on_cuda(synth_dir, tmp_path, quant):
    """The EEP population pass on CUDA with a candidate's experts built from the shards (or the NF4
    cache) a group at a time, in waves of chunks, page-locked staging: the fitness of the unbudgeted
    pass on the card (both with the eager experts loop), and nothing left on the device after it."""
    from dataclasses import replace

    import numpy as np

    from lowmoe.engine.budget import plan_budget, plan_sourced_population
    from lowmoe.engine.calibration import load_tokenizer
    from lowmoe.engine.quant import layer_weights
    from lowmoe.methods.eep.fitness import FitnessData
    from lowmoe.methods.eep.population import PopulationEvaluator
    from lowmoe.methods.eep.space import SearchSpace

    from .helpers import merged, population, records

    src = synth_dir("mixtral")
    ck = Checkpoint(src)
    data = FitnessData.from_records(records(8), load_tokenizer(src))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    seq_len = int(data.input_ids.shape[1])
    run = plan_budget(ck, device=torch.device("cuda"), dtype=torch.float32, batch_size=4, seq_len=seq_len,
                      max_ram=10**12, max_vram=10**10)
    pop = plan_sourced_population(ck, run, num_experts=4, batch_size=4, seq_len=seq_len, quant=quant, groups=True,
                                  num_chunks=3)
    pop = replace(pop, layers={L: replace(p, group_size=2) for L, p in pop.layers.items()},
                  plan=replace(pop.plan, wave_chunks=2, wave_chunk_bytes=1))

    def evaluator(root, budget):
        weights = layer_weights(ck, quant, tmp_path / "cache")
        return PopulationEvaluator(ck, weights, space, data, tmp_path / root, device="cuda", dtype=torch.float32,
                                   top_k=2, batch_size=4, budget=budget, experts="eager")

    rng = np.random.default_rng(0)
    cands = population(space, rng) + [merged(space, space.random_onehot(rng), rng)]
    want = [(f.acc, f.ll) for f in evaluator("ref", None).evaluate(cands)]
    small = evaluator("small", pop)
    assert [(f.acc, f.ll) for f in small.evaluate(cands)] == want
    assert small.stats["source_reads"] > 0 and small.stats["chunked_blocks"] > 0
    assert small._pool is None and not small._buffers  # dropped between generations
