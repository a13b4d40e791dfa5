"""An offline top-k cache: teacher signals computed once, on disk, reused by many student runs.

For each example row r = 0..N-1 of a dataset (in row order) the cache holds the teacher's
top-k at that row's loss positions, the TeacherSignal layout one row at a time: `ids` [P_r, k]
(uint16 when the vocab fits, else int32; see `actors.signal.id_dtype`), `logprobs` [P_r, k]
float16 sorted by descending log-prob (so the first k' columns are the top-k' for any
k' <= k) and optionally hidden states {layer: [P_r, H] float16}. P_r may be 0.

On disk, under `root`:

- `shard-{i:05d}.parquet` holds rows [i * rows_per_shard, min(num_rows, (i + 1) *
  rows_per_shard)), one Parquet row per example, zstd, `row_group_size=row_group_rows`:
  `row` int64; `ids` list<fixed_size_list<uint16 | int32>[k]>; `logprobs`
  list<fixed_size_list<halffloat>[k]> (pyarrow writes float16 natively, Parquet logical type
  Float16 over FIXED_LEN_BYTE_ARRAY(2), so log-probs are stored as float16 and read back bit
  for bit); `hidden_<layer>` list<fixed_size_list<uint16>[H]> holding the bits of the float16
  hidden states (viewed back as float16 on read). The value columns use BYTE_STREAM_SPLIT
  encoding (no dictionary): with zstd it stores random 16-bit ids near their entropy.
- `manifest.json`: `{"format": 1, "provenance", "num_rows", "rows_per_shard",
  "row_group_rows", "top_k", "ids_dtype", "hidden": {layer: H}, "shards": [{"file",
  "row_start", "row_stop", "positions", "bytes", "sha256"}], "complete"}`.

The manifest is the only truth. A shard is written under a `.tmp-` name, fsynced and renamed
into place before the manifest that names it is replaced (temp file, fsync, rename, fsync of
the directory), so a manifest never names a shard that is not fully on disk. A writer opened
again on the same root with the same provenance resumes after the last committed shard and
deletes what a killed build left behind (`.tmp-*` files, shards the manifest does not name).
One writer per root at a time: nothing here locks the directory.

Readers stream: they decode only the row groups holding the requested rows (a few are kept in
a small LRU) and check each shard's sha256 against the manifest the first time they open it.

Only numpy and pyarrow here (no torch, no ray): the students' data loaders and offline tools
import this module without a model runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.durable import fsync_dir

if TYPE_CHECKING:
    from actors.batch import TokenBatch

PROVENANCE_FIELDS = (
    "teacher",
    "model_hash",
    "tokenizer_hash",
    "top_k",
    "temperature",
    "dtype",
    "data_hash",
)
FORMAT = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20  # streaming hash: 1 MiB reads
_ID_DTYPES = {"uint16": np.dtype(np.uint16), "int32": np.dtype(np.int32)}
_ARROW_IDS = {"uint16": pa.uint16(), "int32": pa.int32()}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


class CacheMismatch(ValueError):
    """The cache was built for something else than what the recipe asks for."""

    def __init__(self, field: str, cached: Any, expected: Any) -> None:
        self.field, self.cached, self.expected = field, cached, expected
        super().__init__(f"{field}: the cache has {cached!r}, the recipe wants {expected!r}")


class CacheCorrupt(RuntimeError):
    """A cache file is missing, unreadable or not what the manifest recorded."""

    def __init__(self, file: str, problem: str) -> None:
        self.file = file
        super().__init__(f"{file}: {problem}".replace("\n", " "))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# data hash


def data_hash(batches: list[TokenBatch]) -> str:
    """sha256 of what cached signals are aligned to: for each row of each batch, in order, the
    row's tokens inside its attention mask (int32 little-endian) and its loss mask over those
    same positions. Every batch and row is length-prefixed, so different data, splits or row
    boundaries cannot give the same byte stream; padding (any width) is dropped first."""
    h = hashlib.sha256(b"raydistill.signal_cache.data_hash/1\0")
    h.update(np.int64(len(batches)).astype("<i8").tobytes())
    for b, batch in enumerate(batches):
        ids = np.asarray(batch.input_ids)
        attn = np.asarray(batch.attention_mask) != 0
        loss = np.asarray(batch.loss_mask) != 0
        if ids.ndim != 2 or ids.shape != attn.shape or ids.shape != loss.shape:
            raise ValueError(
                f"batch {b}: input_ids {ids.shape}, attention_mask {attn.shape} and loss_mask "
                f"{loss.shape} must be the same [B, T]"
            )
        if np.any(loss & ~attn):
            raise ValueError(f"batch {b}: the loss mask has positions outside the attention mask")
        if ids.size and (ids.min() < -(2**31) or ids.max() >= 2**31):
            raise ValueError(f"batch {b}: token ids do not fit in int32")
        h.update(b"B" + np.int64(ids.shape[0]).astype("<i8").tobytes())
        for row in range(ids.shape[0]):
            keep = attn[row]
            tokens = ids[row][keep].astype("<i4")
            h.update(b"R" + np.int64(tokens.size).astype("<i8").tobytes())
            h.update(tokens.tobytes())
            h.update(loss[row][keep].astype(np.uint8).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# files


def _write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write, flush and fsync a new file (the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Atomic and durable: the old manifest or the new one, never half of one."""
    tmp = root / f"{TMP_PREFIX}{MANIFEST}"
    _write_durably(tmp, json.dumps(manifest, indent=1).encode())
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CacheCorrupt(MANIFEST, f"missing: no signal cache at {root}") from None
    except OSError as e:
        raise CacheCorrupt(MANIFEST, f"unreadable: {e}") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise CacheCorrupt(MANIFEST, f"unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheCorrupt(MANIFEST, f"format {got!r}, this reader knows format {FORMAT}")
    for i, entry in enumerate(manifest.get("shards") or []):
        name = entry.get("file") if isinstance(entry, dict) else None
        if not _is_plain_name(name):  # a shard is opened, hashed and deleted by this name
            raise CacheCorrupt(
                MANIFEST, f"shard {i}: file {name!r} is not a plain file name in the cache folder"
            )
    return manifest


def _is_plain_name(name: Any) -> bool:
    """A file name inside the cache folder: letters, digits, `._-`, not `.` or `..`."""
    return isinstance(name, str) and bool(_PLAIN_NAME.fullmatch(name)) and name not in (".", "..")


def _sha256(f: Any) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _open_shard(root: Path, entry: dict[str, Any], verify: bool) -> tuple[Any, pq.ParquetFile]:
    """(file, ParquetFile) of a committed shard, its sha256 checked first when `verify`: the
    same open file is hashed and then parsed, so what is read is what was checked."""
    name = entry["file"]
    try:
        f = open(Path(root) / name, "rb")
    except FileNotFoundError:
        raise CacheCorrupt(name, "missing") from None
    except OSError as e:
        raise CacheCorrupt(name, f"unreadable: {e}") from None
    try:
        if verify:
            digest, size = _sha256(f)
            if size != entry["bytes"]:
                raise CacheCorrupt(
                    name, f"size {size} bytes, the manifest says {entry['bytes']} (truncated?)"
                )
            if digest != entry["sha256"]:
                raise CacheCorrupt(
                    name,
                    f"checksum mismatch: sha256 {digest[:16]}..., the manifest says "
                    f"{entry['sha256'][:16]}...",
                )
            f.seek(0)
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # any parse failure: a corrupt shard
            raise CacheCorrupt(name, f"unreadable: {type(e).__name__}: {e}") from None
        rows = entry["row_stop"] - entry["row_start"]
        if pf.metadata.num_rows != rows:
            raise CacheCorrupt(name, f"{pf.metadata.num_rows} rows, the manifest says {rows} rows")
        return f, pf
    except BaseException:
        f.close()
        raise


# ---------------------------------------------------------------------------------------------
# writing


def _normalize_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    missing = [f for f in PROVENANCE_FIELDS if f not in provenance]
    if missing:
        raise ValueError(f"provenance lacks {', '.join(missing)} (needs {PROVENANCE_FIELDS})")
    out = json.loads(json.dumps(dict(provenance)))  # what the manifest will read back
    out["top_k"] = int(provenance["top_k"])
    out["temperature"] = float(provenance["temperature"])
    if out["top_k"] < 1:
        raise ValueError(f"top_k must be >= 1, got {out['top_k']}")
    return out


def _same(field: str, cached: Any, expected: Any) -> bool:
    if field == "temperature":
        try:
            return float(cached) == float(expected)
        except (TypeError, ValueError):
            return False
    return cached == expected


def _list_of_fixed(values: np.ndarray, width: int, offsets: np.ndarray, typ: pa.DataType):
    """list<fixed_size_list<typ>[width]> over rows whose positions are values[offsets[i]:...]."""
    flat = pa.array(values.reshape(-1), type=typ)
    return pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), pa.FixedSizeListArray.from_arrays(flat, width)
    )


class CacheWriter:
    """Builds a cache row by row, one durable shard at a time; resumable after a kill."""

    def __init__(
        self,
        root: Path,
        provenance: dict[str, Any],
        num_rows: int,
        rows_per_shard: int = 256,
        row_group_rows: int = 64,
    ) -> None:
        if num_rows < 0 or rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError(
                f"num_rows {num_rows} must be >= 0, rows_per_shard {rows_per_shard} and "
                f"row_group_rows {row_group_rows} >= 1"
            )
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        prov = _normalize_provenance(provenance)
        self.top_k = prov["top_k"]
        path = self.root / MANIFEST
        if path.exists():
            manifest = _read_manifest(self.root)
            cached = manifest["provenance"]
            rest = sorted((set(cached) | set(prov)) - set(PROVENANCE_FIELDS))
            for field in (*PROVENANCE_FIELDS, *rest):
                if not _same(field, cached.get(field), prov.get(field)):
                    raise CacheMismatch(field, cached.get(field), prov.get(field))
            layout = (
                ("num_rows", num_rows),
                ("rows_per_shard", rows_per_shard),
                ("row_group_rows", row_group_rows),
            )
            for field, want in layout:
                if manifest[field] != want:
                    raise CacheMismatch(field, manifest[field], want)
            self._manifest = manifest
        else:
            self._manifest = {
                "format": FORMAT,
                "provenance": prov,
                "num_rows": int(num_rows),
                "rows_per_shard": int(rows_per_shard),
                "row_group_rows": int(row_group_rows),
                "top_k": self.top_k,
                "ids_dtype": None,
                "hidden": {},
                "shards": [],
                "complete": num_rows == 0,
            }
        self._clean()
        for entry in self._manifest["shards"]:  # cheap: the committed shards are all there
            file = self.root / entry["file"]
            size = file.stat().st_size if file.exists() else None
            if size != entry["bytes"]:
                raise CacheCorrupt(
                    entry["file"], f"size {size}, the manifest says {entry['bytes']} bytes"
                )
        if not path.exists():
            _write_manifest(self.root, self._manifest)
        self._buffer: list[tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = []

    @property
    def num_rows(self) -> int:
        return self._manifest["num_rows"]

    @property
    def rows_per_shard(self) -> int:
        return self._manifest["rows_per_shard"]

    @property
    def next_row(self) -> int:
        """The first row not in a committed shard (where a resumed build starts)."""
        shards = self._manifest["shards"]
        return shards[-1]["row_stop"] if shards else 0

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def hidden_layers(self) -> dict[int, int]:
        """{layer: H} of the hidden states the committed rows hold."""
        return {int(k): int(v) for k, v in self._manifest["hidden"].items()}

    def _clean(self) -> None:
        """Delete what a killed build left: temp files and shards the manifest does not name."""
        named = {e["file"] for e in self._manifest["shards"]}
        for p in self.root.iterdir():
            stray = p.name.startswith(TMP_PREFIX) or (
                p.name.startswith("shard-") and p.name.endswith(".parquet") and p.name not in named
            )
            if stray and p.is_file():
                p.unlink()
        fsync_dir(self.root)

    def add(
        self,
        row: int,
        ids: np.ndarray,
        logprobs: np.ndarray,
        hidden: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Row `row`'s signal: ids and logprobs [P, k], hidden {layer: [P, H] float16}. Rows
        come strictly in order from `next_row`; a full shard is written before this returns."""
        expect = self.next_row + len(self._buffer)
        if self.complete or expect >= self.num_rows:
            raise ValueError(f"row {row}: the cache already holds all {self.num_rows} rows")
        if row != expect:
            raise ValueError(f"row {row} out of order: the writer expects row {expect} next")
        ids, logprobs = np.asarray(ids), np.asarray(logprobs)
        k = self.top_k
        if ids.ndim != 2 or ids.shape[1] != k or logprobs.shape != ids.shape:
            raise ValueError(
                f"row {row}: ids {ids.shape} and logprobs {logprobs.shape} must both be [P, {k}]"
            )
        id_name = next((n for n, d in _ID_DTYPES.items() if ids.dtype == d), None)
        if id_name is None:
            raise ValueError(f"row {row}: ids are {ids.dtype}, must be uint16 or int32 (id_dtype)")
        known = self._manifest["ids_dtype"]
        if known is not None and id_name != known:
            raise ValueError(f"row {row}: ids are {id_name}, the cache stores {known}")
        if logprobs.dtype != np.float16:
            raise ValueError(f"row {row}: logprobs are {logprobs.dtype}, must be float16")
        if k > 1 and not np.all(logprobs[:, :-1] >= logprobs[:, 1:]):
            raise ValueError(f"row {row}: logprobs must be sorted descending along k (and no NaN)")
        hidden = dict(hidden or {})
        shapes = {str(int(layer)): int(np.shape(h)[-1]) for layer, h in hidden.items()}
        want = self._manifest["hidden"] if (known is not None) else shapes
        if shapes != want:
            raise ValueError(f"row {row}: hidden {shapes} (layer: H), the cache stores {want}")
        for layer, h in hidden.items():
            h = np.asarray(h)
            if h.dtype != np.float16 or h.ndim != 2 or h.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"row {row}: hidden[{layer}] is {h.dtype} {h.shape}, must be float16 "
                    f"[{ids.shape[0]}, H]"
                )
        self._manifest["ids_dtype"], self._manifest["hidden"] = id_name, want
        copies = {int(layer): np.array(h, copy=True) for layer, h in hidden.items()}
        self._buffer.append((np.array(ids, copy=True), np.array(logprobs, copy=True), copies))
        stop = min(self.num_rows, self.next_row + self.rows_per_shard)
        if self.next_row + len(self._buffer) == stop:
            self._flush()

    def _flush(self) -> None:
        start = self.next_row
        index = start // self.rows_per_shard
        n, k = len(self._buffer), self.top_k
        counts = np.array([b[0].shape[0] for b in self._buffer], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        id_name = self._manifest["ids_dtype"]
        ids = np.concatenate([b[0] for b in self._buffer]).reshape(-1, k)
        logprobs = np.concatenate([b[1] for b in self._buffer]).reshape(-1, k)
        columns = {
            "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "ids": _list_of_fixed(ids, k, offsets, _ARROW_IDS[id_name]),
            "logprobs": _list_of_fixed(logprobs, k, offsets, pa.float16()),
        }
        for layer_key, width in sorted(self._manifest["hidden"].items(), key=lambda x: int(x[0])):
            layer = int(layer_key)
            bits = np.concatenate([b[2][layer] for b in self._buffer]).reshape(-1, width)
            columns[f"hidden_{layer}"] = _list_of_fixed(
                bits.view(np.uint16), width, offsets, pa.uint16()
            )
        table = pa.table(columns)
        split = {
            f"{c}.list.element.list.element": "BYTE_STREAM_SPLIT" for c in columns if c != "row"
        }
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            row_group_size=self._manifest["row_group_rows"],
            compression="zstd",
            use_dictionary=False,
            column_encoding=split,
            write_statistics=["row"],
            data_page_version="1.0",  # levels are compressed with the values
        )
        data = sink.getvalue()
        name = shard_name(index)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        _write_durably(tmp, memoryview(data))
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)
        entry = {
            "file": name,
            "row_start": start,
            "row_stop": start + n,
            "positions": int(offsets[-1]),
            "bytes": int(data.size),
            "sha256": hashlib.sha256(memoryview(data)).hexdigest(),
        }
        self._manifest["shards"].append(entry)
        self._manifest["complete"] = entry["row_stop"] == self.num_rows
        self._buffer = []
        _write_manifest(self.root, self._manifest)

    def close(self) -> None:
        """Write the last (partial) shard and mark the cache complete. Every row must be in."""
        if self.complete:
            return
        have = self.next_row + len(self._buffer)
        if have != self.num_rows:
            raise ValueError(f"close: {have} of {self.num_rows} rows added; the cache is not done")
        self._flush()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:  # on an error, leave the committed shards for a resume
            self.close()


# ---------------------------------------------------------------------------------------------
# reading


def _column_values(table: pa.Table, name: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets int64 [n + 1], values [positions, width]) of a list<fixed_size_list>
    column, zero-copy: the values buffer reshaped (read-only, owned by the Arrow table)."""
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    if arr.type.value_type.list_size != width:
        raise ValueError(f"column {name} is {arr.type}, expected width {width}")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().flatten().to_numpy(zero_copy_only=True)
    return offsets - offsets[0], values.reshape(-1, width)


class _Shard:
    def __init__(self, file: Any, pf: pq.ParquetFile) -> None:
        self.file, self.pf = file, pf
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class CacheReader:
    """Streams rows out of a complete cache: only the row groups that hold the requested rows
    are decoded, at most `cache_row_groups` of them are kept (LRU) and at most `open_files`
    shard files are open; each shard's sha256 is checked the first time it is opened."""

    def __init__(self, root: Path, cache_row_groups: int = 8, open_files: int = 8) -> None:
        self.root = Path(root)
        self._manifest = _read_manifest(self.root)
        m = self._manifest
        if not m.get("complete"):
            done = m["shards"][-1]["row_stop"] if m["shards"] else 0
            raise ValueError(
                f"{self.root}: the signal cache is incomplete ({done} of {m['num_rows']} rows "
                "committed); finish it with: raydistill cache build RECIPE"
            )
        for i, entry in enumerate(m["shards"]):
            if entry["row_start"] != i * m["rows_per_shard"]:
                raise CacheCorrupt(MANIFEST, f"shard {i} starts at row {entry['row_start']}")
        self._ids_dtype = _ID_DTYPES[m["ids_dtype"] or "uint16"]
        self._cache_size, self._max_open = max(1, cache_row_groups), max(1, open_files)
        self._groups: OrderedDict[tuple[int, int, str], tuple[np.ndarray, ...]] = OrderedDict()
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._verified: set[int] = set()
        self.row_groups_read = 0  # decoded row groups (cache misses), for tests and logs

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._manifest["provenance"])

    @property
    def num_rows(self) -> int:
        return int(self._manifest["num_rows"])

    @property
    def top_k(self) -> int:
        return int(self._manifest["top_k"])

    @property
    def hidden_layers(self) -> dict[int, int]:
        """{layer: H} of the stored hidden states."""
        return {int(k): int(v) for k, v in self._manifest["hidden"].items()}

    def check(self, expected: dict[str, Any]) -> None:
        """Raise CacheMismatch for the first provenance field the recipe wants otherwise; a
        top_k below the cached k is served by truncation, a temperature compares as a float."""
        cached = self._manifest["provenance"]
        for field in PROVENANCE_FIELDS:
            have, want = cached.get(field), expected.get(field)
            if field == "top_k":
                ok = isinstance(want, (int, np.integer)) and 1 <= int(want) <= int(have)
            else:
                ok = _same(field, have, want)
            if not ok:
                raise CacheMismatch(field, have, want)

    def _shard(self, index: int) -> _Shard:
        shard = self._open.get(index)
        if shard is not None:
            self._open.move_to_end(index)
            return shard
        entry = self._manifest["shards"][index]
        f, pf = _open_shard(self.root, entry, verify=index not in self._verified)
        self._verified.add(index)
        shard = self._open[index] = _Shard(f, pf)
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.file.close()
        return shard

    def _group(self, index: int, group: int, kind: str) -> tuple[np.ndarray, ...]:
        key = (index, group, kind)
        hit = self._groups.get(key)
        if hit is not None:
            self._groups.move_to_end(key)
            return hit
        shard = self._shard(index)
        entry = self._manifest["shards"][index]
        cols = ["row", "ids", "logprobs"] if kind == "signal" else ["row", kind]
        try:
            table = shard.pf.read_row_group(group, columns=cols)
            first = entry["row_start"] + int(shard.starts[group])
            rows = table.column("row").to_numpy()
            if not np.array_equal(rows, np.arange(first, first + len(rows))):
                raise ValueError(f"row group {group} holds rows {rows[:3]}..., not {first}...")
            if kind == "signal":
                offsets, ids = _column_values(table, "ids", self.top_k)
                _, logprobs = _column_values(table, "logprobs", self.top_k)
                decoded: tuple[np.ndarray, ...] = (offsets, ids, logprobs)
            else:
                width = self.hidden_layers[int(kind.removeprefix("hidden_"))]
                offsets, bits = _column_values(table, kind, width)
                decoded = (offsets, bits.view(np.float16))
        except CacheCorrupt:
            raise
        except Exception as e:  # a shard that passed its checksum yet fails
            raise CacheCorrupt(entry["file"], f"unreadable: {type(e).__name__}: {e}") from None
        self.row_groups_read += 1
        self._groups[key] = decoded
        while len(self._groups) > self._cache_size:
            self._groups.popitem(last=False)
        return decoded

    def _gather(self, rows: Sequence[int], kind: str, cols: int | None) -> list[np.ndarray]:
        """For each value array of `kind`, the rows' positions concatenated in the given
        order (C-contiguous, first `cols` columns)."""
        rps = self._manifest["rows_per_shard"]
        pieces: list[tuple[np.ndarray, ...]] = []
        for r in np.asarray(rows, dtype=np.int64).reshape(-1):
            r = int(r)
            if not 0 <= r < self.num_rows:
                raise IndexError(f"row {r} is outside the cache's {self.num_rows} rows")
            index = r // rps
            local = r - index * rps
            starts = self._shard(index).starts
            group = int(np.searchsorted(starts, local, side="right")) - 1
            offsets, *values = self._group(index, group, kind)
            i = local - int(starts[group])
            a, b = int(offsets[i]), int(offsets[i + 1])
            pieces.append(tuple(v[a:b, :cols] for v in values))
        return pieces

    def _stack(self, pieces: list[tuple[np.ndarray, ...]], j: int, dtype, width: int):
        total = sum(p[j].shape[0] for p in pieces)
        out = np.empty((total, width), dtype=dtype)
        at = 0
        for p in pieces:
            n = p[j].shape[0]
            out[at : at + n] = p[j]
            at += n
        return out

    def read(self, rows: Sequence[int], k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids [sum P, k'], logprobs [sum P, k'] float16) of the rows, in the given order;
        k' = k (the top-k' are the first k' cached columns) or the cached k."""
        width = self.top_k if k is None else int(k)
        if not 1 <= width <= self.top_k:
            raise ValueError(f"k={k}: the cache holds the top {self.top_k}")
        pieces = self._gather(rows, "signal", width)
        return (
            self._stack(pieces, 0, self._ids_dtype, width),
            self._stack(pieces, 1, np.float16, width),
        )

    def read_hidden(self, rows: Sequence[int], layer: int) -> np.ndarray:
        """Hidden states [sum P, H] float16 of layer `layer` at the rows' loss positions."""
        if int(layer) not in self.hidden_layers:
            raise KeyError(f"layer {layer}: the cache holds hidden states of {self.hidden_layers}")
        width = self.hidden_layers[int(layer)]
        pieces = self._gather(rows, f"hidden_{int(layer)}", None)
        return self._stack(pieces, 0, np.float16, width)

    def close(self) -> None:
        for shard in self._open.values():
            shard.file.close()
        self._open.clear()
        self._groups.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# whole-cache checks


def verify(root: Path) -> list[str]:
    """The file names of the shards that are missing, truncated, fail their sha256 or do not
    parse (with their row column) as the manifest says; [] when all are good."""
    manifest = _read_manifest(Path(root))
    bad = []
    for entry in manifest["shards"]:
        try:
            f, pf = _open_shard(Path(root), entry, verify=True)
        except CacheCorrupt:
            bad.append(entry["file"])
            continue
        try:
            rows = pf.read(columns=["row"]).column("row").to_numpy()
            if not np.array_equal(rows, np.arange(entry["row_start"], entry["row_stop"])):
                bad.append(entry["file"])
        except Exception:
            bad.append(entry["file"])
        finally:
            f.close()
    return bad


def bytes_per_position(root: Path) -> float:
    """Total shard bytes / total loss positions of the committed shards."""
    shards = _read_manifest(Path(root))["shards"]
    positions = sum(e["positions"] for e in shards)
    if positions == 0:
        raise ValueError(f"{root}: the cache holds no loss positions")
    return sum(e["bytes"] for e in shards) / positions
