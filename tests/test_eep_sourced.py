"""The EEP search under a ``--max-ram`` too small to hold a layer's experts: the population pass reads
each candidate's experts from the shards one source at a time (``budget.plan_sourced_population``,
``LoadedLayer._sourced_experts``) and gives exactly the fitness of the unbudgeted pass; the seed
passes read experts in groups as the prune does; a prune writes the same checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import lowmoe
from lowmoe.engine.budget import (plan_budget, plan_lazy_budget, plan_population, plan_sourced_population,
                                  population_floors)
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.lazy import ExpertSource
from lowmoe.errors import ConfigError

from .helpers import dir_digest, evaluator, merged, population, records, write_jsonl

KEEP = 4
CPU = torch.device("cpu")
FP8 = dict(layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
           quant="fp8", fp8_block=32)
MODELS = {
    "mixtral": ("mixtral", {}),
    "deepseek_v3": ("deepseek_v3", {}),  # a dense first layer, shared experts
    "gpt_oss": ("gpt_oss", {}),  # fused experts: rows of the stored tensors
    "mixtral-fp8": ("mixtral", FP8),  # FP8 experts decoded as Checkpoint.read_layer decodes them
    "gpt_oss-mxfp4": ("gpt_oss", dict(dtype="bfloat16", quant="mxfp4", intermediate_size=64, hidden_size=64)),
}
# experts large enough that a layer as read, not the interpreter, sets what the held plan needs
WIDE = dict(layers=2, hidden_size=256, intermediate_size=2048, shard_size="8MB")


class NoWholeLayers:
    """Weights whose whole layers must never be read (a sourced pass reads the shards itself)."""

    mode = "none"
    bytes_read = 0

    def layer(self, layer_idx: int):
        raise AssertionError(f"layer {layer_idx} read whole")


def sourced_budget(src, seq_len: int, *, groups_of_one: bool = False, groups: bool = False, num_chunks: int = 3):
    """The sourced population budget of ``src`` (roomy, or at its floor: groups of one expert), the
    candidate's experts held (``groups`` False) or built a group at a time."""
    ck = Checkpoint(src)
    run = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=seq_len, max_ram=10**12)
    kw = dict(num_experts=KEEP, batch_size=4, seq_len=seq_len, groups=groups, num_chunks=num_chunks)
    pop = plan_sourced_population(ck, run, **kw)
    if groups_of_one:
        run.max_ram = population_floors(ck, run, num_experts=KEEP, batch_size=4,
                                        seq_len=seq_len)["sourced_groups" if groups else "sourced"]
        pop = plan_sourced_population(ck, run, **kw)
    return pop


def regrouped(pop, group_size: int, wave_chunks: int):
    """``pop`` (built a group at a time) with groups of ``group_size`` and waves of ``wave_chunks``."""
    assert pop.candidate_groups
    layers = {L: replace(p, group_size=group_size) for L, p in pop.layers.items()}
    return replace(pop, layers=layers, plan=replace(pop.plan, wave_chunks=wave_chunks, wave_chunk_bytes=1))


@pytest.mark.parametrize("groups", [False, True], ids=["held", "built-in-groups"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sourced_fitness_equals_unbudgeted(synth_dir, tmp_path, name, groups):
    """Pruning-phase (sorted and unsorted keep-sets) and merging-phase candidates, prefix sharing, a
    second generation: the same fitness to the bit, with no layer ever read whole -- the candidate's
    experts held, or built one at a time when the device runs them."""
    arch, kw = MODELS[name]
    src = synth_dir(arch, **kw)
    ref = evaluator(src, tmp_path / "ref")
    seq_len = int(ref.data.input_ids.shape[1])
    budget = sourced_budget(src, seq_len, groups_of_one=True, groups=groups)
    assert budget.sourced and budget.candidate_groups == groups and {p.group_size for p in budget.layers.values()} == {1}
    small = evaluator(src, tmp_path / "small", budget=budget)
    small.weights = NoWholeLayers()
    rng = np.random.default_rng(0)
    cands = population(ref.space, rng) + [merged(ref.space, ref.space.random_onehot(rng), rng)]
    unsorted = ref.space.random_onehot(rng)
    unsorted.em[0] = unsorted.em[0][::-1].copy()  # keep [e3, e2, e1, e0]: rows out of order
    unsorted.rm[0] = unsorted.rm[0][::-1].copy()
    cands.append(unsorted)
    assert [(f.acc, f.ll) for f in small.evaluate(cands)] == [(f.acc, f.ll) for f in ref.evaluate(cands)]
    assert small.stats["sourced"] and small.stats["source_reads"] > 0
    assert small.stats["chunked_blocks"] == small.stats["layer_builds"] > 0
    more = [merged(ref.space, cands[0], rng), ref.space.random_onehot(rng)]
    assert [(f.acc, f.ll) for f in small.evaluate(more)] == [(f.acc, f.ll) for f in ref.evaluate(more)]


def test_a_candidate_reads_only_its_sources(synth_dir, tmp_path, monkeypatch):
    """A kept expert is read once (a run of consecutive ones in one read), a merged expert reads each
    source with a nonzero coefficient once per output row, one expert at a time."""
    src = synth_dir("mixtral")
    ref = evaluator(src, tmp_path / "ref")
    seq_len = int(ref.data.input_ids.shape[1])
    small = evaluator(src, tmp_path / "small", budget=sourced_budget(src, seq_len))
    calls: list[tuple[int, int]] = []
    real = ExpertSource.load

    def load(self, a, z, out=None, check=True):
        calls.append((a, z))
        return real(self, a, z, out, check)

    monkeypatch.setattr(ExpertSource, "load", load)
    space = ref.space
    keep = space.from_keep({L: [1, 2, 3, 6] for L in ref.ck.moe_layers()})
    small.evaluate([keep])
    assert sorted(calls) == sorted([(1, 4), (6, 7)] * len(ref.ck.moe_layers()))
    calls.clear()
    m = keep.em.copy()
    m[:, 0] = 0.0
    m[:, 0, [0, 5]] = [0.5, 0.5]  # output 0 merges experts 0 and 5; outputs 1..3 are experts 2, 3, 6
    cand = type(keep)(m, keep.rm.copy()).canonical()
    small.evaluate([cand])
    assert all(z == a + 1 for a, z in calls), "a merge reads one source at a time"
    per_layer = sorted(a for a, _ in calls[:len(calls) // len(ref.ck.moe_layers())])
    assert per_layer == [0, 2, 3, 5, 6]
    # a dense W_EM: with room for the 4 outputs' sums, each source is read once a candidate; at the
    # floor (one output at a time) once per output
    dense = type(keep)(np.full_like(keep.em, 1 / 8), keep.rm.copy()).canonical()
    assert small.budget.merge_block == KEEP
    calls.clear()
    small.evaluate([dense])
    assert len(calls) == 8 * len(ref.ck.moe_layers())
    floor = evaluator(src, tmp_path / "floor", budget=sourced_budget(src, seq_len, groups_of_one=True))
    assert floor.budget.merge_block == 1
    calls.clear()
    got = floor.evaluate([dense])
    assert len(calls) == KEEP * 8 * len(ref.ck.moe_layers())
    assert [(f.acc, f.ll) for f in got] == [(f.acc, f.ll) for f in ref.evaluate([dense])]
    # blocks that do not divide E' give the same bits
    three = evaluator(src, tmp_path / "three", budget=replace(sourced_budget(src, seq_len), merge_block=3))
    rng = np.random.default_rng(3)
    cands = [dense, merged(space, keep, rng, scale=0.5), merged(space, space.random_onehot(rng), rng, scale=0.5)]
    assert [(f.acc, f.ll) for f in three.evaluate(cands)] == [(f.acc, f.ll) for f in ref.evaluate(cands)]


@pytest.mark.parametrize("wave", [1, 2, 3])
def test_candidate_built_a_group_at_a_time_in_waves(synth_dir, tmp_path, monkeypatch, wave):
    """Built a group at a time, in groups of 2 of the candidate's 4 experts, the 3 activation chunks in
    waves of 1, 2 (a wave of two, then one of one) or 3: the same fitness to the bit; each group is built
    once per wave, but the one a wave ends with is still on the device for the next (a dense W_EM reads
    every source once per group built), and no buffer ever holds the candidate's 4 experts together."""
    from lowmoe.methods.eep.population import PopulationEvaluator

    src = synth_dir("mixtral")
    ref = evaluator(src, tmp_path / "ref")
    seq_len = int(ref.data.input_ids.shape[1])
    assert ref.num_chunks == 3
    budget = regrouped(sourced_budget(src, seq_len, groups=True), 2, wave)
    small = evaluator(src, tmp_path / "small", budget=budget)
    space = ref.space
    rng = np.random.default_rng(7)
    keep = space.random_onehot(rng)
    dense = type(keep)(np.full_like(keep.em, 1 / 8), keep.rm.copy()).canonical()
    cands = population(space, rng) + [merged(space, space.random_onehot(rng), rng), dense]
    assert [(f.acc, f.ll) for f in small.evaluate(cands)] == [(f.acc, f.ll) for f in ref.evaluate(cands)]
    assert small.stats["chunked_blocks"] == small.stats["layer_builds"] > 0
    calls: list[tuple[int, int, int]] = []
    shapes: dict[str, tuple] = {}
    real_load, real_buffer = ExpertSource.load, PopulationEvaluator.buffer

    def load(self, a, z, out=None, check=True):
        calls.append((self.layer_idx, a, z))
        return real_load(self, a, z, out, check)

    def buffer(self, name, shape, dtype, host=False, pin=True):
        shapes[name] = tuple(shape)
        return real_buffer(self, name, shape, dtype, host, pin)

    monkeypatch.setattr(ExpertSource, "load", load)
    monkeypatch.setattr(PopulationEvaluator, "buffer", buffer)
    fresh = evaluator(src, tmp_path / "fresh", budget=budget)
    fresh.evaluate([dense])
    first = fresh.ck.moe_layers()[0]  # every position runs there (the last layer's scored ones may not hit a group)
    # both groups built in the first wave; each later one starts from the group left on the device
    assert len([c for c in calls if c[0] == first]) == (2 + (-(-3 // wave) - 1)) * 8
    assert all(z == a + 1 for _, a, z in calls)
    assert not any(k.startswith("host:candidate:") for k in shapes), "the candidate's experts are never held together"
    assert {v[0] for k, v in shapes.items() if k.startswith("host:acc:")} == {2}


def test_plan_falls_back_to_sourced_only_when_a_layer_does_not_fit(synth_dir):
    """A layer held where it fits; else a candidate's experts read from the shards and held; else built
    a group at a time, in waves of as many activation chunks as fit. Refused below that, in one line."""
    src = synth_dir("mixtral", **WIDE)
    ck = Checkpoint(src)
    kw = dict(device=CPU, dtype=torch.float32, batch_size=4, seq_len=32)
    pop_kw = dict(num_experts=KEEP, batch_size=4, seq_len=32, num_chunks=3)
    roomy = plan_population(ck, plan_budget(ck, max_ram=10**10, **kw), **pop_kw)
    assert not roomy.sourced
    floors = population_floors(ck, plan_budget(ck, max_ram=10**10, **kw), num_experts=KEEP, batch_size=4, seq_len=32)
    assert floors["sourced_groups"] < floors["sourced"] < floors["layer_held"]
    tight = plan_budget(ck, max_ram=10**10, **kw)
    tight.max_ram = floors["sourced"]
    got = plan_population(ck, tight, **pop_kw)
    assert got.sourced and not got.candidate_groups and got.plan.host_peak_bytes <= tight.max_ram
    assert set(got.plan.host_terms) >= {"candidate_experts", "merge_temporaries", "compute_copy"}
    tight.max_ram = floors["sourced"] - 1
    got = plan_population(ck, tight, **pop_kw)
    assert got.sourced and got.candidate_groups and got.plan.host_peak_bytes <= tight.max_ram
    assert "candidate_experts" not in got.plan.host_terms and "candidate_expert_group" in got.plan.host_terms
    # the room a held candidate would take goes to the waves first (each group built once for the 3 chunks)
    assert got.wave_chunks == 3 and got.to_json()["candidate_groups"] and got.to_json()["wave_chunks"] == 3
    assert got.plan.device_terms["wave_chunks_waiting"] == 2 * got.plan.wave_chunk_bytes > 0
    tight.max_ram = floors["sourced_groups"]
    got = plan_population(ck, tight, **pop_kw)
    assert got.candidate_groups and got.wave_chunks == 1 and {p.group_size for p in got.layers.values()} == {1}
    assert got.plan.host_peak_bytes <= tight.max_ram and got.plan.min_max_ram == floors["sourced_groups"]
    # with --quant nf4 the experts come from the cache, dequantized: a floor of its own
    nf4 = population_floors(ck, plan_budget(ck, max_ram=10**10, **kw), num_experts=KEEP, batch_size=4, seq_len=32,
                            quant="nf4")
    tight.max_ram = nf4["sourced_groups"]
    got = plan_population(ck, tight, quant="nf4", **pop_kw)
    assert got.sourced and got.candidate_groups and got.quant == "nf4" and got.to_json()["quant"] == "nf4"
    tight.max_ram = floors["sourced_groups"] - 1
    with pytest.raises(ConfigError, match=r"^--max-ram .* too small for the EEP search even building a candidate's "
                                          r"experts from the shards one at a time: .*raise --max-ram$") as e:
        plan_population(ck, tight, **pop_kw)
    assert "\n" not in str(e.value)


def test_prune_eep_under_a_small_max_ram_writes_the_same_checkpoint(synth_dir, tmp_path, monkeypatch):
    """A --max-ram below what one layer as read needs: the seed passes read experts in groups, the
    population reads them from the shards; same search, same written model."""
    src = synth_dir("mixtral", **WIDE)
    ck = Checkpoint(src)
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    opts = dict(keep=KEEP, method="eep", calib=[train], seq_len=32, batch_size=4, progress=False, device="cpu",
                method_options={"generations": 2, "population": 2, "prune_generations": 1, "layer_groups": "layer",
                                "init": "frequency"})
    ref = lowmoe.prune(src, tmp_path / "a", **opts)
    run = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=32, max_ram=10**12)
    floor = plan_sourced_population(ck, run, num_experts=KEEP, batch_size=4, seq_len=32).plan.min_max_ram
    seed_floor = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=32,
                                  max_ram=10**12).min_max_ram
    ram = max(floor, seed_floor)
    with monkeypatch.context() as m:  # the seed passes, the population and the writer: no layer read whole
        m.setattr(Checkpoint, "read_layer", lambda self, L: pytest.fail(f"layer {L} read whole"))
        small = lowmoe.prune(src, tmp_path / "b", max_ram=ram, **opts)
    stats = small["eep"]["stream_stats"]
    assert stats["sourced"] and stats["source_reads"] > 0 and stats["planned_host_peak_bytes"] <= ram
    assert small["eep"]["population_budget"]["sourced"] and small["eep"]["population_budget"]["host_peak_bytes"] <= ram
    assert small["eep"]["population_budget"]["candidate_groups"], "at its floor a candidate is built a group at a time"
    assert ref["eep"]["population_budget"] is None

    def curve(r):
        return [{k: v for k, v in c.items() if k != "elapsed_s"} for c in r["eep"]["curve"]]

    assert [c["phase"] for c in ref["eep"]["curve"]] == ["prune", "merge"]
    assert curve(small) == curve(ref)
    assert small["eep"]["seeds"] == ref["eep"]["seeds"]
    assert small["plan"]["layers"] == ref["plan"]["layers"]
    digest = {k: v for k, v in dir_digest(tmp_path / "a").items() if k.endswith(".safetensors")}
    assert digest and {k: v for k, v in dir_digest(tmp_path / "b").items() if k.endswith(".safetensors")} == digest


def test_prune_eep_below_the_sourced_floor_fails_before_the_search(synth_dir, tmp_path):
    src = synth_dir("mixtral", **WIDE)
    ck = Checkpoint(src)
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    run = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=32, max_ram=10**12)
    floor = plan_sourced_population(ck, run, num_experts=KEEP, batch_size=4, seq_len=32).plan.min_max_ram
    seed_floor = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=32,
                                  max_ram=10**12).min_max_ram
    assert seed_floor < floor, "this model's population floor is the higher one"
    with pytest.raises(ConfigError, match=r"^--max-ram .*EEP search") as e:
        lowmoe.prune(src, tmp_path / "out", keep=KEEP, method="eep", calib=[train], seq_len=32, batch_size=4,
                     progress=False, device="cpu", max_ram=floor - 10**6,
                     method_options={"generations": 1, "population": 2, "layer_groups": "layer", "init": "random"})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / ".lowmoe-work" / "eep" / "state.json").exists()


def test_inspect_shows_the_eep_search_floor(synth_dir, tmp_path):
    """``lowmoe inspect --method eep``: the floors of each way of holding the population's layers, the
    search's smallest --max-ram (which works; a MiB less is refused), and the plan under a budget."""
    from click.testing import CliRunner

    from lowmoe.cli import main
    from lowmoe.inspect import inspect_model

    src = synth_dir("mixtral", **WIDE)
    e = inspect_model(src, method="eep", keep=KEEP, seq_len=32, batch_size=4)["budget"]["eep"]
    floors = e["population_floor_bytes"]
    assert floors["sourced"] < floors["layer_held"], "reading experts from the shards needs less than a held layer"
    assert floors["sourced_groups"] < floors["sourced"], "and building them a group at a time, less again"
    ck = Checkpoint(src)
    run = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=32, max_ram=e["min_max_ram_bytes"])
    assert plan_population(ck, run, num_experts=KEEP, batch_size=4, seq_len=32).sourced
    low = e["min_max_ram_bytes"] - 2**21
    with pytest.raises(ConfigError, match=r"^--max-ram"):
        plan_population(ck, plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=32,
                                             max_ram=max(low, run.min_max_ram)), num_experts=KEEP, batch_size=4, seq_len=32)
    under = inspect_model(src, method="eep", keep=KEEP, seq_len=32, batch_size=4, max_ram=e["min_max_ram_bytes"])
    assert under["budget"]["eep"]["population"]["sourced"] and under["budget"]["eep"]["population"]["candidate_groups"]
    r = CliRunner().invoke(main, ["inspect", str(src), "--method", "eep", "--keep", "4", "--seq-len", "32",
                                  "--batch-size", "4", "--max-ram", str(e["min_max_ram_bytes"]), "--n-samples", "8"])
    assert r.exit_code == 0, r.output
    assert "(groups of 1, 1 activation chunk(s) a wave)" in r.output
    assert "EEP search   smallest --max-ram" in r.output and "a candidate's built a group at a time" in r.output
    assert "each candidate's experts built from the shards a group at a time" in r.output
    r = CliRunner().invoke(main, ["inspect", str(src), "--method", "eep", "--quant", "nf4"])
    assert r.exit_code == 0 and "--quant nf4" in r.output, r.output
    r = CliRunner().invoke(main, ["inspect", str(src), "--method", "eep", "--n-samples", "0"])
    assert r.exit_code == 2 and "--n-samples 0: expected at least 1" in r.output and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["inspect", str(src), "--quant", "nf4"])
    assert r.exit_code == 2 and "--quant nf4: only the EEP search" in r.output and r.output.count("\n") == 1, r.output


@pytest.mark.parametrize("quant", ["fp8", pytest.param("mxfp4", marks=pytest.mark.slow)])  # MXFP4's synth: ~10 s
def test_prune_eep_on_a_quantized_checkpoint_under_a_small_max_ram(synth_dir, tmp_path, quant):
    """FP8 (per-expert) and MXFP4 (GPT-OSS, fused): the search at its smallest --max-ram reads each
    candidate's experts from the shards, decoded as a whole-layer read decodes them; same search,
    same written bytes (kept experts copied, merged ones re-quantized) as without a budget."""
    from lowmoe.inspect import inspect_model

    # the smallest sizes at which a layer as read, not the interpreter's share, sets the held plan's floor
    arch, kw = (("mixtral", dict(quant="fp8", fp8_block=128, hidden_size=384, intermediate_size=2048)) if quant == "fp8"
                else ("gpt_oss", dict(quant="mxfp4", hidden_size=384, intermediate_size=4096)))
    src = synth_dir(arch, layers=2, shard_size="32MB", dtype="bfloat16", **kw)
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    opts = dict(keep=KEEP, method="eep", calib=[train], seq_len=32, batch_size=4, progress=False, device="cpu",
                method_options={"generations": 2, "population": 2, "prune_generations": 1, "layer_groups": "layer",
                                "init": "frequency"})
    ref = lowmoe.prune(src, tmp_path / "a", **opts)
    e = inspect_model(src, method="eep", keep=KEEP, seq_len=32, batch_size=4)["budget"]["eep"]
    assert e["population_floor_bytes"]["sourced"] < e["population_floor_bytes"]["layer_held"]
    small = lowmoe.prune(src, tmp_path / "b", max_ram=e["min_max_ram_bytes"], **opts)
    assert small["eep"]["stream_stats"]["sourced"]
    assert [c["phase"] for c in ref["eep"]["curve"]] == ["prune", "merge"]
    assert [{k: v for k, v in c.items() if k != "elapsed_s"} for c in small["eep"]["curve"]] == \
        [{k: v for k, v in c.items() if k != "elapsed_s"} for c in ref["eep"]["curve"]]
    digest = {k: v for k, v in dir_digest(tmp_path / "a").items() if k.endswith(".safetensors")}
    assert digest and {k: v for k, v in dir_digest(tmp_path / "b").items() if k.endswith(".safetensors")} == digest


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_sourced_fitness_from_the_quant_cache_equals_the_held_one(synth_dir, tmp_path, monkeypatch, mode, arch):
    """``--quant nf4|int8`` under a budget that cannot hold a layer: each candidate's experts are read
    from the quantized cache and dequantized one tensor (GPT-OSS: one fused tensor's row) at a time,
    giving the held cache's fitness to the bit; the cache itself is built without reading a layer whole."""
    from lowmoe.engine.quant import QuantizedWeights, layer_weights

    # GPT-OSS: rows of 96 values, so int8's blocks of 256 start inside rows
    src = synth_dir(arch, hidden_size=64, intermediate_size=128) if arch == "mixtral" else \
        synth_dir(arch, hidden_size=64, intermediate_size=48)
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "read_layer", lambda self, L: pytest.fail(f"layer {L} read whole"))
        built = layer_weights(Checkpoint(src), mode, tmp_path / "cache")
    assert isinstance(built, QuantizedWeights)
    ref = evaluator(src, tmp_path / "ref", weights=built)
    seq_len = int(ref.data.input_ids.shape[1])
    ck = Checkpoint(src)
    run = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=4, seq_len=seq_len, max_ram=10**12)
    budget = plan_sourced_population(ck, run, num_experts=KEEP, batch_size=4, seq_len=seq_len, quant=mode)
    run.max_ram = budget.plan.min_max_ram
    budget = plan_sourced_population(ck, run, num_experts=KEEP, batch_size=4, seq_len=seq_len, quant=mode)
    assert budget.quant == mode and budget.merge_block == 1
    small = evaluator(src, tmp_path / "small", weights=layer_weights(ck, mode, tmp_path / "cache"), budget=budget)
    small.weights.layer = lambda L: pytest.fail(f"layer {L} read whole from the cache")
    rng = np.random.default_rng(5)
    cands = population(ref.space, rng) + [merged(ref.space, ref.space.random_onehot(rng), rng)]
    assert [(f.acc, f.ll) for f in small.evaluate(cands)] == [(f.acc, f.ll) for f in ref.evaluate(cands)]
    assert small.stats["source_reads"] > 0
    with pytest.raises(ValueError, match="--quant"):
        evaluator(src, tmp_path / "mismatch", budget=budget)


def test_prune_eep_quant_under_a_small_max_ram(synth_dir, tmp_path):
    """The search with --quant nf4 at its smallest --max-ram reads the cache per candidate and writes
    what it writes without a budget; GPT-OSS's fused experts too, a row of the cache at a time."""
    from lowmoe.inspect import inspect_model

    src = synth_dir("mixtral", **WIDE)
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    opts = dict(keep=KEEP, method="eep", calib=[train], seq_len=32, batch_size=4, progress=False, device="cpu",
                method_options={"generations": 2, "population": 2, "prune_generations": 1, "layer_groups": "layer",
                                "init": "random", "quant": "nf4"})
    ref = lowmoe.prune(src, tmp_path / "a", **opts)
    e = inspect_model(src, method="eep", keep=KEEP, seq_len=32, batch_size=4, quant="nf4")["budget"]["eep"]
    assert e["population_floor_bytes"]["sourced"] < e["population_floor_bytes"]["layer_held"]
    small = lowmoe.prune(src, tmp_path / "b", max_ram=e["min_max_ram_bytes"], **opts)
    assert small["eep"]["population_budget"]["sourced"] and small["eep"]["population_budget"]["quant"] == "nf4"
    assert small["eep"]["population_budget"]["candidate_groups"]
    assert [{k: v for k, v in c.items() if k != "elapsed_s"} for c in small["eep"]["curve"]] == \
        [{k: v for k, v in c.items() if k != "elapsed_s"} for c in ref["eep"]["curve"]]
    digest = {k: v for k, v in dir_digest(tmp_path / "a").items() if k.endswith(".safetensors")}
    assert digest and {k: v for k, v in dir_digest(tmp_path / "b").items() if k.endswith(".safetensors")} == digest
    # GPT-OSS's fused experts: read from the cache a row at a time, the same written model
    fused = synth_dir("gpt_oss", **WIDE)
    ref = lowmoe.prune(fused, tmp_path / "c", **opts)
    e = inspect_model(fused, method="eep", keep=KEEP, seq_len=32, batch_size=4, quant="nf4")["budget"]["eep"]
    small = lowmoe.prune(fused, tmp_path / "d", max_ram=e["min_max_ram_bytes"], **opts)
    assert small["eep"]["population_budget"]["sourced"] and small["eep"]["population_budget"]["quant"] == "nf4"
    assert [{k: v for k, v in c.items() if k != "elapsed_s"} for c in small["eep"]["curve"]] == \
        [{k: v for k, v in c.items() if k != "elapsed_s"} for c in ref["eep"]["curve"]]
    digest = {k: v for k, v in dir_digest(tmp_path / "c").items() if k.endswith(".safetensors")}
    assert digest and {k: v for k, v in dir_digest(tmp_path / "d").items() if k.endswith(".safetensors")} == digest
