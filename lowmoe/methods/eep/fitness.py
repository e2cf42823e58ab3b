"""Teacher-forced task fitness: what the EEP search maximises, from one forward pass.

EEP scores a candidate by the accuracy of greedy generation on a training subset (arXiv
2407.00945 §4.3; OpenCompass ``GenInferencer`` + template matching in its code). lowmoe replaces
the autoregressive loop with **one teacher-forced pass** over prompt+answer:

    exact(example) = all_t [ argmax_v p(v | prompt, answer_<t) == answer_t ]

which is exactly "greedy decoding reproduces the answer" (each greedy step sees the gold prefix
as long as every earlier step was right). Ties between candidates of equal accuracy are broken by
the mean per-token answer log-likelihood. Records with ``options`` are **multiple-choice**: every
option is one sequence, the prediction is the option with the largest summed log-likelihood, and
the tie-break is log p(gold option | options) = ll_gold − logsumexp over options.

Data: JSON Lines ``{"prompt": ..., "answer": ...}`` or ``{"prompt": ..., "options": [...],
"answer": <index or option text>}``. Prompts are tokenised as ``lowmoe.evaluate`` does (special tokens
included, no trailing EOS), answers apart. Sequences are right-padded; with causal attention real
tokens never see the padding, so no attention mask is needed (as in ``calibration``).

**Several domains** (one per ``--calib`` file, ``PATH@WEIGHT`` as in ``engine.calibration``):
every example remembers its file, accuracy and tie-break are measured per domain and combined by
``combine``: ``mean`` (default: the mean of the per-domain accuracies, every domain counts the same
whatever its number of examples), ``min`` (the worst domain: "no domain left behind"; the
tie-break is then the mean per-domain log-likelihood) or ``weighted`` (the ``@WEIGHT`` weights,
normalised; ``--calib a.jsonl@3 --calib b.jsonl@1``). ``Fitness.domains`` keeps the per-domain
values for the report.

``FitnessData`` holds the token batches; ``score_logits`` turns one chunk's logits into per-row
statistics; ``aggregate`` turns rows into a ``Fitness``. ``Head`` is the final norm + lm_head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import CalibrationError, ConfigError
from ...engine.calibration import parse_source
from ...engine.hf import materialize
from ...engine.jsonl import json_lines

COMBINE_RULES = ("mean", "min", "weighted")


@dataclass(frozen=True, order=True)
class Fitness:
    """Larger is better; compared as (accuracy, tie-break log-likelihood)."""

    acc: float  # fraction of examples exactly right (or multiple-choice correct); several domains: combined
    ll: float  # mean answer log-likelihood per token (MC: mean log p(gold | options)); several domains: combined
    # several domains: per domain (name, acc, ll), in --calib order; not part of the comparison
    domains: tuple[tuple[str, float, float], ...] = field(default=(), compare=False)
    # per domain (one domain: one), the per-example outcomes in example order, "1" right / "0" wrong:
    # what the paired pick rule compares two plans on (``paired_se``); not part of the comparison
    outcomes: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self, outcomes: bool = False) -> dict:
        """``outcomes``: also the per-example outcomes (the search state keeps them for dev fitness)."""
        d = {"acc": self.acc, "ll": self.ll}
        if self.domains:
            d["domains"] = {name: {"acc": acc, "ll": ll} for name, acc, ll in self.domains}
        if outcomes and self.outcomes:
            d["outcomes"] = list(self.outcomes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Fitness:
        doms = tuple((name, float(v["acc"]), float(v["ll"])) for name, v in (d.get("domains") or {}).items())
        return cls(float(d["acc"]), float(d["ll"]), doms, tuple(str(o) for o in d.get("outcomes") or ()))

    def domain_accs(self) -> dict[str, float]:
        return {name: acc for name, acc, _ in self.domains}

    def describe(self) -> str:
        """``0.812`` or, with several domains, ``0.812 (sort 0.800, brackets 0.825)``."""
        if not self.domains:
            return f"{self.acc:.3f}"
        return f"{self.acc:.3f} (" + ", ".join(f"{n} {a:.3f}" for n, a, _ in self.domains) + ")"


def combine(values: list[tuple[float, float]], weights: list[float], rule: str) -> tuple[float, float]:
    """Per-domain (acc, ll) -> one (acc, ll) by ``rule`` (``COMBINE_RULES``)."""
    if rule == "min":
        n = len(values)
        return min(a for a, _ in values), sum(ll for _, ll in values) / n
    w = [1.0] * len(values) if rule == "mean" else list(weights)
    total = sum(w)
    return (sum(wi * a for wi, (a, _) in zip(w, values)) / total, sum(wi * ll for wi, (_, ll) in zip(w, values)) / total)


def paired_se(a: Fitness, b: Fitness, weights: list[float] | None = None, rule: str = "mean") -> float | None:
    """Standard error of acc(a) - acc(b) measured on the SAME examples, from the per-example outcomes.

    Per domain d with n_d examples, the difference of the two accuracies is the mean of the per-example
    differences x_i in {-1, 0, +1}; its standard error is sqrt(discordant pairs) / n_d (McNemar's: only
    the examples one plan gets right and the other wrong count). The domains hold different examples,
    so their errors add as independent ones, with the combine rule's weights: ``mean`` and ``weighted``
    give sqrt(sum_d (w_d / W)^2 se_d^2). ``min`` compares each plan's worst domain: the same domain ->
    that domain's paired error; different domains -> the two accuracies are on different examples,
    sqrt(p_a(1-p_a)/n_a + p_b(1-p_b)/n_b). None when either fitness has no outcomes (or they differ
    in shape: not the same examples)."""
    if not a.outcomes or not b.outcomes or len(a.outcomes) != len(b.outcomes) or \
            any(len(x) != len(y) or not x for x, y in zip(a.outcomes, b.outcomes)):
        return None
    se2 = [sum(x != y for x, y in zip(oa, ob)) / len(oa) ** 2 for oa, ob in zip(a.outcomes, b.outcomes)]
    if rule == "min":
        acc_a = [o.count("1") / len(o) for o in a.outcomes]
        acc_b = [o.count("1") / len(o) for o in b.outcomes]
        da, db = acc_a.index(min(acc_a)), acc_b.index(min(acc_b))
        if da == db:
            return math.sqrt(se2[da])
        pa, pb = acc_a[da], acc_b[db]
        return math.sqrt(pa * (1 - pa) / len(a.outcomes[da]) + pb * (1 - pb) / len(b.outcomes[db]))
    w = [1.0] * len(se2) if rule == "mean" or not weights or len(weights) != len(se2) else list(weights)
    total = sum(w)
    return math.sqrt(sum((wi / total) ** 2 * s for wi, s in zip(w, se2)))


def unpaired_se(a: Fitness, b: Fitness, n: int) -> float:
    """The standard error of acc(a) - acc(b) as if measured on two independent sets of ``n`` examples:
    sqrt(p_a(1-p_a)/n + p_b(1-p_b)/n) (the former pick rule, ``pick_se="unpaired"``)."""
    pa, pb = a.acc, b.acc
    return math.sqrt(max(pa * (1 - pa), 0.0) / n + max(pb * (1 - pb), 0.0) / n)


def check_combine(rule: str | None) -> str:
    rule = (rule or "mean").strip().lower()
    if rule not in COMBINE_RULES:
        raise ConfigError(f"--fitness-combine {rule!r}: choose one of {', '.join(COMBINE_RULES)}")
    return rule


@dataclass
class Row:
    example: int  # index of the example this sequence belongs to
    option: int  # option index (0 for generative examples)
    start: int  # position of the first answer token
    length: int  # answer (or option) tokens


class FitnessData:
    """Tokenized fitness examples: ``input_ids`` (N, S) right-padded, one ``Row`` per sequence.

    ``domain[n]``: the domain (index into ``domains``/``weights``) example n came from;
    ``combine``: how per-domain fitness is combined (``COMBINE_RULES``)."""

    def __init__(self, input_ids: torch.Tensor, rows: list[Row], labels: list[int | None], source: str,
                 domain: list[int] | None = None, domains: list[str] | None = None, weights: list[float] | None = None,
                 combine: str = "mean"):
        self.input_ids, self.rows, self.labels, self.source = input_ids, rows, labels, source
        self.domain = list(domain) if domain is not None else [0] * len(labels)
        self.domains = list(domains) if domains else [source]
        self.weights = list(weights) if weights else [1.0] * len(self.domains)
        self.combine = check_combine(combine)
        self._answers: dict[tuple, torch.Tensor] = {}  # (chunk rows, device) -> its answer tokens there

    def domain_counts(self) -> dict[str, int]:
        counts = [0] * len(self.domains)
        for d in self.domain:
            counts[d] += 1
        return dict(zip(self.domains, counts))

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def num_tokens(self) -> int:
        return int(sum(r.start + r.length for r in self.rows))

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield i // batch_size, slice(i, i + batch_size)

    @classmethod
    def load(cls, paths, tokenizer, *, max_examples: int | None = None, max_len: int | None = None,
             combine: str = "mean", weights: list[float] | None = None) -> FitnessData:
        """Examples from one or more JSONL files, each file one domain (``PATH@WEIGHT`` sets its weight
        for ``combine="weighted"``; ``weights`` overrides them). ``max_examples``: N in all, split evenly
        between the domains (the first records of each file; a short file leaves its share unused)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        sources = [parse_source(p) for p in paths]
        names = [s.name or str(s.path) for s in sources]
        if len(set(names)) < len(names):  # same stem in two folders: fall back to the paths
            names = [str(s.path) for s in sources]
        per = [None] * len(sources)
        if max_examples:
            base, extra = divmod(int(max_examples), len(sources))
            per = [base + (1 if i < extra else 0) for i in range(len(sources))]
        records, domain = [], []
        for d, src in enumerate(sources):
            recs = read_records(src.path)
            if per[d] is not None:
                recs = recs[:per[d]]
            if not recs:
                raise CalibrationError(f"{src.path}: no fitness examples left (--n-samples {max_examples} split between "
                                       f"{len(sources)} domains)")
            records += recs
            domain += [d] * len(recs)
        data = cls.from_records(records, tokenizer, source=", ".join(str(s.path) for s in sources), max_len=max_len,
                                where=", ".join(str(s.path) for s in sources))
        data.domain, data.domains = domain, names
        data.weights = list(weights) if weights is not None else [s.weight for s in sources]
        if len(data.weights) != len(names):
            raise ConfigError(f"{len(data.weights)} fitness weights for {len(names)} domains")
        data.combine = check_combine(combine)
        return data

    @classmethod
    def from_records(cls, records: list[dict], tokenizer, *, source: str = "records", max_len: int | None = None,
                     where: str = "records") -> FitnessData:
        seqs: list[list[int]] = []
        rows: list[Row] = []
        labels: list[int | None] = []

        def enc(s):
            return tokenizer(s, add_special_tokens=False)["input_ids"]

        eos = tokenizer.eos_token_id
        for n, rec in enumerate(records):
            # as lowmoe.evaluate: the prompt with the tokenizer's special tokens (a BOS where it adds
            # one, never a trailing EOS), the answer without, tokenised apart so the boundary is exact
            prompt = tokenizer(str(rec["prompt"]), add_special_tokens=True)["input_ids"]
            if eos is not None and prompt and prompt[-1] == eos:
                prompt = prompt[:-1]
            options = rec.get("options")
            if options is None:
                answers, label = [str(rec["answer"])], None
            else:
                if not isinstance(options, list) or len(options) < 2:
                    raise CalibrationError(f"{where}: record {n + 1}: 'options' must be a list of at least 2 strings")
                answers = [str(o) for o in options]
                a = rec["answer"]
                label = int(a) if isinstance(a, int) else answers.index(str(a)) if str(a) in answers else None
                if label is None or not 0 <= label < len(answers):
                    raise CalibrationError(f"{where}: record {n + 1}: 'answer' must be an option index or one of the options")
            if not prompt:
                raise CalibrationError(f"{where}: record {n + 1}: empty prompt (the first answer token needs a prefix)")
            for o, ans in enumerate(answers):
                a_ids = enc(ans)
                if not a_ids:
                    raise CalibrationError(f"{where}: record {n + 1}: empty answer")
                ids = prompt + a_ids
                if max_len and len(ids) > max_len:
                    raise CalibrationError(f"{where}: record {n + 1} is {len(ids)} tokens, longer than --seq-len {max_len}")
                seqs.append(ids)
                rows.append(Row(n, o, len(prompt), len(a_ids)))
            labels.append(label)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        width = max(len(s) for s in seqs)
        ids_t = torch.full((len(seqs), width), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids_t[i, :len(s)] = torch.tensor(s)
        return cls(ids_t, rows, labels, source)

    # ---- scoring -----------------------------------------------------------------------------
    def positions(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence in chunk, position) of every logit fitness reads for the chunk ``input_ids[sl]``:
        per sequence, the position before each answer token (position t predicts t+1), in row order."""
        return self._index(sl, from_start=False)

    def live_positions(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence in chunk, position) of every position whose hidden state fitness depends on, for
        the chunk ``input_ids[sl]``: per sequence, 0 .. the last position ``positions`` reads.
        Sequences are right-padded and attention is causal, so the padding and each sequence's final
        token are never read by a scored position."""
        return self._index(sl, from_start=True)

    def _index(self, sl: slice, from_start: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b_idx, t_idx = [], []
        for b, row in enumerate(self.rows[sl]):
            end = row.start - 1 + row.length  # one past the last scored position
            span = range(0 if from_start else row.start - 1, end)
            b_idx += [b] * len(span)
            t_idx += span
        return torch.tensor(b_idx, dtype=torch.long), torch.tensor(t_idx, dtype=torch.long)

    def score_logits(self, logits: torch.Tensor, sl: slice) -> list[tuple[bool, float]]:
        """Per sequence of the chunk: (every answer token is the argmax, summed answer log-prob).

        logits: (B, S, V) for the chunk's sequences ``input_ids[sl]``; position t predicts t+1."""
        b, t = self.positions(sl)
        return self.score_positions(logits[b.to(logits.device), t.to(logits.device)], sl)

    def score_positions(self, logits: torch.Tensor, sl: slice) -> list[tuple[bool, float]]:
        """``score_logits`` from only the logits it reads: (P, V) at ``positions(sl)``, in that order.

        The host waits for the device once per call (a ``bool()`` and a ``float()`` per sequence would
        wait twice per sequence of every candidate): the chunk's answer tokens go to the device once
        (kept for the next candidate), every row's log-probs and argmax stay there, and the chunk's
        results are read together. Each row's sum is still taken over its own answer tokens, so the
        numbers are those of a row at a time."""
        rows = self.rows[sl]
        if not rows:
            return []
        key = (sl.start, sl.stop, str(logits.device))
        gold = self._answers.get(key)
        if gold is None:
            ids = self.input_ids[sl]
            gold = torch.cat([ids[b, r.start:r.start + r.length] for b, r in enumerate(rows)]).to(logits.device)  # (P,)
            self._answers[key] = gold
        pred = logits.float()
        logp = torch.log_softmax(pred, dim=-1).gather(1, gold[:, None]).squeeze(1)  # (P,)
        hit = pred.argmax(dim=-1) == gold  # (P,): what greedy decoding picks
        sums, exact, p = [], [], 0
        for row in rows:
            sums.append(logp[p:p + row.length].sum())
            exact.append(hit[p:p + row.length].all())
            p += row.length
        both = torch.stack([torch.stack(sums), torch.stack(exact).float()]).cpu()  # (2, rows): the one wait
        return [(e == 1.0, lp) for lp, e in zip(*both.tolist())]

    def aggregate(self, per_row: list[tuple[bool, float]]) -> Fitness:
        """Per-example correctness and tie-break, averaged over each domain's examples, the domains
        combined by ``self.combine`` (one domain: the plain average)."""
        n = self.num_examples
        correct = [False] * n
        ll = [0.0] * n
        options: dict[int, list[tuple[int, float]]] = {}
        for row, (exact, lp) in zip(self.rows, per_row):
            if self.labels[row.example] is None:
                correct[row.example] = exact
                ll[row.example] = lp / row.length
            else:
                options.setdefault(row.example, []).append((row.option, lp))
        for ex, opts in options.items():
            opts.sort()
            lps = [lp for _, lp in opts]
            gold = self.labels[ex]
            best = max(range(len(lps)), key=lambda o: (lps[o], -o))
            correct[ex] = best == gold
            m = max(lps)
            ll[ex] = lps[gold] - (m + math.log(sum(math.exp(x - m) for x in lps)))
        if len(self.domains) == 1:
            return Fitness(sum(correct) / n, sum(ll) / n, outcomes=("".join("1" if c else "0" for c in correct),))
        per, outcomes = [], []
        for d, name in enumerate(self.domains):
            idx = [i for i in range(n) if self.domain[i] == d]
            per.append((name, sum(correct[i] for i in idx) / len(idx), sum(ll[i] for i in idx) / len(idx)))
            outcomes.append("".join("1" if correct[i] else "0" for i in idx))
        acc, mean_ll = combine([(a, b) for _, a, b in per], self.weights, self.combine)
        return Fitness(acc, mean_ll, tuple(per), tuple(outcomes))


def read_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: fitness data file not found (expected JSONL with prompt/answer records)")
    records = []
    for where, rec in json_lines(p):
        if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
            raise CalibrationError(f"{where}: EEP fitness needs JSONL records with 'prompt' and 'answer' "
                                   "(and optionally 'options' for multiple choice)")
        records.append(rec)
    if not records:
        raise CalibrationError(f"{p}: no records")
    return records


class Head:
    """The final norm and lm_head (or the tied embedding), as transformers' own modules."""

    def __init__(self, ck, skel, device, dtype):
        keys = ck.other_keys()
        norm_keys = [k for k in keys if k.startswith("model.norm.")]
        head_key = "lm_head.weight" if "lm_head.weight" in keys else "model.embed_tokens.weight"
        t = ck.read(norm_keys + [head_key])
        self.norm = materialize(copy.deepcopy(skel.base.norm), {k[len("model.norm."):]: t[k] for k in norm_keys}, device, dtype)
        self.weight = t[head_key].to(device=device, dtype=dtype)  # (V, H)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) @ self.weight.T  # (B, S, V)
