"""Chat rows as token ids, shared by the teacher (the prompts it writes from) and the data
stream (the rows teachers score and students train on), so both follow one set of rules:

- BOS by behaviour: a tokenizer "adds BOS" iff a plain `tokenizer("x")` emits it first. Then
  every row starts with exactly one BOS (a template that renders `<bos>` as text is not
  given a second one); otherwise none is added.
- A response that ended ("stop") keeps its end-of-turn token as the last target and nothing
  after it; a response cut by the length limit ("length") gets no end-of-turn token at all,
  so a student is never taught to end a turn mid-sentence.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

STOP, LENGTH = "stop", "length"
FINISH_REASONS = (STOP, LENGTH)

_SPECIALS: weakref.WeakKeyDictionary[Any, re.Pattern[str] | None] = weakref.WeakKeyDictionary()


class ChatEncodingError(ValueError):
    """A row that cannot be tokenized without mis-masking it (it is dropped and counted)."""


def adds_bos(tok: Any) -> bool:
    """Whether the tokenizer itself puts BOS first (Gemma does; SmolLM2 names one but adds
    none): decided by what it does, not by whether it names a bos token."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    ids = tok("x")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def with_bos(tok: Any, ids: list[int], add: bool | None = None) -> list[int]:
    """`ids` starting with exactly one BOS when the tokenizer adds BOS, else unchanged."""
    if not (adds_bos(tok) if add is None else add):
        return list(ids)
    bos = tok.bos_token_id
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos, *ids[start:]]


def render_prompt(tok: Any, prompt: str) -> str:
    """The text the teacher continues: the chat template's generation prompt, or the plain
    prompt and a newline when the tokenizer has no template."""
    if not tok.chat_template:
        return prompt + "\n"
    chat = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def render_prompt_ids(tok: Any, prompt: str, add: bool | None = None) -> list[int]:
    """Token ids of the rendered prompt, BOS by the tokenizer's behaviour."""
    ids = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    return with_bos(tok, ids, add)


def encode_text(tok: Any, text: str, add: bool | None = None) -> list[int]:
    """Token ids of plain text (no chat), BOS by the tokenizer's behaviour."""
    return with_bos(tok, tok(text, add_special_tokens=False)["input_ids"], add)


def encode_chat(
    tok: Any, prompt: str, response: str, finished: bool, add: bool | None = None
) -> tuple[list[int], int]:
    """(ids, response_start) of one prompt/response turn, cut at the character level: right
    after the response when it was cut by the limit, right after the first special token
    that follows it (its end of turn) when it ended. Raises ChatEncodingError when the
    response cannot be found in the rendering or the prompt's tokens are not a prefix."""
    add = adds_bos(tok) if add is None else add
    prompt_text = render_prompt(tok, prompt)
    full = _render_turn(tok, prompt, response)
    search_from = len(prompt_text) if full.startswith(prompt_text) else 0
    pos = full.find(response, search_from)
    if pos < 0:
        raise ChatEncodingError("the chat template does not render the response verbatim")
    end = pos + len(response)
    tail: list[int] = []
    if finished:
        eot = _special_pattern(tok)
        match = eot.search(full, end) if eot is not None and tok.chat_template else None
        if match is not None:
            end = match.end()
        elif tok.eos_token_id is not None:
            tail = [tok.eos_token_id]  # nothing marks the end of the turn: EOS does
    ids = encode_text(tok, full[:end], add) + tail
    prompt_ids = encode_text(tok, prompt_text, add)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ChatEncodingError("the prompt's tokens are not a prefix of the conversation's")
    return ids, len(prompt_ids)


def stop_token_ids(generation_eos: int | Iterable[int] | None, tok: Any) -> list[int]:
    """Ids that end a turn: the model's generation_config.eos_token_id (an int or a list)
    and the tokenizer's eos."""
    if generation_eos is None:
        ids: set[int] = set()
    elif isinstance(generation_eos, int):
        ids = {generation_eos}
    else:
        ids = {int(i) for i in generation_eos}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def split_finish(new_ids: list[int], stop_ids: Iterable[int]) -> tuple[list[int], str]:
    """The generated ids before the first stop id and why generation ended."""
    stops = set(stop_ids)
    for i, t in enumerate(new_ids):
        if t in stops:
            return list(new_ids[:i]), STOP
    return list(new_ids), LENGTH


def _render_turn(tok: Any, prompt: str, response: str) -> str:
    if not tok.chat_template:
        return render_prompt(tok, prompt) + response
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tok.apply_chat_template(chat, tokenize=False)


def _special_pattern(tok: Any) -> re.Pattern[str] | None:
    """A regex matching any special token's text (cached per tokenizer: Gemma has
    thousands)."""
    try:
        return _SPECIALS[tok]
    except (KeyError, TypeError):
        pass
    names = set(tok.all_special_tokens)
    names |= {t.content for t in tok.added_tokens_decoder.values() if t.special}
    names.discard("")
    pattern = (
        re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
        if names
        else None
    )
    try:
        _SPECIALS[tok] = pattern
    except TypeError:
        pass  # not weak-referenceable: computed again next time
    return pattern
