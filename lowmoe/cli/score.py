"""``lowmoe score``: expert scores per layer, without writing a model (a shell over ``lowmoe.score``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..score import format_scores, score
from .heatmap import usage_heatmap
from .options import calibration_options, compute_options


@click.command("score")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", multiple=True, required=True,
              help="Calibration data: text, JSONL/JSON few-shot demos, CSV/Parquet or a saved datasets directory; "
                   "PATH@WEIGHT weighs a domain; repeatable (one domain each).")
@click.option("--method", "methods", multiple=True, default=("frequency",), show_default=True,
              help="Scoring method (frequency, gate-mass, reap, easy-ep, tcess, reconstruction); repeatable: one pass for all.")
@click.option("--out", default="scores.json", show_default=True, type=click.Path(path_type=Path), help="Where to write the scores (JSON).")
@click.option("--keep", default=None, help="Also list the experts each method would keep per layer (a count, 'half', '25%').")
@calibration_options
@click.option("--no-protect-super-experts", is_flag=True, help="Do not detect super experts.")
@click.option("--reap-no-renormalize", is_flag=True, help="REAP: use the full-softmax router probability, not renormalised over top-k.")
@click.option("--heatmap", default=None, type=click.Path(path_type=Path), help="Also draw expert usage per layer and domain (PNG; needs matplotlib).")
@compute_options
@click.option("--quant", default="none", show_default=True, type=click.Choice(["none", "int8", "nf4"]),
              help="Hold each layer's expert, attention and shared-expert weights as bitsandbytes NF4 (~0.56 byte/param) "
                   "or blockwise int8 (~1 byte/param), dequantized per use; router and norms stay exact. "
                   "Needs bitsandbytes. Measured on the toy MoE (12 keep-sets per method, keep half): int8 changed "
                   "none; NF4 swapped one expert in 1 (frequency), 1 (easy-ep) and 4 (reap) of them, scores moved "
                   "0.4-1.5% of the layer's top score on average (docs/gpu.md, 'Quantized compute').")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.pass_context
def score_command(ctx, model, calib, methods, out, keep, seq_len, n_samples, batch_size, layout, answer_only,
                  no_protect_super_experts, reap_no_renormalize, heatmap, device, dtype, max_vram, max_ram, no_prefetch, experts_impl,
                  quant, seed, as_json):
    """Score MODEL's experts on calibration data and write scores.json (no output model)."""
    opts = {"reap": {"renormalize": False}} if reap_no_renormalize else {}
    report = score(model, calib=list(calib), method=list(methods), out=out, keep=keep, seq_len=seq_len,
                   n_samples=n_samples, batch_size=batch_size, layout=layout, answer_only=answer_only,
                   protect_super_experts=not no_protect_super_experts, device=device, dtype=dtype, max_vram=max_vram,
                   max_ram=max_ram, prefetch=not no_prefetch, experts_impl=experts_impl, quant=quant, seed=seed,
                   progress=not (ctx.obj or {}).get("quiet"), method_options=opts)
    if heatmap:
        usage_heatmap(report, heatmap)
    click.echo(json.dumps(report, indent=1) if as_json else format_scores(report))
    if not as_json:
        click.echo(f"scores written to {out}" + (f"; heat map to {heatmap}" if heatmap else ""))
