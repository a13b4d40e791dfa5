"""The offline top-k cache: bit-exact round trips, resumable builds, provenance, corruption."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import actors.signal_cache as sc
from actors.batch import TokenBatch
from actors.signal import id_dtype
from actors.signal_cache import (
    PROVENANCE_FIELDS,
    CacheCorrupt,
    CacheMismatch,
    CacheReader,
    CacheWriter,
    bytes_per_position,
    data_hash,
    verify,
)

K = 5


def provenance(**over):
    prov = {
        "teacher": "tiny",
        "model_hash": "m" * 8,
        "tokenizer_hash": "t" * 8,
        "top_k": K,
        "temperature": 2.0,
        "dtype": "bfloat16",
        "data_hash": "d" * 8,
    }
    prov.update(over)
    return prov


def make_rows(n, vocab=300, k=K, hidden=None, seed=0):
    """Per row (ids [P, k], logprobs [P, k] float16 sorted descending, {layer: [P, H]})."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n):
        p = 0 if r % 4 == 1 else int(rng.integers(1, 7))
        ids = rng.integers(0, vocab, size=(p, k)).astype(id_dtype(vocab))
        lp = -np.abs(rng.standard_normal((p, k))) * 5
        lp[rng.random((p, k)) < 0.15] = -np.inf
        lp[rng.random((p, k)) < 0.15] = -6e-8  # float16 subnormal
        lp = -np.sort(-lp.astype(np.float16), axis=1)  # descending, -inf last
        hid = {
            layer: rng.standard_normal((p, h)).astype(np.float16)
            for layer, h in (hidden or {}).items()
        }
        rows.append((ids, lp, hid))
    return rows


def build(root, rows, rows_per_shard=8, row_group_rows=3, prov=None, hidden=True):
    with CacheWriter(root, prov or provenance(), len(rows), rows_per_shard, row_group_rows) as w:
        for r, (ids, lp, hid) in enumerate(rows):
            w.add(r, ids, lp, hid if hidden else None)
    return root


def expected(rows, order, k=K):
    ids = np.concatenate([rows[0][0][:0, :k]] + [rows[r][0][:, :k] for r in order])
    lp = np.concatenate([rows[0][1][:0, :k]] + [rows[r][1][:, :k] for r in order])
    return ids, lp


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_manifest_consistent(root: Path):
    """Every shard the manifest names is fully there: its size and sha256 as recorded."""
    manifest = json.loads((root / "manifest.json").read_text())
    for e in manifest["shards"]:
        path = root / e["file"]
        assert path.is_file(), e["file"]
        assert path.stat().st_size == e["bytes"] and file_sha(path) == e["sha256"], e["file"]
    return manifest


@pytest.mark.parametrize("vocab", [300, 70000])
def test_round_trip_is_bit_exact_in_any_row_order(tmp_path, vocab):
    rows = make_rows(23, vocab=vocab, hidden={2: 4, 7: 3}, seed=vocab)
    assert sum(ids.shape[0] == 0 for ids, _, _ in rows) >= 5
    root = build(tmp_path / "c", rows)
    assert sorted(p.name for p in root.iterdir()) == [
        "manifest.json",
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    manifest = assert_manifest_consistent(root)
    assert [(e["row_start"], e["row_stop"]) for e in manifest["shards"]] == [
        (0, 8),
        (8, 16),
        (16, 23),
    ]
    assert manifest["complete"] and manifest["top_k"] == K and manifest["num_rows"] == 23
    assert sum(e["positions"] for e in manifest["shards"]) == sum(r[0].shape[0] for r in rows)

    reader = CacheReader(root, cache_row_groups=2)
    assert reader.provenance == provenance() and reader.num_rows == 23 and reader.top_k == K
    order = np.random.default_rng(1).permutation(23).tolist()
    for sel in (order, [6, 7, 8, 9, 15, 16, 3, 3], [1], []):
        ids, lp = reader.read(sel)
        want_ids, want_lp = expected(rows, sel)
        assert ids.dtype == id_dtype(vocab) and lp.dtype == np.float16
        assert ids.flags.c_contiguous and lp.flags.c_contiguous
        assert np.array_equal(ids, want_ids)
        assert np.array_equal(lp.view(np.uint16), want_lp.view(np.uint16))  # bits: -inf, -0
        for layer in (2, 7):
            hid = reader.read_hidden(sel, layer)
            want = np.concatenate(
                [np.zeros((0, hid.shape[1]), np.float16)] + [rows[r][2][layer] for r in sel]
            )
            assert hid.dtype == np.float16 and hid.flags.c_contiguous
            assert np.array_equal(hid.view(np.uint16), want.view(np.uint16))
    assert np.isneginf(reader.read(order)[1]).any() and (reader.read(order)[1] == -6e-8).any()

    ids3, lp3 = reader.read(order, k=3)
    full_ids, full_lp = reader.read(order)
    assert ids3.shape[1] == 3 and ids3.flags.c_contiguous and lp3.flags.c_contiguous
    assert np.array_equal(ids3, full_ids[:, :3])
    assert np.array_equal(lp3.view(np.uint16), full_lp[:, :3].view(np.uint16))
    with pytest.raises(ValueError, match="top 5"):
        reader.read([0], k=K + 1)
    with pytest.raises(IndexError):
        reader.read([23])


def test_reader_decodes_only_the_row_groups_it_needs(tmp_path):
    rows = make_rows(23)
    root = build(tmp_path / "c", rows)
    reader = CacheReader(root, cache_row_groups=2)
    reader.read([9, 10])  # shard 1, rows 1-2: its first row group (rows 8-10)
    assert reader.row_groups_read == 1 and list(reader._open) == [1]
    reader.read([10, 8])
    assert reader.row_groups_read == 1  # served from the LRU
    reader.read([0, 22, 11])
    assert reader.row_groups_read == 4 and len(reader._groups) == 2
    # zero-copy decode: the cached values are the Arrow buffer reshaped, not a copy
    offsets, ids, lp = next(iter(reader._groups.values()))
    assert not ids.flags.writeable and not lp.flags.writeable and ids.base is not None


def test_killed_build_resumes_to_the_same_files(tmp_path):
    rows = make_rows(37, hidden={0: 2})  # rows_per_shard 8: shards of 8,8,8,8,5
    ref = build(tmp_path / "ref", rows)

    root = tmp_path / "c"
    w = CacheWriter(root, provenance(), 37, 8, 3)
    for r in range(19):  # 2 shards committed, 3 rows of shard 2 only in memory
        w.add(r, *rows[r])
        assert_manifest_consistent(root)
    assert w.next_row == 16
    del w  # killed: no close
    (root / ".tmp-shard-00002.parquet").write_bytes(b"half a shard")
    shutil.copy(ref / "shard-00004.parquet", root / "shard-00004.parquet")  # orphan
    (root / "notes.txt").write_text("not ours")
    manifest = assert_manifest_consistent(root)
    assert [e["file"] for e in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not manifest["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(root)

    w = CacheWriter(root, provenance(), 37, 8, 3)
    assert w.next_row == 16
    assert not (root / ".tmp-shard-00002.parquet").exists()
    assert not (root / "shard-00004.parquet").exists()
    assert (root / "notes.txt").exists()
    with pytest.raises(ValueError, match="expects row 16"):
        w.add(19, *rows[19])
    for r in range(16, 37):
        w.add(r, *rows[r])
    w.close()
    shards = sorted(p.name for p in ref.glob("shard-*.parquet"))
    assert len(shards) == 5
    assert sorted(p.name for p in root.glob("shard-*.parquet")) == shards
    assert [file_sha(root / s) for s in shards] == [file_sha(ref / s) for s in shards]
    assert json.loads((root / "manifest.json").read_text()) == json.loads(
        (ref / "manifest.json").read_text()
    )
    assert verify(root) == []
    with pytest.raises(ValueError, match="all 37 rows"):
        CacheWriter(root, provenance(), 37, 8, 3).add(37, *rows[0])


def test_a_crash_while_writing_a_shard_never_reaches_the_manifest(tmp_path, monkeypatch):
    rows = make_rows(20)
    root = tmp_path / "c"
    w = CacheWriter(root, provenance(), 20, 8, 3)
    for r in range(8):
        w.add(r, *rows[r])
    real = sc._write_durably

    def torn(path, data):  # the power goes out halfway through the second shard
        if path.name.startswith(".tmp-shard"):
            path.write_bytes(bytes(data)[: len(data) // 2])
            raise OSError("power cut")
        real(path, data)

    monkeypatch.setattr(sc, "_write_durably", torn)
    with pytest.raises(OSError, match="power cut"):
        for r in range(8, 16):
            w.add(r, *rows[r])
    manifest = assert_manifest_consistent(root)
    assert [e["file"] for e in manifest["shards"]] == ["shard-00000.parquet"]
    assert not (root / "shard-00001.parquet").exists()
    monkeypatch.setattr(sc, "_write_durably", real)
    w = CacheWriter(root, provenance(), 20, 8, 3)
    assert w.next_row == 8 and not list(root.glob(".tmp-*"))
    for r in range(8, 20):
        w.add(r, *rows[r])
    w.close()
    assert np.array_equal(CacheReader(root).read(range(20))[0], expected(rows, range(20))[0])


@pytest.mark.parametrize(
    "field, value",
    [
        ("teacher", "other"),
        ("model_hash", "m2"),
        ("tokenizer_hash", "t2"),
        ("top_k", K + 1),
        ("temperature", 1.0),
        ("dtype", "float32"),
        ("data_hash", "d2"),
    ],
)
def test_each_provenance_field_must_match(tmp_path, field, value):
    root = build(tmp_path / "c", make_rows(4), rows_per_shard=4)
    reader = CacheReader(root)
    with pytest.raises(CacheMismatch) as err:
        reader.check(provenance(**{field: value}))
    cached = provenance()[field]
    assert err.value.field == field
    assert err.value.cached == cached and err.value.expected == value
    assert str(err.value) == f"{field}: the cache has {cached!r}, the recipe wants {value!r}"
    assert "\n" not in str(err.value)
    with pytest.raises(CacheMismatch, match=f"^{field}: "):  # and a writer will not resume
        CacheWriter(root, provenance(**{field: value}), 4, 4)


def test_a_smaller_top_k_is_served_by_truncation(tmp_path):
    root = build(tmp_path / "c", make_rows(4), rows_per_shard=4)
    reader = CacheReader(root)
    reader.check(provenance(top_k=2, temperature=2))  # 2 == 2.0 as a float
    reader.check(provenance())
    assert set(PROVENANCE_FIELDS) == set(provenance())
    with pytest.raises(CacheMismatch, match="^top_k: the cache has 5, the recipe wants 0$"):
        reader.check(provenance(top_k=0))


def _footer_start(path: Path) -> int:
    data = path.read_bytes()
    assert data[-4:] == b"PAR1"
    return len(data) - 8 - int.from_bytes(data[-8:-4], "little")


def test_a_flipped_byte_or_a_truncated_shard_is_caught(tmp_path):
    rows = make_rows(24, hidden={1: 8}, seed=3)
    root = build(tmp_path / "c", rows)
    bad = root / "shard-00001.parquet"
    size = bad.stat().st_size
    at = int(size * 0.4)
    assert 4 < at < _footer_start(bad)  # inside the data pages, well away from the footer
    data = bytearray(bad.read_bytes())
    data[at] ^= 0x40
    bad.write_bytes(bytes(data))
    assert verify(root) == ["shard-00001.parquet"]

    reader = CacheReader(root)
    ids, _ = reader.read([0, 5, 16, 23])  # shards 0 and 2 only
    assert np.array_equal(ids, expected(rows, [0, 5, 16, 23])[0])
    with pytest.raises(CacheCorrupt, match="checksum mismatch") as err:
        reader.read([3, 9])
    assert err.value.file == "shard-00001.parquet"
    assert "shard-00001.parquet" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CacheCorrupt):
        CacheReader(root).read_hidden([12], 1)

    trunc = build(tmp_path / "t", rows)
    cut = trunc / "shard-00002.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert verify(trunc) == ["shard-00002.parquet"]
    reader = CacheReader(trunc)
    reader.read(range(16))
    with pytest.raises(CacheCorrupt, match="truncated") as err:
        reader.read([17])
    assert err.value.file == "shard-00002.parquet"

    os.remove(trunc / "shard-00000.parquet")
    assert verify(trunc) == ["shard-00000.parquet", "shard-00002.parquet"]
    with pytest.raises(CacheCorrupt, match="missing") as err:
        CacheReader(trunc).read([1])
    assert err.value.file == "shard-00000.parquet"

    os.remove(trunc / "manifest.json")
    with pytest.raises(CacheCorrupt, match="missing") as err:
        verify(trunc)
    assert err.value.file == "manifest.json"
    with pytest.raises(CacheCorrupt):
        CacheReader(trunc)


def _batch(rows, width):
    """Right-padded TokenBatch of (tokens, loss bits) rows."""
    ids = np.full((len(rows), width), 7, dtype=np.int32)
    attn = np.zeros((len(rows), width), dtype=np.int8)
    loss = np.zeros((len(rows), width), dtype=bool)
    for i, (tok, bits) in enumerate(rows):
        ids[i, : len(tok)], attn[i, : len(tok)], loss[i, : len(tok)] = tok, 1, bits
    return TokenBatch(ids, attn, loss)


def test_data_hash_sees_data_not_padding():
    a = ([5, 6, 7, 8], [0, 1, 1, 0])
    b = ([9, 10, 11], [1, 1, 0])
    base = data_hash([_batch([a, b], 6)])
    assert base == data_hash([_batch([a, b], 4)]) == data_hash([_batch([a, b], 11)])
    assert len(base) == 64
    changed = [
        [_batch([([5, 6, 7, 9], a[1]), b], 6)],  # one token
        [_batch([(a[0], [0, 1, 0, 0]), b], 6)],  # one loss bit
        [_batch([([5, 6, 7], [0, 1, 1]), ([8, 9, 10, 11], [0, 1, 1, 0])], 6)],  # row boundary
        [_batch([a], 6), _batch([b], 6)],  # batch boundary
        [_batch([b, a], 6)],  # row order
    ]
    hashes = {data_hash(c) for c in changed}
    # Same rows per batch, same bytes once rows are glued together (int32 5, 1 | loss 0, 1
    # reads as 5 | 1, then 0 | 1): only the row boundaries tell these two batches apart.
    glued = _batch([([5, 1], [0, 1]), ([0], [1])], 3)
    split = _batch([([5], [1]), ([0, 1], [0, 1])], 3)
    assert data_hash([glued]) != data_hash([split])
    assert len(hashes) == len(changed) and base not in hashes
    with pytest.raises(ValueError, match="outside the attention mask"):
        bad = _batch([a, b], 6)
        bad.loss_mask[1, 5] = True
        data_hash([bad])


def test_bytes_per_position_at_k64(tmp_path):
    rng = np.random.default_rng(0)
    vocab, k, rows, positions = 49152, 64, 16, 64
    prov = provenance(top_k=k)
    with CacheWriter(tmp_path / "c", prov, rows, rows_per_shard=16, row_group_rows=8) as w:
        for r in range(rows):
            logits = rng.standard_normal((positions, vocab), dtype=np.float32) * 2
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            top = np.argpartition(-logp, k, axis=1)[:, :k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(logp, top, 1)), 1)
            lp = np.take_along_axis(logp, top, 1).astype(np.float16)
            w.add(r, top.astype(id_dtype(vocab)), lp)
    bpp = bytes_per_position(tmp_path / "c")
    print(f"\nbytes per loss position at k={k} (uint16 ids, float16 log-probs): {bpp:.1f}")
    assert bpp <= k * (2 + 2)
