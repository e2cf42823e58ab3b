"""Fuzzing the inputs a user hands lowmoe: config.json, the index, a plan file, calibration JSONL.

Every generated input must end in success (exit 0) or in one ``lowmoe: error: ...`` line with exit 2:
never a traceback, never exit 1 (lowmoe's "internal error", i.e. a bug). The CLI runs in-process
(click's CliRunner) on a tiny synthetic model whose shards are symlinked into each example's folder.
Default: a few hundred examples in all (``N`` below); ``-m slow`` runs ten times as many.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowmoe.cli import main

N = {"config": 80, "index": 80, "plan": 100, "calib": 40}
TRIED: dict[str, int] = {}

JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.integers(-(2**40), 2**40),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=8)


def modes(slow: bool) -> list:
    return [pytest.param(False, id="ci"), pytest.param(True, id="slow", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def base(synth_dir, tmp_path_factory):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    root = tmp_path_factory.mktemp("fuzz")
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2, "layers": {"0": {"keep": [0, 2, 4, 6]}, "1": {"keep": [1, 3, 5, 7]}}}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "calib.txt").write_text("alpha beta gamma 12+3=15 sort 3 1 2\n" * 20)
    return {"src": src, "root": root, "config": json.loads((src / "config.json").read_text()),
            "index": json.loads((src / "model.safetensors.index.json").read_text()), "plan": plan}


def model_dir(base, config=None, index=None) -> Path:
    """A model folder: the base model's shards and tokenizer symlinked, config/index as given (dict or raw text)."""
    d = Path(tempfile.mkdtemp(dir=base["root"]))
    for p in base["src"].iterdir():
        if p.name not in ("config.json", "model.safetensors.index.json"):
            (d / p.name).symlink_to(p)
    for name, value, default in (("config.json", config, base["config"]), ("model.safetensors.index.json", index, base["index"])):
        value = default if value is None else value
        (d / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return d


def run(kind: str, *args) -> None:
    TRIED[kind] = TRIED.get(kind, 0) + 1
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    out = r.output
    assert "Traceback" not in out, out
    assert r.exit_code in (0, 2), f"exit {r.exit_code}: {out}{'' if r.exception is None else repr(r.exception)}"
    if r.exit_code == 2:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("lowmoe: error: "), out


def cleanup(*dirs) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def mutated(d: dict, data, extra_keys: list[str]) -> dict:
    """``d`` with some keys deleted, some replaced by arbitrary JSON, some added."""
    d = json.loads(json.dumps(d))
    keys = sorted(d) + extra_keys
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        if data.draw(st.booleans()) and k in d:
            del d[k]
        else:
            d[k] = data.draw(JSON)
    return d


def fuzz_settings(kind: str, slow: bool):
    return settings(max_examples=N[kind] * (10 if slow else 1), deadline=None, derandomize=not slow,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.mark.parametrize("slow", modes(False))
def test_fuzz_config(base, slow):
    @fuzz_settings("config", slow)
    @given(data=st.data(), raw=st.one_of(st.none(), st.text(max_size=20)))
    def check(data, raw):
        cfg = raw if raw is not None and data.draw(st.integers(0, 9)) == 0 else mutated(
            base["config"], data, ["first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers", "n_routed_experts"])
        d = model_dir(base, config=cfg)
        out = Path(tempfile.mkdtemp(dir=base["root"])) / "out"
        try:
            run("config", "inspect", d)
            run("config", "prune", d, out, "--plan", base["root"] / "plan.json")
        finally:
            cleanup(d, out.parent)

    check()
    print(f"\nconfig.json: {TRIED['config']} CLI runs")


@pytest.mark.parametrize("slow", modes(False))
def test_fuzz_index(base, slow):
    keys = sorted(base["index"]["weight_map"])
    shards = sorted(set(base["index"]["weight_map"].values()))

    @fuzz_settings("index", slow)
    @given(data=st.data())
    def check(data):
        idx = json.loads(json.dumps(base["index"]))
        wm = idx["weight_map"]
        choice = data.draw(st.integers(0, 5))
        if choice == 0:
            idx = data.draw(st.one_of(JSON, st.text(max_size=30)))
        elif choice == 1:
            idx["weight_map"] = data.draw(JSON)
        else:
            for k in data.draw(st.lists(st.sampled_from(keys), max_size=5, unique=True)):
                what = data.draw(st.integers(0, 3))
                if what == 0:
                    del wm[k]
                elif what == 1:
                    wm[k] = data.draw(st.sampled_from(shards))  # the wrong shard
                elif what == 2:
                    wm[k] = data.draw(JSON)
                else:
                    wm[data.draw(st.text(max_size=40))] = data.draw(st.sampled_from(shards + ["nope.safetensors", "../config.json"]))
            if data.draw(st.booleans()):
                idx["metadata"] = data.draw(JSON)
        d = model_dir(base, index=idx)
        out = Path(tempfile.mkdtemp(dir=base["root"])) / "out"
        try:
            run("index", "prune", d, out, "--plan", base["root"] / "plan.json")
        finally:
            cleanup(d, out.parent)

    check()
    print(f"\nindex: {TRIED['index']} CLI runs")


INT_IDS = st.integers(-2, 9)
KEEP = st.one_of(st.lists(INT_IDS, min_size=0, max_size=9), JSON)
ENTRY = st.floats(-2, 2, allow_nan=False) | st.sampled_from([float("nan"), float("inf")]) | JSON_SCALAR
MATRIX = st.one_of(st.lists(st.lists(st.floats(-2, 2, allow_nan=False), min_size=8, max_size=8), min_size=4, max_size=4),
                   st.lists(st.lists(ENTRY, min_size=8, max_size=8), min_size=4, max_size=4),
                   st.lists(st.lists(ENTRY, min_size=7, max_size=9), min_size=3, max_size=5), JSON)


@pytest.mark.parametrize("slow", modes(False))
def test_fuzz_plan(base, slow):
    @fuzz_settings("plan", slow)
    @given(data=st.data())
    def check(data):
        plan = json.loads(json.dumps(base["plan"]))
        choice = data.draw(st.integers(0, 9))
        if choice == 0:
            text = data.draw(st.one_of(st.text(max_size=30), JSON.map(json.dumps)))
        else:
            if data.draw(st.integers(0, 4)) == 0:
                plan["format"] = data.draw(JSON)
            if data.draw(st.integers(0, 3)) == 0:
                plan["num_experts_per_tok"] = data.draw(JSON_SCALAR)
            layers = plan["layers"]
            for key in data.draw(st.lists(st.sampled_from(["0", "1", "2", "-1", "x", "01"]), max_size=3, unique=True)):
                lp = dict(layers.get(key, {"keep": [0, 1, 2, 3]}))
                what = data.draw(st.integers(0, 4))
                if what == 0:
                    lp["keep"] = data.draw(KEEP)
                elif what == 1:
                    lp["merge"] = data.draw(MATRIX)
                elif what == 2:
                    lp["router"] = data.draw(MATRIX)
                elif what == 3:
                    lp[data.draw(st.sampled_from(["neurons", "bias", "extra"]))] = data.draw(JSON)
                else:
                    lp = data.draw(JSON)
                layers[key] = lp
            text = json.dumps(plan, allow_nan=True)
        d = Path(tempfile.mkdtemp(dir=base["root"]))
        (d / "plan.json").write_text(text)
        try:
            run("plan", "prune", base["src"], d / "out", "--plan", d / "plan.json")
        finally:
            cleanup(d)

    check()
    print(f"\nplan: {TRIED['plan']} CLI runs")


RECORD = st.one_of(
    st.fixed_dictionaries({"prompt": JSON_SCALAR | st.text(max_size=40)}, optional={"answer": JSON_SCALAR | st.text(max_size=20)}),
    st.fixed_dictionaries({"text": st.text(max_size=60) | JSON}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                                                       "content": st.text(max_size=30) | JSON_SCALAR}), max_size=3)
                           | JSON}),
    st.dictionaries(st.sampled_from(["question", "instruction", "input", "completion", "response", "output", "options"]),
                    JSON, max_size=3),
    JSON,
)
LINE = st.one_of(RECORD.map(json.dumps), st.text(max_size=20), st.just(""))


@pytest.mark.parametrize("slow", modes(False))
def test_fuzz_calibration_jsonl(base, slow):
    @fuzz_settings("calib", slow)
    @given(lines=st.lists(LINE, max_size=6), answer_only=st.booleans(), layout=st.sampled_from(["pack", "per-sample"]))
    def check(lines, answer_only, layout):
        d = Path(tempfile.mkdtemp(dir=base["root"]))
        (d / "calib.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
        try:
            run("calib", "prune", base["src"], d / "out", "--keep", "4", "--calib", d / "calib.jsonl", "--n-samples", "2",
                "--seq-len", "16", "--batch-size", "2", "--layout", layout, "--no-protect-super-experts",
                *(["--answer-only"] if answer_only else []))
        finally:
            cleanup(d)

    check()
    print(f"\ncalibration JSONL: {TRIED['calib']} CLI runs")
