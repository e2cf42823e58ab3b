"""``lowmoe score`` from the command line: scores.json, tables, heat map, errors."""

from __future__ import annotations

import importlib.util
import json

from click.testing import CliRunner

from lowmoe.cli import main


def test_score_command(synth_dir, calib_txt, tmp_path):
    model = synth_dir("mixtral")
    out = tmp_path / "s" / "scores.json"
    png = tmp_path / "usage.png"
    args = ["-q", "score", str(model), "--calib", str(calib_txt), "--calib", f"{calib_txt}@2", "--method", "reap",
            "--method", "frequency", "--keep", "half", "--out", str(out), "--seq-len", "16", "--n-samples", "6"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        args += ["--heatmap", str(png)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["methods"] == ["reap", "frequency"] and rep["keep"] == 4
    assert rep["calibration"]["domains"] == ["calib", "calib-2"] and rep["calibration"]["sequences_per_domain"] == [2, 4]
    assert set(rep["layers"]) == {"0", "1", "2"}
    for e in rep["layers"].values():
        assert len(e["scores"]["reap"]) == 8 and len(e["keep"]["reap"]) == 4
        assert set(e["usage"]) == {"calib", "calib-2"}
    assert "method reap" in r.output and "layer   2" in r.output and "scores written to" in r.output
    if has_mpl:
        assert png.stat().st_size > 1000


def test_score_command_errors(synth_dir, calib_txt, tmp_path):
    model = synth_dir("mixtral")
    r = CliRunner().invoke(main, ["score", str(model), "--calib", str(calib_txt), "--method", "nope"])
    assert r.exit_code == 2 and "--method 'nope' has no per-layer scores; choose from:" in r.output
    r = CliRunner().invoke(main, ["score", str(model), "--calib", str(tmp_path / "x.txt")])
    assert r.exit_code == 2 and "x.txt: file not found" in r.output
    r = CliRunner().invoke(main, ["score", str(model), "--calib", str(calib_txt), "--keep", "1"])
    assert r.exit_code == 2 and "--keep 1: must be between" in r.output
