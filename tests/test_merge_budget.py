"""The budget of a merging method: the experts it rewrites, held until written, and one merge's
temporaries are planned (``budget.MergeHold``); DERN's float32 blocks are sized by --max-ram."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import lowmoe
from lowmoe.engine.apply import merge_experts, merge_one
from lowmoe.engine.budget import MergeHold, plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import ConfigError
from lowmoe.methods import merge_hold
from lowmoe.methods.merging import dern

from .helpers import dir_digest

CPU = torch.device("cpu")
# experts large next to the activations and the embedding, stored in bf16 (a written slot: half a float32 one)
DERN_SYNTH = dict(hidden_size=64, intermediate_size=256, dtype="bfloat16", shard_size="400KB")
FP8 = dict(layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
           quant="fp8", fp8_block=32)


def _plan(ck, batch_size=2, seq_len=16, **kw):
    return plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=batch_size, seq_len=seq_len, **kw)


def _one_expert_stored(ck) -> int:
    L = ck.moe_layers()[0]
    return sum(ck.tensor_bytes(k) for k in ck.adapter.expert_keys(L, 0))


def test_merge_one_reads_one_source_at_a_time_with_merge_experts_bits():
    g = torch.Generator().manual_seed(0)
    experts = [torch.randn(64, 48, generator=g).to(torch.bfloat16) for _ in range(5)]
    coeffs = {0: 0.25, 2: 0.5, 3: 0.125, 4: 0.125}
    live: list[weakref.ref] = []

    def read(i):
        gc.collect()
        assert all(r() is None for r in live), "the previous source is let go before the next is read"
        t = experts[i].clone()  # a decode: a new tensor each time
        live.append(weakref.ref(t))
        return t

    got = merge_one(read, coeffs)
    row = torch.tensor([[coeffs.get(i, 0.0) for i in range(5)]])
    want = merge_experts(experts, row)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert len(live) == 4, "each source with a nonzero coefficient read once"


def test_matching_in_blocks_of_slots_is_all_slots_at_once():
    g = torch.Generator().manual_seed(1)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    retained = [unit(torch.randn(40, 24, generator=g)) for _ in range(5)]
    retained[3][7] = retained[1][7]  # a tie: stays with the earlier slot
    seg = unit(torch.randn(40, 24, generator=g))
    seg[7] = retained[1][7]
    whole = dern.Matches(40)
    whole.update(seg, retained)
    blocked = dern.Matches(40)
    for b0 in range(0, 5, 2):
        blocked.update(seg, retained[b0:b0 + 2], b0)
    assert torch.equal(whole.slot, blocked.slot) and torch.equal(whole.neuron, blocked.neuron)
    assert int(whole.slot[7]) == 1


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3-fp8"])
def test_a_merge_plan_books_the_experts_it_holds_and_one_merge(synth_dir, arch):
    ck = Checkpoint(synth_dir(arch.removesuffix("-fp8"), **(FP8 if arch.endswith("-fp8") else {})))
    E = ck.num_experts
    drop = _plan(ck)
    merge = _plan(ck, merge=merge_hold("merge-freq", E, 4))
    assert merge_hold("merge-freq", E, 4) == MergeHold(4, 4) and merge_hold("merge-freq", E, 6) == MergeHold(2, 6)
    assert merge_hold("frequency", E, 4) is None and merge_hold("c-prune", E, 5) == MergeHold(3, 5)
    t = merge.host_terms
    assert t["merged_experts_held"] == 4 * _one_expert_stored(ck) and "merged_experts_held" not in drop.host_terms
    # one merge's temporaries come after the pass's activations and arriving group are freed: on a
    # CPU run, a float32 group outweighs those of a bf16 merge, not an FP8 re-quantization's band
    assert (t["merge_scratch"] > 0) == arch.endswith("-fp8")
    assert merge.host_peak_bytes == drop.host_peak_bytes + t["merged_experts_held"] + t["merge_scratch"]
    assert merge.min_max_ram > drop.min_max_ram
    with pytest.raises(ConfigError, match="--max-ram .*merged experts held until written"):
        _plan(ck, merge=MergeHold(4, 4), max_ram=drop.min_max_ram)
    assert merge.merge_scratch_bytes is None, "only DERN's blocks are sized by the plan"


def test_dern_blocks_follow_max_ram(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **DERN_SYNTH))
    hold = merge_hold("dern", ck.num_experts, 4)
    assert hold == MergeHold(4, 4, blocks=True, match_rows=dern.ROWS)
    per_slot = 4 * 3 * 64 * 256  # float32 gate, up, down of one expert
    plan = lambda **kw: _plan(ck, merge=hold, batch_size=1, seq_len=4, **kw)  # noqa: E731  (small activations)
    free = plan()
    assert free.merge_scratch_bytes is None, "without a budget DERN keeps its default"
    tight = plan(max_ram=free.min_max_ram)
    assert tight.merge_scratch_bytes == per_slot and tight.layers[1].group_size == 1
    some = plan(max_ram=free.min_max_ram + 6 * per_slot)  # the groups grow first, then the block
    assert 1 < some.layers[1].group_size < 8
    roomy = plan(max_ram=free.min_max_ram + 10**8)
    assert roomy.layers[1].group_size == 8 and roomy.merge_scratch_bytes == 4 * per_slot, "at most every slot"
    # a block of b float32 slots + 2 while finishing one (and the matching's (I, I) similarities),
    # with 4 - b slots written, less the pass's activations and arriving group (freed by then) and
    # the 4 written slots (counted on their own)
    F, es, g1 = per_slot, per_slot // 2, tight.host_terms
    assert g1["merge_scratch"] == 3 * es + 3 * F + 4 * 256 * 256 - tight.activation_bytes - F - 4 * es


def test_dern_under_a_tight_max_ram_writes_the_same_model(synth_dir, calib_txt, tmp_path, monkeypatch):
    """Under a --max-ram that leaves DERN one float32 expert a block, its matching reads the retained
    experts one slot at a time and its merge sums one slot at a time: the same plan and bytes."""
    src = synth_dir("mixtral", **DERN_SYNTH)
    ck = Checkpoint(src)
    floor = _plan(ck, merge=merge_hold("dern", ck.num_experts, 4)).min_max_ram
    sizes: list[int] = []
    block_size = dern.block_size
    monkeypatch.setattr(dern, "block_size", lambda *a: (sizes.append(block_size(*a)), sizes[-1])[1])
    opts = dict(keep=4, method="dern", calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, progress=False)
    tight = lowmoe.prune(src, tmp_path / "tight", max_ram=floor, **opts)
    assert tight["budget"]["plan"]["merge_scratch_bytes"] == 4 * 3 * 64 * 256 and set(sizes) == {1}
    sizes.clear()
    free = lowmoe.prune(src, tmp_path / "free", **opts)
    assert min(sizes) > 1, "without a budget: the layer's experts as stored (here every slot in a block)"
    assert tight["plan"] == free["plan"]
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "tight") == files(tmp_path / "free")


def test_inspect_plans_for_a_merging_method(synth_dir):
    from click.testing import CliRunner

    from lowmoe.cli import main

    src = str(synth_dir("mixtral"))
    run = lambda *a: CliRunner().invoke(main, ["inspect", src, "--json", *a])  # noqa: E731
    drop, merge = (json.loads(run(*a).output)["budget"] for a in ((), ("--method", "merge-freq", "--keep", "4")))
    assert merge["method"] == "merge-freq" and merge["host_terms"]["merged_experts_held"] > 0
    assert merge["min_max_ram_bytes"] > drop["min_max_ram_bytes"]
    for args, flag in ((("--method", "nope"), "--method 'nope'"), (("--keep", "3"), "--keep"),
                       (("--method", "dern", "--keep", "9"), "--keep '9'")):
        r = run(*args)
        assert r.exit_code == 2 and flag in r.output, r.output


def test_alignment_is_planned_when_the_method_aligns(synth_dir):
    """``-O align=true`` adds the alignment's host memory (two experts' neuron features and their
    (I, I) similarities in float32 and float64, ``alignment_bytes``) to the plan, beyond what the
    pass frees; the method's options reach the plan (prune, C-Prune, ``lowmoe inspect -O``)."""
    from click.testing import CliRunner

    from lowmoe.cli import main
    from lowmoe.engine.budget import ALIGN_SLACK, alignment_bytes

    # wide experts (I = 512) next to small activations: the alignment outweighs what the pass frees
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=512, dtype="bfloat16", shard_size="400KB")
    ck = Checkpoint(src)
    E = ck.num_experts
    assert merge_hold("merge-freq", E, 4, {"align": "true"}) == MergeHold(4, 4, align=True)
    assert merge_hold("merge-freq", E, 4, {"align": "false"}) == merge_hold("merge-freq", E, 4) == MergeHold(4, 4)
    assert merge_hold("c-prune", E, 5, {"align": "true"}) == MergeHold(3, 5, align=True)
    assert merge_hold("dern", E, 4, {}).align is False
    with pytest.raises(ConfigError, match="--method-option bogus: not an option of --method merge-freq"):
        merge_hold("merge-freq", E, 4, {"bogus": "1"})
    plain, aligned = (_plan(ck, merge=merge_hold("merge-freq", E, 4, o)) for o in ({}, {"align": "true"}))
    need = alignment_bytes(512, 64)
    assert need == max(2 * 512 * 192 * 4 + 512 * 512 * 4, 512 * 192 * 4 + 3 * 512 * 512 * 4) + ALIGN_SLACK
    extra = aligned.host_terms["merge_scratch"] - plain.host_terms["merge_scratch"]
    assert 0 < extra <= need and aligned.min_max_ram > plain.min_max_ram
    run = lambda *a: json.loads(CliRunner().invoke(main, ["inspect", str(src), "--json", "--method", "merge-freq", "--keep", "4",  # noqa: E731
                                                          "--batch-size", "2", "--seq-len", "16", *a]).output)["budget"]
    assert run("-O", "align=true")["min_max_ram_bytes"] == aligned.min_max_ram > run()["min_max_ram_bytes"] == plain.min_max_ram
    r = CliRunner().invoke(main, ["inspect", str(src), "-O", "align=true"])
    assert r.exit_code == 2 and "--method-option: give --method too" in r.output
