"""``--init METHOD``: the EEP search's seed is the one-shot plan of METHOD -- with ``sequential`` off
the keep-sets ``lowmoe score`` reports, by default the plan ``lowmoe prune`` writes (super experts
protected) -- also when the seeding pass is expert-chunked under --max-ram."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.methods.eep.runner import _seed_candidate
from lowmoe.methods.eep.space import SearchSpace
from lowmoe.pipeline import PruneConfig, plan_run_budget
from lowmoe.score import score

from .helpers import lazy_chunking_ram, edit_checkpoint

CAL = {"seq_len": 16, "n_samples": 4, "batch_size": 2}
PCAL = {"seq_len": 32, "n_samples": 6, "batch_size": 3}  # test_scoring_protect's calibration


def test_seed_is_the_one_shot_plan_with_and_without_budget(synth_dir, calib_txt, tmp_path):
    model = synth_dir("mixtral")
    ck = Checkpoint(model)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    ref = score(model, calib=[calib_txt], method="reap", keep=4, protect_super_experts=False, progress=False,
                device="cpu", **CAL)
    want = space.from_keep({int(L): e["keep"]["reap"] for L, e in ref["layers"].items()}).canonical().key()

    # lowmoe score's keep-sets are taken on the original model's activations: sequential=False
    cfg = PruneConfig(model=model, out=tmp_path / "out", keep=4, method="eep", calib=[calib_txt], sequential=False,
                      protect_super_experts=False, **CAL)
    seed = _seed_candidate(SimpleNamespace(ck=ck, budget=None), cfg, space, "reap", tmp_path / "plain")
    assert seed.canonical().key() == want

    small = PruneConfig(model=model, out=tmp_path / "out2", keep=4, method="eep", calib=[calib_txt],
                        max_ram=lazy_chunking_ram(model, CAL["batch_size"], CAL["seq_len"]), sequential=False,
                        protect_super_experts=False, **CAL)
    budget = plan_run_budget(small, ck)
    assert budget.lazy_experts, "the seed pass reads experts from the shards in groups, as the prune does"
    assert all(budget.layers[L].group_size < ck.num_experts for L in ck.moe_layers()), \
        "the RAM budget must force expert chunking"
    chunked = _seed_candidate(SimpleNamespace(ck=ck, budget=budget), small, space, "reap", tmp_path / "chunked")
    assert chunked.canonical().key() == want
    # sequential (the prune default): each layer scored on the pruned previous layer, chunked or not
    seq = _seed_candidate(SimpleNamespace(ck=ck, budget=None), replace(cfg, sequential=True), space, "reap",
                          tmp_path / "seq")
    seq_chunked = _seed_candidate(SimpleNamespace(ck=ck, budget=budget), replace(small, sequential=True), space, "reap",
                                  tmp_path / "seq-chunked")
    assert seq_chunked.canonical().key() == seq.canonical().key()


def test_seed_keeps_super_experts_as_the_one_shot_prune_does(tmp_path, calib_txt):
    """The seed is the plan ``lowmoe prune --method frequency`` writes (each layer scored on the pruned
    previous layer's outputs): a planted super expert (the least used expert of layer 1, its down
    projection scaled 1000x) stays in it; without protection it is dropped, in both."""
    import lowmoe
    from lowmoe.score import score
    from lowmoe.toy.synth import synth_model

    path = synth_model(tmp_path / "m", "mixtral", layers=3, hidden_size=32, intermediate_size=32, experts=8, top_k=2,
                       shard_size="40KB")
    usage = score(path, calib=[calib_txt], method="frequency", protect_super_experts=False, progress=False, **PCAL)
    s1 = usage["layers"]["1"]["scores"]["frequency"]
    planted = min((e for e in range(8) if s1[e] > 0), key=lambda e: s1[e])
    edit_checkpoint(path, lambda k, v: v * 1000 if k == f"model.layers.1.block_sparse_moe.experts.{planted}.w2.weight" else v)
    ck = Checkpoint(path)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 2, "layer")
    for protect in (True, False):
        one_shot = lowmoe.prune(path, tmp_path / f"o-{protect}", keep=2, method="frequency", calib=[calib_txt],
                                progress=False, protect_super_experts=protect, **PCAL)
        want = space.from_keep({int(L): e["keep"] for L, e in one_shot["plan"]["layers"].items()}).canonical().key()
        cfg = PruneConfig(model=path, out=tmp_path / f"e-{protect}", keep=2, method="eep", calib=[calib_txt],
                          protect_super_experts=protect, progress=False, **PCAL)
        seed = _seed_candidate(SimpleNamespace(ck=ck, budget=None), cfg, space, "frequency", tmp_path / f"w-{protect}")
        assert seed.canonical().key() == want
        assert (planted in seed.em[space.group_of(1)].argmax(1)) == protect
