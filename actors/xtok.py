"""Cross-tokenizer distillation: span alignment, teacher tokens marginalised by byte prefix.

A teacher whose tokenizer differs from the student's gets the student's token rows, turns
them back into text, tokenizes that text its own way, and scores it. Its distribution at a
point of the text is comparable with the student's where both predict "the next piece from
byte b": the student at the position whose context ends at byte b, the teacher at the index
whose token ends at byte b. Other positions (inside a teacher token, or predicting one of
the student's special tokens) carry no signal at all.

At those shared boundaries the teacher's top-k is marginalised onto student pieces by byte
prefix: a teacher token goes to the student piece the student starts its bytes with (the
first token of the student's encoding of them: " cats" -> " cat" for a student that writes
" cat" + "s"), and the mass of every teacher token that goes to one student piece is summed
there. So after " the", P(" cats") = .7 and P(" cat") = .05 give the student's " cat" .75,
not .05 with .7 in the tail. Teacher tokens with no such piece (special tokens, bytes no
student piece starts) carry no entry; the mass outside the top-k is the tail, as for any
teacher.

What remains approximate: the marginal is one teacher token deep. The exact target of a
student piece s is the teacher's probability of every continuation, however many teacher
tokens long, that the student would start with s. Here a teacher token longer than s counts
fully toward s, but a teacher token SHORTER than the student's piece in context counts toward
the shorter piece the student starts it with, never toward the longer ones it could begin
(teacher " ca" goes to the student's " ca" or " c", not to " cat" or " cab": splitting it
would need the teacher's distributions one more token ahead). And the student's first
token of a piece is taken from the piece alone, not from the text that follows it.

Unlike sorting probabilities (ULD), this keeps which token each probability belongs to: a
student whose distribution is shifted by one token pays for it.

The text: every student piece as its bytes; a special token (chat markup) as "\\n", so a
teacher without a chat template reads the conversation as plain text with its role names;
a BOS the student's tokenizer adds, and a pad token of its own, as nothing. The teacher
reads markup-looking text as text (its special tokens are never parsed out of it), and gets
its BOS first when its tokenizer adds one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from actors.batch import TokenBatch
from actors.chat import adds_bos
from actors.models import backbone, output_head
from actors.signal import TeacherSignal, id_dtype, topk_signal

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_NO_PAIRS = np.zeros((0, 2), dtype=np.int64)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character per byte (bytes_to_unicode), inverted."""
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


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def piece_bytes(tokenizer: Any) -> list[bytes | None]:
    """Per token id (0..len(tokenizer)-1), the exact bytes the token stands for in text, so
    two tokenizers can be compared on bytes; None for special tokens (BOS, EOS, pad, chat
    markup), which stand for no text."""
    n = len(tokenizer)
    specials = {int(i) for i in tokenizer.all_special_ids}
    added: dict[int, str] = {}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            specials.add(int(i))
        else:  # added tokens match raw text: their content is what they cover
            added[int(i)] = tok.content
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder()
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if i in specials or piece is None:
            out.append(None)
        elif i in added:
            text = added[i] if byte_level else added[i].replace("\u2581", " ")
            out.append(text.encode("utf-8"))
        elif byte_level:
            try:
                out.append(bytes(decoder[c] for c in piece))
            except KeyError:  # not a byte-level piece after all: take it literally
                out.append(piece.encode("utf-8"))
        elif m := _BYTE_PIECE.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def _ordinary_first(tokenizer: Any, pieces: list[bytes | None]) -> list[int]:
    """Ids with a piece, byte-fallback pieces (<0xNN>) last: a byte's probability sits on
    the ordinary piece for it where there is one, so that is the one to match."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(pieces))))
    ids = [i for i, b in enumerate(pieces) if b is not None]
    return sorted(ids, key=lambda i: bool(_BYTE_PIECE.match(names[i] or "")))


def _first_tokens(tokenizer: Any, texts: list[str]) -> list[int | None]:
    """The first token of each text in the tokenizer's own encoding (None: no token),
    markup-looking text read as text."""
    if not texts:
        return []
    try:
        enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # a tokenizer without split_special_tokens
        enc = tokenizer(texts, add_special_tokens=False)
    return [int(ids[0]) if len(ids) else None for ids in enc["input_ids"]]


def _longest_prefix(data: bytes, student: dict[bytes, int], longest: int) -> int:
    """The student id of the longest piece `data` starts with, or -1."""
    for n in range(min(len(data), longest), 0, -1):
        s = student.get(data[:n])
        if s is not None:
            return s
    return -1


def vocab_map(teacher_tok: Any, student_tok: Any) -> np.ndarray:
    """int64 [len(teacher_tok)]: the student id a teacher token's mass goes to, or -1 (a
    special token, or no student piece its bytes start with). It is the FIRST token of the
    student's own encoding of the teacher piece's bytes (" cats" -> " cat" when the student
    writes " cats" as " cat" + "s"): the student starts that text with that piece. Where the
    bytes are not text (a piece cut inside a UTF-8 character) or that first token is not a
    prefix of them (a normaliser or an added prefix space changed the text), the longest
    student piece they start with, ordinary pieces before byte-fallback ones. Many teacher
    ids can map to one student id: `TokenAligner.map_topk` sums their mass."""
    s_pieces = piece_bytes(student_tok)
    student: dict[bytes, int] = {}
    for i in _ordinary_first(student_tok, s_pieces):
        student.setdefault(s_pieces[i], i)  # type: ignore[arg-type]
    longest = max((len(b) for b in student), default=0)
    t_pieces = piece_bytes(teacher_tok)
    out = np.full(len(t_pieces), -1, dtype=np.int64)
    texts: dict[int, str] = {}
    for i, b in enumerate(t_pieces):
        if not b:
            continue
        try:
            texts[i] = b.decode("utf-8")
        except UnicodeDecodeError:
            out[i] = _longest_prefix(b, student, longest)
    firsts = _first_tokens(student_tok, list(texts.values()))
    for i, s in zip(texts, firsts, strict=True):
        piece = s_pieces[s] if s is not None and 0 <= s < len(s_pieces) else None
        prefix = bool(piece) and t_pieces[i].startswith(piece)  # type: ignore[union-attr,arg-type]
        out[i] = s if prefix else _longest_prefix(t_pieces[i], student, longest)  # type: ignore[arg-type]
    return out


@dataclass
class Alignment:
    teacher_ids: list[int]  # the teacher's input row (BOS first when its tokenizer adds one)
    pairs: np.ndarray  # int64 [n, 2]: (index into the row's loss positions, teacher index)


def _utf8_prefix(data: bytes) -> str | None:
    """`data` as text, less an incomplete character at the very end (a truncated row can
    cut one); None when it is broken anywhere else."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return None
        try:
            return data[: exc.start].decode("utf-8")
        except UnicodeDecodeError:
            return None


class TokenAligner:
    """One student/teacher tokenizer pair: renders student rows as the teacher's rows and
    says which teacher index scores which student loss position."""

    def __init__(self, student_tok: Any, teacher_tok: Any, max_len: int) -> None:
        self.teacher_tok = teacher_tok
        self.max_len = max_len
        self.student_bytes = piece_bytes(student_tok)
        self.teacher_bytes = piece_bytes(teacher_tok)
        self.map = vocab_map(teacher_tok, student_tok)
        # A BOS the student's tokenizer adds and a pad of its own stand for no text; a bos or
        # pad that doubles as chat markup (SmolLM2: <|im_start|>, pad = eos) is markup.
        bos, pad, eos = student_tok.bos_token_id, student_tok.pad_token_id, student_tok.eos_token_id
        self.silent = {bos} if bos is not None and adds_bos(student_tok) else set()
        if pad is not None and pad not in (bos, eos):
            self.silent.add(pad)
        self.bos = [teacher_tok.bos_token_id] if adds_bos(teacher_tok) else []
        fallback = next(
            (i for i in (teacher_tok.eos_token_id, teacher_tok.pad_token_id) if i is not None), 0
        )
        self.fallback_row = self.bos or [fallback]

    def render(self, row: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The student row as the text bytes the teacher reads, and each token's end byte
        (its span is [end of the previous token, end))."""
        parts = []
        for t in np.asarray(row).tolist():
            b = self.student_bytes[t] if 0 <= t < len(self.student_bytes) else None
            parts.append(b if b is not None else (b"" if t in self.silent else b"\n"))
        ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
        return b"".join(parts), ends

    def _teacher_tokens(self, text: str) -> list[int]:
        """The text in the teacher's tokens, markup-looking text read as text."""
        try:
            enc = self.teacher_tok(text, add_special_tokens=False, split_special_tokens=True)
        except TypeError:  # a tokenizer without split_special_tokens
            enc = self.teacher_tok(text, add_special_tokens=False)
        return list(enc["input_ids"])

    def _is_special(self, t: int) -> bool:
        return not 0 <= t < len(self.student_bytes) or self.student_bytes[t] is None

    def align(self, student_row: np.ndarray, loss_positions: np.ndarray) -> Alignment:
        """The teacher's row for one student row (real tokens only, no padding) and the
        (loss position index, teacher index) pairs that predict the same event. Never raises
        on odd text: a row that cannot be aligned gets no pairs."""
        row = np.asarray(student_row).tolist()
        data, ends = self.render(np.asarray(row, dtype=np.int64))
        text = _utf8_prefix(data)
        if text is None:
            return Alignment(list(self.fallback_row), _NO_PAIRS.copy())
        ids = (self.bos + self._teacher_tokens(text))[: self.max_len]
        n_bos = min(len(self.bos), len(ids))
        pieces = [b""] * n_bos + [self.teacher_bytes[i] for i in ids[n_bos:]]
        if not ids or any(p is None for p in pieces):
            return Alignment(ids or list(self.fallback_row), _NO_PAIRS.copy())
        t_ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)  # type: ignore[arg-type]
        if b"".join(pieces) != data[: int(t_ends[-1])]:  # type: ignore[arg-type]
            return Alignment(ids, _NO_PAIRS.copy())  # a normaliser changed the text
        # Teacher index j predicts the token that starts where token j ends (BOS ends at 0).
        # Of several indices ending at one byte (empty pieces), the last comes right before.
        index_of_end = {int(e): j for j, e in enumerate(t_ends.tolist())}
        pairs = []
        for k, p in enumerate(np.asarray(loss_positions, dtype=np.int64).tolist()):
            if p + 1 >= len(row) or self._is_special(row[p + 1]):
                continue  # the student predicts nothing here, or markup the teacher never sees
            j = index_of_end.get(int(ends[p]))
            if j is not None:
                pairs.append((k, j))
        return Alignment(ids, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))

    def map_topk(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher top-k [n, k] -> (student ids int64, log-probs float32) [n, k]. Each
        student id carries the summed mass of the row's teacher ids that map to it (in the
        entry of the first of them); the other entries, and ids that map nowhere, become
        empty (-inf) entries repeating the row's first finite id, so finite ids are distinct
        and the student's tail still excludes exactly the row's ids. A row with nothing
        mapped is all empty (ids 0)."""
        ids = np.asarray(ids).astype(np.int64)
        n, k = ids.shape
        inside = (ids >= 0) & (ids < len(self.map))  # a model's padded vocab rows map nowhere
        mapped = np.where(inside, self.map[np.where(inside, ids, 0)], -1)
        lp = np.asarray(logprobs, dtype=np.float64)
        valid = (mapped >= 0) & np.isfinite(lp)
        key = np.where(valid, np.arange(n)[:, None] * (int(mapped.max(initial=0)) + 1) + mapped, -1)
        at = np.flatnonzero(key.ravel() >= 0)
        _, first, group = np.unique(key.ravel()[at], return_index=True, return_inverse=True)
        mass = np.bincount(group.ravel(), weights=np.exp(lp.ravel()[at]), minlength=len(first))
        out_lp = np.full(n * k, -np.inf, dtype=np.float32)
        with np.errstate(divide="ignore"):  # a mass that underflowed to 0 carries nothing
            out_lp[at[first]] = np.log(np.minimum(mass, 1.0))  # float16 sums can pass 1
        out_lp = out_lp.reshape(n, k)
        kept = np.isfinite(out_lp)
        row_first = np.where(kept.any(1), mapped[np.arange(n), kept.argmax(1)], 0)
        return np.where(kept, mapped, row_first[:, None]).astype(np.int64), out_lp


@torch.inference_mode()
def aligned_signal(
    aligner: TokenAligner,
    model: Any,
    batch: TokenBatch,
    *,
    top_k: int,
    temperature: float,
    teacher: str,
    vocab_size: int,
    signal_vocab: int,
    chunk: int,
) -> TeacherSignal:
    """A cross-tokenizer teacher's signal, in the teacher actor (it needs the teacher's
    tokenizer and runs ahead of the students): the teacher reads its own tokenization of
    each row; at every student loss position whose context ends where one of its tokens
    ends, its top-k is mapped onto the student's pieces; other positions carry no entry.
    What crosses the object store is an ordinary signal in the student's vocab
    (`signal_vocab`; `vocab_size` is the teacher's)."""
    device = next(model.parameters()).device
    offsets = batch.row_offsets()
    n_pos, k = int(offsets[-1]), top_k
    out_ids = np.zeros((n_pos, k), dtype=np.int64)
    out_lp = np.full((n_pos, k), -np.inf, dtype=np.float32)
    rows, where = [], []
    for r in range(len(batch)):
        length = int(batch.attention_mask[r].sum())
        loss_pos = np.flatnonzero(batch.loss_mask[r][:length])
        al = aligner.align(batch.input_ids[r, :length], loss_pos)
        rows.append(al.teacher_ids)
        where.extend((r, int(offsets[r]) + int(i), int(j)) for i, j in al.pairs)
    if where:
        pad = aligner.teacher_tok.pad_token_id or 0
        width = max(len(t) for t in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, t in enumerate(rows):
            ids[r, : len(t)] = torch.tensor(t)
            attn[r, : len(t)] = 1
        hidden = backbone(model)(
            input_ids=ids.to(device), attention_mask=attn.to(device)
        ).last_hidden_state
        at = torch.tensor([(r, j) for r, _, j in where], device=device)
        signal = topk_signal(
            hidden[at[:, 0], at[:, 1]],
            output_head(model),
            k=k,
            temperature=temperature,
            teacher=teacher,
            vocab_size=vocab_size,
            chunk=chunk,
        )
        mapped_ids, mapped_lp = aligner.map_topk(signal.ids, signal.logprobs)
        pos = np.array([p for _, p, _ in where], dtype=np.int64)
        out_ids[pos], out_lp[pos] = mapped_ids, mapped_lp
    return TeacherSignal(
        teacher=teacher,
        ids=out_ids.astype(id_dtype(signal_vocab)),
        logprobs=out_lp.astype(np.float16),
        temperature=temperature,
    )
