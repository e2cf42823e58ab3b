"""EEP search: streamed population fitness equals whole-model fitness, the written model is the
model that was scored, evolution operators, determinism and resume, the prune CLI path."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lowmoe
from lowmoe.engine.calibration import load_tokenizer
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.methods.eep.evolve import Evolution, EvolveOptions
from lowmoe.methods.eep.fitness import Fitness, FitnessData
from lowmoe.methods.eep.population import PopulationEvaluator, WholeModelEvaluator
from lowmoe.methods.eep.space import Candidate, SearchSpace
from lowmoe.errors import ConfigError
from lowmoe.engine.quant import layer_weights

from .helpers import dies_after, merged, population, records


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_population_streaming_equals_whole_model(synth_dir, tmp_path, arch):
    src = synth_dir(arch)
    ck = Checkpoint(src)
    data = FitnessData.from_records(records(), load_tokenizer(src))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    rng = np.random.default_rng(0)
    cands = population(space, rng)
    pe = PopulationEvaluator(ck, layer_weights(ck, "none", None), space, data, tmp_path / "acts", device="cpu",
                             dtype=torch.float32, top_k=2, batch_size=4)
    got = pe.evaluate(cands)
    # layers before the first differing group were computed once for a and c
    assert pe.stats["layer_builds"] < len(cands) * len(ck.moe_layers())
    ref = WholeModelEvaluator(ck, space, data, top_k=2, batch_size=4).evaluate(cands)
    for g, r in zip(got, ref):
        assert g.acc == r.acc and g.ll == pytest.approx(r.ll, abs=1e-5)
    assert len({round(f.ll, 6) for f in got}) > 1, "different candidates should score differently"
    # next generation: streams of the retained candidates are reused from disk
    pe.retain(cands[:2])
    kids = [Candidate(cands[0].em.copy(), cands[0].rm.copy())]
    other = merged(space, space.random_onehot(rng), rng)
    kids[0].em[-1], kids[0].rm[-1] = other.em[-1], other.rm[-1]  # a's prefix, a new last layer
    kids.append(merged(space, cands[1], rng))
    kids = [k.canonical() for k in kids]
    saved = pe.stats["layer_runs_saved"]
    got2 = pe.evaluate(kids)
    assert pe.stats["layer_runs_saved"] > saved
    ref2 = WholeModelEvaluator(ck, space, data, top_k=2, batch_size=4).evaluate(kids)
    for g, r in zip(got2, ref2):
        assert g.acc == r.acc and g.ll == pytest.approx(r.ll, abs=1e-5)


def test_written_checkpoint_is_the_scored_model(synth_dir, tmp_path):
    """Fitness is measured with exactly the router and experts the output checkpoint has."""
    src = synth_dir("qwen2_moe")
    ck = Checkpoint(src)
    tok = load_tokenizer(src)
    data = FitnessData.from_records(records(), tok)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, 2)
    cand = merged(space, space.random_onehot(np.random.default_rng(1)), np.random.default_rng(2))
    pe = PopulationEvaluator(ck, layer_weights(ck, "none", None), space, data, tmp_path / "acts", device="cpu",
                             dtype=torch.float32, top_k=1, batch_size=4)
    [fit] = pe.evaluate([cand])
    plan = space.plan(cand, 1).to_json()
    assert "router" in plan["layers"]["0"] and "merge" in plan["layers"]["0"]
    lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 1
    rows = []
    with torch.no_grad():
        for _, sl in data.batches(4):
            rows += data.score_logits(model(data.input_ids[sl], use_cache=False).logits, sl)
    ref = data.aggregate(rows)
    assert ref.acc == fit.acc and ref.ll == pytest.approx(fit.ll, abs=1e-5)


def test_fitness_exact_match_and_multiple_choice():
    tok = load_tokenizer_stub()
    data = FitnessData.from_records([{"prompt": "ab", "answer": "cd"},
                                     {"prompt": "x", "options": ["y", "z"], "answer": "z"}], tok)
    assert [r.example for r in data.rows] == [0, 1, 1] and data.labels == [None, 1]
    V = 300
    logits = torch.zeros(3, data.input_ids.shape[1], V)
    ids = data.input_ids
    # example 0: greedy gets 'c' right and 'd' wrong -> not exact
    logits[0, 1, ids[0, 2]] = 5.0
    logits[0, 2, 7] = 5.0
    # MC: option 'z' (gold) is more likely than 'y'
    logits[1, 0, ids[1, 1]] = 1.0
    logits[2, 0, ids[2, 1]] = 3.0
    per_row = data.score_logits(logits, slice(0, 3))
    assert [r[0] for r in per_row] == [False, True, True]  # (MC rows: each option its own argmax)
    fit = data.aggregate(per_row)
    assert fit.acc == 0.5
    logits[0, 2, ids[0, 3]] = 6.0  # now 'd' is the argmax too
    assert data.aggregate(data.score_logits(logits, slice(0, 3))).acc == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fitness_reads_the_device_once_per_chunk_and_gives_a_rows_own_numbers(dtype):
    """Every row's (exact, log-prob) as computed one row at a time, to the bit, with no per-row read
    of a device value (a ``bool()``/``float()`` per row waits for a GPU twice per row)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += str(func) in ("aten._local_scalar_dense.default", "aten.is_nonzero.default")
            return func(*args, **(kwargs or {}))

    recs = [{"prompt": "q" * (i % 5 + 1), "answer": "ab"[: i % 2 + 1] * (i % 3 + 1)} for i in range(9)]
    recs.append({"prompt": "x", "options": ["yy", "z"], "answer": "z"})
    data = FitnessData.from_records(recs, load_tokenizer_stub())
    g = torch.Generator().manual_seed(0)
    for _, sl in data.batches(4):
        b, t = data.positions(sl)
        logits = torch.randn(len(b), 300, generator=g).to(dtype)
        ids = data.input_ids[sl]
        gold = ids[b, t + 1]
        first = data.rows[sl][0].length
        logits[:first] = 0.0
        logits[torch.arange(first), gold[:first]] = 4.0  # the chunk's first row exact
        want, p = [], 0
        for i, row in enumerate(data.rows[sl]):  # one row at a time, as the numbers are defined
            pred = logits[p:p + row.length].float()
            gd = ids[i, row.start:row.start + row.length]
            lp = torch.log_softmax(pred, dim=-1).gather(1, gd[:, None]).squeeze(1)
            want.append((bool((pred.argmax(dim=-1) == gd).all()), float(lp.sum())))
            p += row.length
        Reads.n = 0
        with Reads():
            got = data.score_positions(logits, sl)
        assert got == want and Reads.n == 0
        assert any(e for e, _ in got) and not all(e for e, _ in got)
    assert data.score_positions(torch.zeros(0, 300), slice(len(recs) + 5, len(recs) + 9)) == []


def load_tokenizer_stub():
    from lowmoe.toy.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer()


# ---- the search space and evolution operators ----------------------------------------------------


def test_space_groups_plan_and_canonical_form():
    sp = SearchSpace.build([0, 1, 2, 3, 4], 8, 4, 2)
    assert sp.groups == ((0, 1), (2, 3, 4)) and sp.group_of(3) == 1
    assert SearchSpace.build([0, 1, 2], 8, 4, "layer").num_groups == 3
    with pytest.raises(ConfigError, match="--layer-groups"):
        SearchSpace.build([0, 1], 8, 4, 5)
    c = sp.onehot([[6, 1, 4, 2], [0, 1, 2, 3]])
    assert sp.layer_plan(c, 0).keep == [1, 2, 4, 6] and sp.layer_plan(c, 0).merge is None
    # permuting rows jointly is the same model: same key
    perm = Candidate(c.em[:, ::-1].copy(), c.rm[:, ::-1].copy())
    assert perm.canonical().key() == c.key()
    from_plan = sp.from_keep({0: [1, 2, 4, 6], 1: [1, 2, 4, 7], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3], 4: [0, 1, 2, 5]})
    assert sp.layer_plan(from_plan, 0).keep == [1, 2, 4, 6] and sp.layer_plan(from_plan, 4).keep == [0, 1, 2, 3]


def fake_fitness(cands):
    """A deterministic landscape: reward keeping experts 0..3 and mass on the diagonal."""
    out = []
    for c in cands:
        score = float(c.em[:, :, :4].sum() + 0.5 * c.rm[:, :, :4].sum())
        out.append(Fitness(round(score / (2 * c.em.shape[0] * c.em.shape[1]), 3), -abs(c.em.sum() - c.em.shape[0] * c.em.shape[1])))
    return out


def test_evolution_operators_keep_their_invariants():
    sp = SearchSpace.build(list(range(4)), 8, 4, "layer")
    ev = Evolution(sp, EvolveOptions(generations=2, population=4), fake_fitness)
    rng = np.random.default_rng(0)
    c = sp.random_onehot(rng)
    for _ in range(20):
        m = ev.discrete_mutate(c, rng)
        assert m.is_onehot()
        for g in range(sp.num_groups):
            assert len(set(m.em[g].argmax(1).tolist())) == sp.keep  # distinct experts per group
    changed = [sum(set(m.em[g].argmax(1).tolist()) != set(c.em[g].argmax(1).tolist()) for g in range(sp.num_groups))
               for m in (ev.discrete_mutate(c, rng) for _ in range(20))]
    assert sum(n > 0 for n in changed) >= 10 and max(changed) < sp.num_groups, changed  # mutates some groups, not all
    g = ev.gaussian_mutate(c, rng)
    assert g.em.shape == c.em.shape and not g.is_onehot()
    # crossover: each row of each group of the child (W_EM and W_RM) is that row of one parent's same group
    a, b = sp.random_onehot(rng), sp.random_onehot(rng)
    from_a = from_b = 0
    for _ in range(20):
        x = ev.crossover(a, b, rng)
        assert x.em.shape == a.em.shape and x.rm.shape == a.rm.shape
        for child, pa, pb in ((x.em, a.em, b.em), (x.rm, a.rm, b.rm)):
            for grp in range(sp.num_groups):
                for j in range(sp.keep):
                    ok_a, ok_b = np.array_equal(child[grp, j], pa[grp, j]), np.array_equal(child[grp, j], pb[grp, j])
                    assert ok_a or ok_b, (grp, j)
                    from_a += ok_a and not ok_b
                    from_b += ok_b and not ok_a
    assert from_a > 0 and from_b > 0  # both parents contribute


def test_evolution_improves_and_is_deterministic_and_resumable(tmp_path):
    sp = SearchSpace.build(list(range(4)), 8, 4, 2)
    opts = EvolveOptions(generations=8, population=6, prune_generations=4, seed=3)
    full = Evolution(sp, opts, fake_fitness, state_path=tmp_path / "a.json")
    st = full.run()
    # the search beats its own starting point: generation 0's BEST (not its median), in the prune phase
    # (swaps of the best and discrete mutations) and again in the merge phase (crossover + gaussian mutation)
    start = st.curve[0]["gen_best_acc"]
    assert st.curve[0]["best_acc"] == start
    last_prune = max(c["best_acc"] for c in st.curve if c["phase"] == "prune")
    assert last_prune >= start + 0.05 and st.curve[-1]["best_acc"] > last_prune, st.curve
    assert [c["phase"] for c in st.curve] == ["prune"] * 4 + ["merge"] * 4
    # same seed -> same archive; a search killed after 3 generations resumes to the same result
    with pytest.raises(KeyboardInterrupt):
        Evolution(sp, opts, dies_after(3, fake_fitness), state_path=tmp_path / "b.json").run()
    resumed = Evolution(sp, opts, fake_fitness, state_path=tmp_path / "b.json")
    assert resumed.state.generation == 3
    st2 = resumed.run()
    assert [e.cand.key() for e in st2.archive] == [e.cand.key() for e in st.archive]
    assert [e.fitness for e in st2.archive] == [e.fitness for e in st.archive]


def test_pruning_search_beats_random_search_at_equal_evaluations():
    """Discrete mutation of the best (the pruning phase) against drawing the same number of random
    keep-sets, 20 times: on 32 experts in 2 groups of 4 kept, the landscape rewards slots on experts
    0..3; random search at 128 evaluations fills at most 4 of the 8 slots with them (in 40 of 40
    draws), the search at least 6. Children drawn at random instead of mutated reach 5 at best."""
    sp = SearchSpace.build(list(range(2)), 32, 4, "layer")
    st = Evolution(sp, EvolveOptions(generations=16, population=8, prune_generations=16), fake_fitness).run()

    def good_slots(c: Candidate) -> int:
        return int((c.em.argmax(-1) < 4).sum())

    random_best = []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        random_best.append(max(good_slots(sp.random_onehot(rng)) for _ in range(st.evaluations)))
    assert good_slots(st.ranked()[0].cand) >= max(random_best) + 2, (good_slots(st.ranked()[0].cand), random_best)


def test_top_k_only_starts_from_the_identity():
    sp = SearchSpace.build(list(range(3)), 8, 8, 1)
    ev = Evolution(sp, EvolveOptions(generations=1, population=4), fake_fitness)
    init = ev.initial(np.random.default_rng(0))
    assert init[0].key() == sp.identity().key() and len(init) == 4
    assert ev.phase(0) == "merge"


def test_seeded_pick_rescores_the_seed_on_dev():
    """A seed that falls out of the training top-dev_num is still compared on dev, and wins there."""
    sp = SearchSpace.build(list(range(3)), 8, 4, "layer")
    seed = sp.onehot([[0, 1, 2, 3]] * 3)
    key = seed.canonical().key()

    def train(cands):  # the seed looks worst on the training split
        return [Fitness(0.0 if c.key() == key else 0.5, -1.0 + 1e-3 * i) for i, c in enumerate(cands)]

    def dev(cands):  # ... and best on dev
        return [Fitness(1.0 if c.key() == key else 0.25, -1.0) for c in cands]

    opts = EvolveOptions(generations=3, population=8, dev_num=4)
    ev = Evolution(sp, opts, train, seed_cand=seed)
    ev.run()
    assert key not in [e.cand.key() for e in ev.state.ranked()[:4]]
    assert ev.pick(dev).cand.key() == key
    unseeded = Evolution(sp, opts, train)
    unseeded.run()
    assert unseeded.pick(dev).cand.key() != key


def test_population_streams_in_memory_equal_streams_on_disk(synth_dir, tmp_path, monkeypatch):
    """The candidates' hidden states held in memory (the default when they fit) give the fitness
    they give on disk, write nothing there, and ``retain`` forgets the streams it does not keep."""
    from lowmoe.methods.eep import population as pop_mod

    src = synth_dir("mixtral")
    ck = Checkpoint(src)
    data = FitnessData.from_records(records(), load_tokenizer(src))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    cands = population(space, np.random.default_rng(0))
    kw = dict(device="cpu", dtype=torch.float32, top_k=2, batch_size=4)
    mem = PopulationEvaluator(ck, layer_weights(ck, "none", None), space, data, tmp_path / "mem", **kw)
    got = mem.evaluate(cands)
    assert mem.stats["activations"]["disk_bytes_written"] == 0 and mem.stats["activations"]["memory_peak_bytes"] > 0
    monkeypatch.setattr(pop_mod, "memory_slack", lambda *a, **k: 0)
    disk = PopulationEvaluator(ck, layer_weights(ck, "none", None), space, data, tmp_path / "disk", **kw)
    assert [(f.acc, f.ll) for f in disk.evaluate(cands)] == [(f.acc, f.ll) for f in got]
    assert disk.stats["activations"]["disk_bytes_written"] > 0
    held = mem.cache.memory_bytes
    kept = mem.retain(cands[:1])
    assert 0 < mem.cache.memory_bytes < held and kept == mem.cache.memory_bytes
    assert mem.evaluate(cands[:1]) == got[:1]
