"""The quality benchmark end to end, CI-sized: one domain, one sparsity, small n."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lowmoe.toy import tasks
from lowmoe.engine.checkpoint import Checkpoint


def _bench():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_end_to_end(tmp_path, capsys):
    bench = _bench()
    result = bench.main(["--domains", "sort", "--sparsity", "0.5", "--methods", "frequency", "--random-seeds", "2",
                         "--n", "30", "--calib-n", "16", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "random" in printed and "frequency" in printed and "others" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["random"]["runs"] == 2 and rows["frequency"]["runs"] == 1 and rows["frequency"]["keep"] == 4
    # Pruning for a domain with calibration from that domain beats random plans on that domain.
    assert rows["frequency"]["target_exact_rel"] >= rows["random"]["target_exact_rel"]
    assert rows["frequency"]["target_exact_rel"] >= 0.9
    assert set(saved["full"]) == set(tasks.DOMAINS)


def test_random_plans_are_seeded_and_valid():
    bench = _bench()
    ck = Checkpoint(tasks.TOY_MODEL)
    a, b = bench.random_plan(ck, 4, 0), bench.random_plan(ck, 4, 0)
    assert a == b and a != bench.random_plan(ck, 4, 1)
    assert a["format"] == "lowmoe-plan/1" and a["num_experts_per_tok"] == 2
    for layer in a["layers"].values():
        assert len(set(layer["keep"])) == 4 and all(0 <= e < 8 for e in layer["keep"])


@pytest.mark.slow
def test_full_table(tmp_path):
    result = _bench().main(["--out", str(tmp_path)])
    assert len(result["rows"]) >= 5 * 2 * 2
