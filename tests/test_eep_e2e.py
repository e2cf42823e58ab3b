"""EEP end to end: ``prune(method="eep")`` and the CLI flags (dev pick, determinism, top-k only, errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import lowmoe
from lowmoe.engine.calibration import load_tokenizer
from lowmoe.methods.eep.fitness import FitnessData

from .helpers import records, write_jsonl



def test_prune_method_eep_end_to_end(synth_dir, tmp_path):
    src = synth_dir("mixtral")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    dev = write_jsonl(tmp_path / "dev.jsonl", records(4))
    opts = dict(keep=4, method="eep", calib=[train], seq_len=64, batch_size=4, progress=False,
                method_options={"dev": str(dev), "generations": 2, "population": 3, "layer_groups": "layer"})
    r1 = lowmoe.prune(src, tmp_path / "a", **opts)
    eep = r1["eep"]
    # generation 0: every distinct one-shot seed (--init auto, the default; at least the population),
    # generation 1: 3 distinct children (duplicates are redrawn)
    n_seeds = len(eep["seeds"])
    assert n_seeds >= 1 and eep["options"]["init"] == "auto"
    g0 = max(3, n_seeds)
    assert [c["evaluations"] for c in eep["curve"]] == [g0, g0 + 3] and eep["evaluations"] == g0 + 3
    assert len(eep["best"]["groups"]) == 3 and len(eep["best"]["groups"][0]["W_EM"]) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert model.config.num_local_experts == 4
    # the reported dev fitness of the pick is the written model's, measured here on the dev records
    data = FitnessData.from_records(records(4), load_tokenizer(src))
    rows = []
    with torch.no_grad():
        for _, sl in data.batches(4):
            rows += data.score_logits(model(data.input_ids[sl], use_cache=False).logits, sl)
    ref = data.aggregate(rows)
    assert eep["best"]["dev"]["acc"] == ref.acc and eep["best"]["dev"]["ll"] == pytest.approx(ref.ll, abs=1e-4)
    r2 = lowmoe.prune(src, tmp_path / "b", **opts)
    assert r2["plan"]["layers"] == r1["plan"]["layers"], "same seed and data -> same plan"
    # the best plan's matrices are the ones written in the plan
    g0 = eep["best"]["groups"][0]
    lp = r1["plan"]["layers"]["0"]
    if "merge" in lp:
        assert np.allclose(lp["merge"], g0["W_EM"], atol=1e-6) and np.allclose(lp["router"], g0["W_RM"], atol=1e-6)
    else:
        assert lp["keep"] == np.asarray(g0["W_EM"]).argmax(1).tolist()


def test_seeded_search_reports_its_seed_and_never_picks_worse_on_dev(synth_dir, tmp_path):
    """``--init frequency``: the seed is the plan a one-shot ``--method frequency`` prune writes with the
    same options; the report gives its training and dev fitness, and the pick is at least as good on dev."""
    src = synth_dir("mixtral")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    dev = write_jsonl(tmp_path / "dev.jsonl", records(4))
    common = dict(keep=4, calib=[train], seq_len=64, batch_size=4, progress=False)
    one_shot = lowmoe.prune(src, tmp_path / "f", method="frequency", **common)
    rep = lowmoe.prune(src, tmp_path / "e", method="eep", **common,
                       method_options={"dev": str(dev), "generations": 2, "population": 3, "layer_groups": "layer",
                                       "init": "frequency"})
    seed = rep["eep"]["seed"]
    assert seed["method"] == "frequency"
    assert seed["keep"] == [one_shot["plan"]["layers"][str(L)]["keep"] for L in range(len(seed["keep"]))]
    # the seed's fitness is a fraction of the 9 training records (8 generated + 1 multiple choice) and of the 5 dev records
    assert seed["fitness"]["acc"] * 9 == pytest.approx(round(seed["fitness"]["acc"] * 9))
    assert seed["dev"]["acc"] * 5 == pytest.approx(round(seed["dev"]["acc"] * 5)) and seed["dev"]["ll"] < 0
    best = rep["eep"]["best"]
    assert (best["dev"]["acc"], best["dev"]["ll"]) >= (seed["dev"]["acc"], seed["dev"]["ll"])


def test_cli_eep_fewer_active_experts_and_flag_errors(synth_dir, tmp_path):
    from lowmoe.cli import main

    src = synth_dir("mixtral")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    res = CliRunner().invoke(main, ["-q", "prune", str(src), str(tmp_path / "o"), "--method", "eep", "--keep", "8",
                                    "--top-k", "1", "--calib", str(train), "--generations", "2", "--population", "3",
                                    "--seq-len", "64", "--quant", "int8"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o" / "lowmoe_report.json").read_text())
    assert rep["num_experts"]["after"] == 8 and rep["num_experts_per_tok"]["after"] == 1
    assert rep["eep"]["curve"][0]["phase"] == "merge" and rep["eep"]["quant"]["mode"] == "int8"
    res = CliRunner().invoke(main, ["prune", str(src), str(tmp_path / "p"), "--method", "frequency", "--keep", "4",
                                    "--calib", str(train), "--generations", "3"])
    assert res.exit_code != 0 and "--generations" in res.output and "--method eep" in res.output
    res = CliRunner().invoke(main, ["prune", str(src), str(tmp_path / "q"), "--method", "eep", "--keep", "4",
                                    "--calib", str(train), "--init", "nonsense"])
    assert res.exit_code != 0 and "--init" in res.output


def test_killed_eep_search_resumes_to_the_same_plan(synth_dir, tmp_path, monkeypatch):
    from lowmoe.methods.eep import population

    src = synth_dir("mixtral")
    train = write_jsonl(tmp_path / "train.jsonl", records(4))
    opts = dict(keep=4, method="eep", calib=[train], seq_len=64, batch_size=4, progress=False,
                method_options={"generations": 3, "population": 2, "layer_groups": "layer"})
    fresh = lowmoe.prune(src, tmp_path / "fresh", **opts)
    real = population.PopulationEvaluator.evaluate
    calls = {"n": 0}

    def dies_in_generation_2(self, cands):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, cands)

    monkeypatch.setattr(population.PopulationEvaluator, "evaluate", dies_in_generation_2)
    with pytest.raises(KeyboardInterrupt):
        lowmoe.prune(src, tmp_path / "out", **opts)
    assert (tmp_path / "out" / ".lowmoe-work" / "eep" / "state.json").is_file()
    monkeypatch.setattr(population.PopulationEvaluator, "evaluate", real)
    resumed = lowmoe.prune(src, tmp_path / "out", resume=True, **opts)
    assert resumed["plan"]["layers"] == fresh["plan"]["layers"]
    assert [c["best_ll"] for c in resumed["eep"]["curve"]] == [c["best_ll"] for c in fresh["eep"]["curve"]]


def test_the_search_reports_where_its_evaluations_spent_the_time(synth_dir, tmp_path):
    """``eep.stages``: the population pass's per-stage table (issue 15: where the time goes), each
    stage counted once per thing it does."""
    from lowmoe.engine.prefetch import STAGES

    src = synth_dir("mixtral")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    dev = write_jsonl(tmp_path / "dev.jsonl", records(4))
    rep = lowmoe.prune(src, tmp_path / "a", keep=4, method="eep", calib=[train], seq_len=64, batch_size=4,
                       progress=False, method_options={"dev": str(dev), "generations": 2, "population": 3,
                                                       "layer_groups": "layer", "init": "random"})
    eep = rep["eep"]
    st, stats = eep["stages"], eep["stream_stats"]
    assert list(st) == sorted(st, key=list(STAGES).index)
    chunks, rest = divmod(st["cache_read"]["count"], stats["layer_runs"])  # every layer run reads each chunk
    assert chunks >= 2 and rest == 0 and st["cache_write"]["count"] == st["cache_read"]["count"]
    assert st["read"]["count"] == st["materialize"]["count"] == stats["layer_loads"]
    assert st["build"]["count"] == stats["layer_builds"]
    assert st["compute"]["count"] == stats["layer_runs"] * (chunks + 1)  # each chunk, then the layer's one wait
    assert st["fitness"]["count"] == stats["evaluations"] and st["embed"]["count"] == 1
    main = sum(v["s"] for v in st.values() if v["thread"] == "main")
    assert 0 < main <= eep["search_s"] * 1.05 and all(0 <= v["share"] <= 1.05 for v in st.values())
    assert eep["rank_stream_stats"][0]["stages"] == st
    assert eep["dev_stages"]["fitness"]["count"] >= 1
