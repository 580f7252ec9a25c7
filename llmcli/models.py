"""Which model a command runs when `-m` is left out, and the models this machine has.

Without `-m`, a task runs `$LLMCLI_MODEL`, else the default stored for it with
`llmcli models default TASK MODEL` (in $XDG_CONFIG_HOME/llmcli/defaults.json, else
~/.config/llmcli/defaults.json), else, for `translate` only, the demo model that
`llmcli demo` trains. Otherwise one line says how to name a model.

`find_models` lists what `-m` can name here without a download: llmcli model directories in
llmcli's cache (the demo, converted models), the stored defaults, and the Hugging Face cache's
models that llmcli converts. Sizes come from the safetensors headers: no weights are read.

hub, checkpoint and convert (torch) are imported where a model is looked at, so showing or
storing a default is instant.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmcli.errors import UserError
from llmcli.io import atomic_write, cache_root, info

TASKS = ("translate", "summarize", "qa", "generate", "chat")  # the commands that take -m and a task
ENV_VAR = "LLMCLI_MODEL"
DEFAULTS_FILE = "defaults.json"
DEMO_NAME = "demo-en-zh-numbers"  # where `llmcli demo` keeps its corpus and model, under the cache root


def demo_model_dir() -> Path:
    return cache_root() / DEMO_NAME / "model"


def config_dir() -> Path:
    """llmcli's user settings: $XDG_CONFIG_HOME/llmcli, else ~/.config/llmcli."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "llmcli"


def defaults_path() -> Path:
    return config_dir() / DEFAULTS_FILE


# ---------------------------------------------------------------- stored defaults


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return task


def _read_settings() -> dict:
    path = defaults_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # nothing stored (yet)
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    models = settings.get("models", {}) if isinstance(settings, dict) else None
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise UserError(f'{path}: expected {{"models": {{"TASK": "MODEL", ...}}}}; fix or delete it')
    return settings


def stored_defaults() -> dict[str, str]:
    """Task -> model, as `llmcli models default` stored them."""
    return dict(_read_settings().get("models", {}))


def stored_default(task: str) -> str | None:
    return stored_defaults().get(check_task(task))


def store_default(task: str, model: str | None) -> str | None:
    """Store `model` as `task`'s default (None: forget it); returns what was stored.

    A directory is stored as its absolute path, so the default works from any directory; a
    model id must be in the Hugging Face cache (run it once with -m to download it)."""
    check_task(task)
    if model is not None:
        model = _checked_spec(model)
    settings = _read_settings()
    models = settings.setdefault("models", {})
    if model is None:
        models.pop(task, None)
    else:
        models[task] = model
    path = defaults_path()
    try:
        with atomic_write(path) as f:
            f.write(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); set {ENV_VAR} instead") from None
    return model


def _checked_spec(model: str) -> str:
    from llmcli import hub
    from llmcli.checkpoint import ensemble_members, is_model_dir

    path = Path(model).expanduser()
    if path.exists():
        if not (is_model_dir(path) or ensemble_members(path) or hub.find_hf_model(str(path)) is not None):
            raise UserError(f"{model}: not a model directory (config.json and model.safetensors, or ensemble.json)")
        return str(path.resolve())
    if hub.looks_like_model_id(model) and hub.find_in_cache(model) is not None:
        return model
    raise UserError(
        f"{model}: no such model directory, and not in the Hugging Face cache ({hub.hf_cache()}); "
        "run it once with -m to download it"
    )


# ---------------------------------------------------------------- -m left out


def model_for(task: str | None, given: str | None = None) -> str:
    """What `-m` names for `task` (None: a command that runs any model, as `info`): `given`,
    else $LLMCLI_MODEL, else the stored default, else (translate only) the demo model."""
    if given:
        return given
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    listed = "`llmcli models` lists the models here"
    if task is None:
        raise UserError(f"no model given: pass -m MODEL or set {ENV_VAR}; {listed}")
    how = f"pass -m MODEL, set {ENV_VAR}, or run `llmcli models default {task} MODEL`; {listed}"
    stored = stored_default(task)
    if stored is not None:
        if os.path.isabs(stored) and not os.path.exists(stored):
            raise UserError(f"the default model for {task}, {stored}, is gone; {how}")
        return stored
    if task == "translate":
        from llmcli.checkpoint import is_model_dir

        demo = demo_model_dir()
        if not is_model_dir(demo):
            raise UserError(f"no model given, and the demo model is not trained yet: run `llmcli demo`, or {how}")
        info("llmcli: using the demo model (English number words -> Chinese numerals); "
             "pass -m MODEL or set a default with `llmcli models default translate MODEL`")  # fmt: skip
        return str(demo)
    raise UserError(f"no model given for {task}: {how}")


# ---------------------------------------------------------------- what is on this machine


@dataclass
class FoundModel:
    model: str  # what -m takes: a path, or a Hugging Face id
    kind: str  # demo | converted | cache | default | hf-cache
    architecture: str | None
    task: str | None  # what it was trained or published for, when known
    tasks: list[str] = field(default_factory=list)  # every task its architecture runs
    parameters: int | None = None
    default_for: list[str] = field(default_factory=list)
    path: Path | None = None
    members: int = 1  # an ensemble directory's models, decoded together

    def to_dict(self) -> dict:
        return {"model": self.model, "kind": self.kind, "architecture": self.architecture, "task": self.task,
                "tasks": self.tasks, "parameters": self.parameters, "default_for": self.default_for,
                "path": str(self.path) if self.path else None, "members": self.members}  # fmt: skip


def find_models(tasks_by_architecture: Mapping[str, Sequence[str]]) -> list[FoundModel]:
    """The models -m can name here without a download. tasks_by_architecture is
    llmcli.tasks.TASKS_BY_ARCHITECTURE (tasks.py sits above this module)."""
    defaults = stored_defaults()
    found = [*_llmcli_dirs(), *_default_dirs(defaults), *_hf_cache_models()]
    seen: set[str] = set()
    result = []
    for entry in found:
        if entry.model in seen:
            continue
        seen.add(entry.model)
        runs = list(tasks_by_architecture.get(entry.architecture, ()))
        entry.tasks = [entry.task] + [t for t in runs if t != entry.task] if entry.task in runs else runs
        entry.default_for = [task for task, spec in defaults.items() if spec == entry.model]
        result.append(entry)
    return result


def _llmcli_dirs() -> Iterator[FoundModel]:
    root = cache_root()
    for path in sorted(_model_dirs(root, depth=3)):
        if path == demo_model_dir():
            kind = "demo"
        elif path.parent == root / "converted":
            kind = "converted"
        else:
            kind = "cache"
        entry = _describe_llmcli_dir(path, kind)
        if entry is not None:
            yield entry


def _model_dirs(folder: Path, depth: int) -> Iterator[Path]:
    """Model directories under `folder`, not looking inside one (its train_state/, checkpoints/)."""
    from llmcli.checkpoint import is_model_dir

    try:
        children = [c for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:
        return
    for child in children:
        if is_model_dir(child):
            yield child
        elif depth > 1:
            yield from _model_dirs(child, depth - 1)


def _default_dirs(defaults: dict[str, str]) -> Iterator[FoundModel]:
    from llmcli.checkpoint import ensemble_members, is_model_dir

    for spec in dict.fromkeys(defaults.values()):
        path = Path(spec)
        if not path.is_absolute():
            continue
        if is_model_dir(path):
            entry = _describe_llmcli_dir(path, "default")
        else:
            try:
                members = ensemble_members(path)
            except UserError:  # a broken ensemble.json: using it says so
                members = None
            entry = _describe_ensemble(path, members) if members else None
        if entry is not None:
            yield entry


def _describe_ensemble(path: Path, members: list[Path]) -> FoundModel | None:
    """An ensemble directory as its first member, with every member's parameters."""
    from llmcli.checkpoint import WEIGHTS_FILE

    first = _describe_llmcli_dir(members[0], "default")
    if first is None:
        return None
    counts = [first.parameters] + [_count_parameters([m / WEIGHTS_FILE]) for m in members[1:]]
    first.model, first.path, first.members = str(path), path, len(members)
    first.parameters = sum(counts) if None not in counts else None
    return first


def _describe_llmcli_dir(path: Path, kind: str) -> FoundModel | None:
    from llmcli.checkpoint import CONFIG_FILE, GENERATION_FILE, WEIGHTS_FILE

    config = _read_json(path / CONFIG_FILE)
    if config is None or "model_type" in config:  # not ours: a Hugging Face directory
        return None
    generation = _read_json(path / GENERATION_FILE) or {}
    return FoundModel(str(path), kind, config.get("architecture"), generation.get("task"),
                      parameters=_count_parameters([path / WEIGHTS_FILE]), path=path)  # fmt: skip


def _hf_cache_models() -> Iterator[FoundModel]:
    from llmcli import hub
    from llmcli.convert import family_of

    cache = hub.hf_cache()
    try:
        repos = sorted(p.name for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError:
        return
    for repo in repos:
        model_id = repo.removeprefix("models--").replace("--", "/")
        snapshot = hub.find_in_cache(model_id)
        hf = _read_json(snapshot / "config.json") if snapshot is not None else None
        if hf is None:
            continue
        try:
            family = family_of(hf, model_id)
        except UserError:  # an architecture llmcli does not convert
            continue
        weights = sorted(snapshot.glob("*.safetensors"))
        yield FoundModel(model_id, "hf-cache", _hf_architecture(hf, family), getattr(family, "TASK", None),
                         parameters=_count_parameters(weights) if weights else None, path=snapshot)  # fmt: skip


def _hf_architecture(hf: dict, family) -> str:
    # The converted config says for sure, but deciding it reads the weights (tied or not);
    # transformers stores is_encoder_decoder, and the one encoder-only family is extractive qa.
    if hf.get("is_encoder_decoder"):
        return "encoder-decoder"
    return "encoder-only" if getattr(family, "TASK", None) == "qa" else "decoder-only"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _count_parameters(files: list[Path]) -> int | None:
    """The values in safetensors files, from their headers: an 8-byte length, then JSON naming
    each tensor's shape (https://github.com/huggingface/safetensors#format)."""
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100_000_000:
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 100 * scale else 0}f}{unit}"
    return str(n)


__all__ = ["TASKS", "FoundModel", "find_models", "model_for", "store_default", "stored_default", "stored_defaults"]
