"""EEP's adaptive mutation step (``sigma_rule="one-fifth"``): the 1/5 success rule moves sigma the
right way, within its bounds, is used by the Gaussian mutation, survives a resume, and is the default."""

from __future__ import annotations

import numpy as np
import pytest

from lowmoe.errors import ConfigError
from lowmoe.methods.eep.evolve import SIGMA_BOUNDS, Evolution, EvolveOptions
from lowmoe.methods.eep.fitness import Fitness
from lowmoe.methods.eep.runner import parse_options
from lowmoe.methods.eep.space import SearchSpace

from .helpers import dies_after


def fitness(cands):
    """Reward mass on experts 0..3 (a landscape a larger step climbs faster at first)."""
    return [Fitness(round(float(c.em[:, :, :4].sum() + c.rm[:, :, :4].sum()) / 100, 3), float(-np.abs(c.em).sum()))
            for c in cands]


def test_one_fifth_rule_direction_and_bounds():
    sp = SearchSpace.build(list(range(2)), 8, 4, "layer")
    ev = Evolution(sp, EvolveOptions(generations=2, population=5, sigma=0.1, sigma_rule="one-fifth", sigma_factor=0.5), fitness)
    lo, hi = Fitness(0.1, -1.0), Fitness(0.9, -1.0)
    assert ev.adapt_sigma([lo] * 5, [hi, hi, lo, lo, lo]) == pytest.approx(0.4)  # 2 of 5 beat their parent
    assert ev.sigma == pytest.approx(0.2)
    assert ev.adapt_sigma([lo] * 5, [lo] * 5) == 0.0  # no success: shrink
    assert ev.sigma == pytest.approx(0.1)
    ev.adapt_sigma([lo] * 5, [hi, lo, lo, lo, lo])  # exactly 1/5: unchanged
    assert ev.sigma == pytest.approx(0.1)
    # ties on accuracy are decided by the log-likelihood, as everywhere in the search
    assert ev.adapt_sigma([Fitness(0.5, -2.0)], [Fitness(0.5, -1.0)]) == 1.0
    for _ in range(20):
        ev.adapt_sigma([lo], [hi])
    assert ev.sigma == pytest.approx(SIGMA_BOUNDS[1] * 0.1)
    for _ in range(40):
        ev.adapt_sigma([hi], [lo])
    assert ev.sigma == pytest.approx(SIGMA_BOUNDS[0] * 0.1)
    fixed = Evolution(sp, EvolveOptions(generations=2, population=5, sigma=0.1, sigma_rule="fixed"), fitness)
    assert fixed.adapt_sigma([lo], [hi]) is None and fixed.sigma == 0.1


def test_gaussian_mutation_uses_the_current_step():
    sp = SearchSpace.build(list(range(2)), 8, 4, "layer")
    ev = Evolution(sp, EvolveOptions(generations=2, population=4, sigma=0.05, sigma_rule="one-fifth", norm_prob=0.0),
                   fitness)
    base = sp.onehot([[0, 1, 2, 3]] * 2)

    def shifts():  # the noise each child got, summed per matrix (row order does not matter for a sum)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(50):
            c = ev.gaussian_mutate(base, rng)
            out += [c.em.sum() - base.em.sum(), c.rm.sum() - base.rm.sum()]
        return np.array(out)

    small = shifts()
    assert np.abs(small).max() > 0
    ev.state.sigma = 0.5
    np.testing.assert_allclose(shifts(), 10 * small, rtol=1e-4, atol=1e-5)  # same draws, 10x the step


def test_search_adapts_sigma_and_resumes_with_it(tmp_path):
    sp = SearchSpace.build(list(range(4)), 8, 4, 2)
    opts = EvolveOptions(generations=8, population=6, seed=5, sigma_rule="one-fifth")
    st = Evolution(sp, opts, fitness, state_path=tmp_path / "a.json").run()
    merge = [c for c in st.curve if c["phase"] == "merge"]
    assert merge and all("sigma" in c for c in merge)
    # each generation's step is the previous one moved by the rule, according to that generation's successes
    for prev, cur in zip(merge, merge[1:]):
        if "success" not in prev:
            continue
        expect = prev["sigma"] / opts.sigma_factor if prev["success"] > 0.2 else \
            prev["sigma"] * opts.sigma_factor if prev["success"] < 0.2 else prev["sigma"]
        lo, hi = (b * opts.sigma for b in SIGMA_BOUNDS)
        assert cur["sigma"] == pytest.approx(min(max(expect, lo), hi))
    assert len({round(c["sigma"], 9) for c in merge}) > 1, merge  # it did move
    with pytest.raises(KeyboardInterrupt):
        Evolution(sp, opts, dies_after(5, fitness), state_path=tmp_path / "b.json").run()
    resumed = Evolution(sp, opts, fitness, state_path=tmp_path / "b.json")
    assert resumed.state.generation == 5 and resumed.state.sigma == pytest.approx(st.curve[5]["sigma"])
    st2 = resumed.run()
    assert [e.cand.key() for e in st2.archive] == [e.cand.key() for e in st.archive]
    # the 1/5 rule is the default; "fixed" keeps EEP's constant step
    assert EvolveOptions().sigma_rule == "one-fifth"
    fixed = Evolution(sp, EvolveOptions(generations=8, population=6, seed=5, sigma_rule="fixed"), fitness).run()
    assert {c["sigma"] for c in fixed.curve if c["phase"] == "merge"} == {0.065}


def test_sigma_options_parse_and_reject_bad_values():
    _, evo = parse_options({"sigma_rule": "One-Fifth", "sigma": "0.1", "sigma_factor": "0.9"}, 0)
    assert (evo.sigma_rule, evo.sigma, evo.sigma_factor) == ("one-fifth", 0.1, 0.9)
    with pytest.raises(ConfigError, match="sigma_rule"):
        parse_options({"sigma_rule": "cma"}, 0)
    with pytest.raises(ConfigError, match="sigma_factor"):
        parse_options({"sigma_factor": "1.5"}, 0)
    with pytest.raises(ConfigError, match="sigma="):
        parse_options({"sigma": "0"}, 0)
