"""Chat templates held to transformers: four template styles, written here as the real models
ship them, carried by the converter from a tiny random Llama's tokenizer files, rendered and
tokenized as `apply_chat_template(..., tokenize=True, add_generation_prompt=True)` does; a
greedy reply equal to `generate`; multi-turn history, trimming, and bad templates. No downloads."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmcli import chat  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.convert import convert  # noqa: E402
from llmcli.errors import UserError  # noqa: E402
from llmcli.tasks import ChatSession, DecodeSettings  # noqa: E402

# ---------------------------------------------------------------- the four styles, as published

CHATML = (  # HuggingFaceTB/SmolLM2-*-Instruct (Qwen's differs only in its default system text)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (  # google/gemma-2-2b-it: no system role
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.first and system_message is defined %}
            {{- " [INST] " + system_message + "\\n\\n" + message["content"] + " [/INST]" }}
        {%- else %}
            {{- " [INST] " + message["content"] + " [/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # mistralai/Mistral-7B-Instruct (v0.2's layout): the system message folded into the first user turn

STYLES = {  # template, bos, eos
    "chatml": (CHATML, "<|im_start|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<eos>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
            "<pad>"]  # fmt: skip
WORDS = ("the a cat dog bird sat ran on under over mat house tree river red blue green big small old new "
         "what is capital of france paris answer briefly you are helpful assistant hello how").split()  # fmt: skip


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]


def train_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = sentences(300, 0) + ["[INST] [/INST] system user assistant model\n\n"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    return tok


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, HFTokenizer]:
    """A tiny random Llama (weights and config only), its eos the ChatML end of turn."""
    tok = train_tokenizer()
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    ids = {name: tok.token_to_id(name) for name in SPECIALS}
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                                   bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                                   pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        head = model.get_output_embeddings().weight
        head[ids["<|endoftext|>"]] *= 2.5  # a stop id that is not the config's eos ends some replies
    # Two end ids, as Qwen2.5-Instruct ships them
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["<|im_start|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])  # fmt: skip
    model.save_pretrained(d)
    return d, tok


def styled(base, style: str, directory: Path, max_positions: int | None = None):
    """The base model with the tokenizer files of `style`; returns (dir, HF fast tokenizer)."""
    src, tok = base
    shutil.copytree(src, directory)
    template, bos, eos = STYLES[style]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    if max_positions is not None:
        config = json.loads((directory / "config.json").read_text())
        config["max_position_embeddings"] = max_positions
        (directory / "config.json").write_text(json.dumps(config))
    return directory, fast


def hf_ids(fast, messages) -> list[int]:
    return fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


SYSTEM = "you are a helpful assistant answer briefly"
CONVERSATION = [("what is the capital of france", "paris"), ("and of the river", "the big river\nis old"),
                ("how are you", "")]  # fmt: skip


def messages_of(system, turns, pending):
    out = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out + [{"role": "user", "content": pending}]


# ---------------------------------------------------------------- parity of the rendered prompt


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("style", list(STYLES))
def test_prompt_ids_equal_apply_chat_template(base, style, with_system, tmp_path):
    d, fast = styled(base, style, tmp_path / style)
    loaded = convert(d)
    assert loaded.generation["chat_template"] == STYLES[style][0]
    assert loaded.generation["chat_tokens"]["bos_token"] == STYLES[style][1]
    system = SYSTEM if with_system else None
    for n_turns in (0, 1, 2):
        messages = messages_of(system, CONVERSATION[:n_turns], "hello how are you")
        if style == "gemma" and with_system:  # as the real template: no system role, said when the chat starts
            with pytest.raises(Exception, match="System role not supported"):
                hf_ids(fast, messages)
            with pytest.raises(UserError, match="System role not supported"):
                ChatSession(loaded, DecodeSettings(sample=False), 10, system)
            continue
        session = ChatSession(loaded, DecodeSettings(sample=False), 10, system)
        session.conversation.turns = list(CONVERSATION[:n_turns])
        expected = hf_ids(fast, messages)
        assert session.prompt_ids("hello how are you") == expected
        if style == "mistral" and with_system:
            assert fast.decode(expected).count(SYSTEM) == 1  # folded into the first user turn


def test_stop_ids_gather_every_end_token(base, tmp_path):
    d, fast = styled(base, "chatml", tmp_path / "m")
    gen = convert(d).generation
    ids = fast.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert gen["stop_ids"] == ids


def test_template_file_and_named_templates_are_carried(base, tmp_path):
    d, _ = styled(base, "chatml", tmp_path / "m")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": LLAMA3}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert convert(d).generation["chat_template"] == LLAMA3
    (d / "chat_template.jinja").write_text(GEMMA)  # the file wins, as in transformers
    assert convert(d).generation["chat_template"] == GEMMA
    (d / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="default"):
        convert(d)


# ---------------------------------------------------------------- replies


def hf_reply(hf, fast, messages, max_new: int) -> tuple[str, list[int]]:
    ids = torch.tensor([hf_ids(fast, messages)])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new)
    new = out[0, ids.shape[1] :].tolist()
    stops = hf.generation_config.eos_token_id
    if new and new[-1] in stops:
        new = new[:-1]
    return fast.decode(new, skip_special_tokens=True), new


@pytest.fixture(scope="module")
def chatml(base, tmp_path_factory):
    d, fast = styled(base, "chatml", tmp_path_factory.mktemp("chatml") / "m")
    return d, fast, transformers.LlamaForCausalLM.from_pretrained(d).eval(), convert(d)


def test_a_reply_equals_transformers_greedy(chatml):
    d, fast, hf, loaded = chatml
    ended_early = 0
    for i, message in enumerate(sentences(8, 5)):
        session = ChatSession(loaded, DecodeSettings(sample=False), 20, SYSTEM if i % 2 else None)
        shown = []
        mine = session.reply(message, on_text=shown.append)
        theirs, new = hf_reply(hf, fast, session.conversation.messages()[:-1], 20)
        assert mine == theirs and "".join(shown) == mine
        ended_early += len(new) < 20
    assert ended_early >= 2  # some replies stopped at a stop id


def test_multi_turn_history_equals_the_template_over_all_messages(chatml):
    d, fast, hf, loaded = chatml
    session = ChatSession(loaded, DecodeSettings(sample=False), 12, SYSTEM)
    turns = []
    for message in sentences(3, 9):
        theirs, _ = hf_reply(hf, fast, messages_of(SYSTEM, turns, message), 12)
        assert session.reply(message) == theirs
        turns.append((message, theirs))
    assert session.prompt_ids("the end") == hf_ids(fast, messages_of(SYSTEM, turns, "the end"))
    session.reset()
    assert session.prompt_ids("the end") == hf_ids(fast, messages_of(SYSTEM, [], "the end"))


def test_trimming_drops_the_oldest_turns_and_keeps_the_system_message(base, tmp_path):
    d, fast = styled(base, "llama3", tmp_path / "m", max_positions=192)
    loaded = convert(d)
    session = ChatSession(loaded, DecodeSettings(sample=False), 16, SYSTEM)
    long_turns = [(s, t) for s, t in zip(sentences(6, 1), sentences(6, 2))]
    session.conversation.turns = list(long_turns)
    ids = session.prompt_ids("what is the capital")
    kept = session.conversation.turns
    assert 0 < len(kept) < len(long_turns) and kept == long_turns[-len(kept) :]
    assert len(ids) <= 192 - 16
    assert ids == hf_ids(fast, messages_of(SYSTEM, kept, "what is the capital"))
    assert len(hf_ids(fast, messages_of(SYSTEM, long_turns[-len(kept) - 1 :], "what is the capital"))) > 192 - 16
    session.set_system(" ".join(sentences(20, 3)))  # alone longer than the context
    with pytest.raises(UserError, match="system message"):
        session.prompt_ids("hi")


def test_sampling_defaults_come_from_generation_config(base, tmp_path):
    d, _ = styled(base, "chatml", tmp_path / "m")
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=20)
    (d / "generation_config.json").write_text(json.dumps(gen))
    loaded = convert(d)
    assert loaded.generation["decode"] == {"sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}
    session = ChatSession(loaded, DecodeSettings(), 5)
    assert (session.settings.sample, session.settings.temperature, session.settings.top_k) == (True, 0.6, 20)
    assert ChatSession(loaded, DecodeSettings(sample=False), 5).settings.sample is False  # --greedy


# ---------------------------------------------------------------- templates as bad input


@pytest.mark.parametrize(
    "source, match",
    [("{% for m in messages %}{{ m['content'] }", "not valid Jinja"),
     ("{{ raise_exception('only user turns, please') }}", "only user turns, please"),
     ("{{ messages[1]['content'] }}", "refused the conversation"),
     ("{% set ns = namespace(__class__=1) %}", "refused the conversation")],
)  # fmt: skip
def test_a_bad_template_is_one_user_error(source, match):
    with pytest.raises(UserError, match=match):
        chat.ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_render_has_the_helpers_of_transformers():
    template = chat.ChatTemplate(
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}{% generation %}<g>{% endgeneration %}"
    )
    assert template.render([{"role": "user", "content": "<a&b>"}]) == '[{"role": "user", "content": "<a&b>"}]|4<g>'


def test_bad_templates_through_the_cli_are_one_line_exit_2(base, tmp_path):
    runner = CliRunner()
    d, _ = styled(base, "gemma", tmp_path / "gemma")
    result = runner.invoke(app, ["chat", "-m", str(d), "--system", "be brief", "--greedy", "-q"], input="hello\n")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0 and "System role not supported" in result.stderr
    result = runner.invoke(app, ["generate", "-m", str(d), "--chat", "--system", "be brief", "hello", "-q"])
    assert result.exit_code == 2 and "System role not supported" in result.stderr
    broken, _ = styled(base, "chatml", tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{% if messages %}never closed")
    result = runner.invoke(app, ["chat", "-m", str(broken), "-q"], input="hello\n")
    assert result.exit_code == 2 and result.stderr.startswith("llmcli: error: ") and "not valid Jinja" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_cli_chat_and_generate_chat_reply_as_the_session_does(chatml):
    d, fast, hf, loaded = chatml
    runner = CliRunner()
    message = "what is the capital of france"
    expected, _ = hf_reply(hf, fast, messages_of(None, [], message), 15)
    result = runner.invoke(app, ["generate", "-m", str(d), "--chat", "--greedy", "--max-new-tokens", "15", message])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    result = runner.invoke(app, ["chat", "-m", str(d), "--greedy", "--max-new-tokens", "15"],
                           input=f"/system {SYSTEM}\n/system\n{message}\n/exit\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    lines = tmp_path_lines = d.parent / "prompts.txt"
    tmp_path_lines.write_text(f"{message}\n\n{message}\n")
    result = runner.invoke(app, ["generate", "-m", str(d), "--chat", "--greedy", "--max-new-tokens", "15", "-i", str(lines),
                                 "--format", "jsonl", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["text"] for x in result.stdout.splitlines()] == [expected, "", expected]


def test_a_model_without_a_template_keeps_plain_text_chat(base, tmp_path):
    d, _ = styled(base, "chatml", tmp_path / "plain")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert "chat_template" not in convert(d).generation
    runner = CliRunner()
    result = runner.invoke(app, ["chat", "-m", str(d), "--system", SYSTEM, "--greedy", "--max-new-tokens", "8", "-q"],
                           input="hello\n/system\nhow are you\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2  # a reply is one line
    result = runner.invoke(app, ["generate", "-m", str(d), "--chat", "hello", "-q"])
    assert result.exit_code == 2 and "has no chat template" in result.stderr
