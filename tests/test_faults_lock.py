"""One writer per output directory: a second lowmoe process on the same OUT is refused, changes
nothing, and the first finishes with the same bytes as an undisturbed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import lowmoe
from lowmoe.engine.faults import ENV
from lowmoe.engine.rundir import LOCK, MANIFEST, OutputLock
from lowmoe.errors import OutputError

from .helpers import dir_digest
from .helpers import PRUNE, output_files


def cli(src, out, calib, *extra):
    return [sys.executable, "-m", "lowmoe", "-q", "prune", str(src), str(out), "--keep", "4", "--calib", str(calib),
            "--n-samples", "6", "--seq-len", "16", "--batch-size", "2", "--max-shard-size", "20KB", *extra]


def test_second_process_on_the_same_output_is_refused(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    out = tmp_path / "out"
    # the first run pauses itself (SIGSTOP) in the middle of layer 1's scoring, holding OUT
    first = subprocess.Popen(cli(src, out, calib_txt), env=dict(os.environ, **{ENV: "score:4:stop"}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the first run ended before reaching the pause point"
        assert (out / MANIFEST).is_file() and (out / LOCK).read_text().strip() == str(first.pid)
        before = dir_digest(out)
        for extra in (["--resume"], [], ["--overwrite"]):
            second = subprocess.run(cli(src, out, calib_txt, *extra), capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr
            assert second.stderr.strip() == (f"lowmoe: error: {out} is being written by another lowmoe process "
                                              f"(pid {first.pid}); wait for it or choose another OUT"), second.stderr
            assert dir_digest(out) == before, f"the refused process ({extra}) changed the output"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], **PRUNE)
    assert output_files(out) == output_files(tmp_path / "ref")
    assert not (out / LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(dead.stdout)  # what a killed run leaves: the file, but no flock on it
    lowmoe.prune(src, out, calib=[calib_txt], **PRUNE)
    assert (out / "lowmoe_report.json").is_file() and not (out / LOCK).exists()


def test_lock_in_process(tmp_path):
    """The same lock taken twice in one process (two open file descriptions) is refused too; a
    refused lock leaves no directory it created."""
    out = tmp_path / "a" / "out"
    with OutputLock(out):
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with OutputLock(out):
                pass
    assert not out.exists()  # created for the lock, empty, removed again
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        with OutputLock(tmp_path / "file.txt" / "sub"):  # a parent that is a file
            pass


def test_eep_search_state_is_under_the_lock(synth_dir, tmp_path):
    """The EEP search state lives in OUT/.lowmoe-work, so the OUT lock guards it: a second search on
    the same OUT is refused before it reads or writes that state."""
    from .helpers import records, write_jsonl

    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    out = tmp_path / "out"
    with OutputLock(out):
        (out / ".lowmoe-work" / "eep").mkdir(parents=True)
        before = dir_digest(out)
        with pytest.raises(OutputError, match="being written by another lowmoe process"):
            lowmoe.prune(src, out, keep=4, method="eep", calib=[train], seq_len=48, batch_size=4, progress=False,
                         resume=True, method_options={"generations": 1, "population": 2})
        assert dir_digest(out) == before
