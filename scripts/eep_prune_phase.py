"""Compare rules for the EEP pruning phase's children on the learned toy (a diagnostic).

    python scripts/eep_prune_phase.py --rows arithmetic:128,sort+brackets:128 --rules ga,local:1.0,local:0.5 \\
        --seeds-from docs/results/eep-acceptance-auto-seed11-all-swaps.json --json OUT.json

Runs only the pruning phase (``--generations`` of ``--population``, all pruning) of lowmoe's
``Evolution`` for each rule (``ga``: EEP's children; ``local:S``: the swap local search with
``swap_share=S``), from the one-shot seeds an acceptance run stored (``eep_seeds``: the plans
``--init auto`` started from, on the same search examples), and reports per rule the best plan's
accuracy on the search examples (what the phase optimises), the plan the final pick's dev rule would
choose among the top 20, and both plans' test accuracy.

Fitness here is not lowmoe's streamed evaluator but the toy loaded whole with transformers, each
candidate applied by masking the router logits of the dropped experts: for one-hot plans that is the
pruned model (softmax over the kept experts, top-2 among them), tokenized, padded and scored
(teacher-forced exact match) by ``lowmoe.evaluate``'s own helpers. Examples as ``scripts/eep_acceptance.py`` draws them: search = the first
``n`` of the calib split at ``--seed``, dev = the next ``n``, test = 400 of the test split (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmoe.evaluate import _prefix_mask, _right_padded, load_items, score_logits  # noqa: E402
from lowmoe.methods.eep.evolve import Evolution, EvolveOptions  # noqa: E402
from lowmoe.methods.eep.fitness import Fitness  # noqa: E402
from lowmoe.methods.eep.space import SearchSpace  # noqa: E402
from lowmoe.toy import tasks  # noqa: E402


class MaskedToy:
    """The toy (a Mixtral) whole in memory; ``score(keep_sets, batches)`` runs it with only the kept
    experts routable, per layer."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.num_experts = self.model.config.num_local_experts
        self.masks = [torch.zeros(self.num_experts) for _ in self.model.model.layers]
        for i, layer in enumerate(self.model.model.layers):
            layer.mlp.gate.forward = self._router(layer.mlp.gate, i)

    def _router(self, gate, i: int):
        def forward(hidden):  # MixtralTopKRouter.forward, with the dropped experts' logits at -inf
            logits = F.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight) + self.masks[i]
            top, idx = torch.topk(torch.softmax(logits.float(), -1), gate.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx
        return forward

    def batches(self, items: list, size: int = 64) -> list[tuple[torch.Tensor, ...]]:
        """(ids, answer mask, attention mask) per chunk of ``evaluate.Item``s, padded as ``lowmoe.evaluate`` pads."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        out = []
        for s in range(0, len(items), size):
            chunk = items[s:s + size]
            ids, ans = _right_padded(chunk, pad)
            out.append((ids, ans, _prefix_mask(chunk, ids.shape[1]).long()))
        return out

    @torch.no_grad()
    def score(self, keep_sets: list[list[int]], batches) -> tuple[float, float]:
        """(exact-match accuracy, mean answer log-likelihood per example), scored by ``evaluate.score_logits``."""
        for i, keep in enumerate(keep_sets):
            self.masks[i] = torch.full((self.num_experts,), float("-inf"))
            self.masks[i][list(keep)] = 0.0
        exact, nll = [], []
        for ids, ans, att in batches:
            e, n, _ = score_logits(self.model(input_ids=ids, attention_mask=att).logits, ids, ans)
            exact += e
            nll += n
        return sum(exact) / len(exact), -sum(nll) / len(nll)


def run_row(toy: MaskedToy, row: str, n: int, args, seeds_by_row: dict) -> dict:
    domains = row.split("+")
    split = {"search": {}, "dev": {}, "test": {}}
    for d in domains:
        calib = load_items(toy.tok, tasks=[d], n=2 * n, split="calib", seed=args.seed)[d]
        split["search"][d], split["dev"][d] = toy.batches(calib[:n]), toy.batches(calib[n:])
        split["test"][d] = toy.batches(load_items(toy.tok, tasks=[d], n=args.n_test, split="test", seed=0)[d])
    cache: dict = {}

    def fitness(name: str):
        def evaluate(cands):
            out = []
            for c in cands:
                key = (name, c.key())
                if key not in cache:
                    per = [toy.score(c.keep_sets(), split[name][d]) for d in domains]
                    cache[key] = Fitness(float(np.mean([a for a, _ in per])), float(np.mean([ll for _, ll in per])))
                out.append(cache[key])
            return out
        return evaluate

    space = SearchSpace.build(list(range(len(toy.masks))), toy.num_experts, args.keep, "layer")
    seeds = [("+".join(s["methods"]), space.onehot(s["keep"])) for s in seeds_by_row[(row, n)]]
    results = []
    for rule in args.rules.split(","):
        kind, _, share = rule.partition(":")
        kw = {"prune_search": kind} | ({"swap_share": float(share)} if share else {})
        opts = EvolveOptions(generations=args.generations, population=args.population,
                             prune_generations=args.generations, seed=args.search_seed, **kw)
        t0 = time.perf_counter()
        st = Evolution(space, opts, fitness("search"), seeds=seeds, rank_seeds=fitness("dev")).run()
        best, top = st.ranked()[0], st.ranked()[:20]
        dev = fitness("dev")([e.cand for e in top])
        pick = max(range(len(top)), key=lambda i: (dev[i].acc, dev[i].ll))
        test = fitness("test")([best.cand, top[pick].cand])
        r = {"row": row, "n": n, "rule": rule, "evaluations": st.evaluations, "best_search": best.fitness.acc,
             "best_test": test[0].acc, "pick_dev": dev[pick].acc, "pick_test": test[1].acc,
             "best_keep": best.cand.keep_sets(), "curve": [c["best_acc"] for c in st.curve],
             "swaps": [c.get("swaps") for c in st.curve], "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{row} n={n} {rule:9s} best on search {r['best_search']:.3f} (test {r['best_test']:.3f}) | "
              f"dev pick {r['pick_dev']:.3f} (test {r['pick_test']:.3f}) | curve {[round(x, 3) for x in r['curve']]}",
              flush=True)
        results.append(r)
    return {"row": row, "n": n, "runs": results}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=tasks.TOY_MODEL_LEARNED)
    p.add_argument("--rows", default="arithmetic:128", help="ROW:N,...: domains joined by '+', N search (= dev) examples")
    p.add_argument("--rules", default="ga,local:1.0,local:0.5")
    p.add_argument("--seeds-from", type=Path, action="append", required=True,
                   help="an eep_acceptance.py result whose rows have eep_seeds (one per N; repeatable)")
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--seed", type=int, default=11, help="data seed (as eep_acceptance.py --seed)")
    p.add_argument("--search-seed", type=int, default=11, help="the search's seed (eep_acceptance.py passes --seed)")
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds_by_row = {}
    for f in args.seeds_from:
        d = json.loads(f.read_text())
        per_row = d["args"] if isinstance(d["args"], list) else [d["args"]] * len(d["runs"])
        for a, r in zip(per_row, d["runs"]):
            seeds_by_row[(r["domain"], int(a["n_search"]))] = r["eep_seeds"]
    toy = MaskedToy(args.model)
    rows = []
    for item in args.rows.split(","):
        row, _, n = item.partition(":")
        if (row, int(n)) not in seeds_by_row:
            raise SystemExit(f"--rows {item}: no row {row!r} with n_search {n} in --seeds-from")
        rows.append(run_row(toy, row, int(n), args, seeds_by_row))
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _bench import machine

        args.json.write_text(json.dumps({"command": "python scripts/eep_prune_phase.py " + " ".join(sys.argv[1:]),
                                         "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
