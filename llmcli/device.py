"""Which torch device a command runs on, and what that device can do.

`--device auto|cpu|cuda|cuda:N` for every command; under torchrun each training process
takes the GPU of its LOCAL_RANK. The names of precisions are checked with the other
training options (`TrainOptions`); whether this device can run one is checked here.
"""

from __future__ import annotations

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
