"""Exact-match accuracy and answer perplexity of a checkpoint on prompt/answer tasks.

This is how lowmoe measures whether pruning worked: the same held-out prompts (``lowmoe.toy.tasks``
domains or a user's JSONL of ``{"prompt", "answer"}`` lines) are scored before and after.

Two modes, same metrics:

- ``greedy``: the model is loaded whole with ``AutoModelForCausalLM.from_pretrained`` and decodes
  greedily (batched, left-padded) exactly as many tokens as the gold answer has; an answer is
  exact iff every decoded token equals the gold one. Perplexity comes from one teacher-forced pass.
- ``streaming``: for models larger than memory. Teacher-forced, one decoder layer at a time
  (embed → each layer materialised from its own tensors and run over every batch → final norm and
  lm_head), so peak memory is about one layer plus the activations. An answer counts as exact iff
  every answer token is the argmax given the gold prefix, which is the same event as greedy exact
  match (greedy decoding reproduces the gold prefix token by token exactly when each gold token is
  the argmax); ``tests/test_evaluate.py`` checks the two agree.

Perplexity is exp(mean NLL per answer token). Prompts are tokenised with the tokenizer's special
tokens (a BOS where the tokenizer adds one), answers without; the answer boundary is exact because
the two are tokenised separately and concatenated.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine.cache import ActivationCache
from .engine.calibration import load_tokenizer
from .engine.checkpoint import Checkpoint
from .engine.device import dtype_name, resolve_device, resolve_dtype
from .engine.hf import materialize
from .engine.memory import out_of_memory_errors
from .engine.progress import progress as progress_bar
from .engine.quant import check_quant_budget, check_quant_mode
from .engine.stream import Stream, plan_stream_budget
from .errors import CheckpointError, ConfigError
from .pipeline import prune
from .toy import tasks as task_data
from .toy.tasks import DOMAINS, TOY_MODEL, check_domains, make_split, write_jsonl

log = logging.getLogger(__name__)

MODES = ("greedy", "streaming")


@dataclass
class Item:
    task: str
    prompt_ids: list[int]
    answer_ids: list[int]


def load_items(tokenizer, tasks=None, jsonl=None, n: int = 200, split: str = "test", seed: int = 0,
               shots: int = task_data.DEFAULT_SHOTS) -> dict[str, list[Item]]:
    """Tokenised eval items per task name (a domain of ``lowmoe.toy.tasks`` or a JSONL file's stem)."""
    if not tasks and not jsonl:
        raise ConfigError("nothing to evaluate: give tasks (e.g. arithmetic,reverse) or a JSONL file of prompt/answer lines")
    records: dict[str, list[dict]] = {}
    if tasks:
        for d in task_data.check_domains(tasks):
            records[d] = task_data.make_split(d, split, n, seed=seed, shots=shots)
    for path in ([jsonl] if isinstance(jsonl, (str, Path)) else list(jsonl or [])):
        recs = task_data.read_jsonl(path)[:n]
        records[Path(path).stem] = recs
    eos = tokenizer.eos_token_id
    out: dict[str, list[Item]] = {}
    for name, recs in records.items():
        items = []
        for r in recs:
            p = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            if eos is not None and p and p[-1] == eos:  # tokenizers that append EOS to every text
                p = p[:-1]
            a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            if not a:
                raise ConfigError(f"task {name!r}: answer {r['answer']!r} tokenises to nothing")
            items.append(Item(name, p, a))
        out[name] = items
    return out


def _right_padded(items: list[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, answer mask) — mask[b, i] is True where token i is an answer token (predicted from i-1)."""
    seqs = [it.prompt_ids + it.answer_ids for it in items]
    n = max(map(len, seqs))
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    ans = torch.zeros((len(items), n), dtype=torch.bool)
    for b, (it, s) in enumerate(zip(items, seqs)):
        ids[b, :len(s)] = torch.tensor(s)
        ans[b, len(it.prompt_ids):len(s)] = True
    return ids, ans


def score_logits(logits: torch.Tensor, ids: torch.Tensor, ans: torch.Tensor) -> tuple[list[bool], list[float], list[int]]:
    """Teacher-forced exactness, answer NLL and answer-token count per row.

    logits: (B, S, V) for ids (B, S); ans: (B, S) bool answer positions.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, S-1, V) predicts ids[:, 1:]
    tgt, am = ids[:, 1:], ans[:, 1:]
    tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, S-1)
    hit = (logp.argmax(-1) == tgt) | ~am
    nll = -(tok_lp * am).sum(-1)
    return hit.all(-1).tolist(), nll.tolist(), am.sum(-1).tolist()


def _summarise(items: list[Item], exact: list[bool], nll: list[float], ntok: list[int], extra: dict | None = None) -> dict:
    total_tok = max(1, sum(ntok))
    out = {"n": len(items), "exact_match": sum(exact) / max(1, len(items)),
           "perplexity": math.exp(sum(nll) / total_tok), "answer_tokens": sum(ntok), "correct": [bool(e) for e in exact]}
    out.update(extra or {})
    return out


# ---- greedy: the whole model through transformers ----------------------------------------------


@torch.no_grad()
def _greedy(model_dir: Path, tok, by_task: dict[str, list[Item]], batch_size: int, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    results = {}
    for name, items in by_task.items():
        exact, tf_exact, nll, ntok = [], [], [], []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            # Teacher-forced pass: perplexity (and teacher-forced exactness, for the record).
            ids, ans = _right_padded(chunk, pad)
            logits = model(input_ids=ids.to(device), attention_mask=_prefix_mask(chunk, ids.shape[1]).long().to(device)).logits
            e, l, t = score_logits(logits.cpu(), ids, ans)
            tf_exact += e
            nll += l
            ntok += t
            exact += _greedy_batch(model, chunk, pad, device)
        results[name] = _summarise(items, exact, nll, ntok, {"teacher_forced_exact_match": sum(tf_exact) / max(1, len(items))})
    return results


def _prefix_mask(chunk: list[Item], width: int) -> torch.Tensor:
    m = torch.zeros((len(chunk), width), dtype=torch.bool)
    for b, it in enumerate(chunk):
        m[b, :len(it.prompt_ids) + len(it.answer_ids)] = True
    return m


def _greedy_batch(model, chunk: list[Item], pad: int, device) -> list[bool]:
    """Left-pad the prompts, decode max(answer length) tokens greedily, compare each answer's prefix."""
    width = max(len(it.prompt_ids) for it in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for b, it in enumerate(chunk):
        ids[b, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)
        mask[b, width - len(it.prompt_ids):] = 1
    steps = max(len(it.answer_ids) for it in chunk)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps, do_sample=False,
                         num_beams=1, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    gen = out[:, width:].cpu().tolist()
    return [g[:len(it.answer_ids)] == it.answer_ids for g, it in zip(gen, chunk)]


# ---- streaming: one decoder layer at a time ----------------------------------------------------


class _EvalTokens:
    """Eval batches as a ``Stream``'s token source (the role ``CalibTokens`` plays in prune/score):
    chunk ``c`` is batch ``c``, right-padded to its own width, so a batch of short prompts does not
    pay for the longest one. Used with ``Stream(..., batch_size=1)``: one chunk per batch."""

    def __init__(self, batches: list[torch.Tensor]):
        self.ids = batches
        self.input_ids = torch.empty((len(batches), 0), dtype=torch.long)  # only its length is read
        self.positions = sum(int(b.numel()) for b in batches)  # hidden states a pass holds

    def batches(self, batch_size: int):
        for c in range(len(self.ids)):
            yield c, slice(c, c + 1)


class EvalStream(Stream):
    """``engine.stream.Stream`` over eval batches of different widths (``_EvalTokens``)."""

    def token_ids(self, chunk: int, sl: slice) -> torch.Tensor:
        return self.tokens.ids[chunk]


def _logits_fp32(h: torch.Tensor, head: torch.Tensor, block: int = 16384) -> torch.Tensor:
    """(B, S, H) x (V, H) -> (B, S, V) fp32 logits, products accumulated in fp32 whatever the compute
    dtype; the head is upcast ``block`` vocabulary rows at a time to bound the extra memory."""
    x = h.float()
    return torch.cat([torch.nn.functional.linear(x, head[v:v + block].float()) for v in range(0, head.shape[0], block)], -1)


@torch.no_grad()
def _streaming(model_dir: Path, tok, by_task: dict[str, list[Item]], batch_size: int, device, dtype, *,
               max_vram=None, max_ram=None, prefetch: bool = True, quant: str = "none", progress: bool = False,
               work_dir: str | Path | None = None) -> dict:
    """Teacher-forced scores through ``engine.stream.Stream``: hidden states in the disk activation cache,
    one decoder layer built at a time under the ``--max-vram``/``--max-ram`` plan, the next layer and
    cache chunk read while this one computes; then final norm and lm_head per batch."""
    ckpt = Checkpoint(model_dir)
    ckpt.validate()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    flat = [it for items in by_task.values() for it in items]
    # Sort by length so batches carry little padding; right padding under a causal mask never
    # changes the real tokens' states.
    order = sorted(range(len(flat)), key=lambda i: len(flat[i].prompt_ids) + len(flat[i].answer_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    tensors = [_right_padded([flat[i] for i in b], pad) for b in batches]
    width = max(ids.shape[1] for ids, _ in tensors)
    # routed experts read from the shards a group at a time, as prune and score read them (not with --quant)
    lazy = quant == "none"
    budget = plan_stream_budget(ckpt, device=device, dtype=dtype, batch_size=batch_size, seq_len=width,
                                max_vram=max_vram, max_ram=max_ram, prefetch=prefetch, lazy=lazy,
                                n_samples=len(batches) * batch_size)  # before any work
    if quant != "none":
        check_quant_budget(budget, ckpt, quant, dtype)
    with out_of_memory_errors(device, budget):  # out of memory anyway: one line naming the flag
        tmp = Path(tempfile.mkdtemp(prefix="lowmoe-eval-", dir=str(work_dir) if work_dir else None))
        per_item: dict[int, tuple[bool, float, int]] = {}
        stream = None
        try:
            stream = EvalStream(ckpt, _EvalTokens([ids for ids, _ in tensors]), ActivationCache(tmp / "cache", persist=False),
                                          device, dtype, 1, budget=budget, prefetch=prefetch, quant=quant)
            t0 = time.perf_counter()
            stream.embed()
            moe = set(ckpt.moe_layers())
            reader = stream.layers(0, moe, lazy=lazy)  # layer L+1 is read while L computes
            for layer_idx, data in progress_bar(reader, len(reader), "eval (streaming)", progress):
                module = stream.materialize(layer_idx, data.runtime, experts=data.experts)
                del data
                stream.forward(layer_idx, module, write=True)
                del module
                stream.cache.drop(layer_idx)
            skel = stream.skel
            norm = materialize(copy.deepcopy(skel.base.norm), {"weight": ckpt.read(["model.norm.weight"])["model.norm.weight"]},
                               device, dtype)
            tied = ckpt.config.get("tie_word_embeddings", False) or "lm_head.weight" not in ckpt.weight_map
            head_key = "model.embed_tokens.weight" if tied else "lm_head.weight"
            head = ckpt.read([head_key])[head_key].to(device=device, dtype=dtype)
            stream.placer.accountant.track(head, head.numel() * head.element_size())
            for c, (b, (ids, ans)) in enumerate(zip(batches, tensors)):
                h = stream.cache.read(ckpt.num_layers, c).to(device, dtype)
                for i, e, l, t in zip(b, *score_logits(_logits_fp32(norm(h), head).cpu(), ids, ans)):
                    per_item[i] = (e, l, t)
            wall = time.perf_counter() - t0
            io, placed, stages = stream.io.to_json(wall), stream.placer.report(), stream.stages(wall)
            io.update(stream.files.to_json())
            del head, norm
        finally:
            if stream is not None:
                stream.close()  # its loader thread, cuBLAS workspaces and page-locked buffers
            ckpt.close()
            shutil.rmtree(tmp, ignore_errors=True)
    results, start = {}, 0
    for name, items in by_task.items():
        rows = [per_item[start + j] for j in range(len(items))]
        start += len(items)
        results[name] = _summarise(items, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return {"tasks": results, "io": io, "budget": placed, "stages": stages}


# ---- public API ----------------------------------------------------------------------------


def evaluate(model_dir: str | Path, tasks=None, jsonl=None, n: int = 200, split: str = "test", mode: str = "greedy",
             batch_size: int = 32, seed: int = 0, shots: int = task_data.DEFAULT_SHOTS, device: str = "auto",
             dtype: str | torch.dtype = "fp32", *, max_vram: str | int | None = None, max_ram: str | int | None = None,
             prefetch: bool = True, quant: str = "none", progress: bool = False,
             work_dir: str | Path | None = None) -> dict:
    """Score ``model_dir`` on task domains and/or a JSONL of prompt/answer pairs.

    ``device`` is ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; ``dtype`` the compute
    dtype (bf16/fp16/fp32; log-probabilities and NLL sums are fp32 whatever it is). Streaming mode
    only: ``max_vram``/``max_ram`` budgets (planned before any work, as for ``prune``), ``prefetch``
    (read the next layer while this one computes), ``quant`` (``nf4``/``int8``: the layers' linear
    weights held quantized by bitsandbytes, ``lowmoe.engine.quant``), ``work_dir`` (activation cache).

    Returns ``{"model", "mode", "split", "n", "seed", "device", "dtype", "wall_s", "tasks": {name:
    {"exact_match", "perplexity", "n", "answer_tokens", "correct": [bool per example], ...}},
    "mean_exact_match"}`` (streaming adds ``io`` and ``budget``, as in the prune report).
    """
    model_dir = Path(model_dir)
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    if mode != "streaming":
        flags = [f for f, v in (("--max-vram", max_vram), ("--max-ram", max_ram), ("--no-prefetch", not prefetch),
                                ("--quant", quant != "none")) if v]
        if flags:
            raise ConfigError(f"{', '.join(flags)}: only used with --streaming (mode 'streaming')")
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    if quant != "none":
        check_quant_mode(quant)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint folder)")
    if n < 1:
        raise ConfigError(f"n must be at least 1 (got {n})")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.time()
    tok = load_tokenizer(model_dir)
    by_task = load_items(tok, tasks=tasks, jsonl=jsonl, n=n, split=split, seed=seed, shots=shots)
    extra: dict = {}
    if mode == "greedy":
        results = _greedy(model_dir, tok, by_task, batch_size, dev, compute_dtype)
    else:
        out = _streaming(model_dir, tok, by_task, batch_size, dev, compute_dtype, max_vram=max_vram, max_ram=max_ram,
                         prefetch=prefetch, quant=quant, progress=progress, work_dir=work_dir)
        results = out.pop("tasks")
        extra = {"quant": quant, **out}
    return {"model": str(model_dir), "mode": mode, "split": split, "n": n, "seed": seed, "device": str(dev),
            "dtype": dtype_name(compute_dtype), "wall_s": round(time.time() - t0, 3), "tasks": results,
            "mean_exact_match": sum(r["exact_match"] for r in results.values()) / len(results), **extra}


def format_table(result: dict, baseline: dict | None = None) -> str:
    """A small text table of one evaluation (and, with ``baseline``, the change relative to it)."""
    head = f"{'task':<14}{'n':>6}{'exact':>9}{'ppl':>10}"
    if baseline:
        head += f"{'Δexact':>9}{'ppl×':>8}"
    lines = [head, "-" * len(head)]
    for name, r in result["tasks"].items():
        line = f"{name:<14}{r['n']:>6}{r['exact_match']:>9.3f}{r['perplexity']:>10.3f}"
        b = (baseline or {}).get("tasks", {}).get(name)
        if b:
            line += f"{r['exact_match'] - b['exact_match']:>+9.3f}{r['perplexity'] / b['perplexity']:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


def prune_and_compare(domain: str = "sort", out: str | Path = "toy-pruned", model: str | Path | None = None, keep: int | str = "half",
                      method: str = "frequency", n: int = 100, calib_n: int = 64, seed: int = 0, overwrite: bool = True,
                      progress: bool = True, method_options: dict | None = None) -> dict:
    """The main job on the shipped toy MoE: prune it for ``domain``, evaluate before and after, return both.

    Calibration is ``calib_n`` examples of the domain's calibration split (written next to ``out``);
    evaluation is every domain's held-out test split (streaming, teacher-forced). ``method="eep"``
    searches on those examples and picks its plan on ``calib_n`` other calibration-split examples
    (``--dev``), unless ``method_options`` names a dev file. Print the result with
    ``format_table(result["after"], result["before"])``. ``progress=False`` (``lowmoe -q demo``): no bars.
    """
    check_domains([domain])
    model = Path(model) if model is not None else TOY_MODEL
    out = Path(out)
    opts = dict(method_options or {})
    recs = make_split(domain, "calib", 2 * calib_n if method == "eep" else calib_n, seed=seed)
    data_dir = out.parent / f"{out.name}-calib"
    calib = write_jsonl(recs[:calib_n], data_dir / f"{domain}-calib.jsonl")
    if method == "eep" and "dev" not in opts:  # the search's final pick: examples it did not search on
        opts["dev"] = str(write_jsonl(recs[calib_n:], data_dir / f"{domain}-dev.jsonl"))
    report = prune(model, out, keep=keep, method=method, calib=[str(calib)], seed=seed, overwrite=overwrite, seq_len=128,
                   n_samples=calib_n, progress=progress, method_options=opts)
    kw = {"tasks": DOMAINS, "n": n, "seed": seed, "mode": "streaming", "batch_size": 100, "progress": progress}
    return {"domain": domain, "method": method, "keep": keep, "calib": str(calib), "report": report,
            "before": evaluate(model, **kw), "after": evaluate(out, **kw)}
