"""Calibration data -> fixed-length token batches.

Accepted inputs: plain text files (``.txt``/``.md``/anything not JSON), and JSON Lines files whose
records are few-shot demonstrations ``{"prompt": ..., "answer": ...}``, chat records
``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the model's chat template
when it has one) or ``{"text": ...}``.

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

from .errors import CalibrationError

log = logging.getLogger(__name__)


@dataclass
class Document:
    prompt: str
    answer: str = ""  # tokens of this part count when answer_only


@dataclass
class CalibTokens:
    input_ids: torch.Tensor  # (N, S) long
    count_mask: torch.Tensor  # (N, S) bool: positions that count in statistics
    domain: torch.Tensor  # (N,) long: index into ``domains``
    domains: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.count_mask.sum())

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield i // batch_size, slice(i, i + batch_size)


def _render_messages(msgs, tokenizer, where: str) -> Document:
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise CalibrationError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) if msgs[-1].get("role") == "assistant" else full
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
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
        if not isinstance(rec, dict):
            raise CalibrationError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "prompt" in rec:
            docs.append(Document(str(rec["prompt"]), str(rec.get("answer", rec.get("completion", "")))))
        elif "messages" in rec:
            docs.append(_render_messages(rec["messages"], tokenizer, where))
        elif "text" in rec:
            docs.append(Document(str(rec["text"])))
        else:
            raise CalibrationError(f"{where}: record has none of the fields 'prompt'/'answer', 'messages' or 'text' (found {sorted(rec)[:5]})")
    if not docs:
        raise CalibrationError(f"{p}: no records")
    return docs


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise CalibrationError(f"{model_dir}: cannot load the model's tokenizer ({type(e).__name__}: {str(e)[:120]}); "
                               "calibration text needs it") from None


def _encode(doc: Document, tok, answer_only: bool) -> tuple[list[int], list[bool]]:
    p = tok(doc.prompt, add_special_tokens=False)["input_ids"]
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
    domains = list(domains or [Path(s).stem for s in sources])
    per_source = max(1, n_samples // len(sources))
    for d_idx, src in enumerate(sources):
        docs = read_documents(src, tokenizer)
        want = per_source if d_idx < len(sources) - 1 else n_samples - per_source * (len(sources) - 1)
        got = 0
        if layout == "pack":
            ids_all: list[int] = []
            cnt_all: list[bool] = []
            for doc in docs:
                ids, cnt = _encode(doc, tokenizer, answer_only)
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
    return CalibTokens(ids_t, mask_t, torch.tensor(dom), domains)
