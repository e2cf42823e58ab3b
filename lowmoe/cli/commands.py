"""The ``lowmoe`` command line: a thin shell over the Python API.

It parses flags, calls the library and maps ``LowmoeError`` to a one-line message and exit 2. No
error prints a traceback unless ``-vv`` is given: an ``OSError`` (a file that cannot be read or
written) is one line and exit 2 as well, anything else (a bug in lowmoe) one line and exit 1.
Errors raised on the prefetch and writer threads reach this handler unchanged
(``engine.prefetch`` re-raises them on the main thread).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from ..engine import faults
from ..engine.adapters import ALL
from ..engine.device import DTYPES
from ..engine.hf import derive_layout
from ..errors import ConfigError, LowmoeError
from ..evaluate import format_table, prune_and_compare
from ..inspect import format_inspection, inspect_model
from ..pipeline import profile_model
from ..pipeline import prune as run_prune
from ..toy import tasks
from ..toy.synth import synth_model, tiny_config_for_model_type
from ..toy.tokenizer import VOCAB_SIZE
from .options import calibration_options, compute_options
from .report import print_prune_summary

log = logging.getLogger("lowmoe")


# The group's own flags, also accepted after the subcommand (``lowmoe prune A B -v``): no subcommand
# defines an option with these names, so moving them in front of the subcommand changes nothing else.
_GROUP_FLAGS = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet", "-qv", "-vq"}


class LowmoeGroup(click.Group):
    def parse_args(self, ctx, args):
        if ctx.parent is None and args:
            cut = args.index("--") if "--" in args else len(args)
            moved = [a for a in args[:cut] if a in _GROUP_FLAGS]
            args = moved + [a for a in args[:cut] if a not in _GROUP_FLAGS] + args[cut:]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LowmoeError as e:
            if ctx.obj and ctx.obj.get("verbose", 0) >= 2:
                raise
            click.echo(f"lowmoe: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("lowmoe: interrupted; rerun the same command with --resume to continue", err=True)
            sys.exit(130)
        except click.exceptions.ClickException:
            raise
        except click.exceptions.Exit:
            raise
        except click.exceptions.Abort:
            raise
        except BrokenPipeError:  # the reader of our output went away (``lowmoe families | head``): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
            sys.exit(1)
        except OSError as e:
            if ctx.obj and ctx.obj.get("verbose", 0) >= 2:
                raise
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"lowmoe: error: {where}{e.strerror or e}", err=True)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 -- the last line of defence: one line, never a traceback
            if ctx.obj and ctx.obj.get("verbose", 0) >= 2:
                raise
            msg = " ".join(str(e).split())[:300]
            click.echo(f"lowmoe: internal error: {type(e).__name__}: {msg} (a bug in lowmoe: rerun with -vv for the "
                       "traceback and report it)", err=True)
            sys.exit(1)


@click.group(cls=LowmoeGroup)
@click.option("-v", "--verbose", count=True, help="-v: debug logs; -vv: also tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.version_option(package_name="lowmoe")
@click.pass_context
def main(ctx, verbose, quiet):
    """Prune and merge the experts of Mixture-of-Experts LLMs, one decoder layer at a time."""
    ctx.ensure_object(dict)
    faults.reset()  # LOWMOE_FAULT counts the steps of this command (several may run in one process)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", default="mixtral", show_default=True, help="Model family (see `lowmoe families`).")
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--hidden-size", default=64, show_default=True, type=int)
@click.option("--intermediate-size", default=128, show_default=True, type=int, help="Per-expert intermediate size.")
@click.option("--experts", default=8, show_default=True, type=int)
@click.option("--top-k", default=2, show_default=True, type=int)
@click.option("--heads", default=None, type=int, help="Attention heads (default hidden/16).")
@click.option("--vocab-size", default=None, type=int, help="Default: the byte tokenizer's 259.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--shard-size", default="2GB", show_default=True, help="Max bytes per shard, e.g. 500MB.")
@click.option("--mtp-layers", default=0, show_default=True, type=int, help="DeepSeek-V3 MTP layers past num_hidden_layers.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quant", default="none", show_default=True, type=click.Choice(["none", "fp8", "mxfp4"]),
              help="Write weights as published quantized checkpoints: fp8 (128x128 block, DeepSeek-V3/Qwen3-FP8 "
                   "layout) or mxfp4 (GPT-OSS experts).")
@click.option("--fp8-block", default=128, show_default=True, type=int, help="FP8 block size (weight_block_size).")
@click.option("--overwrite", is_flag=True)
def synth(out, arch, layers, hidden_size, intermediate_size, experts, top_k, heads, vocab_size, dtype, shard_size, mtp_layers, seed,
          quant, fp8_block, overwrite):
    """Write a random-init MoE checkpoint in a family's real on-disk layout."""
    synth_model(out, arch, layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size, experts=experts,
                top_k=top_k, heads=heads, vocab_size=vocab_size or VOCAB_SIZE, dtype=dtype, shard_size=shard_size,
                mtp_layers=mtp_layers, seed=seed, overwrite=overwrite, quant=quant, fp8_block=fp8_block)
    click.echo(f"wrote {arch} model to {out}" + ("" if quant == "none" else f" ({quant} weights)"))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--max-ram", default=None, help="Host RAM budget to plan for, e.g. 8GiB.")
@click.option("--max-vram", default=None, help="Device memory budget to plan for, e.g. 20GiB (with --device cuda).")
@click.option("--device", default="cpu", show_default=True, help="Compute device the prune would use (cpu or cuda).")
@click.option("--dtype", default="float32", show_default=True, help="Compute dtype the prune would use.")
@click.option("--seq-len", default=256, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--method", default=None, help="Plan for this --method (a merging method also holds its merged experts); "
              "default: a prune that drops experts.")
@click.option("--keep", default=None, help="With --method: experts kept per layer (default half).")
@click.option("--quant", default="none", show_default=True,
              help="With --method eep: the search's quantized layer cache (none, int8, nf4).")
@click.option("--n-samples", default=64, show_default=True, type=int,
              help="With --method eep: the search's fitness examples (its activation chunks under a small --max-ram).")
@click.option("--method-option", "-O", "method_option", multiple=True, metavar="KEY=VALUE",
              help="With --method: its options as the prune takes them (e.g. align=true: the alignment's memory).")
def inspect(model, as_json, max_ram, max_vram, device, dtype, seq_len, batch_size, method, keep, quant, n_samples,
            method_option):
    """Family, layers, experts, top-k, bytes per layer, the smallest --max-ram/--max-vram a prune can run
    under, and what a prune under the given budgets will hold."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r}: expected cpu or cuda")
    if keep is not None and method is None:
        raise ConfigError("--keep: give --method too (the plan of a prune that drops does not depend on the keep)")
    if quant != "none" and method != "eep":
        raise ConfigError(f"--quant {quant}: only the EEP search uses a quantized layer cache; give --method eep")
    if n_samples < 1:
        raise ConfigError(f"--n-samples {n_samples}: expected at least 1 fitness example")
    if method_option and method is None:
        raise ConfigError("--method-option: give --method too (the options are that method's)")
    options = _add_method_options({}, method_option).get("method_options", {})
    info = inspect_model(model, max_ram=max_ram, max_vram=max_vram, device=device, dtype=dtype, seq_len=seq_len,
                         batch_size=batch_size, method=method, keep=keep, quant=quant, n_samples=n_samples,
                         method_options=options)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspection(info))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", multiple=True, required=True, type=click.Path(path_type=Path), help="Calibration file (text or JSONL); repeatable: the same as the prunes that will reuse the profile.")
@click.option("--seq-len", default=256, show_default=True, type=int)
@click.option("--n-samples", default=64, show_default=True, type=int, help="Calibration sequences (as the prunes use them).")
@click.option("--layout", default="pack", show_default=True, type=click.Choice(["pack", "per-sample"]))
@click.option("--answer-only", is_flag=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--dtype", default="fp32", show_default=True,
              type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]))
@click.option("--max-vram", default=None, help="Device memory budget, e.g. 20GiB.")
@click.option("--max-ram", default=None, help="Host RAM budget, e.g. 8GiB.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def profile(ctx, model, calib, seq_len, n_samples, layout, answer_only, device, dtype, max_vram, max_ram, as_json):
    """Profile MODEL's super experts once and cache the result (a small JSON in the user cache directory,
    $LOWMOE_CACHE_DIR), so later prunes with the same calibration options skip that pass over the weights."""
    info = profile_model(model, [str(c) for c in calib], seq_len=seq_len, n_samples=n_samples, layout=layout,
                         answer_only=answer_only, device=device, dtype=dtype, max_vram=max_vram, max_ram=max_ram,
                         progress=not ctx.obj.get("quiet", False) if ctx.obj else True)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    how = "reused" if info["hit"] else f"computed ({info['expert_bytes_read'] / 1e9:.2f} GB of expert weights read)"
    found = ", ".join(f"layer {d['layer']} expert {d['expert']}" for d in info["super_experts"]) or "none"
    click.echo(f"super-expert profile {how}: {info['path'] or 'not cached'}\nsuper experts: {found}")


@main.command()
@click.option("--derive", "model_type", default=None, metavar="MODEL_TYPE",
              help="Print the adapter fields transformers itself gives for MODEL_TYPE (a family to add).")
def families(model_type):
    """List the supported model families."""
    if model_type is not None:
        try:
            layout = derive_layout(tiny_config_for_model_type(model_type))
        except ConfigError as e:
            raise ConfigError(f"--derive {model_type}: {e}") from None
        except Exception as e:  # a config class that needs more than the tiny defaults (e.g. dbrx's nested configs)
            raise ConfigError(f"--derive {model_type}: transformers could not build a tiny model ({type(e).__name__}: {e})") from None
        if layout.missing:
            raise ConfigError(f"--derive {model_type}: " + "; ".join(f"{k}: {v}" for k, v in layout.missing.items()))
        fields = ", ".join(f"{k}={v!r}" for k, v in layout.fields().items())
        click.echo(f"Adapter(family={model_type!r}, {fields})")
        return
    for a in ALL:
        click.echo(f"{a.family:16s} model_type={','.join(a.model_types):16s} experts key={a.expert_count_keys[0]:18s} "
                   f"layout={a.expert_layout:10s} {a.notes}".rstrip())


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--keep", default=None, help="Experts kept per layer: a count, 'half', '25%' or 0.5.")
@click.option("--method", default="frequency", show_default=True, help="Scoring / merging / search method.")
@click.option("--calib", multiple=True, type=click.Path(path_type=Path), help="Calibration file (text or JSONL); repeatable.")
@click.option("--plan", "plan", default=None, type=click.Path(path_type=Path), help="Apply a saved plan (no calibration).")
@click.option("--top-k", default=None, type=int, help="Experts per token in the output (default: unchanged).")
@calibration_options
@click.option("--one-shot", is_flag=True, help="Score every layer on the original model's activations.")
@click.option("--no-protect-super-experts", is_flag=True, help="Allow dropping super experts.")
@compute_options
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue a killed run in OUT.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--save-plan", default=None, type=click.Path(path_type=Path), help="Also write the plan to this file.")
@click.option("--dev", multiple=True, type=click.Path(path_type=Path),
              help="EEP: dev-split JSONL for the final pick; with several --calib domains, one per domain, same order.")
@click.option("--generations", default=None, type=int, help="EEP: generations (default 40).")
@click.option("--population", default=None, type=int, help="EEP: candidates per generation (default 16).")
@click.option("--init", "init", default=None,
              help="EEP: 'auto' (default: every scoring method's plan, the best seeds the search), 'random', or one scoring method.")
@click.option("--fitness-combine", "combine", default=None,
              help="EEP, several --calib domains: 'mean' (default) of per-domain accuracies, 'min', or 'weighted' (FILE@W).")
@click.option("--quant", default=None, type=click.Choice(["none", "int8", "nf4"]), help="EEP: quantized layer cache for the search.")
@click.option("--layer-groups", default=None, help="EEP: layer groups sharing W_EM/W_RM: a count (default 4) or 'layer'.")
@click.option("--method-option", "-O", "method_option", multiple=True, metavar="KEY=VALUE",
              help="A method's own option, e.g. -O align=true -O similarity=weight (see docs/merging.md); repeatable.")
@click.pass_context
def prune(ctx, model, out, keep, method, calib, plan, top_k, seq_len, n_samples, batch_size, layout, answer_only, one_shot,
          no_protect_super_experts, device, dtype, max_shard_size, max_vram, max_ram, no_prefetch, experts_impl, seed, resume,
          overwrite, save_plan, dev, generations, population, init, combine, quant, layer_groups, method_option):
    """Prune MODEL's experts into a new checkpoint OUT."""
    report = run_prune(model, out, keep=keep, method=method, calib=[str(c) for c in calib], plan=plan, top_k=top_k,
                       seq_len=seq_len, n_samples=n_samples, batch_size=batch_size, layout=layout, answer_only=answer_only,
                       sequential=not one_shot, protect_super_experts=not no_protect_super_experts, device=device,
                       dtype=dtype, max_shard_size=max_shard_size, max_vram=max_vram, max_ram=max_ram,
                       prefetch=not no_prefetch, experts_impl=experts_impl, seed=seed, resume=resume, overwrite=overwrite,
                       progress=not ctx.obj["quiet"], **_add_method_options(
                           _eep_options(method, dev=[str(d) for d in dev] or None, generations=generations,
                                        population=population, init=init, combine=combine, quant=quant,
                                        layer_groups=layer_groups), method_option))
    if "plan" not in report:  # a rank > 0 of a torchrun launch: rank 0 writes and reports
        return
    if save_plan:
        Path(save_plan).write_text(json.dumps(report["plan"], indent=1) + "\n")
    print_prune_summary(report)


def _eep_options(method: str, **given) -> dict:
    """The EEP-only flags, as ``method_options`` (an error if they are given to another method)."""
    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    if not given:
        return {}
    if method != "eep":
        flags = ", ".join("--" + {"combine": "fitness-combine"}.get(k, k).replace("_", "-") for k in given)
        raise ConfigError(f"{flags}: only used by --method eep (got --method {method})")
    return {"method_options": given}


def _add_method_options(kwargs: dict, pairs: tuple[str, ...]) -> dict:
    """Fold ``--method-option KEY=VALUE`` pairs into ``method_options`` (values stay strings; each
    method validates and converts its own options)."""
    opts = dict(kwargs.get("method_options", {}))
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-option {pair!r}: expected KEY=VALUE, e.g. align=true")
        opts[key.strip().replace("-", "_")] = value.strip()
    return {**kwargs, "method_options": opts} if opts else kwargs


@main.command()
@click.option("--domain", default="sort", show_default=True, help="Task domain to prune for (see lowmoe.toy.tasks.DOMAINS).")
@click.option("--method", default="easy-ep", show_default=True, help="Scoring / merging method.")
@click.option("--keep", default="half", show_default=True, help="Experts kept per layer.")
@click.option("--n", default=100, show_default=True, type=int, help="Held-out test examples per domain.")
@click.option("--out", default="toy-pruned", show_default=True, type=click.Path(path_type=Path), help="Output directory (replaced).")
@click.option("--toy", type=click.Choice(["specialised", "learned"]), default="specialised", show_default=True,
              help="Which shipped toy: 'specialised' (each domain has its own pair of experts: one-shot pruning keeps it "
                   "whole) or 'learned' (every domain spread over all experts: pruning costs accuracy; where "
                   "--method eep wins, docs/eep.md).")
@click.pass_context
def demo(ctx, domain, method, keep, n, out, toy):
    """The main job on the shipped toy MoE: prune it for one domain, evaluate before and after."""
    import time

    t0 = time.time()
    model = tasks.TOY_MODEL if toy == "specialised" else tasks.TOY_MODEL_LEARNED
    res = prune_and_compare(domain=domain, out=out, model=model, method=method, keep=keep, n=n, progress=not ctx.obj["quiet"])
    r = res["report"]
    click.echo(f"\npruned the {toy} toy MoE for '{domain}' with {method}: {r['num_experts']['before']} -> "
               f"{r['num_experts']['after']} experts per layer, written to {out}")
    click.echo(f"held-out exact match and perplexity after pruning (delta vs the full model), {n} examples per domain:\n")
    click.echo(format_table(res["after"], res["before"]))
    click.echo(f"\ndone in {time.time() - t0:.0f}s; the plan is in {Path(out) / 'lowmoe_report.json'}")


if __name__ == "__main__":
    main()
