"""Whether two tokenizers are the same tokenizer, judged by what they do.

Vocab size says little: Llama-2 and Mistral-7B-v0.1 both have 32000 ids with different
pieces, while Qwen2.5-0.5B (151936) and Qwen2.5-7B (152064) share one tokenizer and differ
only in embedding rows that pad the matrix. So two tokenizers are compared by their pieces
(every piece at the same id), their special tokens, and their encodings of probe texts
(spaces, unicode, digits, code, chat markup, the student's chat template), so that merges,
normalisers and BOS handling count too. Model embedding sizes are not compared: ids beyond
the tokenizer are padding, and the teacher never sends them.
"""

from __future__ import annotations

from typing import Any

PROBES = (
    "Hello, world! How are you?",
    "  two  spaces\tand a tab\n\nand new lines  ",
    "naïve café — Straße, 東京, 🙂, ﬁne",
    "def f(x):\n    return x**2 + 3.14159  # code",
    "1234567890 and 1,000,000.5",
)


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """None when `a` and `b` behave as one tokenizer; else the first difference, in words."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        if len(va) != len(vb):
            return f"{len(va)} vs {len(vb)} pieces"
        by_id_a = {i: p for p, i in va.items()}
        by_id_b = {i: p for p, i in vb.items()}
        i = next(i for i in sorted(by_id_a) if by_id_a.get(i) != by_id_b.get(i))
        return f"id {i} is {by_id_a.get(i)!r} vs {by_id_b.get(i)!r}"
    sa, sb = a.special_tokens_map, b.special_tokens_map
    if sa != sb:
        key = next(k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k))
        return f"special token {key} is {sa.get(key)!r} vs {sb.get(key)!r}"
    for text in _probes(a):
        if a(text)["input_ids"] != b(text)["input_ids"]:
            return f"they encode {text[:30]!r} differently"
    return None


def _probes(tok: Any) -> list[str]:
    probes = list(PROBES)
    probes.append(" ".join(tok.all_special_tokens) + " after specials")
    if getattr(tok, "chat_template", None):
        chat = [
            {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello."},
        ]
        try:
            probes.append(tok.apply_chat_template(chat, tokenize=False))
        except Exception:  # a template that needs other roles: the other probes still count
            pass
    return probes
