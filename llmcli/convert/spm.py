"""SentencePiece Unigram models (Marian's source.spm, target.spm) as `tokenizers` Unigram
tokenizers, with the ids of a separate vocab.json, encoding as `SentencePieceProcessor.encode`.

The .spm file is a protobuf `ModelProto`; the few fields needed are read here from the wire
format, so neither the sentencepiece nor the protobuf package is needed. The pipeline is
transformers' `SpmConverter` (convert_slow_tokenizer.py): the model's precompiled
normalization rules, its whitespace handling, a Metaspace dummy prefix, Unigram by score.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from llmcli.errors import UserError

SPACE = "\u2581"  # SentencePiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_UNREACHABLE = -1e6  # a score no segmentation with real pieces ever prefers


@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # piece, score, type
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) pairs of one protobuf message: ints, bytes, or 4/8 raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def read_spm(path: Path) -> SpmModel:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    model = SpmModel()
    try:
        for number, value in _fields(data):
            if number == 1:  # SentencePiece: piece 1, score 2, type 3
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 35:
                        model.byte_fallback = bool(v)
            elif number == 3:  # NormalizerSpec
                for n, v in _fields(value):
                    if n == 2:
                        model.charsmap = bytes(v)
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        model.escape_whitespaces = bool(v)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        raise UserError(f"{path}: not a SentencePiece model") from None
    if not model.pieces:
        raise UserError(f"{path}: not a SentencePiece model (no pieces)")
    if model.model_type != 1:
        raise UserError(f"{path}: a SentencePiece {({2: 'BPE', 3: 'word', 4: 'char'}).get(model.model_type, '?')} model; "
                        "llmcli converts Unigram models only")  # fmt: skip
    return model


def unigram_tokenizer(path: Path, vocab: dict[str, int], specials: set[str], *, for_encoding: bool):
    """A tokenizers.Tokenizer segmenting as the .spm at `path` does, with ids from `vocab`.

    for_encoding: pieces of `vocab` that this .spm lacks (the other side's, in a shared
    vocabulary) get names no text can match, so they are never produced, as with
    SentencePiece followed by a vocab lookup. Otherwise names are kept, for decoding.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    spm = read_spm(path)
    scores = {p: s for p, s, kind in spm.pieces if kind in (NORMAL, USER_DEFINED)}
    user_defined = [p for p, _, kind in spm.pieces if kind == USER_DEFINED and p in vocab]
    # Multilingual models' target-language codes (">>fra<<") are whole tokens, as MarianTokenizer treats them
    codes = [p for p in vocab if p.startswith(">>") and p.endswith("<<") and p not in scores]
    keep = specials | set(codes)
    size = max(vocab.values()) + 1
    by_id: list[str | None] = [None] * size
    for piece, i in vocab.items():
        by_id[i] = piece
    table = []
    for i, piece in enumerate(by_id):
        if piece is None or (for_encoding and piece not in scores and piece not in keep):
            # a space never survives normalization, so no text matches this name
            table.append((f"<unused {i}>", _UNREACHABLE))
        else:
            table.append((piece, scores.get(piece, 0.0 if piece in keep else _UNREACHABLE)))
    unk = vocab.get("<unk>")
    tok = Tokenizer(models.Unigram(table, unk_id=unk, byte_fallback=spm.byte_fallback))

    steps = []
    if spm.charsmap:
        steps.append(normalizers.Precompiled(spm.charsmap))
    if spm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if spm.add_dummy_prefix:
        # Metaspace skips the dummy prefix when the text already starts with one; SentencePiece doesn't
        steps.append(normalizers.Replace(Regex(r"\A" + SPACE), SPACE * 2))
    tok.normalizer = normalizers.Sequence(steps)
    pre = []
    if spm.add_dummy_prefix:
        pre.append(pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=False))
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace(SPACE, " ")]
    if spm.byte_fallback:
        steps.append(decoders.ByteFallback())
    if spm.add_dummy_prefix:
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    tok.decoder = decoders.Sequence(steps)

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in sorted(specials) if s in vocab])
    if codes:
        tok.add_tokens([AddedToken(c, special=False, normalized=False) for c in codes])
    return tok
