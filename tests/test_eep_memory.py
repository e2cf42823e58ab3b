"""Memory of the population-parallel EEP evaluation is flat in the population size: peak RSS of a
generation of 2 and of 12 candidates differ by far less than one candidate's worth of layers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, numpy as np, torch
torch.set_num_threads(1)
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.calibration import load_tokenizer
from lowmoe.methods.eep.fitness import FitnessData
from lowmoe.methods.eep.population import PopulationEvaluator
from lowmoe.methods.eep.space import SearchSpace
from lowmoe.engine.memory import peak_rss_bytes
from lowmoe.engine.quant import layer_weights
src, acts, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ck = Checkpoint(src)
recs = [{"prompt": f"{a}+{b}=" * 4, "answer": f"{a + b}\n"} for a in range(4) for b in range(4)]
data = FitnessData.from_records(recs, load_tokenizer(src))
space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
rng = np.random.default_rng(0)
cands = []
while len(cands) < n:
    c = space.random_onehot(rng)
    if c.key() not in {x.key() for x in cands}:
        cands.append(c)
pe = PopulationEvaluator(ck, layer_weights(ck, "none", None), space, data, acts, device="cpu", dtype=torch.float32, top_k=2)
base = peak_rss_bytes()
pe.evaluate(cands[:1])
warm = peak_rss_bytes()
pe.evaluate(cands[1:])
print(json.dumps({"base": base, "warm": warm, "peak": peak_rss_bytes(), "layer": max(ck.layer_bytes(i) for i in range(ck.num_layers))}))
"""


@pytest.mark.parametrize("arch", ["mixtral"])
def test_peak_rss_flat_in_population(synth_dir, tmp_path, arch):
    src = synth_dir(arch, layers=4, hidden_size=256, intermediate_size=512, shard_size="2MB")
    peaks = {}
    for n in (2, 12):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(tmp_path / f"acts{n}"), str(n)],
                             capture_output=True, text=True, check=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
    layer = peaks[2]["layer"]  # ~6 MB on disk (fp32); a built candidate layer is ~half of it
    grow2 = peaks[2]["peak"] - peaks[2]["warm"]
    grow12 = peaks[12]["peak"] - peaks[12]["warm"]
    # 11 more candidates, 44 more candidate layers built: memory must not grow with them
    assert grow12 < grow2 + 2 * layer, (peaks, layer)
    assert peaks[12]["peak"] - peaks[2]["peak"] < 3 * layer, (peaks, layer)
