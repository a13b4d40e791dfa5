"""Cross-tokenizer alignment: a teacher with its own tokenizer is paired with the student only
where both predict the next piece from the same byte, and its top-k lands on the student
pieces its tokens start with (several teacher tokens' mass summed on one student id). End to
end on two tokenizers that split the same text differently (the student's char-level,
SmolLM-like; the teacher's merging "th", "the", " c", "at" and adding a BOS): the loss on the
teacher actor's signal is zero for a student that agrees with the teacher on the text,
positive for one shifted by one token, and its gradient reaches the student."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
from chat_tokenizers import build_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from actors.batch import TokenBatch
from actors.losses import per_position_divergence
from actors.models import backbone, output_head, save_tiny_llama
from actors.objective import LossSpec, SparseTarget, objective_sums
from actors.teacher import TeacherActor
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
    tk.normalizer = (
        normalizers.Sequence([normalizers.Lowercase(), replace]) if lowercase else replace
    )
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
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


def row_of(tok, tokens: list[str]) -> np.ndarray:
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


def test_vocab_map_sends_each_teacher_piece_to_the_student_piece_it_starts_with():
    teacher, student = sp_tokenizer(), build_tokenizer("smollm")
    m = vocab_map(teacher, student)
    assert m.dtype == np.int64 and m.shape == (len(teacher),)
    t_pieces, s_pieces = piece_bytes(teacher), piece_bytes(student)
    mapped = np.flatnonzero(m >= 0)
    assert all(s_pieces[m[t]] and t_pieces[t].startswith(s_pieces[m[t]]) for t in mapped)

    def target(t: str) -> int:
        return int(m[teacher.convert_tokens_to_ids(t)])

    assert target("a") == student.convert_tokens_to_ids("a")
    assert target("\u2581") == student.convert_tokens_to_ids(" ")
    assert target("<0x41>") == student.convert_tokens_to_ids("A")  # no ordinary "A" piece
    # byte prefix: "the" starts with the student's "t", " ca" with " "; the byte piece for
    # "a" stands for the same text as "a" (both were -1 when only equal bytes mapped)
    assert target("the") == target("th") == student.convert_tokens_to_ids("t")
    assert target("\u2581ca") == student.convert_tokens_to_ids(" ")
    assert target("<0x61>") == target("a")
    assert target("<s>") == -1 and target("<0xC3>") == -1  # markup; no piece starts with it
    # every non-special student piece is reached
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
    row = row_of(student, ["<bos>", *"the cat"])  # 8 student tokens, bos silent
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
        row_of(student, ["<bos>", *"the cat"]), np.arange(8)
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
    cut = row_of(student, ["th", "\u00c3"])  # the row was cut inside "é"
    a = aligner.align(cut, np.arange(2))
    assert teacher.convert_ids_to_tokens(a.teacher_ids) == ["<s>", "th"]
    assert pairs(a) == [(0, 1)]
    broken = row_of(student, ["\u00c3", "a", "t"])  # invalid UTF-8 inside the row
    a = aligner.align(broken, np.arange(3))
    assert a.teacher_ids == [teacher.bos_token_id] and a.pairs.shape == (0, 2)
    a = aligner.align(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert a.teacher_ids == [teacher.bos_token_id] and a.pairs.shape == (0, 2)


def test_align_normaliser_that_changes_text_gives_no_pairs():
    student, teacher = build_tokenizer("smollm"), sp_tokenizer(lowercase=True)
    aligner = TokenAligner(student, teacher, max_len=64)
    assert aligner.align(row_of(student, list("The cat")), np.arange(7)).pairs.shape == (0, 2)
    assert len(aligner.align(row_of(student, list("the cat")), np.arange(7)).pairs) == 2


def test_align_truncates_the_teacher_row():
    student, teacher = build_tokenizer("gemma"), sp_tokenizer()
    a = TokenAligner(student, teacher, max_len=2).align(
        row_of(student, ["<bos>", *"the cat"]), np.arange(8)
    )
    assert len(a.teacher_ids) == 2
    assert pairs(a) == [(0, 0), (3, 1)]


def test_silent_tokens_depend_on_what_the_student_adds():
    # gemma-like adds <bos>: nothing; SmolLM2-like names <|im_start|> bos but it is markup
    gemma = TokenAligner(build_tokenizer("gemma"), sp_tokenizer(), max_len=8)
    assert gemma.render(row_of(build_tokenizer("gemma"), ["<bos>", "<pad>", "a"]))[0] == b"a"
    smol = byte_level_tokenizer()
    aligner = TokenAligner(smol, sp_tokenizer(), max_len=8)
    row = row_of(smol, ["<|im_start|>", "a", "<|im_end|>"])
    assert aligner.render(row)[0] == b"\na\n"


def test_map_topk_sums_per_student_id_and_empty_entries_repeat_a_valid_id():
    student, teacher = build_tokenizer("smollm"), sp_tokenizer()
    aligner = TokenAligner(student, teacher, max_len=8)
    t = teacher.convert_tokens_to_ids
    s = student.convert_tokens_to_ids
    top = np.array(
        [
            [t("<0xC3>"), t("a"), t("the"), t("\u2581")],  # unmapped first
            [t("<s>"), t("<0xC3>"), t("</s>"), t("<pad>")],  # nothing maps
            [t("b"), t("<0x41>"), len(teacher) + 5, t("c")],  # an id past the tokenizer
            [t("a"), t("<0x61>"), t("the"), t("th")],  # two pairs of ids, one piece each
        ],
        dtype=np.uint16,
    )
    lp = np.log(np.full(top.shape, 0.2)).astype(np.float16)
    out_ids, out_lp = aligner.map_topk(top, lp)
    assert out_ids.dtype == np.int64 and out_lp.dtype == np.float32
    assert out_ids.tolist() == [
        [s("a"), s("a"), s("t"), s(" ")],
        [0, 0, 0, 0],
        [s("b"), s("A"), s("b"), s("c")],
        [s("a"), s("a"), s("t"), s("a")],
    ]
    finite = np.isfinite(out_lp)
    assert finite.tolist() == [
        [False, True, True, True],
        [False] * 4,
        [True, True, False, True],
        [True, False, True, False],
    ]
    np.testing.assert_allclose(out_lp[:3][finite[:3]], np.float32(lp[0, 0]))
    np.testing.assert_allclose(out_lp[3][finite[3]], np.log(2 * np.exp(np.float32(lp[0, 0]))))
    for r in range(len(top)):  # finite ids distinct; every -inf id repeats a finite one
        valid = set(out_ids[r][finite[r]].tolist())
        assert len(valid) == finite[r].sum()
        if valid:
            assert set(out_ids[r].tolist()) == valid


def _bpe(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Letters and space, plus the pieces the merges make."""
    specials = ["<pad>", "<unk>"]
    pieces = specials + list(string.ascii_lowercase + " ") + ["".join(m) for m in merges]
    vocab = {p: i for i, p in enumerate(pieces)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


THE_CAT = [(" ", "t"), (" t", "h"), (" th", "e"), (" ", "c"), (" c", "a"), (" ca", "t")]


def test_a_teacher_token_counts_toward_the_student_piece_it_starts_with():
    """After " the", a teacher with P(" cats") = .7 and P(" cat") = .05 (the student has no
    " cats" piece: it writes " cat" + "s") gives the student's " cat" .75, where matching
    equal bytes only gave .05 and put .7 in the tail; the student that is right to put .75
    on " cat" is at the minimum of the loss, the one at .05 is not."""
    student, teacher = _bpe(THE_CAT), _bpe([*THE_CAT, (" cat", "s"), (" ", "d")])
    aligner = TokenAligner(student, teacher, max_len=16)
    row = np.asarray(student(" the cats", add_special_tokens=False)["input_ids"])
    assert student.convert_ids_to_tokens(row.tolist()) == [" the", " cat", "s"]
    al = aligner.align(row, np.arange(len(row)))
    assert teacher.convert_ids_to_tokens(al.teacher_ids) == [" the", " cats"]
    assert pairs(al) == [(0, 0)]  # after " the" both predict the next piece
    t, s = teacher.convert_tokens_to_ids, student.convert_tokens_to_ids
    top = np.array([[t(" cats"), t(" cat"), t(" d"), t("s")]])
    lp = np.log(np.array([[0.7, 0.05, 0.06, 0.04]])).astype(np.float16)
    ids, out = aligner.map_topk(top, lp)
    finite = np.isfinite(out[0])
    target = dict(zip(ids[0][finite].tolist(), np.exp(out[0][finite]).tolist(), strict=True))
    assert target[s(" cat")] >= 0.75 - 1e-3
    assert target == pytest.approx({s(" cat"): 0.75, s(" "): 0.06, s("s"): 0.04}, abs=1e-3)
    right = torch.full((1, len(student)), 0.15 / (len(student) - 3)).log()
    right[0, [s(" cat"), s(" "), s("s")]] = torch.tensor([0.75, 0.06, 0.04]).log()
    wrong = right.clone()
    wrong[0, s(" cat")], wrong[0, s("a")] = math.log(0.05), math.log(0.7)
    ids_t, lp_t = torch.from_numpy(ids), torch.from_numpy(out)
    at_right = per_position_divergence(right, ids_t, lp_t, kind="forward_kl")
    at_wrong = per_position_divergence(wrong, ids_t, lp_t, kind="forward_kl")
    assert float(at_right) < 1e-3 < 0.5 < float(at_wrong)


# Two tokenizers that split the same text differently, and the teacher actor end to end.

TEXT = "the cat sat on the mat, then the cat ate."
MERGES = [("t", "h"), ("th", "e"), (" ", "c"), ("a", "t")]


def merging_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>"]
    chars = list(string.ascii_letters + string.digits + " \n.,?!'")
    vocab = {t: i for i, t in enumerate(specials + ["th", "the", " c", "at"] + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.post_processor = tk_processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    """A student folder (tokenizer only is needed) and a sharp tiny teacher with the
    merging tokenizer (sharp: a scaled head, so positions differ clearly)."""
    root = tmp_path_factory.mktemp("xtok")
    student = root / "student"
    save_tiny_llama(str(student), seed=2, hidden=32, layers=1)
    build_tokenizer("smollm").save_pretrained(student)
    teacher_tok = merging_tokenizer()
    teacher = root / "teacher"
    save_tiny_llama(str(teacher), seed=5, hidden=32, layers=1, vocab_size=len(teacher_tok))
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(teacher)
    teacher_tok.save_pretrained(teacher)
    return {"student": str(student), "teacher": str(teacher)}


def test_piece_bytes_and_vocab_map():
    student, teacher = build_tokenizer("smollm"), merging_tokenizer()
    pieces = piece_bytes(teacher)
    assert pieces[teacher.convert_tokens_to_ids("the")] == b"the"
    assert pieces[teacher.bos_token_id] is None  # specials stand for no text
    m = vocab_map(teacher, student)
    t_id, s_id = teacher.convert_tokens_to_ids, student.convert_tokens_to_ids
    assert m[t_id("a")] == s_id("a")
    # the student has no "the" piece: "th", "the" and "t" all count toward its "t"
    assert m[t_id("the")] == m[t_id("th")] == m[t_id("t")] == s_id("t")
    assert m[t_id(" c")] == s_id(" ")


def test_byte_level_and_byte_fallback_pieces():
    bpe = Tokenizer(models.BPE(vocab={"Ġa": 0, "a": 1, "Ġ": 2}, merges=[("Ġ", "a")]))
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert piece_bytes(tok)[:3] == [b" a", b"a", b" "]
    sp = Tokenizer(models.BPE(vocab={"<0x41>": 0, "A": 1, "\u2581b": 2}, merges=[]))
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert piece_bytes(sp_tok) == [b"A", b"A", b" b"]
    # the byte piece <0x41> and the ordinary "A" both stand for "A": both count toward it
    student = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab={"A": 0}, merges=[]))
    )
    assert vocab_map(sp_tok, student).tolist() == [0, 0, -1]


def test_alignment_pairs_only_shared_boundaries():
    student, teacher = build_tokenizer("smollm"), merging_tokenizer()
    row = np.array(student(TEXT)["input_ids"])  # one id per char
    aligner = TokenAligner(student, teacher, max_len=512)
    al = aligner.align(row, np.arange(len(row) - 1))
    assert al.teacher_ids[0] == teacher.bos_token_id
    assert teacher.decode(al.teacher_ids[1:]) == TEXT
    assert len(al.teacher_ids) - 1 < len(row)  # the teacher's split is shorter
    # student position p has read TEXT[:p+1]; the teacher index that has read the same
    t_ends = np.cumsum([0] + [len(teacher.decode([i])) for i in al.teacher_ids[1:]])
    for k, j in al.pairs:
        assert t_ends[j] == k + 1
    # inside "the" (after "t", "th") there is no teacher boundary: no pair
    assert 0 not in al.pairs[:, 0] and 1 not in al.pairs[:, 0]
    assert 2 in al.pairs[:, 0]  # after "the"


def test_specials_become_newlines_and_predicting_one_has_no_pair():
    student, teacher = build_tokenizer("smollm"), merging_tokenizer()
    ids = student("hi")["input_ids"] + [student.convert_tokens_to_ids("<|im_end|>")]
    ids += student("\nok")["input_ids"]
    row = np.array(ids)
    al = TokenAligner(student, teacher, 512).align(row, np.arange(len(row) - 1))
    assert teacher.decode(al.teacher_ids[1:]) == "hi\n\nok"
    assert 1 not in al.pairs[:, 0]  # position 1 predicts <|im_end|>
    assert 2 in al.pairs[:, 0]  # the positions after it align again


def test_map_topk_keeps_the_empty_entry_invariant():
    student, teacher = build_tokenizer("smollm"), merging_tokenizer()
    aligner = TokenAligner(student, teacher, 512)
    the, th, a = (teacher.convert_tokens_to_ids(x) for x in ("the", "th", "a"))
    specials = [teacher.convert_tokens_to_ids(x) for x in ("<bos>", "<eos>", "<pad>")]
    ids = np.array([[the, th, a], specials])
    lp = np.log(np.array([[0.5, 0.3, 0.1], [0.9, 0.05, 0.05]]))
    sids, slp = aligner.map_topk(ids, lp)
    st, sa = student.convert_tokens_to_ids("t"), student.convert_tokens_to_ids("a")
    assert sids[0].tolist() == [st, st, sa] and np.isneginf(slp[0, 1])
    np.testing.assert_allclose(slp[0, [0, 2]], np.log([0.8, 0.1]), rtol=1e-6)
    assert np.isneginf(slp[1]).all()  # nothing maps: the row carries no signal


def _signal_and_batch(pair: dict[str, str]):
    student = build_tokenizer("smollm")
    row = np.array(student(TEXT)["input_ids"], dtype=np.int32)[None]
    mask = np.ones_like(row, dtype=bool)
    mask[:, -1] = False
    batch = TokenBatch(row, np.ones_like(row, dtype=np.int8), mask)
    teacher = TeacherActor(
        "t",
        pair["teacher"],
        top_k=len(merging_tokenizer()),
        temperature=1.0,
        student_tokenizer=pair["student"],
    )
    return teacher.score(batch), batch


def _agreeing_logits(ids: torch.Tensor, lp: torch.Tensor, vocab: int) -> torch.Tensor:
    """Student logits equal to the mapped teacher distribution, its tail spread elsewhere."""
    out = torch.zeros(ids.shape[0], vocab, dtype=torch.float64)
    for p in range(ids.shape[0]):
        valid = torch.isfinite(lp[p])
        out[p, ids[p][valid]] = lp[p][valid].double().exp()
        rest = out[p] == 0
        out[p, rest] = (1 - out[p].sum()).clamp(min=1e-12) / rest.sum()
    return out.log().float()


def test_aligned_loss_is_zero_when_the_models_agree_and_positive_when_shifted(pair):
    signal, batch = _signal_and_batch(pair)
    assert signal.ids.dtype == np.uint16 and signal.ids.max() < 96  # the student's vocab
    ids, lp = signal.torch_targets()
    covered = torch.isfinite(lp).any(-1)
    assert 0 < int(covered.sum()) < len(covered)  # some positions align, not all
    ids, lp = ids[covered], lp[covered]
    spec = LossSpec(kind="forward_kl", temperature=1.0, alpha=0.0)
    labels = torch.zeros(len(ids), dtype=torch.long)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        target = SparseTarget("t", ids, lp, 1.0)
        return objective_sums(logits, lambda x: x, labels, [target], spec, chunk=8)[0]

    agree = _agreeing_logits(ids, lp, 96)
    assert abs(float(loss(agree))) < 1e-3 * len(ids)
    shifted = torch.roll(agree, shifts=1, dims=0)  # each position gets its neighbour's
    assert float(loss(shifted)) > 0.5 * len(ids)
    # a sorted-probability method would see no difference: the shifted rows are the same
    # distributions, only attached to other tokens
    assert math.isclose(
        float(agree.exp().sort(-1).values.sum()), float(shifted.exp().sort(-1).values.sum())
    )


def test_gradient_reaches_the_student(pair):
    signal, batch = _signal_and_batch(pair)
    model = AutoModelForCausalLM.from_pretrained(pair["student"])
    ids, attn, mask = batch.to_torch(torch.device("cpu"))
    features = backbone(model)(input_ids=ids, attention_mask=attn).last_hidden_state[mask]
    labels = torch.roll(ids, shifts=-1, dims=1)[mask]
    t_ids, t_lp = signal.torch_targets()
    spec = LossSpec(kind="forward_kl", temperature=1.0, alpha=0.0)
    total, terms = objective_sums(
        features,
        output_head(model),
        labels,
        [SparseTarget("t", t_ids, t_lp, 1.0)],
        spec,
        chunk=8,
    )
    total.backward()
    assert float(total.detach()) > 0 and float(terms["cover/t"]) < len(labels)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 5e-3)])
def test_teacher_equal_through_the_map_gives_zero_kl(dtype, tol):
    """A teacher whose next-token distribution at each aligned index, summed per student id
    through vocab_map, equals the student's at the paired position is at KL ~0 on the mapped
    full-vocab top-k."""
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
    # the "teacher model": at aligned indices the student's distribution through the map
    # (a student id's mass split evenly over the teacher ids that map to it), the student's
    # mass on ids nothing maps to spread over unmapped teacher ids; elsewhere random
    m = torch.from_numpy(aligner.map)
    mapped, unmapped = m >= 0, m < 0
    shared = torch.bincount(m[mapped], minlength=len(student)).float()
    teacher_p = torch.softmax(torch.randn(len(a.teacher_ids), len(teacher), generator=gen), -1)
    for k, j in a.pairs.tolist():
        qs = q[loss_positions[k]]
        p = torch.zeros(len(teacher))
        p[mapped] = qs[m[mapped]] / shared[m[mapped]]
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
