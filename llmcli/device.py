"""Which torch device a command runs on, and what that device can do.

`--device auto|cpu|cuda|cuda:N` for every command; under torchrun each training process
takes the GPU of its LOCAL_RANK. The names of precisions are checked with the other
training options (`TrainOptions`); whether this device can run one is checked here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch

from llmcli.distributed import World
from llmcli.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but CUDA is not available on this machine")
    return device


def process_device(name: str, world: World) -> torch.device:
    """The device of this process: under torchrun, the GPU of its LOCAL_RANK."""
    device = resolve_device(name)
    if not world.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(
            f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; use --device cuda or auto"
        )
    if world.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"process {world.rank} has LOCAL_RANK {world.local_rank} but this node has {torch.cuda.device_count()} GPUs; lower --nproc-per-node"
        )
    return torch.device("cuda", world.local_rank)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, in one line, a precision this device cannot do."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
        raise UserError(f"--precision bf16 needs a GPU with bfloat16 (Ampere or newer); {name} has none: use fp16")
    if precision != "fp32" and device.type not in ("cuda", "cpu"):
        raise UserError(f"--precision {precision} is for cuda and cpu; use fp32 on {device.type}")


# --- inference precisions: `--precision fp32|bf16|int8|int4|auto` on the inference commands ---

INFERENCE_PRECISIONS = ("fp32", "bf16", "int8", "int4", "auto")
# What this CPU offers for them, as /proc/cpuinfo names it: bf16 products (AVX512-BF16, AMX-BF16),
# int8 products (VNNI, AMX-INT8), and the AVX-512 that fbgemm's and oneDNN's fast paths need.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo; off Linux, what torch's oneDNN build reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags = set()
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        flags.add("avx512_bf16")  # or AMX: either way bf16 products in hardware
    return flags


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


# torch's dynamic int8 linear, llmcli.fast's int8 kernel; without it int8 is weight-only and slower
FBGEMM_INT8 = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def auto_precision(device: torch.device) -> str:
    """What `--precision auto` runs: the fastest kind this machine has whose quality guard holds.

    The guard (bench/quality.py --precisions, models trained by bench/quality.py): bf16 and int8
    within 0.21 BLEU of fp32 on Multi30k test2016/2017 and within 0.01% perplexity on Tiny
    Shakespeare; int4 within 0.35 BLEU and 0.19%. Speed (bench/decode.py and bench/quality.py's
    decode times, AMD EPYC Zen 4): int8 decodes fastest (1.2-2.8x fp32, 1.0-1.5x bf16; fbgemm's
    VNNI kernel), int4 only at one row. So: int8 where fbgemm runs on VNNI; but bf16 on AMX, whose
    bf16 tiles multiply 3-8x faster than fp32 (issue 14's Intel Xeon figures) and which fbgemm
    does not use; bf16 where only avx512_bf16 is there; fp32 elsewhere. On a GPU, bf16. The
    default stays fp32: the only precision that gives transformers' tokens."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    flags = cpu_flags()
    if "amx_bf16" in flags and torch.backends.mkldnn.is_available():
        return "bf16"
    if FBGEMM_INT8 and ("avx512_vnni" in flags or "avx_vnni" in flags):
        return "int8"
    if cpu_has_bf16(flags) and torch.backends.mkldnn.is_available():
        return "bf16"
    return "fp32"


# Below this width a CPU's bf16 autocast costs more in casts than its products save: 100 steps of
# Multi30k en-de, 2 AMD EPYC Zen 4 cores (avx512_bf16), bf16 against fp32: d_model 128 (tiny) 0.96x,
# d_model 256 (small) 1.16x; a 30-minute small run buys 42% more steps and +1.0 BLEU (bench/README.md).
BF16_TRAINING_MIN_D_MODEL = 256


def training_precision(device: torch.device, d_model: int) -> tuple[str, str]:
    """The precision a new training run takes unless told, and why: bf16 autocast where the
    device multiplies bf16 natively and the model is wide enough for it to pay, as more steps
    in the same time buy a better model; fp32 elsewhere (a CPU without bf16 would emulate it)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU has bfloat16"
        return "fp32", "this GPU has no bfloat16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        flags = cpu_flags()
        if not cpu_has_bf16(flags):
            return "fp32", "this CPU has no avx512_bf16 or amx_bf16"
        if d_model < BF16_TRAINING_MIN_D_MODEL:
            return "fp32", f"d_model {d_model}: below {BF16_TRAINING_MIN_D_MODEL} a CPU's bf16 autocast is no faster"
        return "bf16", f"this CPU has {' and '.join(f for f in ('amx_bf16', 'avx512_bf16') if f in flags)}"
    return "fp32", f"on {device.type}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The inference precision to run, checked against this device (one line when it cannot)."""
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(INFERENCE_PRECISIONS[:-1])} or auto")
    if precision == "auto":
        return auto_precision(device)
    if precision == "fp32":
        return precision
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--precision {precision} is for cuda and cpu; use fp32 on {device.type}")
    if precision == "bf16":
        if device.type == "cuda":
            check_precision("bf16", device)
        elif not cpu_has_bf16():
            raise UserError(
                f"--precision bf16 needs a CPU with avx512_bf16 or amx_bf16; {cpu_name()} has neither: use fp32 or int8"
            )
        return precision
    if device.type == "cuda":
        raise UserError(f"--precision {precision} runs on the CPU only (torch's CPU kernels); on {device} use bf16")
    if precision == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise UserError("--precision int4 needs torch's _weight_int4pack_mm_for_cpu (torch 2.5 or newer): use fp32 or int8")
    return precision


def precision_facts(device: torch.device | None = None) -> dict:
    """For `llmcli info`: the CPU, its flags that matter to the precisions, what auto picks and
    what training picks."""
    device = device or torch.device("cpu")
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cpu flags": [f for f in CPU_FLAGS if f in flags] or ["none of " + " ".join(CPU_FLAGS)],
        "torch cpu": torch.backends.cpu.get_cpu_capability(),
        "precision auto": auto_precision(device),
        # what `llmcli train` picks without --precision, for its small preset (d_model 256) and up
        "train in": training_precision(device, BF16_TRAINING_MIN_D_MODEL)[0],
    }


# glibc gives a freed block of 128 KiB or more back to the kernel (munmap, or trimming the heap's
# top) and faults it in again, page by page, when the next tensor of that size is made; a
# decoding step makes a few such tensors (logits: 128 rows x 32,000 = 16 MB at batch 32, beam 4),
# a training step many. Keeping blocks up to 64 MiB in the heap, and up to 1 GiB of free heap
# before trimming it, ends those faults: marian-base int8, batch 32, beam 4, one AMD EPYC core,
# 172,000 page faults and 0.3 s of kernel time a decode before, none after, 8% more tokens/s
# (fp32 10%, greedy 6%); a small-preset training step 3-5% faster (bench/README.md). Blocks of
# 64 MiB and more (weights) still come and go by mmap. What PyTorch's CPU tuning guide gets from
# swapping in jemalloc or tcmalloc with LD_PRELOAD, without a preload or a dependency.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
# 2.36 takes 64 MiB; a glibc that caps the threshold at HEAP_MAX_SIZE / 2 refuses it and takes 32 MiB
_KEEP_BLOCKS_BELOW = (64 << 20, 32 << 20)
_TRIM_ABOVE = 1 << 30


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next tensors instead of returning it to the
    kernel (above). Process-wide; True where it took effect (Linux with glibc), False elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in _KEEP_BLOCKS_BELOW):
        # Without a higher mmap threshold a trim threshold would only switch off glibc's own
        # adaptive one, which is worse than leaving both alone.
        return False
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE) == 1
