"""`llmcli train --ensemble N`: N models trained side by side on this machine's cores, one process
and 1/N of the threads each, saved as one ensemble directory that translate, summarize and qa
decode together (llmcli.ensemble):

    OUT/ensemble.json       {"members": ["members/1", "members/2"]}
    OUT/members/1/          a model directory and its run (train_state/, train_log.jsonl), seed S
    OUT/members/2/          the same, seed S + 1

The members share one tokenizer, trained here once before they start. `--resume OUT` resumes
every member. Why: a small model's training step does not use two cores twice as fast as one, and
two models' errors partly cancel; on Multi30k (bench/README.md, "Two models instead of one"), two
one-core 30-minute models decoded together beat one two-core 30-minute model by 0.9-1.1 BLEU
en-de (three pairs) and 1.0 en-fr.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmcli import checkpoint
from llmcli.device import resolve_device
from llmcli.distributed import world_from_env
from llmcli.errors import UserError
from llmcli.io import warn
from llmcli.train import (
    STATE_DIR,
    Reporter,
    SilentReporter,
    TrainOptions,
    TrainResult,
    _train_or_load_tokenizers,
    architecture,
    load_train_state,
    read_corpus,
    train,
)

MEMBERS_DIR = "members"
AUTO_TASKS = ("translate",)  # where two models were measured to beat one at the same budget


def auto_size(opts: TrainOptions, threads: int | None = None) -> tuple[int, str]:
    """How many models a new run trains unless told (--ensemble), and why."""
    threads = torch.get_num_threads() if threads is None else threads
    if world_from_env().distributed:
        return 1, "one model under torchrun"
    if opts.task not in AUTO_TASKS:
        return 1, f"one model: ensembles are measured better only for {', '.join(AUTO_TASKS)}"
    if opts.max_minutes is None:
        return 1, "one model: without --max-minutes there is no budget to share"
    if resolve_device(opts.device).type != "cpu":
        return 1, "one model on a GPU"
    if threads < 2:
        return 1, "one model on one CPU thread"
    return 2, (
        f"two models of {threads // 2} thread{'s' if threads // 2 > 1 else ''} each side by side, decoded together: "
        f"at the same budget they translated Multi30k about 1 BLEU better than one model of {threads} threads "
        "(bench/README.md; translating takes about twice as long; --ensemble 1 for one model)"
    )


def is_ensemble_run(out: str | Path) -> bool:
    return checkpoint.ensemble_members(out) is not None


def resumed_task(out: str | Path) -> str:
    """The task of the run (or the ensemble's first member's) in `out`."""
    members = checkpoint.ensemble_members(out)
    return load_train_state(Path(members[0] if members else out))["options"]["task"]


def train_ensemble(
    opts: TrainOptions,
    size: int,
    reporter_factory: Callable[[], Reporter] = SilentReporter,
    resume: bool = False,
) -> list[TrainResult]:
    """Train `size` models into opts.out (module docstring), or resume them all; their results."""
    started = time.monotonic()
    out = Path(opts.out)
    reporter = reporter_factory()
    if resume:
        members = checkpoint.ensemble_members(out)
        if members is None:
            raise UserError(f"{out}: not an ensemble run (no {checkpoint.ENSEMBLE_FILE})")
        jobs = [dataclasses.replace(opts, out=str(member)) for member in members]
        return _run_members(jobs, reporter_factory, reporter, resume=True, out=out)
    if size < 2:
        raise UserError("--ensemble must be 2 or more to train an ensemble (1: one model)")
    if architecture(opts.task) != "encoder-decoder":
        raise UserError(
            f"--ensemble {size}: ensembles decode encoder-decoders (translate, summarize, qa), not --task {opts.task}"
        )
    if (out / checkpoint.ENSEMBLE_FILE).exists() or (out / STATE_DIR).exists():
        raise UserError(f"{out} already holds a training run; use --resume {out} to continue it, or another --out")
    corpus = read_corpus(opts, "training")  # a bad corpus fails here, once, not in every member
    read_corpus(opts, "validation")
    reporter.log("training the tokenizer" if not opts.tokenizer else f"using tokenizer {opts.tokenizer}")
    src_tok, tgt_tok = _train_or_load_tokenizers(opts, corpus, reporter.log)
    del corpus
    out.mkdir(parents=True, exist_ok=True)
    shared = out / MEMBERS_DIR / ".shared-tokenizer"  # the members read it as --tokenizer DIR
    shared.mkdir(parents=True, exist_ok=True)
    try:
        tgt_tok.save(shared / checkpoint.TOKENIZER_FILE)
        if src_tok is not tgt_tok:
            src_tok.save(shared / checkpoint.SOURCE_TOKENIZER_FILE)
        names = [f"{MEMBERS_DIR}/{i}" for i in range(1, size + 1)]
        checkpoint.write_ensemble(out, names)
        left = None if opts.max_minutes is None else max(round(opts.max_minutes - (time.monotonic() - started) / 60, 2), 0.01)
        jobs = [
            dataclasses.replace(opts, out=str(out / name), seed=opts.seed + i, tokenizer=str(shared), max_minutes=left)
            for i, name in enumerate(names)
        ]
        return _run_members(jobs, reporter_factory, reporter, resume=False, out=out)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _run_members(
    jobs: list[TrainOptions], reporter_factory: Callable[[], Reporter], reporter: Reporter, resume: bool, out: Path
) -> list[TrainResult]:
    threads = max(1, torch.get_num_threads() // len(jobs))
    reporter.log(
        f"{'resuming' if resume else 'training'} {len(jobs)} models side by side, {threads} thread{'s' if threads > 1 else ''} "
        f"each, in {out / MEMBERS_DIR} (the first one's progress shown)"
    )
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or torch state inherited
    pipes, processes = [], []
    for i, job in enumerate(jobs):
        receive, send = context.Pipe(duplex=False)
        factory = reporter_factory if i == 0 else SilentReporter
        process = context.Process(target=_member, args=(job, threads, factory, resume, send, os.getpid()), name=f"member {i + 1}")
        process.start()
        send.close()
        pipes.append(receive)
        processes.append(process)
    try:
        outcomes = _wait(processes, pipes)
    except KeyboardInterrupt:  # each member saves its state, then stops
        _stop(processes, signal.SIGINT)
        warn(f"resume the whole ensemble with: llmcli train --resume {out}")
        raise
    except BaseException:  # SIGTERM (the CLI raises it as an exception), or a bug here
        _stop(processes, signal.SIGTERM)
        raise
    for job, (kind, message) in zip(jobs, outcomes):
        if kind == "error":
            raise UserError(f"{job.out}: {message}")
    if any(kind == "interrupted" for kind, _ in outcomes):
        warn(f"resume the whole ensemble with: llmcli train --resume {out}")
        raise KeyboardInterrupt
    return [result for _, result in outcomes]


def _wait(processes: list, pipes: list) -> list[tuple[str, object]]:
    """Each member's ("done", TrainResult), ("error", message) or ("interrupted", None); when one
    fails, the others are stopped (their state saved) rather than left to spend their budget."""
    outcomes: dict[int, tuple[str, object]] = {}
    waiting = dict(enumerate(pipes))
    while waiting:
        for pipe in multiprocessing.connection.wait(list(waiting.values())):
            i = next(k for k, p in waiting.items() if p is pipe)
            try:
                outcomes[i] = pipe.recv()
            except EOFError:  # it died without a word: a crash (its traceback is on stderr) or a kill
                processes[i].join()
                outcomes[i] = ("error", f"the training process stopped (exit {processes[i].exitcode})")
            del waiting[i]
            if outcomes[i][0] == "error":
                _stop([processes[k] for k in waiting], signal.SIGINT)
    for process in processes:
        process.join()
    return [outcomes[i] for i in range(len(processes))]


def _stop(processes: list, how: signal.Signals) -> None:
    """Pass the signal on once and wait: a member in its own process group gets no Ctrl-C of its own."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, how)
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would leave a save half done
    except ValueError:  # not the main thread (a library caller's): signals are not ours to set
        previous = None
    try:
        for process in processes:
            process.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _stop_with_parent(parent: int) -> None:
    """Members run in their own process group, so a parent killed outright (SIGKILL, out of memory)
    would leave them training: ask Linux for a SIGINT at the parent's death (prctl
    PR_SET_PDEATHSIG), on which a member saves its state and stops, as on Ctrl-C."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGINT), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGINT)


def _member(opts: TrainOptions, threads: int, reporter_factory, resume: bool, result, parent: int) -> None:
    """One member's run, in its own process."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # a Ctrl-C at the terminal reaches the parent, which passes it on once
    torch.set_num_threads(threads)
    try:
        _stop_with_parent(parent)
        outcome = ("done", train(opts, reporter_factory(), resume=resume))
    except UserError as error:
        outcome = ("error", str(error).splitlines()[0] if str(error) else "UserError")
    except KeyboardInterrupt:
        outcome = ("interrupted", None)
    with contextlib.suppress(OSError):  # a parent that died reads nothing
        result.send(outcome)
