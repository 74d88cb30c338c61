"""Chat templates: a conversation -> the text a model is trained on.

`data.template=tokenizer` renders with the tokenizer's own Jinja `chat_template`
(`tokenizer.apply_chat_template`), so any HF chat model works as its authors format it. The
built-in templates are a table of formats, written from the models' published templates
(assumptions where a published template does more are stated here):

    qwen2_5  ChatML: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message. With no system
             message, Qwen2.5's default "You are Qwen, created by Alibaba Cloud. You are a
             helpful assistant." is inserted, as its template does.
    qwen3    the same ChatML, no default system prompt. Assistant turns follow `data.thinking`:
             keep  the content as it is in the data;
             on    Qwen3's rendering of a final assistant turn:
                   "<think>\\n{reasoning}\\n</think>\\n\\n{answer}", reasoning and answer split
                   at "</think>" and stripped of newlines as Qwen3's template does; an empty
                   block when there is no reasoning;
             off   reasoning removed, the turn opens with the empty "<think>\\n\\n</think>\\n\\n"
                   that Qwen3's template appends to the generation prompt when
                   enable_thinking=False. It belongs to the header, so it is not trained: the
                   model learns to answer after it, not to skip thinking on its own.
             The reasoning is the message's `reasoning_content` when it has one. Unlike Qwen3's
             template, every assistant turn is treated alike: each keeps its reasoning (Qwen3's
             drops that of turns before the last user message, and writes no empty block in a
             non-final turn without reasoning), so each rendering stays a prefix of the next
             one, which multi-turn loss masks need. This is also LLaMA-Factory's rule.
             `data.template=auto` picks this template for a Qwen3 tokenizer (see below).
    qwen2_5 and qwen3 render tools (the system turn's "# Tools" block), assistant `tool_calls`
             (`<tool_call>` blocks, trained with the turn) and tool results (`<tool_response>`
             blocks in a user turn, consecutive results grouped, never trained) exactly as their
             published templates do.
    llama3   "<|begin_of_text|>", then per message
             "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>", the content
             stripped of surrounding whitespace (Llama 3's `| trim`); no default system prompt
             (Llama 3.1's dated system header is not reproduced: use data.template=tokenizer).
             It does not render tools: records with tools need data.template=tokenizer.

`data.system` replaces the data's system prompt, or adds one where there is none.
`auto` uses the tokenizer's template when it has one, else the built-in one for the model family
named by `model_type` in the tokenizer directory's config.json. The exception is Qwen3 (config.json
`model_type` qwen3 / qwen3_moe and a template that writes `<think>`): its template rewrites
earlier turns, so multi-turn conversations could not be masked; `auto` takes the built-in qwen3
template, which renders a single-turn conversation (tools included) byte for byte as Qwen3's
does, and keeps every turn's reasoning in longer ones (logged once). In a tool-calling loop that
includes the empty `<think>` block of a non-final turn without reasoning: the block the model
writes at inference, which Qwen3's template leaves out when it re-renders the history.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mtrain.data.tools import chatml_tool_calls, chatml_tools_system, tools_of, without_tools
from mtrain.errors import ConfigError

log = logging.getLogger("mtrain.data")

TEMPLATE_VERSION = 2  # bump when a template renders the same records differently
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Tokens that close a turn in the common chat formats; the loss mask ends after the last one in
# an assistant turn, so separators a template writes after it (ChatML's "\n") are not trained.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class ChatFormat:
    """A template with one header and one end per message (the built-ins)."""

    name: str
    header: str  # before a message's content; {role} is the message's role
    end: str  # after a message's content
    end_token: str  # the token that ends a turn (the model's stop token)
    begin: str = ""  # once, before everything
    specials: tuple[str, ...] = ()  # tokens the tokenizer must have as single tokens
    default_system: str | None = None  # system prompt when the conversation has none
    strip: bool = False  # strip whitespace around each message's content
    reasoning: bool = False  # assistant turns carry <think> blocks (data.thinking)
    tools: bool = False  # renders tools, tool calls and results (ChatML, as Qwen2.5 / Qwen3)
    raw_string_arguments: bool = False  # tool-call arguments given as a string are written as is


BUILTIN = {
    f.name: f
    for f in (
        ChatFormat(
            "qwen3", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_end|>",
            specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>"), reasoning=True,
            tools=True, raw_string_arguments=True,
        ),
        ChatFormat(
            "qwen2_5", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_end|>",
            specials=("<|im_start|>", "<|im_end|>"),
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            tools=True,
        ),
        ChatFormat(
            "llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", "<|eot_id|>",
            begin="<|begin_of_text|>", strip=True,
            specials=(
                "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            ),
        ),
    )
}  # fmt: skip

# HF `model_type` -> built-in template, for tokenizers without a chat template.
FAMILY_TEMPLATES = {"qwen3": "qwen3", "qwen3_moe": "qwen3", "qwen2": "qwen2_5", "llama": "llama3"}


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None:
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system}, *rest]


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, split as Qwen3's template splits them."""
    if "</think>" not in content:
        return "", content
    head, _, _ = content.partition("</think>")
    reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


class BuiltinTemplate:
    def __init__(self, fmt: ChatFormat, system: str | None, thinking: str):
        self.fmt, self.system, self.thinking = fmt, system, thinking
        self.end_tokens = (fmt.end_token,)
        self.identity = f"{fmt.name}/v{TEMPLATE_VERSION}/{thinking if fmt.reasoning else ''}"

    def _header(self, role: str) -> str:
        head = self.fmt.header.format(role=role)
        if role == "assistant" and self.fmt.reasoning and self.thinking == "off":
            head += EMPTY_THINK
        return head

    def _content(self, message: dict) -> str:
        content = message["content"].strip() if self.fmt.strip else message["content"]
        if message["role"] != "assistant" or not self.fmt.reasoning or self.thinking == "keep":
            return content
        reasoning, answer = split_reasoning(content)
        if message.get("reasoning_content") is not None:
            reasoning, answer = message["reasoning_content"], content
        if self.thinking == "off":
            return answer
        reasoning, answer = reasoning.strip("\n"), answer.lstrip("\n")
        return f"<think>\n{reasoning}\n</think>\n\n{answer}"

    def _answer(self, message: dict) -> str:
        """The part of an assistant turn after its reasoning (what tool calls follow)."""
        if not self.fmt.reasoning or self.thinking == "keep":
            return message["content"]
        if message.get("reasoning_content") is not None:
            return message["content"].lstrip("\n")
        return split_reasoning(message["content"])[1]

    def render_one(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        fmt = self.fmt
        offered = tools_of(messages)
        messages = with_system(without_tools(messages), self.system)
        if not fmt.tools and (offered or any(_tool_use(m) for m in messages)):
            raise ConfigError(
                f"data.template={fmt.name} does not render tools, tool calls or tool results; "
                "use data.template=tokenizer (the model's own template)"
            )
        parts = [fmt.begin]
        has_system = bool(messages) and messages[0]["role"] == "system"
        if offered:
            system = messages[0]["content"] if has_system else fmt.default_system
            parts.append(chatml_tools_system(offered, system))
            messages = messages[1:] if has_system else messages
        elif fmt.default_system is not None and not has_system:
            parts.append(fmt.header.format(role="system") + fmt.default_system + fmt.end)
        last = len(messages) - 1
        for n, m in enumerate(messages):
            if m["role"] == "tool":  # results of one round share a user turn
                if n == 0 or messages[n - 1]["role"] != "tool":
                    parts.append("<|im_start|>user")
                parts.append("\n<tool_response>\n" + m["content"] + "\n</tool_response>")
                if n == last or messages[n + 1]["role"] != "tool":
                    parts.append("<|im_end|>\n")
                continue
            text = self._header(m["role"]) + self._content(m)
            if m.get("tool_calls"):
                answer = self._answer(m)
                text += chatml_tool_calls(m["tool_calls"], answer, fmt.raw_string_arguments)
            parts.append(text + fmt.end)
        if add_generation_prompt:
            parts.append(self._header("assistant"))
        return "".join(parts)

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        return [self.render_one(c, add_generation_prompt) for c in conversations]


class TokenizerTemplate:
    """The tokenizer's own Jinja template; `data.thinking` on/off is passed as `enable_thinking`
    (what Qwen3's template reads; templates that do not know it ignore it)."""

    def __init__(self, tokenizer, system: str | None, thinking: str):
        self.tokenizer, self.system = tokenizer, system
        self.kwargs = {} if thinking == "keep" else {"enable_thinking": thinking == "on"}
        self.source = tokenizer.get_chat_template()
        digest = hashlib.sha256(self.source.encode()).hexdigest()[:16]
        self.identity = f"tokenizer/{digest}/{thinking}"
        self.end_tokens = END_OF_TURN
        self.variables = {**tokenizer.special_tokens_map, **self.kwargs}
        self._compile()
        self.direct = self._jinja is not None and self._renders_as_public()

    def _compile(self) -> None:
        """transformers' Jinja environment for chat templates (its filters and extensions), and
        the variables every rendering starts from: the template's globals, merged once here
        rather than on every call as `Template.render` does (the merge costs more than
        rendering a short conversation)."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._jinja = _compile_jinja_template(self.source)
        except Exception:
            self._jinja, self._context = None, None
            return
        self._context = {**self._jinja.globals, "tools": None, "documents": None, **self.variables}

    def _renders_as_public(self) -> bool:
        """transformers' compiled template is called without `apply_chat_template` around it,
        whose per-message conversions cost as much as the rendering itself and change nothing
        in plain {role, content} messages. It is used only if it renders a probe exactly as
        `apply_chat_template` does; otherwise (a future transformers) the public path is used."""
        probe = [
            {"role": "system", "content": " s "}, {"role": "user", "content": "u\n"},
            {"role": "assistant", "content": "<think>r</think>a"}, {"role": "user", "content": "v"},
        ]  # fmt: skip
        try:
            return all(
                self._direct(probe[:n], gen) == self._apply([probe[:n]], gen)[0]
                for n, gen in ((3, False), (4, True), (2, True))
            )
        except Exception:  # a template refusing the probe (e.g. no system role): stay public
            return False

    def _direct(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
        """`Template.render(messages=..., tools=..., ...)`, from the merged variables."""
        jinja = self._jinja
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            variables["tools"] = tools
        context = jinja.new_context({**self._context, **variables}, shared=True)
        try:
            return jinja.environment.concat(jinja.root_render_func(context))
        except Exception:
            jinja.environment.handle_exception()  # re-raises, as `Template.render` does

    def __getstate__(self) -> dict:
        """What a tokenization worker needs: rendering directly takes the source alone, so the
        worker neither receives transformers' tokenizer nor imports its models (nor torch)."""
        state = {**self.__dict__, "_jinja": None, "_context": None}
        if self.direct:
            state["tokenizer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.direct:
            self._compile()

    def _apply(
        self, conversations: list[list[dict]], add_generation_prompt: bool, tools=None
    ) -> list[str]:
        return self.tokenizer.apply_chat_template(
            conversations, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            **self.kwargs,
        )  # fmt: skip

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        """Each conversation with its own tools (messages[0]["tools"], see data/tools.py)."""
        if not conversations:
            return []
        offered = [tools_of(c) for c in conversations]
        convs = [with_system(without_tools(c), self.system) for c in conversations]
        if self.direct:
            return [self._direct(c, add_generation_prompt, t) for c, t in zip(convs, offered)]
        if not any(offered):
            return self._apply(convs, add_generation_prompt)
        return [self._apply([c], add_generation_prompt, t)[0] for c, t in zip(convs, offered)]


def resolve_template(name: str, tokenizer, system: str | None = None, thinking: str = "on"):
    """The template `data.template=name` means for this tokenizer."""
    if name == "auto":
        name = _auto_template(tokenizer)
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise ConfigError(
                f"data.template=tokenizer but the tokenizer {tokenizer.name_or_path} has no "
                f"chat_template; choose one of {', '.join(BUILTIN)}"
            )
        return TokenizerTemplate(tokenizer, system, thinking)
    if name not in BUILTIN:
        raise ConfigError(
            f"data.template={name} is not one of auto, tokenizer, {', '.join(BUILTIN)}"
        )
    fmt = BUILTIN[name]
    missing = [t for t in fmt.specials if not _single_token(tokenizer, t)]
    if missing:
        raise ConfigError(
            f"data.template={name} needs the special token(s) {', '.join(missing)}, which the "
            f"tokenizer {tokenizer.name_or_path} lacks; use this model family's template"
        )
    return BuiltinTemplate(fmt, system, thinking)


def _tool_use(message: dict) -> bool:
    return message["role"] == "tool" or bool(message.get("tool_calls"))


def _single_token(tokenizer, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def _model_type(tokenizer) -> str | None:
    config = Path(str(tokenizer.name_or_path)) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _auto_template(tokenizer) -> str:
    """`data.template=auto`: the tokenizer's own, except for Qwen3 (see the module docstring)."""
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if not source:
        return _family_template(tokenizer)
    if _model_type(tokenizer) in ("qwen3", "qwen3_moe") and "<think>" in source:
        log.info(
            "data.template=auto: a Qwen3 tokenizer, so mtrain's qwen3 template: Qwen3's own "
            "rewrites earlier turns (drops their reasoning), which leaves multi-turn "
            "conversations unmaskable; this one keeps every assistant turn with its reasoning "
            "and renders single-turn conversations exactly as Qwen3's (data.template=tokenizer "
            "for Qwen3's own, with data.train_on=last for multi-turn data)"
        )
        return "qwen3"
    return "tokenizer"


def _family_template(tokenizer) -> str:
    family = _model_type(tokenizer)
    if family not in FAMILY_TEMPLATES:
        raise ConfigError(
            f"data.template=auto: the tokenizer {tokenizer.name_or_path} has no chat_template and "
            f"its model family ({family}) has no built-in one; set data.template to one of "
            f"{', '.join(BUILTIN)}"
        )
    return FAMILY_TEMPLATES[family]
