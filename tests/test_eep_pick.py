"""EEP's final pick against the best seed: the pick margin in PAIRED standard errors (per-example dev
outcomes, McNemar), per domain and combined as the fitness is; the former unpaired rule on request."""

from __future__ import annotations

import json
import math

import pytest

from lowmoe.errors import ConfigError
from lowmoe.methods.eep.evolve import Evolution, EvolveOptions
from lowmoe.methods.eep.fitness import Fitness, FitnessData, paired_se, unpaired_se
from lowmoe.methods.eep.runner import parse_options
from lowmoe.methods.eep.space import SearchSpace

from .test_eep_auto import CharTok
from .helpers import write_jsonl


def fit(*outcomes: str, names: tuple[str, ...] = ()) -> Fitness:
    """A fitness from per-domain outcome strings (accuracy: the mean of the domains)."""
    accs = [o.count("1") / len(o) for o in outcomes]
    doms = tuple((n, a, -1.0) for n, a in zip(names, accs)) if names else ()
    return Fitness(sum(accs) / len(accs), -1.0, doms, tuple(outcomes))


def test_paired_se_by_hand():
    # one domain, 10 examples: a wins on 2 (a right, b wrong: examples 1, 2), loses on 1 (example 9)
    a = fit("1111011100")
    b = fit("1001011101")
    assert paired_se(a, b) == pytest.approx(math.sqrt(3) / 10)
    assert paired_se(b, a) == paired_se(a, b)
    assert paired_se(a, a) == 0.0
    # the same gain with the differences spread over more examples is noisier
    assert paired_se(fit("1111111100"), fit("0000001111")) == pytest.approx(math.sqrt(8) / 10)
    # two domains (4 and 2 examples): domain 1 has 2 discordant of 4, domain 2 has 1 of 2
    a2, b2 = fit("1100", "10", names=("x", "y")), fit("1010", "11", names=("x", "y"))
    se_x2, se_y2 = 2 / 4 ** 2, 1 / 2 ** 2
    assert paired_se(a2, b2, [1, 1], "mean") == pytest.approx(math.sqrt(se_x2 / 4 + se_y2 / 4))
    assert paired_se(a2, b2, [3, 1], "weighted") == pytest.approx(math.sqrt((3 / 4) ** 2 * se_x2 + (1 / 4) ** 2 * se_y2))
    # min: both plans' worst domain is x -> x's paired error; different worst domains -> unpaired across them
    a3, b3 = fit("1000", "11", names=("x", "y")), fit("1100", "11", names=("x", "y"))
    assert paired_se(a3, b3, None, "min") == pytest.approx(math.sqrt(1 / 16))
    a4, b4 = fit("1110", "10", names=("x", "y")), fit("1000", "11", names=("x", "y"))
    assert paired_se(a4, b4, None, "min") == pytest.approx(math.sqrt(0.5 * 0.5 / 2 + 0.25 * 0.75 / 4))
    # no outcomes, or not the same examples: no paired error
    assert paired_se(Fitness(0.5, -1.0), b) is None
    assert paired_se(fit("1010"), b) is None
    # the unpaired error of the former rule
    assert unpaired_se(a, b, 10) == pytest.approx(math.sqrt(0.7 * 0.3 / 10 + 0.6 * 0.4 / 10))


def test_aggregate_keeps_per_domain_outcomes_and_the_state_json_keeps_them_for_dev(tmp_path):
    a = write_jsonl(tmp_path / "alpha.jsonl", [{"prompt": f"p{i}", "answer": "x"} for i in range(6)])
    b = write_jsonl(tmp_path / "beta.jsonl", [{"prompt": f"q{i}", "answer": "y"} for i in range(6)])
    data = FitnessData.load([a, b], CharTok(), max_examples=6)
    f = data.aggregate([(i in (0, 2), -1.0) for i in range(3)] + [(True, -0.5)] * 3)
    assert f.outcomes == ("101", "111")
    assert "outcomes" not in f.to_json(), "reports stay free of per-example data"
    back = Fitness.from_json(json.loads(json.dumps(f.to_json(outcomes=True))))
    assert back.outcomes == f.outcomes and back == f
    one = FitnessData.load([a], CharTok(), max_examples=4).aggregate([(False, -1.0), (True, -1.0)] * 2)
    assert one.outcomes == ("0101",) and one.acc == 0.5


N = 128
BASE = "1" * 96 + "0" * 32  # the best seed: 96 of 128 right on dev (0.75)


def flip(s: str, wins: int, losses: int) -> str:
    """``s`` with ``wins`` of its wrong examples made right and ``losses`` of its right ones made wrong."""
    out = list(s)
    wrong = [i for i, c in enumerate(s) if c == "0"]
    right = [i for i, c in enumerate(s) if c == "1"]
    for i in wrong[:wins]:
        out[i] = "1"
    for i in right[:losses]:
        out[i] = "0"
    return "".join(out)


def search(wins: int, losses: int, tmp_path=None, **opt):
    """A seeded search whose searched plans all score BASE flipped by (wins, losses) on dev; seed ``a``
    scores BASE, seed ``b`` less. Returns (evolution, seed a's key, dev evaluator, calls)."""
    sp = SearchSpace.build(list(range(3)), 8, 4, "layer")
    seeds = [("a", sp.onehot([[0, 1, 2, 3]] * 3)), ("b", sp.onehot([[4, 5, 6, 7]] * 3))]
    keys = [c.canonical().key() for _, c in seeds]
    searched = flip(BASE, wins, losses)
    calls = {"dev": 0}

    def train(cands):
        return [Fitness(0.4 if c.key() in keys else 0.6, -1.0) for c in cands]

    def dev(cands):
        calls["dev"] += len(cands)
        return [fit(BASE if c.key() == keys[0] else flip(BASE, 0, 20) if c.key() == keys[1] else searched) for c in cands]

    opts = EvolveOptions(generations=2, population=6, dev_num=4, **opt)
    state = None if tmp_path is None else tmp_path / "state.json"
    ev = Evolution(sp, opts, train, state_path=state, seeds=seeds, rank_seeds=dev)
    ev.run()
    return ev, keys[0], dev, calls


def test_small_consistent_gain_is_picked_paired_and_refused_unpaired():
    # 6 more right, none lost: gain 6/128 = 0.047; paired se sqrt(6)/128 = 0.019 (2.4 se);
    # unpaired se sqrt(0.797*0.203/128 + 0.75*0.25/128) = 0.053 (0.9 se)
    ev, a_key, dev, _ = search(6, 0)
    got = ev.pick(dev, dev_examples=N)
    assert got.cand.key() != a_key and got.dev.acc == pytest.approx(102 / 128)
    assert ev.pick_info["rule"] == "paired" and ev.pick_info["picked"] == "searched"
    assert ev.pick_info["se"] == pytest.approx(math.sqrt(6) / 128)
    ev, a_key, dev, _ = search(6, 0, pick_se="unpaired")
    assert ev.pick(dev, dev_examples=N).cand.key() == a_key
    assert ev.pick_info["rule"] == "unpaired" and ev.pick_info["picked"] == "seed"
    assert ev.pick_info["se"] == pytest.approx(math.sqrt((102 / 128) * (26 / 128) / N + 0.75 * 0.25 / N))


def test_noisy_gain_is_refused_paired():
    # the same net gain (+6) from 22 wins and 16 losses: paired se sqrt(38)/128 = 0.048 > the gain 0.047
    ev, a_key, dev, _ = search(22, 16)
    assert ev.pick(dev, dev_examples=N).cand.key() == a_key
    assert ev.pick_info["picked"] == "seed" and ev.pick_info["gain"] == pytest.approx(6 / 128)
    assert ev.pick_info["se"] == pytest.approx(math.sqrt(38) / 128)
    # margin 0: any gain wins, paired or not
    ev, a_key, dev, _ = search(22, 16, pick_margin=0.0)
    assert ev.pick(dev, dev_examples=N).cand.key() != a_key


def test_without_outcomes_the_pick_falls_back_to_the_unpaired_rule():
    sp = SearchSpace.build(list(range(3)), 8, 4, "layer")
    seeds = [("a", sp.onehot([[0, 1, 2, 3]] * 3))]
    a_key = seeds[0][1].canonical().key()
    train = lambda cs: [Fitness(0.4 if c.key() == a_key else 0.6, -1.0) for c in cs]  # noqa: E731
    dev = lambda cs: [Fitness(0.75 if c.key() == a_key else 0.797, -1.0) for c in cs]  # noqa: E731
    ev = Evolution(sp, EvolveOptions(generations=2, population=6, dev_num=4), train, seeds=seeds, rank_seeds=dev)
    ev.run()
    assert ev.pick(dev, dev_examples=N).cand.key() == a_key and ev.pick_info["rule"] == "unpaired"
    assert ev.pick(dev).cand.key() != a_key and ev.pick_info is None  # no dev size, no outcomes: no margin


def test_resumed_search_picks_the_same_from_the_saved_dev_outcomes(tmp_path):
    ev, a_key, dev, calls = search(6, 0, tmp_path)
    first = ev.pick(dev, dev_examples=N)
    assert first.cand.key() != a_key and calls["dev"] > 0
    state = json.loads((tmp_path / "state.json").read_text())
    saved = [e["dev"] for e in state["archive"] if e["dev"] is not None]
    assert saved and all("outcomes" in d for d in saved)
    assert all("outcomes" not in e["fitness"] for e in state["archive"]), "training outcomes are not kept"

    def no_dev(cands):
        raise AssertionError("the resumed pick re-scored dev")

    sp = SearchSpace.build(list(range(3)), 8, 4, "layer")
    again = Evolution(sp, ev.opts, lambda cs: [Fitness(0.0, 0.0)] * len(cs), state_path=tmp_path / "state.json",
                      seeds=[("a", sp.onehot([[0, 1, 2, 3]] * 3)), ("b", sp.onehot([[4, 5, 6, 7]] * 3))], rank_seeds=no_dev)
    assert again.state.generation == 2
    got = again.pick(no_dev, dev_examples=N)
    assert got.cand.key() == first.cand.key() and again.pick_info == ev.pick_info
    assert again.pick_info["rule"] == "paired"


def test_pick_se_option():
    assert EvolveOptions().pick_se == "paired"
    _, evo = parse_options({"pick_se": "Unpaired"}, 0)
    assert evo.pick_se == "unpaired"
    with pytest.raises(ConfigError, match="pick_se='welch'"):
        parse_options({"pick_se": "welch"}, 0)
