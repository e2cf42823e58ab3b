"""Evaluation: greedy exact match == teacher-forced (streaming) exact match; JSONL input; CLI errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lowmoe.toy import tasks
from lowmoe.cli.eval import eval_command
from lowmoe.evaluate import evaluate, format_table

TOY = tasks.TOY_MODEL


@pytest.fixture(scope="module")
def toy_results():
    kw = {"tasks": "arithmetic,reverse,brackets,text", "n": 40, "batch_size": 40, "seed": 5}
    return evaluate(TOY, mode="greedy", **kw), evaluate(TOY, mode="streaming", **kw)


def test_greedy_exact_equals_teacher_forced_exact(toy_results):
    greedy, streaming = toy_results
    for name, g in greedy["tasks"].items():
        s = streaming["tasks"][name]
        # Per example, not just on average: greedy decoding is right iff every gold token is the argmax.
        assert g["correct"] == s["correct"], name
        assert g["teacher_forced_exact_match"] == g["exact_match"] == s["exact_match"]
        assert s["perplexity"] == pytest.approx(g["perplexity"], rel=1e-4)
        assert g["n"] == 40 and g["answer_tokens"] == s["answer_tokens"]
    # The equivalence is only interesting if both right and wrong answers occur.
    flat = [c for r in greedy["tasks"].values() for c in r["correct"]]
    assert any(flat) and not all(flat)


def test_streaming_never_loads_the_whole_model(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("streaming mode must not load the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    r = evaluate(TOY, tasks="lookup", n=8, mode="streaming")
    assert r["tasks"]["lookup"]["n"] == 8


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_any_checkpoint_with_jsonl(synth_dir, tmp_path, arch):
    model = synth_dir(arch)
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}: {'ab' * i}=", "answer": f"{i}\n"}) + "\n" for i in range(12)))
    g = evaluate(model, jsonl=path, n=10, mode="greedy", batch_size=4)
    s = evaluate(model, jsonl=path, n=10, mode="streaming", batch_size=3)
    assert list(g["tasks"]) == ["qa"] and g["tasks"]["qa"]["n"] == 10
    assert g["tasks"]["qa"]["correct"] == s["tasks"]["qa"]["correct"]
    assert s["tasks"]["qa"]["perplexity"] == pytest.approx(g["tasks"]["qa"]["perplexity"], rel=1e-3)


def test_table_and_relative(toy_results):
    greedy, streaming = toy_results
    table = format_table(streaming, greedy)
    assert "arithmetic" in table and "Δexact" in table and "+0.000" in table


def test_cli_eval_json(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(eval_command, ["toy", "--tasks", "sort,lookup", "--n", "10", "--streaming", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "sort" in res.output and "lookup" in res.output
    data = json.loads(out.read_text())
    assert set(data["result"]["tasks"]) == {"sort", "lookup"} and data["result"]["mode"] == "streaming"


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arithmetic,poetry"], "unknown task 'poetry'"),
    (["--jsonl", "missing.jsonl"], "missing.jsonl: file not found"),
    (["--jsonl", "BAD"], ":2: not valid JSON"),
    (["--tasks", "sort", "--n", "0"], "n must be at least 1"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2\\n"}\nnot json\n')
    args = [str(bad) if a == "BAD" else str(tmp_path / a) if a == "missing.jsonl" else a for a in args]
    res = CliRunner().invoke(eval_command, ["toy", *args])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowmoe: error:") and message in lines[0], res.output


def test_cli_missing_model(tmp_path):
    res = CliRunner().invoke(eval_command, [str(tmp_path / "nowhere"), "--tasks", "sort"])
    assert res.exit_code == 2 and "no config.json" in res.output



def test_prune_and_compare(tmp_path):
    from lowmoe.evaluate import prune_and_compare

    res = prune_and_compare("sort", out=tmp_path / "toy-sort", n=30, calib_n=16)
    assert (tmp_path / "toy-sort-calib" / "sort-calib.jsonl").is_file()
    before, after = res["before"]["tasks"], res["after"]["tasks"]
    assert after["sort"]["exact_match"] >= 0.9 * before["sort"]["exact_match"]
    assert all(len(v["keep"]) == 4 for v in res["report"]["plan"]["layers"].values())
    assert "sort" in format_table(res["after"], res["before"])
