"""Every merging method end to end: the output loads in transformers and equals a reference merge
computed here, in memory, from the original full model's weights (transformers' runtime layout)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lowmoe

OPTS = dict(keep=4, n_samples=8, seq_len=32, batch_size=4, progress=False, protect_super_experts=False)

CASES = [
    ("mixtral", "merge-freq", {}),
    ("mixtral", "merge-freq", {"align": "true", "similarity": "weight", "router": "mean"}),
    ("mixtral", "hc-merge", {"align": "true"}),
    ("mixtral", "diverse-group", {"representation": "output"}),
    ("mixtral", "c-prune", {"align": "true"}),
    ("mixtral", "dern", {}),
]


def _perm_cols(p: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return torch.stack([2 * p, 2 * p + 1], 1).reshape(-1) if interleaved else p


def reference_layer(sd: dict, pre: str, lp: dict, E: int, fused_gpt_oss: bool) -> dict[str, torch.Tensor]:
    """The plan's merge done directly on runtime tensors: gate_up_proj (E, 2I, H) [gate; up] and
    down_proj (E, H, I), or GPT-OSS's (E, H, 2I) interleaved / (E, I, H) with biases."""
    ex, router = pre + "mlp.experts.", pre + ("mlp.router." if fused_gpt_oss else "mlp.gate.")
    gu, dn = sd[ex + "gate_up_proj"].clone(), sd[ex + "down_proj"].clone()
    gub = sd[ex + "gate_up_proj_bias"].clone() if fused_gpt_oss else None
    dnb = sd[ex + "down_proj_bias"].clone() if fused_gpt_oss else None
    I = dn.shape[1] if fused_gpt_oss else dn.shape[2]
    for e, perm in lp.get("align", {}).items():  # neuron permutation of expert e
        p, e = torch.tensor(perm), int(e)
        if fused_gpt_oss:
            gu[e], gub[e], dn[e] = gu[e][:, _perm_cols(p, True)], gub[e][_perm_cols(p, True)], dn[e][p]
        else:
            gu[e], dn[e] = torch.cat([gu[e][:I][p], gu[e][I:][p]]), dn[e][:, p]
    keep = lp["keep"]
    onehot = torch.zeros(len(keep), E)
    onehot[torch.arange(len(keep)), torch.tensor(keep)] = 1
    W = torch.tensor(lp["merge"]) if "merge" in lp else onehot
    R = torch.tensor(lp["router"]) if "router" in lp else W
    mix = lambda t: torch.einsum("je,e...->j...", W, t)  # noqa: E731
    out = {ex + "gate_up_proj": mix(gu), ex + "down_proj": mix(dn), router + "weight": R @ sd[router + "weight"]}
    if fused_gpt_oss:
        out[ex + "gate_up_proj_bias"], out[ex + "down_proj_bias"] = mix(gub), mix(dnb)
        out[router + "bias"] = R @ sd[router + "bias"]
    if "neurons" in lp:  # DERN: usage-weighted average of each retained neuron and the segments sent to it
        nv = lp["neurons"]
        gu2, dn2 = out[ex + "gate_up_proj"].clone(), out[ex + "down_proj"].clone()
        gub2 = out[ex + "gate_up_proj_bias"].clone() if fused_gpt_oss else None
        for j, wr in enumerate(nv["slot_weights"]):
            for m in range(I):
                srcs = [(int(d), n, s["weight"]) for d, s in nv["sources"].items() for n in range(I)
                        if s["slot"][n] == j and s["neuron"][n] == m]
                if not srcs:
                    continue
                tot = wr + sum(w for _, _, w in srcs)
                if fused_gpt_oss:
                    cols = [2 * m, 2 * m + 1]
                    gu2[j][:, cols] = (wr * gu2[j][:, cols] + sum(w * gu[d][:, [2 * n, 2 * n + 1]] for d, n, w in srcs)) / tot
                    gub2[j][cols] = (wr * gub2[j][cols] + sum(w * gub[d][[2 * n, 2 * n + 1]] for d, n, w in srcs)) / tot
                    dn2[j][m] = (wr * dn2[j][m] + sum(w * dn[d][n] for d, n, w in srcs)) / tot
                else:
                    rows = [m, I + m]
                    gu2[j][rows] = (wr * gu2[j][rows] + sum(w * gu[d][[n, I + n]] for d, n, w in srcs)) / tot
                    dn2[j][:, m] = (wr * dn2[j][:, m] + sum(w * dn[d][:, n] for d, n, w in srcs)) / tot
        out[ex + "gate_up_proj"], out[ex + "down_proj"] = gu2, dn2
        if fused_gpt_oss:
            out[ex + "gate_up_proj_bias"] = gub2
    return out


@pytest.mark.parametrize("arch,method,options", CASES, ids=[f"{a}-{m}-{'-'.join(o) or 'default'}" for a, m, o in CASES])
def test_output_loads_and_equals_in_memory_reference(synth_dir, calib_txt, tmp_path, arch, method, options):
    check_against_reference(synth_dir, calib_txt, tmp_path, arch, method, options)


def check_against_reference(synth_dir, calib_txt, tmp_path, arch, method, options):
    """Prune with ``method``; the loaded output's tensors and logits equal ``reference_layer``'s."""
    src = synth_dir(arch)
    report = lowmoe.prune(src, tmp_path / "out", method=method, calib=[calib_txt], method_options=options, **OPTS)
    plan = report["plan"]
    assert report["num_experts"]["after"] == 4
    orig = AutoModelForCausalLM.from_pretrained(src)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sd, got = orig.state_dict(), out.state_dict()
    E = orig.config.num_local_experts if hasattr(orig.config, "num_local_experts") else orig.config.num_experts
    expected = dict(sd)
    for L, lp in plan["layers"].items():
        assert len(lp["keep"]) == 4
        if method != "dern":
            assert "merge" in lp and any(sum(x > 0 for x in row) > 1 for row in lp["merge"]), "nothing was merged"
        expected.update(reference_layer(sd, f"model.layers.{L}.", lp, E, arch == "gpt_oss"))
    assert set(got) == set(expected)
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k
    # logits of the loaded output equal those of a model built from the reference tensors
    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    ref = AutoModelForCausalLM.from_config(cfg)
    ref.load_state_dict(expected)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(out(ids).logits, ref.eval()(ids).logits, atol=1e-4)
