"""translate, summarize and qa with a decoder-only instruct model: each input line is one chat
message from the task's prompt, answered as transformers answers the same rendered prompt."""

import json

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from test_chat import base, sentences, styled  # noqa: E402, F401  (base: the fixture styled needs)

from llmcli.tasks import INSTRUCT_PROMPTS  # noqa: E402

MAX_NEW = 12


@pytest.fixture(scope="module")
def instruct_model(base, tmp_path_factory):  # noqa: F811
    d, fast = styled(base, "chatml", tmp_path_factory.mktemp("instruct") / "m")
    return d, fast, transformers.LlamaForCausalLM.from_pretrained(d).eval()


def hf_answer(hf, fast, message: str, **search) -> str:
    ids = torch.tensor([fast.apply_chat_template([{"role": "user", "content": message}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=False)])  # fmt: skip
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW, **search)
    new = out[0, ids.shape[1] :].tolist()
    return fast.decode(new, skip_special_tokens=True).strip()


def lines_of(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split("\n")[:-1]


def test_translate_answers_each_line_as_transformers_does_and_keeps_alignment(instruct_model, tmp_path):
    d, fast, hf = instruct_model
    texts = sentences(6, 31)
    data = (
        ("\n".join(texts[:2]) + "\n\n" + texts[2] + "\n").encode() + b"bad \xff byte\n" + ("\n".join(texts[3:]) + "\n").encode()
    )
    (tmp_path / "in.txt").write_bytes(data)
    proc = run_cli("translate", "-m", str(d), str(tmp_path / "in.txt"), "--target-lang", "German", "--max-len", str(MAX_NEW))
    mine = lines_of(proc)
    inputs = texts[:2] + [""] + [texts[2], "bad \ufffd byte"] + texts[3:]
    assert len(mine) == len(inputs) and mine[2] == ""
    assert "invalid UTF-8" in proc.stderr.decode()
    for text, out in zip(inputs, mine):
        if text:
            message = INSTRUCT_PROMPTS["translate"].format(text=text, target_lang="German")
            assert out == hf_answer(hf, fast, message).replace("\n", "\\n")
    assert len(set(mine)) >= 3


def test_beam_search_over_an_instruct_model_stops_on_every_end_id_as_transformers(instruct_model, tmp_path):
    d, fast, hf = instruct_model
    texts = sentences(4, 32)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    mine = lines_of(run_cli("summarize", "-m", str(d), str(tmp_path / "in.txt"), "--beam", "4", "--max-len", str(MAX_NEW)))
    theirs = [hf_answer(hf, fast, INSTRUCT_PROMPTS["summarize"].format(text=t), num_beams=4).replace("\n", "\\n") for t in texts]
    assert mine == theirs


def test_qa_and_a_prompt_of_ones_own(instruct_model, tmp_path):
    d, fast, hf = instruct_model
    records = [{"question": "what sat on the mat", "context": "the red cat sat on the mat"},
               {"question": "", "context": "no question here"},
               {"question": "where is the river", "context": "the river runs under the old tree"}]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompt = "Q: {question}\nC: {context}"
    proc = run_cli("qa", "-m", str(d), str(tmp_path / "qa.jsonl"), "--prompt", prompt, "--max-len", str(MAX_NEW),
                   "--format", "jsonl")  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    mine = [json.loads(line)["text"] for line in proc.stdout.decode().splitlines()]  # jsonl keeps newlines
    theirs = [hf_answer(hf, fast, prompt.format(**r)) if r["question"] else "" for r in records]
    assert mine == theirs


def test_an_input_too_long_is_cut_in_its_text_not_in_the_template(instruct_model, tmp_path):
    d, fast, hf = instruct_model
    long = " ".join(sentences(80, 33))
    (tmp_path / "in.txt").write_text(long + "\nthe cat sat\n")
    proc = run_cli("summarize", "-m", str(d), str(tmp_path / "in.txt"), "--max-len", str(MAX_NEW))
    assert len(lines_of(proc)) == 2 and "input line 1" in proc.stderr.decode() and "truncated" in proc.stderr.decode()
    skipped = run_cli("summarize", "-m", str(d), str(tmp_path / "in.txt"), "--max-len", str(MAX_NEW), "--on-long", "skip")
    out = lines_of(skipped)
    assert out[0] == "" and out[1] == hf_answer(hf, fast, INSTRUCT_PROMPTS["summarize"].format(text="the cat sat"))


def one_line_error(*args) -> str:
    proc = run_cli(*args, input=b"the cat sat\n")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_instructions_are_one_line(instruct_model, tiny_lm, tiny_model):
    d = str(instruct_model[0])
    assert "--target-lang is needed" in one_line_error("translate", "-m", d)
    assert "{language}" in one_line_error("translate", "-m", d, "--prompt", "say {text} in {language}")
    assert "must contain {text}" in one_line_error("summarize", "-m", d, "--prompt", "summarize this")
    assert "literal braces" in one_line_error("summarize", "-m", d, "--prompt", "{text")
    assert "without a chat template" in one_line_error("translate", "-m", str(tiny_lm), "--target-lang", "German")
    assert "instruct (decoder-only) models" in one_line_error("translate", "-m", str(tiny_model), "--target-lang", "German")


def test_plain_generate_also_stops_at_every_end_id_as_transformers(instruct_model, tmp_path):
    d, fast, hf = instruct_model
    prompts = sentences(6, 34)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    mine = lines_of(run_cli("generate", "-m", str(d), "--input", str(tmp_path / "p.txt"), "--greedy",
                            "--max-new-tokens", str(MAX_NEW)))  # fmt: skip
    theirs, ended = [], 0
    for prompt in prompts:
        ids = torch.tensor([fast(prompt)["input_ids"]])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW)
        new = out[0, ids.shape[1] :].tolist()
        ended += len(new) < MAX_NEW and new[-1] != hf.config.eos_token_id  # stopped at the second end id
        theirs.append(fast.decode(new, skip_special_tokens=True).replace("\n", "\\n"))
    assert mine == theirs and ended >= 1


def test_a_model_with_no_end_token_is_one_line(instruct_model, tmp_path):
    import shutil

    d = tmp_path / "no-eos"
    shutil.copytree(instruct_model[0], d)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((d / name).read_text())
        config["eos_token_id"] = None
        (d / name).write_text(json.dumps(config))
    for command in (("generate", "--greedy", "the cat"), ("chat",), ("translate", "--target-lang", "German")):
        assert "no end-of-text token" in one_line_error(command[0], "-m", str(d), *command[1:])
