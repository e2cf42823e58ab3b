"""EEP ``--init auto`` (every one-shot scorer seeds the search; the pick is never worse on dev than any
of them) and several fitness domains (per-domain fitness combined by mean / min / weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import lowmoe
from lowmoe.engine.calibration import load_tokenizer
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import ConfigError
from lowmoe.methods.eep.evolve import Evolution, EvolveOptions
from lowmoe.methods.eep.fitness import Fitness, FitnessData, combine
from lowmoe.methods.eep.population import WholeModelEvaluator
from lowmoe.methods.eep.runner import parse_options
from lowmoe.methods.eep.space import SearchSpace
from lowmoe.methods.scoring import SCORERS

from .helpers import records, write_jsonl


class CharTok:
    """A byte-level stand-in tokenizer: enough for FitnessData without a model."""

    eos_token_id = None
    pad_token_id = 0

    def __call__(self, s, add_special_tokens=True):
        return {"input_ids": [ord(c) % 250 + 1 for c in s]}


def test_combine_rules():
    vals = [(0.5, -1.0), (1.0, -3.0)]
    assert combine(vals, [1, 1], "mean") == (0.75, -2.0)
    assert combine(vals, [1, 1], "min") == (0.5, -2.0)
    assert combine(vals, [3, 1], "weighted") == (0.625, -1.5)


def test_fitness_per_domain_from_files(tmp_path):
    a = write_jsonl(tmp_path / "alpha.jsonl", [{"prompt": f"p{i}", "answer": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "beta.jsonl", [{"prompt": f"q{i}", "answer": "y"} for i in range(10)])
    data = FitnessData.load([f"{a}@3", f"{b}@1"], CharTok(), max_examples=8, combine="weighted")
    # --n-samples is split evenly between the domains; @W are the weights
    assert data.domain_counts() == {"alpha": 4, "beta": 4} and data.weights == [3.0, 1.0]
    # alpha: 1 of 4 exact, beta: all 4 exact
    rows = [(i == 0, -1.0) for i in range(4)] + [(True, -0.5)] * 4
    f = data.aggregate(rows)
    assert f.domain_accs() == {"alpha": 0.25, "beta": 1.0}
    assert f.acc == pytest.approx((3 * 0.25 + 1.0) / 4) and f.ll == pytest.approx((3 * -1.0 + -0.5) / 4)
    data.combine = "min"
    assert data.aggregate(rows).acc == 0.25
    data.combine = "mean"
    # the mean of the domains, not of the examples: a domain's size does not change its say
    assert data.aggregate(rows).acc == pytest.approx(0.625)
    assert Fitness.from_json(json.loads(json.dumps(f.to_json()))).domains == f.domains
    assert "alpha 0.250" in f.describe()
    one = FitnessData.load([a], CharTok(), max_examples=3)
    assert one.num_examples == 3 and one.aggregate([(True, -1.0)] * 3).domains == ()
    with pytest.raises(ConfigError, match="--fitness-combine"):
        FitnessData.load([a], CharTok(), combine="max")


def test_parse_options_init_and_combine():
    opts, _ = parse_options({}, 0)
    assert opts["init"] == "auto" and opts["combine"] == "mean" and opts["dev"] == []
    opts, evo = parse_options({"combine": "MIN", "init": "random", "prune_crossover_prob": "0.3"}, 0)
    assert opts["combine"] == "min" and opts["init"] == "random" and evo.prune_crossover_prob == 0.3
    with pytest.raises(ConfigError, match="--fitness-combine 'median'"):
        parse_options({"combine": "median"}, 0)
    with pytest.raises(ConfigError, match="--init"):
        parse_options({"init": "best"}, 0)


def test_every_seed_enters_generation_0_and_the_pick_is_never_worse_on_dev():
    """Five seeds; the third is worst on training fitness but best on dev: it seeds (its mutations fill
    generation 0), and the pick is at least as good on dev as every seed (here: that seed)."""
    sp = SearchSpace.build(list(range(3)), 8, 4, "layer")
    seeds = [(f"m{i}", sp.onehot([[i, i + 1, i + 2, i + 3]] * 3)) for i in range(5)]
    keys = [c.canonical().key() for _, c in seeds]
    star = keys[2]

    def train(cands):  # the star seed looks worst on training fitness
        return [Fitness(0.0 if c.key() == star else 0.5, -1.0 + 1e-3 * (hash(c.key()) % 97)) for c in cands]

    def dev(cands):
        return [Fitness(1.0 if c.key() == star else 0.25 + 0.1 * (c.key() in keys), -1.0) for c in cands]

    opts = EvolveOptions(generations=3, population=10, dev_num=4)
    ev = Evolution(sp, opts, train, seeds=seeds, rank_seeds=dev)
    st = ev.run()
    gen0 = [e for e in st.archive if e.generation == 0]
    assert [e.cand.key() for e in gen0[:5]][0] == star, "the best seed on dev comes first"
    assert set(keys) <= {e.cand.key() for e in gen0} and len(gen0) == 10
    assert all(e.dev is not None for e in gen0[:5]), "seeds carry their dev fitness"
    # the non-seed candidates of generation 0 are mostly one mutation away from the best seed
    star_cand = seeds[2][1]
    near = [e for e in gen0[5:] if sum(len(set(a) - set(b)) for a, b in zip(e.cand.keep_sets(), star_cand.keep_sets())) <= 2]
    assert len(near) >= 3
    assert star not in [e.cand.key() for e in st.ranked()[:4]]
    picked = ev.pick(dev)
    assert picked.cand.key() == star
    assert all((picked.dev.acc, picked.dev.ll) >= (e.dev.acc, e.dev.ll) for _, e in ev.seed_entries())
    # the same search that only knew the first seed picks worse on dev
    lone = Evolution(sp, opts, train, seeds=seeds[:1], rank_seeds=dev)
    lone.run()
    assert lone.pick(dev).dev.acc < 1.0


def test_group_crossover_stays_one_hot():
    sp = SearchSpace.build(list(range(4)), 8, 4, "layer")
    ev = Evolution(sp, EvolveOptions(generations=2, population=4), lambda cs: [Fitness(0.0, 0.0)] * len(cs))
    rng = np.random.default_rng(0)
    a, b = sp.onehot([[0, 1, 2, 3]] * 4), sp.onehot([[4, 5, 6, 7]] * 4)
    for _ in range(10):
        c = ev.group_crossover([a, b], rng)
        assert c.is_onehot() and np.array_equal(c.em, c.rm)
        ks = c.keep_sets()
        assert all(k in ([0, 1, 2, 3], [4, 5, 6, 7]) for k in ks) and len({tuple(k) for k in ks}) == 2


def _dev_fitness(model_dir, data) -> Fitness:
    """A written checkpoint's fitness on ``data`` as it is (whole model in memory)."""
    ck = Checkpoint(model_dir)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, ck.num_experts, "layer")
    return WholeModelEvaluator(ck, space, data, top_k=ck.top_k, batch_size=4).evaluate_one(space.identity())


def test_auto_init_is_never_worse_on_dev_than_any_one_shot_prune(synth_dir, tmp_path):
    """``--init auto`` (the default): the written model is at least as good on dev as what
    ``lowmoe prune --method NAME`` writes for every scoring method, each measured on its written checkpoint."""
    src = synth_dir("mixtral")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    dev = write_jsonl(tmp_path / "dev.jsonl", records(12)[4:])
    common = dict(keep=4, calib=[train], seq_len=64, batch_size=4, progress=False)
    rep = lowmoe.prune(src, tmp_path / "eep", method="eep", **common,
                       method_options={"dev": str(dev), "generations": 2, "population": 6, "layer_groups": "layer"})
    eep = rep["eep"]
    assert sorted(m for s in eep["seeds"] for m in s["methods"]) == sorted(SCORERS)
    assert all(s["dev"] is not None for s in eep["seeds"])
    if eep["pick"] is not None:  # a searched plan was compared with the best seed: on paired dev outcomes
        assert eep["pick"]["rule"] == "paired" and eep["pick"]["searched_dev"] >= eep["pick"]["seed_dev"]
    data = FitnessData.from_records(records(12)[4:], load_tokenizer(src))
    got = _dev_fitness(tmp_path / "eep", data)
    assert got.acc == pytest.approx(eep["best"]["dev"]["acc"]) and got.ll == pytest.approx(eep["best"]["dev"]["ll"], abs=1e-5)
    for m in sorted(SCORERS):
        lowmoe.prune(src, tmp_path / m, method=m, **common)
        one = _dev_fitness(tmp_path / m, data)
        assert (got.acc, got.ll + 1e-5) >= (one.acc, one.ll), f"EEP is worse on dev than --method {m}"


def test_two_domains_min_rule_reports_per_domain_fitness(synth_dir, tmp_path):
    from lowmoe.cli import main

    src = synth_dir("mixtral")
    recs = records(12)
    ta = write_jsonl(tmp_path / "alpha.jsonl", recs[:6])
    tb = write_jsonl(tmp_path / "beta.jsonl", recs[6:])
    da = write_jsonl(tmp_path / "alpha-dev.jsonl", recs[:3])
    db = write_jsonl(tmp_path / "beta-dev.jsonl", recs[6:9])
    base = ["-q", "prune", str(src), None, "--method", "eep", "--keep", "4", "--calib", str(ta), "--calib", str(tb),
            "--generations", "2", "--population", "3", "--seq-len", "64", "--layer-groups", "layer", "--init", "random"]

    def run(out, *more):
        args = list(base)
        args[3] = str(tmp_path / out)
        return CliRunner().invoke(main, args + list(more))

    res = run("o", "--dev", str(da), "--dev", str(db), "--fitness-combine", "min")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "lowmoe_report.json").read_text())["eep"]
    assert rep["fitness_data"]["train"]["domains"] == {"alpha": 6, "beta": 7}
    assert rep["fitness_data"]["train"]["combine"] == "min"
    for point in rep["curve"]:
        assert set(point["best_domains"]) == {"alpha", "beta"}
        assert point["best_acc"] == min(point["best_domains"].values())
    best = rep["best"]
    assert set(best["fitness"]["domains"]) == {"alpha", "beta"} and set(best["dev"]["domains"]) == {"alpha", "beta"}
    assert best["dev"]["acc"] == min(v["acc"] for v in best["dev"]["domains"].values())
    # bad rule, and a --dev count that does not match the domains: one-line errors, exit 2
    res = run("p", "--fitness-combine", "median")
    assert res.exit_code == 2 and "--fitness-combine 'median'" in res.output
    res = run("q", "--dev", str(da), "--dev", str(db), "--dev", str(da))
    assert res.exit_code == 2 and "--dev: 3 files for 2 --calib domains" in res.output
    res = CliRunner().invoke(main, ["prune", str(src), str(tmp_path / "r"), "--method", "frequency", "--keep", "4",
                                    "--calib", str(ta), "--fitness-combine", "min"])
    assert res.exit_code == 2 and "--fitness-combine" in res.output and "--method eep" in res.output


def test_pick_keeps_the_best_seed_unless_the_search_beats_it_on_dev_by_a_margin():
    """``pick_margin``: a searched plan replaces the best seed only if its dev accuracy is higher by more
    than pick_margin standard errors; with 0, any gain wins. These dev fitnesses carry no per-example
    outcomes, so the unpaired error is used (the paired rule: tests/test_eep_pick.py)."""
    sp = SearchSpace.build(list(range(3)), 8, 4, "layer")
    seeds = [("a", sp.onehot([[0, 1, 2, 3]] * 3)), ("b", sp.onehot([[4, 5, 6, 7]] * 3))]
    seed_keys = {c.canonical().key() for _, c in seeds}
    a_key = seeds[0][1].canonical().key()

    def train(cands):
        return [Fitness(0.4 if c.key() in seed_keys else 0.6, -1.0) for c in cands]

    def dev_with(gain):
        def dev(cands):  # seed a: 0.70 on dev; searched plans: 0.70 + gain (one of them a bit more)
            return [Fitness(0.70 if c.key() == a_key else 0.5 if c.key() in seed_keys
                            else 0.70 + gain + 1e-3 * (hash(c.key()) % 3), -1.0) for c in cands]
        return dev

    n = 128  # se = sqrt(2 * 0.7 * 0.3 / 128) ~ 0.057
    for gain, margin, want_seed in ((0.02, 1.0, True), (0.15, 1.0, False), (0.02, 0.0, False)):
        opts = EvolveOptions(generations=2, population=6, dev_num=4, pick_margin=margin)
        ev = Evolution(sp, opts, train, seeds=seeds, rank_seeds=dev_with(gain))
        ev.run()
        got = ev.pick(dev_with(gain), dev_examples=n)
        assert (got.cand.key() == a_key) == want_seed, (gain, margin)
        # without the dev size there is no margin: the best on dev
        assert ev.pick(dev_with(gain)).cand.key() not in seed_keys
    with pytest.raises(ConfigError, match="pick_margin"):
        EvolveOptions(pick_margin=-1).check()
