"""Cross-tokenizer distillation on two real tokenizers built in code that split the same text
differently: the student's is char-level (SmolLM-like, ChatML), the teacher's merges "th",
"the", " c", "at" and adds a BOS (Gemma-like). The teacher actor scores its own
tokenization and sends a signal in the student's vocab at the shared boundaries; the loss
on it is zero for a student that agrees with the teacher on the text, positive for one
shifted by one token, and its gradient reaches the student."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
from chat_tokenizers import build_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from actors.batch import TokenBatch
from actors.models import backbone, output_head, save_tiny_llama
from actors.objective import LossSpec, SparseTarget, objective_sums
from actors.teacher import TeacherActor
from actors.xtok import TokenAligner, piece_bytes, vocab_map

TEXT = "the cat sat on the mat, then the cat ate."
MERGES = [("t", "h"), ("th", "e"), (" ", "c"), ("a", "t")]


def merging_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>"]
    chars = list(string.ascii_letters + string.digits + " \n.,?!'")
    vocab = {t: i for i, t in enumerate(specials + ["th", "the", " c", "at"] + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.post_processor = processors.TemplateProcessing(
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
    assert m[teacher.convert_tokens_to_ids("the")] == -1  # the student has no such piece
    a = teacher.convert_tokens_to_ids("a")
    assert m[a] == student.convert_tokens_to_ids("a")
    mapped = m[m >= 0]
    assert len(set(mapped.tolist())) == len(mapped)  # one to one


def test_byte_level_and_byte_fallback_pieces():
    bpe = Tokenizer(models.BPE(vocab={"Ġa": 0, "a": 1, "Ġ": 2}, merges=[("Ġ", "a")]))
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert piece_bytes(tok)[:3] == [b" a", b"a", b" "]
    sp = Tokenizer(models.BPE(vocab={"<0x41>": 0, "A": 1, "\u2581b": 2}, merges=[]))
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert piece_bytes(sp_tok) == [b"A", b"A", b" b"]
    # the ordinary piece "A" wins over the byte piece <0x41>
    student = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab={"A": 0}, merges=[]))
    )
    assert vocab_map(sp_tok, student).tolist() == [-1, 0, -1]


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
    the, a, c = (teacher.convert_tokens_to_ids(x) for x in ("the", "a", "c"))
    ids = np.array([[the, a, c], [the, the, the]])
    lp = np.log(np.array([[0.5, 0.3, 0.1], [0.9, 0.05, 0.05]]))
    sids, slp = aligner.map_topk(ids, lp)
    sa, sc = student.convert_tokens_to_ids("a"), student.convert_tokens_to_ids("c")
    assert sids[0].tolist() == [sa, sa, sc] and np.isneginf(slp[0, 0])
    np.testing.assert_allclose(slp[0, 1:], np.log([0.3, 0.1]), rtol=1e-6)
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
