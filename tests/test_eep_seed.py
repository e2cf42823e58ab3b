"""``--init METHOD``: the EEP search's seed is the one-shot plan of METHOD on the original model's
activations -- the keep-sets ``lowmoe score`` reports -- also when the seeding pass is expert-chunked
under --max-ram."""

from __future__ import annotations

from types import SimpleNamespace

from lowmoe.checkpoint import Checkpoint
from lowmoe.eep.runner import _seed_candidate
from lowmoe.eep.space import SearchSpace
from lowmoe.pipeline import PruneConfig, plan_run_budget
from lowmoe.score import score
from tests.test_score_budget import chunking_ram

CAL = {"seq_len": 16, "n_samples": 4, "batch_size": 2}


def test_seed_is_the_one_shot_plan_with_and_without_budget(synth_dir, calib_txt, tmp_path):
    model = synth_dir("mixtral")
    ck = Checkpoint(model)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    ref = score(model, calib=[calib_txt], method="reap", keep=4, protect_super_experts=False, progress=False,
                device="cpu", **CAL)
    want = space.from_keep({int(L): e["keep"]["reap"] for L, e in ref["layers"].items()}).canonical().key()

    cfg = PruneConfig(model=model, out=tmp_path / "out", keep=4, method="eep", calib=[calib_txt], **CAL)
    seed = _seed_candidate(SimpleNamespace(ck=ck, budget=None), cfg, space, "reap", tmp_path / "plain")
    assert seed.canonical().key() == want

    small = PruneConfig(model=model, out=tmp_path / "out2", keep=4, method="eep", calib=[calib_txt],
                        max_ram=chunking_ram(model, CAL["batch_size"], CAL["seq_len"]), **CAL)
    budget = plan_run_budget(small, ck)
    assert budget.chunked_layers == ck.moe_layers(), "the RAM budget must force expert chunking"
    chunked = _seed_candidate(SimpleNamespace(ck=ck, budget=budget), small, space, "reap", tmp_path / "chunked")
    assert chunked.canonical().key() == want
