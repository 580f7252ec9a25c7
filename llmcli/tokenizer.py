"""Subword tokenizers: train BPE or Unigram on the user's text, encode and decode in batches,
save and load as a Hugging Face `tokenizer.json`.

Design (both kinds):
  NFKC normalizer -> Metaspace pre-tokenizer (spaces become `SPACE_MARK`, split before it,
  nothing prepended) -> BPE or Unigram model with byte fallback -> ByteFallback, Metaspace,
  Fuse decoders.

Why not GPT-2 byte-level: byte-level BPE starts every CJK character as 3 byte symbols and
spends merges rebuilding characters, and Unigram over byte symbols learns pieces that cut
characters apart (on wmt24 Chinese, vocab 8000, it gave 35-38 tokens a line where this
design gives 30-32; on Multi30k English, 13.5-18 where this gives 12.6-15). Keeping
characters as symbols, with the 256 `<0xNN>` byte tokens for everything else (as Llama and
SentencePiece's byte_fallback do), means no input is ever unknown.

Round trip: decode(encode(x)) == NFKC(x) for every str x (lone surrogates cannot be encoded),
whitespace included: runs, tabs, newlines, leading and trailing spaces survive because
nothing is prepended and the decoder does no clean-up. NFKC itself is not undone: full-width
punctuation becomes ASCII ("，" -> ",", "（" -> "("), "ﬁ" -> "fi", "①" -> "1". The space mark is
U+FF3F FULLWIDTH LOW LINE rather than SentencePiece's U+2581: NFKC turns U+FF3F into "_", so
after normalization it can only stand for a space, where a U+2581 in the input would come
back as a space. Text spelling a token name ("<s>", "<0x41>") is plain text, except in a
Unigram vocabulary under 404 whose training text lacked one of the name's characters.

Token ids: 0-3 are `SPECIAL_TOKENS`, 4-259 the bytes <0x00>..<0xFF>, then characters and
pieces. Only the four specials are "added tokens" in tokenizer.json, which is how `load`
finds their ids again without a side file.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from llmcli.errors import UserError
from llmcli.io import atomic_write, read_text, settings, warn

_SURROGATES = re.compile("[\ud800-\udfff]")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3 in every tokenizer we train
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # the names byte_fallback looks up
SPACE_MARK = "\uff3f"  # see the module docstring
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 40  # 40: room for some characters

# Unigram scores are log probabilities; specials and bytes get one no path of real pieces can
# reach, so a literal "<s>" or "<0x41>" in the text is spelled with characters, never
# matched as that token. (Byte fallback itself does not use these scores.)
_UNREACHABLE_SCORE = -1e6
# Characters of the special and byte token names: in a Unigram vocabulary so that path exists
# even when the training text lacked them (a missing one would make the name win), unless
# they would take over a quarter of a tiny vocabulary's characters.
_NAME_CHARS = sorted(set("".join(SPECIAL_TOKENS + BYTE_TOKENS)))


def _configure_parallelism() -> None:
    # tokenizers warns on every fork once its thread pool has run, unless the variable is
    # set. We set it, and turn it off again in forked children (os.fork, multiprocessing),
    # whose copy of the pool has no threads and could deadlock. subprocess's fork+exec runs
    # no Python fork hooks and needs none.
    if "TOKENIZERS_PARALLELISM" in os.environ:
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.register_at_fork(after_in_child=lambda: os.environ.__setitem__("TOKENIZERS_PARALLELISM", "false"))


_configure_parallelism()


class Tokenizer:
    """Wraps tokenizers.Tokenizer with the ids of its pad, bos, eos and unk tokens.

    Text in the input that spells a special token ("<s>") is encoded as plain text.
    """

    def __init__(self, hf: tokenizers.Tokenizer, *, pad_id: int, bos_id: int, eos_id: int, unk_id: int | None):
        self.hf = hf
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        hf.encode_special_tokens = True
        self._skip = {pad_id, bos_id, eos_id}

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_batch(
        self, texts: list[str], *, add_bos: bool = False, add_eos: bool = False, control_tokens: bool = False
    ) -> list[list[int]]:
        # The tokenizer's own post-processor (e.g. BART's <s> ... </s>) is not applied:
        # add_bos and add_eos say what is added, whatever the tokenizer.json.
        # control_tokens: text a chat template rendered spells its control tokens (<|im_start|>),
        # read as tokens as transformers' default does; otherwise they are plain text.
        self.hf.encode_special_tokens = not control_tokens
        texts = list(texts)
        try:
            encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            # tokenizers refuses a str holding lone surrogates: what Python makes of bytes that
            # are not UTF-8 in a command-line argument. U+FFFD, as for such bytes in input lines.
            cleaned = [_SURROGATES.sub("\ufffd", t) if isinstance(t, str) else t for t in texts]
            if cleaned == texts:
                raise
            warn("invalid UTF-8 in the text replaced with U+FFFD")
            encodings = self.hf.encode_batch_fast(cleaned, add_special_tokens=False)
        finally:
            self.hf.encode_special_tokens = True
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        return [head + e.ids + tail for e in encodings]

    def decode_batch(self, ids: list[list[int]]) -> list[str]:
        """Text of each sequence, without pad, bos, eos or other special tokens."""
        skip = self._skip
        kept = [[i for i in seq if i not in skip] for seq in ids]
        return self.hf.decode_batch(kept, skip_special_tokens=True)

    def encode(self, text: str, **kw) -> list[int]:
        return self.encode_batch([text], **kw)[0]

    def decode(self, ids: list[int]) -> str:
        return self.decode_batch([ids])[0]

    def stream(self) -> TextStream:
        """A decoder for tokens arriving one at a time (a streamed reply)."""
        return TextStream(self)

    def save(self, path: str | Path) -> None:
        text = self.hf.to_str(pretty=True)
        with atomic_write(path) as f:
            f.write(text + "\n")

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        pad: str = "<pad>",
        bos: str = "<s>",
        eos: str = "</s>",
        unk: str | None = "<unk>",
    ) -> Tokenizer:
        """A tokenizer.json we trained; or a foreign one, naming its special tokens."""
        text = read_text(path)
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust parser raises plain Exception for any bad file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path}: not a tokenizer.json ({reason})") from None
        return cls.from_hf(hf, pad=pad, bos=bos, eos=eos, unk=unk, source=str(path))

    @classmethod
    def from_hf(
        cls,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        pad: str = "<pad>",
        bos: str = "<s>",
        eos: str = "</s>",
        unk: str | None = "<unk>",
        source: str = "the tokenizer",
    ) -> Tokenizer:
        """Wrap a tokenizers.Tokenizer, looking its special tokens up by name.

        GPT-2: pad=bos=eos="<|endoftext|>", unk=None. BART: the defaults. Padding and
        truncation stored in the file are switched off (the caller pads and truncates), and
        the object is modified in place.
        """
        ids = {}
        for role, name in (("pad", pad), ("bos", bos), ("eos", eos), ("unk", unk)):
            if name is None and role == "unk":
                ids[role] = None
                continue
            token_id = hf_tokenizer.token_to_id(name) if name is not None else None
            if token_id is None:
                raise UserError(f"{source} has no {role} token {name!r}")
            ids[role] = token_id
        hf_tokenizer.no_padding()
        hf_tokenizer.no_truncation()
        return cls(hf_tokenizer, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"])


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 8000,
    kind: Literal["bpe", "unigram"] = "bpe",
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a tokenizer on `texts` (any iterable of strings; it is read into a list).

    vocab_size counts the 4 special and 256 byte tokens; below MIN_VOCAB_SIZE it is raised
    with a warning. BPE's vocabulary ends smaller when fewer pairs occur min_frequency
    times; Unigram ignores min_frequency and may end smaller on a small corpus too. The
    same texts give the same tokenizer.json, byte for byte.
    """
    if kind not in ("bpe", "unigram"):
        raise UserError(f"unknown tokenizer kind {kind!r}; choose bpe or unigram")
    if vocab_size < MIN_VOCAB_SIZE:
        warn(
            f"vocab_size={vocab_size} is below the minimum {MIN_VOCAB_SIZE} (4 special + 256 byte tokens + 40); using {MIN_VOCAB_SIZE}"
        )
        vocab_size = MIN_VOCAB_SIZE
    reserved = list(SPECIAL_TOKENS + BYTE_TOKENS)
    # At most three quarters of the free ids go to single characters; rarer characters are
    # dropped from the training text here, and spelled in bytes when encoded. Done here
    # rather than by BpeTrainer(limit_alphabet=...), which breaks ties at random, and
    # because the Unigram trainer fails outright when the characters do not fit.
    max_chars = (vocab_size - len(reserved)) * 3 // 4
    alphabet = [SPACE_MARK]  # a corpus without spaces would otherwise spell them in bytes
    if kind == "unigram" and 4 * len(_NAME_CHARS) <= max_chars:
        alphabet += _NAME_CHARS
    texts = _keep_frequent_chars(list(texts), max_chars - len(alphabet))
    show_progress = not settings.quiet and sys.stderr.isatty()

    if kind == "bpe":
        model = models.BPE(unk_token=SPECIAL_TOKENS[3], byte_fallback=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=reserved,
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )
    else:
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=reserved,
            unk_token=SPECIAL_TOKENS[3],
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = normalizers.NFKC()
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=True)
    hf.decoder = decoders.Sequence(
        # Bytes first: a space mark spelled in bytes is still a space.
        [decoders.ByteFallback(), decoders.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=True), decoders.Fuse()]
    )
    hf.train_from_iterator(texts, trainer, length=len(texts))
    return _finish(hf, kind)


def _keep_frequent_chars(texts: list[str], max_chars: int) -> list[str]:
    """The texts without the characters (after NFKC) beyond the `max_chars` most frequent."""
    nfkc = normalizers.NFKC()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(text if text.isascii() else nfkc.normalize_str(text))
    if len(counts) <= max_chars:
        return texts
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # ties by code point
    drop = {ord(c): None for c, _ in ranked[max_chars:]}
    return [nfkc.normalize_str(text).translate(drop) for text in texts]


def _canonical_unigram_vocab(vocab: list[list]) -> list[list]:
    """The same vocabulary, scores and order for the same training text.

    The HF Unigram trainer walks hash maps, so from run to run (1) scores differ in the
    last bits (sums in another order), (2) the characters it keeps without having learned
    them get min_score + 0.0001 * i in a random order, and (3) equal scores come out in any
    order. Rounding fixes (1); giving those characters one score fixes (2); sorting by score
    then text fixes (3).
    """
    reserved = set(SPECIAL_TOKENS + BYTE_TOKENS)
    # An empty corpus leaves the alphabet with NaN scores (null in JSON).
    pieces = [(p, 0.0 if s is None else round(s, 6)) for p, s in vocab if p not in reserved]
    floor = min(s for _, s in pieces)
    n_chars = sum(len(p) == 1 for p, _ in pieces)
    ceiling = floor + 0.0001 * n_chars + 1e-6
    pieces = [(p, floor if len(p) == 1 and s <= ceiling else s) for p, s in pieces]
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    head = [[p, _UNREACHABLE_SCORE] for p in SPECIAL_TOKENS + BYTE_TOKENS]
    return head + [[p, s] for p, s in pieces]


def _finish(hf: tokenizers.Tokenizer, kind: str) -> Tokenizer:
    """Make the byte tokens ordinary vocabulary entries and check the id layout."""
    data = json.loads(hf.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    data["model"]["byte_fallback"] = True
    if kind == "unigram":
        data["model"]["vocab"] = _canonical_unigram_vocab(data["model"]["vocab"])
    else:
        # Text full of "<s>" or "<0x41>" teaches merges that spell those names, and the
        # result would take the special or byte token's id.
        reserved = set(SPECIAL_TOKENS + BYTE_TOKENS)
        merges = data["model"]["merges"]
        data["model"]["merges"] = [m for m in merges if "".join(m if isinstance(m, list) else m.split(" ", 1)) not in reserved]
    hf = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, name in enumerate(SPECIAL_TOKENS + BYTE_TOKENS):
        assert hf.token_to_id(name) == i, (name, hf.token_to_id(name))
    return Tokenizer(hf, pad_id=0, bos_id=1, eos_id=2, unk_id=3)


class TextStream:
    """The text of tokens as they arrive, each piece given once. tokenizers' DecodeStream decodes
    the few tokens around the newest rather than the whole sequence at every step (which made
    a long streamed reply quadratic), and holds back a partial UTF-8 character until its last
    byte arrives. `text` is all that was given; it equals `Tokenizer.decode` of the tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = decoders.DecodeStream(skip_special_tokens=True)
        self.text = ""

    def push(self, token_id: int) -> str:
        """The new text `token_id` completes ("" while a character is incomplete)."""
        if token_id in self._tokenizer._skip:
            return ""
        piece = self._stream.step(self._tokenizer.hf, token_id) or ""
        self.text += piece
        return piece
