"""Terminal summaries of a run's report."""

from __future__ import annotations

import click

from ..engine.memory import fmt_bytes


def stages_line(stages: dict | None, top: int = 4) -> str:
    """The main thread's largest stages, "compute 6.2s, tokenize 1.1s, ..." (observe is part of compute)."""
    if not stages:
        return ""
    main = [(k, v["s"]) for k, v in stages.items() if v.get("thread") == "main" and k != "observe"]
    main.sort(key=lambda kv: -kv[1])
    return ", ".join(f"{k} {s:.1f}s" for k, s in main[:top])


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
    io, budget = report.get("io"), report.get("budget")
    if io:
        click.echo(f"  I/O wait {io['total_wait_s']:.1f}s ({100 * io.get('wait_fraction', 0):.1f}% of the streamed pass)")
    line = stages_line(report.get("stages"))
    if line:
        click.echo(f"  time on the main thread: {line} (report: stages)")
    if budget and budget.get("chunked_layers"):
        click.echo(f"  {len(budget['chunked_layers'])} layer(s) ran with experts streamed in groups; device peak "
                   f"{fmt_bytes(budget.get('cuda_max_memory_allocated') or budget['accounted_peak_bytes'])}")
    for n in report.get("notes", []) + ((budget or {}).get("plan") or {}).get("notes", []):
        click.echo(f"  note: {n}")
