"""Task data: deterministic, correct answers, short sequences, and train/calib/test never overlap."""

from __future__ import annotations

import json

import pytest

from lowmoe.toy import tasks
from lowmoe.engine.calibration import read_documents
from lowmoe.errors import CalibrationError, ConfigError

FEW_SHOT = ["arithmetic", "reverse", "sort", "brackets"]


def _demo_keys(rec: dict) -> list[str]:
    """Canonical keys of the demonstrations inside a few-shot prompt (the query part of each line)."""
    lines = rec["prompt"].split("\n")[1:-1]
    return [line.rsplit("=" if rec["domain"] == "arithmetic" else ">", 1)[0] for line in lines]


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_deterministic_and_seeded(domain):
    a = tasks.make_split(domain, "test", 20, seed=3)
    assert a == tasks.make_split(domain, "test", 20, seed=3)
    assert a != tasks.make_split(domain, "test", 20, seed=4)
    assert tasks.make_split(domain, "test", 40, seed=3)[:20] == a  # n only extends the draw


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_splits_are_disjoint(domain):
    keys = {s: {r["key"] for r in tasks.make_split(domain, s, 300 if s != "train" else 1000, seed=0)} for s in tasks.SPLITS}
    assert not keys["calib"] & keys["test"]
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["calib"]
    for s, ks in keys.items():
        if domain == "text":  # text is partitioned by source module, so windows of one docstring never straddle splits
            assert all(tasks.split_of("text", k.split(":")[0]) == s for k in ks)
        else:
            assert all(tasks.split_of(domain, k) == s for k in ks)


@pytest.mark.parametrize("domain", FEW_SHOT)
def test_demonstrations_come_from_the_same_split(domain):
    for split in ("calib", "test"):
        for rec in tasks.make_split(domain, split, 50, seed=1):
            demos = _demo_keys(rec)
            assert len(demos) == tasks.DEFAULT_SHOTS
            assert all(tasks.split_of(domain, k) == split for k in demos)


def test_text_modules_disjoint():
    by = tasks._text_by_split()
    mods = {s: {m for m, _ in v} for s, v in by.items()}
    assert all(mods[s] for s in tasks.SPLITS)
    assert not mods["calib"] & mods["test"] and not mods["train"] & mods["test"] and not mods["train"] & mods["calib"]


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_format_and_length(domain):
    recs = tasks.make_split(domain, "calib", 100, seed=0)
    assert len({r["key"] for r in recs}) == len(recs)  # distinct queries
    for r in recs:
        assert r["prompt"].startswith(tasks.TAGS[domain] + "\n")
        assert len(r["prompt"]) + len(r["answer"]) <= tasks.MAX_BYTES
        assert r["answer"] and r["answer"].isascii()
        if domain != "text":
            assert r["answer"].endswith("\n") and "\n" not in r["answer"][:-1]


def test_answers_are_right():
    for r in tasks.make_split("arithmetic", "test", 50):
        a, b = r["key"].split("+")
        assert r["answer"] == f"{int(a) + int(b)}\n" and r["prompt"].endswith(r["key"] + "=")
    for r in tasks.make_split("reverse", "test", 50):
        assert r["answer"] == r["key"][::-1] + "\n"
    for r in tasks.make_split("sort", "test", 50):
        assert r["answer"] == "".join(sorted(r["key"])) + "\n"
    bal = [r["answer"] for r in tasks.make_split("brackets", "test", 200)]
    assert 0.3 < bal.count("yes\n") / len(bal) < 0.7
    for r in tasks.make_split("brackets", "test", 50):
        assert r["answer"] == ("yes\n" if tasks.is_balanced(r["key"]) else "no\n")
    for r in tasks.make_split("lookup", "test", 50):
        ctx = dict(kv.split("=") for kv in r["prompt"].split("\n")[1].split())
        assert r["answer"] == ctx[r["prompt"][-2]] + "\n"
    for r in tasks.make_split("text", "test", 20):
        assert r["answer"].startswith(" ") and " " not in r["answer"][1:]
    assert tasks.is_balanced("([])()") and not tasks.is_balanced("([)]") and not tasks.is_balanced("((")


def test_calib_file_is_calibration_data(tmp_path):
    path = tasks.calib_file("sort", n=16, out_dir=tmp_path)
    assert path.name == "sort-calib.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 16 and set(lines[0]) == {"prompt", "answer"}
    docs = read_documents(path)
    assert len(docs) == 16 and docs[0].answer == lines[0]["answer"]
    test_keys = {r["key"] for r in tasks.make_split("sort", "test", 200)}
    calib_queries = {line["prompt"].rsplit("\n", 1)[1].rstrip(">") for line in lines}
    assert not calib_queries & test_keys


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'math'.*arithmetic"):
        tasks.check_domains("arithmetic,math")
    with pytest.raises(ConfigError, match="split 'dev'"):
        tasks.make_split("sort", "dev", 5)
    with pytest.raises(CalibrationError, match="file not found"):
        tasks.read_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", \n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not valid JSON"):
        tasks.read_jsonl(bad)
    bad.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: expected an object with string fields 'prompt' and 'answer'"):
        tasks.read_jsonl(bad)
