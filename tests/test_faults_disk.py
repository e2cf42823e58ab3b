"""Disk full and a read-only output at every write step: one clear line, exit 2, nothing that looks
finished, and once the disk has room again ``--resume`` ends with the same bytes as a run that never
failed. The failing write is simulated with ``LOWMOE_FAULT=STEP:N:enospc`` (or ``erofs``), which
raises the OSError a real write would raise at that point (also on the background writer thread);
a real ``chmod`` is tried too where it stops writes (not as root)."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

import lowmoe
from lowmoe.cli import main
from lowmoe.engine import faults
from lowmoe.engine.rundir import MANIFEST, REPORT

from .helpers import PRUNE, output_files, step_counts

WRITE_STEPS = ["cache-write", "shard-write", "shard-close", "manifest", "files", "config", "shard-rename", "index", "report"]
ARGS = ["--keep", "4", "--n-samples", "6", "--seq-len", "16", "--batch-size", "2", "--max-shard-size", "20KB"]


def test_every_write_step_fails_cleanly_and_resumes(synth_dir, calib_txt, tmp_path, monkeypatch):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    counts = step_counts(lowmoe.prune, src, tmp_path / "ref", calib=[calib_txt], **PRUNE)
    want = output_files(tmp_path / "ref")
    tried = 0
    for step in WRITE_STEPS:
        for n, action in sorted({(1, "enospc"), (counts[step], "enospc"), (counts[step], "erofs")}):
            out = tmp_path / f"{step}-{n}-{action}"
            faults.reset()
            monkeypatch.setenv(faults.ENV, f"{step}:{n}:{action}")
            r = CliRunner().invoke(main, ["-q", "prune", str(src), str(out), "--calib", str(calib_txt), *ARGS])
            monkeypatch.delenv(faults.ENV)
            lines = [ln for ln in r.output.splitlines() if ln.strip()]
            assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, (step, n, r.output)
            expect = "disk full while writing" if action == "enospc" else "Read-only file system"
            assert lines[0].startswith(f"lowmoe: error: {out}: ") and expect in lines[0] and "--resume" in lines[0], lines[0]
            # resumable: the manifest (or, when its very first save failed, nothing worth keeping)
            assert (out / MANIFEST).is_file() or {p.name for p in out.iterdir()} <= {MANIFEST + ".tmp"}, step
            assert not (out / REPORT).exists()
            r = CliRunner().invoke(main, ["-q", "prune", str(src), str(out), "--calib", str(calib_txt), *ARGS, "--resume"])
            assert r.exit_code == 0, (step, n, r.output)
            assert output_files(out) == want, f"{step}:{n}:{action}: the resumed output differs"
            tried += 1
    print(f"\n{tried} failed writes survived ({len(WRITE_STEPS)} steps)")


def test_error_on_the_cache_writer_thread_is_one_line(synth_dir, calib_txt, tmp_path, monkeypatch):
    """The activation cache is written behind, on a thread: its error reaches the CLI as one line."""
    import errno
    import threading

    from lowmoe.engine.cache import ActivationCache

    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    orig, threads = ActivationCache.write, []

    def write(self, boundary, chunk, hidden, stream="main", **kw):
        if threading.current_thread() is not threading.main_thread():
            threads.append(threading.current_thread().name)
            raise OSError(errno.ENOSPC, "No space left on device", str(self._dir(boundary, stream) / f".c{chunk:05d}.tmp"))
        return orig(self, boundary, chunk, hidden, stream, **kw)

    monkeypatch.setattr(ActivationCache, "write", write)
    r = CliRunner().invoke(main, ["-q", "prune", str(src), str(tmp_path / "o"), "--calib", str(calib_txt), *ARGS])
    assert threads and threads[0].startswith("lowmoe-write"), threads
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "disk full while writing" in r.output, r.output
    assert ".lowmoe-work/cache" in r.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0555; covered by the erofs fault above")
def test_read_only_output_directory(synth_dir, calib_txt, tmp_path, monkeypatch):
    src = synth_dir("mixtral", layers=2, shard_size="20KB")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = CliRunner().invoke(main, ["-q", "prune", str(src), str(parent / "out"), "--calib", str(calib_txt), *ARGS])
        assert r.exit_code == 2 and "cannot write" in r.output and r.output.count("\n") == 1, r.output
    finally:
        parent.chmod(0o755)
    out = tmp_path / "out"
    monkeypatch.setenv(faults.ENV, "layer-written:2:enospc")
    with pytest.raises(lowmoe.errors.OutputError):
        lowmoe.prune(src, out, calib=[calib_txt], **PRUNE)
    monkeypatch.delenv(faults.ENV)
    out.chmod(0o555)
    try:
        r = CliRunner().invoke(main, ["-q", "prune", str(src), str(out), "--calib", str(calib_txt), *ARGS, "--resume"])
        assert r.exit_code == 2 and "make the directory writable" in r.output, r.output
    finally:
        out.chmod(0o755)
    lowmoe.prune(src, out, calib=[calib_txt], resume=True, **PRUNE)
    lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], **PRUNE)
    assert output_files(out) == output_files(tmp_path / "ref")
