"""Calibration data -> fixed-length token batches (the pipeline's ``calibrate`` step).

Accepted inputs (each ``--calib`` value is one *domain*; several may be given):

* plain text files (``.txt``/``.md``/anything not listed below): one document per file;
* JSON Lines (``.jsonl``) or JSON (``.json``: a list of records, or one record per line) few-shot
  demonstrations ``{"prompt": ..., "answer": ...}`` (also ``question``/``instruction`` +
  ``input`` and ``completion``/``response``/``output``), chat records
  ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the model's chat template
  when it has one) or ``{"text": ...}``;
* through the optional ``datasets`` library (``pip install 'lowmoe[data]'``): a directory written
  by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (split ``train``, or its only split),
  and local ``.csv`` / ``.parquet`` files; their rows use the same fields.

Several domains at once: ``--calib math.jsonl@3 --calib code.txt@1`` splits ``n_samples`` between
domains in proportion to the weights (default 1 each); every sequence records its domain index
(``CalibTokens.domain``) so scorers can keep per-domain statistics.

Two layouts: ``pack`` (default) concatenates every document, separated by EOS, and cuts fixed
``seq_len`` windows; ``per-sample`` puts one demonstration per sequence, right-padded. Right padding
needs no attention mask: with causal attention real tokens never see later pad tokens, so pad
positions are simply left out of the statistics through ``count_mask``. With
``answer_only=True`` only answer/assistant tokens count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CalibrationError, ConfigError
from . import faults
from .jsonl import json_lines

log = logging.getLogger(__name__)


@dataclass
class Document:
    prompt: str
    answer: str = ""  # tokens of this part count when answer_only


@dataclass(frozen=True)
class Source:
    """One ``--calib`` value: a file or dataset directory, its weight and its domain name."""

    path: Path
    weight: float = 1.0
    name: str = ""

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "dataset-dir"
        suffix = self.path.suffix.lower()
        return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix, "text")

    @property
    def needs_datasets(self) -> bool:
        return self.kind in ("dataset-dir", "csv", "parquet")


def parse_source(spec: str | Path | Source) -> Source:
    """``PATH`` or ``PATH@WEIGHT`` -> Source (a path that exists as written wins over the @ form)."""
    if isinstance(spec, Source):
        return spec
    text = str(spec)
    path, weight = Path(text), 1.0
    if not path.exists() and "@" in text:
        head, _, tail = text.rpartition("@")
        try:
            weight = float(tail)
        except ValueError:
            raise CalibrationError(f"--calib {text}: expected PATH or PATH@WEIGHT with a number after '@'") from None
        path = Path(head)
        if not weight > 0:
            raise CalibrationError(f"--calib {text}: the weight must be > 0, got {tail}")
    if not path.exists():
        raise ConfigError(f"--calib {path}: file not found (expected a text, JSONL, JSON, CSV or Parquet file, "
                          "or a directory saved by datasets)")
    return Source(path, weight, path.stem if path.is_file() else path.name)


def _require_datasets(src: Source):
    try:
        import datasets
    except ModuleNotFoundError:
        raise CalibrationError(f"--calib {src.path}: reading {src.kind} calibration data needs the 'datasets' library; "
                               "install it with: pip install 'lowmoe[data]'") from None
    return datasets


def check_sources(specs) -> list[Source]:
    """Validate every ``--calib`` value before any heavy work (paths exist, weights, datasets)."""
    sources = [parse_source(s) for s in specs]
    for src in sources:
        if src.needs_datasets:
            _require_datasets(src)
        elif src.path.is_file() and src.path.stat().st_size == 0:
            raise CalibrationError(f"{src.path}: calibration file is empty")
    return sources


@dataclass
class CalibTokens:
    input_ids: torch.Tensor  # (N, S) long
    count_mask: torch.Tensor  # (N, S) bool: positions that count in statistics
    domain: torch.Tensor  # (N,) long: index into ``domains``
    domains: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.count_mask.sum())

    @property
    def positions(self) -> int:
        """Token positions a pass holds hidden states for (padding included)."""
        return int(self.input_ids.numel())

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield i // batch_size, slice(i, i + batch_size)


def _render_messages(msgs, tokenizer, where: str) -> Document:
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise CalibrationError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if getattr(tokenizer, "chat_template", None):
        try:
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) if msgs[-1].get("role") == "assistant" else full
        except Exception as e:  # noqa: BLE001 -- a template rejecting a record is the record's fault
            raise CalibrationError(f"{where}: the model's chat template cannot render these messages "
                                   f"({type(e).__name__}: {str(e)[:100]})") from None
        return Document(prompt, full[len(prompt):]) if full.startswith(prompt) else Document(full)
    body = "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in msgs[:-1])
    last = msgs[-1]
    if last.get("role") == "assistant":
        return Document(body + "assistant: ", str(last["content"]) + "\n")
    return Document(body + f"{last.get('role', 'user')}: {last['content']}\n")


def read_documents(path: str | Path, tokenizer=None) -> list[Document]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: calibration file not found")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{p}: cannot read calibration file as UTF-8 text ({e})") from None
    if not text.strip():
        raise CalibrationError(f"{p}: calibration file is empty")
    if p.suffix.lower() not in (".jsonl", ".json"):
        return [Document(text)]
    if p.suffix.lower() == ".json":
        docs = _read_json_array(p, text, tokenizer)
        if docs is not None:
            return docs
    docs = [record_document(rec, tokenizer, where) for where, rec in json_lines(p, text)]
    if not docs:
        raise CalibrationError(f"{p}: no records")
    return docs


PROMPT_FIELDS = ("prompt", "question", "instruction")
ANSWER_FIELDS = ("answer", "completion", "response", "output")


def record_document(rec, tokenizer, where: str) -> Document:
    """One JSON / dataset row -> Document (see the module docstring for the fields)."""
    if not isinstance(rec, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    af = next((f for f in ANSWER_FIELDS if rec.get(f) is not None), None)
    # "prompt" alone is a prompt-only demo; the aliases (question, instruction) need an answer field.
    pf = "prompt" if rec.get("prompt") is not None else next((f for f in PROMPT_FIELDS if rec.get(f) is not None), None) if af else None
    if pf is not None:
        prompt = str(rec[pf])
        if pf == "instruction" and rec.get("input"):
            prompt += "\n" + str(rec["input"])
        return Document(prompt, str(rec[af]) if af else "")
    if rec.get("messages") is not None:
        return _render_messages(rec["messages"], tokenizer, where)
    if rec.get("text") is not None:
        return Document(str(rec["text"]))
    raise CalibrationError(f"{where}: record has none of the fields 'prompt'/'answer', 'messages' or 'text' "
                           f"(found {sorted(rec)[:6]})")


def _read_json_array(p: Path, text: str, tokenizer) -> list[Document] | None:
    """A ``.json`` file holding one JSON list of records (None if it is JSON Lines instead)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        recs = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); expected a list of records or JSON Lines") from None
    if not recs:
        raise CalibrationError(f"{p}: no records")
    return [record_document(r, tokenizer, f"{p}[{i}]") for i, r in enumerate(recs)]


def read_dataset(src: Source, tokenizer=None) -> list[Document]:
    """Rows of a saved ``datasets`` directory or a local CSV / Parquet file -> Documents."""
    datasets = _require_datasets(src)
    datasets.disable_progress_bars()
    p = src.path
    try:
        if src.kind == "dataset-dir":
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                splits = sorted(ds)
                if "train" in ds:
                    ds = ds["train"]
                elif len(splits) == 1:
                    ds = ds[splits[0]]
                else:
                    raise CalibrationError(f"--calib {p}: dataset has splits {', '.join(splits)} and none is 'train'; "
                                           f"pass one split's directory, e.g. {p / splits[0]}")
        else:
            ds = datasets.load_dataset(src.kind, data_files=str(p), split="train")
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 -- datasets/pyarrow raise many types for unreadable input
        raise CalibrationError(f"--calib {p}: cannot read it with datasets ({type(e).__name__}: {str(e)[:160]})") from None
    if len(ds) == 0:
        raise CalibrationError(f"--calib {p}: dataset has no rows")
    return [record_document(dict(row), tokenizer, f"{p} row {i}") for i, row in enumerate(ds)]


def read_source(src: Source, tokenizer=None) -> list[Document]:
    if src.needs_datasets:
        return read_dataset(src, tokenizer)
    return read_documents(src.path, tokenizer)


def split_samples(n_samples: int, weights: list[float]) -> list[int]:
    """Sequences per domain, proportional to ``weights`` (largest remainders), at least 1 each."""
    if n_samples < len(weights):
        raise CalibrationError(f"--n-samples {n_samples} is smaller than the number of --calib domains ({len(weights)})")
    total = sum(weights)
    exact = [n_samples * w / total for w in weights]
    out = [max(1, int(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: -(exact[i] - int(exact[i])))
    i = 0
    while sum(out) < n_samples:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > n_samples:
        j = max(range(len(out)), key=lambda i: out[i] - exact[i])
        out[j] -= 1
    return out


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_tokenizer(model_dir: str | Path) -> None:
    """Fail fast when the checkpoint has no tokenizer files (calibration text needs its tokenizer)."""
    d = Path(model_dir)
    if d.is_dir() and not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise CalibrationError(f"{d}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES[:2])}, ...); calibration "
                               "text needs the model's tokenizer: copy its tokenizer files into the checkpoint folder")


def load_tokenizer(model_dir: str | Path):
    check_tokenizer(model_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 -- any tokenizer load failure is reported the same way
        raise CalibrationError(f"{model_dir}: cannot load the model's tokenizer ({type(e).__name__}: {str(e)[:120]}); "
                               "calibration text needs it") from None


# A long plain-text document is tokenized from a prefix of it that holds what the windows need (and
# as much again, at least 256 tokens more, so no token near the cut is ever used): at least
# PREFIX_CHARS_PER_TOKEN characters per token wanted and PREFIX_MIN_CHARS, cut after a line break
# or space, four times longer while it holds too few tokens. Tokens are local to the text around
# them (every tokenizer splits at whitespace first, or merges only adjacent symbols), so the ids are
# the first ones of the whole document's (tested on byte-level BPE, Metaspace/Unigram and
# SentencePiece-style BPE without pre-tokenizer), and a 100 MB corpus file costs what its first
# windows cost.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_MIN_CHARS = 1 << 16


def _prefix_end(text: str, n: int) -> int:
    """Where to cut ``text`` near ``n`` characters: just after the last line break in ``text[n//2:n]``,
    else the last space, else at ``n``."""
    for sep in ("\n", " "):
        i = text.rfind(sep, n // 2, n)
        if i >= 0:
            return i + 1
    return n


def encode_prefix(text: str, tok, need: int | None) -> list[int]:
    """The token ids of ``text`` (no special tokens), or only its first ones, at least ``need``, when
    ``need`` is given and the text is long (see PREFIX_CHARS_PER_TOKEN)."""
    n = max(PREFIX_MIN_CHARS, PREFIX_CHARS_PER_TOKEN * need) if need else len(text)
    while n < len(text):
        ids = tok(text[:_prefix_end(text, n)], add_special_tokens=False)["input_ids"]
        if len(ids) >= need + max(need, 256):
            return ids[:need]
        n *= 4
    return tok(text, add_special_tokens=False)["input_ids"]


def _encode(doc: Document, tok, answer_only: bool, need: int | None = None) -> tuple[list[int], list[bool]]:
    """A document's ids and which count; ``need``: only the first ``need`` are used (plain text is
    then tokenized from a prefix, ``encode_prefix``)."""
    p = encode_prefix(doc.prompt, tok, need if not doc.answer else None)
    a = tok(doc.answer, add_special_tokens=False)["input_ids"] if doc.answer else []
    ids = p + a
    count = ([not answer_only] * len(p)) + [True] * len(a)
    if answer_only and not a:
        count = [True] * len(p)  # plain text has no answer part: every token counts
    return ids, count


def tokenize(sources: list[str | Path], tokenizer, *, seq_len: int = 256, n_samples: int = 64,
             layout: str = "pack", answer_only: bool = False, max_positions: int | None = None,
             domains: list[str] | None = None) -> CalibTokens:
    """Tokenize calibration files into ``n_samples`` sequences of ``seq_len`` tokens (at most)."""
    if not sources:
        raise CalibrationError("no calibration data: pass --calib FILE (text or JSONL few-shot demos), or --plan")
    if layout not in ("pack", "per-sample"):
        raise CalibrationError(f"--layout {layout!r}: expected 'pack' or 'per-sample'")
    if max_positions and seq_len > max_positions:
        raise CalibrationError(f"--seq-len {seq_len} exceeds the model's context ({max_positions} positions)")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, masks, dom = [], [], []
    srcs = [parse_source(s) for s in sources]
    domains = list(domains or _unique_names([s.name for s in srcs]))
    wants = split_samples(n_samples, [s.weight for s in srcs])
    for d_idx, (source, want) in enumerate(zip(srcs, wants)):
        src = source.path
        docs = read_source(source, tokenizer)
        got = 0
        if layout == "pack":
            ids_all: list[int] = []
            cnt_all: list[bool] = []
            for doc in docs:
                if len(ids_all) >= want * seq_len:
                    break  # enough for every window wanted: the rest of the file is never tokenized
                ids, cnt = _encode(doc, tokenizer, answer_only, need=want * seq_len - len(ids_all))
                ids_all += ids + [eos]
                cnt_all += cnt + [False]
            for start in range(0, len(ids_all), seq_len):
                if got >= want:
                    break
                chunk, cm = ids_all[start:start + seq_len], cnt_all[start:start + seq_len]
                if len(chunk) < seq_len:
                    if start > 0:
                        break  # drop the ragged tail when there are full windows
                    cm = cm + [False] * (seq_len - len(chunk))
                    chunk = chunk + [pad] * (seq_len - len(chunk))
                rows.append(chunk)
                masks.append(cm)
                dom.append(d_idx)
                got += 1
        else:
            for n, doc in enumerate(docs):
                if got >= want:
                    break
                ids, cnt = _encode(doc, tokenizer, answer_only)
                if len(ids) > seq_len:
                    raise CalibrationError(f"{src}: sample {n + 1} is {len(ids)} tokens, longer than --seq-len {seq_len}; "
                                           "raise --seq-len or use --layout pack")
                rows.append(ids + [pad] * (seq_len - len(ids)))
                masks.append(cnt + [False] * (seq_len - len(ids)))
                dom.append(d_idx)
                got += 1
        if got == 0:
            raise CalibrationError(f"{src}: produced no calibration tokens")
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_t = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids_t[i, :len(r)] = torch.tensor(r)
        mask_t[i, :len(m)] = torch.tensor(m)
    if not mask_t.any():
        raise CalibrationError("calibration data has no token that counts (with answer-only, records need a non-empty 'answer')")
    log.info("calibration: %d sequences x %d tokens (%d counted) from %d file(s)", ids_t.shape[0], width, int(mask_t.sum()), len(sources))
    faults.point("tokenize")
    return CalibTokens(ids_t, mask_t, torch.tensor(dom), domains)
