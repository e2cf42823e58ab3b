"""``--method-option``: every method checks its options (name and value) before any work, so a bad
one is a one-line error with exit status 2 and no output folder; good values arrive converted."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import lowmoe
from lowmoe.cli import main
from lowmoe.errors import ConfigError
from lowmoe.methods import check_options, make_layer_method, method_names, option_spec, options_per_method
from lowmoe.score import score


@pytest.mark.parametrize("method", method_names())
def test_an_unknown_option_is_refused_before_the_output_folder_is_made(synth_dir, calib_txt, tmp_path, method):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="bogus"):
        lowmoe.prune(synth_dir("mixtral"), out, keep=4, method=method, calib=[calib_txt], n_samples=2, seq_len=16,
                     progress=False, method_options={"bogus": "1"})
    assert not out.exists()


def test_cli_bad_option_exits_2_and_names_it(synth_dir, calib_txt, tmp_path):
    out = tmp_path / "o"
    args = ["prune", str(synth_dir("mixtral")), str(out), "--keep", "4", "--calib", str(calib_txt), "--n-samples", "2",
            "--seq-len", "16", "--method"]
    r = CliRunner().invoke(main, args + ["reap", "-O", "renormalize=maybe"])
    assert r.exit_code == 2 and "renormalize" in r.output and "true or false" in r.output, r.output
    r = CliRunner().invoke(main, args + ["dern", "-O", "match_dim=wide"])
    assert r.exit_code == 2 and "match_dim" in r.output and "int" in r.output, r.output
    assert not out.exists()


def test_values_arrive_converted():
    assert make_layer_method("reap", 8, 2, renormalize="false").scorer.renormalize is False
    assert make_layer_method("reap", 8, 2).scorer.renormalize is True
    tc = make_layer_method("tcess", 8, 2, k="3", threshold="0.25").scorer
    assert (tc.k, tc.threshold) == (3, 0.25)
    rec = make_layer_method("reconstruction", 8, 2, seed=1, beam="2", max_tokens="64")
    assert (rec.beam, rec.max_tokens) == (2, 64)
    with pytest.raises(ConfigError, match="beam"):
        make_layer_method("reconstruction", 8, 2, beam="many")
    with pytest.raises(ConfigError, match="threshold"):
        make_layer_method("tcess", 8, 2, threshold="high")


def test_runner_options_are_checked_too():
    check_options("eep", 8, 2, 0, {"generations": "3"})
    with pytest.raises(ConfigError, match="generations"):
        check_options("eep", 8, 2, 0, {"generations": "three"})
    check_options("c-prune", 8, 2, 0, {"overflow": "merge"})
    with pytest.raises(ConfigError, match="overflow"):
        check_options("c-prune", 8, 2, 0, {"overflow": "keep"})
    assert set(option_spec("c-prune")) >= {"overflow", "router"} and option_spec("frequency") == {}


def test_score_gives_each_method_the_flat_options_it_has(synth_dir, calib_txt):
    assert options_per_method(["reap", "frequency"], {"renormalize": "false"}) == {"reap": {"renormalize": "false"},
                                                                                  "frequency": {}}
    assert options_per_method(["reap", "tcess"], {"reap": {"renormalize": "0"}}) == {"reap": {"renormalize": "0"},
                                                                                     "tcess": {}}
    with pytest.raises(ConfigError, match="bogus"):
        options_per_method(["reap", "frequency"], {"bogus": "1"})
    kw = dict(calib=[calib_txt], method=["reap", "frequency"], n_samples=4, seq_len=16, batch_size=2, progress=False)
    plain = score(synth_dir("mixtral"), **kw)
    flat = score(synth_dir("mixtral"), method_options={"renormalize": "false"}, **kw)
    for L, e in flat["layers"].items():
        assert e["scores"]["frequency"] == plain["layers"][L]["scores"]["frequency"]
    assert any(e["scores"]["reap"] != plain["layers"][L]["scores"]["reap"] for L, e in flat["layers"].items())
    with pytest.raises(ConfigError, match="renormalize"):
        score(synth_dir("mixtral"), method_options={"renormalize": "maybe"}, **kw)
