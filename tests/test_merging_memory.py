"""Merging stays streamed: going from 2 to 12 layers grows a merging method's peak memory no more
than it grows plain ``frequency`` dropping (the pipeline's own baseline), give or take one layer.
Each prune runs in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowmoe.toy.synth import synth_model

from .helpers import write_calib

LAYER_BYTES = 8 * 3 * 256 * 512 * 4  # ~12.6 MB of experts per layer in fp32


def _peak(model, out, calib, method, *opts) -> int:
    extra = [a for o in opts for a in ("-O", o)]
    subprocess.run([sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(out), "--keep", "4", "--method", method,
                    "--calib", str(calib), "--n-samples", "4", "--seq-len", "32", "--max-shard-size", "20MB", *extra],
                   check=True, capture_output=True)
    return json.loads((out / "lowmoe_report.json").read_text())["memory"]["peak_rss_bytes"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    kw = dict(hidden_size=256, intermediate_size=512, experts=8, top_k=2, shard_size="20MB")
    small = synth_model(root / "l2", "mixtral", layers=2, **kw)
    big = synth_model(root / "l12", "mixtral", layers=12, **kw)
    calib = write_calib(root / "c.txt")
    growth = _peak(big, root / "f12", calib, "frequency") - _peak(small, root / "f2", calib, "frequency")
    return small, big, calib, growth


@pytest.mark.slow
@pytest.mark.parametrize("method,opts", [("merge-freq", ("align=true",)), ("hc-merge", ()), ("c-prune", ()), ("dern", ())])
def test_merging_peak_rss_flat_in_layers(models, tmp_path, method, opts):
    small, big, calib, frequency_growth = models
    p_small = _peak(small, tmp_path / "o2", calib, method, *opts)
    p_big = _peak(big, tmp_path / "o12", calib, method, *opts)
    # 10 more layers are 126 MB more model; merging may add at most about one layer to the baseline's growth.
    assert (p_big - p_small) - frequency_growth < LAYER_BYTES, (p_small, p_big, frequency_growth)


@pytest.mark.parametrize("method", ["plan", "c-prune"])
def test_a_merge_decodes_only_its_sources(synth_dir, calib_txt, tmp_path, monkeypatch, method):
    """Writing a merged layer of an unquantized per-expert checkpoint decodes each merged expert's
    sources alone, never the whole layer, and copies a row that is one source with coefficient 1 as
    stored bytes (a saved merge plan; C-Prune's write pass), with the bytes of the layer decoded whole."""
    import lowmoe
    from lowmoe.engine import rundir
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.lazy import StoredTensor

    from .helpers import count_decodes, dir_digest, four_way_merge_plan

    src = synth_dir("mixtral")
    plan = four_way_merge_plan(Checkpoint(src))
    opts = dict(plan=plan) if method == "plan" else dict(keep=4, method="c-prune", calib=[calib_txt], n_samples=4,
                                                         seq_len=16, batch_size=2, method_options={"overflow": "merge"})
    decoded = count_decodes(monkeypatch, StoredTensor)
    real_write = rundir.PruneRun.write_layer
    writing: list[str] = []

    def write_layer(self, *a, **k):  # count the reads of the write pass only
        n = len(decoded)
        out = real_write(self, *a, **k)
        writing.extend(decoded[n:])
        return out

    monkeypatch.setattr(rundir.PruneRun, "write_layer", write_layer)
    rep = lowmoe.prune(src, tmp_path / "lazy", progress=False, **opts)
    for L, lp in rep["plan"]["layers"].items():
        rows = lp.get("merge") or []
        # a row that is one source with coefficient 1 is that source's stored bytes, copied
        merged = [row for row in rows if [c for c in row if c != 0.0] != [1.0]]
        sources = {i for row in merged for i, c in enumerate(row) if c != 0.0}
        got = {int(k.split(".experts.")[1].split(".")[0]) for k in writing if k.startswith(f"model.layers.{L}.")}
        assert got == sources, (L, got, sources)  # each source once per projection, the others never
        assert sum(k.startswith(f"model.layers.{L}.") for k in writing) == 3 * len(sources)
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))  # the whole-layer path
    if method == "plan":
        lowmoe.prune(src, tmp_path / "whole", progress=False, **opts)
    else:
        lowmoe.prune(src, tmp_path / "whole", plan=rep["plan"], progress=False)
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "lazy") == files(tmp_path / "whole")


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3-fp8", "gpt_oss", "gpt_oss-mxfp4"])
def test_a_merged_layer_runs_from_its_held_experts(synth_dir, calib_txt, tmp_path, monkeypatch, arch):
    """The sequential pass runs a merged layer from the merged experts held for the writer, in groups
    (``stream.held_experts``; an FP8 layer's as written, re-quantized, decoded a group at a time; a
    fused layout's output rows, MXFP4's as written), not stacked into a whole layer beside them: the
    same plans, scores and bytes as the stacked way, under a --max-ram that makes the groups smaller
    than the layer."""
    import lowmoe
    from lowmoe.engine import lazy, stream

    from .helpers import dir_digest

    import torch

    from lowmoe.engine.budget import plan_lazy_budget
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.methods import merge_hold

    fp8 = dict(layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
               quant="fp8", fp8_block=32)
    quant = {"fp8": fp8, "mxfp4": dict(fp8, quant="mxfp4")}
    name, _, q = arch.partition("-")
    src = synth_dir(name, **quant.get(q, {}))
    ck = Checkpoint(src)
    free = plan_lazy_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16,
                            merge=merge_hold("merge-freq", ck.num_experts, 4))
    tight = free.min_max_ram + 2 * ck.layer_read_bytes(ck.moe_layers()[0]) // ck.num_experts
    opts = dict(keep=4, method="merge-freq", calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, progress=False,
                max_ram=tight)
    reads: list[str] = []
    read_into = lazy.HeldTensor.read_into
    monkeypatch.setattr(lazy.HeldTensor, "read_into", lambda self, out: (reads.append(self.key), read_into(self, out))[1])
    held = lowmoe.prune(src, tmp_path / "held", **opts)
    assert reads, "the merged experts are read from the held tensors"
    assert max(held["budget"]["group_sizes"].values()) < 4, "groups smaller than the merged layer"
    monkeypatch.setattr(stream, "held_experts", lambda *a: None)  # the stacked way
    stacked = lowmoe.prune(src, tmp_path / "stacked", **opts)
    assert held["plan"] == stacked["plan"] and held["scores"] == stacked["scores"]
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "held") == files(tmp_path / "stacked")


def test_a_fused_merge_reads_its_sources_rows(synth_dir, tmp_path, monkeypatch):
    """A merge plan over an unquantized fused layout (GPT-OSS in bf16) read lazily: the fused expert
    tensors are never read whole; each merged row reads its sources' rows, one at a time, and a row
    that is one source with coefficient 1 reads that row -- the bytes of the layer decoded whole."""
    import lowmoe
    from lowmoe.engine import lazy, rundir
    from lowmoe.engine.checkpoint import Checkpoint

    from .helpers import count_decodes, dir_digest, four_way_merge_plan

    src = synth_dir("gpt_oss", dtype="bfloat16")
    plan = four_way_merge_plan(Checkpoint(src))
    whole = count_decodes(monkeypatch, lazy.StoredTensor)
    rows: list[tuple[str, tuple[int, ...]]] = []
    read_rows = lazy.StoredRows.read
    monkeypatch.setattr(lazy.StoredRows, "read", lambda self: (rows.append((self.key, self.keep)), read_rows(self))[1])
    lowmoe.prune(src, tmp_path / "lazy", plan=plan, progress=False)
    assert not [k for k in whole if ".experts." in k], "no fused expert tensor read whole"
    # per layer and fused tensor: the two coefficient-1 rows (2, 4) at once, then each merged row's sources
    want = [(2, 4), (0,), (1,), (5,), (7,)]
    got = [keep for key, keep in rows if key.endswith("experts.gate_up_proj") and ".layers.1." in key]
    assert got == want, got
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))  # the whole-layer path
    lowmoe.prune(src, tmp_path / "whole", plan=plan, progress=False)
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "lazy") == files(tmp_path / "whole")
