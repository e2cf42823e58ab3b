"""What quantized compute (``--quant nf4|int8``) costs in accuracy, on the shipped toy MoE.

For each calibration domain, ``lowmoe.score.score`` runs with frequency, REAP and EASY-EP in one
pass under each compute setting (fp32, bf16, and NF4 / int8 weights with fp32 or bf16 compute);
every setting is compared with the fp32 reference and with bf16: in how many MoE layers the
``--keep`` set changes, how many experts that swaps, and the largest score change relative to the
layer's largest score. Then ``lowmoe.evaluate.evaluate(mode="streaming")`` gives exact match and
perplexity of the (unpruned) model on each domain's held-out test split under each setting.

    nice -n 10 .venv/bin/python scripts/bench_quant.py --json docs/results/quant-toy-moe.json

Prints two tables (markdown) and, with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SETTINGS = [("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("fp32", "nf4"), ("bf16", "int8"), ("bf16", "nf4")]
METHODS = ["frequency", "reap", "easy-ep"]


def name(dtype: str, quant: str) -> str:
    return dtype if quant == "none" else f"{quant} ({dtype})"


def compare(rep: dict, ref: dict, method: str) -> dict:
    """Layers whose keep-set differs, experts swapped in all, and |score change| / layer's max |score|
    (max and mean over every expert)."""
    changed = swapped = 0
    rel, rels = 0.0, []
    for L, e in ref["layers"].items():
        a, b = set(e["keep"][method]), set(rep["layers"][L]["keep"][method])
        changed += a != b
        swapped += len(a - b)
        s, t = e["scores"][method], rep["layers"][L]["scores"][method]
        top = max(abs(x) for x in s) or 1.0
        rels += [abs(x - y) / top for x, y in zip(s, t)]
        rel = max(rel, max(rels[-len(s):]))
    return {"layers_changed": changed, "layers": len(ref["layers"]), "experts_swapped": swapped, "max_rel_score_diff": rel,
            "mean_rel_score_diff": sum(rels) / len(rels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="Checkpoint (default: the shipped toy MoE).")
    ap.add_argument("--domains", default="sort,reverse,arithmetic")
    ap.add_argument("--keep", default="half")
    ap.add_argument("--calib-n", type=int, default=64, help="Calibration examples per domain.")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n", type=int, default=200, help="Held-out test examples per domain.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from lowmoe.evaluate import evaluate
    from lowmoe.score import score
    from lowmoe.toy.tasks import TOY_MODEL, calib_file, check_domains

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else TOY_MODEL
    domains = check_domains(args.domains)
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    out: dict = {"model": str(model), "domains": domains, "keep": args.keep, "calib_n": args.calib_n,
                 "seq_len": args.seq_len, "n": args.n, "threads": args.threads, "scores": {}, "eval": {}}

    # (a) scores and keep-sets
    for d in domains:
        cal = calib_file(d, n=args.calib_n, out_dir=work, seed=0)
        reps = {}
        for dtype, quant in SETTINGS:
            t0 = time.perf_counter()
            reps[(dtype, quant)] = score(model, calib=[str(cal)], method=METHODS, keep=args.keep, seq_len=args.seq_len,
                                         n_samples=args.calib_n, device="cpu", dtype=dtype, quant=quant, progress=False)
            out["scores"].setdefault(name(dtype, quant), {})[d] = {"wall_s": round(time.perf_counter() - t0, 2)}
        for (dtype, quant), rep in reps.items():
            for ref_name, ref in (("fp32", reps[("fp32", "none")]), ("bf16", reps[("bf16", "none")])):
                out["scores"][name(dtype, quant)][d][f"vs_{ref_name}"] = {m: compare(rep, ref, m) for m in METHODS}

    # (b) exact match of the unpruned model, streamed
    for dtype, quant in SETTINGS:
        t0 = time.perf_counter()
        r = evaluate(model, tasks=domains, n=args.n, mode="streaming", batch_size=100, device="cpu", dtype=dtype,
                     quant=quant)
        out["eval"][name(dtype, quant)] = {"wall_s": round(time.perf_counter() - t0, 2),
                                           **{d: {"exact_match": t["exact_match"], "perplexity": t["perplexity"],
                                                  "correct": t["correct"]} for d, t in r["tasks"].items()}}

    print(f"## keep-sets and scores ({model.name}, keep {args.keep}, {args.calib_n} x {args.seq_len}-token calibration "
          f"sequences per domain, domains {', '.join(domains)})\n")
    print("| setting | vs | " + " | ".join(f"{m}: layers changed / experts swapped / rel. Δscore mean, max" for m in METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for dtype, quant in SETTINGS[1:]:
        s = out["scores"][name(dtype, quant)]
        for ref in ("fp32", "bf16"):
            if ref == "bf16" and (dtype, quant) == ("bf16", "none"):
                continue
            cells = []
            for m in METHODS:
                c = [s[d][f"vs_{ref}"][m] for d in domains]
                cells.append(f"{sum(x['layers_changed'] for x in c)}/{sum(x['layers'] for x in c)} / "
                             f"{sum(x['experts_swapped'] for x in c)} / "
                             f"{sum(x['mean_rel_score_diff'] for x in c) / len(c):.4f}, {max(x['max_rel_score_diff'] for x in c):.4f}")
            print(f"| {name(dtype, quant)} | {ref} | " + " | ".join(cells) + " |")

    print(f"\n## held-out exact match (perplexity), streamed, n={args.n} per domain\n")
    print("| setting | " + " | ".join(domains) + " | answers differing from fp32 | wall |")
    print("|---|" + "---|" * (len(domains) + 2))
    ref = out["eval"]["fp32"]
    for dtype, quant in SETTINGS:
        e = out["eval"][name(dtype, quant)]
        diff = sum(a != b for d in domains for a, b in zip(e[d]["correct"], ref[d]["correct"]))
        cells = " | ".join(f"{e[d]['exact_match']:.3f} ({e[d]['perplexity']:.3f})" for d in domains)
        print(f"| {name(dtype, quant)} | {cells} | {diff}/{args.n * len(domains)} | {e['wall_s']:.1f}s |")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
