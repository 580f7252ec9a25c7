"""The `llmcli` command line: parse, call one library function, print.

No torch at import time, so `llmcli --help` is instant; library modules are imported
inside the commands.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable

import typer

from llmcli.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train and run Transformer models from the shell: translate, summarize, qa, generate, eval.",
)


class _State:
    debug = bool(os.environ.get("LLMCLI_DEBUG"))


def handle_errors(command: Callable) -> Callable:
    """User errors become one line on stderr and exit 2; Ctrl-C exits 130; bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            if _State.debug:
                raise
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"llmcli: error: {message}", file=sys.stderr, flush=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("llmcli: interrupted", file=sys.stderr, flush=True)
            raise typer.Exit(130) from None
        except Terminated:
            # A worker llmcli launched is stopped by torchrun when another fails, and may be in the
            # middle of reporting its own error: the launcher says what happened, once.
            from llmcli import distributed

            if not distributed.launched_by_llmcli():
                print("llmcli: terminated", file=sys.stderr, flush=True)
            raise typer.Exit(143) from None
        except PermissionError as e:  # a model directory, input or output the user may not read or write
            if _State.debug:
                raise
            print(f"llmcli: error: {e.filename or 'a file'}: {e.strerror or 'permission denied'}", file=sys.stderr, flush=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno not in _WRITE_FAILURES:
                raise
            _discard_stdout()  # else the exit's own flush of stdout fails again, with a traceback
            print(f"llmcli: error: cannot write: {e.strerror}", file=sys.stderr, flush=True)
            raise typer.Exit(1) from None

    return wrapper


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so files are closed and whole lines flushed, as for Ctrl-C."""


# A full disk, a quota, or RLIMIT_FSIZE (SIGXFSZ being ignored): the environment, not a bug.
_WRITE_FAILURES = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _discard_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("llmcli")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed)"
        print(f"llmcli {number}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print llmcli's version and exit."
    ),
) -> None:
    if debug:
        _State.debug = True


def _set_quiet(quiet: bool) -> None:
    from llmcli.io import settings

    settings.quiet = quiet


QUIET = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr (errors still appear).")


@app.command()
@handle_errors
def train(
    task: str = typer.Option(
        None,
        help="translate | summarize | qa (encoder-decoder) or generate (decoder-only); required but with --resume.",
        show_default=False,
    ),
    out: str = typer.Option(None, "--out", "-o", help="Model directory to write (required unless --resume)."),
    src: str = typer.Option(None, help="Source text, one example per line (translate, summarize)."),
    tgt: str = typer.Option(None, help="Target text, line-aligned with --src."),
    text: list[str] = typer.Option(None, help="Plain text to learn from (generate); may repeat."),
    data: str = typer.Option(None, help="QA data: JSONL with question, context, answer; or SQuAD json."),
    valid_src: str = typer.Option(None, help="Validation source (translate, summarize)."),
    valid_tgt: str = typer.Option(None, help="Validation target."),
    valid_text: list[str] = typer.Option(None, help="Validation text (generate)."),
    valid_data: str = typer.Option(None, help="Validation QA data."),
    tokenizer: str = typer.Option(None, help="Use this tokenizer.json (or a model directory's) instead of training one."),
    tokenizer_kind: str = typer.Option("bpe", help="bpe | unigram, for a newly trained tokenizer."),
    vocab_size: int = typer.Option(
        None, help="Vocabulary size of a newly trained tokenizer (default: scaled to the training text, 1000-32000)."
    ),
    shared_vocab: bool = typer.Option(
        True,
        "--shared-vocab/--separate-vocab",
        "--no-separate-vocab/",
        help="One vocabulary for source and target, or separate ones.",
    ),
    preset: str = typer.Option("small", help="Model size: tiny | small | base."),
    config_overrides: list[str] = typer.Option(
        None, "--set", help="Override a config field, e.g. --set d_model=384 (repeatable)."
    ),
    batch_tokens: int = typer.Option(
        None,
        help="Tokens per batch (padded) on each process, batches grouped by length (default: 2048 on a CPU, 4096 on a GPU).",
        show_default=False,
    ),
    accumulate: int = typer.Option(
        None,
        help="Batches per optimizer step on each process (gradient accumulation); global batch = batch-tokens x accumulate x processes. Default 1; on --resume, what keeps the run's global batch.",
        show_default=False,
    ),
    lr: float = typer.Option(
        None,
        help="Peak learning rate (default: for the post-norm small preset 2e-3 over a fifth of a run of 1,300 steps or more, else 1.4e-3; 1e-3 for tiny and a decoder-only small, 7e-4 for base).",
        show_default=False,
    ),
    warmup_steps: int = typer.Option(
        None,
        "--warmup",
        help="Linear warmup steps (default: a tenth of the run, at most 400; the post-norm small preset's 2e-3 a fifth, at most 500).",
        show_default=False,
    ),
    schedule: str = typer.Option(
        "linear",
        help="After warmup: linear (to zero at --max-steps, or at the steps --max-minutes buys) | inverse_sqrt | cosine | constant.",
    ),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the training loss."),
    clip_norm: float = typer.Option(1.0, help="Gradient clipping norm (0: off)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    max_steps: int = typer.Option(
        None,
        help="Stop after this many optimizer steps (default: 10000; with --max-minutes, the time decides).",
        show_default=False,
    ),
    max_minutes: float = typer.Option(
        None, help="Time budget of the whole run (tokenizer, steps, last save); the schedule fits it."
    ),
    valid_every: int = typer.Option(
        None,
        help="Validate and save every N steps (default: 500; with --max-minutes, every twentieth of the budget).",
        show_default=False,
    ),
    patience: int = typer.Option(None, help="Stop after N validations without improvement."),
    block_size: int = typer.Option(256, help="generate: tokens per training sequence."),
    seed: int = typer.Option(1, help="Random seed: same seed, same data, same model."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (under torchrun: each process its LOCAL_RANK's GPU)."),
    precision: str = typer.Option(
        None,
        help="fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler). Default: bf16 where the GPU has it, or the CPU has avx512_bf16 or amx_bf16 and d_model is 256 or more; else fp32; on --resume, the run's own.",
        show_default=False,
    ),
    nproc: int = typer.Option(None, help="Train on N processes of this machine (GPUs, or CPU with gloo) through torchrun."),
    keep_checkpoints: int = typer.Option(
        0, help="Keep the model of the last N saves under OUT/checkpoints/ (for llmcli average)."
    ),
    average: int = typer.Option(
        None,
        help="At the end, average the last N saves; the average is the model if it validates better "
        "(default: 5 with validation data, else 0).",
        show_default=False,
    ),
    resume: str = typer.Option(
        None, help="Continue the run in this directory exactly where it stopped (on any number of processes)."
    ),
    ensemble: int = typer.Option(
        None,
        help="Train N models side by side, each on 1/N of the CPU threads, into one directory that translate, summarize and qa decode together (default: 2 for translate on a CPU of 2 or more threads with --max-minutes, else 1).",
        show_default=False,
    ),
    quiet: bool = QUIET,
) -> None:
    """Train a model (and its tokenizer) from your own text files.

    Example: llmcli train --task translate --src train.en --tgt train.de --valid-src val.en --valid-tgt val.de --out en-de
    (add --nproc 4 for 4 GPUs; or start it under torchrun, as in the README)
    """
    # The parameters are TrainOptions fields of the same names (TrainOptions checks them),
    # but for the command's own nproc, resume and quiet.
    fields = dict(locals())
    del fields["nproc"], fields["resume"], fields["quiet"], fields["ensemble"]
    from llmcli import distributed

    if nproc is not None and nproc < 1:
        raise UserError("--nproc must be at least 1")
    if ensemble is not None and ensemble < 1:
        raise UserError("--ensemble must be at least 1")
    if nproc is not None and nproc > 1:
        if ensemble is not None and ensemble > 1:
            raise UserError("--ensemble trains its models on this machine's CPU threads; leave out --nproc")
        if distributed.world_from_env().distributed:
            raise UserError("--nproc starts torchrun; under torchrun leave it out")
        if "train" not in sys.argv[1:]:
            raise UserError("--nproc works from the llmcli command line; from Python, start torchrun yourself")
        raise typer.Exit(distributed.launch(nproc, distributed.strip_nproc(sys.argv[1:]), debug=_State.debug))
    world = distributed.world_from_env()
    quiet = quiet or not world.is_main  # one process reports: rank 0
    _set_quiet(quiet)
    from llmcli import train_ensemble
    from llmcli.progress import TrainReporter
    from llmcli.train import TrainOptions
    from llmcli.train import train as run_training

    reporter = TrainReporter(quiet=quiet)
    try:
        # --resume DIR is the run's --out.
        fields.update(out=resume or out, config_overrides=_parse_overrides(config_overrides or []))
        if task is None:  # --resume takes the run's own, whatever is given
            if resume is None:
                raise UserError("--task is required: translate, summarize, qa or generate")
            fields["task"] = train_ensemble.resumed_task(resume)
        opts = TrainOptions(**fields)
        size, why = (ensemble, "--ensemble") if ensemble is not None else train_ensemble.auto_size(opts)
        if resume is not None and train_ensemble.is_ensemble_run(resume):
            results = train_ensemble.train_ensemble(opts, 0, functools.partial(TrainReporter, quiet=quiet), resume=True)
        elif resume is None and size > 1:
            if world.distributed:
                raise UserError("--ensemble trains its models on this machine's CPU threads; not under torchrun")
            if ensemble is None:
                reporter.log(f"chose {why}")
            results = train_ensemble.train_ensemble(opts, size, functools.partial(TrainReporter, quiet=quiet))
        else:
            results = [run_training(opts, reporter, resume=resume is not None)]
    except UserError as e:
        if not world.distributed:
            raise
        # Every process meets the same error: the launcher (or torchrun's summary) says it once.
        distributed.record_error(str(e).splitlines()[0] if str(e) else "UserError")
        if world.is_main and not distributed.launched_by_llmcli():
            raise
        raise typer.Exit(2) from None
    except distributed.PeerLost as e:
        if not distributed.launched_by_llmcli():  # else the launcher names the process that failed
            print(f"llmcli: error: {e}", file=sys.stderr, flush=True)
        raise typer.Exit(distributed.PEER_LOST_EXIT) from None
    except KeyboardInterrupt:
        if world.is_main:
            raise
        raise typer.Exit(130) from None
    except Terminated:
        # torchrun stops the other processes with SIGTERM when one fails: the launcher says why, once
        # (a worker's own "terminated" line raced it, and sometimes came first).
        if world.is_main and not distributed.launched_by_llmcli():
            raise
        raise typer.Exit(143) from None
    for result in results:
        summary = f"trained {result.steps} steps in {result.elapsed:.0f}s ({result.tokens_per_second:,.0f} target tokens/s)"
        if result.valid_loss is not None:
            summary += f", best validation loss {result.valid_loss:.4f} (perplexity {result.valid_perplexity:.2f})"
        reporter.log(summary + (f": {result.out}" if len(results) > 1 else ""))
    if len(results) > 1:
        reporter.log(
            f"ensemble of {len(results)} models saved in {fields['out']} (translate, summarize and qa decode them together)"
        )
    else:
        reporter.log(f"model saved in {results[0].out}")


MODEL_HELP = "Model: an llmcli directory, a Hugging Face directory or model id (default: $LLMCLI_MODEL, else `llmcli models default TASK`; translate: the demo model)."
MODEL = typer.Option(None, "--model", "-m", help=MODEL_HELP, show_default=False)
MODELS = typer.Option(
    None,
    "--model",
    "-m",
    help=MODEL_HELP
    + " Repeat it to decode encoder-decoders of one tokenizer together (an ensemble: the mean of their probabilities).",
    show_default=False,
)
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N.")
PRECISION = typer.Option(
    "fp32",
    help="fp32 (the same tokens as transformers) | bf16 (CPUs with avx512_bf16 or amx_bf16, GPUs) | int8 | int4 "
    "(CPU: quantized weights) | auto (what `llmcli info` says this machine picks).",
)
ON_LONG = typer.Option(None, help="Inputs longer than the model's positions: truncate (default) | error | skip, with a warning.")
CHUNK_LINES = typer.Option(None, help="Lines read, sorted by length and batched together (default 2000; 1 on a terminal).")
FORMAT = typer.Option("text", "--format", help="text | jsonl | tsv (index<TAB>score<TAB>text, one row per hypothesis).")
OUTPUT = typer.Option(None, "--output", "-o", help="Write here (atomically) instead of stdout.")
# Decoding options default to None, "not given": the model's own defaults (its generation.json)
# come first, then the task's (llmcli.tasks.TASK_DEFAULTS), which their help states.
BEAM = typer.Option(None, "--beam", "-b", help="Beam size (default: the model's, else 4; 1: greedy).")
N_BEST = typer.Option(None, help="Hypotheses per input (with --format jsonl or tsv; default 1).")
TEMPERATURE = typer.Option(None, help="Sampling temperature (default 0.8).")
TOP_K = typer.Option(None, help="Sample among the k most likely tokens (default 50; 0: all).")
TOP_P = typer.Option(None, help="Nucleus sampling mass (default 0.95).")
# Instruct (decoder-only) models: each input line is one chat message from the task's prompt
# (llmcli.tasks.INSTRUCT_PROMPTS, in the README).
PROMPT = typer.Option(
    None,
    help="Instruct models: the message each input becomes, with {text} (qa: {question}, {context}) and "
    "{source_lang}/{target_lang}; default: the task's prompt (README).",
)


def _instruction(prompt=None, source_lang=None, target_lang=None):
    from llmcli.tasks import Instruction

    return Instruction(prompt, source_lang, target_lang)


def _input_lines(files: list[str] | None):
    from llmcli.io import iter_lines

    files = files or ["-"]
    for path in files:
        yield from iter_lines(path)


def _write_outputs(outputs, fmt: str, output: str | None, quiet: bool, label: str) -> None:
    """Results to stdout (or atomically to --output), one line per input in text mode."""
    import json
    import time

    from llmcli.io import output_lines
    from llmcli.progress import LineProgress

    if fmt not in ("text", "jsonl", "tsv"):
        raise UserError(f"--format {fmt!r} is not text, jsonl or tsv")
    started, tokens = time.monotonic(), 0
    with LineProgress(quiet, label) as bar, output_lines(output) as writer:
        for index, result in enumerate(outputs):
            tokens += result.tokens
            if fmt == "text":
                writer.write(result.text)
            elif fmt == "jsonl":
                hyps = [{"text": t, "score": s} for t, s in zip(result.texts, result.scores)]
                writer.write(json.dumps({"index": index, "text": result.text, "hypotheses": hyps}, ensure_ascii=False))
            else:
                for text, score in zip(result.texts, result.scores):
                    writer.write(f"{index}\t{score:.6f}\t{text}")
            if bar.enabled:
                bar.update(index + 1, tokens, time.monotonic() - started)


def _seq2seq_command(task, files, model, device, precision, quiet, fmt, output, instruction, **settings):
    from llmcli.device import resolve_device
    from llmcli.tasks import DecodeSettings, open_model, seq2seq

    _set_quiet(quiet)
    if fmt == "text" and (settings.get("n_best") or 1) > 1:  # text is one line per input, for pipelines
        raise UserError(f"--n-best {settings['n_best']} needs --format jsonl or tsv: text gives one line per input")
    if not files and sys.stdin.isatty():
        settings["chunk_lines"] = 1  # someone is typing: answer each line as it comes
    decode = DecodeSettings(**settings)
    loaded = open_model(model, task, device=resolve_device(device), precision=precision)
    _write_outputs(seq2seq(loaded, _input_lines(files), decode, task, instruction), fmt, output, quiet, task)


@app.command()
@handle_errors
def translate(
    files: list[str] = typer.Argument(None, help="Input files, one sentence per line ('-' or none: stdin)."),
    model: list[str] = MODELS,
    beam: int = BEAM,
    n_best: int = N_BEST,
    length_penalty: float = typer.Option(None, help="Beam score = log-prob / length**alpha (default 1)."),
    max_len: int = typer.Option(None, help="Most output tokens (default: 2 x source + 10; instruct models 256)."),
    no_repeat_ngram: int = typer.Option(None, help="Never repeat an n-gram of this size (default 0: off)."),
    batch_tokens: int = typer.Option(None, help="Source tokens x beam per batch (default 4096)."),
    chunk_lines: int = CHUNK_LINES,
    fmt: str = FORMAT,
    output: str = OUTPUT,
    on_long: str = ON_LONG,
    prompt: str = PROMPT,
    source_lang: str = typer.Option(
        None, help="The input's language: instruct models a name (English); NLLB/M2M100 its code (eng_Latn, en)."
    ),
    target_lang: str = typer.Option(
        None, help="The language to translate into: instruct models a name (German); NLLB/M2M100 its code (deu_Latn, de)."
    ),
    device: str = DEVICE,
    precision: str = PRECISION,
    quiet: bool = QUIET,
) -> None:
    """Translate text, one output line per input line, in order.

    With an instruct (chat) model each line is one message: "Translate the following [SOURCE]
    text into TARGET. Reply with the translation only." then the line (--prompt replaces it).

    Example: llmcli translate -m en-de news.en > news.de;
    llmcli translate -m Qwen/Qwen2.5-0.5B-Instruct --target-lang German news.en;
    llmcli translate -m facebook/nllb-200-distilled-600M --source-lang eng_Latn --target-lang deu_Latn news.en
    """
    _seq2seq_command("translate", files, model, device, precision, quiet, fmt, output, _instruction(prompt, source_lang, target_lang),
                     beam_size=beam, n_best=n_best,
                     length_penalty=length_penalty, max_len=max_len, no_repeat_ngram_size=no_repeat_ngram,
                     batch_tokens=batch_tokens, chunk_lines=chunk_lines, on_long=on_long)  # fmt: skip


@app.command()
@handle_errors
def summarize(
    files: list[str] = typer.Argument(None, help="Input files, one document per line ('-' or none: stdin)."),
    model: list[str] = MODELS,
    beam: int = BEAM,
    n_best: int = N_BEST,
    length_penalty: float = typer.Option(None, help="Beam score = log-prob / length**alpha (default 1; higher: longer)."),
    max_len: int = typer.Option(None, help="Most summary tokens (default 128; instruct models 256)."),
    min_len: int = typer.Option(None, help="Fewest summary tokens (default 0)."),
    no_repeat_ngram: int = typer.Option(None, help="Never repeat an n-gram of this size (default 3; 0: off)."),
    batch_tokens: int = typer.Option(None, help="Source tokens x beam per batch (default 8192)."),
    chunk_lines: int = CHUNK_LINES,
    fmt: str = FORMAT,
    output: str = OUTPUT,
    on_long: str = ON_LONG,
    prompt: str = PROMPT,
    device: str = DEVICE,
    precision: str = PRECISION,
    quiet: bool = QUIET,
) -> None:
    """Summarize documents, one summary line per input line, in order.

    With an instruct (chat) model each document is one message: "Summarize the following text
    in one or two sentences. Reply with the summary only." then the document (--prompt replaces it).

    Example: llmcli summarize -m sum-model articles.txt > summaries.txt
    """
    _seq2seq_command("summarize", files, model, device, precision, quiet, fmt, output, _instruction(prompt),
                     beam_size=beam, n_best=n_best,
                     length_penalty=length_penalty, max_len=max_len, min_len=min_len,
                     no_repeat_ngram_size=no_repeat_ngram, batch_tokens=batch_tokens, chunk_lines=chunk_lines,
                     on_long=on_long)  # fmt: skip


@app.command()
@handle_errors
def qa(
    file: str = typer.Argument(None, help="JSONL with question and context per line, or SQuAD json ('-' or none: stdin)."),
    model: list[str] = MODELS,
    question: str = typer.Option(None, help="One question (with --context-file) instead of a JSONL input."),
    context_file: str = typer.Option(None, help="The context for --question."),
    beam: int = BEAM,
    max_len: int = typer.Option(None, help="Most answer tokens (default 64; instruct models 256)."),
    fmt: str = typer.Option("text", "--format", help="text | jsonl (answer and score)."),
    output: str = OUTPUT,
    on_long: str = ON_LONG,
    prompt: str = PROMPT,
    device: str = DEVICE,
    precision: str = PRECISION,
    quiet: bool = QUIET,
) -> None:
    """Answer questions about a context, one answer per line, in order.

    With an instruct (chat) model each record is one message: "Answer the question from the
    context. Reply with the answer only." then the context and the question (--prompt replaces it).

    Example: echo '{"question": "Who wrote it?", "context": "It was written by Ada."}' | llmcli qa -m qa-model
    """
    from llmcli.device import resolve_device
    from llmcli.io import read_text
    from llmcli.qa_data import QARecord, read_qa_records
    from llmcli.tasks import DecodeSettings, answer_questions, open_model

    _set_quiet(quiet)
    if question is not None:
        if context_file is None:
            raise UserError("--question needs --context-file FILE")
        records = [QARecord(question, read_text(context_file).strip())]
    else:
        records = read_qa_records(file)
    decode = DecodeSettings(beam_size=beam, max_len=max_len, on_long=on_long)
    loaded = open_model(model, "qa", device=resolve_device(device), precision=precision)
    _write_outputs(answer_questions(loaded, records, decode, _instruction(prompt)), fmt, output, quiet, "qa")


@app.command()
@handle_errors
def generate(
    prompt: str = typer.Argument(None, help="The text to continue (omit it for --input, or for prompts one per line on stdin)."),
    model: str = MODEL,
    input: str = typer.Option(None, "--input", "-i", help="One prompt per line from this file ('-': stdin)."),
    max_new_tokens: int = typer.Option(100, help="Most new tokens per prompt."),
    greedy: bool = typer.Option(None, "--greedy", help="Pick the most likely token (default: sample)."),
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    repetition_penalty: float = typer.Option(None, help="CTRL repetition penalty (default 1: off)."),
    seed: int = typer.Option(None, help="Random seed: same seed, same text."),
    echo: bool = typer.Option(False, help="Print the prompt before its continuation."),
    as_chat: bool = typer.Option(False, "--chat", help="Each prompt is one user message in the model's chat template."),
    system: str = typer.Option(None, "--system", help="With --chat: a system message before each prompt."),
    fmt: str = typer.Option("text", "--format", help="text (a newline in a reply is written as \\n) | jsonl."),
    output: str = OUTPUT,
    on_long: str = ON_LONG,
    device: str = DEVICE,
    precision: str = PRECISION,
    quiet: bool = QUIET,
) -> None:
    """Continue text with a decoder-only model; streams to a terminal as it is produced.

    Example: llmcli generate -m shakespeare "ROMEO:" --max-new-tokens 60 --seed 1

    Example: llmcli generate -m HuggingFaceTB/SmolLM2-135M-Instruct --chat "What is the capital of France?"
    """
    from llmcli.device import resolve_device
    from llmcli.tasks import DecodeSettings, open_model
    from llmcli.tasks import generate as run_generate

    _set_quiet(quiet)
    if prompt is not None and input is not None:
        raise UserError("give either a PROMPT or --input FILE, not both")
    if prompt is None and input is None:
        # In a pipeline the prompts come one per line on stdin, as translate's sources do.
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("give a PROMPT, --input FILE, or prompts one per line on stdin")
        input = "-"
    settings = DecodeSettings(sample=None if greedy is None else not greedy, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, on_long=on_long)  # fmt: skip
    if system is not None and not as_chat:
        raise UserError("--system needs --chat")
    loaded = open_model(model, "generate", device=resolve_device(device), precision=precision)
    if as_chat:
        _generate_chat(loaded, prompt, input, settings, max_new_tokens, system, echo, fmt, output, quiet)
        return
    if prompt is not None:
        stream = output is None and fmt == "text" and sys.stdout.isatty()
        shown = [0]

        def on_text(row, piece):
            sys.stdout.write(piece)
            sys.stdout.flush()
            shown[0] += len(piece)

        prefix = prompt if echo else ""
        if stream:
            sys.stdout.write(prefix)
        results = run_generate(loaded, [prompt], settings, max_new_tokens, on_text=on_text if stream else None)
        result = next(iter(results))
        if stream:
            sys.stdout.write(result.text[shown[0] :] + "\n")
            return
        if fmt == "text":
            from llmcli.io import output_lines

            with output_lines(output) as writer:
                writer.stream.write(prefix + result.text + "\n")
            return
        _write_outputs([result], fmt, output, quiet, "generate")
        return
    lines = list(_input_lines([input])) if echo else None
    results = run_generate(loaded, _input_lines([input]), settings, max_new_tokens)
    if echo:
        from llmcli.tasks import Output

        results = (Output([p + r.text], r.scores) for p, r in zip(lines, results))
    _write_outputs(results, fmt, output, quiet, "generate")


def _generate_chat(loaded, prompt, input, settings, max_new_tokens, system, echo, fmt, output, quiet) -> None:
    """`generate --chat`: each prompt one user message of its own conversation."""
    from llmcli.tasks import ChatSession, Output

    session = ChatSession(loaded, settings, max_new_tokens, system)
    if not session.templated:
        raise UserError(f"{loaded.path} has no chat template; without --chat, generate continues the text")
    if prompt is not None and output is None and fmt == "text" and sys.stdout.isatty():
        session.reply(prompt, on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    if prompt is not None and fmt == "text":  # one reply, whole, newlines and all, as generate prints one
        from llmcli.io import output_lines

        reply = session.reply(prompt)
        with output_lines(output) as writer:
            writer.stream.write((prompt + "\n" if echo else "") + reply + "\n")
        return
    prompts = [prompt] if prompt is not None else list(_input_lines([input]))
    results = session.each_alone(prompts)
    if echo:
        results = (Output([p + "\n" + r.text], r.scores) for p, r in zip(prompts, results))
    _write_outputs(results, fmt, output, quiet, "generate")


@app.command()
@handle_errors
def chat(
    model: str = MODEL,
    system: str = typer.Option(None, "--system", help="A system message to begin with (/system TEXT changes it)."),
    max_new_tokens: int = typer.Option(100, help="Most tokens per reply."),
    greedy: bool = typer.Option(None, "--greedy", help="Pick the most likely token (default: sample)."),
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    seed: int = typer.Option(None, help="Random seed."),
    device: str = DEVICE,
    precision: str = PRECISION,
    quiet: bool = QUIET,
) -> None:
    """Talk with a decoder-only model, a message a line. A model with a chat template (a Hugging
    Face instruct model) gets the conversation in it, as transformers' apply_chat_template
    writes it, and replies until its end-of-turn token, over several lines if it likes; sampling
    defaults come from its generation_config.json. Without a template: plain text, one line out.
    /system TEXT sets the system message (/system alone removes it), /reset forgets the turns,
    /exit or Ctrl-D ends.

    Example: llmcli chat -m HuggingFaceTB/SmolLM2-135M-Instruct --system "Answer briefly."
    """
    from llmcli.device import resolve_device
    from llmcli.io import iter_lines
    from llmcli.tasks import ChatSession, DecodeSettings, open_model

    _set_quiet(quiet)
    settings = DecodeSettings(sample=None if greedy is None else not greedy, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed)  # fmt: skip
    session = ChatSession(
        open_model(model, "chat", device=resolve_device(device), precision=precision), settings, max_new_tokens, system
    )
    interactive = sys.stdin.isatty()
    if interactive and not quiet:
        print("chat: /system TEXT sets the system message, /reset forgets the conversation, /exit or Ctrl-D ends it",
              file=sys.stderr)  # fmt: skip
    # Lines as every command reads them: bytes that are not UTF-8 become U+FFFD, with one warning.
    lines = iter_lines("-")
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        message = next(lines, None)
        if message is None:  # Ctrl-D or end of input
            if interactive:
                print(file=sys.stderr)
            return
        command = message.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            if interactive and not quiet:
                print("(conversation reset)", file=sys.stderr)
            continue
        if command == "/system" or command.startswith("/system "):
            session.set_system(command[len("/system") :].strip() or None)
            if interactive and not quiet:
                print("(system message set)" if session.conversation.system else "(no system message)", file=sys.stderr)
            continue

        def show(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        session.reply(message, on_text=show)
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
@handle_errors
def info(model: str = MODEL, json_: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Describe a model: architecture, size, vocabulary, positions, tasks.

    Example: llmcli info -m en-de
    """
    import json

    from llmcli.device import precision_facts
    from llmcli.tasks import describe, open_model

    facts = {**describe(open_model(model)), **precision_facts()}
    if json_:
        print(json.dumps(facts, ensure_ascii=False))
        return
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, int) and key == "parameters":
            value = f"{value:,}"
        print(f"{key:14} {value}")


models_app = typer.Typer(no_args_is_help=False, rich_markup_mode=None)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
@handle_errors
def list_models(ctx: typer.Context, json_: bool = typer.Option(False, "--json", help="One JSON object per model.")) -> None:
    """List the models on this machine: llmcli's cache (the demo, converted models), stored
    defaults, and the Hugging Face cache's models llmcli converts; with task, architecture, size.

    Example: llmcli models; llmcli models default translate ~/models/en-de
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    from llmcli.models import find_models, human_count
    from llmcli.tasks import TASKS_BY_ARCHITECTURE

    found = find_models(TASKS_BY_ARCHITECTURE)
    if json_:
        for entry in found:
            print(json.dumps(entry.to_dict(), ensure_ascii=False))
        return
    if not found:
        print("llmcli: no models here yet: `llmcli demo` trains one, `llmcli convert` or -m ID brings a Hugging Face model", file=sys.stderr)  # fmt: skip
        return
    rows = [("kind", "tasks", "architecture", "parameters", "default for", "model")]
    rows += [(e.kind, ", ".join(e.tasks), (e.architecture or "-") + (f" x{e.members}" if e.members > 1 else ""),
              human_count(e.parameters), ", ".join(e.default_for), e.model) for e in found]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells + [row[-1]]))


@models_app.command("default")
@handle_errors
def models_default(
    task: str = typer.Argument(None, help="translate | summarize | qa | generate | chat (none: every stored default)."),
    model: str = typer.Argument(None, help="The model to store: a directory, or a model id in the Hugging Face cache."),
    unset: bool = typer.Option(False, "--unset", help="Forget TASK's default."),
) -> None:
    """Show or store the model a task runs without -m ($LLMCLI_MODEL overrides it).

    Stored in $XDG_CONFIG_HOME/llmcli/defaults.json (else ~/.config/llmcli/defaults.json).

    Example: llmcli models default translate ~/models/en-de; llmcli models default translate
    """
    import os

    from llmcli.models import ENV_VAR, check_task, defaults_path, store_default, stored_defaults

    if task is None:
        if model is not None or unset:
            raise UserError("give a TASK")
        for name, spec in stored_defaults().items():
            print(f"{name}\t{spec}")
        return
    check_task(task)
    if unset or model is not None:
        if unset and model is not None:
            raise UserError("give a MODEL or --unset, not both")
        stored = store_default(task, None if unset else model)
        done = f"forgot the default model for {task}" if stored is None else f"default model for {task}: {stored}"
        print(f"llmcli: {done} (in {defaults_path()})", file=sys.stderr)
    else:
        stored = stored_defaults().get(task)
        if stored is None:
            print(f"llmcli: no default model for {task}; store one with `llmcli models default {task} MODEL`",
                  file=sys.stderr)  # fmt: skip
            raise typer.Exit(1)
        print(stored)
    if os.environ.get(ENV_VAR):
        print(f"llmcli: note: {ENV_VAR}={os.environ[ENV_VAR]} overrides it", file=sys.stderr)


@app.command()
@handle_errors
def demo(
    retrain: bool = typer.Option(False, help="Train again even if the demo model is already cached."),
    max_minutes: float = typer.Option(3.0, help="Training time budget."),
    quiet: bool = QUIET,
) -> None:
    """Train a small English -> Chinese number translator on generated data, then test it.

    Everything is offline: the corpus is generated by code. The model is kept under
    ~/.cache/llmcli (or $XDG_CACHE_HOME, $LLMCLI_CACHE) and reused on the next run, unless
    its time ran out before its steps and it scored below 90% exact match.

    Example: llmcli demo
    """
    from llmcli.demo import run_demo
    from llmcli.progress import TrainReporter

    _set_quiet(quiet)
    reporter = TrainReporter(quiet=quiet)
    reporter.log("llmcli demo: English number words -> Chinese numerals (e.g. 'forty-two' -> 四十二)")
    result = run_demo(retrain=retrain, max_minutes=max_minutes, reporter=reporter)
    if result.trained:
        reporter.log(f"trained {result.steps} steps in {result.train_seconds:.0f}s")
    else:
        reporter.log(f"reusing the model in {result.model_dir} (--retrain to train again)")
    width = max(len(src) for src, _, _ in result.examples)
    print(f"{'input':{width}}  {'reference':12}  output")
    for src, ref, out in result.examples:
        mark = "" if out == ref else "   (wrong)"
        print(f"{src:{width}}  {ref:{12 - _wide(ref)}}  {out}{mark}")
    print(f"held-out numbers: {result.n_test}   exact match: {result.exact_match:.1f}%   chrF: {result.chrf:.1f}")
    print(f"model: {result.model_dir}")
    print("try:")
    print(f"  echo 'seventy-seven thousand three hundred one' | llmcli translate -m {result.model_dir}")
    print(f"  llmcli translate -m {result.model_dir} {result.data_dir / 'test.en'} > out.zh")
    print(f"  llmcli eval --metric chrf out.zh --ref {result.data_dir / 'test.zh'}")


def _wide(text: str) -> int:
    # Chinese characters take two terminal columns; pad by display width, not length.
    import unicodedata

    return sum(unicodedata.east_asian_width(c) in "WF" for c in text)


def _parse_overrides(items: list[str]) -> dict:
    import json

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set d_model=384")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


from llmcli.cli_eval import eval_command  # noqa: E402  (after handle_errors exists)

app.command("eval")(handle_errors(eval_command))
from llmcli.cli_average import average_command  # noqa: E402

app.command("average")(handle_errors(average_command))
from llmcli.cli_convert import convert_command  # noqa: E402

app.command("convert")(handle_errors(convert_command))


def _restore_sigpipe() -> None:
    # `llmcli translate big.txt | head -1` should end quietly, as other Unix tools do
    # (sacrebleu does the same), not with a BrokenPipeError traceback.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _on_sigterm(signum, frame) -> None:
    # A second SIGTERM (torchrun sends them to every worker, more than once) ends the process at
    # once, silently, instead of raising again inside the exit's own clean-up (atexit callbacks).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def _install_signal_handlers() -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not ignored by whoever started us
        signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGXFSZ"):  # past RLIMIT_FSIZE: an EFBIG write error we report, not a core dump
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main() -> None:
    _restore_sigpipe()
    _install_signal_handlers()
    if sys.stdin is None:  # started with file descriptor 0 closed (`<&-`): no input, as /dev/null
        sys.stdin = open(os.devnull, encoding="utf-8")
    # Text streams are UTF-8 whatever the locale says.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    try:
        app(prog_name="llmcli")
    except Terminated:  # outside a command (while parsing options): nothing written yet
        sys.exit(143)
    finally:
        # From here the interpreter exits and runs its atexit callbacks: a SIGTERM now (torchrun
        # stopping the others) ends the process silently rather than raising inside one of them.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    main()
