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
             Unlike Qwen3's template, every assistant turn is treated alike (Qwen3 drops the
             reasoning of turns before the last user message), so each rendering stays a prefix
             of the next one, which multi-turn loss masks need.
    llama3   "<|begin_of_text|>", then per message
             "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>", the content
             stripped of surrounding whitespace (Llama 3's `| trim`); no default system prompt
             (Llama 3.1's dated system header is not reproduced: use data.template=tokenizer).
             Tool calls and tool roles of any template are not handled.

`data.system` replaces the data's system prompt, or adds one where there is none.
`auto` uses the tokenizer's template when it has one, else the built-in one for the model family
named by `model_type` in the tokenizer directory's config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mtrain.errors import ConfigError

TEMPLATE_VERSION = 1  # bump when a built-in template renders differently
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


BUILTIN = {
    f.name: f
    for f in (
        ChatFormat(
            "qwen3", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_end|>",
            specials=("<|im_start|>", "<|im_end|>", "<think>", "</think>"), reasoning=True,
        ),
        ChatFormat(
            "qwen2_5", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_end|>",
            specials=("<|im_start|>", "<|im_end|>"),
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
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
        if self.thinking == "off":
            return answer
        reasoning, answer = reasoning.strip("\n"), answer.lstrip("\n")
        return f"<think>\n{reasoning}\n</think>\n\n{answer}"

    def render_one(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        fmt = self.fmt
        messages = with_system(messages, self.system)
        parts = [fmt.begin]
        if fmt.default_system is not None and not (messages and messages[0]["role"] == "system"):
            parts.append(fmt.header.format(role="system") + fmt.default_system + fmt.end)
        for m in messages:
            parts.append(self._header(m["role"]) + self._content(m) + fmt.end)
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

    def _direct(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """`Template.render(messages=..., ...)`, from the merged variables."""
        jinja = self._jinja
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt}
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

    def _apply(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        return self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt,
            **self.kwargs,
        )  # fmt: skip

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        convs = [with_system(c, self.system) for c in conversations]
        if not self.direct:
            return self._apply(convs, add_generation_prompt)
        return [self._direct(c, add_generation_prompt) for c in convs]


def resolve_template(name: str, tokenizer, system: str | None = None, thinking: str = "on"):
    """The template `data.template=name` means for this tokenizer."""
    if name == "auto":
        name = "tokenizer" if tokenizer.chat_template else _family_template(tokenizer)
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


def _single_token(tokenizer, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def _family_template(tokenizer) -> str:
    config = Path(str(tokenizer.name_or_path)) / "config.json"
    family = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if family not in FAMILY_TEMPLATES:
        raise ConfigError(
            f"data.template=auto: the tokenizer {tokenizer.name_or_path} has no chat_template and "
            f"its model family ({family}) has no built-in one; set data.template to one of "
            f"{', '.join(BUILTIN)}"
        )
    return FAMILY_TEMPLATES[family]
