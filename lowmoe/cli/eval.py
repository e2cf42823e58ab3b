"""``lowmoe eval``: exact match and answer perplexity of a checkpoint on held-out tasks.

A shell over ``lowmoe.evaluate.evaluate`` (registered on the main ``lowmoe`` group by cli.py)::

    lowmoe eval toy --tasks arithmetic,reverse --n 200
    lowmoe eval pruned/ --tasks sort --baseline toy          # before/after table
    lowmoe eval big-model/ --jsonl qa.jsonl --streaming      # one layer in memory at a time
    lowmoe eval big-model/ --tasks sort --streaming --max-vram 20GiB --quant nf4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import LowmoeError
from ..evaluate import evaluate, format_table
from ..toy.tasks import TOY_MODEL


def resolve_model(name: str) -> Path:
    """A checkpoint folder, or ``toy`` for the toy MoE shipped with lowmoe."""
    p = Path(name)
    if name == "toy" and not p.exists():
        return TOY_MODEL
    return p


@click.command("eval")
@click.argument("model")
@click.option("--tasks", default=None, help="Comma-separated domains: arithmetic,reverse,sort,lookup,brackets,text.")
@click.option("--jsonl", "jsonl", multiple=True, type=click.Path(path_type=Path),
              help="JSON lines of {\"prompt\", \"answer\"} to score (repeatable); the file's stem names the task.")
@click.option("--n", default=200, show_default=True, type=int, help="Examples per task.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "calib", "train"]))
@click.option("--streaming", is_flag=True, help="Teacher-forced, one decoder layer in memory at a time (models larger than RAM).")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--shots", default=3, show_default=True, type=int, help="Demonstrations per task prompt.")
@click.option("--baseline", default=None, help="Also evaluate this model and show the change relative to it.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--dtype", default="fp32", show_default=True,
              type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]),
              help="Compute dtype (log-probabilities are computed and summed in fp32 whatever it is).")
@click.option("--max-vram", default=None, help="--streaming: device memory budget, e.g. 20GiB (experts streamed in groups when a layer does not fit).")
@click.option("--max-ram", default=None, help="--streaming: host RAM budget, e.g. 32GiB (checked before the run starts).")
@click.option("--no-prefetch", is_flag=True, help="--streaming: do not read the next layer while computing.")
@click.option("--quant", default="none", show_default=True, type=click.Choice(["none", "int8", "nf4"]),
              help="--streaming: hold each layer's linear weights as bitsandbytes NF4/int8 (docs/gpu.md).")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the full result as JSON.")
@click.pass_context
def eval_command(ctx, model, tasks, jsonl, n, split, streaming, batch_size, seed, shots, baseline, device, dtype, max_vram,
                 max_ram, no_prefetch, quant, json_out):
    """Exact-match accuracy (greedy) and per-token answer perplexity of MODEL on held-out tasks."""
    try:
        if not tasks and not jsonl:
            tasks = "arithmetic,reverse,sort,lookup,brackets,text"
        kw = {"tasks": tasks, "jsonl": list(jsonl), "n": n, "split": split, "mode": "streaming" if streaming else "greedy",
              "batch_size": batch_size, "seed": seed, "shots": shots, "device": device, "dtype": dtype,
              "max_vram": max_vram, "max_ram": max_ram, "prefetch": not no_prefetch, "quant": quant,
              "progress": not (ctx.obj or {}).get("quiet", False)}
        base = evaluate(resolve_model(baseline), **kw) if baseline else None
        result = evaluate(resolve_model(model), **kw)
    except LowmoeError as e:
        click.echo(f"lowmoe: error: {e}", err=True)
        sys.exit(e.exit_code)
    quant = f", quant {result['quant']}" if result.get("quant", "none") != "none" else ""
    click.echo(f"{result['model']}  ({result['mode']}, split={split}, {result['device']} {result['dtype']}{quant}, "
               f"{result['wall_s']:.1f}s)")
    if base:
        click.echo(f"relative to {base['model']}")
    click.echo(format_table(result, base))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"result": result, "baseline": base}, indent=1) + "\n")
