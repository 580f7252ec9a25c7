"""What `-m` names, resolved to an llmcli model directory for `checkpoint.load_model`: an
llmcli model directory, a Hugging Face model directory, or a Hugging Face model id
("Helsinki-NLP/opus-mt-en-de") found in the local Hugging Face cache.

Model ids resolve through the standard cache layout ($HF_HUB_CACHE, else $HF_HOME/hub,
else ~/.cache/huggingface/hub: models--org--name/snapshots/<revision>/, refs/main naming
the revision), with `huggingface_hub` when it is installed and by hand otherwise. An id
that is not cached is downloaded with `huggingface_hub`, unless HF_HUB_OFFLINE is set or
the network is unreachable, in which case one line says so.

A foreign model is converted once into llmcli's cache (converted/ under $LLMCLI_CACHE,
else $XDG_CACHE_HOME/llmcli, else ~/.cache/llmcli), keyed by its files' names, sizes and
times, and loaded from there afterwards; where that cache cannot be written, it is
converted each time, into a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from llmcli.checkpoint import is_model_dir
from llmcli.convert import VERSION, convert, is_hf_dir, save
from llmcli.errors import UserError
from llmcli.io import cache_root, info, user_cache, warn

# What a conversion reads; downloads fetch these only.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.spm", "*.model", "*.txt"]
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def hf_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or user_cache() / "huggingface") / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_model_id(spec: str) -> bool:
    return bool(_MODEL_ID.fullmatch(spec)) and ".." not in spec and "--" not in spec


def resolve(spec: str) -> Path:
    """The llmcli model directory `spec` names: itself, or the Hugging Face model it names,
    converted into llmcli's cache. What is wrong with a directory, `load_model` says."""
    src = find_hf_model(spec)
    return Path(spec) if src is None else converted(src)


def find_hf_model(spec: str) -> Path | None:
    """The Hugging Face model directory `spec` names, or None when it names none (an llmcli
    directory, or nothing: the caller reports that)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path if path.is_dir() and is_hf_dir(path) else None
    if not looks_like_model_id(spec):
        return None
    cached = find_in_cache(spec)
    if cached is not None:
        return cached
    return download(spec)


def find_in_cache(model_id: str, revision: str = "main") -> Path | None:
    cache = hf_cache()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        snapshot_download = None
    if snapshot_download is not None:
        try:
            found = Path(snapshot_download(model_id, revision=revision, cache_dir=str(cache), local_files_only=True))
            return found if (found / "config.json").is_file() else None
        except (LocalEntryNotFoundError, ValueError, OSError):
            return None
        except Exception:  # huggingface_hub's validation errors for odd ids; the layout below decides
            pass
    return _find_by_layout(cache, model_id, revision)


def _find_by_layout(cache: Path, model_id: str, revision: str) -> Path | None:
    """models--org--name/refs/<revision> holds a commit; snapshots/<commit>/ the files."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if (snapshot / "config.json").is_file():
        return snapshot
    return None


def download(model_id: str) -> Path:
    where = hf_cache()
    missing = f"{model_id}: no such model directory, and not in the Hugging Face cache ({where})"
    if offline():
        raise UserError(f"{missing}; HF_HUB_OFFLINE is set, so it was not downloaded")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{missing}; install huggingface_hub (pip install 'llmcli[hub]') to download it") from None
    info(f"llmcli: downloading {model_id} from the Hugging Face hub into {where}")
    try:
        path = Path(snapshot_download(model_id, cache_dir=str(where), allow_patterns=DOWNLOAD_PATTERNS))
        if not any(path.glob("*.safetensors")):  # older repositories: weights as a pickle (loaded weights-only)
            path = Path(snapshot_download(model_id, cache_dir=str(where), allow_patterns=["pytorch_model*.bin"]))
    except Exception as e:  # noqa: BLE001  connection, 404, gated: all one line for the user
        reason = _hub_error(e)
        raise UserError(f"{missing}, and downloading it failed: {reason}") from None
    return path


def _hub_error(e: Exception) -> str:
    name = type(e).__name__
    if "RepositoryNotFound" in name or "404" in str(e):
        return "no such model on the hub"
    if "GatedRepo" in name or "401" in str(e) or "403" in str(e):
        return "the model is gated or private (log in with `hf auth login`)"
    if "Connect" in name or "Timeout" in name or "Offline" in name or "resolve" in str(e).lower():
        return "the network is unreachable"
    first = str(e).strip().splitlines()[0] if str(e).strip() else name
    return first[:200]


def _fingerprint(src: Path) -> str:
    h = hashlib.sha256(f"llmcli-convert {VERSION}\n{src.resolve()}\n".encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def converted_path(src: Path) -> Path:
    name = re.sub(r"[^\w.\-]+", "-", src.resolve().name) or "model"
    if re.fullmatch(r"[0-9a-f]{40}", name):  # a hub snapshot: the repository's name says more
        name = src.resolve().parent.parent.name.removeprefix("models--")
    return cache_root() / "converted" / f"{name}-{_fingerprint(src)}"


def converted(src: Path) -> Path:
    """The llmcli model directory of the Hugging Face model in `src`, converted on first use."""
    target = converted_path(src)
    if is_model_dir(target):
        return target
    loaded = convert(src)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save(loaded, tmp)
            os.replace(tmp, target)  # atomic: another process may have done the same
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if is_model_dir(target):  # another process cached it first
            return target
        warn(f"cannot cache the converted model in {target.parent} ({e.strerror}); converting it each time")
        target = Path(tempfile.mkdtemp(prefix="llmcli-converted-"))
        atexit.register(shutil.rmtree, target, ignore_errors=True)
        save(loaded, target)
    return target
