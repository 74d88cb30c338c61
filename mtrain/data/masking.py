"""Conversations -> token ids and the spans that carry loss, by rendering prefixes.

For an assistant message at index k the template renders (ChatML shown)

    prompt_k = render(messages[:k], add_generation_prompt=True)  ...<|im_start|>assistant\\n
    turn_k   = render(messages[:k + 1])            ...<|im_start|>assistant\\n{content}<|im_end|>\\n

and both must be prefixes of the whole conversation's rendering. The turn's trained tokens are
those between the two, up to and including the last end-of-turn token (so the header is not
trained, the end token is, and a separator written after it is not). A template that rewrites
earlier turns once a later one is added (Qwen3's own drops past reasoning) breaks the prefix
property; it is refused, naming the conversation, rather than trained with misplaced masks.

The whole rendering is tokenized once, in a batch. Where a prefix ends exactly between two
tokens of that encoding (the encoding's char -> token map says so, for fast tokenizers), that
token index is the boundary. Otherwise, and always with a slow tokenizer or `exact=True`, the
prefix is tokenized on its own and its tokens must be a prefix of the whole encoding: the token
form of the prefix property, which is what makes training see the prompt as inference will.
Where that fails the data is at fault, not the template (e.g. a message starting with a space
that the tokenizer merges into the header's last token): the conversation is a bad record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from mtrain.errors import ConfigError, DataError

Span = tuple[int, int]  # trained tokens [start, stop) of one conversation


@dataclass
class Encoded:
    ids: list[int]
    spans: list[Span]  # increasing, disjoint

    def labels(self) -> list[int]:
        """HF convention: labels[i] = ids[i] where trained, else -100 (no shift)."""
        labels = [-100] * len(self.ids)
        for a, b in self.spans:
            labels[a:b] = self.ids[a:b]
        return labels


class Rendered(NamedTuple):
    full: list[str]  # each conversation
    jobs: list[tuple[int, int]]  # (conversation, message index) of each assistant turn to train
    prompts: list[str]  # per job: messages[:k] with the generation prompt
    turns: list[str]  # per job: messages[:k + 1]


class ChatEncoder:
    """Tokenize conversations with one template and `train_on` rule (assistant | last | all)."""

    def __init__(self, tokenizer, template, train_on: str, exact: bool = False):
        self.tokenizer, self.template, self.train_on = tokenizer, template, train_on
        self.backend = None if exact else getattr(tokenizer, "backend_tokenizer", None)
        vocab = tokenizer.get_vocab()
        ends = {vocab[t] for t in template.end_tokens if t in vocab}
        if tokenizer.eos_token_id is not None:
            ends.add(tokenizer.eos_token_id)
        self.end_ids = frozenset(ends)

    def __getstate__(self) -> dict:
        """A tokenization worker gets the fast tokenizer's `tokenizers` backend (what it runs)
        without transformers' wrapper; a slow tokenizer travels whole."""
        return {**self.__dict__, "tokenizer": None if self.backend else self.tokenizer}

    def encode(
        self,
        conversations: list[list[dict]],
        where: list[str] | None = None,
        bad: Callable[[str, DataError], None] | None = None,
    ) -> list[Encoded | None]:
        """One `Encoded` per conversation (`render`, then `tokenize`)."""
        return self.tokenize(self.render(conversations), where, bad)

    def render(self, conversations: list[list[dict]]) -> Rendered:
        """Every text the masks of `conversations` need (pure Python: a thread can run it while
        the tokenizer, which releases the GIL, works on another batch)."""
        render = self.template.render
        full = render(conversations, False)
        if self.train_on == "all":
            return Rendered(full, [], [], [])
        jobs = []
        for i, conv in enumerate(conversations):
            turns = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
            jobs += [(i, k) for k in (turns[-1:] if self.train_on == "last" else turns)]
        prompts = render([conversations[i][:k] for i, k in jobs], True)
        # A turn that ends the conversation renders as the whole; only inner turns need rendering.
        turns = [full[i] for i, _ in jobs]
        inner = [j for j, (i, k) in enumerate(jobs) if k + 1 < len(conversations[i])]
        rendered = render([conversations[jobs[j][0]][: jobs[j][1] + 1] for j in inner], False)
        for j, text in zip(inner, rendered):
            turns[j] = text
        return Rendered(full, jobs, prompts, turns)

    def tokenize(
        self,
        rendered: Rendered,
        where: list[str] | None = None,
        bad: Callable[[str, DataError], None] | None = None,
    ) -> list[Encoded | None]:
        """One `Encoded` per conversation. A conversation whose turn boundary falls inside a
        token is passed to `bad(where, error)` and comes back as None; without `bad` it raises."""
        full, jobs, prompts, turn_texts = rendered
        where = where or [f"conversation {n + 1}" for n in range(len(full))]
        if self.train_on == "all":
            return [Encoded(x, [(0, len(x))]) for x in self._tokenize(full)]
        encs = self.backend.encode_batch(full, add_special_tokens=False) if self.backend else None
        ids = [e.ids for e in encs] if encs is not None else self._tokenize(full)

        bounds: dict[tuple[int, int], int] = {}  # (job, 0 prompt | 1 turn) -> token index
        unresolved = []
        for j, (i, k) in enumerate(jobs):
            text, prompt, turn = full[i], prompts[j], turn_texts[j]
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise _not_prefix(where[i], k, prompt, turn, text)
            for side, chars in enumerate((len(prompt), len(turn))):
                t = _token_starting_at(encs[i] if encs else None, chars, len(text), len(ids[i]))
                if t is None:
                    unresolved.append((j, side, (prompt, turn)[side]))
                else:
                    bounds[j, side] = t
        rejected = set()
        for (j, side, _), prefix in zip(unresolved, self._tokenize([u[2] for u in unresolved])):
            i, k = jobs[j]
            if ids[i][: len(prefix)] == prefix:
                bounds[j, side] = len(prefix)
            elif i not in rejected:
                rejected.add(i)
                err = DataError(
                    f"a token spans the boundary {'before' if side == 0 else 'after'} assistant "
                    f"message {k + 1} (its tokens alone differ from the conversation's), so the "
                    "prompt would be tokenized differently in training and in inference; "
                    "strip whitespace at the start and end of messages"
                )
                if bad is None:
                    raise DataError(f"{where[i]}: {err}")
                bad(where[i], err)

        spans: list[list[Span]] = [[] for _ in full]
        end_ids = self.end_ids
        for j, (i, _) in enumerate(jobs):
            if i in rejected:
                continue
            a, b, x = bounds[j, 0], bounds[j, 1], ids[i]
            stop = next((t + 1 for t in range(b - 1, a - 1, -1) if x[t] in end_ids), b)
            if stop > a:
                spans[i].append((a, stop))
        return [
            None if i in rejected else Encoded(x, s) for i, (x, s) in enumerate(zip(ids, spans))
        ]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _token_starting_at(enc, c: int, n_chars: int, n_tokens: int) -> int | None:
    """The index of the token starting at char `c` of the encoded text, if one does (so `c`
    falls between two tokens); None when unknown (no offsets) or when a token spans `c`."""
    if c == n_chars:
        return n_tokens
    if enc is None:
        return 0 if c == 0 else None
    t = enc.char_to_token(c)  # the first token covering char c
    return t if t is not None and enc.token_to_chars(t)[0] == c else None


def _not_prefix(where: str, k: int, prompt: str, turn: str, full: str) -> ConfigError:
    if full.startswith(turn):
        what, text, other = f"messages[:{k}] with the generation prompt", prompt, turn
    else:
        what, text, other = f"messages[:{k + 1}]", turn, full
    n = next((n for n, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
    return ConfigError(
        f"{where}: the chat template renders {what} as {text[n : n + 30]!r}... at char {n}, but "
        f"the longer conversation as {other[n : n + 30]!r}...: it rewrites earlier turns (as "
        "Qwen3's own template drops past reasoning), so assistant turns cannot be masked; use "
        "data.train_on=last, or a built-in data.template"
    )
