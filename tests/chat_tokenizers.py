"""Real (tiny, char-level) tokenizers built in code, shaped like the ones that matter:
SmolLM2 (ChatML, names a BOS but adds none), Gemma (adds BOS, its template renders `<bos>`
too), a BOS-adding tokenizer whose template renders none, and one with no template."""

from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = [
    "<pad>",
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<unk>",
]
VOCAB_SIZE = 96  # the tiny test models' vocab: every id a model emits decodes to something

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

KINDS = ("smollm", "gemma", "bos_chatml", "plain", "merging")


def _vocab(extra: list[str]) -> dict[str, int]:
    chars = list(string.ascii_letters + string.digits + " \n.,?!'") + extra
    filler = [c for c in string.punctuation if c not in chars]
    tokens = SPECIALS + chars + filler
    return {t: i for i, t in enumerate(tokens[:VOCAB_SIZE])}


def build_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """smollm: ChatML, bos named, none added; gemma: BOS added and rendered by its template;
    bos_chatml: BOS added, ChatML renders none; plain: no template; merging: SmolLM-like
    but "\\nZ" is one token, so a response starting with "Z" changes the prompt's tokens."""
    merges = [("\n", "Z")] if kind == "merging" else []
    vocab = _vocab(["\nZ"] if merges else [])
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if kind in ("gemma", "bos_chatml"):
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    template = {"gemma": GEMMA, "plain": None}.get(kind, CHATML)
    eos = "<|im_end|>" if kind in ("smollm", "merging", "bos_chatml") else "<eos>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token=eos,
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=template,
    )
