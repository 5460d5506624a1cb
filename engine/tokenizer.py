"""Text <-> token ids through HF ``tokenizers``, plus the byte-level tokenizer of the presets."""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from engine.errors import InvalidRequestError, ModelLoadError

PRESET_SPECIALS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: bos, eos, pad
# Symbols the filler merges are built from, most common first, so generated text reads as
# letters and spaces. "Ġ" is the byte-level alphabet's name for the space byte.
_MERGE_SYMBOLS = "etaoinshrdlcumwfgypbvkjxqzĠETAOINSHRDLCUMWFGYPBVKJXQZ0123456789"


class Tokenizer:
    """A thin wrapper so the engine depends on three calls, not on the library's surface."""

    def __init__(self, tok: HFTokenizer) -> None:
        self._tok = tok

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the library raises bare Exceptions on bad files
            raise ModelLoadError(f"cannot read tokenizer {path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. The library's batch call releases the GIL while it works
        (``encode`` holds it), so a long text tokenized in a worker thread leaves the
        server's event loop running."""
        try:
            return self._tok.encode_batch([text])[0].ids
        except TypeError:  # e.g. a lone surrogate ("\ud800"), which is no UTF-8 text
            raise InvalidRequestError("the text is not valid Unicode (a lone surrogate?)") from None

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` ids, deterministic.

    Ids 0-2 are ``<s> </s> <pad>``, then the 256 byte symbols, then filler merges of
    common letters (pairs, then triples) so every id decodes to some text.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = len(PRESET_SPECIALS) + len(alphabet)
    if vocab_size < base:
        raise ValueError(f"a byte-level vocabulary needs at least {base} ids, got {vocab_size}")
    vocab = {s: i for i, s in enumerate(PRESET_SPECIALS)}
    vocab.update({ch: len(PRESET_SPECIALS) + i for i, ch in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    pairs = [a + b for a, b in itertools.product(_MERGE_SYMBOLS, repeat=2)]
    candidates = itertools.chain(
        ((a, b) for a, b in itertools.product(_MERGE_SYMBOLS, repeat=2)),
        ((p, c) for p, c in itertools.product(pairs, _MERGE_SYMBOLS)),
    )
    for left, right in candidates:
        if len(vocab) >= vocab_size:
            break
        if left + right in vocab:
            continue
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    if len(vocab) < vocab_size:
        raise ValueError(f"byte-level vocabulary cannot be filled to {vocab_size} ids")
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(PRESET_SPECIALS))
    return Tokenizer(tok)
