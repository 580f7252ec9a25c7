"""What the family modules share: transforms, readers of Hugging Face files, the one loop
that applies a weight map, and the config, token and generation helpers.

Weights come from safetensors, or from `pytorch_model.bin` through
`torch.load(weights_only=True)`, which refuses pickles that would run code. Safetensors shards
are read one tensor at a time (`Shards`), so converting holds one copy of the weights, not two
(bench/memory.py).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from llmcli.checkpoint import name_list, open_weights
from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.io import read_text, warn
from llmcli.tokenizer import Tokenizer

Transform = Callable[[Tensor], Tensor | Sequence[Tensor]]
Target = str | None | tuple[str | tuple[str, ...], Transform]


# ---------------------------------------------------------------- transforms


def transpose(t: Tensor) -> Tensor:
    return t.t().contiguous()


def split(n: int, then: Transform | None = None) -> Transform:
    """Cut a fused tensor (GPT-2's c_attn: q, k, v) into n equal parts along its output dimension."""

    def cut(t: Tensor) -> list[Tensor]:
        t = then(t) if then is not None else t
        if t.shape[0] % n:
            return [t]  # shape check below names it
        return [part.contiguous() for part in t.chunk(n, dim=0)]

    return cut


# ---------------------------------------------------------------- reading their files


def read_hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src}: not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object")
    return hf


def read_generation_config(src: Path, hf: dict) -> dict:
    """generation_config.json over the generation keys older models keep in config.json."""
    keys = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
            "forced_eos_token_id", "bad_words_ids", "suppress_tokens", "num_beams", "length_penalty", "max_length",
            "min_length", "no_repeat_ngram_size", "early_stopping")  # fmt: skip
    gen = {k: hf[k] for k in keys if hf.get(k) is not None}
    path = src / "generation_config.json"
    if path.is_file():
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        gen.update({k: v for k, v in data.items() if k in keys and v is not None})
        # Sampling defaults are read from generation_config.json only: old config.json files carry
        # every default of their day (do_sample false, temperature 1), not choices of the model
        gen.update({k: data[k] for k in _SAMPLING_KEYS if data.get(k) is not None})
    return gen


_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


_REFUSED = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "consolidated.00.pth", "model.onnx")


def read_weights(src: Path) -> Mapping[str, Tensor]:
    """All tensors of the checkpoint by name, from safetensors (single or sharded: `Shards`, read
    when asked for) or a weights-only pickle (mapped)."""
    files: list[Path]
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (src / single).is_file():
            files = [src / single]
            break
        if (src / index).is_file():
            try:
                weight_map = json.loads(read_text(src / index))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{src / index}: not a shard index (no weight_map)") from None
            files = [src / name for name in sorted(set(weight_map.values()))]
            break
    else:
        found = [name for name in _REFUSED if (src / name).exists()]
        what = f" (it has {', '.join(found)})" if found else ""
        raise UserError(f"{src}: no model.safetensors or pytorch_model.bin{what}; llmcli reads only those")
    if all(path.suffix == ".safetensors" for path in files):
        return Shards(files)
    tensors: dict[str, Tensor] = {}
    for path in files:
        tensors.update(_load_pickle(path))
    return {_legacy_name(name): t for name, t in tensors.items()}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip


class Shards(Mapping[str, Tensor]):
    """The tensors of safetensors shards by name, none read until asked for.

    `mapped(name)` is a view of the shard's safe_open mapping; `shards[name]` maps the tensor's
    bytes alone, privately (a write stays in memory), and unmaps them when dropped. A safe_open
    mapping keeps every page once read until all its tensors are gone: a source transposed, split
    or cast and then dropped would stay resident beside its copy, a second full copy of those
    weights. (Nor is it read into malloc'd memory: glibc keeps freed blocks of a few MB, 0.2x of
    GPT-2's weights over a conversion, bench/memory.py.) So what goes into the model as it is
    stays in the shard's mapping; the rest is mapped one tensor at a time."""

    def __init__(self, files: Sequence[Path]):
        self._where: dict[str, tuple[int, str]] = {}  # our name -> (shard, its name there)
        self._files = list(files)
        self._handles = [open_weights(path) for path in self._files]  # headers checked, nothing read
        self._headers: list[tuple[int, dict] | None] = [None] * len(self._files)
        for i, handle in enumerate(self._handles):
            for name in handle.keys():
                self._where[_legacy_name(name)] = (i, name)

    def __getitem__(self, name: str) -> Tensor:
        i, theirs = self._where[name]
        start, header = self._header(i)
        info = header.get(theirs) or {}
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:  # a dtype not listed here: copy it out of the shard's mapping
            return self.mapped(name).clone()
        begin, end = (start + offset for offset in info["data_offsets"])
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        base = begin - begin % mmap.ALLOCATIONGRANULARITY
        with open(self._files[i], "rb") as f:
            region = mmap.mmap(f.fileno(), end - base, offset=base, access=mmap.ACCESS_COPY)
        # the tensor holds the mapping: unmapped when the last view of it goes
        flat = torch.frombuffer(region, dtype=dtype, offset=begin - base, count=math.prod(info["shape"]))
        return flat.reshape(info["shape"])

    def mapped(self, name: str) -> Tensor:
        i, theirs = self._where[name]
        return self._handles[i].get_tensor(theirs)

    def _header(self, i: int) -> tuple[int, dict]:
        """Where shard i's data starts, and its header (safe_open has checked both)."""
        if self._headers[i] is None:
            with open(self._files[i], "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._headers[i] = (8 + size, json.loads(f.read(size)))
        return self._headers[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def _load_pickle(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        # weights_only: the unpickler accepts tensors and plain containers, never arbitrary callables
        with warnings.catch_warnings():  # its note on pickle protocols is noise beside the verdict
            warnings.simplefilter("ignore")
            try:  # mapped, as safetensors are: the model takes these tensors without a copy
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused: not a plain tensor checkpoint ({reason[:160]})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise UserError(f"{path}: refused: expected a flat dict of tensors")
    return data


def _legacy_name(name: str) -> str:
    # Old TF-ported checkpoints (BERT) call LayerNorm's weight and bias gamma and beta.
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


# ---------------------------------------------------------------- the one loop


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def apply_map(
    tensors: Mapping[str, Tensor], weight_map: dict[str, Target], expected: dict[str, Tensor], source: str
) -> dict[str, Tensor]:
    """Our tensors from theirs by `weight_map`; fails once listing every unmatched, unfilled or
    misshapen name. Several of theirs may fill one of ours (tied copies) if they are equal.

    One of theirs at a time, so no second copy of the weights builds up: from `Shards`, a tensor
    that goes in as it is stays a view of the file; one that is transformed, cast or only
    compared is read and dropped once its parts are written into `expected` (the model's own
    tensors, as `checkpoint.model_tensors` gives them; what the returned dict then holds)."""
    mapped = getattr(tensors, "mapped", tensors.__getitem__)
    rules = [(_pattern(src), src, target) for src, target in weight_map.items()]
    exact = {src: target for src, target in weight_map.items() if "{}" not in src}
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected, conflicts = [], []
    for name in tensors:  # names only: each tensor is read below, when its target is known
        if name in exact:
            target, numbers = exact[name], ()
        else:
            for regex, _, target in rules:  # noqa: B007  (target is used after the break)
                if m := regex.match(name):
                    numbers = m.groups()
                    break
            else:
                unexpected.append(name)
                continue
        if target is None:
            continue
        names, transform = (target, None) if isinstance(target, str) else target
        names = (names,) if isinstance(names, str) else names
        if transform is not None:
            tensor = tensors[name]
            parts = transform(tensor)
        else:
            tensor, ours = mapped(name), names[0].format(*numbers)
            if ours in out or (ours in expected and expected[ours].dtype != tensor.dtype):
                tensor = tensors[name]  # compared or cast, then dropped: not through the mapping
            parts = tensor
        parts = [parts] if isinstance(parts, Tensor) else list(parts)
        if len(parts) != len(names):
            conflicts.append(f"{name} {tuple(tensor.shape)} cannot be split into {len(names)}")
            continue
        del tensor
        for ours, part in zip(names, parts, strict=True):  # lengths checked above
            ours = ours.format(*numbers)
            if ours in out:
                if out[ours].shape != part.shape or not torch.equal(out[ours], part.to(out[ours].dtype)):
                    conflicts.append(f"{name} differs from {origin[ours]}")
                continue
            want = expected.get(ours)
            if want is not None and want.shape == part.shape and (transform is not None or part.dtype != want.dtype):
                want.copy_(part)  # into the model's own tensor, cast on the way: no new one is kept
                part = want
            out[ours], origin[ours] = part, name
        if transform is not None:
            parts = part = None  # the transform's outputs, freed: before the next is made
            release_freed_memory()

    missing = [_their_name(ours, weight_map) for ours in expected if ours not in out]
    unexpected += [f"{origin[ours]} (no {ours} in this config)" for ours in out if ours not in expected]
    wrong = [f"{origin[n]} {tuple(out[n].shape)} != {tuple(expected[n].shape)}"
             for n in expected if n in out and out[n].shape != expected[n].shape]  # fmt: skip
    problems = [f"{label} {name_list(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong), ("conflicting", conflicts)) if items]  # fmt: skip
    if problems:
        raise UserError(f"{source}: cannot convert: {'; '.join(problems)}")
    return {n: out[n] for n in expected}


def release_freed_memory() -> None:
    """Give the pages of freed memory back to the system now. glibc keeps freed blocks of a few
    MB (a transform's output, freed once copied into the model) as holes in its heap, pinned by
    small objects allocated since, and RSS keeps them: 0.2-0.4x of GPT-2's weights over a
    conversion (bench/memory.py). Nothing elsewhere (no malloc_trim outside glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the symbols the process has loaded
    except (OSError, TypeError):  # Windows: no CDLL(None)
        return None


def _their_name(ours: str, weight_map: dict[str, Target]) -> str:
    """The source name that would have filled `ours` (the first, when several could)."""
    for src, target in weight_map.items():
        if target is None:
            continue
        names = target if isinstance(target, str) else target[0]
        for candidate in (names,) if isinstance(names, str) else names:
            if m := _pattern(candidate).match(ours):
                return src.format(*m.groups())
    return ours


def optional_prefix(prefix: str, weight_map: dict[str, Target]) -> dict[str, Target]:
    """The same map, also matching names without `prefix` (GPT-2's hub files have no "transformer.")."""
    both = dict(weight_map)
    both.update({k.removeprefix(prefix): v for k, v in weight_map.items() if k.startswith(prefix)})
    return both


def is_tied(tensors: dict[str, Tensor], head: str, embedding: str) -> bool:
    """Tied unless the checkpoint has its own, different output matrix (as transformers 5 decides)."""
    if head not in tensors or embedding not in tensors:
        return True
    a, b = tensors[head], tensors[embedding]
    return a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------- config helpers for the families

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu"}  # fmt: skip


def activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: activation {name!r} is not supported; llmcli runs {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def require(hf: dict, where: str, **supported) -> None:
    """Refuse config values we cannot run, e.g. require(hf, src, add_cross_attention=False)."""
    for key, value in supported.items():
        if key in hf and hf[key] is not None and hf[key] != value:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported (llmcli runs {key}={value!r})")


def same(hf: dict, where: str, *keys: str):
    """One value for keys llmcli keeps once (encoder and decoder heads, FFN sizes)."""
    values = {hf[k] for k in keys if hf.get(k) is not None}
    if len(values) > 1:
        raise UserError(f"{where}: {' and '.join(f'{k}={hf[k]}' for k in keys)} differ; llmcli needs one value")
    return values.pop() if values else None


# ---------------------------------------------------------------- special tokens and generation settings


def token_ids(hf: dict, gen: dict) -> dict[str, int | None]:
    """pad, bos, eos and decoder start ids; HF's fallbacks: pad = eos, start = bos."""

    def first(value):
        return value[0] if isinstance(value, list) and value else value

    eos = first(gen.get("eos_token_id", hf.get("eos_token_id")))
    bos = first(gen.get("bos_token_id", hf.get("bos_token_id")))
    pad = first(gen.get("pad_token_id", hf.get("pad_token_id")))
    start = gen.get("decoder_start_token_id", hf.get("decoder_start_token_id"))
    # Several end ids (a list): the first is the config's eos; all stop decoding (generation.json stop_ids).
    if eos is None:
        raise UserError("the model has no end-of-text token (eos_token_id in config.json or generation_config.json): "
                        "llmcli needs one to know where an output ends")  # fmt: skip
    pad = eos if pad is None else pad
    if bos is None:  # T5, Marian: no start-of-text token; the decoder start stands in
        bos = start if start is not None else eos
    return {"pad": pad, "bos": bos, "eos": eos, "start": start}


def generation_settings(gen: dict, cfg: ModelConfig) -> dict:
    """Their generation settings in llmcli's terms (generation.json)."""
    out: dict = {}
    if gen.get("forced_bos_token_id") is not None and cfg.is_encoder_decoder:
        out["forced_bos_id"] = gen["forced_bos_token_id"]
    if gen.get("forced_eos_token_id") is not None:
        forced = gen["forced_eos_token_id"]
        out["forced_eos_id"] = forced[0] if isinstance(forced, list) else forced
    suppress = list(gen.get("suppress_tokens") or [])
    for words in gen.get("bad_words_ids") or []:
        if len(words) == 1 and words[0] != cfg.eos_id:  # HF drops the eos from bad words
            suppress.append(words[0])
        elif len(words) > 1:
            warn(f"bad word sequence {words} ignored: llmcli bans single tokens only")
    out["suppress_tokens"] = sorted(set(suppress))  # the complete list: nothing else is banned
    decode = {}
    names = {"num_beams": "beam_size", "length_penalty": "length_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
             "early_stopping": "early_stopping"}  # fmt: skip
    for theirs, ours in names.items():
        if gen.get(theirs) is not None:
            decode[ours] = gen[theirs]
    if cfg.is_encoder_decoder:  # HF's lengths count the decoder start token
        if gen.get("max_length") is not None:
            decode["max_len"] = max(1, gen["max_length"] - 1)
        if gen.get("min_length"):
            decode["min_len"] = max(0, gen["min_length"] - 1)
    if cfg.architecture == "decoder-only":
        decode.update(_sampling_settings(gen))
    if decode:
        out["decode"] = decode
    return out


def _sampling_settings(gen: dict) -> dict:
    """do_sample, temperature, top_k, top_p, repetition_penalty of generation_config.json, as
    DecodeSettings fields; a value llmcli would refuse is left out, with a warning."""
    out: dict = {}
    if isinstance(gen.get("do_sample"), bool):
        out["sample"] = gen["do_sample"]
    checks = {"temperature": lambda v: v > 0, "top_k": lambda v: isinstance(v, int) and v >= 0,
              "top_p": lambda v: 0 < v <= 1, "repetition_penalty": lambda v: v > 0}  # fmt: skip
    for key, ok in checks.items():
        value = gen.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value):
            out[key] = value
        else:
            warn(f"generation_config.json: {key}={value!r} ignored (llmcli cannot sample with it)")
    return out


# ---------------------------------------------------------------- chat templates


_CHAT_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def chat_settings(src: Path, tok, gen: dict, cfg: ModelConfig) -> dict:
    """A decoder-only model's chat template and what it needs, for generation.json:
    "chat_template" (the Jinja source, as transformers' `get_chat_template` picks it: the
    chat_template.jinja file over tokenizer_config.json's "chat_template", a named list's
    "default"), "chat_tokens" (the special token strings a template reads, bos_token...) and
    "stop_ids" (every id that ends a reply: generation_config's eos_token_id, one or a list,
    and the tokenizer's eos). Empty when the model has no template. `tok` is the
    tokenizers.Tokenizer of the model."""
    config = _read_json_object(src / "tokenizer_config.json")
    source = _chat_template_source(src, config)
    if source is None:
        return {}
    tokens = {}
    legacy = _read_json_object(src / "special_tokens_map.json")
    for role in _CHAT_TOKEN_ROLES:
        value = config.get(role, legacy.get(role))
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            tokens[role] = value
    eos = gen.get("eos_token_id")
    stops = [cfg.eos_id] + (eos if isinstance(eos, list) else [eos])
    if "eos_token" in tokens:
        stops.append(tok.token_to_id(tokens["eos_token"]))
    stops = [i for i in dict.fromkeys(stops) if isinstance(i, int) and 0 <= i < cfg.output_vocab_size]
    return {"chat_template": source, "chat_tokens": tokens, "stop_ids": stops}


def _chat_template_source(src: Path, config: dict) -> str | None:
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja)
    template = config.get("chat_template")
    if template is None and (src / "chat_template.json").is_file():  # processors' older file
        template = _read_json_object(src / "chat_template.json").get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        names = ", ".join(map(str, named))
        raise UserError(f"{src}: the model's chat templates ({names}) include no 'default'")
    raise UserError(f"{src / 'tokenizer_config.json'}: chat_template is neither a string nor a list of named templates")


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def special_names(tok, ids: dict[str, int | None], source: str) -> dict[str, str | None]:
    """The names of the pad, bos, eos and unk tokens of a tokenizers.Tokenizer, by id."""
    names: dict[str, str | None] = {}
    for role in ("pad", "bos", "eos"):
        name = tok.id_to_token(ids[role]) if ids[role] is not None else None
        if name is None:
            raise UserError(f"{source}: the tokenizer has no {role} token with id {ids[role]}")
        names[role] = name
    model = json.loads(tok.to_str()).get("model") or {}
    unk = model.get("unk_token")
    if unk is None and model.get("unk_id") is not None:
        unk = tok.id_to_token(model["unk_id"])
    names["unk"] = unk if unk is not None and tok.token_to_id(unk) is not None else None
    return names


def template(tok) -> tuple[list[int], list[int]]:
    """What the tokenizer's post-processor puts around one text (BART: <s> ... </s>; T5: ... </s>)."""
    for probe in ("a", "hello", "1"):
        plain = tok.encode(probe, add_special_tokens=False).ids
        full = tok.encode(probe, add_special_tokens=True).ids
        if not plain:
            continue
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :]
    return [], []


def hf_tokenizer(src: Path, names_by_id: dict[str, int | None]) -> tuple[Tokenizer, Tokenizer, dict]:
    import tokenizers

    path = src / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{src}: no tokenizer.json (llmcli reads a tokenizer.json; save one with a fast tokenizer)")
    try:
        hf_tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust parser raises plain Exception
        raise UserError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    names = special_names(hf_tok, names_by_id, str(path))
    prefix, suffix = template(hf_tok)
    tok = Tokenizer.from_hf(hf_tok, **names, source=str(path))
    return tok, tok, {"special_tokens": names, "prefix": prefix, "suffix": suffix}
