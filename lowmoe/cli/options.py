"""Flags shared by the commands that stream calibration data through a model (``prune``, ``score``)."""

from __future__ import annotations

import click

from ..engine.device import DTYPE_CHOICES
from ..engine.hf import EXPERTS_IMPLS


def _apply(options, f):
    for option in reversed(options):
        f = option(f)
    return f


def calibration_options(f):
    """--seq-len, --n-samples, --batch-size, --layout, --answer-only."""
    return _apply([
        click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per calibration sequence."),
        click.option("--n-samples", default=64, show_default=True, type=int,
                     help="Calibration sequences (split between domains by weight)."),
        click.option("--batch-size", default=8, show_default=True, type=int, help="Sequences per activation chunk."),
        click.option("--layout", default="pack", show_default=True, type=click.Choice(["pack", "per-sample"])),
        click.option("--answer-only", is_flag=True, help="Count only answer/assistant tokens in the statistics."),
    ], f)


def compute_options(f):
    """--device, --dtype, --max-vram, --max-ram, --no-prefetch, --experts-impl."""
    return _apply([
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N."),
        click.option("--dtype", default="fp32", show_default=True, type=click.Choice(DTYPE_CHOICES),
                     help="Compute dtype (scores are accumulated in fp32 whatever it is)."),
        click.option("--max-vram", default=None,
                     help="Device memory budget, e.g. 20GiB; experts are streamed in groups when a layer does not fit."),
        click.option("--max-ram", default=None, help="Host RAM budget, e.g. 32GiB (checked before the run starts)."),
        click.option("--no-prefetch", is_flag=True, help="Do not read the next layer / activation chunk while computing."),
        click.option("--experts-impl", "experts_impl", default="auto", show_default=True, type=click.Choice(EXPERTS_IMPLS),
                     help="Routed experts computed by transformers' per-expert loop (eager) or its grouped GEMM "
                          "(grouped); auto: grouped on CUDA, eager on the CPU."),
    ], f)
