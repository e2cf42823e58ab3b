"""Calibration inputs as users have them: text, JSONL/JSON demos, chat records, datasets directories,
CSV/Parquet; several weighted domains; layouts, answer-only; and the errors for bad input."""

from __future__ import annotations

import builtins
import json
import random

import pytest
import torch

from lowmoe.engine.calibration import check_sources, load_tokenizer, parse_source, split_samples, tokenize
from lowmoe.errors import CalibrationError, ConfigError


@pytest.fixture(scope="module")
def tok(synth_dir):
    return load_tokenizer(synth_dir("mixtral"))


def demos(path, n=20, prefix="Q"):
    path.write_text("".join(json.dumps({"prompt": f"{prefix}: {i}+{i}=", "answer": f"{2 * i}"}) + "\n" for i in range(n)))
    return path


def test_weights_split_samples_and_domains(tmp_path, tok):
    assert split_samples(8, [3, 1]) == [6, 2]
    assert split_samples(7, [1, 1, 1]) == [3, 2, 2]
    a, b = demos(tmp_path / "math.jsonl"), demos(tmp_path / "code.jsonl", prefix="C")
    t = tokenize([f"{a}@3", str(b)], tok, seq_len=16, n_samples=8)
    assert t.domains == ["math", "code"]
    assert torch.bincount(t.domain).tolist() == [6, 2]
    assert parse_source(f"{a}@0.5").weight == 0.5
    with pytest.raises(CalibrationError, match="weight must be > 0"):
        parse_source(f"{a}@0")
    with pytest.raises(CalibrationError, match="PATH@WEIGHT"):
        parse_source(f"{a}@x")
    with pytest.raises(ConfigError, match="nope.jsonl: file not found"):
        check_sources([tmp_path / "nope.jsonl"])
    with pytest.raises(CalibrationError, match="smaller than the number of --calib domains"):
        tokenize([a, b], tok, seq_len=16, n_samples=1)


def test_per_sample_answer_only_and_chat(tmp_path, tok):
    a = demos(tmp_path / "d.jsonl", n=5)
    t = tokenize([a], tok, seq_len=16, n_samples=5, layout="per-sample", answer_only=True)
    assert t.input_ids.shape == (5, 16)
    first = tok("Q: 0+0=", add_special_tokens=False)["input_ids"]
    assert t.input_ids[0, :len(first)].tolist() == first
    assert t.count_mask[0].tolist() == [False] * len(first) + [True] + [False] * (16 - len(first) - 1)  # "0" only
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    t = tokenize([chat], tok, seq_len=32, n_samples=1, layout="per-sample", answer_only=True)
    counted = t.input_ids[0][t.count_mask[0]].tolist()
    assert tok.decode(counted).strip().startswith("yo")
    alias = tmp_path / "alpaca.json"  # a JSON list with instruction/input/output fields
    alias.write_text(json.dumps([{"instruction": "add", "input": "1 1", "output": "2"}]))
    t = tokenize([alias], tok, seq_len=32, n_samples=1, layout="per-sample", answer_only=True)
    assert tok.decode(t.input_ids[0][t.count_mask[0]].tolist()) == "2"


def test_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CalibrationError, match="empty.jsonl: calibration file is empty"):
        check_sources([tmp_path / "empty.jsonl"])
    (tmp_path / "w.jsonl").write_text(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(CalibrationError, match=r"w.jsonl:1: record has none of the fields .*found \['question'\]"):
        tokenize([tmp_path / "w.jsonl"], tok, seq_len=16, n_samples=1)
    long = demos(tmp_path / "long.jsonl", n=1, prefix="Q" * 40)
    with pytest.raises(CalibrationError, match="sample 1 is 4[0-9] tokens, longer than --seq-len 16"):
        tokenize([long], tok, seq_len=16, n_samples=1, layout="per-sample")
    with pytest.raises(CalibrationError, match="--seq-len 9000 exceeds the model's context"):
        tokenize([long], tok, seq_len=9000, n_samples=1, max_positions=4096)
    (tmp_path / "arr.json").write_text("[")
    with pytest.raises(CalibrationError, match="arr.json: not valid JSON"):
        tokenize([tmp_path / "arr.json"], tok, seq_len=16, n_samples=1)


def test_without_datasets_installed(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("prompt,answer\na,b\n")
    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "datasets":
            raise ModuleNotFoundError("No module named 'datasets'", name="datasets")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CalibrationError, match=r"d.csv: reading csv calibration data needs the 'datasets' library; install it with: pip install 'lowmoe\[data\]'"):
        check_sources([tmp_path / "d.csv"])


def test_datasets_inputs(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = {"question": [f"{i}*2=" for i in range(6)], "answer": [str(2 * i) for i in range(6)]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "nosplit"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ref = tokenize([tmp_path / "single"], tok, seq_len=8, n_samples=6, layout="per-sample", answer_only=True)
    assert ref.count_mask.sum() == sum(len(a) for a in rows["answer"])
    for src in ("dict", "d.csv", "d.parquet"):
        t = tokenize([tmp_path / src], tok, seq_len=8, n_samples=6, layout="per-sample", answer_only=True)
        assert torch.equal(t.input_ids, ref.input_ids) and torch.equal(t.count_mask, ref.count_mask), src
    with pytest.raises(CalibrationError, match="splits a, b and none is 'train'"):
        tokenize([tmp_path / "nosplit"], tok, seq_len=8, n_samples=2)
    datasets.Dataset.from_dict({"foo": ["x"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(CalibrationError, match="bad row 0: record has none of the fields"):
        tokenize([tmp_path / "bad"], tok, seq_len=8, n_samples=1)
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(CalibrationError, match="empty: (dataset has no rows|cannot read it with datasets)"):
        tokenize([tmp_path / "empty"], tok, seq_len=8, n_samples=1)


def _trained_tokenizers(corpus: list[str]) -> dict:
    """Small tokenizers of the kinds real checkpoints ship, trained here: byte-level BPE with GPT-2's
    regex, Metaspace + Unigram (SentencePiece), BPE with no pre-tokenizer over the whole text
    (Llama-2-style SentencePiece BPE) and WordPiece (BERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = {}
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out["byte-level bpe"] = t
    t = Tokenizer(models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=400, unk_token="<unk>", special_tokens=["<unk>"]))
    out["metaspace unigram"] = t
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"]))
    out["bpe, no pre-tokenizer"] = t
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]"]))
    out["wordpiece"] = t
    return {k: PreTrainedTokenizerFast(tokenizer_object=v) for k, v in out.items()}


def test_a_long_document_is_tokenized_from_a_prefix_with_the_whole_documents_ids():
    """``encode_prefix`` gives (at least) the first ``need`` ids of the whole text's tokenization, for
    every kind of tokenizer, at sizes where the prefix is cut (the text is several times PREFIX_MIN_CHARS)."""
    from lowmoe.engine.calibration import PREFIX_MIN_CHARS, encode_prefix

    rng = random.Random(0)
    words = ["the", "model", "routes", "tokens", "to", "experts", "def", "f(x):", "return", "x", "+", "1", "12", "=",
             "42,", "naïve", "über", "日本語", "🙂", "\t", "  ", "mixture-of-experts", "(a,b)"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(30000)]
    text = "\n".join(lines)
    assert len(text) > 4 * PREFIX_MIN_CHARS
    for name, tok in _trained_tokenizers(lines[:2000]).items():
        full = tok(text, add_special_tokens=False)["input_ids"]
        for need in (1, 700, 5000, len(full) // 3):
            got = encode_prefix(text, tok, need)
            assert len(got) >= need and got == full[:len(got)], (name, need)
        assert encode_prefix(text, tok, len(full) + 10) == full, name  # more than it has: the whole text
        assert encode_prefix(text, tok, None) == full


def test_tokenize_reads_a_long_text_file_only_as_far_as_it_needs(tmp_path, monkeypatch):
    """Packing windows from a long text file tokenizes a prefix, not the whole file, and gives the
    windows tokenizing the whole file gives."""
    from lowmoe.engine import calibration as cal

    rng = random.Random(1)
    doc = tmp_path / "big.txt"
    doc.write_text("\n".join(" ".join(rng.choice(["alpha", "beta", "gamma", "delta."]) for _ in range(12))
                             for _ in range(60000)))
    tok = _trained_tokenizers(doc.read_text()[:20000].splitlines())["byte-level bpe"]
    seen = []
    real = tok.__class__.__call__

    def spy(self, text, **kw):
        seen.append(len(text))
        return real(self, text, **kw)

    monkeypatch.setattr(tok.__class__, "__call__", spy)
    got = cal.tokenize([doc], tok, seq_len=64, n_samples=8)
    assert max(seen) < len(doc.read_text()) // 4, seen
    monkeypatch.setattr(cal, "PREFIX_MIN_CHARS", 1 << 40)  # never a prefix: the whole file
    whole = cal.tokenize([doc], tok, seq_len=64, n_samples=8)
    assert torch.equal(got.input_ids, whole.input_ids) and torch.equal(got.count_mask, whole.count_mask)
