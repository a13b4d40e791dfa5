"""Cross-tokenizer alignment: a teacher with its own tokenizer is paired with the student only
where both predict the next piece from the same byte, and its top-k lands on student ids
that stand for exactly the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_tokenizers import build_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors
from transformers import PreTrainedTokenizerFast

from actors.losses import per_position_divergence
from actors.xtok import TokenAligner, piece_bytes, vocab_map

SP_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SP_MERGES = [("t", "h"), ("th", "e"), ("\u2581", "c"), ("\u2581c", "a"), ("\u2581", "a")]


def sp_tokenizer(*, bos: bool = True, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """Gemma-like: spaces as "▁", byte fallback (<0xNN>) for everything but lowercase letters,
    merges that split "the cat" as ["the", "▁ca", "t"]; adds <s> unless told not to."""
    pieces = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    pieces += list("abcdefghijklmnopqrstuvwxyz\u2581") + ["".join(m) for m in SP_MERGES]
    vocab = {p: i for i, p in enumerate(pieces)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=SP_MERGES, unk_token="<unk>", byte_fallback=True))
    replace = normalizers.Replace(" ", "\u2581")
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase(), replace]) if lowercase else replace
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SP_SPECIALS])
    if bos:
        tk.post_processor = tk_processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2/SmolLM2-like byte-level BPE: "Ġa" is " a", "Ã©" is "é"."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [("\u0120", "a"), ("\u00c3", "\u00a9"), ("t", "h")]
    pieces = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in merges]
    vocab = {p: i for i, p in enumerate(pieces)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )


def ids(tok, tokens: list[str]) -> np.ndarray:
    out = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in out or "<unk>" in tokens
    return np.asarray(out, dtype=np.int64)


def pairs(alignment) -> list[tuple[int, int]]:
    return [tuple(p) for p in alignment.pairs.tolist()]


def teacher_text(tok, teacher_ids: list[int]) -> bytes:
    pieces = piece_bytes(tok)
    return b"".join(pieces[t] or b"" for t in teacher_ids)


def test_piece_bytes_char_level_and_specials():
    tok = build_tokenizer("smollm")
    pieces = piece_bytes(tok)
    assert len(pieces) == len(tok)
    for special in ("<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<end_of_turn>"):
        assert pieces[tok.convert_tokens_to_ids(special)] is None
    assert pieces[tok.convert_tokens_to_ids("a")] == b"a"
    assert pieces[tok.convert_tokens_to_ids(" ")] == b" "
    assert pieces[tok.convert_tokens_to_ids("\n")] == b"\n"


def test_piece_bytes_byte_level_inverts_gpt2_table():
    tok = byte_level_tokenizer()
    pieces = piece_bytes(tok)
    assert pieces[tok.convert_tokens_to_ids("\u0120a")] == b" a"
    assert pieces[tok.convert_tokens_to_ids("\u00c3\u00a9")] == "é".encode()
    assert pieces[tok.convert_tokens_to_ids("\u010a")] == b"\n"
    assert pieces[tok.convert_tokens_to_ids("<|im_start|>")] is None
    text = "thé cat\n\ta 🙂 ~"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(pieces[t] for t in encoded) == text.encode()  # the tokenizer agrees


def test_piece_bytes_sentencepiece_style():
    tok = sp_tokenizer()
    pieces = piece_bytes(tok)
    assert pieces[tok.convert_tokens_to_ids("<0x41>")] == b"A"
    assert pieces[tok.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    assert pieces[tok.convert_tokens_to_ids("\u2581ca")] == b" ca"
    assert all(pieces[tok.convert_tokens_to_ids(s)] is None for s in SP_SPECIALS)
    text = "The cat é!\n"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(pieces[t] for t in encoded) == text.encode()


def test_vocab_map_is_injective_and_maps_equal_pieces_only():
    teacher, student = sp_tokenizer(), build_tokenizer("smollm")
    m = vocab_map(teacher, student)
    assert m.dtype == np.int64 and m.shape == (len(teacher),)
    t_pieces, s_pieces = piece_bytes(teacher), piece_bytes(student)
    mapped = np.flatnonzero(m >= 0)
    assert len(set(m[mapped].tolist())) == len(mapped)  # injective
    assert all(t_pieces[t] == s_pieces[m[t]] is not None for t in mapped)

    def target(t: str) -> int:
        return int(m[teacher.convert_tokens_to_ids(t)])

    assert target("a") == student.convert_tokens_to_ids("a")
    assert target("\u2581") == student.convert_tokens_to_ids(" ")
    assert target("<0x41>") == student.convert_tokens_to_ids("A")  # no ordinary "A" piece
    assert target("<0x61>") == -1  # the ordinary "a" piece took it
    assert target("the") == -1 and target("<s>") == -1 and target("<0xC3>") == -1
    # every non-special student piece is covered, by an ordinary piece where there is one
    assert set(m[mapped].tolist()) == {i for i, b in enumerate(s_pieces) if b is not None}


def test_vocab_map_prefers_ordinary_student_pieces():
    m = vocab_map(build_tokenizer("smollm"), sp_tokenizer())
    student, teacher = sp_tokenizer(), build_tokenizer("smollm")
    assert m[teacher.convert_tokens_to_ids("a")] == student.convert_tokens_to_ids("a")
    assert m[teacher.convert_tokens_to_ids("A")] == student.convert_tokens_to_ids("<0x41>")
    assert m[teacher.convert_tokens_to_ids("<|im_end|>")] == -1


def test_align_pairs_exactly_at_shared_boundaries_and_bos():
    student, teacher = build_tokenizer("gemma"), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=64)
    row = ids(student, ["<bos>", *"the cat"])  # 8 student tokens, bos silent
    a = aligner.align(row, np.arange(len(row)))
    assert teacher.convert_ids_to_tokens(a.teacher_ids) == ["<s>", "the", "\u2581ca", "t"]
    # contexts "", "the", "the ca" end where teacher tokens end; the last position predicts
    # nothing
    assert pairs(a) == [(0, 0), (3, 1), (6, 2)]
    assert a.pairs.dtype == np.int64
    a = aligner.align(row, np.array([2, 3, 4, 6, 7]))  # indices into the loss positions
    assert pairs(a) == [(1, 1), (3, 2)]


def test_align_without_teacher_bos_leaves_empty_context_unpaired():
    student, teacher = build_tokenizer("gemma"), sp_tokenizer(bos=False)
    a = TokenAligner(student, teacher, max_len=64).align(
        ids(student, ["<bos>", *"the cat"]), np.arange(8)
    )
    assert teacher.convert_ids_to_tokens(a.teacher_ids) == ["the", "\u2581ca", "t"]
    assert pairs(a) == [(3, 0), (6, 1)]


def test_align_specials_read_as_newlines_and_predicting_them_is_unpaired():
    student, teacher = build_tokenizer("smollm"), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=64)
    text = student.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False)
    row = np.asarray(student(text, add_special_tokens=False)["input_ids"])
    assert student.convert_ids_to_tokens(row.tolist()) == [
        "<|im_start|>", *"user\nthe cat", "<|im_end|>", "\n"
    ]  # fmt: skip
    data, ends = aligner.render(row)
    assert data == b"\nuser\nthe cat\n\n"
    assert ends.tolist() == list(range(1, 16))
    a = aligner.align(row, np.arange(len(row)))
    assert teacher_text(teacher, a.teacher_ids) == data  # the teacher reads exactly that
    assert a.teacher_ids[0] == teacher.bos_token_id
    # teacher: <s> \n u s e r \n the ▁ca t \n \n  (ends 0 1 2 3 4 5 6 9 12 13 14 15)
    assert pairs(a) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (8, 7), (11, 8), (13, 10)]
    special = {student.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert all(row[p + 1] not in special for p in a.pairs[:, 0])
    assert 12 not in a.pairs[:, 0]  # the last "t" predicts <|im_end|>


def test_align_teacher_reads_markup_looking_text_as_text():
    student, teacher = byte_level_tokenizer(), sp_tokenizer()
    row = np.asarray(student("a<s>b", add_special_tokens=False)["input_ids"])
    a = TokenAligner(student, teacher, max_len=64).align(row, np.arange(len(row)))
    assert teacher.bos_token_id not in a.teacher_ids[1:]
    assert teacher_text(teacher, a.teacher_ids) == b"a<s>b"
    assert len(a.pairs) > 0


def test_align_multibyte_characters_pair_only_at_whole_characters():
    student, teacher = byte_level_tokenizer(), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=64)
    row = np.asarray(student("thé cat", add_special_tokens=False)["input_ids"])
    assert student.convert_ids_to_tokens(row.tolist()) == [
        "th", "\u00c3\u00a9", "\u0120", "c", "a", "t"
    ]  # fmt: skip
    a = aligner.align(row, np.arange(len(row)))
    assert teacher.convert_ids_to_tokens(a.teacher_ids) == [
        "<s>", "th", "<0xC3>", "<0xA9>", "\u2581ca", "t"
    ]  # fmt: skip
    assert pairs(a) == [(0, 1), (1, 3), (4, 4)]  # never the index inside "é"


def test_align_truncated_character_and_broken_text_never_raise():
    student, teacher = byte_level_tokenizer(), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=64)
    cut = ids(student, ["th", "\u00c3"])  # the row was cut inside "é"
    a = aligner.align(cut, np.arange(2))
    assert teacher.convert_ids_to_tokens(a.teacher_ids) == ["<s>", "th"]
    assert pairs(a) == [(0, 1)]
    broken = ids(student, ["\u00c3", "a", "t"])  # invalid UTF-8 inside the row
    a = aligner.align(broken, np.arange(3))
    assert a.teacher_ids == [teacher.bos_token_id] and a.pairs.shape == (0, 2)
    a = aligner.align(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert a.teacher_ids == [teacher.bos_token_id] and a.pairs.shape == (0, 2)


def test_align_normaliser_that_changes_text_gives_no_pairs():
    student, teacher = build_tokenizer("smollm"), sp_tokenizer(lowercase=True)
    aligner = TokenAligner(student, teacher, max_len=64)
    assert aligner.align(ids(student, list("The cat")), np.arange(7)).pairs.shape == (0, 2)
    assert len(aligner.align(ids(student, list("the cat")), np.arange(7)).pairs) == 2


def test_align_truncates_the_teacher_row():
    student, teacher = build_tokenizer("gemma"), sp_tokenizer()
    a = TokenAligner(student, teacher, max_len=2).align(
        ids(student, ["<bos>", *"the cat"]), np.arange(8)
    )
    assert len(a.teacher_ids) == 2
    assert pairs(a) == [(0, 0), (3, 1)]


def test_silent_tokens_depend_on_what_the_student_adds():
    # gemma-like adds <bos>: nothing; SmolLM2-like names <|im_start|> bos but it is markup
    gemma = TokenAligner(build_tokenizer("gemma"), sp_tokenizer(), max_len=8)
    assert gemma.render(ids(build_tokenizer("gemma"), ["<bos>", "<pad>", "a"]))[0] == b"a"
    smol = byte_level_tokenizer()
    aligner = TokenAligner(smol, sp_tokenizer(), max_len=8)
    row = ids(smol, ["<|im_start|>", "a", "<|im_end|>"])
    assert aligner.render(row)[0] == b"\na\n"


def test_map_topk_empty_entries_repeat_a_valid_id():
    student, teacher = build_tokenizer("smollm"), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=8)
    t = teacher.convert_tokens_to_ids
    s = student.convert_tokens_to_ids
    top = np.array(
        [
            [t("the"), t("a"), t("<0xC3>"), t("\u2581")],  # unmapped first
            [t("<s>"), t("the"), t("\u2581ca"), t("<0xC3>")],  # nothing maps
            [t("b"), t("<0x41>"), len(teacher) + 5, t("c")],  # an id past the tokenizer
        ],
        dtype=np.uint16,
    )
    lp = np.log(np.full(top.shape, 0.2)).astype(np.float16)
    out_ids, out_lp = aligner.map_topk(top, lp)
    assert out_ids.dtype == np.int64 and out_lp.dtype == np.float32
    assert out_ids.tolist() == [
        [s("a"), s("a"), s("a"), s(" ")],
        [0, 0, 0, 0],
        [s("b"), s("A"), s("b"), s("c")],
    ]
    finite = np.isfinite(out_lp)
    assert finite.tolist() == [
        [False, True, False, True],
        [False] * 4,
        [True, True, False, True],
    ]
    np.testing.assert_allclose(out_lp[finite], np.float32(lp[0, 0]))
    for r in range(3):  # finite ids distinct; every -inf id repeats a finite one in its row
        valid = set(out_ids[r][finite[r]].tolist())
        assert len(valid) == finite[r].sum()
        if valid:
            assert set(out_ids[r].tolist()) == valid


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 5e-3)])
def test_teacher_equal_through_the_map_gives_zero_kl(dtype, tol):
    """A teacher whose next-token distribution at each aligned index equals the student's at
    the paired position, through vocab_map, is at KL ~0 on the mapped full-vocab top-k."""
    student, teacher = build_tokenizer("smollm"), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=64)
    text = student.apply_chat_template(
        [{"role": "user", "content": "The cat sat."}, {"role": "assistant", "content": "the A!"}],
        tokenize=False,
    )
    row = np.asarray(student(text, add_special_tokens=False)["input_ids"])
    loss_positions = np.arange(3, len(row) - 1)
    a = aligner.align(row, loss_positions)
    assert len(a.pairs) >= 8
    gen = torch.Generator().manual_seed(0)
    student_logits = torch.randn(len(row), len(student), generator=gen) * 3
    q = torch.softmax(student_logits, -1)
    # the "teacher model": at aligned indices the student's distribution through the map, the
    # student's mass on unmapped ids spread over unmapped teacher ids; elsewhere random
    m = torch.from_numpy(aligner.map)
    mapped, unmapped = m >= 0, m < 0
    teacher_p = torch.softmax(torch.randn(len(a.teacher_ids), len(teacher), generator=gen), -1)
    for k, j in a.pairs.tolist():
        qs = q[loss_positions[k]]
        p = torch.zeros(len(teacher))
        p[mapped] = qs[m[mapped]]
        p[unmapped] = (1 - p.sum()) / unmapped.sum()
        teacher_p[j] = p
    lp, top = torch.topk(teacher_p.log(), len(teacher), dim=-1)  # k = the whole teacher vocab
    sel = a.pairs[:, 1]
    s_ids, s_lp = aligner.map_topk(top[sel].numpy(), lp[sel].numpy().astype(dtype))
    rows = torch.as_tensor(loss_positions[a.pairs[:, 0]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        d = per_position_divergence(
            student_logits[rows], torch.from_numpy(s_ids), torch.from_numpy(s_lp), kind=kind
        )
        assert d.abs().max().item() < tol, kind
    # not vacuous: the student one position off is far from the teacher
    off = per_position_divergence(
        student_logits[rows + 1], torch.from_numpy(s_ids), torch.from_numpy(s_lp), kind="forward_kl"
    )
    assert off.min().item() > 0.1
