"""Few-shot task data in several domains, generated deterministically from a seed.

These tasks feed three parts of lowmoe: the training of the shipped toy MoE
(``scripts/train_toy_moe.py``), calibration files for pruning a model *for a domain*
(``calib_file``), and held-out evaluation (``lowmoe.evaluate``, ``lowmoe eval``).

Every record is ``{"domain", "prompt", "answer", "key"}``. The prompt opens with a short domain tag
line (``add:``, ``rev:``, ...), then ``shots`` solved demonstrations, then the query; the answer is
short and ends with a newline (the text domain's answer is the next word). Sequences stay under
``MAX_BYTES`` bytes so that CPU training is fast (the toy model's tokenizer is one token per byte).

Splits never overlap, by construction: every example has a canonical ``key`` (the query: ``"27+65"``,
``"qwxe"``, the whole look-up context, or the source module for text), and a stable hash of
``domain:key`` sends it to exactly one of ``train`` (80 %), ``calib`` (10 %) or ``test`` (10 %).
Demonstrations inside a prompt are drawn from the same split as the query. The seed only chooses
which examples of a split are drawn, never which split an example belongs to.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from ..errors import CalibrationError, ConfigError
from ..engine.jsonl import json_lines

DOMAINS = ["arithmetic", "reverse", "sort", "lookup", "brackets", "text"]
SPLITS = ("train", "calib", "test")
TAGS = {"arithmetic": "add:", "reverse": "rev:", "sort": "sort:", "lookup": "kv:", "brackets": "bal:", "text": "txt:"}
DEFAULT_SHOTS = 3
MAX_BYTES = 128
TEXT_BYTES = 96  # text prompts are shorter: they dominate padding, hence training time
ASSETS = Path(__file__).parent.parent / "assets"
TEXT_CORPUS = ASSETS / "stdlib_docstrings.txt.gz"
TOY_MODEL = ASSETS / "toy-moe"  # the trained toy MoE shipped with lowmoe (scripts/train_toy_moe.py)
# the same toy trained without the per-domain routing prior, with a Mixtral load-balancing loss within each
# domain instead: no domain has experts of its own, so pruning costs accuracy and a search has room (docs/eep.md)
TOY_MODEL_LEARNED = ASSETS / "toy-moe-learned"

# Hash buckets (of 100) of each split: train 0-79, calib 80-89, test 90-99.
_BUCKETS = {"train": range(80), "calib": range(80, 90), "test": range(90, 100)}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def split_of(domain: str, key: str) -> str:
    """The split an example with canonical ``key`` belongs to (a pure function of domain and key)."""
    h = int.from_bytes(hashlib.blake2b(f"{domain}:{key}".encode(), digest_size=8).digest(), "big") % 100
    return next(s for s, r in _BUCKETS.items() if h in r)


# ---- one (key, demo-line, query, answer) per domain --------------------------------------------
# A "case" is (key, query, answer): the demo line of a case is query + answer.


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}", f"{a}+{b}=", f"{a + b}\n"


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    return s, f"{s}>", f"{s[::-1]}\n"


def _sort(rng: random.Random) -> tuple[str, str, str]:
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return s, f"{s}>", "".join(sorted(s)) + "\n"


def _balanced(rng: random.Random, n_pairs: int) -> str:
    out, stack = [], []
    opens = n_pairs
    while opens or stack:
        if opens and (not stack or rng.random() < 0.5):
            o = rng.choice("([")
            out.append(o)
            stack.append(")" if o == "(" else "]")
            opens -= 1
        else:
            out.append(stack.pop())
    return "".join(out)


def is_balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in "([":
            stack.append(")" if c == "(" else "]")
        elif not stack or stack.pop() != c:
            return False
    return not stack


def _brackets(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        s = _balanced(rng, rng.randint(1, 5))
    else:
        # Near misses are the informative negatives: a balanced string with one bracket changed.
        s = list(_balanced(rng, rng.randint(1, 5)))
        i = rng.randrange(len(s))
        s[i] = rng.choice([c for c in "()[]" if c != s[i]])
        s = "".join(s)
    return s, f"{s}>", ("yes\n" if is_balanced(s) else "no\n")


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic, "reverse": _reverse, "sort": _sort, "brackets": _brackets,
}


def _draw(domain: str, split: str, rng: random.Random, avoid: set[str] | None = None, tries: int = 1000):
    """Rejection-sample a case of ``domain`` whose key hashes into ``split``."""
    gen = _GENERATORS[domain]
    for _ in range(tries):
        case = gen(rng)
        if split_of(domain, case[0]) == split and (avoid is None or case[0] not in avoid):
            return case
    return None


def _few_shot(domain: str, split: str, rng: random.Random, shots: int, seen: set[str]) -> dict | None:
    query = _draw(domain, split, rng, avoid=seen)
    if query is None:
        return None
    demos = [_draw(domain, split, rng) for _ in range(shots)]
    prompt = TAGS[domain] + "\n" + "".join(q + a for _, q, a in demos) + query[1]
    return {"domain": domain, "prompt": prompt, "answer": query[2], "key": query[0]}


def _lookup(split: str, rng: random.Random, shots: int, seen: set[str]) -> dict | None:
    # Context "a=3 k=7 ..." then `shots` answered queries "k?7" then the query. The key is the whole
    # context plus the asked key, so a test context never appears in calibration or training.
    for _ in range(1000):
        keys = rng.sample(_LETTERS, 6)
        vals = [rng.choice("0123456789") for _ in keys]
        ctx = " ".join(f"{k}={v}" for k, v in zip(keys, vals))
        order = rng.sample(range(6), min(shots + 1, 6))
        q = order[-1]
        key = f"{ctx}|{keys[q]}"
        if split_of("lookup", key) != split or key in seen:
            continue
        demos = "".join(f"{keys[i]}?{vals[i]}\n" for i in order[:-1])
        return {"domain": "lookup", "prompt": f"{TAGS['lookup']}\n{ctx}\n{demos}{keys[q]}?", "answer": f"{vals[q]}\n", "key": key}
    return None


# ---- natural text: docstrings of the Python standard library -----------------------------------


def build_text_corpus(out: str | Path = TEXT_CORPUS, max_bytes: int = 600_000) -> Path:
    """Extract docstrings from this Python's standard library into ``out`` (gzip, ``module\\ttext`` lines).

    The shipped corpus was made with this function; it is shipped (rather than read at run time)
    so that the text domain is the same on every Python version.
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    lines, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = " ".join(doc.split())
            text = "".join(c for c in text if 32 <= ord(c) < 127)
            if len(text) < 60:
                continue
            lines.append(f"{path.stem}\t{text}")
            total += len(text)
        if total >= max_bytes:
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(lines) + "\n").encode())
    return out


@lru_cache(maxsize=1)
def _text_by_split() -> dict[str, list[tuple[str, str]]]:
    """(module, docstring) pairs of the shipped corpus, partitioned by module name."""
    if not TEXT_CORPUS.exists():
        raise ConfigError(f"{TEXT_CORPUS}: the text corpus is missing; rebuild it with lowmoe.toy.tasks.build_text_corpus()")
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for line in gzip.decompress(TEXT_CORPUS.read_bytes()).decode().splitlines():
        module, text = line.split("\t", 1)
        out[split_of("text", module)].append((module, text))
    return out


def _text(split: str, rng: random.Random, seen: set[str]) -> dict | None:
    # Prompt: a window of a docstring ending at a word boundary; answer: the next word (with its space).
    docs = _text_by_split()[split]
    budget = TEXT_BYTES - len(TAGS["text"]) - 1
    for _ in range(1000):
        module, text = docs[rng.randrange(len(docs))]
        words = text.split(" ")
        if len(words) < 6:
            continue
        end = rng.randrange(4, len(words))
        nxt = " " + words[end]
        if len(nxt) > 16:
            continue
        start = end
        while start > 0 and len(" ".join(words[start - 1:end])) + len(nxt) <= budget:
            start -= 1
        ctx = " ".join(words[start:end])
        key = f"{module}:{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}:{end}"
        if key in seen:
            continue
        return {"domain": "text", "prompt": f"{TAGS['text']}\n{ctx}", "answer": nxt, "key": key}
    return None


def text_documents(split: str) -> list[str]:
    """The raw docstrings of the text domain in ``split`` (for language-model training and calibration)."""
    return [t for _, t in _text_by_split()[_check_split(split)]]


# ---- public API --------------------------------------------------------------------------------


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; choose one of: {', '.join(SPLITS)}")
    return split


def check_domains(domains) -> list[str]:
    """Parse ``"a,b"`` or a list into domain names; unknown names raise a ConfigError listing the valid ones."""
    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise ConfigError(f"unknown task {bad[0]!r}; choose from: {', '.join(DOMAINS)}" if bad
                          else f"no task given; choose from: {', '.join(DOMAINS)}")
    return list(domains)


def make_split(domain: str, split: str, n: int, seed: int = 0, shots: int = DEFAULT_SHOTS) -> list[dict]:
    """``n`` few-shot examples ``{"domain", "prompt", "answer", "key"}`` of ``domain`` from ``split``.

    Deterministic in (domain, split, n, seed, shots); queries are distinct within the result
    (when the split has enough of them). Every prompt + answer fits in ``MAX_BYTES`` bytes.
    """
    check_domains([domain])
    _check_split(split)
    rng = random.Random(f"lowmoe:{domain}:{split}:{seed}:{shots}")
    out: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        if domain == "lookup":
            rec = _lookup(split, rng, shots, seen)
        elif domain == "text":
            rec = _text(split, rng, seen)
        else:
            rec = _few_shot(domain, split, rng, shots, seen)
        if rec is None:  # the split ran out of distinct queries: allow repeats rather than loop forever
            misses += 1
            seen.clear()
            if misses > 3:
                raise ConfigError(f"cannot draw {n} examples of {domain!r} from split {split!r}")
            continue
        if len(rec["prompt"]) + len(rec["answer"]) > MAX_BYTES:
            continue
        seen.add(rec["key"])
        out.append(rec)
    return out


def write_jsonl(records: list[dict], path: str | Path, fields: tuple[str, ...] = ("prompt", "answer")) -> Path:
    """Write records as JSON lines with only ``fields`` (prompt/answer is what calibration and eval read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({k: r[k] for k in fields if k in r}) + "\n" for r in records)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Read prompt/answer records; every problem raises a one-line CalibrationError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: file not found (expected JSON lines with 'prompt' and 'answer')")
    out = []
    for where, rec in json_lines(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
            raise CalibrationError(f"{where}: expected an object with string fields 'prompt' and 'answer'")
        if not rec["answer"]:
            raise CalibrationError(f"{where}: 'answer' is empty (exact match needs at least one answer token)")
        out.append(rec)
    if not out:
        raise CalibrationError(f"{path}: no records (expected JSON lines with 'prompt' and 'answer')")
    return out


def calib_file(domain: str, n: int = 64, out_dir: str | Path = ".", seed: int = 0, shots: int = DEFAULT_SHOTS) -> Path:
    """Write ``n`` calibration examples of ``domain`` (split ``calib``) to ``out_dir/<domain>-calib.jsonl``."""
    return write_jsonl(make_split(domain, "calib", n, seed=seed, shots=shots), Path(out_dir) / f"{domain}-calib.jsonl")
