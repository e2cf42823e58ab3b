"""Terminal summaries of a run's report."""

from __future__ import annotations

import click

from .memory import fmt_bytes


def print_prune_summary(report: dict) -> None:
    plan = report["plan"]
    click.echo(f"lowmoe: {report['input']} -> {report['output']} ({report['family']}, method {report.get('method')})")
    click.echo(f"  experts per layer {report['num_experts']['before']} -> {report['num_experts']['after']}, "
               f"per token {report['num_experts_per_tok']['before']} -> {report['num_experts_per_tok']['after']}")
    for idx, lp in list(plan["layers"].items())[:64]:
        prot = report.get("protected_experts", {}).get(idx) or []
        extra = f"  protected {prot}" if prot else ""
        merged = "  (merged)" if "merge" in lp else ""
        click.echo(f"  layer {int(idx):3d}: keep {lp['keep']}{merged}{extra}")
    mem = report["memory"]
    click.echo(f"  wall {report['timings']['total_s']:.1f}s, peak RSS {fmt_bytes(mem['peak_rss_bytes'])} "
               f"(largest layer {fmt_bytes(mem['largest_layer_bytes'])}, whole model {fmt_bytes(mem['model_bytes'])})")
    for n in report.get("notes", []):
        click.echo(f"  note: {n}")
