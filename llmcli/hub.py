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
from llmcli.convert import VERSION, convert, is_gguf, is_hf_dir, save
from llmcli.errors import UserError
from llmcli.io import cache_root, info, user_cache, warn

# What a conversion reads; downloads fetch these only.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.spm", "*.model", "*.txt"]
PICKLE_PATTERNS = ["pytorch_model*.bin"]  # older repositories' weights, when there are no safetensors
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
    """The llmcli model directory `spec` names: itself, or the Hugging Face model (or GGUF
    file) it names, converted into llmcli's cache. What is wrong with a directory, `load_model` says."""
    src = find_hf_model(spec)
    return Path(spec) if src is None else converted(src)


def find_hf_model(spec: str) -> Path | None:
    """The Hugging Face model directory or GGUF file `spec` names, or None when it names
    neither (an llmcli directory, or nothing: the caller reports that)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path if (path.is_dir() and is_hf_dir(path)) or is_gguf(path) else None
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
            # Complete for what a download fetches, as the cached file listing says: a snapshot
            # left by an interrupted download is not found (a download then completes it), and
            # files never fetched (README.md, other weight formats) are not asked for.
            found = Path(snapshot_download(model_id, revision=revision, cache_dir=str(cache), local_files_only=True,
                                           allow_patterns=DOWNLOAD_PATTERNS))  # fmt: skip
            if not any(found.glob("*.safetensors")):
                found = Path(snapshot_download(model_id, revision=revision, cache_dir=str(cache), local_files_only=True,
                                               allow_patterns=PICKLE_PATTERNS))  # fmt: skip
            # Older huggingface_hub keeps no file listing to tell a partial snapshot by: no weights, no model.
            weights = any(found.glob("*.safetensors")) or any(found.glob("pytorch_model*.bin"))
            return found if (found / "config.json").is_file() and weights else None
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
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise UserError(f"{missing}; install huggingface_hub (pip install 'llmcli[hub]') to download it") from None
    info(f"llmcli: downloading {model_id} from the Hugging Face hub into {where}")
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retries log tracebacks; the outcome is one line below
    try:
        path = Path(snapshot_download(model_id, cache_dir=str(where), allow_patterns=DOWNLOAD_PATTERNS))
        if not any(path.glob("*.safetensors")):  # older repositories: weights as a pickle (loaded weights-only)
            path = Path(snapshot_download(model_id, cache_dir=str(where), allow_patterns=PICKLE_PATTERNS))
        _verify(model_id, path, where)
    except UserError as e:
        raise UserError(f"{model_id}: downloading it failed: {e}") from None
    except Exception as e:  # noqa: BLE001  connection, 404, gated: all one line for the user
        reason = _hub_error(e)
        raise UserError(f"{missing}, and downloading it failed: {reason}") from None
    finally:
        hub_logging.set_verbosity(verbosity)
    return path


def _verify(model_id: str, snapshot: Path, cache: Path) -> None:
    """Check the downloaded files against the hub's checksums (sha256 for LFS files, the git
    blob hash for others): huggingface_hub checks sizes only. A file that does not match is
    removed from the cache, blob and link, so that no later run loads it."""
    from huggingface_hub import HfApi

    if not hasattr(HfApi, "verify_repo_checksums"):  # older huggingface_hub (1.0 has none): sizes only
        return
    result = HfApi().verify_repo_checksums(model_id, revision=snapshot.name, cache_dir=cache)
    if not result.mismatches:
        return
    for bad in result.mismatches:
        link = snapshot / bad["path"]
        blob = link.resolve()
        link.unlink(missing_ok=True)
        if blob.parent.name == "blobs":
            blob.unlink(missing_ok=True)
    first = result.mismatches[0]
    others = f" (and {len(result.mismatches) - 1} more)" if len(result.mismatches) > 1 else ""
    raise UserError(
        f"{first['path']}{others} does not match the hub's checksum ({first['algorithm']} {first['expected'][:12]}..., "
        f"got {first['actual'][:12]}...): removed from the cache; run the command again to download it afresh"
    )


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _hub_error(e: Exception) -> str:
    """One line for why huggingface_hub failed, from the exception's types (theirs and httpx's,
    by name: neither is imported here) and HTTP status rather than words in its message (a
    size or hash holding "404" once read as a missing model)."""
    chain = list(_causes(e))
    names = {cls.__name__ for x in chain for cls in type(x).__mro__}
    statuses = {getattr(getattr(x, "response", None), "status_code", None) for x in chain}
    if "GatedRepoError" in names or statuses & {401, 403}:
        return "the model is gated or private (log in with `hf auth login`)"
    if "RepositoryNotFoundError" in names or (404 in statuses and "EntryNotFoundError" not in names):
        return "no such model on the hub"
    if "RevisionNotFoundError" in names:
        return "no such revision on the hub"
    if names & {"ConnectError", "ConnectTimeout", "TimeoutException", "OfflineModeIsEnabled", "ProxyError"}:
        return "the network is unreachable"  # also where a cached snapshot is incomplete and the hub out of reach
    if names & {"RemoteProtocolError", "ReadError", "ReadTimeout", "WriteError"}:
        return "the connection broke off mid-file, five times; nothing partial was kept: run the command again"
    if "EntryNotFoundError" in names:
        return f"a file the hub lists is missing ({_first_line(e)})"
    if "Consistency check failed" in str(e):  # huggingface_hub's size check: an OSError of its own
        return f"a file arrived with the wrong size ({_first_line(e)}); nothing partial was kept: run the command again"
    return _first_line(e)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _fingerprint(src: Path) -> str:
    h = hashlib.sha256(f"llmcli-convert {VERSION}\n{src.resolve()}\n".encode())
    for f in [src] if src.is_file() else sorted(src.iterdir()):  # a directory's files, or a GGUF file
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
