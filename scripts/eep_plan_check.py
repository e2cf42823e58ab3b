"""Score given EEP plans on the acceptance row's search, dev and test examples (a diagnostic).

    python scripts/eep_plan_check.py --domains sort --seed 11 --n-search 128 --n-dev 128 --n-test 400 \\
        --state STATE.json --top 8 [--plans PLANS.json] --json OUT.json

Examples are drawn exactly as ``scripts/eep_acceptance.py`` draws them: search = the first ``--n-search``
and dev = the next ``--n-dev`` of the calib split at ``--seed``, test = ``--n-test`` of the test split
(evaluate's seed 0). Plans: the ``--top`` best of an EEP ``state.json`` archive (by its fitness), and/or
``--plans``: a JSON list of ``{"name", "keep": [[experts] per layer]}``. Tells whether a plan that is
good on test would have looked good to the search (fitness signal) or was never reached (search).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowmoe  # noqa: E402
from lowmoe.engine.checkpoint import Checkpoint  # noqa: E402
from lowmoe.evaluate import evaluate  # noqa: E402
from lowmoe.toy import tasks  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=tasks.TOY_MODEL_LEARNED)
    p.add_argument("--domains", default="sort", help="one row: domains joined by '+'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-search", type=int, default=128)
    p.add_argument("--n-dev", type=int, default=128)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--state", type=Path, action="append", default=[], help="an EEP state.json (repeatable)")
    p.add_argument("--top", type=int, default=8, help="archive entries per --state, best fitness first")
    p.add_argument("--plans", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    domains = args.domains.split("+")
    ck = Checkpoint(args.model)
    layers = list(range(ck.num_layers))
    plans, states = [], []
    for f in args.state:
        d = json.loads(f.read_text())
        best = lambda es: max((e["fitness"]["acc"] for e in es), default=None)  # noqa: E731
        states.append({"state": str(f), "generations": d["generation"], "evaluations": d["evaluations"],
                       "best_fitness": best(d["archive"]),
                       "best_fitness_prune": best([e for e in d["archive"] if e["phase"] == "prune"]),
                       "best_fitness_by_generation": [c["best_acc"] for c in d["curve"]]})
        groups = d["fingerprint"]["space"]["groups"]
        ranked = sorted(d["archive"], key=lambda e: (-e["fitness"]["acc"], -e["fitness"]["ll"], e["generation"]))
        for i, e in enumerate(ranked[:args.top]):
            lay = {}
            for g, ls in enumerate(groups):
                em, rm = e["em"][g], e["rm"][g]
                onehot = em == rm and all(v in (0.0, 1.0) for row in em for v in row)
                keep = [max(range(len(r)), key=lambda k: abs(r[k])) for r in em]
                for L in ls:
                    lay[str(L)] = {"keep": keep} if onehot and len(set(keep)) == len(keep) else \
                        {"keep": keep, "merge": em, "router": rm}
            plans.append({"name": f"{f.name}#{i}", "source_fitness": e["fitness"]["acc"], "generation": e["generation"],
                          "phase": e["phase"], "layers": lay})
    if args.plans:
        for q in json.loads(args.plans.read_text()):
            plans.append({"name": q["name"], "layers": {str(L): {"keep": k} for L, k in zip(layers, q["keep"])}})
    rows = []
    with tempfile.TemporaryDirectory(prefix="eep-check-") as tmp:
        tmp = Path(tmp)
        files = {"search": [], "dev": []}
        for dom in domains:
            recs = tasks.make_split(dom, "calib", args.n_search + args.n_dev, seed=args.seed)
            files["search"].append(tasks.write_jsonl(recs[:args.n_search], tmp / "search" / f"{dom}.jsonl"))
            files["dev"].append(tasks.write_jsonl(recs[args.n_search:], tmp / "dev" / f"{dom}.jsonl"))
        for q in plans:
            out = tmp / "model"
            lowmoe.prune(args.model, out, plan={"format": "lowmoe-plan/1", "num_experts_per_tok": ck.top_k,
                                                "layers": q["layers"]}, progress=False, overwrite=True)
            r = {k: v for k, v in q.items() if k != "layers"}
            r["keep"] = [q["layers"][str(L)]["keep"] for L in layers]
            for split in ("search", "dev"):
                accs = [evaluate(out, jsonl=[f], n=10 ** 9, mode="streaming", device="cpu")["tasks"][Path(f).stem]["exact_match"]
                        for f in files[split]]
                r[split] = sum(accs) / len(accs)
            accs = [evaluate(out, tasks=[dom], n=args.n_test, split="test", mode="streaming", device="cpu")["tasks"][dom]["exact_match"]
                    for dom in domains]
            r["test"] = sum(accs) / len(accs)
            rows.append(r)
            print(f"{r['name']}: search {r['search']:.3f} dev {r['dev']:.3f} test {r['test']:.3f} "
                  f"(archive fitness {r.get('source_fitness')}, {r.get('phase')})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": {"cpus": 2, "gpu": None},
                                         "args": {k: str(v) for k, v in vars(args).items()}, "states": states,
                                         "plans": rows}, indent=1))


if __name__ == "__main__":
    main()
