"""Model quality from a fixed training budget: what a user gets from `llmcli train` and the README's commands.

Every step is llmcli's own command line in a subprocess (`python -m llmcli train`, `translate`,
`summarize`, `eval`), exactly as a user runs it; the bench only prepares the data files, times
the commands, parses the trainer's summary lines and collects the scores.

    python bench/quality.py                                   # all four tasks, 30 minutes of training each
    python bench/quality.py --tasks en-de --minutes 20 --json q.json
    python bench/quality.py --tasks en-de,en-fr --beam 5 --length-penalty 0.6
    python bench/quality.py --tasks en-de --extra-train-args "--preset tiny --lr 1e-3 --vocab-size 6000"
    python bench/quality.py --tasks shakespeare,csl --minutes 0.5 --keep runs/   # keep the models
    python bench/quality.py --minutes 0.5 --beam 1 --limit 50 --extra-train-args "--preset tiny"  # a smoke run
    python bench/quality.py --keep runs/ --reuse --precisions fp32,bf16,int8,int4   # the same models, other precisions
    python bench/quality.py --tasks en-de --curve 4            # BLEU against minutes: every 4th save scored too

Tasks (../shared/data, or --data DIR; a task whose folder is missing is skipped, saying so):
  en-de, en-fr  Multi30k: train on train.*, validate on val.*, translate test_2016_flickr and
                test_2017_flickr; sacreBLEU BLEU and chrF with signatures (`llmcli eval`; the
                first score is also recomputed with sacrebleu in-process, and must be equal).
  shakespeare   decoder-only LM on tinyshakespeare/input.txt, the last 10% of its characters
                held out as validation (nanoGPT's split); `llmcli eval --metric perplexity`
                gives token perplexity and bits per byte (nats / ln 2 / UTF-8 bytes).
  csl           Chinese abstract -> title (CSL). Only dev.tsv and test.tsv exist (1,000 lines
                each): train on dev lines 1-900, validate on dev 901-1000, score test.tsv with
                ROUGE (llmcli's unicode tokenizer: one token per CJK character, a run of other
                letters or digits one token, punctuation dropped), beside the lead-16-characters
                baseline (the abstract's first 16 characters) on the same test set.

Training is the README's command (`--preset small`; for the LM `--block-size 256`) plus
`--max-minutes --minutes`, with llmcli's defaults for everything else (the vocabulary scaled to
the text, the learning rate decaying to zero where the budget ends, batches sized for the device,
the average of the last saves where it validates better: `llmcli train --help`); `--extra-train-args`
is appended to every train command, so its options win over the bench's (`--preset tiny`, `--lr`,
`--set d_model=384`, ...). --max-minutes bounds the whole training command, tokenizer and last
save included; the "wall min" column is the command's own time.

--precisions decodes (and scores perplexity) once per inference precision (`--precision` of
translate, summarize and eval), each row against the fp32 row of the same test: the quality guard
of the lower precisions. --reuse, with --keep DIR, takes DIR/<task>/model where a previous run left
one instead of training again (its training record read back from the files that run kept).
--curve K keeps every save of a translation run (`--keep-checkpoints`; a budgeted run saves every
twentieth of it) and scores every K-th on test_2016_flickr as well: BLEU against the minutes of
training that save had had (train_log.jsonl's `seconds`), the learning curve of the recipe.

The table goes to stderr, --json writes everything: CPU model and flags, torch's threads and
version, each command as run, the trainer's steps, target tokens/s and validation loss, scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("en-de", "en-fr", "shakespeare", "csl")
FOLDERS = {"en-de": "multi30k", "en-fr": "multi30k", "shakespeare": "tinyshakespeare", "csl": "csl_title"}
TEST_SETS = ("test_2016_flickr", "test_2017_flickr")
LEAD_CHARS = 16
CURVE_SAVES = 100  # --curve: more than a budgeted run makes (one every twentieth of the budget)
CSL_VALID = 100  # dev.tsv's last lines, held out for validation (model choice)

# The trainer's own lines on stderr (llmcli/train.py `_setup`, `_loop`; llmcli/cli.py `train`).
MODEL_LINE = re.compile(
    r"^(?P<architecture>\S+) model, (?P<params>[\d.]+)M parameters, vocabulary (?P<vocab>\d+), "
    r"(?P<examples>\d+) training examples, device (?P<device>\w+)",
    re.M,
)
SUMMARY_LINE = re.compile(
    r"^trained (?P<steps>\d+) steps in (?P<seconds>\d+)s \((?P<tps>[\d,]+) target tokens/s\)"
    r"(?:, best validation loss (?P<loss>[\d.]+) \(perplexity (?P<ppl>[\d.]+)\))?",
    re.M,
)
VALID_LINE = re.compile(r"^step (\d+): validation loss ([\d.]+), perplexity ([\d.]+)", re.M)


def llmcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmcli", *map(str, args)]


def run(cmd: list[str], log: Path | None = None) -> tuple[str, str, float]:
    """stdout, stderr and seconds of one command; a failure ends the bench with its stderr."""
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env={**os.environ, "NO_COLOR": "1"})
    seconds = time.monotonic() - start
    if log is not None:
        log.write_text(proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        sys.exit(f"quality.py: failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr, seconds


class Task:
    """One task's commands, train record and scores, as the JSON holds them."""

    def __init__(self, name: str, work: Path, args: argparse.Namespace):
        self.name, self.work, self.args = name, work, args
        self.commands: list[str] = []
        self.train: dict = {}
        self.scores: list[dict] = []
        work.mkdir(parents=True, exist_ok=True)

    def call(self, cmd: list[str], log: Path | None = None) -> tuple[str, str, float]:
        self.commands.append(shlex.join(cmd))
        return run(cmd, log)

    def train_model(self, task_args: list[str]) -> Path:
        out = self.work / "model"
        cmd = llmcli("train", *task_args, "--out", out, "--max-minutes", self.args.minutes)
        cmd += shlex.split(self.args.extra_train_args)
        log = self.work / "train.log"
        trained = (out / "config.json").is_file() or (out / "ensemble.json").is_file()
        if self.args.reuse and trained and log.is_file():
            print(f"[{self.name}] reusing {out} (--reuse)", file=sys.stderr, flush=True)
            self.train = parse_train_log(log.read_text(encoding="utf-8"), out)
            self.train["reused"] = str(out)
            return out
        print(f"[{self.name}] training ({self.args.minutes} min budget), log: {log}", file=sys.stderr, flush=True)
        _, stderr, seconds = self.call(cmd, log)
        self.train = parse_train_log(stderr, out)
        self.train["wall_minutes"] = seconds / 60
        return out

    def score(self, metric: str, hyp: Path, ref: Path, test: str, system: str = "model", **extra) -> dict:
        stdout, _, _ = self.call(llmcli("eval", hyp, "--ref", ref, "--metric", metric, "--json"))
        result = json.loads(stdout)
        self.scores.append({"test": test, "system": system, **result, **extra})
        return result

    def decode_options(self) -> list[str]:
        opts = []
        if self.args.beam is not None:
            opts += ["--beam", str(self.args.beam)]
        if self.args.length_penalty is not None:
            opts += ["--length-penalty", str(self.args.length_penalty)]
        return opts

    def precisions(self) -> list[tuple[list[str], str]]:
        """(options, label) for each --precisions entry."""
        return [(["--precision", p], p) for p in self.args.precisions]

    def record(self) -> dict:
        return {"commands": self.commands, "train": self.train, "scores": self.scores}


def parse_train_log(stderr: str, out: Path) -> dict:
    """What the trainer says about the run: its stderr lines, and train_state/state.json's progress."""
    found: dict = {"log_tail": stderr.strip().splitlines()[-4:]}
    if m := MODEL_LINE.search(stderr):
        found.update(architecture=m["architecture"], parameters_m=float(m["params"]), vocab_size=int(m["vocab"]),
                     training_examples=int(m["examples"]), device=m["device"])  # fmt: skip
    if m := SUMMARY_LINE.search(stderr):
        found.update(
            steps=int(m["steps"]), loop_seconds=int(m["seconds"]), target_tokens_per_second=int(m["tps"].replace(",", ""))
        )
        if m["loss"]:
            found.update(best_valid_loss=float(m["loss"]), best_valid_perplexity=float(m["ppl"]))
    found["validations"] = [[int(s), float(loss)] for s, loss, _ in VALID_LINE.findall(stderr)]
    from llmcli.checkpoint import ensemble_members

    members = ensemble_members(out) or [out]  # `llmcli train --ensemble N` (llmcli/train_ensemble.py): each member's run
    runs = [_run_record(member) for member in members]
    found.update(runs[0])  # one model's, or the first member's
    if len(runs) > 1:
        found["members"] = [{"path": str(m), **r} for m, r in zip(members, runs)]
    return found


def _run_record(out: Path) -> dict:
    found = {}
    state = out / "train_state" / "state.json"
    if state.is_file():
        progress = json.loads(state.read_text(encoding="utf-8"))["progress"]
        found.update(state_step=progress["step"], target_tokens_seen=progress["tokens_seen"], epochs=progress["epoch"])
    curve = out / "train_log.jsonl"  # llmcli/train.py writes one line per save: the learning curve
    if curve.is_file():
        found["curve"] = [json.loads(line) for line in curve.read_text(encoding="utf-8").splitlines() if line.strip()]
    return found


def sacrebleu_check(hyp: Path, ref: Path, bleu: dict, chrf: dict) -> dict:
    """llmcli eval's BLEU and chrF against sacrebleu's own corpus_bleu/corpus_chrf on the same lines."""
    import sacrebleu

    hyps = hyp.read_text(encoding="utf-8").splitlines()
    refs = ref.read_text(encoding="utf-8").splitlines()
    metrics = {"bleu": (sacrebleu.BLEU(), bleu), "chrf": (sacrebleu.CHRF(), chrf)}
    check = {}
    for name, (metric, ours) in metrics.items():
        theirs = metric.corpus_score(hyps, [refs])
        check[name] = {"llmcli": ours["score"], "sacrebleu": theirs.score, "llmcli_signature": ours["signature"],
                       "sacrebleu_signature": str(metric.get_signature())}  # fmt: skip
        check[name]["equal"] = math.isclose(ours["score"], theirs.score, abs_tol=1e-9) and ours["signature"] == str(
            metric.get_signature()
        )
    return check


def test_files(source: Path, ref: Path, work: Path, limit: int | None) -> tuple[Path, Path]:
    """The test set, or its first --limit lines (copied into the work directory)."""
    if limit is None:
        return source, ref
    cut = []
    for path in (source, ref):
        cut.append(work / f"{path.name}.first{limit}")
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:limit]
        cut[-1].write_text("".join(lines), encoding="utf-8")
    return cut[0], cut[1]


def translation(name: str, data: Path, work: Path, args: argparse.Namespace) -> Task:
    src, tgt = name.split("-")
    task = Task(name, work, args)
    # The README's training command, with the budget.
    model = task.train_model(
        [
            "--task",
            "translate",
            "--src",
            data / f"train.{src}",
            "--tgt",
            data / f"train.{tgt}",
            "--valid-src",
            data / f"val.{src}",
            "--valid-tgt",
            data / f"val.{tgt}",
            "--preset",
            "small",
        ]  # fmt: skip
        + (["--keep-checkpoints", str(CURVE_SAVES)] if args.curve else [])
    )
    tests = {test: test_files(data / f"{test}.{src}", data / f"{test}.{tgt}", work, args.limit) for test in TEST_SETS}
    for test, (source, ref) in tests.items():
        label = test if args.limit is None else f"{test}[:{args.limit}]"
        for options, precision in task.precisions():
            hyp = work / f"{test}.{precision}.hyp.{tgt}"
            cmd = llmcli("translate", "-m", model, source, "-o", hyp, "-q", *task.decode_options(), *options)
            _, _, seconds = task.call(cmd)
            bleu = task.score("bleu", hyp, ref, label, precision=precision, decode_seconds=seconds)
            chrf = task.score("chrf", hyp, ref, label, precision=precision)
            if args.check is None:  # the first case of the run: llmcli eval == sacrebleu in-process
                args.check = {"case": f"{name} {test} {precision}", **sacrebleu_check(hyp, ref, bleu, chrf)}
    if args.curve:
        learning_curve(task, model, *tests[TEST_SETS[0]])
    return task


def learning_curve(task: Task, model: Path, source: Path, ref: Path) -> None:
    """Every --curve-th kept save translates the first test set: BLEU against minutes of training.
    An ensemble's members save at the same times: their n-th saves decode together."""
    seconds = {entry["step"]: entry["seconds"] for entry in task.train.get("curve", []) if "seconds" in entry}
    members = [Path(m["path"]) for m in task.train.get("members", [])] or [model]
    saves = list(zip(*(sorted((member / "checkpoints").glob("step-*")) for member in members)))
    if not saves:  # --reuse of a model trained without --curve
        print(f"[{task.name}] --curve: no saves kept in {members[0] / 'checkpoints'}", file=sys.stderr, flush=True)
    options, precision = task.precisions()[0]
    for together in saves[task.args.curve - 1 :: task.args.curve]:
        step = int(together[0].name.split("-")[1])  # the first member's (its curve gives the minutes)
        hyp = task.work / f"{TEST_SETS[0]}.{together[0].name}.hyp"
        models = [arg for save in together for arg in ("-m", save)]
        task.call(llmcli("translate", *models, source, "-o", hyp, "-q", *task.decode_options(), *options))
        minutes = seconds[step] / 60 if step in seconds else None
        system = f"save at step {step}" + (f", {minutes:.1f} min" if minutes is not None else "")
        task.score("bleu", hyp, ref, TEST_SETS[0], system=system, curve_step=step, curve_minutes=minutes,
                   curve_precision=precision)  # fmt: skip


def shakespeare(data: Path, work: Path, args: argparse.Namespace) -> Task:
    task = Task("shakespeare", work, args)
    text = (data / "input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # nanoGPT's data/shakespeare_char/prepare.py: the first 90% of characters
    train, valid = work / "train.txt", work / "valid.txt"
    train.write_text(text[:cut], encoding="utf-8")
    valid.write_text(text[cut:], encoding="utf-8")
    block = str(args.block_size)
    model = task.train_model(
        [
            "--task",
            "generate",
            "--text",
            train,
            "--valid-text",
            valid,
            "--preset",
            "small",
            "--block-size",
            block,
        ]  # fmt: skip
    )
    # Bits per byte is the summed loss over the UTF-8 bytes of the text scored (its lines joined by
    # newlines: the file's last newline is not part of it); recomputed here from the other fields.
    joined = "\n".join(text[cut:].splitlines())
    for options, precision in task.precisions():
        cmd = llmcli("eval", valid, "--metric", "perplexity", "-m", model, "--json", *options)
        stdout, _, seconds = task.call(cmd)
        result = json.loads(stdout)
        result["bits_per_byte_recomputed"] = result["loss"] * result["tokens"] / math.log(2) / len(joined.encode("utf-8"))
        result["nats_per_byte"] = result["bits_per_byte"] * math.log(2)  # nanoGPT's char-level val loss, on ASCII
        task.scores.append({"test": "valid (last 10%)", "system": "model", "precision": precision,
                            "eval_seconds": seconds, **result})  # fmt: skip
    return task


def csl(data: Path, work: Path, args: argparse.Namespace) -> Task:
    task = Task("csl", work, args)

    def columns(path: Path) -> tuple[list[str], list[str]]:
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
        return [r[1] for r in rows], [r[2] for r in rows]  # "to title", abstract, title

    dev_src, dev_tgt = columns(data / "dev.tsv")
    test_src, test_tgt = columns(data / "test.tsv")
    test_src, test_tgt = test_src[: args.limit], test_tgt[: args.limit]
    files = {
        "train.src": dev_src[:-CSL_VALID], "train.tgt": dev_tgt[:-CSL_VALID],
        "valid.src": dev_src[-CSL_VALID:], "valid.tgt": dev_tgt[-CSL_VALID:],
        "test.src": test_src, "test.tgt": test_tgt,
        "lead16.txt": [s[:LEAD_CHARS] for s in test_src],
    }  # fmt: skip
    for file, lines in files.items():
        (work / file).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    model = task.train_model(
        [
            "--task",
            "summarize",
            "--src",
            work / "train.src",
            "--tgt",
            work / "train.tgt",
            "--valid-src",
            work / "valid.src",
            "--valid-tgt",
            work / "valid.tgt",
            "--preset",
            "small",
        ]  # fmt: skip
    )
    label = "test" if args.limit is None else f"test[:{args.limit}]"
    for options, precision in task.precisions():
        hyp = work / f"test.{precision}.hyp"
        cmd = llmcli("summarize", "-m", model, work / "test.src", "-o", hyp, "-q", *task.decode_options(), *options)
        _, _, seconds = task.call(cmd)
        task.score("rouge", hyp, work / "test.tgt", label, precision=precision, decode_seconds=seconds)
    task.score("rouge", work / "lead16.txt", work / "test.tgt", label, system=f"lead-{LEAD_CHARS}")
    return task


def machine() -> dict:
    import torch

    from llmcli.device import CPU_FLAGS, cpu_flags, cpu_name

    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def headline(s: dict) -> float:
    if s["metric"] == "rouge":
        return s["rougeL"]["f"]
    return s["bits_per_byte"] if s["metric"] == "perplexity" else s["score"]


def rows(name: str, task: Task) -> list[list[str]]:
    t = task.train
    common = [str(t.get("steps", "?")), f"{t['target_tokens_per_second']:,}" if "target_tokens_per_second" in t else "?",
              f"{t['wall_minutes']:.1f}" if "wall_minutes" in t else "-"]  # fmt: skip
    fp32 = {(s["test"], s["metric"]): s for s in task.scores if s.get("precision") == "fp32"}
    out = []
    for s in task.scores:
        if s["metric"] in ("bleu", "chrf"):
            shown = [f"{s['metric'].upper() if s['metric'] == 'bleu' else 'chrF'} {s['score']:.2f}", s["signature"]]
        elif s["metric"] == "rouge":
            shown = [
                f"ROUGE-L {s['rougeL']['f']:.2f}",
                f"R1 {s['rouge1']['f']:.2f} R2 {s['rouge2']['f']:.2f}, tokenize {s['tokenize']}",
            ]
        else:
            shown = [f"bpb {s['bits_per_byte']:.3f}", f"ppl {s['score']:.2f} over {s['tokens']} tokens, context {s['context']}"]
        precision = s.get("precision", "-")
        reference = fp32.get((s["test"], s["metric"]))
        if precision not in ("fp32", "-") and reference is not None:
            if s["metric"] == "perplexity":
                shown[1] = f"ppl {100 * (s['score'] / reference['score'] - 1):+.2f}% vs fp32; " + shown[1]
            else:
                shown[1] = f"{headline(s) - headline(reference):+.2f} vs fp32; " + shown[1]
        out.append([name, s["test"], s["system"], precision, shown[0], *common, shown[1]])
    return out


def print_table(results: dict[str, Task], minutes: float) -> None:
    header = ["task", "test", "system", "precision", "score", "steps", "tgt tok/s", "wall min", "detail"]
    table = [header] + [r for name, task in results.items() for r in rows(name, task)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    print(f"\n# training budget {minutes} min per task (--max-minutes)", file=sys.stderr)
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1], file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per task (llmcli train --max-minutes)")
    p.add_argument("--beam", type=int, default=None, help="translate/summarize --beam (default: llmcli's)")
    p.add_argument("--length-penalty", type=float, default=None, help="translate/summarize --length-penalty (default: llmcli's)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N test lines (smoke runs; not shakespeare)")
    p.add_argument("--block-size", type=int, default=256, help="shakespeare: --block-size (the model's positions too)")
    p.add_argument(
        "--extra-train-args",
        default="",
        help='appended to every `llmcli train`: "--preset tiny --lr 1e-3"; one option: --extra-train-args=--lr=1e-3',
    )
    p.add_argument(
        "--keep", type=Path, default=None, help="keep models, logs and outputs in DIR/<task>/ (default: a temporary dir)"
    )
    p.add_argument(
        "--precisions",
        default="fp32",
        help="comma-separated inference precisions to decode and score each model at: fp32,bf16,int8,int4,auto",
    )
    p.add_argument("--reuse", action="store_true", help="with --keep DIR: use DIR/<task>/model where it exists, untrained")
    p.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="K",
        help="translation: keep every save and score every K-th on test_2016_flickr (BLEU against minutes)",
    )
    p.add_argument("--data", type=Path, default=DATA, help="the shared corpora (default: ../shared/data)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if unknown := [n for n in names if n not in TASKS]:
        p.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if bad := [x for x in args.precisions if x not in ("fp32", "bf16", "int8", "int4", "auto")]:
        p.error(f"unknown precision(s) {', '.join(bad)}")
    if "fp32" in args.precisions:  # first: the other rows are read against it
        args.precisions.remove("fp32")
        args.precisions.insert(0, "fp32")
    if args.curve < 0:
        p.error("--curve K needs K >= 1 (or 0: no curve)")
    if args.reuse and args.keep is None:
        p.error("--reuse needs --keep DIR (where the models are)")
    if not args.data.is_dir():
        print(f"quality.py: skipped: {args.data} is absent (the shared corpora; see SOURCES.md there)", file=sys.stderr)
        return
    args.check = None
    info = machine()
    flags = " ".join(f for f, on in info["cpu_flags"].items() if on) or "-"
    print(f"# {info['cpu']}; flags: {flags}; {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads",
          file=sys.stderr)  # fmt: skip
    runners = {"en-de": translation, "en-fr": translation, "shakespeare": shakespeare, "csl": csl}
    results: dict[str, Task] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="llmcli-quality-") as tmp:
        root = args.keep or Path(tmp)
        for name in names:
            data = args.data / FOLDERS[name]
            if not data.is_dir():
                skipped[name] = f"{data} is absent"
                print(f"[{name}] skipped: {skipped[name]}", file=sys.stderr)
                continue
            runner = runners[name]
            results[name] = runner(name, data, root / name, args) if runner is translation else runner(data, root / name, args)
    print_table(results, args.minutes)
    if args.check:
        ok = all(v["equal"] for k, v in args.check.items() if k != "case")
        print(f"# llmcli eval == sacrebleu in-process ({args.check['case']}): {'yes' if ok else 'NO'}", file=sys.stderr)
    report = {
        "machine": info,
        "settings": {
            "minutes": args.minutes,
            "beam": args.beam,
            "length_penalty": args.length_penalty,
            "precisions": args.precisions,
            "reuse": args.reuse,
            "block_size": args.block_size,
            "limit": args.limit,
            "curve": args.curve,
            "extra_train_args": args.extra_train_args,
            "data": str(args.data),
        },  # fmt: skip
        "tasks": {name: task.record() for name, task in results.items()},
        "skipped": skipped,
        "sacrebleu_check": args.check,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"# wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
