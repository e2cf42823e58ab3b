"""The streamed evaluator's fast paths are bit-identical to building each candidate from scratch:
a candidate's MoE block built from the once-loaded layer (kept experts behind an index map, merged
experts from the loaded weights) gives exactly the layer output of ``apply_layer`` + ``materialize_layer``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowmoe.engine.experts import KeptExperts
from lowmoe.methods.eep.population import LoadedLayer
from lowmoe.engine.hf import materialize_layer, run_layer

from .helpers import evaluator, merged, records


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("arch,stored,dtype", [("mixtral", "bfloat16", torch.float32), ("deepseek_v3", "bfloat16", torch.float32),
                                               ("qwen2_moe", "bfloat16", torch.float32), ("gpt_oss", "bfloat16", torch.float32),
                                               ("mixtral", "bfloat16", torch.bfloat16), ("mixtral", "float32", torch.bfloat16)])
def test_loaded_layer_block_is_bit_identical_to_a_fresh_build(synth_dir, tmp_path, arch, stored, dtype):
    """Also where the loaded copy is lossy (float32 stored, bfloat16 compute): then the block comes from apply_layer."""
    src = synth_dir(arch, dtype=stored)
    pe = evaluator(src, tmp_path, dtype=dtype)
    rng = np.random.default_rng(0)
    onehot = pe.space.random_onehot(rng)
    # a second merged candidate: its block is built into the first one's reused buffers
    cands = [onehot, merged(pe.space, onehot, rng), merged(pe.space, onehot, rng)]
    h = torch.randn(2, 9, int(pe.ck.config["hidden_size"]), generator=torch.Generator().manual_seed(0)).to(dtype)
    inputs = pe.inputs_for(h)
    L = pe.ck.moe_layers()[-1]
    tensors = pe.weights.layer(L)
    loaded = LoadedLayer(pe, L, dict(tensors))
    assert loaded.exact == (stored == "bfloat16")
    for cand, kept in zip(cands, (True, False, False)):
        lp = pe.space.layer_plan(cand, L)
        assert (lp.merge is None) == kept
        block = loaded.block(lp)
        assert isinstance(block.experts, KeptExperts) == kept
        got = run_layer(pe.skel, loaded.use(block), L, h, inputs)
        ref = run_layer(pe.skel, pe.build_layer(L, tensors, cand), L, h, inputs)
        assert torch.equal(got, ref)
        if not kept and loaded.exact and stored != dtype_name(dtype):  # cast for compute into a reused buffer
            params = [t.data_ptr() for t in block.experts.parameters()]
            bufs = [t.data_ptr() for k, t in pe._buffers.items() if k.startswith("merged:compute:")]
            assert bufs and set(bufs) <= set(params)
        loaded.use(None)
        del block
    # the original block comes back
    full = materialize_layer(pe.skel, L, pe.adapter.to_runtime(L, tensors, True), "cpu", dtype)
    assert torch.equal(run_layer(pe.skel, loaded.use(None), L, h, inputs), run_layer(pe.skel, full, L, h, inputs))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_shared_plans_and_trimmed_last_layer_keep_fitness(synth_dir, tmp_path, arch):
    """Streams that differ only in an earlier layer share each later layer's built block; the last MoE
    block and the head run on the scored positions only. Fitness equals the whole model's (and the
    untrimmed pass's) up to float rounding."""
    from lowmoe.methods.eep.population import WholeModelEvaluator
    from lowmoe.methods.eep.space import Candidate

    src = synth_dir(arch)
    pe = evaluator(src, tmp_path / "a")
    full = evaluator(src, tmp_path / "b", trim=False)
    rng = np.random.default_rng(3)
    a = merged(pe.space, pe.space.random_onehot(rng), rng)
    b = Candidate(a.em.copy(), a.rm.copy())
    other = pe.space.random_onehot(rng)
    b.em[0], b.rm[0] = other.em[0], other.rm[0]  # differs from a in the first MoE layer only
    cands = [a, b.canonical(), pe.space.random_onehot(rng)]
    got = pe.evaluate(cands)
    assert pe.stats["layer_builds"] < pe.stats["layer_runs"]
    assert pe._live and all(v is not None for v in pe._live.values()), "the padded chunks must be trimmed"
    ref = WholeModelEvaluator(pe.ck, pe.space, pe.data, top_k=2, batch_size=4).evaluate(cands)
    untrimmed = full.evaluate(cands)
    for g, r, u in zip(got, ref, untrimmed):
        assert g.acc == r.acc == u.acc
        assert g.ll == pytest.approx(r.ll, abs=1e-5) and g.ll == pytest.approx(u.ll, abs=1e-5)


def test_live_positions_are_all_that_scored_logits_depend_on(synth_dir):
    """Changing the tokens at every position outside ``live_positions`` (padding, final tokens) leaves
    the logits ``positions`` reads unchanged: trimming the MoE blocks to the live positions is exact."""
    from transformers import AutoModelForCausalLM

    from lowmoe.engine.calibration import load_tokenizer
    from lowmoe.methods.eep.fitness import FitnessData

    src = synth_dir("mixtral")
    data = FitnessData.from_records(records(8), load_tokenizer(src))
    n, s = data.input_ids.shape
    b, t = data.live_positions(slice(0, n))
    live = torch.zeros(n, s, dtype=torch.bool)
    live[b, t] = True
    assert 0 < live.sum() < n * s
    sb, st = data.positions(slice(0, n))
    assert live[sb, st].all() and not live[sb, st + 1].all(), "scored positions are live; each final token is not"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    noisy = data.input_ids.clone()
    noisy[~live] = torch.randint(0, model.config.vocab_size, (int((~live).sum()),))
    with torch.no_grad():
        ref = model(data.input_ids).logits[sb, st]
        got = model(noisy).logits[sb, st]
    torch.testing.assert_close(got, ref)
