"""Kill anywhere, resume to the same bytes.

A prune (and an EEP search) is killed at a named step (``LOWMOE_FAULT``, ``lowmoe.engine.faults``:
``os._exit`` in the middle of the run, no cleanup, unflushed buffers lost), then ``--resume`` must
finish with output files byte-identical to a run that was never stopped.

Speed: the killed run is forked from a ``forkserver`` that has imported lowmoe and torch but never
computed (forking the test process itself would hang in OpenMP), so no Python/torch start-up per
kill point; the exit status proves the step was reached. ``test_kill_in_a_real_process`` does the same through
the ``lowmoe`` CLI in a fresh interpreter. By default every step is killed at its first, middle and
last occurrence (for EEP: its own steps; the write steps after them are the prune's); ``-m slow``
kills at every occurrence of every step, EEP's write steps included.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import lowmoe
from lowmoe.engine import faults
from lowmoe.engine.rundir import LOCK, MANIFEST, REPORT, WORK_DIR

from .helpers import PRUNE, output_files, records, step_counts, write_jsonl

EEP = dict(keep=4, method="eep", seq_len=48, batch_size=4, max_shard_size="20KB", progress=False,
           method_options={"generations": 3, "population": 3, "layer_groups": "layer", "init": "frequency"})
PRUNE_STEPS = ["tokenize", "super-experts", "embed", "cache-write", "score", "layer-written", "shard-write", "shard-close",
               "manifest", "files", "config", "shard-rename", "index", "report", "cleanup"]
EEP_STEPS = ["eep-seed", "eep-evaluate", "eep-generation", "eep-final"]  # the write steps after them: PRUNE_STEPS
EEP_STEPS_SLOW = EEP_STEPS + ["layer-written", "shard-close", "manifest", "shard-rename", "index", "report"]


def _child(spec: str, threads: int, args: tuple, kw: dict) -> None:
    torch.set_num_threads(threads)  # the same numerics as the test process that resumes
    faults.reset()
    os.environ[faults.ENV] = spec
    lowmoe.prune(*args, **kw)


_CTX = None


def killed_at(spec: str, *args, **kw) -> int:
    """``lowmoe.prune(*args, **kw)`` in a child process with ``LOWMOE_FAULT=spec``; its exit status."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "lowmoe", "lowmoe.pipeline", "tests.test_faults_kill"])
    p = _CTX.Process(target=_child, args=(spec, torch.get_num_threads(), args, kw))
    p.start()
    p.join(300)
    return p.exitcode


def occurrences(n: int, every: bool) -> list[int]:
    return list(range(1, n + 1)) if every else sorted({1, (n + 1) // 2, n})


def walk(src, tmp_path, opts: dict, steps: list[str], every: bool) -> int:
    ref = tmp_path / "ref"
    counts = step_counts(lowmoe.prune, src, ref, **opts)
    missing = [s for s in steps if s not in counts]
    assert not missing, f"steps never reached by this run: {missing}"
    want = output_files(ref)
    survived = 0
    for step in steps:
        for n in occurrences(counts[step], every):
            out = tmp_path / f"{step}-{n}"
            code = killed_at(f"{step}:{n}", src, out, **opts)
            assert code == faults.FAULT_EXIT, f"{step}:{n}: the run was not killed there (exit {code})"
            assert not (out / REPORT).exists() or (out / MANIFEST).exists(), f"{step}:{n}: looks finished"
            lowmoe.prune(src, out, resume=True, **opts)
            assert output_files(out) == want, f"killed at {step}:{n}, resumed: the output differs"
            left = {p.name for p in out.iterdir()} & {MANIFEST, WORK_DIR, LOCK}
            assert not left and not list(out.glob("*.tmp*")), f"{step}:{n}: left behind {left}"
            survived += 1
    print(f"\n{survived} kill points survived ({len(steps)} steps)")
    return survived


EVERY = pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["first-mid-last", "every"])


@EVERY
def test_prune_killed_at_every_step_resumes_to_the_same_bytes(synth_dir, calib_txt, tmp_path, every):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    assert walk(src, tmp_path, dict(PRUNE, calib=[calib_txt]), PRUNE_STEPS, every) > len(PRUNE_STEPS)


@EVERY
def test_plan_apply_killed_resumes_to_the_same_bytes(synth_dir, tmp_path, every):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2, "layers": {"0": {"keep": [0, 2, 4, 6]}, "1": {"keep": [1, 3, 5, 7]}}}
    opts = dict(plan=plan, max_shard_size="20KB", progress=False)
    walk(src, tmp_path, opts, ["layer-written", "shard-write", "manifest", "config", "shard-rename", "index"],
         every)


@EVERY
def test_eep_search_killed_at_every_step_resumes_to_the_same_plan_and_bytes(synth_dir, tmp_path, every):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    walk(src, tmp_path, dict(EEP, calib=[train]), EEP_STEPS_SLOW if every else EEP_STEPS, every)


def test_kill_in_a_real_process(synth_dir, calib_txt, tmp_path):
    """The environment variable through the real CLI in a fresh interpreter: killed mid-layer, resumed."""
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    args = [sys.executable, "-m", "lowmoe", "-q", "prune", str(src), str(tmp_path / "out"), "--keep", "4", "--calib",
            str(calib_txt), "--n-samples", "6", "--seq-len", "16", "--batch-size", "2", "--max-shard-size", "20KB"]
    env = dict(os.environ, **{faults.ENV: "score:3"})
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == faults.FAULT_EXIT, r.stderr
    assert (tmp_path / "out" / MANIFEST).is_file() and not (tmp_path / "out" / "model.safetensors.index.json").exists()
    lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], **PRUNE)
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert output_files(tmp_path / "out") == output_files(tmp_path / "ref")
    card = (tmp_path / "out" / "README.md").read_text()  # the command that started the run, not the resume
    assert "lowmoe -q prune" in card and "--resume" not in card


def test_fault_spec_errors():
    with pytest.raises(lowmoe.errors.ConfigError, match="unknown step 'nope'"):
        faults.parse("nope")
    with pytest.raises(lowmoe.errors.ConfigError, match="neither a count"):
        faults.parse("score:x")
    assert faults.parse("shard-write:3:enospc") == ("shard-write", 3, "enospc")
