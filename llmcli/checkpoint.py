"""Model directories: config.json + model.safetensors + tokenizer.json (+ generation.json).

Every file is written atomically (temporary file, then rename), so a crash leaves the
previous file or the new one. Loading checks everything and fails with one line naming
the problem. Nothing is ever unpickled: weights are safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.io import atomic_write, default_file_mode
from llmcli.model import Transformer
from llmcli.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"  # the shared tokenizer, or the target side's
SOURCE_TOKENIZER_FILE = "source_tokenizer.json"  # only when source and target vocabularies differ
GENERATION_FILE = "generation.json"  # the task and decoding defaults
# An ensemble directory holds this instead of a model: {"members": ["members/1", ...]}, each a model
# directory inside it, decoded together (llmcli.ensemble).
ENSEMBLE_FILE = "ensemble.json"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer  # target side (or the only one)
    source_tokenizer: Tokenizer  # the same object when the vocabulary is shared
    generation: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (each tied tensor once, under its first name) and persistent buffers."""
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    persistent = model.state_dict(keep_vars=True)
    for name, b in model.named_buffers():
        if name in persistent:
            tensors[name] = b.detach()
    return tensors


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:
            raise _write_error(e, path) from None
        os.chmod(tmp, default_file_mode())  # after: safetensors 0.8 writes a file of its own (0o600) and renames it onto tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_error(e: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write (a full disk, RLIMIT_FSIZE) as its own error, the errno
    only in the text: give callers the OSError it is."""
    code = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) if code else e


def _describe_foreign(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "it looks like a PyTorch pickle; llmcli never unpickles model files (convert it with `llmcli convert`)"
    return "not a safetensors file"


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, mapped from it (safe_open): pages are read when used,
    so reading costs no memory until the tensors are."""
    f = open_weights(path)
    try:
        return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _read_error(e, path) from None


def open_weights(path: Path):
    """The safe_open handle of a safetensors file (its header read and checked, its data mapped,
    nothing read yet), or a UserError saying what the file is instead."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _read_error(e, path) from None


def _read_error(e: Exception, path: Path) -> UserError:
    size = path.stat().st_size
    if size < 8:
        return UserError(f"{path}: truncated ({size} bytes)")
    detail = _describe_foreign(path)
    if detail == "not a safetensors file":
        detail = f"corrupt or truncated safetensors ({str(e).splitlines()[0]})"
    return UserError(f"{path}: {detail}")


def mean_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several weight files of one model, summed in float64 (so the mean
    of copies of one file is that file exactly) and given back in each tensor's own dtype; integer
    tensors must be equal in all of them."""
    sums: dict[str, torch.Tensor] = {}
    exact: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        tensors = load_weights(path)
        if dtypes and set(tensors) != set(dtypes):
            raise UserError(f"{path}: holds other tensors than {paths[0]}")
        for name, t in tensors.items():
            dtypes.setdefault(name, t.dtype)
            if t.is_floating_point():
                sums[name] = sums[name] + t.double() if name in sums else t.double()
            elif name not in exact:
                exact[name] = t
            elif not torch.equal(exact[name], t):
                raise UserError(f"{path}: {name} differs from {paths[0]}'s and cannot be averaged")
    return {**{name: (s / len(paths)).to(dtypes[name]) for name, s in sums.items()}, **exact}


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Fill every parameter and persistent buffer, or fail once naming every mismatch.

    A tensor of the parameter's dtype and device becomes its data, not a copy: tensors read
    with safe_open map the file, so a loaded model holds one copy of its weights (the file's
    pages), not the file's and its own (bench/memory.py). The Parameter objects stay, so ties
    (lm_head = embeddings) and optimizers holding them are kept."""
    check_fit({n: t.shape for n, t in model_tensors(model).items()}, {n: t.shape for n, t in tensors.items()}, source)
    persistent = model.state_dict(keep_vars=True)
    taken: set[int] = set()  # data pointers already given to a parameter: two must not alias
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied parameter once, under its first name
            t = tensors[name]
            if (
                t.dtype == p.dtype
                and t.device == p.device
                and t.layout == p.layout
                and t.is_contiguous()
                and t.data_ptr() not in taken
            ):
                taken.add(t.data_ptr())
                p.data = t.detach()
            else:
                p.copy_(t)
        for name, b in model.named_buffers():
            if name in persistent:
                b.copy_(tensors[name])


def check_fit(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Fail once naming every missing, unexpected and misshapen tensor (shapes by name)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [
        f"{n} {tuple(found[n])} != {tuple(expected[n])}"
        for n in sorted(set(expected) & set(found))
        if tuple(found[n]) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {name_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch {name_list(wrong_shape)}")
    if problems:
        raise UserError(f"{source}: weights do not fit the config: {'; '.join(problems)}")


def name_list(items: list[str], limit: int = 4) -> str:
    """The first `limit` items and how many more: "a, b, c, d and 3 more"."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def save_model(
    directory: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    source_tokenizer: Tokenizer | None = None,
    generation: dict | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / CONFIG_FILE) as f:
        f.write(model.cfg.to_json())
    tokenizer.save(directory / TOKENIZER_FILE)
    if source_tokenizer is not None and source_tokenizer is not tokenizer:
        source_tokenizer.save(directory / SOURCE_TOKENIZER_FILE)
    elif (directory / SOURCE_TOKENIZER_FILE).exists():
        (directory / SOURCE_TOKENIZER_FILE).unlink()
    if generation is not None:
        with atomic_write(directory / GENERATION_FILE) as f:
            f.write(json.dumps(generation, indent=2, ensure_ascii=False) + "\n")
    # One metadata key: safetensors writes a dict's keys in no fixed order, and the same
    # weights must give the same bytes (resume is checked byte for byte).
    save_weights(directory / WEIGHTS_FILE, model_tensors(model), metadata={"format": "pt"})
    return directory


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def ensemble_members(directory: str | Path) -> list[Path] | None:
    """The model directories an ensemble directory lists, in order; None where `directory` is not one."""
    directory = Path(directory)
    path = directory / ENSEMBLE_FILE
    if not path.is_file() or (directory / CONFIG_FILE).exists():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["members"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f'{path}: not an llmcli ensemble file ({{"members": ["members/1", ...]}})') from None
    root = directory.resolve()
    members = [directory / name for name in names]
    for member in members:
        if not member.resolve().is_relative_to(root):
            raise UserError(f"{path}: member {member} is outside the ensemble directory")
    return members


def write_ensemble(directory: str | Path, members: list[str]) -> None:
    """Name `members` (paths relative to `directory`) as the ensemble `directory` is."""
    with atomic_write(Path(directory) / ENSEMBLE_FILE) as f:
        f.write(json.dumps({"members": members}, indent=2) + "\n")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """An llmcli model directory (hub.resolve turns what `-m` names into one)."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: no such model directory")
    if (members := ensemble_members(directory)) is not None:
        raise UserError(f"{directory} is an ensemble of {len(members)} models ({ENSEMBLE_FILE}): translate, summarize "
                        f"and qa decode it whole; for this command name one of them, as {members[0]}")  # fmt: skip
    if not directory.is_dir():
        raise UserError(f"{directory}: a model is a directory (config.json, model.safetensors, tokenizer.json), not a file")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            hint = ""
            if name == WEIGHTS_FILE and (directory / "pytorch_model.bin").exists():
                hint = " (it has pytorch_model.bin: convert it with `llmcli convert`)"
            raise UserError(f"{directory}: missing {name}{hint}")
    _check_inside(directory)
    cfg = ModelConfig.load(directory / CONFIG_FILE)
    generation = _read_generation(directory)
    source_tokenizer, tokenizer = load_tokenizers(directory, generation)
    if tokenizer.vocab_size > cfg.output_vocab_size:
        raise UserError(
            f"{directory}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's output vocabulary is {cfg.output_vocab_size}"
        )
    if source_tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"{directory}: the source tokenizer has {source_tokenizer.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}"
        )
    tensors = load_weights(directory / WEIGHTS_FILE)
    if cfg.n_parameters > sum(t.numel() for t in tensors.values()):
        # It cannot load, and a config can ask for anything: name what does not fit from a model
        # on the meta device, which allocates nothing.
        with torch.device("meta"):
            expected = {n: t.shape for n, t in model_tensors(Transformer(cfg)).items()}
        check_fit(expected, {n: t.shape for n, t in tensors.items()}, str(directory / WEIGHTS_FILE))
    model = build_for_loading(cfg, device)
    load_state_into(model, tensors, str(directory / WEIGHTS_FILE))
    del tensors  # what the model did not take (another dtype or device) is freed now
    model.eval()
    return LoadedModel(model, tokenizer, source_tokenizer, generation, directory)


def _check_inside(directory: Path) -> None:
    """Every file a model directory is read through stays inside it: a link to elsewhere could
    make loading a model read any file on the machine."""
    root = directory.resolve()
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, SOURCE_TOKENIZER_FILE, GENERATION_FILE):
        path = directory / name
        if path.exists() and not path.resolve().is_relative_to(root):
            raise UserError(f"{directory}: {name} points outside the model directory, to {path.resolve()}")


def load_tokenizers(directory: str | Path, generation: dict | None = None) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) of a model directory: the same object when the vocabulary is shared.

    generation is the directory's generation.json when the caller has read it already.
    """
    directory = Path(directory)
    if generation is None:
        generation = _read_generation(directory)
    names = generation.get("special_tokens") or {}  # a converted model's own token names
    target = Tokenizer.load(directory / TOKENIZER_FILE, **names)
    if (directory / SOURCE_TOKENIZER_FILE).is_file():
        return Tokenizer.load(directory / SOURCE_TOKENIZER_FILE, **names), target
    return target, target


def _read_generation(directory: Path) -> dict:
    generation = {}
    if (directory / GENERATION_FILE).is_file():
        try:
            generation = json.loads((directory / GENERATION_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{directory / GENERATION_FILE}: not valid JSON ({e})") from None
        if not isinstance(generation, dict):
            raise UserError(f"{directory / GENERATION_FILE}: expected a JSON object")
    return generation


def build_for_loading(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """A model whose parameters are left uninitialised, to be filled by a checkpoint: random
    initialisation costs more than the loading it precedes (1.3 s of 1.7 s for GPT-2 124M).
    (Not the meta device: its first use imports torch's reference ops, over a second.)"""
    with skip_init():
        model = Transformer(cfg)
    return model.to(device)


@contextlib.contextmanager
def skip_init():
    """While it is held, in this thread only (torch function modes are per thread), modules
    being built skip the random initialisation of their parameters: `torch.nn.init` functions
    and in-place fills of an `nn.Parameter` return it untouched. Buffers are made as usual."""
    with _SkipParameterInit():
        yield


class _SkipParameterInit(TorchFunctionMode):
    _FILLS = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.fill_, torch.Tensor.zero_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
        if isinstance(target, nn.Parameter) and (func in self._FILLS or getattr(func, "__module__", None) == "torch.nn.init"):
            return target
        return func(*args, **kwargs)
