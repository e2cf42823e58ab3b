"""Merging end to end on other families (Qwen3-MoE, GPT-OSS fused experts), plan re-application,
and C-Prune's report and resume. The reference merge lives in ``test_merging_e2e``."""

from __future__ import annotations

import json

import pytest

import lowmoe

from .helpers import OPTS, check_against_reference

CASES = [
    ("qwen3_moe", "merge-freq", {"similarity": "output"}),
    ("gpt_oss", "merge-freq", {"align": "true", "router": "mean"}),
    ("gpt_oss", "hc-merge", {}),
    ("gpt_oss", "dern", {}),
]


@pytest.mark.parametrize("arch,method,options", CASES, ids=[f"{a}-{m}-{'-'.join(o) or 'default'}" for a, m, o in CASES])
def test_output_loads_and_equals_in_memory_reference(synth_dir, calib_txt, tmp_path, arch, method, options):
    check_against_reference(synth_dir, calib_txt, tmp_path, arch, method, options)


def test_merge_freq_coefficients_are_usage_frequencies(synth_dir, calib_txt, tmp_path):
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "o", method="merge-freq", calib=[calib_txt], **OPTS)
    for L, lp in rep["plan"]["layers"].items():
        f = rep["scores"][L]
        for g in rep["layer_stats"][L]["groups"]:
            leader = g[0]
            assert leader in lp["keep"]
            tot = sum(f[e] for e in g)
            row = lp["merge"][lp["keep"].index(leader)]
            assert row == pytest.approx([f[e] / tot if e in g else 0.0 for e in range(8)])
        # leaders are the 4 most used experts
        assert sorted(lp["keep"]) == sorted(sorted(range(8), key=lambda e: (-f[e], e))[:4])


def test_saved_merge_plan_reapplies_to_the_same_bytes(synth_dir, calib_txt, tmp_path):
    from .helpers import dir_digest

    src = synth_dir("mixtral")
    rep = lowmoe.prune(src, tmp_path / "a", method="merge-freq", calib=[calib_txt], method_options={"align": "true"}, **OPTS)
    rep_d = lowmoe.prune(src, tmp_path / "d", method="dern", calib=[calib_txt], **OPTS)
    for r, name in ((rep, "a"), (rep_d, "d")):
        (tmp_path / f"{name}.json").write_text(json.dumps(r["plan"]))
        lowmoe.prune(src, tmp_path / f"{name}2", plan=tmp_path / f"{name}.json", progress=False)
        # model card aside: it names how each output was made (scored vs a re-applied plan)
        a = {k: v for k, v in dir_digest(tmp_path / name).items() if k not in ("lowmoe_report.json", "README.md")}
        b = {k: v for k, v in dir_digest(tmp_path / f"{name}2").items() if k not in ("lowmoe_report.json", "README.md")}
        assert a == b


def test_c_prune_report_and_resume(synth_dir, calib_txt, tmp_path, monkeypatch):

    from .helpers import dir_digest, prune_killed_after_layer

    src = synth_dir("mixtral", layers=4)
    ref = lowmoe.prune(src, tmp_path / "ref", method="c-prune", calib=[calib_txt], **OPTS)
    cp = ref["c_prune"]
    assert cp["budget_merges"] == 4 * 4 and set(cp["layers"]) == {"0", "1", "2", "3"}
    for L, info in cp["layers"].items():
        assert sum(info["cluster_importance"].values()) == pytest.approx(1.0, abs=1e-4)  # kept + removed clusters cover the layer
        assert ref["layer_stats"][L]["global_merges"] == 8 - info["global_clusters"]
    assert sum(ref["layer_stats"][L]["global_merges"] for L in cp["layers"]) == cp["budget_merges"]

    prune_killed_after_layer(monkeypatch, 1, src, tmp_path / "k", method="c-prune", calib=[calib_txt], **OPTS)
    lowmoe.prune(src, tmp_path / "k", method="c-prune", calib=[calib_txt], resume=True, **OPTS)
    a = {k: v for k, v in dir_digest(tmp_path / "ref").items() if k != "lowmoe_report.json"}
    b = {k: v for k, v in dir_digest(tmp_path / "k").items() if k != "lowmoe_report.json"}
    assert a == b


def test_cli_method_options_and_registration(synth_dir, calib_txt, tmp_path):
    from click.testing import CliRunner

    from lowmoe.cli import main

    assert {"merge-freq", "hc-merge", "diverse-group", "c-prune", "dern"} <= set(lowmoe.available_methods())
    args = ["-q", "prune", str(synth_dir("mixtral")), str(tmp_path / "o"), "--keep", "4", "--method", "merge-freq",
            "--calib", str(calib_txt), "--n-samples", "4", "--seq-len", "32", "--no-protect-super-experts"]
    r = CliRunner().invoke(main, args + ["-O", "align=true", "-O", "similarity=weight"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "lowmoe_report.json").read_text())
    assert any("align" in lp for lp in rep["plan"]["layers"].values())
    r = CliRunner().invoke(main, args + ["--overwrite", "-O", "similarity"])
    assert r.exit_code != 0 and "KEY=VALUE" in r.output
    r = CliRunner().invoke(main, args + ["--overwrite", "-O", "simlarity=weight"])
    assert r.exit_code != 0 and "simlarity" in r.output and "similarity" in r.output
