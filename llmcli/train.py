"""The training loop: tokenizer, model, token-count batches, AdamW, schedule, validation,
checkpoints that resume bit for bit, Ctrl-C that saves.

A run's directory holds the model to use (the best by validation loss, or the last
without validation) and `train_state/`, everything needed to continue exactly:
the last weights, the optimizer's moments and the data position. Dropout is seeded
per batch from (seed, epoch, batch index), so there is no RNG state to carry and a
batch gets the same dropout on any process.

A run is resumable from before its first step: the state is saved then, and at every save
train_state/ is replaced whole, so kill -9 at any moment leaves one that resumes exactly
(tests/test_train_faults.py). A save that fails (a full disk) and a loss, gradient or weight
that is NaN or infinite stop the run in one line naming the step and the checkpoint kept; a
diverged step is never applied nor saved.

Under torchrun the same loop runs on every process with DistributedDataParallel. The
global batch of a step is `accumulate x processes` batches of `batch_tokens`: all
processes know the step's batches, process r takes batches r, r + N, ... of them, and
the loss is divided by the step's target tokens over all processes, so N processes
with --accumulate A give the weights one process gives with --accumulate N x A. The
data position counts batches of the shared order, so a run resumes on another number
of processes at the same place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import torch

from llmcli import checkpoint, distributed, fast
from llmcli.config import PRESETS, ModelConfig, preset
from llmcli.data import (
    IGNORE_INDEX,
    Batch,
    BatchStream,
    Example,
    collate,
    example_length,
    lm_examples,
    make_batches,
    seq2seq_example,
    target_tokens,
)
from llmcli.device import check_precision, process_device, reuse_freed_memory, training_precision
from llmcli.distributed import World, all_reduce_sum, broadcast_from_main, join, leave, world_from_env
from llmcli.errors import UserError
from llmcli.io import atomic_write, read_lines, remove_directory, replace_directory, temporary_directory, warn
from llmcli.model import Transformer
from llmcli.qa_data import qa_source, read_qa_records
from llmcli.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer

Task = Literal["translate", "summarize", "qa", "generate"]
TokenizerKind = Literal["bpe", "unigram"]
Schedule = Literal["linear", "inverse_sqrt", "cosine", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
STATE_DIR = "train_state"
CHECKPOINTS_DIR = "checkpoints"  # step-NNNNNNN/ model directories kept for `llmcli average`
LOG_FILE = "train_log.jsonl"  # one JSON object per save: the learning curve, readable while training


@dataclass
class TrainOptions:
    task: Task
    out: str
    src: str | None = None
    tgt: str | None = None
    text: list[str] | None = None  # decoder-only corpus files
    data: str | None = None  # qa: jsonl or SQuAD json
    valid_src: str | None = None
    valid_tgt: str | None = None
    valid_text: list[str] | None = None
    valid_data: str | None = None
    tokenizer: str | None = None  # an existing tokenizer.json, or a model directory holding one
    tokenizer_kind: TokenizerKind = "bpe"
    vocab_size: int | None = None  # None: scaled to the training text (auto_vocab_size)
    shared_vocab: bool = True
    preset: str = "small"
    config_overrides: dict | None = None  # ModelConfig fields over the preset
    block_size: int = 256  # decoder-only: tokens per training sequence
    batch_tokens: int | None = None  # padded tokens per batch, on each process; None: DEFAULT_BATCH_TOKENS by device
    # Batches per optimizer step on each process. None: 1 for a new run; when resuming,
    # whatever keeps the run's global batch (accumulate x processes) on this many processes.
    accumulate: int | None = None
    lr: float | None = None  # None: the preset's (PRESET_LR)
    warmup_steps: int | None = None  # None: 400, or a tenth of the run's horizon if that is less
    # "post-norm": lr and warmup by the run's length (POST_NORM_SCHEDULE), chosen with the rate
    # when --lr is not given for the post-norm small preset. None: lr, and the warmup above.
    schedule_rule: str | None = None
    # "linear": to zero at the run's horizon, max_steps or, with max_minutes, the steps the time
    # buys, estimated as the run goes (Progress.horizon): a fixed budget is best spent decaying to its end.
    schedule: Schedule = "linear"
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int | None = None  # None: 10000, or no limit with max_minutes (the time decides)
    max_minutes: float | None = None
    valid_every: int | None = None  # None: every 500 steps; with max_minutes, every twentieth of the budget
    save_every: int | None = None  # default: valid_every
    patience: int | None = None  # early stopping after this many validations without improvement
    seed: int = 1
    device: str = "auto"
    # bf16 and fp16: autocast; fp16 with a gradient scaler. None: for a new run, bf16 where the device
    # multiplies it natively and d_model is 256 or more, else fp32 (device.training_precision); on
    # resume, the run's own (a resume that silently changed it would not continue the run exactly).
    precision: Precision | None = None
    keep_checkpoints: int = 0  # keep the model of the last N saves under checkpoints/
    # At the end, the mean of the last N saves' weights, kept as the model if it validates better
    # than the best single one. None: 5 where there is validation data, else 0 (nothing to decide by).
    average: int | None = None

    # What may change when resuming; everything else is taken from the run being resumed
    # (accumulate has its own rule, see `accumulate` above).
    RESUMABLE = ("max_steps", "max_minutes", "valid_every", "save_every", "patience", "device", "precision",
                 "keep_checkpoints", "average")  # fmt: skip

    @property
    def step_limit(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return DEFAULT_MAX_STEPS if self.max_minutes is None else NO_STEP_LIMIT

    def __post_init__(self) -> None:
        """Refuse bad options in one line naming the option, for the CLI and library callers alike.
        What only this machine can tell (the device, what it can compute) is checked in train()."""
        if not self.out:
            raise UserError("--out DIR is required (or --resume DIR to continue a run)")
        _check_choice("--task", self.task, Task)
        _check_choice("--tokenizer-kind", self.tokenizer_kind, TokenizerKind)
        _check_choice("--schedule", self.schedule, Schedule)
        if self.precision is not None:
            _check_choice("--precision", self.precision, Precision)
        if self.preset not in PRESETS:
            raise UserError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.batch_tokens is not None and self.batch_tokens < 16:
            raise UserError("--batch-tokens must be at least 16")
        for flag, value in (
            ("--accumulate", self.accumulate),
            ("--max-steps", self.max_steps),
            ("--valid-every", self.valid_every),
            ("--save-every", self.save_every),
            ("--patience", self.patience),
            ("--block-size", self.block_size),
        ):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1")
        if self.lr is not None and not (0 < self.lr < math.inf):
            raise UserError(f"--lr must be more than 0, not {self.lr:g}")
        for flag, value in (
            ("--warmup", self.warmup_steps),
            ("--clip-norm", self.clip_norm),  # 0: no clipping
            ("--weight-decay", self.weight_decay),
        ):
            if value is not None and not (0 <= value < math.inf):
                raise UserError(f"{flag} must be 0 or more, not {value:g}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be at least 0 and less than 1, not {self.label_smoothing:g}")
        if self.keep_checkpoints < 0:
            raise UserError("--keep-checkpoints must be 0 (none) or more")
        if self.average is not None and self.average < 0:
            raise UserError("--average must be 0 (none) or more")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise UserError("--vocab-size must be at least 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise UserError("--max-minutes must be more than 0")


def _check_choice(flag: str, value: str, choices) -> None:
    names = get_args(choices)
    if value not in names:
        raise UserError(f"{flag} {value!r} is not {', '.join(names[:-1])} or {names[-1]}")


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed, by all processes together
    best_valid_loss: float | None = None
    validations_without_improvement: int = 0
    tokens_seen: int = 0
    horizon: int | None = None  # the step the schedule decays to: max_steps, or what max_minutes buys (estimated)
    dropout: float | None = None  # chosen at DROPOUT_CHOSEN_AT (_choose_dropout); None: the config's


@dataclass
class StepReport:
    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_second: float
    elapsed: float


@dataclass
class TrainResult:
    out: Path
    steps: int
    last_loss: float | None
    valid_loss: float | None
    valid_perplexity: float | None
    tokens_per_second: float
    elapsed: float
    parameters: int
    stopped_early: bool


class Reporter(Protocol):
    def start(self, total_steps: int, first_step: int) -> None: ...
    def step(self, report: StepReport) -> None: ...
    def log(self, message: str) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    def start(self, total_steps, first_step):
        pass

    def step(self, report):
        pass

    def log(self, message):
        pass

    def stop(self):
        pass


def learning_rate(step: int, opts: TrainOptions, horizon: int | None = None) -> float:
    """Linear warmup to the peak (opts.lr, or POST_NORM_SCHEDULE's), then linear decay to zero at
    the horizon, inverse square root (Vaswani et al.), cosine decay to 10% at the horizon, or
    constant. The horizon is max_steps unless given (a time budget's estimate); the default warmup
    takes a tenth of it, at most 400 steps."""
    step = max(step, 1)
    horizon = max(min(horizon or opts.step_limit, opts.step_limit), 1)
    peak, divisor, most = opts.lr, 10, 400
    if opts.schedule_rule == "post-norm":
        peak, divisor, most = next(rule[1:] for rule in POST_NORM_SCHEDULE if horizon >= rule[0])
    warmup = max(opts.warmup_steps if opts.warmup_steps is not None else min(most, horizon // divisor), 1)
    if step <= warmup:
        return peak * step / warmup
    progress = min((step - warmup) / max(horizon - warmup, 1), 1.0)
    if opts.schedule == "linear":
        return peak * (1.0 - progress)
    if opts.schedule == "inverse_sqrt":
        return peak * math.sqrt(warmup / step)
    if opts.schedule == "cosine":
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return peak


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _seed_dropout(seed: int, epoch: int, index: int) -> None:
    # Dropout depends on the batch, not on which process or how many: N processes
    # match one, and a resumed run needs no RNG state.
    torch.manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63))


# ---------------------------------------------------------------- data


@dataclass
class Corpus:
    """Raw text pairs (or LM text) for one split."""

    sources: list[str] | None
    targets: list[str]


def _read_pair(src: str | None, tgt: str | None, split: str) -> Corpus:
    if not src or not tgt:
        raise UserError(
            f"{split} data needs both --{'valid-' if split == 'validation' else ''}src and --{'valid-' if split == 'validation' else ''}tgt"
        )
    sources, targets = read_lines(src), read_lines(tgt)
    if len(sources) != len(targets):
        raise UserError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; they must be line-aligned")
    keep = [i for i, (s, t) in enumerate(zip(sources, targets)) if s.strip() and t.strip()]
    if not keep:  # one line, not a warning about the skipped pairs and then this
        raise UserError(f"the {split} set is empty" + (" (every pair has an empty side)" if sources else ""))
    if len(keep) < len(sources) and split == "training":
        warn(f"skipped {len(sources) - len(keep)} training pairs with an empty side")
    return Corpus([sources[i] for i in keep], [targets[i] for i in keep])


def read_corpus(opts: TrainOptions, split: Literal["training", "validation"]) -> Corpus | None:
    valid = split == "validation"
    if opts.task in ("translate", "summarize"):
        src, tgt = (opts.valid_src, opts.valid_tgt) if valid else (opts.src, opts.tgt)
        if valid and not (src or tgt):
            return None
        corpus = _read_pair(src, tgt, split)
    elif opts.task == "qa":
        path = opts.valid_data if valid else opts.data
        if path is None:
            if valid:
                return None
            raise UserError("--task qa needs --data FILE (JSONL with question, context, answer; or SQuAD json)")
        records = [r for r in read_qa_records(path) if r.answers]
        corpus = Corpus([qa_source(r.question, r.context) for r in records], [r.answers[0] for r in records])
    else:
        files = opts.valid_text if valid else opts.text
        if not files:
            if valid:
                return None
            raise UserError("--task generate needs --text FILE (plain text to learn from)")
        corpus = Corpus(None, ["\n".join(read_lines(f)) + "\n" for f in files])
    if not any(t.strip() for t in corpus.targets):
        raise UserError(f"the {split} set is empty")
    return corpus


def _train_or_load_tokenizers(opts: TrainOptions, corpus: Corpus, log: Callable[[str], None]) -> tuple[Tokenizer, Tokenizer]:
    """(source, target): the same object when the vocabulary is shared."""
    if opts.tokenizer:
        path = Path(opts.tokenizer)
        if path.is_dir():
            return checkpoint.load_tokenizers(path)
        tok = Tokenizer.load(path)
        return tok, tok
    if corpus.sources is None or opts.shared_vocab:
        texts = (corpus.sources or []) + corpus.targets
        tok = train_tokenizer(texts, vocab_size=_vocab_size(opts, texts, log), kind=opts.tokenizer_kind)
        return tok, tok
    return tuple(
        train_tokenizer(texts, vocab_size=_vocab_size(opts, texts, log), kind=opts.tokenizer_kind)
        for texts in (corpus.sources, corpus.targets)
    )


# Auto vocabulary: one token type per this many characters of training text. Measured on Multi30k
# en-de (30 minutes, bench/README.md "Vocabulary size"): 2,000, 4,000, 8,000 and 12,000 types gave
# BLEU 31.6, 33.9, 34.2 and 32.0 on one thread, and 8,000 beat 4,000 by 0.5 on two.
CHARACTERS_PER_TOKEN_TYPE = 500
AUTO_VOCAB_RANGE = (1000, 32000)


def auto_vocab_size(texts: list[str]) -> int:
    """A vocabulary for this much text: small corpora want small vocabularies, whose tokens are
    each seen often enough to learn (Multi30k, 3.8M characters: 8000; Tiny Shakespeare, 1.1M:
    2500; WMT-sized corpora: 32000), with room for every character seen 10 times or more, so a
    CJK corpus is not spelled in bytes."""
    counts = Counter()
    for text in texts:
        counts.update(text)
    frequent = sum(1 for n in counts.values() if n >= 10)
    size = max(sum(counts.values()) // CHARACTERS_PER_TOKEN_TYPE, MIN_VOCAB_SIZE + 2 * frequent)
    size = -(-size // 500) * 500  # rounded up to a multiple of 500
    return min(max(size, AUTO_VOCAB_RANGE[0]), AUTO_VOCAB_RANGE[1])


def _vocab_size(opts: TrainOptions, texts: list[str], log: Callable[[str], None]) -> int:
    if opts.vocab_size is not None:
        return opts.vocab_size
    size = auto_vocab_size(texts)
    log(f"vocabulary size {size} for {sum(map(len, texts)) / 1e6:.1f}M characters of training text (--vocab-size to choose)")
    return size


def build_examples(corpus: Corpus, src_tok: Tokenizer, tgt_tok: Tokenizer, cfg: ModelConfig, opts: TrainOptions) -> list[Example]:
    if corpus.sources is None:
        stream: list[int] = []
        for ids in tgt_tok.encode_batch(corpus.targets):
            stream += [tgt_tok.bos_id] + ids + [tgt_tok.eos_id]
        block = min(opts.block_size, cfg.max_positions)
        return lm_examples(stream, block)
    src_ids = src_tok.encode_batch(corpus.sources)
    tgt_ids = tgt_tok.encode_batch(corpus.targets)
    long = sum(len(s) >= cfg.max_positions or len(t) >= cfg.max_positions for s, t in zip(src_ids, tgt_ids))
    if long:
        warn(f"{long} examples longer than max_positions={cfg.max_positions} tokens were truncated")
    return [
        seq2seq_example(s, t, start_id=cfg.start_id, eos_id=cfg.eos_id, max_len=cfg.max_positions)
        for s, t in zip(src_ids, tgt_ids)
    ]


def architecture(task: str) -> str:
    """generate trains a decoder-only model; translate, summarize and qa an encoder-decoder."""
    return "decoder-only" if task == "generate" else "encoder-decoder"


def make_config(opts: TrainOptions, src_tok: Tokenizer, tgt_tok: Tokenizer) -> ModelConfig:
    decoder_only = architecture(opts.task) == "decoder-only"
    fields = dict(
        architecture=architecture(opts.task),
        vocab_size=src_tok.vocab_size,
        pad_id=tgt_tok.pad_id,
        bos_id=tgt_tok.bos_id,
        eos_id=tgt_tok.eos_id,
    )
    if not decoder_only and src_tok is not tgt_tok:
        fields.update(tgt_vocab_size=tgt_tok.vocab_size, shared_embeddings=False)
    if decoder_only:
        # The context it is trained on is the context it has: positions past the block are never
        # trained, and perplexity scores in windows of max_positions.
        fields.update(max_positions=opts.block_size)
    fields.update(opts.config_overrides or {})
    return preset(opts.preset, **fields)


# ---------------------------------------------------------------- state files


def _state_paths(out: Path, d: Path | None = None) -> dict[str, Path]:
    d = out / STATE_DIR if d is None else d
    return {"dir": d, "model": d / checkpoint.WEIGHTS_FILE, "optimizer": d / "optimizer.safetensors", "state": d / "state.json"}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    built = [(group.get("fused"), group.get("foreach")) for group in opt.param_groups]
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # The saved groups bring their kernel with them, which keeps a resume bit for bit; but a run
    # saved with the fused kernel, resumed where this torch has none, goes on with foreach.
    for group, (fused, foreach) in zip(opt.param_groups, built, strict=True):
        if group.get("fused") and not fused:
            group["fused"], group["foreach"] = fused, foreach


def save_train_state(
    out: Path,
    model: Transformer,
    opt: torch.optim.Optimizer,
    opts: TrainOptions,
    progress: Progress,
    world_size: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """train_state/ as a whole: its files are written into a temporary directory beside it, which
    then takes its place (io.replace_directory). A crash at any moment leaves the previous state or
    this one, never this step's weights beside the last step's moments or data position."""
    staging = temporary_directory(out / STATE_DIR)
    try:
        _write_train_state(_state_paths(out, staging), model, opt, opts, progress, world_size, scaler)
        replace_directory(staging, out / STATE_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_train_state(paths, model, opt, opts, progress, world_size, scaler) -> None:
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    checkpoint.save_weights(paths["model"], checkpoint.model_tensors(model))
    # The RNG state is no longer needed (dropout is seeded per batch), but earlier llmcli
    # versions expect it in this file.
    checkpoint.save_weights(paths["optimizer"], {**opt_tensors, "rng.torch": torch.get_rng_state()})
    state = {
        "options": {k: v for k, v in dataclasses.asdict(opts).items()},
        "progress": dataclasses.asdict(progress),
        "optimizer": opt_meta,
        "world_size": world_size,  # the global batch is options.accumulate x world_size batches
    }
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    with atomic_write(paths["state"]) as f:
        json.dump(state, f, indent=1)


def load_train_state(out: Path) -> dict:
    paths = _state_paths(out)
    if not paths["state"].is_file():
        # A run saves its state before its first step: this one never started (or is no run).
        raise UserError(f"{out}: nothing to resume (no {STATE_DIR}/state.json); start the run without --resume")
    try:
        return json.loads(paths["state"].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{paths['state']}: corrupt ({e})") from None


def _resumed_accumulate(saved: dict, requested: int | None, world: World, out: Path, log: Callable[[str], None]) -> int:
    """Batches per step on each process, keeping the run's global batch unless told otherwise."""
    stored = saved["options"]["accumulate"]
    stored_world = saved.get("world_size", 1)
    global_batches = stored * stored_world
    if requested is None:
        if global_batches % world.size:
            raise UserError(
                f"{out} takes {global_batches} batches per step ({stored_world} processes x --accumulate {stored}), "
                f"which {world.size} processes cannot share evenly; pass --accumulate to choose a new global batch"
            )
        accumulate = global_batches // world.size
    else:
        accumulate = requested
    if accumulate * world.size != global_batches and world.is_main:
        warn(
            f"the global batch changes from {global_batches} to {accumulate * world.size} batches of --batch-tokens per step: "
            "the data continue where they stopped, but the learning-rate schedule now meets a different number of "
            "tokens per step, so the run no longer matches an uninterrupted one"
        )
    elif accumulate * world.size == global_batches and world.size != stored_world:
        log(
            f"resuming on {world.size} processes (was {stored_world}): --accumulate {accumulate} keeps {global_batches} batches per step"
        )
    return accumulate


def _keep_checkpoint(out: Path, step: int, keep: int, model: Transformer, tgt_tok, src_tok, generation: dict) -> None:
    # Made under a temporary name and moved into place whole, removed by a move out of the way
    # first: `llmcli average RUN/checkpoints/step-*` never meets half of one after a crash.
    root = out / CHECKPOINTS_DIR
    target = root / f"step-{step:07d}"
    staging = temporary_directory(target)
    try:
        checkpoint.save_model(staging, model, tgt_tok, src_tok, generation)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(root.glob("step-*"))[:-keep]:
        remove_directory(old)


def _remove_leftovers(out: Path) -> None:
    """The temporary files and directories of writes that a kill cut short: ours (.NAME.*.tmp)
    and safetensors' own (.tmpXXXXXX, renamed onto ours when complete)."""
    for d in (out, out / CHECKPOINTS_DIR):
        for p in [*d.glob(".*.tmp"), *d.glob(".tmp*")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------- loss, validation, processes


def _loss(model: torch.nn.Module, batch: Batch, label_smoothing: float) -> tuple[torch.Tensor, int]:
    logits = model(batch.tokens, batch.src, batch.src_mask)
    V = logits.shape[-1]
    loss = fast.smoothed_cross_entropy(logits.reshape(-1, V), batch.labels.reshape(-1), label_smoothing, IGNORE_INDEX)
    return loss, batch.n_target_tokens


@torch.no_grad()
def evaluate_loss(
    model: Transformer,
    examples: list[Example],
    pad_id: int,
    batch_tokens: int,
    device,
    world: World | None = None,
    precision: str = "fp32",
) -> float:
    """Mean cross-entropy per target token (nats), without label smoothing; under torchrun
    each process scores every N-th batch and the sums are added up over all of them."""
    world = world or World()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = [example_length(ex) for ex in examples]
    for idx in make_batches(lengths, batch_tokens, seed=0, epoch=0)[world.rank :: world.size]:
        with _autocast(precision, device):
            loss, n = _loss(model, collate([examples[i] for i in idx], pad_id).to(device), 0.0)
        total += loss.item()
        count += n
    total, count = all_reduce_sum([total, count], world, device)
    model.train(was_training)
    return total / max(count, 1)


def _share_tokenizers(src_tok: Tokenizer | None, tgt_tok: Tokenizer | None, world: World) -> tuple[Tokenizer, Tokenizer]:
    """Rank 0's tokenizers on every process, so that all encode the data alike."""
    if not world.distributed:
        return src_tok, tgt_tok
    import tokenizers

    texts = None
    if world.is_main:
        texts = (tgt_tok.hf.to_str(), None if src_tok is tgt_tok else src_tok.hf.to_str())
    tgt_text, src_text = broadcast_from_main(texts, world)
    tgt = Tokenizer.from_hf(tokenizers.Tokenizer.from_str(tgt_text))
    return (tgt if src_text is None else Tokenizer.from_hf(tokenizers.Tokenizer.from_str(src_text))), tgt


def _data_parallel(model: Transformer, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP (which also broadcasts rank 0's weights, though every process built the same)."""
    import inspect

    DDP = torch.nn.parallel.DistributedDataParallel
    # The buffers (sinusoids, logits bias) never change: no need to send them every step.
    # torch 2.13 renamed the switch.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


# ---------------------------------------------------------------- a run: setup, resume, steps, saves


def train(opts: TrainOptions, reporter: Reporter | None = None, resume: bool = False) -> TrainResult:
    """Train on this process, or on every process of a torchrun job (each calls this)."""
    started = time.monotonic()  # --max-minutes counts the whole run: tokenizer, data, steps, last save
    world = world_from_env()
    reporter = reporter if reporter is not None and world.is_main else SilentReporter()
    out = Path(opts.out)
    saved = None
    if resume:
        saved = load_train_state(out)
        opts = _resumed_options(opts, saved, world, reporter.log)
    elif (out / STATE_DIR).exists():
        raise UserError(f"{out} already holds a training run; use --resume {out} to continue it, or another --out")
    else:
        opts = dataclasses.replace(opts, accumulate=1 if opts.accumulate is None else opts.accumulate)
    device = process_device(opts.device, world)
    if opts.precision is not None:  # else chosen below, for this device
        check_precision(opts.precision, device)
    corpus = read_corpus(opts, "training")
    valid_corpus = read_corpus(opts, "validation")
    if saved is None:
        opts = _chosen_defaults(opts, device, reporter.log)
    join(world, device)
    try:
        run = _setup(opts, saved, world, device, corpus, valid_corpus, reporter)
        run.started = started
        reuse_freed_memory()  # each step makes and frees tensors of the same sizes
        result = _loop(run, reporter)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        if world.distributed and distributed.lost_peer(e):
            raise distributed.PeerLost(
                f"process {world.rank} of {world.size} stopped: another process failed or stopped answering"
            ) from e
        raise
    leave(world)  # not on an exception: a collective with a dead peer may be what raised
    return result


# The recipe's defaults, chosen by measurement (bench/README.md, "Recipe search"): Multi30k en-de
# at the token budget 30 minutes of 2 CPU cores buy, replayed on a GPU by steps, BLEU on test2016:
# 4096 tokens, lr 7e-4: 29.3; 4096, 1e-3: 30.6; 2048, 7e-4: 33.6; 2048, 1e-3: 34.8; 1024, 5e-4: 34.6.
PRESET_LR = {"tiny": 1e-3, "small": 1e-3, "base": 7e-4}
# Post-norm "small" (the encoder-decoder's) takes a higher rate than pre-norm, with a longer warmup
# where the run is long enough. Multi30k en-de, 30 minutes, one thread (about 1,300 steps), side by
# side (bench/README.md, "Recipe search"): 1e-3 over a tenth of the run 34.24 BLEU; 1.4e-3 over a
# tenth 35.37 and 34.73; 1.7e-3 or 2e-3 over a tenth, and 1.4e-3 over a twentieth, stall
# (validation loss stuck near 4); 2e-3 over a fifth 35.64. On two threads (2,250-2,500 steps), one
# after the other: 1.4e-3 over a tenth 37.19, 2e-3 over 500 steps 38.00. A 10-minute run (240
# steps) learned faster at 1.4e-3 over a tenth than at a third of 2e-3 over a fifth; 2e-3 in runs
# under 1,300 steps was not measured, so they keep 1.4e-3. Pre-norm (decoder-only "small") keeps
# 1e-3, where 2e-3 lost 6 BLEU.
# (from this many steps in the run, peak rate, warmup a 1/N of the run, at most so many steps)
POST_NORM_SCHEDULE = ((1300, 2e-3, 5, 500), (0, 1.4e-3, 10, 400))
POST_NORM_LR = {"small": POST_NORM_SCHEDULE[0][1]}  # the presets that take the schedule, at its peak
_PARTS = {5: "fifth", 10: "tenth"}
# A CPU's products run as fast per token at 2048 tokens as at 4096, so the smaller batch gives twice
# the steps for the same time; a GPU's run faster the larger they are.
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 4096}


def _chosen_defaults(opts: TrainOptions, device: torch.device, log: Callable[[str], None]) -> TrainOptions:
    """A new run's options left unset, filled in for this device, and said in the log."""
    chosen, why = {}, []
    planned = planned_config(opts)
    if opts.lr is None:
        chosen["lr"], reason, chosen["schedule_rule"] = default_lr(opts, planned)
        if chosen["schedule_rule"] == "post-norm":
            (steps, peak, part, most), (_, short_peak, short_part, _) = POST_NORM_SCHEDULE
            why.append(f"learning rate {peak:g} warming up over a {_PARTS[part]} of the run (at most {most} steps) "
                       f"where the run makes {steps:,} steps or more, else {short_peak:g} over a {_PARTS[short_part]} "
                       f"({reason})")  # fmt: skip
        else:
            why.append(f"learning rate {chosen['lr']:g} ({reason})")
    if opts.batch_tokens is None:
        chosen["batch_tokens"] = DEFAULT_BATCH_TOKENS.get(device.type, 4096)
        why.append(f"batches of {chosen['batch_tokens']} tokens ({device.type})")
    if opts.precision is None:
        chosen["precision"], reason = training_precision(device, planned.d_model)
        why.append(f"{chosen['precision']}{' autocast' if chosen['precision'] != 'fp32' else ''} ({reason})")
    if why:
        log("chose " + ", ".join(why) + " (--lr, --batch-tokens, --precision to choose)")
    return dataclasses.replace(opts, **chosen)


def planned_config(opts: TrainOptions) -> ModelConfig:
    """The model a new run will build, but for its vocabulary (not known before the tokenizer)."""
    return preset(opts.preset, architecture=architecture(opts.task), **(opts.config_overrides or {}))


def default_lr(opts: TrainOptions, planned: ModelConfig | None = None) -> tuple[float, str, str | None]:
    """The learning rate a new run takes unless told, why, and its schedule rule: by preset, and
    for the presets measured so, by where the model normalises (post-norm: POST_NORM_SCHEDULE)."""
    norm = (planned or planned_config(opts)).norm_position
    if norm == "post" and opts.preset in POST_NORM_LR:
        return POST_NORM_LR[opts.preset], f"the {opts.preset} preset's, post-norm", "post-norm"
    return PRESET_LR.get(opts.preset, 7e-4), f"the {opts.preset} preset's", None


def _resumed_options(opts: TrainOptions, saved: dict, world: World, log: Callable[[str], None]) -> TrainOptions:
    """The options of the run being resumed, but for those that may change (RESUMABLE) and accumulate."""
    out = Path(opts.out)
    stored = dict(saved["options"], out=str(out))
    for key in TrainOptions.RESUMABLE:
        if key != "precision" or opts.precision is not None:
            stored[key] = getattr(opts, key)
    stored.setdefault("precision", "fp32")  # runs saved before precision was stored
    resumed = TrainOptions(**stored)
    resumed.accumulate = _resumed_accumulate(saved, opts.accumulate, world, out, log)
    done = saved["progress"]["step"]
    if done >= resumed.step_limit:
        raise UserError(f"{out} already trained {done} steps; raise --max-steps to continue")
    return resumed


@dataclass
class Run:
    """What a training run works with: built by _setup, advanced by _loop."""

    opts: TrainOptions
    world: World
    device: torch.device
    src_tok: Tokenizer
    tgt_tok: Tokenizer  # the same object as src_tok when the vocabulary is shared
    model: Transformer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    examples: list[Example]
    valid_examples: list[Example]
    stream: BatchStream
    n_targets: list[int]  # target tokens of each example
    progress: Progress
    ddp: torch.nn.parallel.DistributedDataParallel | None = None  # under torchrun
    saved_step: int | None = None  # the step of the last state saved, to resume from
    started: float = dataclasses.field(default_factory=time.monotonic)  # when train() began: the budget's start

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    @property
    def generation(self) -> dict:
        return {"task": self.opts.task}

    @property
    def forward(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.model


def _setup(
    opts: TrainOptions,
    saved: dict | None,
    world: World,
    device: torch.device,
    corpus: Corpus,
    valid_corpus: Corpus | None,
    reporter: Reporter,
) -> Run:
    """Tokenizers, examples, model and optimizer: new, or as train_state/ holds them when resuming."""
    src_tok, tgt_tok, cfg = _tokenizers_and_config(opts, saved, corpus, world, reporter)
    examples = build_examples(corpus, src_tok, tgt_tok, cfg, opts)
    if not examples:
        raise UserError("the training set is empty after tokenization")
    valid_examples = build_examples(valid_corpus, src_tok, tgt_tok, cfg, opts) if valid_corpus else []
    torch.manual_seed(opts.seed)
    model = fast.prepare_training(Transformer(cfg).to(device))
    model.train()
    run = Run(
        opts=opts,
        world=world,
        device=device,
        src_tok=src_tok,
        tgt_tok=tgt_tok,
        model=model,
        optimizer=_adamw(model, opts),
        scaler=torch.amp.GradScaler(device.type) if opts.precision == "fp16" else None,
        examples=examples,
        valid_examples=valid_examples,
        stream=BatchStream([example_length(ex) for ex in examples], opts.batch_tokens, opts.seed),
        n_targets=[target_tokens(ex) for ex in examples],
        progress=Progress(**saved["progress"]) if saved is not None else Progress(),
    )
    if saved is not None:
        _restore(run, saved)
        if run.progress.dropout is not None:
            _set_dropout(model, run.progress.dropout)
        if world.is_main:
            _remove_leftovers(run.out)
    elif world.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(run.out)
        # The state too, before the first step: from now on the run can be resumed, whenever it stops.
        with _saving(run):
            checkpoint.save_model(run.out, model, tgt_tok, src_tok, run.generation)
            save_train_state(run.out, model, run.optimizer, opts, run.progress, world.size, run.scaler)
    run.saved_step = run.progress.step
    if world.distributed:
        run.ddp = _data_parallel(model, device)
    reporter.log(
        f"{cfg.architecture} model, {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {cfg.vocab_size}, "
        f"{len(examples)} training examples, device {device.type}"
        + (f", {world.size} processes" if world.distributed else "")
        + (f", {opts.precision}" if opts.precision != "fp32" else "")
    )
    if world.distributed:
        reporter.log(
            f"global batch: {world.size} processes x --accumulate {opts.accumulate} x --batch-tokens {opts.batch_tokens}"
        )
    return run


def _tokenizers_and_config(
    opts: TrainOptions, saved: dict | None, corpus: Corpus, world: World, reporter: Reporter
) -> tuple[Tokenizer, Tokenizer, ModelConfig]:
    """The run's own when resuming; else rank 0 trains (or loads) them and shares them with the rest."""
    out = Path(opts.out)
    if saved is not None:
        src_tok, tgt_tok = checkpoint.load_tokenizers(out)
        return src_tok, tgt_tok, ModelConfig.load(out / checkpoint.CONFIG_FILE)
    src_tok = tgt_tok = None
    if world.is_main:
        reporter.log("training the tokenizer" if not opts.tokenizer else f"using tokenizer {opts.tokenizer}")
        src_tok, tgt_tok = _train_or_load_tokenizers(opts, corpus, reporter.log)
    src_tok, tgt_tok = _share_tokenizers(src_tok, tgt_tok, world)
    return src_tok, tgt_tok, make_config(opts, src_tok, tgt_tok)


def _adamw(model: Transformer, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW, without weight decay on biases and norm gains (the 1-d parameters)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return fused_adamw(groups, lr=opts.lr, betas=(0.9, 0.98), eps=1e-9)


def fused_adamw(params, **settings) -> torch.optim.AdamW:
    """AdamW in one kernel for all tensors, as transformers' Trainer runs it (adamw_torch_fused):
    the small preset's step takes 3.4 ms against foreach's 13 and the per-tensor loop's 11 (AMD
    EPYC, 2 threads). foreach where this torch has no fused kernel for the device (CPU: before 2.4)."""
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:
        return torch.optim.AdamW(params, foreach=True, **settings)


def _restore(run: Run, saved: dict) -> None:
    """The last weights, the optimizer's moments and the gradient scaler, from train_state/."""
    paths = _state_paths(run.out)
    checkpoint.load_state_into(run.model, checkpoint.load_weights(paths["model"]), str(paths["model"]))
    opt_file = checkpoint.load_weights(paths["optimizer"])
    # Runs saved before dropout was seeded per batch also stored RNG states: not needed.
    _restore_optimizer(run.optimizer, {k: v for k, v in opt_file.items() if not k.startswith("rng.")}, saved["optimizer"])
    if run.scaler is not None and "grad_scaler" in saved:
        run.scaler.load_state_dict(saved["grad_scaler"])


SAVES_PER_BUDGET = 20  # with --max-minutes and no --valid-every: validate and save every twentieth of the budget
DEFAULT_VALID_EVERY = 500


def _loop(run: Run, reporter: Reporter) -> TrainResult:
    """Steps until --max-steps, --max-minutes or --patience ends the run; saves on the way and on Ctrl-C."""
    opts, world, progress = run.opts, run.world, run.progress
    budget = opts.max_minutes * 60 if opts.max_minutes is not None else None
    # Saves by steps, or with a time budget and no --valid-every/--save-every, by time.
    save_every = opts.save_every or opts.valid_every or (None if budget is not None else DEFAULT_VALID_EVERY)
    save_interval = budget / SAVES_PER_BUDGET if save_every is None else None
    speed = _Speed()
    first_step, last_save_time, save_seconds = progress.step, speed.start, 0.0
    limit = opts.step_limit
    if budget is None or progress.horizon is None:
        progress.horizon = limit
    paced_from = None  # (time, step) when this process's first step ended: the pace leaves its warm-up out
    last_loss, valid_loss, stopped_early = None, progress.best_valid_loss, False
    reporter.start(progress.horizon, progress.step)
    try:
        while progress.step < limit:
            group, next_epoch, next_index = run.stream.take(progress.epoch, progress.batch_in_epoch, opts.accumulate * world.size)
            n_tokens = sum(run.n_targets[i] for _, _, idx in group for i in idx)
            lr = learning_rate(progress.step + 1, opts, progress.horizon)
            loss_sum = _optimizer_step(run, group[world.rank :: world.size], n_tokens, lr)
            progress.step += 1
            progress.epoch, progress.batch_in_epoch = next_epoch, next_index
            progress.tokens_seen += n_tokens
            now = time.monotonic()
            # Stop early enough for the last validation, save and average to fit (each about a save).
            out_of_time = budget is not None and now - run.started + 2 * save_seconds >= budget
            if world.distributed:
                # One small all-reduce a step: the loss of all processes, and whether any is out of time.
                loss_sum, any_out_of_time = all_reduce_sum([loss_sum, float(out_of_time)], world, run.device)
                out_of_time = any_out_of_time > 0
            last_loss = loss_sum / max(n_tokens, 1)
            if not math.isfinite(last_loss):  # the same sum on every process: all stop here
                raise _diverged(run, progress.step, f"the loss is {last_loss}")
            rate = speed.add(n_tokens, now)
            reporter.step(StepReport(progress.step, progress.horizon, last_loss, lr, rate, now - speed.start))
            if paced_from is None:
                paced_from = (now, progress.step)
            elif budget is not None and progress.step - first_step in HORIZON_EARLY_ESTIMATES:
                _estimate_horizon(run, budget, now, paced_from, save_seconds, reporter)
            if progress.step == DROPOUT_CHOSEN_AT:
                _choose_dropout(run, reporter)
            due = progress.step % save_every == 0 if save_every is not None else now - last_save_time >= save_interval
            if due or progress.step == limit or out_of_time:
                improved = True
                if run.valid_examples:
                    valid_loss, improved = _validate(run, reporter)
                if budget is not None and not out_of_time and progress.step > paced_from[1]:
                    _estimate_horizon(run, budget, now, paced_from, save_seconds, reporter)
                _save(run, improved)
                _append_log(run, last_loss, valid_loss, improved, lr, rate, now - speed.start)
                last_save_time = time.monotonic()
                save_seconds = last_save_time - now
                if opts.patience is not None and progress.validations_without_improvement >= opts.patience:
                    reporter.log(f"stopping early: no improvement in {opts.patience} validations")
                    stopped_early = True
                    break
            if out_of_time:
                reporter.log(f"stopping: --max-minutes {opts.max_minutes} reached at step {progress.step}")
                break
        valid_loss = _average_last(run, reporter, valid_loss)
    except KeyboardInterrupt:
        reporter.stop()
        _save_interrupted(run)
        raise
    finally:
        reporter.stop()
    elapsed = time.monotonic() - speed.start
    valid_loss = progress.best_valid_loss if run.valid_examples else None  # the model kept is the best
    return TrainResult(
        out=run.out,
        steps=progress.step,
        last_loss=last_loss,
        valid_loss=valid_loss,
        valid_perplexity=math.exp(min(valid_loss, 50)) if valid_loss is not None else None,
        tokens_per_second=speed.tokens / max(elapsed, 1e-9),
        elapsed=elapsed,
        parameters=run.model.num_parameters(),
        stopped_early=stopped_early,
    )


# Steps of this process after which the budget's horizon is estimated, before the saves take over:
# early and often, so a first guess thrown off by warm-up (CUDA's first steps take seconds) is soon mended.
HORIZON_EARLY_ESTIMATES = (5, 10, 20, 40, 80, 160)
DEFAULT_MAX_STEPS = 10000
NO_STEP_LIMIT = 2**62


def _estimate_horizon(
    run: Run, budget: float, now: float, paced_from: tuple[float, int], save_seconds: float, reporter: Reporter
) -> None:
    """The step the learning rate decays to: the steps done so far plus those the rest of the
    budget buys at this run's pace (saves included). Re-estimated at every save, so a machine
    that speeds up or slows down still ends its schedule near its last step; kept in the state,
    so a resumed run goes on from the same schedule."""
    progress = run.progress
    since, step = paced_from
    remaining = budget - (now - run.started) - 2 * save_seconds
    estimate = progress.step + int(max(remaining, 0.0) * (progress.step - step) / max(now - since, 1e-9))
    if run.world.distributed:  # every process must decay alike: rank 0's estimate
        estimate = broadcast_from_main(estimate, run.world)
    first = progress.horizon == run.opts.step_limit
    progress.horizon = max(min(estimate, run.opts.step_limit), progress.step + 1)
    if first and progress.horizon < run.opts.step_limit:
        reporter.log(
            f"--max-minutes {run.opts.max_minutes:g} buys about {progress.horizon} steps at this pace: "
            f"the learning rate ({run.opts.schedule}) decays to step {progress.horizon}, re-estimated at each save"
        )


# Dropout by the passes over the data the run will make (bench/README.md, "On the CPU itself"):
# Multi30k en-de, small preset, 30 minutes. At about 16 passes 0.1 beat 0.2 (BLEU 37.57 against
# 37.13) and 0 (35.79 against 34.20); at about 32, 0.2 beat 0.1 (37.20 against 37.02; test2017
# 29.51 against 28.36) and 0.3 (36.71). So 0.2 from 24 passes (between the two) on.
DROPOUT_MORE_PASSES, DROPOUT_MORE = 24, 0.2
# Global step at which it is chosen: after the early pace estimates, a few percent into any run that long.
DROPOUT_CHOSEN_AT = HORIZON_EARLY_ESTIMATES[-1]


def _choose_dropout(run: Run, reporter: Reporter) -> None:
    """Raise an encoder-decoder's dropout to DROPOUT_MORE when the run will see its data at least
    DROPOUT_MORE_PASSES times, unless the user set it (--set dropout=P). The passes are known only
    once the pace is (a budget's horizon), so the first DROPOUT_CHOSEN_AT steps run the preset's.
    The choice is kept in the training state, so a resumed run goes on with it."""
    cfg, progress = run.model.cfg, run.progress
    if not cfg.is_encoder_decoder or "dropout" in (run.opts.config_overrides or {}):
        return
    passes = progress.horizon * progress.tokens_seen / progress.step / max(sum(run.n_targets), 1)
    dropout = DROPOUT_MORE if passes >= DROPOUT_MORE_PASSES else cfg.dropout
    reporter.log(
        f"dropout {dropout:g}: the run will make about {passes:.1f} passes over the training data "
        f"({DROPOUT_MORE:g} from {DROPOUT_MORE_PASSES} passes on, else the preset's {cfg.dropout:g}; --set dropout=P to choose)"
    )
    progress.dropout = dropout
    _set_dropout(run.model, dropout)


def _set_dropout(model: Transformer, dropout: float) -> None:
    """The residual and embedding dropout (cfg.dropout), in the modules and in the config saved."""
    if dropout != model.cfg.dropout:
        model.cfg = dataclasses.replace(model.cfg, dropout=dropout)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout


def _average_last(run: Run, reporter: Reporter, valid_loss: float | None) -> float | None:
    """The mean of the last saves' weights (checkpoints/), kept as the model if it validates better
    than the best single save. Averaging is a standard gain for translation (Vaswani et al. 2017
    averaged the last 5); the validation set decides, so it cannot make the model worse."""
    n = _average_count(run.opts, bool(run.valid_examples))
    if not run.world.is_main:  # the checkpoints are rank 0's files: it averages alone, the others wait in leave()
        return valid_loss
    root = run.out / CHECKPOINTS_DIR
    kept = sorted(root.glob("step-*"))[-n:] if n >= 2 else []
    best = run.progress.best_valid_loss
    if len(kept) >= 2 and best is not None:
        last_weights = {k: v.clone() for k, v in checkpoint.model_tensors(run.model).items()}
        checkpoint.load_state_into(run.model, checkpoint.mean_weights([d / checkpoint.WEIGHTS_FILE for d in kept]), str(root))
        loss = _valid_loss(run, None)
        steps = [int(d.name.split("-")[1]) for d in kept]
        better = loss < best
        reporter.log(
            f"average of the last {len(kept)} saves (steps {steps[0]}-{steps[-1]}): validation loss {loss:.4f}, "
            + (
                f"better than the best single save ({best:.4f}): it is the model"
                if better
                else f"not better than {best:.4f}: not kept"
            )
        )
        with _saving(run):
            if better:
                checkpoint.save_model(run.out, run.model, run.tgt_tok, run.src_tok, run.generation)
            checkpoint.load_state_into(run.model, last_weights, "the last weights")
            if better:  # the state records the new best, so a resumed run compares with it
                run.progress.best_valid_loss = valid_loss = loss
                save_train_state(run.out, run.model, run.optimizer, run.opts, run.progress, run.world.size, run.scaler)
            _append_log_entry(run, {"step": run.progress.step, "averaged_steps": steps, "valid_loss": round(loss, 5),
                                    "best": better})  # fmt: skip
    if n > run.opts.keep_checkpoints:
        # Kept for the average only: drop what the user did not ask to keep.
        for old in sorted(root.glob("step-*"))[: -run.opts.keep_checkpoints or None]:
            remove_directory(old)
        if run.opts.keep_checkpoints == 0 and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    return valid_loss


def _average_count(opts: TrainOptions, has_validation: bool) -> int:
    if opts.average is not None:
        return opts.average
    return DEFAULT_AVERAGE if has_validation else 0


DEFAULT_AVERAGE = 5


def _optimizer_step(run: Run, batches: list[tuple[int, int, list[int]]], n_tokens: int, lr: float) -> float:
    """One update from this process's batches of the step (n_tokens: the step's target tokens
    on all processes); returns the summed loss of these batches."""
    opts, world, scaler, optimizer = run.opts, run.world, run.scaler, run.optimizer
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for k, (epoch, index, idx) in enumerate(batches):
        batch = collate([run.examples[i] for i in idx], run.model.cfg.pad_id).to(run.device)
        _seed_dropout(opts.seed, epoch, index)
        # Gradients are summed over processes once per step, after the last batch.
        sync = run.ddp is None or k == len(batches) - 1
        with contextlib.nullcontext() if sync else run.ddp.no_sync():
            with _autocast(opts.precision, run.device):
                loss, _ = _loss(run.forward, batch, opts.label_smoothing)
            # DDP averages over processes; times world.size makes it the sum.
            scaled = loss / max(n_tokens, 1)
            if world.distributed:
                scaled = scaled * world.size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.item()
    if scaler is not None:
        scaler.unscale_(optimizer)
    # The total norm, after DDP's all-reduce (the same on every process); without clipping, a
    # max_norm of inf multiplies by exactly 1. (torch >= 2.6 splits this into get_total_norm and
    # clip_grads_with_norm_; clip_grad_norm_ works on every torch we support.)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), opts.clip_norm if opts.clip_norm > 0 else math.inf)
    if scaler is None and not torch.isfinite(norm):
        # Stop before the update reaches the weights, as fairseq does (FloatingPointError); in
        # fp16 the scaler skips such a step and lowers its scale instead.
        loss = loss_sum / max(n_tokens, 1)
        found = f"the loss is {loss:.4g}" if not math.isfinite(loss) else f"the gradient norm is {norm.item()}"
        raise _diverged(run, run.progress.step + 1, found)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss_sum


class _Speed:
    """Target tokens per second: over the last 2 s or more, or since the start until then."""

    def __init__(self) -> None:
        self.start = self.window_start = time.monotonic()
        self.tokens = self.window_tokens = 0
        self.rate = 0.0

    def add(self, n_tokens: int, now: float) -> float:
        self.tokens += n_tokens
        self.window_tokens += n_tokens
        if now - self.window_start >= 2.0:
            self.rate = self.window_tokens / (now - self.window_start)
            self.window_tokens, self.window_start = 0, now
        return self.rate or self.tokens / max(now - self.start, 1e-9)


def _valid_loss(run: Run, world: World | None) -> float:
    """The model's validation loss as it is now; world None: this process alone."""
    opts = run.opts
    return evaluate_loss(
        run.model, run.valid_examples, run.model.cfg.pad_id, opts.batch_tokens, run.device, world, opts.precision
    )


def _validate(run: Run, reporter: Reporter) -> tuple[float, bool]:
    """The validation loss, and whether it is the best so far (progress keeps count)."""
    progress = run.progress
    loss = _valid_loss(run, run.world)
    improved = progress.best_valid_loss is None or loss < progress.best_valid_loss
    if improved:
        progress.best_valid_loss = loss
        progress.validations_without_improvement = 0
    else:
        progress.validations_without_improvement += 1
    reporter.log(
        f"step {progress.step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}"
        + (" (best)" if improved else "")
    )
    return loss, improved


def _save(run: Run, improved: bool) -> None:
    """On rank 0: the model when it improved (always without validation data), a kept
    checkpoint if asked for, and the state to resume from."""
    if not torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all():  # an update overflowed; one sync
        raise _diverged(run, run.progress.step, "the weights are not finite")
    if run.world.is_main:
        with _saving(run):
            keep = max(run.opts.keep_checkpoints, _average_count(run.opts, bool(run.valid_examples)))
            if keep:
                _keep_checkpoint(run.out, run.progress.step, keep, run.model, run.tgt_tok, run.src_tok, run.generation)
            if improved:
                checkpoint.save_model(run.out, run.model, run.tgt_tok, run.src_tok, run.generation)
            save_train_state(run.out, run.model, run.optimizer, run.opts, run.progress, run.world.size, run.scaler)
    run.saved_step = run.progress.step


def _append_log(run: Run, loss: float, valid_loss: float | None, improved: bool, lr: float, rate: float, elapsed: float) -> None:
    """One line of train_log.jsonl, after the state it describes is saved; a resumed run appends.
    One write of one line in append mode, so a kill leaves whole lines only."""
    if not run.world.is_main:
        return
    progress = run.progress
    entry = {
        "step": progress.step,
        "epoch": progress.epoch,
        "target_tokens": progress.tokens_seen,
        "seconds": round(elapsed, 1),  # since this process started training (a resumed run starts again at 0)
        "train_loss": round(loss, 5),
        "valid_loss": None if valid_loss is None else round(valid_loss, 5),
        "valid_perplexity": None if valid_loss is None else round(math.exp(min(valid_loss, 50)), 3),
        "best": improved if valid_loss is not None else None,
        "lr": lr,
        "target_tokens_per_second": round(rate, 1),
    }
    with _saving(run):
        _append_log_entry(run, entry)


def _append_log_entry(run: Run, entry: dict) -> None:
    line = (json.dumps(entry) + "\n").encode()
    with open(run.out / LOG_FILE, "ab", buffering=0) as log:
        log.write(line)


def _kept(run: Run) -> str:
    if run.saved_step is None:
        return "nothing was saved"
    return f"the checkpoint of step {run.saved_step} is kept in {run.out}"


@contextlib.contextmanager
def _saving(run: Run):
    """A write that fails (a full disk, a quota, RLIMIT_FSIZE, permissions) is one line saying what is kept:
    every file is replaced whole, so the last checkpoint saved is still there."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot save the checkpoint of step {run.progress.step}: {e.strerror or e}; {_kept(run)}") from None


def _diverged(run: Run, step: int, found: str) -> UserError:
    """A loss, gradient or weight that is NaN or infinite: the run stops (resuming would meet it again)."""
    return UserError(
        f"training diverged at step {step}: {found}; {_kept(run)} (start again with a lower --lr or a longer --warmup)"
    )


def _save_interrupted(run: Run) -> None:
    """Ctrl-C: rank 0 saves the state to resume from (and the model, without validation data to choose it)."""
    if run.world.distributed:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes Ctrl-C on again: let the save finish
    if not run.world.is_main:
        return
    with _saving(run):
        save_train_state(run.out, run.model, run.optimizer, run.opts, run.progress, run.world.size, run.scaler)
        if not run.valid_examples:
            checkpoint.save_model(run.out, run.model, run.tgt_tok, run.src_tok, run.generation)
    warn(f"interrupted at step {run.progress.step}; resume with: llmcli train --resume {run.out}")


def remove_train_state(out: str | Path) -> None:
    """Drop the resumable state (keeps the model) to make a directory small enough to share."""
    shutil.rmtree(Path(out) / STATE_DIR, ignore_errors=True)
