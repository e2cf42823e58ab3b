"""The model card (``README.md``) of a lowmoe output: what a Hugging Face user needs to know about
where the checkpoint came from -- base model, method, kept experts, calibration data, the command."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def invocation() -> str:
    """The command line that made this run: ``lowmoe ...`` from the CLI (or ``python -m lowmoe``),
    else the Python entry point."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog in ("lowmoe", "__main__.py") or prog.startswith("lowmoe"):
        return "lowmoe " + shlex.join(sys.argv[1:])
    return f"lowmoe.prune(...) called from Python ({shlex.join(sys.argv) or 'interactive'})"


def _base_card_license(src: Path) -> str | None:
    """``license:`` from the input model card's YAML front matter, if any."""
    card = src / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def base_model_name(cfg: dict, src: Path) -> str:
    name = cfg.get("_name_or_path")
    return str(name) if name and not str(name).startswith(("/", ".")) else src.name


def model_card(report: dict, cfg: dict, src: Path, command: str) -> str:
    plan = report["plan"]
    meta = plan.get("meta") or {}
    base = base_model_name(cfg, src)
    ne, nk = report["num_experts"], report["num_experts_per_tok"]
    lic = _base_card_license(src)
    calib = meta.get("calib") or []
    if meta.get("applied_from"):
        calib_line = f"none in this run: the plan was applied from `{meta['applied_from']}`"
        if calib:
            calib_line += f" (the plan was made with {', '.join(f'`{c}`' for c in calib)})"
    else:
        calib_line = ", ".join(f"`{c}`" for c in calib) or "none (the method needs no calibration data)"
    merged = [k for k, v in plan["layers"].items() if "merge" in v]
    front = ["---", f"base_model: {base}", "library_name: transformers", "tags:", "- lowmoe", "- mixture-of-experts",
             "- expert-pruning"] + ([f"license: {lic}"] if lic else []) + ["---", ""]
    body = [
        f"# {base}: {ne['after']} of {ne['before']} experts per MoE layer",
        "",
        f"`{base}` ({report['family']}) with routed experts {'merged' if merged else 'pruned'} by "
        f"lowmoe {report['lowmoe_version']}.",
        "",
        f"- **Base model**: `{base}` (from `{report['input']}`)",
        f"- **Method**: `{report.get('method', meta.get('method', 'plan'))}`",
        f"- **Routed experts per MoE layer**: {ne['before']} -> {ne['after']}; experts per token "
        f"{nk['before']} -> {nk['after']}",
        f"- **Calibration data**: {calib_line}",
        f"- **Command**: `{command}`",
        "",
        "## Kept experts",
        "",
        "Expert ids of the base model kept in each MoE layer, in their new order"
        + (" (merged layers: see `merge` in `lowmoe_report.json`)" if merged else "") + ":",
        "",
        "| layer | kept experts |",
        "|---|---|",
    ]
    body += [f"| {k} | {', '.join(str(e) for e in v['keep'])} |" for k, v in plan["layers"].items()]
    if report.get("notes"):
        body += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    body += ["", "The full plan, per-expert scores and timings are in `lowmoe_report.json`.", ""]
    return "\n".join(front + body)


def write_model_card(out: Path, report: dict, cfg: dict, src: Path) -> None:
    tmp = Path(out) / "README.md.tmp"  # renamed into place: a kill never leaves half a card
    tmp.write_text(model_card(report, cfg, src, report.get("command") or invocation()))
    os.replace(tmp, Path(out) / "README.md")
