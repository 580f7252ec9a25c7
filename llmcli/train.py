"""The training loop: tokenizer, model, token-count batches, AdamW, schedule, validation,
checkpoints that resume bit for bit, Ctrl-C that saves.

A run's directory holds the model to use (the best by validation loss, or the last
without validation) and `train_state/`, everything needed to continue exactly:
the last weights, the optimizer's moments, the RNG states and the data position.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F

from llmcli import checkpoint
from llmcli.config import PRESETS, ModelConfig, preset
from llmcli.data import IGNORE_INDEX, Batch, Example, collate, example_length, lm_examples, make_batches, seq2seq_example
from llmcli.errors import UserError
from llmcli.io import atomic_write, read_lines, warn
from llmcli.model import Transformer
from llmcli.qa_data import qa_source, read_qa_records
from llmcli.tokenizer import Tokenizer, train_tokenizer

Task = Literal["translate", "summarize", "qa", "generate"]
STATE_DIR = "train_state"


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
    batch_tokens: int = 4096
    accumulate: int = 1
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

    # What may change when resuming; everything else is taken from the run being resumed.
    RESUMABLE = ("max_steps", "max_minutes", "valid_every", "save_every", "patience", "device")


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
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


def save_train_state(out: Path, model: Transformer, opt: torch.optim.Optimizer, opts: TrainOptions, progress: Progress) -> None:
    paths = _state_paths(out)
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng.cuda.{i}"] = s
    checkpoint.save_weights(paths["model"], checkpoint.model_tensors(model))
    checkpoint.save_weights(paths["optimizer"], {**opt_tensors, **rng})
    state = {
        "options": {k: v for k, v in dataclasses.asdict(opts).items()},
        "progress": dataclasses.asdict(progress),
        "optimizer": opt_meta,
    }
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


# ---------------------------------------------------------------- the loop


def _loss(model: Transformer, batch: Batch, label_smoothing: float) -> tuple[torch.Tensor, int]:
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
def evaluate_loss(model: Transformer, examples: list[Example], pad_id: int, batch_tokens: int, device) -> float:
    """Mean cross-entropy per target token (nats), without label smoothing."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = [example_length(ex) for ex in examples]
    for idx in make_batches(lengths, batch_tokens, seed=0, epoch=0):
        loss, n = _loss(model, collate([examples[i] for i in idx], pad_id).to(device), 0.0)
        total += loss.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train(opts: TrainOptions, reporter: Reporter | None = None, resume: bool = False) -> TrainResult:
    reporter = reporter or SilentReporter()
    out = Path(opts.out)
    progress = Progress()
    saved = None
    if resume:
        saved = load_train_state(out)
        stored = saved["options"]
        for key in TrainOptions.RESUMABLE:
            stored[key] = getattr(opts, key)
        stored["out"] = str(out)
        opts = TrainOptions(**stored)
        progress = Progress(**saved["progress"])
        if progress.step >= opts.max_steps:
            raise UserError(f"{out} already trained {progress.step} steps; raise --max-steps to continue")
    elif out.exists() and (out / STATE_DIR).exists():
        raise UserError(f"{out} already holds a training run; use --resume {out} to continue it, or another --out")
    if opts.batch_tokens < 16 or opts.accumulate < 1 or opts.max_steps < 1:
        raise UserError("--batch-tokens must be at least 16, --accumulate and --max-steps at least 1")

    device = resolve_device(opts.device)

    corpus = read_corpus(opts, "training")
    valid_corpus = read_corpus(opts, "validation")
    if resume:
        tgt_tok = Tokenizer.load(out / checkpoint.TOKENIZER_FILE)
        src_file = out / checkpoint.SOURCE_TOKENIZER_FILE
        src_tok = Tokenizer.load(src_file) if src_file.exists() else tgt_tok
        cfg = ModelConfig.load(out / checkpoint.CONFIG_FILE)
    else:
        reporter.log("training the tokenizer" if not opts.tokenizer else f"using tokenizer {opts.tokenizer}")
        src_tok, tgt_tok = _train_or_load_tokenizers(opts, corpus, out)
        cfg = make_config(opts, src_tok, tgt_tok)
    examples = build_examples(corpus, src_tok, tgt_tok, cfg, opts)
    if not examples:
        raise UserError("the training set is empty after tokenization")
    valid_examples = build_examples(valid_corpus, src_tok, tgt_tok, cfg, opts) if valid_corpus else []
    lengths = [example_length(ex) for ex in examples]

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
    generation = {"task": opts.task}
    if saved is not None:
        state_paths = _state_paths(out)
        checkpoint.load_state_into(model, checkpoint.load_weights(state_paths["model"]), str(state_paths["model"]))
        opt_file = checkpoint.load_weights(state_paths["optimizer"])
        _restore_optimizer(opt, {k: v for k, v in opt_file.items() if not k.startswith("rng.")}, saved["optimizer"])
        torch.set_rng_state(opt_file["rng.torch"])
        cuda_states = [opt_file[k] for k in sorted(k for k in opt_file if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    else:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.save_model(out, model, tgt_tok, src_tok, generation)

    reporter.log(
        f"{cfg.architecture} model, {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {cfg.vocab_size}, "
        f"{len(examples)} training examples, device {device.type}"
    )
    save_every = opts.save_every or opts.valid_every
    start_time = time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
    tokens_per_second = 0.0
    tokens_this_run = 0
    last_loss = None
    valid_loss = progress.best_valid_loss
    stopped_early = False

    def save(final: bool = False) -> None:
        nonlocal valid_loss
        improved = True
        if valid_examples:
            valid_loss = evaluate_loss(model, valid_examples, cfg.pad_id, opts.batch_tokens, device)
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
        if improved:
            checkpoint.save_model(out, model, tgt_tok, src_tok, generation)
        save_train_state(out, model, opt, opts, progress)

    epoch_batches = make_batches(lengths, opts.batch_tokens, opts.seed, progress.epoch)

    def next_batch() -> list[int]:
        nonlocal epoch_batches
        if progress.batch_in_epoch >= len(epoch_batches):
            progress.epoch += 1
            progress.batch_in_epoch = 0
            epoch_batches = make_batches(lengths, opts.batch_tokens, opts.seed, progress.epoch)
        idx = epoch_batches[progress.batch_in_epoch]
        progress.batch_in_epoch += 1
        return idx

    reporter.start(opts.max_steps, progress.step)
    try:
        while progress.step < opts.max_steps:
            batches = [collate([examples[i] for i in next_batch()], cfg.pad_id) for _ in range(opts.accumulate)]
            n_tokens = sum(b.n_target_tokens for b in batches)
            lr = learning_rate(progress.step + 1, opts)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for batch in batches:
                loss, _ = _loss(model, batch.to(device), opts.label_smoothing)
                (loss / max(n_tokens, 1)).backward()
                step_loss += loss.item()
            if opts.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_norm)
            opt.step()
            progress.step += 1
            progress.tokens_seen += n_tokens
            tokens_this_run += n_tokens
            last_loss = step_loss / max(n_tokens, 1)
            window_tokens += n_tokens
            now = time.monotonic()
            if now - window_start >= 2.0:
                tokens_per_second = window_tokens / (now - window_start)
                window_tokens, window_start = 0, now
            elapsed = now - start_time
            rate = tokens_per_second or tokens_this_run / max(elapsed, 1e-9)
            reporter.step(StepReport(progress.step, opts.max_steps, last_loss, lr, rate, elapsed))
            out_of_time = opts.max_minutes is not None and elapsed >= opts.max_minutes * 60
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
        save_train_state(out, model, opt, opts, progress)
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
