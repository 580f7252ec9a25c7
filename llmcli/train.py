"""The training loop: tokenizer, model, token-count batches, AdamW, schedule, validation,
checkpoints that resume bit for bit, Ctrl-C that saves.

A run's directory holds the model to use (the best by validation loss, or the last
without validation) and `train_state/`, everything needed to continue exactly:
the last weights, the optimizer's moments and the data position. Dropout is seeded
per batch from (seed, epoch, batch index), so there is no RNG state to carry and a
batch gets the same dropout on any process.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F

from llmcli import checkpoint, distributed
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
from llmcli.distributed import World, all_reduce_sum, broadcast_from_main, join, leave, world_from_env
from llmcli.errors import UserError
from llmcli.io import atomic_write, read_lines, warn
from llmcli.model import Transformer
from llmcli.qa_data import qa_source, read_qa_records
from llmcli.tokenizer import Tokenizer, train_tokenizer

Task = Literal["translate", "summarize", "qa", "generate"]
Precision = Literal["fp32", "bf16", "fp16"]
STATE_DIR = "train_state"
CHECKPOINTS_DIR = "checkpoints"  # step-NNNNNNN/ model directories kept for `llmcli average`


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
    tokenizer_kind: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 8000
    shared_vocab: bool = True
    preset: str = "small"
    config_overrides: dict | None = None  # ModelConfig fields over the preset
    block_size: int = 256  # decoder-only: tokens per training sequence
    batch_tokens: int = 4096  # padded tokens per batch, on each process
    # Batches per optimizer step on each process. None: 1 for a new run; when resuming,
    # whatever keeps the run's global batch (accumulate x processes) on this many processes.
    accumulate: int | None = None
    lr: float = 7e-4
    warmup_steps: int = 400
    schedule: Literal["inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    max_steps: int = 10000
    max_minutes: float | None = None
    valid_every: int = 500
    save_every: int | None = None  # default: valid_every
    patience: int | None = None  # early stopping after this many validations without improvement
    seed: int = 1
    device: str = "auto"
    precision: Precision = "fp32"  # bf16 and fp16: autocast; fp16 with a gradient scaler
    keep_checkpoints: int = 0  # keep the model of the last N saves under checkpoints/

    # What may change when resuming; everything else is taken from the run being resumed
    # (accumulate has its own rule, see `accumulate` above).
    RESUMABLE = ("max_steps", "max_minutes", "valid_every", "save_every", "patience", "device", "precision", "keep_checkpoints")


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed, by all processes together
    best_valid_loss: float | None = None
    validations_without_improvement: int = 0
    tokens_seen: int = 0


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


def learning_rate(step: int, opts: TrainOptions) -> float:
    """Linear warmup to opts.lr, then inverse square root (Vaswani et al.) or cosine decay to 10%."""
    step = max(step, 1)
    warmup = max(opts.warmup_steps, 1)
    if step <= warmup:
        return opts.lr * step / warmup
    if opts.schedule == "inverse_sqrt":
        return opts.lr * math.sqrt(warmup / step)
    if opts.schedule == "cosine":
        progress = min((step - warmup) / max(opts.max_steps - warmup, 1), 1.0)
        return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return opts.lr


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
        raise UserError(f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; use --device cuda or auto")
    if world.local_rank >= torch.cuda.device_count():
        raise UserError(f"process {world.rank} has LOCAL_RANK {world.local_rank} but this node has {torch.cuda.device_count()} GPUs; lower --nproc-per-node")
    return torch.device("cuda", world.local_rank)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, in one line, what this device cannot do."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision {precision!r} is not fp32, bf16 or fp16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
        raise UserError(f"--precision bf16 needs a GPU with bfloat16 (Ampere or newer); {name} has none: use fp16")
    if precision != "fp32" and device.type not in ("cuda", "cpu"):
        raise UserError(f"--precision {precision} is for cuda and cpu; use fp32 on {device.type}")


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
        raise UserError(f"{split} data needs both --{'valid-' if split == 'validation' else ''}src and --{'valid-' if split == 'validation' else ''}tgt")
    sources, targets = read_lines(src), read_lines(tgt)
    if len(sources) != len(targets):
        raise UserError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; they must be line-aligned")
    keep = [i for i, (s, t) in enumerate(zip(sources, targets)) if s.strip() and t.strip()]
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


def _train_or_load_tokenizers(opts: TrainOptions, corpus: Corpus, out: Path) -> tuple[Tokenizer, Tokenizer]:
    if opts.tokenizer:
        path = Path(opts.tokenizer)
        if path.is_dir():
            tgt = Tokenizer.load(path / checkpoint.TOKENIZER_FILE)
            src_file = path / checkpoint.SOURCE_TOKENIZER_FILE
            return (Tokenizer.load(src_file) if src_file.exists() else tgt), tgt
        tok = Tokenizer.load(path)
        return tok, tok
    kw = dict(vocab_size=opts.vocab_size, kind=opts.tokenizer_kind)
    if corpus.sources is None or opts.shared_vocab:
        tok = train_tokenizer((corpus.sources or []) + corpus.targets, **kw)
        return tok, tok
    return train_tokenizer(corpus.sources, **kw), train_tokenizer(corpus.targets, **kw)


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
    return [seq2seq_example(s, t, start_id=cfg.start_id, eos_id=cfg.eos_id, max_len=cfg.max_positions) for s, t in zip(src_ids, tgt_ids)]


def make_config(opts: TrainOptions, src_tok: Tokenizer, tgt_tok: Tokenizer) -> ModelConfig:
    decoder_only = opts.task == "generate"
    fields = dict(
        architecture="decoder-only" if decoder_only else "encoder-decoder",
        vocab_size=src_tok.vocab_size,
        pad_id=tgt_tok.pad_id,
        bos_id=tgt_tok.bos_id,
        eos_id=tgt_tok.eos_id,
    )
    if not decoder_only and src_tok is not tgt_tok:
        fields.update(tgt_vocab_size=tgt_tok.vocab_size, shared_embeddings=False)
    fields.update(opts.config_overrides or {})
    if opts.preset not in PRESETS:
        raise UserError(f"unknown --preset {opts.preset!r}; choose one of {', '.join(PRESETS)}")
    return preset(opts.preset, **fields)


# ---------------------------------------------------------------- state files


def _state_paths(out: Path) -> dict[str, Path]:
    d = out / STATE_DIR
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
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_train_state(
    out: Path,
    model: Transformer,
    opt: torch.optim.Optimizer,
    opts: TrainOptions,
    progress: Progress,
    world_size: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    paths = _state_paths(out)
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
    # The state file goes last: its presence means the files beside it are complete.
    with atomic_write(paths["state"]) as f:
        json.dump(state, f, indent=1)


def load_train_state(out: Path) -> dict:
    paths = _state_paths(out)
    if not paths["state"].is_file():
        raise UserError(f"{out}: nothing to resume (no {STATE_DIR}/state.json)")
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
        log(f"resuming on {world.size} processes (was {stored_world}): --accumulate {accumulate} keeps {global_batches} batches per step")
    return accumulate


def _keep_checkpoint(out: Path, step: int, keep: int, model: Transformer, tgt_tok, src_tok, generation: dict) -> None:
    root = out / CHECKPOINTS_DIR
    checkpoint.save_model(root / f"step-{step:07d}", model, tgt_tok, src_tok, generation)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the loop


def _loss(model: torch.nn.Module, batch: Batch, label_smoothing: float) -> tuple[torch.Tensor, int]:
    logits = model(batch.tokens, batch.src, batch.src_mask)
    V = logits.shape[-1]
    loss = F.cross_entropy(
        logits.reshape(-1, V).float(),
        batch.labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
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
        {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters else {"broadcast_buffers": False}
    )
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def train(opts: TrainOptions, reporter: Reporter | None = None, resume: bool = False) -> TrainResult:
    """Train on this process, or on every process of a torchrun job (each calls this)."""
    world = world_from_env()
    reporter = reporter if reporter is not None and world.is_main else SilentReporter()
    out = Path(opts.out)
    progress = Progress()
    saved = None
    if resume:
        saved = load_train_state(out)
        stored = dict(saved["options"])
        for key in TrainOptions.RESUMABLE:
            stored[key] = getattr(opts, key)
        stored["out"] = str(out)
        requested_accumulate = opts.accumulate
        opts = TrainOptions(**stored)
        opts.accumulate = _resumed_accumulate(saved, requested_accumulate, world, out, reporter.log)
        progress = Progress(**saved["progress"])
        if progress.step >= opts.max_steps:
            raise UserError(f"{out} already trained {progress.step} steps; raise --max-steps to continue")
    else:
        if out.exists() and (out / STATE_DIR).exists():
            raise UserError(f"{out} already holds a training run; use --resume {out} to continue it, or another --out")
        opts = dataclasses.replace(opts, accumulate=1 if opts.accumulate is None else opts.accumulate)
    if opts.batch_tokens < 16 or opts.accumulate < 1 or opts.max_steps < 1:
        raise UserError("--batch-tokens must be at least 16, --accumulate and --max-steps at least 1")
    if opts.keep_checkpoints < 0:
        raise UserError("--keep-checkpoints must be 0 (none) or more")

    device = process_device(opts.device, world)
    check_precision(opts.precision, device)
    corpus = read_corpus(opts, "training")
    valid_corpus = read_corpus(opts, "validation")
    join(world, device)
    try:
        result = _train(opts, reporter, saved, progress, world, device, corpus, valid_corpus)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        if world.distributed and distributed.lost_peer(e):
            raise distributed.PeerLost(f"process {world.rank} of {world.size} stopped: another process failed or stopped answering") from e
        raise
    leave(world)  # not on an exception: a collective with a dead peer may be what raised
    return result


def _train(
    opts: TrainOptions,
    reporter: Reporter,
    saved: dict | None,
    progress: Progress,
    world: World,
    device: torch.device,
    corpus: Corpus,
    valid_corpus: Corpus | None,
) -> TrainResult:
    out = Path(opts.out)
    if saved is not None:
        tgt_tok = Tokenizer.load(out / checkpoint.TOKENIZER_FILE)
        src_file = out / checkpoint.SOURCE_TOKENIZER_FILE
        src_tok = Tokenizer.load(src_file) if src_file.exists() else tgt_tok
        cfg = ModelConfig.load(out / checkpoint.CONFIG_FILE)
    else:
        src_tok = tgt_tok = None
        if world.is_main:
            reporter.log("training the tokenizer" if not opts.tokenizer else f"using tokenizer {opts.tokenizer}")
            src_tok, tgt_tok = _train_or_load_tokenizers(opts, corpus, out)
        src_tok, tgt_tok = _share_tokenizers(src_tok, tgt_tok, world)
        cfg = make_config(opts, src_tok, tgt_tok)
    examples = build_examples(corpus, src_tok, tgt_tok, cfg, opts)
    if not examples:
        raise UserError("the training set is empty after tokenization")
    valid_examples = build_examples(valid_corpus, src_tok, tgt_tok, cfg, opts) if valid_corpus else []
    stream = BatchStream([example_length(ex) for ex in examples], opts.batch_tokens, opts.seed)
    n_targets = [target_tokens(ex) for ex in examples]

    torch.manual_seed(opts.seed)
    model = Transformer(cfg).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr,
        betas=(0.9, 0.98),
        eps=1e-9,
        foreach=True,  # one kernel per step for all tensors; the per-tensor loop dominates small models on CPU
    )
    scaler = torch.amp.GradScaler(device.type) if opts.precision == "fp16" else None
    generation = {"task": opts.task}
    if saved is not None:
        state_paths = _state_paths(out)
        checkpoint.load_state_into(model, checkpoint.load_weights(state_paths["model"]), str(state_paths["model"]))
        opt_file = checkpoint.load_weights(state_paths["optimizer"])
        # Runs saved before dropout was seeded per batch also stored RNG states: not needed.
        _restore_optimizer(opt, {k: v for k, v in opt_file.items() if not k.startswith("rng.")}, saved["optimizer"])
        if scaler is not None and "grad_scaler" in saved:
            scaler.load_state_dict(saved["grad_scaler"])
    elif world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.save_model(out, model, tgt_tok, src_tok, generation)
    ddp = _data_parallel(model, device) if world.distributed else None
    forward = ddp if ddp is not None else model

    per_step = opts.accumulate * world.size
    reporter.log(
        f"{cfg.architecture} model, {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {cfg.vocab_size}, "
        f"{len(examples)} training examples, device {device.type}"
        + (f", {world.size} processes" if world.distributed else "")
        + (f", {opts.precision}" if opts.precision != "fp32" else "")
    )
    if world.distributed:
        reporter.log(f"global batch: {world.size} processes x --accumulate {opts.accumulate} x --batch-tokens {opts.batch_tokens}")
    save_every = opts.save_every or opts.valid_every
    start_time = time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
    tokens_per_second = 0.0
    tokens_this_run = 0
    last_loss = None
    valid_loss = progress.best_valid_loss
    stopped_early = False

    def save() -> None:
        nonlocal valid_loss
        improved = True
        if valid_examples:
            valid_loss = evaluate_loss(model, valid_examples, cfg.pad_id, opts.batch_tokens, device, world, opts.precision)
            improved = progress.best_valid_loss is None or valid_loss < progress.best_valid_loss
            if improved:
                progress.best_valid_loss = valid_loss
                progress.validations_without_improvement = 0
            else:
                progress.validations_without_improvement += 1
            reporter.log(
                f"step {progress.step}: validation loss {valid_loss:.4f}, perplexity {math.exp(min(valid_loss, 50)):.2f}"
                + (" (best)" if improved else "")
            )
        if not world.is_main:
            return
        if opts.keep_checkpoints:
            _keep_checkpoint(out, progress.step, opts.keep_checkpoints, model, tgt_tok, src_tok, generation)
        if improved:
            checkpoint.save_model(out, model, tgt_tok, src_tok, generation)
        save_train_state(out, model, opt, opts, progress, world.size, scaler)

    reporter.start(opts.max_steps, progress.step)
    try:
        while progress.step < opts.max_steps:
            group, next_epoch, next_index = stream.take(progress.epoch, progress.batch_in_epoch, per_step)
            n_tokens = sum(n_targets[i] for _, _, idx in group for i in idx)
            mine = group[world.rank :: world.size]
            lr = learning_rate(progress.step + 1, opts)
            for param_group in opt.param_groups:
                param_group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for k, (epoch, index, idx) in enumerate(mine):
                batch = collate([examples[i] for i in idx], cfg.pad_id).to(device)
                _seed_dropout(opts.seed, epoch, index)
                # Gradients are summed over processes once per step, after the last batch.
                sync = ddp is None or k == len(mine) - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with _autocast(opts.precision, device):
                        loss, _ = _loss(forward, batch, opts.label_smoothing)
                    # DDP averages over processes; times world.size makes it the sum.
                    scaled = loss / max(n_tokens, 1)
                    if world.distributed:
                        scaled = scaled * world.size
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += loss.item()
            if scaler is not None:
                scaler.unscale_(opt)
            if opts.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            progress.step += 1
            progress.epoch, progress.batch_in_epoch = next_epoch, next_index
            progress.tokens_seen += n_tokens
            tokens_this_run += n_tokens
            now = time.monotonic()
            elapsed = now - start_time
            out_of_time = opts.max_minutes is not None and elapsed >= opts.max_minutes * 60
            if world.distributed:
                # One small all-reduce a step: the loss of all processes, and whether any is out of time.
                step_loss, any_out_of_time = all_reduce_sum([step_loss, float(out_of_time)], world, device)
                out_of_time = any_out_of_time > 0
            last_loss = step_loss / max(n_tokens, 1)
            window_tokens += n_tokens
            if now - window_start >= 2.0:
                tokens_per_second = window_tokens / (now - window_start)
                window_tokens, window_start = 0, now
            rate = tokens_per_second or tokens_this_run / max(elapsed, 1e-9)
            reporter.step(StepReport(progress.step, opts.max_steps, last_loss, lr, rate, elapsed))
            if progress.step % save_every == 0 or progress.step == opts.max_steps or out_of_time:
                save()
                if opts.patience is not None and progress.validations_without_improvement >= opts.patience:
                    reporter.log(f"stopping early: no improvement in {opts.patience} validations")
                    stopped_early = True
                    break
            if out_of_time:
                reporter.log(f"stopping: --max-minutes {opts.max_minutes} reached at step {progress.step}")
                break
    except KeyboardInterrupt:
        reporter.stop()
        if world.distributed:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes Ctrl-C on again: let the save finish
        if world.is_main:
            save_train_state(out, model, opt, opts, progress, world.size, scaler)
            if not valid_examples:
                checkpoint.save_model(out, model, tgt_tok, src_tok, generation)
            warn(f"interrupted at step {progress.step}; resume with: llmcli train --resume {out}")
        raise
    finally:
        reporter.stop()
    elapsed = time.monotonic() - start_time
    return TrainResult(
        out=out,
        steps=progress.step,
        last_loss=last_loss,
        valid_loss=valid_loss,
        valid_perplexity=math.exp(min(valid_loss, 50)) if valid_loss is not None else None,
        tokens_per_second=tokens_this_run / max(elapsed, 1e-9),
        elapsed=elapsed,
        parameters=model.num_parameters(),
        stopped_early=stopped_early,
    )


def remove_train_state(out: str | Path) -> None:
    """Drop the resumable state (keeps the model) to make a directory small enough to share."""
    shutil.rmtree(Path(out) / STATE_DIR, ignore_errors=True)
