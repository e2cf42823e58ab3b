"""Two diagnostics for a CUDA machine (issue 15, session 10):

    python3 scripts/gpu_diag.py imports   where a fresh process's import time goes (python -X importtime
                                          of what a pass imports, and a profile of loading the tokenizer)
    python3 scripts/gpu_diag.py memory    what is live on the CUDA device at the peak of four small
                                          prunes (with and without --max-vram and prefetch): torch's
                                          allocator trace, replayed, grouped by the innermost lowmoe
                                          frame that allocated each block

Both make their own small synthetic model. Stored output: docs/results/gpu-h200-imports-s10.log and
docs/results/gpu-h200-memory-trace-s10.log (read in docs/gpu.md, "On an NVIDIA H200, session 10")."""
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

PY = sys.executable
work = Path(tempfile.mkdtemp())


def imports(model):
    code = ("import time;t=[time.perf_counter()];import torch;t.append(time.perf_counter());import transformers;"
            "t.append(time.perf_counter());from transformers import AutoTokenizer;t.append(time.perf_counter());"
            f"tok=AutoTokenizer.from_pretrained({str(model)!r});t.append(time.perf_counter());"
            "from lowmoe.engine.checkpoint import Checkpoint;from lowmoe.engine.hf import ModelSkeleton;"
            f"ck=Checkpoint({str(model)!r});ModelSkeleton(ck.config, ck.adapter);t.append(time.perf_counter());"
            "import lowmoe.pipeline;t.append(time.perf_counter());"
            "print('STEPS', [round(b-a,2) for a,b in zip(t,t[1:])], 'torch, transformers, AutoTokenizer, load, skeleton, pipeline')")
    for i in range(2):
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True)
        print(r.stdout.strip(), r.stderr.strip()[-500:])
    r = subprocess.run([PY, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = line[len("import time:"):].split("|")
            try:
                rows.append((int(parts[1]), int(parts[0]), parts[2].rstrip()))
            except ValueError:
                pass
    print("importtime: total top-level cumulative %.2f s" % (sum(c for c, s, n in rows if not n.startswith(" " * 2)) / 1e6))
    print("top cumulative:")
    for c, s, n in sorted(rows, reverse=True)[:40]:
        print(f"  {c / 1e6:7.2f} s cum {s / 1e6:6.2f} s self  {n}")
    print("top self:")
    for c, s, n in sorted(rows, key=lambda x: -x[1])[:20]:
        print(f"  {s / 1e6:7.2f} s self  {n.strip()}")
    code2 = ("import cProfile,pstats,io,torch,transformers\nfrom transformers import AutoTokenizer\n"
             f"pr=cProfile.Profile();pr.enable();AutoTokenizer.from_pretrained({str(model)!r});pr.disable()\n"
             "s=io.StringIO();pstats.Stats(pr,stream=s).sort_stats('cumulative').print_stats(25);print(s.getvalue()[:6000])")
    r = subprocess.run([PY, "-c", code2], capture_output=True, text=True)
    print("cProfile of AutoTokenizer.from_pretrained after imports:\n", r.stdout[-6000:], r.stderr[-800:])


def live_at_peak(snap):
    """Replay the allocator trace: the live blocks at the moment allocated bytes peaked."""
    traces = snap.get("device_traces") or [[]]
    events = traces[0] if traces else []
    frees = {"free_completed"} if any(e.get("action") == "free_completed" for e in events) else {"free_requested"}
    live, total, best, best_live = {}, 0, -1, {}
    for e in events:
        a = e.get("action")
        if a == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames") or [])
            total += e["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif a in frees and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    return best, best_live


def where(frames):
    own = [f for f in frames if "lowmoe" in f.get("filename", "") and "gpu_diag" not in f.get("filename", "")]
    f = own[0] if own else (frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
    inner = frames[0] if frames else f
    s = f"{Path(f['filename']).name}:{f['line']} {f['name']}"
    if inner is not f:
        s += f"  <- {Path(inner['filename']).name}:{inner['line']} {inner['name']}"
    return s


def memory(model, calib):
    import torch

    import lowmoe
    from lowmoe.engine.checkpoint import Checkpoint

    budget = Checkpoint(model).total_bytes() // 3
    opts = dict(keep=4, n_samples=16, seq_len=32, batch_size=4, progress=False, device="cuda", dtype="fp32")
    lowmoe.prune(model, work / "ref", calib=[calib], **opts)  # the profile cached; CUDA warmed
    for name, kw in (("budget+prefetch", dict(max_vram=budget)), ("budget+serial", dict(max_vram=budget, prefetch=False)),
                     ("nobudget+serial", dict(prefetch=False)), ("nobudget+prefetch", dict())):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=2_000_000)
        rep = lowmoe.prune(model, work / name, calib=[calib], overwrite=True, **opts, **kw)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak = torch.cuda.max_memory_allocated()
        b = rep["budget"]
        print(f"\n== {name}: budget {budget if 'max_vram' in kw else None}, CUDA peak {peak} (base {base}), "
              f"reserved peak {torch.cuda.max_memory_reserved()}, accounted {b.get('accounted_peak_bytes')}, "
              f"planned device {b['plan'].get('device_peak_bytes')}, groups {b.get('group_sizes')}, staged {b.get('first_groups_staged_ahead')}, "
              f"activations {rep.get('activations')}")
        print("   device_terms", b["plan"].get("device_terms"))
        best, live = live_at_peak(snap)
        print(f"   replayed peak {best} in {len(live)} blocks (events {len((snap.get('device_traces') or [[]])[0])})")
        groups = defaultdict(lambda: [0, 0])
        for size, frames in live.values():
            g = groups[where(frames)]
            g[0] += size
            g[1] += 1
        for k, (s, n) in sorted(groups.items(), key=lambda x: -x[1][0])[:25]:
            print(f"   {s / 1e6:9.2f} MB {n:5d}  {k}")


if __name__ == "__main__":
    from lowmoe.toy.synth import synth_model

    m = work / "m"
    synth_model(m, "mixtral", layers=4, hidden_size=256, intermediate_size=2048, experts=8, top_k=2, shard_size="50MB")
    calib = work / "c.txt"
    calib.write_text("\n".join(f"the model routes tokens to experts number {i} and more text here" for i in range(800)))
    if "imports" in sys.argv[1:]:
        imports(m)
    if "memory" in sys.argv[1:]:
        memory(m, calib)
