"""FP8 block and MXFP4 checkpoints: round-trip error of the codecs and what pruning costs on disk.

1. Codecs (``lowmoe.engine.formats``) on one expert of the published shapes, N(0, 0.02) weights:
   DeepSeek-V3 ``gate_proj`` (2048 x 7168, FP8 128x128 blocks) and GPT-OSS-20b ``gate_up_proj``
   (5760 x 2880, MXFP4). For each: the relative error of quantize -> dequantize of the weight, and of
   re-quantizing a merge (the mean of two dequantized experts, which is what a merged expert is
   before ``apply_layer_quantized`` re-quantizes it), plus CPU time per call.
2. Checkpoints: ``lowmoe synth`` writes the same small DeepSeek-V3-layout model in bf16 and with
   ``--quant fp8``, and a GPT-OSS-layout model in bf16 and with ``--quant mxfp4``; each is pruned
   8 -> 4 experts (frequency, then merge-freq) with the same calibration. Sizes on disk of input
   and output, wall time, peak RSS and the round-trip error of the re-quantized merged experts.

    OMP_NUM_THREADS=2 nice -n 10 python scripts/bench_quant_formats.py --json docs/results/quant-formats.json

Random weights have no outliers; real checkpoints' error differs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _bench import machine

from lowmoe.engine.checkpoint import Checkpoint, dir_size
from lowmoe.engine.formats import QuantFormat
from lowmoe.toy.synth import synth_model


def codec(fmt: QuantFormat, shape: tuple[int, int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if fmt.method == "mxfp4":  # the logical (runtime) layout is (in, out), experts on dim 0
        w = w.T.contiguous()[None]
    key = "e.gate_up_proj" if fmt.method == "mxfp4" else "e.weight"
    t0 = time.perf_counter()
    parts = fmt.quantize(key, w)
    t_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = fmt.dequantize(parts, key, torch.bfloat16)
    t_d = time.perf_counter() - t0
    w2 = torch.randn(w.shape, generator=g) * 0.02
    back2 = fmt.dequantize(fmt.quantize(key, w2), key, torch.bfloat16)
    merged = ((back.float() + back2.float()) / 2).to(torch.bfloat16)  # a merge of two dequantized experts
    stored = sum(v.numel() * v.element_size() for v in parts.values())
    return {"shape": list(shape), "stored_bytes": stored, "bf16_bytes": w.numel() * 2,
            "roundtrip": fmt.roundtrip_of(parts, key, w), "merge_requant": fmt.roundtrip_of(fmt.quantize(key, merged), key, merged),
            "quantize_s": round(t_q, 3), "dequantize_s": round(t_d, 3)}


def prune_pair(root: Path, arch: str, quant: str, calib: Path, synth: dict) -> dict:
    out = {}
    for q in ("none", quant):
        src = root / f"{arch}-{q}"
        synth_model(src, arch, quant=q, overwrite=True, **synth)
        row = {"input_bytes": dir_size(src), "input_tensor_bytes": Checkpoint(src).total_bytes()}
        for method in ("frequency", "merge-freq"):
            dst = root / f"{arch}-{q}-{method}"
            # one process per prune, so its peak RSS is that prune's own
            code = ("import json, sys, time, lowmoe; t0 = time.perf_counter(); "
                    f"r = lowmoe.prune({str(src)!r}, {str(dst)!r}, keep=4, method={method!r}, calib=[{str(calib)!r}], "
                    "n_samples=16, seq_len=128, batch_size=4, dtype='bf16', progress=False, overwrite=True); "
                    "hwm = [int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmHWM')][0]; "
                    "print(json.dumps({'wall_s': round(time.perf_counter() - t0, 2), 'hwm': hwm, 'report': r}, default=str))")
            r = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                           .stdout.strip().splitlines()[-1])
            rep = r["report"]
            row[method] = {"wall_s": r["wall_s"], "output_bytes": dir_size(dst), "output_tensor_bytes": rep["bytes"]["output"],
                           # VmHWM of the child (getrusage's peak would include the parent's, inherited at fork)
                           "peak_rss_bytes": r["hwm"],
                           "quantization": rep["quantization"] and {k: v for k, v in rep["quantization"].items() if k != "layers"}}
            shutil.rmtree(dst)
        out[q] = row
        shutil.rmtree(src)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default="/tmp/lowmoe-bench-quant-formats")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.txt"
    words = ["alpha", "beta", "gamma", "delta", "12+3=15", "def f(x):", "return x", "(())", "sort 3 1 2"]
    g = torch.Generator().manual_seed(0)
    calib.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, len(words), (16,), generator=g))
                               for _ in range(400)) + "\n")

    result = {"command": "python scripts/bench_quant_formats.py --json docs/results/quant-formats.json",
              "machine": {**machine(), "cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
              "codec": {"fp8_block_128_deepseek_v3_gate_proj": codec(QuantFormat("fp8", (128, 128)), (2048, 7168), 0),
                        "mxfp4_gpt_oss_20b_gate_up_proj": codec(QuantFormat("mxfp4"), (5760, 2880), 1)}}
    base = dict(layers=4, hidden_size=1024, experts=8, top_k=2, dtype="bfloat16", shard_size="50MB")
    result["prune"] = {
        "deepseek_v3": {"synth": {**base, "intermediate_size": 1024}, **prune_pair(root, "deepseek_v3", "fp8", calib,
                                                                                    {**base, "intermediate_size": 1024})},
        "gpt_oss": {"synth": {**base, "intermediate_size": 1024}, **prune_pair(root, "gpt_oss", "mxfp4", calib,
                                                                            {**base, "intermediate_size": 1024})},
    }
    shutil.rmtree(root, ignore_errors=True)

    print("| codec | stored / bf16 bytes | round-trip rel. error (Frobenius) | re-quantized merge | quantize / dequantize s |")
    print("|---|---|---|---|---|")
    for name, c in result["codec"].items():
        print(f"| {name} | {c['stored_bytes'] / c['bf16_bytes']:.3f} | {c['roundtrip']['fro_rel']:.4f} | "
              f"{c['merge_requant']['fro_rel']:.4f} | {c['quantize_s']} / {c['dequantize_s']} |")
    print()
    print("| model | weights | input MB | pruned output MB (frequency) | merge-freq output MB | frequency wall s | merge-freq wall s "
          "| peak RSS MB (frequency) | merge re-quant error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch, rows in result["prune"].items():
        for q, row in rows.items():
            if q == "synth":
                continue
            mq = row["merge-freq"]["quantization"]
            print(f"| {arch} | {'bf16' if q == 'none' else q} | {row['input_bytes'] / 1e6:.1f} | "
                  f"{row['frequency']['output_bytes'] / 1e6:.1f} | {row['merge-freq']['output_bytes'] / 1e6:.1f} | "
                  f"{row['frequency']['wall_s']} | {row['merge-freq']['wall_s']} | {row['frequency']['peak_rss_bytes'] / 1e6:.0f} | "
                  f"{'-' if not mq else format(mq['requant_fro_rel_max'], '.4f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
