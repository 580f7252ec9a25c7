"""Chat templates: a conversation as the model was trained to read it.

A model's template (generation.json "chat_template", carried over from its tokenizer_config.json
or chat_template.jinja by the converter) is Jinja, rendered as transformers'
`apply_chat_template` renders it (`utils/chat_template_utils.py`): an immutable sandbox,
trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML, and the variables `messages`, `add_generation_prompt`, `tools`,
`documents` and the tokenizer's special token strings (bos_token, eos_token...).
The template is foreign input: a template that does not parse, or raises while rendering
(wrong roles, a system message it does not take), is a UserError.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from llmcli.errors import UserError

Message = dict[str, str]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _generation_extension():
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker marks the
        assistant's tokens with it for training); rendering keeps the body as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


class ChatTemplate:
    """A compiled chat template; `render(messages)` is the prompt text, special tokens spelled out."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None, where: str = "the model's chat template"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' own: Jinja's escapes HTML characters
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(format):
            return datetime.now().strftime(format)

        class Namespace(jinja2.utils.Namespace):
            # transformers': no underscore names, which would reach CPython internals
            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    Namespace._check(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name, value):
                Namespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with _: {name!r}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_generation_extension(), jinja2.ext.loopcontrols])  # fmt: skip
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.globals["namespace"] = Namespace
        self.where = where
        self.tokens = dict(tokens or {})
        self._errors = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{where} is not valid Jinja (line {e.lineno}: {_one_line(e.message)})") from None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise UserError("a chat needs at least one message")
        try:
            return self._template.render(
                **self.tokens,
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except self._errors as e:  # the template's own code failed or refused these messages
            reason = _one_line(getattr(e, "message", None) or e) or type(e).__name__
            roles = "/".join(m["role"] for m in messages)
            raise UserError(f"{self.where} refused the conversation ({roles}): {reason}") from None


def template_of(generation: dict, where: str = "the model's chat template") -> ChatTemplate | None:
    """The chat template a model directory's generation.json carries, or None."""
    source = generation.get("chat_template")
    if source is None:
        return None
    if not isinstance(source, str):
        raise UserError(f"{where}: generation.json's chat_template is not a string")
    return ChatTemplate(source, generation.get("chat_tokens") or {}, where)


@dataclass
class Conversation:
    """The turns so far: an optional system message, then (user, assistant) pairs."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, pending: str | None = None) -> list[Message]:
        """As chat messages, with `pending` as the last user message (the one to answer)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if pending is not None:
            out.append({"role": "user", "content": pending})
        return out

    def add(self, user: str, assistant: str) -> None:
        self.turns.append((user, assistant))

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns.clear()


def prompt_ids(
    template: ChatTemplate, conversation: Conversation, message: str, encode: Callable[[str], list[int]], room: int
) -> list[int]:
    """The ids of the conversation with `message` to answer, ready for the model (the template
    writes every special token; `encode` adds none). When they exceed `room` tokens, whole
    turns are dropped from the oldest (from `conversation` too); the system message is kept."""
    while True:
        ids = encode(template.render(conversation.messages(message), add_generation_prompt=True))
        if len(ids) <= room:
            return ids
        if not conversation.turns:
            what = "the system message and this message" if conversation.system else "this message"
            raise UserError(f"{what} need {len(ids)} tokens; the model's context leaves {room} beside the reply")
        del conversation.turns[0]
