"""Cross-tokenizer distillation: span alignment with a vocabulary map where pieces match.

A teacher whose tokenizer differs from the student's gets the student's token rows, turns
them back into text, tokenizes that text its own way, and scores it. Its distribution at a
point of the text is comparable with the student's where both are predicting "the next
piece from byte b": the student at the position whose context ends at byte b, the teacher at
the index whose token ends at byte b. At those shared boundaries its top-k ids are mapped
onto the student ids that stand for exactly the same bytes; ids with no such piece carry no
entry, so their mass is part of the tail. Other positions (inside a teacher token, or
predicting one of the student's special tokens) carry no signal at all.

Unlike sorting probabilities (ULD), this keeps which token each probability belongs to: a
student whose distribution is shifted by one token pays for it.

The text: every student piece as its bytes; a special token (chat markup) as "\\n", so a
teacher without a chat template reads the conversation as plain text with its role names;
BOS and padding as nothing. A teacher whose tokenizer adds a BOS gets one first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for bytes, inverted."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _specials(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def piece_bytes(tokenizer: Any) -> list[bytes | None]:
    """Per id, the exact bytes the token stands for in text; None for special tokens."""
    byte_level = "ByteLevel" in repr(tokenizer.backend_tokenizer.decoder)
    decoder = _byte_decoder()
    specials = _specials(tokenizer)
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in specials or piece is None:
            out.append(None)
        elif byte_level:
            try:
                out.append(bytes(decoder[c] for c in piece))
            except KeyError:  # an added, non-byte-level piece
                out.append(piece.encode("utf-8"))
        elif m := _BYTE_PIECE.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def vocab_map(teacher_tok: Any, student_tok: Any) -> np.ndarray:
    """[teacher vocab] the student id with exactly the same bytes, or -1. One to one: byte
    pieces (<0xNN>) count only for bytes no ordinary piece stands for."""
    student: dict[bytes, int] = {}
    for i, b in enumerate(piece_bytes(student_tok)):
        if b is not None:
            student.setdefault(b, i)
    out = np.full(len(teacher_tok), -1, dtype=np.int64)
    taken: set[int] = set()
    pieces = piece_bytes(teacher_tok)
    names = teacher_tok.convert_ids_to_tokens(list(range(len(teacher_tok))))
    order = sorted(range(len(pieces)), key=lambda i: bool(_BYTE_PIECE.match(names[i] or "")))
    for i in order:  # ordinary pieces first
        b = pieces[i]
        s = student.get(b) if b is not None else None
        if s is not None and s not in taken:
            out[i] = s
            taken.add(s)
    return out


@dataclass
class Alignment:
    teacher_ids: list[int]  # the teacher's input row
    pairs: np.ndarray  # [n, 2] int64: (index into the row's loss positions, teacher index)


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


class TokenAligner:
    def __init__(self, student_tok: Any, teacher_tok: Any, max_len: int) -> None:
        self.teacher_tok = teacher_tok
        self.max_len = max_len
        self.student_bytes = piece_bytes(student_tok)
        self.teacher_bytes = piece_bytes(teacher_tok)
        self.silent = {
            i for i in (student_tok.bos_token_id, student_tok.pad_token_id) if i is not None
        }
        self.map = vocab_map(teacher_tok, student_tok)
        self.bos = [teacher_tok.bos_token_id] if _adds_bos(teacher_tok) else []

    def _text(self, row: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The row as bytes, and each student token's end byte."""
        parts = []
        for t in row.tolist():
            b = self.student_bytes[t] if t < len(self.student_bytes) else None
            parts.append(b if b is not None else (b"" if t in self.silent else b"\n"))
        ends = np.cumsum([len(p) for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        return b"".join(parts), ends

    def align(self, row: np.ndarray, loss_positions: np.ndarray) -> Alignment:
        """The teacher's row and the (loss position, teacher index) pairs of one row."""
        data, ends = self._text(np.asarray(row))
        none = Alignment(self.bos or [self.teacher_tok.eos_token_id or 0], np.zeros((0, 2), int))
        cut = len(data)
        while True:
            try:
                text = data[:cut].decode("utf-8")
                break
            except UnicodeDecodeError as exc:
                if exc.start < len(data) - 4 or cut == 0:  # broken inside, not a cut char
                    return none
                cut = exc.start
        ids = self.bos + self.teacher_tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[: self.max_len]
        n_bos = min(len(self.bos), len(ids))
        pieces = [b""] * n_bos + [self.teacher_bytes[i] for i in ids[n_bos:]]
        if any(p is None for p in pieces):
            return none
        t_ends = np.cumsum([len(p) for p in pieces])
        if b"".join(pieces) != data[: int(t_ends[-1]) if len(t_ends) else 0]:
            return none  # a normaliser changed the text: no byte offsets to trust
        # teacher index j predicts the token that starts where token j ends; of several
        # indices ending at one byte (zero-length pieces), the last one comes right before
        index_of_end = {int(e): j for j, e in enumerate(t_ends.tolist()) if j >= n_bos or e == 0}
        if not n_bos:
            index_of_end.pop(0, None)
        pairs = []
        for k, p in enumerate(np.asarray(loss_positions).tolist()):
            if p + 1 >= len(row) or self.student_bytes[int(row[p + 1])] is None:
                continue  # the student predicts a special token: the teacher has no piece
            j = index_of_end.get(int(ends[p]))
            if j is not None and int(ends[p]) <= cut:
                pairs.append((k, j))
        return Alignment(ids, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))

    def map_topk(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher top-k -> student ids ([n, k] int64, float32 log-probs). An id with no
        student piece becomes an empty (-inf) entry repeating the row's first mapped id, as
        the loss expects; a row with nothing mapped is all empty."""
        mapped = self.map[ids.astype(np.int64)]
        valid = mapped >= 0
        lp = np.where(valid, logprobs.astype(np.float32), -np.inf).astype(np.float32)
        first = np.where(valid.any(1), mapped[np.arange(len(mapped)), valid.argmax(1)], 0)
        return np.where(valid, mapped, first[:, None]), lp
