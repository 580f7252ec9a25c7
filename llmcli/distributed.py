"""One training job on several processes, GPUs or nodes, with torch.distributed.

`torchrun` starts the processes and tells each its place through RANK, WORLD_SIZE and
LOCAL_RANK (and MASTER_ADDR/MASTER_PORT for the rendezvous); `llmcli train --nproc N`
only calls torchrun's own launcher (`torch.distributed.run`) on this machine for you.
Each process joins the process group (nccl on CUDA, gloo on CPU); the training loop asks
`World.is_main` before writing anything.

Failures: torchrun notices a process that died and stops the others on its node; a
collective that waits longer than LLMCLI_DIST_TIMEOUT seconds (default 600: longer than
the slowest checkpoint write, since the other ranks wait for rank 0 to save) fails, so
processes on other nodes do not hang either.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass

# Set by `llmcli train --nproc`: its workers leave one-line errors to the launcher.
LAUNCHED_ENV = "LLMCLI_LAUNCHED"
TIMEOUT_ENV = "LLMCLI_DIST_TIMEOUT"
# Exit status of a process that stopped because another one failed (EX_TEMPFAIL): the
# launcher reports the other one.
PEER_LOST_EXIT = 75

# What gloo and NCCL say when the process at the other end died or hung.
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
)


class PeerLost(Exception):
    """Another process of the job failed or stopped answering; this one cannot go on."""


def lost_peer(error: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_LOST))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """This process's place, from the variables torchrun sets (one process without them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def launched_by_llmcli() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1"


def join(world: World, device) -> None:
    """Join the process group: nccl on CUDA, gloo on CPU. Nothing to do for one process."""
    if not world.distributed:
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def leave(world: World) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], world: World, device) -> list[float]:
    """Sums over all processes, in float64 (token counts, loss sums, flags)."""
    if not world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(obj, world: World):
    """Rank 0's Python object on every process (small things: tokenizer JSON)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def record_error(message: str) -> None:
    """Leave a one-line error where torchrun looks for a failed worker's reason
    (TORCHELASTIC_ERROR_FILE, the format of torch.distributed.elastic's ErrorHandler)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time())), "llmcli": "user-error"},
        }
    }
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        pass


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without `--nproc N` / `--nproc=N`: what each worker runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _blame(failure) -> int:
    """0: a user error said why; 1: failed by itself; 2: stopped because another failed
    (lost its peer, or the SIGTERM with which torchrun stops the rest)."""
    message = failure.message
    if isinstance(message, dict) and message.get("extraInfo", {}).get("llmcli") == "user-error":
        return 0
    return 2 if failure.exitcode in (PEER_LOST_EXIT, -signal.SIGTERM) else 1


def launch(nproc: int, args: list[str], debug: bool = False) -> int:
    """Run `python -m llmcli ARGS` on nproc local processes through torchrun's launcher
    (standalone rendezvous on a free port). Returns the exit code; a failure is one line
    on stderr naming the process that failed first."""
    import logging

    # A process of ours per core share; torchrun would otherwise set 1 and say so.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED_ENV] = "1"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not debug:
        # torchrun's agent logs each step of a shutdown; the one line below says what matters.
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    torchrun_args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "llmcli", *args])
    try:
        run(torchrun_args)
    except ChildFailedError as e:
        failures = e.failures
        rank = min(failures, key=lambda r: (_blame(failures[r]), failures[r].timestamp, r))
        failure = failures[rank]
        if _blame(failure) == 0:
            message = failure.message
            print(f"llmcli: error: {message['message']}", file=sys.stderr, flush=True)
            return 2
        if failure.exitcode < 0:
            why = f"was killed by {failure.signal_name()}"
        else:
            why = f"failed with exit code {failure.exitcode} (its messages are above)"
        print(
            f"llmcli: error: process {rank} of {nproc} (pid {failure.pid}) {why}; stopped the others", file=sys.stderr, flush=True
        )
        return 1
    except SignalException as e:
        # Ctrl-C reached the workers too; rank 0 saved the state and said how to resume.
        # Launched workers stay quiet on SIGTERM, so the launcher says it.
        if e.sigval == signal.SIGTERM:
            print("llmcli: terminated", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0
