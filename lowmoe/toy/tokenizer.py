"""A small byte-level tokenizer for the checkpoints lowmoe builds itself.

Synthetic and toy models need a real tokenizer on disk so that the whole pipeline runs from text
(calibration files, eval prompts) exactly as it does for a downloaded model. Every byte is one
token (ids 3..258), so any text round-trips and arithmetic-style tasks are tokenised per digit.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def build_byte_tokenizer():
    """Return a ``PreTrainedTokenizerFast`` with one token per byte plus pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i, ch in enumerate(sorted(alphabet)):
        vocab[ch] = len(SPECIAL_TOKENS) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=1 << 30,
    )


def save_byte_tokenizer(out_dir: str | Path) -> None:
    """Write the byte tokenizer's files (tokenizer.json, tokenizer_config.json, ...) to ``out_dir``."""
    build_byte_tokenizer().save_pretrained(str(out_dir))
