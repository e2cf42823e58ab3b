"""EEP on several processes (``torchrun``, gloo on CPU): the same search as one process, bit for bit;
a rank that dies stops the run with one clear line; ``--resume`` with another process count finishes it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowmoe
from click.testing import CliRunner
from lowmoe.cli import main
from lowmoe.engine import dist, faults
from lowmoe.engine.rundir import REPORT, WORK_DIR
from lowmoe.errors import ConfigError

from .helpers import output_files, records, write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

SEARCH = dict(keep=4, seq_len=64, batch_size=4, seed=3)
EEP = dict(generations=3, population=4, layer_groups="layer")


def cli_args(src: Path, out: Path, train: Path, dev: Path) -> list[str]:
    return ["prune", str(src), str(out), "--keep", "4", "--method", "eep", "--calib", str(train), "--dev", str(dev),
            "--seq-len", "64", "--batch-size", "4", "--seed", "3", "--generations", "3", "--population", "4",
            "--layer-groups", "layer"]


def launch(nproc: int, args: list[str], fault: str | None = None, timeout_s: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m lowmoe -q ARGS``, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", faults.ENV)}
    env.update(OMP_NUM_THREADS="1", LOWMOE_DIST_TIMEOUT=str(timeout_s))
    if fault:
        env[faults.ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "lowmoe", "-q", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def one_thread():
    """In this process, the threads of a ``launch``ed rank: a matrix product's rounding depends on them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def search(synth_dir, tmp_path_factory):
    """The data and the one-process reference run (in this process)."""
    tmp = tmp_path_factory.mktemp("eep-dist")
    src = synth_dir("mixtral")
    train = write_jsonl(tmp / "train.jsonl", records(12))
    dev = write_jsonl(tmp / "dev.jsonl", records(4))
    ref = tmp / "one"
    with one_thread():
        report = lowmoe.prune(src, ref, method="eep", calib=[train], progress=False, **SEARCH,
                              method_options={"dev": str(dev), **EEP})
    return {"src": src, "train": train, "dev": dev, "ref": ref, "report": report, "tmp": tmp}


def untimed(eep: dict) -> dict:
    """The EEP report without its timings (and the process count)."""
    keep = {k: v for k, v in eep.items() if k not in ("search_s", "evaluations_per_hour", "quant", "stream_stats",
                                                      "fitness_png", "processes", "search_cpu_s",
                                                      "rank_stream_stats", "stages", "dev_stages")}
    keep["curve"] = [{k: v for k, v in c.items() if k != "elapsed_s"} for c in eep["curve"]]
    return keep


def test_two_processes_search_like_one(search):
    out = search["tmp"] / "two"
    r = launch(2, cli_args(search["src"], out, search["train"], search["dev"]))
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((out / REPORT).read_text())
    assert two["eep"]["processes"] == 2 and search["report"]["eep"]["processes"] == 1
    # the same candidates with the same fitness, generation by generation, the same seeds and pick
    assert untimed(two["eep"]) == untimed(search["report"]["eep"])
    # the same plan and the same checkpoint bytes
    assert output_files(out) == output_files(search["ref"])
    assert not (out / WORK_DIR).exists(), "rank 1's work directory is removed with rank 0's"
    assert r.stdout.count("experts per layer 8 -> 4") == 1, "only rank 0 prints the summary"


def test_a_dying_rank_stops_the_run_and_a_resume_with_one_process_finishes_it(search):
    out = search["tmp"] / "killed"
    # rank 1 dies in the middle of a population pass of generation 2 (seeds and generation 0 and 1 are done).
    # The count depends on the candidates the search draws: a change to the operators (evolve.py) may move
    # it out of the search; then pick the count again (the two asserts below say which way it moved).
    r = launch(2, cli_args(search["src"], out, search["train"], search["dev"]), fault="eep-evaluate:12@1")
    assert r.returncode != 0, "rank 1 never reached eep-evaluate 12 times: lower the count"
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lowmoe: error:")]
    # rank 0 sees the dead peer in a collective, or torchrun stops it first (SIGTERM): one line either way
    assert len(lines) == 1 and lines[0].startswith(("lowmoe: error: rank 0 of 2: another process of the run stopped",
                                                    "lowmoe: error: rank 0 of 2: stopped by the launcher (SIGTERM)")), \
        r.stderr[-3000:]
    assert "--resume" in lines[0]
    state = json.loads((out / WORK_DIR / "eep" / "state.json").read_text())
    assert 0 < state["generation"] < EEP["generations"], "killed mid-search, after a saved generation (raise the count)"
    # the seeds' dev fitness, scored on both ranks, came back with its per-example outcomes (the paired pick needs them)
    devs = [e["dev"] for e in state["archive"] if e["dev"] is not None]
    assert devs and all(len(d["outcomes"]) == 1 and len(d["outcomes"][0]) == 5 for d in devs)
    assert not (out / REPORT).exists()
    # resumed in one process: the same final plan and bytes as the run that never stopped
    with one_thread():  # the same command (same options), in one process
        res = CliRunner().invoke(main, ["-q", *cli_args(search["src"], out, search["train"], search["dev"]), "--resume"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / REPORT).read_text())
    assert report["plan"]["layers"] == search["report"]["plan"]["layers"]
    assert output_files(out) == output_files(search["ref"])
    assert untimed(report["eep"])["curve"] == untimed(search["report"]["eep"])["curve"]


@pytest.mark.slow
def test_a_hung_rank_is_caught_by_the_timeout(search, tmp_path):
    """Rank 1 stops (SIGSTOP) in a population pass: rank 0's collective times out with the same one line."""
    r = launch(2, cli_args(search["src"], tmp_path / "hung", search["train"], search["dev"]),
               fault="eep-evaluate:12:stop@1", timeout_s=15)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lowmoe: error:")]
    # rank 0 sees the dead peer in a collective, or torchrun stops it first (SIGTERM): one line either way
    assert len(lines) == 1 and lines[0].startswith(("lowmoe: error: rank 0 of 2: another process of the run stopped",
                                                    "lowmoe: error: rank 0 of 2: stopped by the launcher (SIGTERM)")), \
        r.stderr[-3000:]
    assert "Timed out" in lines[0] and "--resume" in lines[0]


@pytest.mark.slow
def test_one_process_killed_resumes_on_two(search, tmp_path):
    """The other way round: a one-process search killed after a generation, continued by two processes."""
    out = tmp_path / "one-then-two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", faults.ENV: "eep-generation:2"}
    r = subprocess.run([sys.executable, "-m", "lowmoe", "-q", *cli_args(search["src"], out, search["train"], search["dev"])],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == faults.FAULT_EXIT, r.stderr[-2000:]
    assert json.loads((out / WORK_DIR / "eep" / "state.json").read_text())["generation"] == 1
    r = launch(2, [*cli_args(search["src"], out, search["train"], search["dev"]), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert output_files(out) == output_files(search["ref"])


def test_rank0_refusing_the_output_stops_the_other_ranks(search, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("not ours")
    r = launch(2, cli_args(search["src"], out, search["train"], search["dev"]))
    assert r.returncode != 0
    errors = sorted(ln for ln in r.stderr.splitlines() if ln.startswith("lowmoe: error:"))
    assert any("rank 1 of 2: rank 0 stopped before the search:" in e and str(out) in e for e in errors), errors
    assert sorted(p.name for p in out.iterdir()) == ["something"], "the output was not touched"


def test_only_eep_runs_on_several_processes(synth_dir, calib_txt, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="--method frequency runs in one process.*only --method eep"):
        lowmoe.prune(synth_dir("mixtral"), tmp_path / "o", keep=4, method="frequency", calib=[str(calib_txt)],
                     progress=False)
    assert not (tmp_path / "o").exists()


def test_group_from_env_and_share():
    assert dist.from_env({}) == dist.SINGLE
    g = dist.from_env({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "0"})
    assert (g.rank, g.world, g.local_rank, g.is_main) == (2, 3, 0, False)
    assert g.share(list(range(8))) == [2, 5]
    with pytest.raises(ConfigError, match="RANK"):
        dist.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ConfigError, match="integers"):
        dist.from_env({"WORLD_SIZE": "two"})
    assert dist.SINGLE.split(len, "x") is len  # a group of one: the function itself


def test_fault_on_one_rank_only(monkeypatch):
    assert faults.parse_rank("eep-evaluate:3@1") == 1 and faults.parse_rank("eep-evaluate:3") is None
    assert faults.parse("eep-evaluate:3:enospc@1") == ("eep-evaluate", 3, "enospc")
    with pytest.raises(ConfigError, match="not a rank"):
        faults.parse_rank("eep-evaluate@x")
    monkeypatch.setenv(faults.ENV, "eep-evaluate:1:enospc@1")
    monkeypatch.setenv("RANK", "0")
    faults.reset()
    faults.point("eep-evaluate")  # rank 0: not this one
    monkeypatch.setenv("RANK", "1")
    faults.reset()
    with pytest.raises(OSError):
        faults.point("eep-evaluate")
    faults.reset()


def test_assign_keeps_work_where_it_is_and_balances():
    # 4 items from scratch, nothing shared: two per rank
    fresh = [[f"{i}:{b}" for b in range(4)] for i in range(4)]
    assert sorted(dist.assign([fresh, fresh])) == [0, 0, 1, 1]
    # item 0's streams are cached on rank 1 (it needs nothing there): it goes there
    needs0 = [["a", "b"], ["c", "d"]]
    needs1 = [[], ["c", "d"]]
    assert dist.assign([needs0, needs1]) == [1, 0]
    # two children sharing a 3-stream prefix go to one rank, the third item to the other
    shared = [["p1", "p2", "p3", "x"], ["p1", "p2", "p3", "y"], ["q1", "q2", "q3", "q4"]]
    owner = dist.assign([shared, shared])
    assert owner[0] == owner[1] != owner[2]
    # every rank computes the same answer from the same needs; an empty population is fine
    assert dist.assign([shared, shared]) == owner and dist.assign([[], []]) == []


def test_each_rank_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    g = dist.Group(rank=3, world=4, local_rank=1)
    assert dist.device_for("cuda", g) == "cuda:1" and dist.device_for("auto", g) == "cuda:1"
    assert dist.device_for("cuda:0", g) == "cuda:0" and dist.device_for("cpu", g) == "cpu"  # explicit: kept
    assert dist.device_for("cuda", dist.SINGLE) == "cuda"
