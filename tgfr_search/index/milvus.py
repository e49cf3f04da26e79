"""Milvus as the vector store: a Milvus server or cluster, or Milvus Lite embedded in-process.

Each vector space is one collection, reached through an alias (`{prefix}_{space}`), holding
the face id, the vector, the identity and the metadata, so that search filters run inside
Milvus as boolean expressions before ranking (the top-k are the true top-k of the matching
faces). The metadata database stays the source of truth: the collection records, in its
properties, the store generation it holds and how many vectors; a sync adds the faces of
later generations (upserts, so a replay after a crash is harmless) and rebuilds the collection
from the store after deletes it missed, a dimension change (reindex) or any disagreement.
A rebuild fills a new collection and then moves the alias, so searches never see it half made.

Only the holder of the engine's write lock writes to a collection: a reader that finds it
behind the store takes the lock if it is free (no writer alive: repair it) and otherwise
searches what is there, since the writer publishes each batch as it commits it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tgfr_search.errors import BackendUnavailable, MissingDependency
from tgfr_search.index.base import VectorSource, as_queries, empty_result

TOKEN_ENV = "TGFR_MILVUS_TOKEN"
DELETE_GENERATION = "delete_generation"  # the store's key (tgfr_search.store.store)
GENERATION_PROP = "tgfr.generation"
COUNT_PROP = "tgfr.count"
INSERT_BATCH = 2048  # rows per insert: 2048 x 640-d fp32 is 5 MB, far below gRPC's 64 MB
MAX_TOPK = 16384  # Milvus refuses larger limits
FLAT_MAX = 100_000  # exact FLAT up to here; one query then scans ~200 MB of fp32 at 512-d
PARTITION_FIELD = "partition_key"
INDEX_TYPES = ("auto", "FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "GPU_CAGRA", "GPU_IVF_PQ")
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")


@dataclass(frozen=True)
class VectorsConfig:
    """A parsed `vectors=` URI."""

    kind: str
    """'faiss', 'milvus-lite' or 'milvus'."""
    target: str = ""
    """Milvus Lite's data directory, or the server's http(s) address."""
    prefix: str = "tgfr"
    db: str = ""
    index: str = "auto"
    partition_key: str | None = None
    consistency: str = "Strong"

    @property
    def uri(self) -> str:
        """The URI again, with its options (no credentials: the token is never in it)."""
        if self.kind == "faiss":
            return "faiss"
        base = f"milvus-lite://{self.target}" if self.kind == "milvus-lite" else self.target
        opts = {
            "prefix": self.prefix if self.prefix != "tgfr" else None,
            "db": self.db or None,
            "index": self.index if self.index != "auto" else None,
            "partition_key": self.partition_key,
            "consistency": self.consistency if self.consistency != "Strong" else None,
        }
        query = urllib.parse.urlencode({k: v for k, v in opts.items() if v is not None})
        return f"{base}?{query}" if query else base


def parse_vectors_uri(uri: str) -> VectorsConfig:
    """`faiss`, `milvus-lite:///ABSOLUTE/PATH` (or `milvus-lite:////PATH`), `http(s)://host:port`.

    Options go in the query string: `prefix` (collection names, default tgfr), `db` (Milvus
    database), `index` (auto or a Milvus index type), `partition_key` (a metadata key whose
    value routes faces to partitions: one per tenant), `consistency` (default Strong).
    """
    if uri in ("faiss", "faiss://"):
        return VectorsConfig("faiss")
    parts = urllib.parse.urlsplit(uri)
    params = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(params) - {"prefix", "db", "index", "partition_key", "consistency"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} in vectors URI {uri!r}")
    opt = {k: v[-1] for k, v in params.items()}
    prefix, index = opt.get("prefix", "tgfr"), opt.get("index", "auto").upper()
    if index == "AUTO":
        index = "auto"
    consistency = opt.get("consistency", "Strong").capitalize()
    partition_key = opt.get("partition_key") or None
    if not _NAME.match(prefix):
        raise ValueError(f"vectors URI prefix {prefix!r}: letters, digits and _ only")
    if index not in INDEX_TYPES:
        raise ValueError(f"vectors URI index {index!r}: one of {', '.join(INDEX_TYPES)}")
    if consistency not in CONSISTENCY:
        raise ValueError(
            f"vectors URI consistency {consistency!r}: one of {', '.join(CONSISTENCY)}"
        )
    common = dict(
        prefix=prefix,
        db=opt.get("db", ""),
        index=index,
        partition_key=partition_key,
        consistency=consistency,
    )
    if parts.scheme == "milvus-lite":
        path = uri[len("milvus-lite://") :].split("?", 1)[0]
        if path.startswith("//"):  # the SQLAlchemy-style four slashes: milvus-lite:////data/x.db
            path = path[1:]
        if not path.startswith("/") or path == "/":
            raise ValueError(
                f"vectors URI {uri!r}: milvus-lite:// takes an absolute path, "
                "e.g. milvus-lite:////data/vectors.db"
            )
        return VectorsConfig("milvus-lite", os.path.normpath(path), **common)  # type: ignore[arg-type]
    if parts.scheme in ("http", "https"):
        if parts.username or parts.password:
            raise ValueError(
                f"vectors URI: no credentials in the URI; put the token in ${TOKEN_ENV}"
            )
        if not parts.hostname:
            raise ValueError(f"vectors URI {uri!r} names no host")
        target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return VectorsConfig("milvus", target, **common)  # type: ignore[arg-type]
    raise ValueError(
        f"vectors URI {uri!r}: expected faiss, milvus-lite:///ABSOLUTE/PATH or http(s)://host:port"
    )


def choose_index(
    n: int, *, lite: bool, requested: str = "auto"
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(index type, build params, search params) for a collection of `n` vectors.

    Exact FLAT while a scan is cheap. Past FLAT_MAX: IVF_FLAT on Milvus Lite (its FAISS
    segments have no HNSW worth the build time here), HNSW on a server. Our face-like
    vectors need wide probes for recall@10 >= 0.99 (benchmarks/search_scale.md), hence the
    generous nprobe and ef. GPU_CAGRA or IVF_PQ on servers: ask with `?index=` (docs/scale.md).
    """
    kind = requested
    if kind == "auto":
        kind = "FLAT" if n <= FLAT_MAX else ("IVF_FLAT" if lite else "HNSW")
    nlist = int(min(65536, max(64, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1))))))))
    if kind == "FLAT":
        return kind, {}, {}
    if kind in ("IVF_FLAT", "IVF_SQ8"):
        return kind, {"nlist": nlist}, {"nprobe": max(32, nlist // 4)}
    if kind == "IVF_PQ":  # 4 dims per 8-bit sub-quantiser: 128 B a 512-d face
        return kind, {"nlist": nlist, "m": 128, "nbits": 8}, {"nprobe": max(32, nlist // 4)}
    if kind == "HNSW":
        return kind, {"M": 32, "efConstruction": 256}, {"ef": 512}
    if kind == "GPU_CAGRA":
        return (
            kind,
            {"intermediate_graph_degree": 64, "graph_degree": 32},
            {"itopk_size": 256, "search_width": 4},
        )
    if kind == "GPU_IVF_PQ":
        return kind, {"nlist": nlist, "m": 128, "nbits": 8}, {"nprobe": max(32, nlist // 4)}
    raise ValueError(f"unknown Milvus index type {kind!r}")


def _literal(value: str) -> str:
    """A string as a Milvus expression literal (double quotes, backslash escapes)."""
    return json.dumps(value, ensure_ascii=False)


def filter_expression(filters: Mapping[str, Any], partition_key: str | None = None) -> str | None:
    """Engine filters as a Milvus boolean expression; None where a value has no literal form.

    `identity` compares the identity field; any other key a member of the `meta` JSON field,
    with the value's own type, as the metadata store compares them. A filter on the partition
    key also names the partition field, so Milvus searches only that tenant's partitions.
    """
    parts = []
    for key, value in filters.items():
        if key == "identity":
            parts.append(f"identity == {_literal(str(value))}")
            continue
        member = f"meta[{_literal(str(key))}]"
        if isinstance(value, bool):
            parts.append(f"{member} == {'true' if value else 'false'}")
        elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
            parts.append(f"{member} == {value!r}")
        elif isinstance(value, str):
            if key == partition_key:
                parts.append(f"{PARTITION_FIELD} == {_literal(value)}")
            parts.append(f"{member} == {_literal(value)}")
        else:
            return None
    return " and ".join(parts)


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as e:
        raise MissingDependency(
            "Milvus vectors need pymilvus (and milvus-lite for milvus-lite://): "
            "pip install 'tgfr-search[milvus]'"
        ) from e
    return pymilvus


_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}


def _lite_acquire(path: str) -> str:
    """The in-process Milvus Lite server for a data directory (one per path, reference-counted)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError as e:
        raise MissingDependency(
            "milvus-lite:// needs Milvus Lite: pip install 'tgfr-search[milvus]'"
        ) from e
    with _lite_lock:
        uri = server_manager_instance.start_and_get_uri(path)
        if uri is None:
            raise BackendUnavailable(
                f"Milvus Lite cannot open {path}: another process has it open "
                "(Milvus Lite is single-process; use a Milvus server for several)"
            )
        _lite_users[path] = _lite_users.get(path, 0) + 1
        return uri


def _lite_release(path: str) -> None:
    from milvus_lite.server_manager import server_manager_instance

    with _lite_lock:
        _lite_users[path] -= 1
        if _lite_users[path] == 0:
            del _lite_users[path]
            server_manager_instance.release_server(path)


class MilvusVectors:
    """A connection to Milvus (server or Lite) that hands out one `MilvusSpace` per space."""

    def __init__(self, config: VectorsConfig) -> None:
        pymilvus = _pymilvus()
        self.config = config
        self.lite = config.kind == "milvus-lite"
        if self.lite:
            os.makedirs(config.target, mode=0o700, exist_ok=True)
            uri = _lite_acquire(config.target)
            kw: dict[str, Any] = {}
        else:
            uri = config.target
            kw = {"token": os.environ.get(TOKEN_ENV, "")}
        try:
            self.client = pymilvus.MilvusClient(uri=uri, db_name=config.db, **kw)
        except pymilvus.exceptions.MilvusException as e:
            if self.lite:
                _lite_release(config.target)
            raise BackendUnavailable(f"cannot reach Milvus at {config.uri}: {e.message}") from e
        except BaseException:
            if self.lite:
                _lite_release(config.target)
            raise
        self._closed = False

    def space(
        self,
        source: VectorSource,
        space: str,
        dim: int,
        repair: Callable[[], contextlib.AbstractContextManager[bool]],
    ) -> MilvusSpace:
        return MilvusSpace(self, source, space, dim, repair)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()
        if self.lite:
            _lite_release(self.config.target)


@dataclass
class _State:
    physical: str
    generation: int
    count: int
    dim: int
    index: str | None


class MilvusSpace:
    """One vector space as a Milvus collection, caught up with the store by generation."""

    def __init__(
        self,
        vectors: MilvusVectors,
        source: VectorSource,
        space: str,
        dim: int,
        repair: Callable[[], contextlib.AbstractContextManager[bool]],
    ) -> None:
        self.vectors, self.source, self.space, self.dim = vectors, source, space, dim
        self.client = vectors.client
        self.config = vectors.config
        self.name = f"{self.config.prefix}_{space}"
        self._repair = repair
        self.generation = -1
        self.count = 0
        self.index_type: str | None = None
        self.rebuilt_because: str | None = None
        self._checked = False  # the collection's row count was compared with its record
        self._loaded = False
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self.count

    # -- state -------------------------------------------------------------------------------
    def _state(self) -> _State | None:
        if not self.client.has_collection(self.name):
            return None
        desc = self.client.describe_collection(self.name)
        props = desc.get("properties") or {}
        dim = next(
            int(f.get("params", {}).get("dim", 0)) for f in desc["fields"] if f["name"] == "vector"
        )
        indexes = self.client.list_indexes(self.name)
        index = None
        if indexes:
            index = self.client.describe_index(self.name, indexes[0]).get("index_type")
        return _State(
            physical=desc["collection_name"],
            generation=int(props.get(GENERATION_PROP, -1)),
            count=int(props.get(COUNT_PROP, 0)),
            dim=dim,
            index=index,
        )

    def _rows_in(self, collection: str) -> int:
        res = self.client.query(
            collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(res[0]["count(*)"])

    def _record(self, collection: str, generation: int, count: int) -> None:
        self.client.alter_collection_properties(
            collection, properties={GENERATION_PROP: str(generation), COUNT_PROP: str(count)}
        )
        self.generation, self.count = generation, count

    # -- the VectorSpace interface -------------------------------------------------------------
    def sync(self) -> MilvusSpace:
        """Catch up with the store: nothing to do, add later faces, or rebuild."""
        with self._lock:
            gen = self.source.generation()
            if gen == self.generation:
                return self
            state = self._state()
            if state is not None and self._current(state, gen):
                self.generation, self.count, self.index_type = gen, state.count, state.index
                return self
            with self._repair() as allowed:
                if allowed:
                    self._catch_up(gen)
                elif state is not None:
                    # A live writer holds the lock and publishes each batch as it commits it.
                    self._load()
                    self.count, self.index_type = state.count, state.index
            return self

    def _current(self, state: _State, gen: int) -> bool:
        if state.generation != gen or state.dim != self.dim:
            return False
        if not self._checked:
            self._load()
            self._checked = self._rows_in(self.name) == state.count
        return self._checked

    def _load(self) -> None:
        """Load the collection into memory (a no-op where it is loaded; Lite forgets on exit)."""
        if not self._loaded:
            self.client.load_collection(self.name)
            self._loaded = True

    def _catch_up(self, gen: int) -> None:
        state = self._state()  # again, under the lock: another process may have repaired it
        deleted_at = int(self.source.get(DELETE_GENERATION, 0))
        if state is None:
            if gen > 0:
                self.rebuilt_because = (
                    f"Milvus collection {self.name} missing; rebuilt from the database"
                )
            self._rebuild(gen, None)
            return
        if state.dim != self.dim or state.generation < deleted_at:
            self._rebuild(gen, state)  # deletes or a reindex since it was written: expected
            return
        self._load()
        if state.generation > gen or (
            not self._checked and self._rows_in(self.name) != state.count
        ):
            self.rebuilt_because = (
                f"Milvus collection {self.name} disagrees with the database "
                f"(generation {state.generation} vs {gen}); rebuilt from the database"
            )
            self._rebuild(gen, state)
            return
        self._checked = True
        if state.generation < gen:
            for ids, vecs, idents, metas in self.source.iter_rows(
                self.space, dim=self.dim, after=state.generation, up_to=gen, batch=INSERT_BATCH
            ):
                # Upsert: rows of a batch whose insert landed before a crash are rewritten.
                self.client.upsert(self.name, self._rows(ids, vecs, idents, metas))
            self._flush(self.name)
            count = self._rows_in(self.name)
            self._reindex(state.physical, count, state.index)
            self._record(state.physical, gen, count)
        else:
            self.generation, self.count, self.index_type = gen, state.count, state.index

    def _rows(
        self, ids: np.ndarray, vecs: np.ndarray, idents: list[str], metas: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        key = self.config.partition_key
        rows = []
        for i, v, who, meta in zip(ids, vecs, idents, metas):
            row: dict[str, Any] = {"id": int(i), "vector": v, "identity": who, "meta": meta}
            if key is not None:
                row[PARTITION_FIELD] = str(meta.get(key, ""))[:1024]
            rows.append(row)
        return rows

    def _schema(self) -> Any:
        pymilvus = _pymilvus()
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("identity", pymilvus.DataType.VARCHAR, max_length=65535)
        schema.add_field("meta", pymilvus.DataType.JSON)
        if self.config.partition_key is not None:
            schema.add_field(
                PARTITION_FIELD, pymilvus.DataType.VARCHAR, max_length=1024, is_partition_key=True
            )
        return schema

    def _index_params(self, kind: str, params: dict[str, Any]) -> Any:
        ip = self.client.prepare_index_params()
        ip.add_index(field_name="vector", index_type=kind, metric_type="IP", params=params)
        return ip

    def _rebuild(self, gen: int, old: _State | None) -> None:
        """Fill a new collection from the store, index and load it, then move the alias to it."""
        physical = f"{self.name}__{secrets.token_hex(4)}"
        self.client.create_collection(
            physical, schema=self._schema(), consistency_level=self.config.consistency
        )
        try:
            count = 0
            for ids, vecs, idents, metas in self.source.iter_rows(
                self.space, dim=self.dim, up_to=gen, batch=INSERT_BATCH
            ):
                self.client.insert(physical, self._rows(ids, vecs, idents, metas))
                count += len(ids)
            self._flush(physical)
            self._reindex(physical, count, None)
            self._record(physical, gen, count)
            if old is None:
                self.client.create_alias(physical, self.name)
            elif old.physical == self.name:  # a plain collection under our name, not an alias
                self.client.drop_collection(self.name)
                self.client.create_alias(physical, self.name)
            else:
                self.client.alter_alias(physical, self.name)
        except BaseException:
            self.client.drop_collection(physical)
            raise
        # The old collection, and any left by a writer killed mid-rebuild, are no longer needed.
        for name in self.client.list_collections():
            if name.startswith(f"{self.name}__") and name != physical:
                self.client.drop_collection(name)
        self._checked = True

    def _reindex(self, collection: str, count: int, current: str | None) -> None:
        """Give the collection the index its size calls for, then load it."""
        want, params, _ = choose_index(count, lite=self.vectors.lite, requested=self.config.index)
        keep = current == want or (
            # hysteresis: an approximate index stays until the gallery halves below FLAT_MAX
            self.config.index == "auto" and current not in (None, "FLAT") and count > FLAT_MAX // 2
        )
        if not keep:
            if current is not None:
                self.client.release_collection(collection)
                self.client.drop_index(collection, "vector")
            self.client.create_index(collection, self._index_params(want, params))
            current = want
        self.client.load_collection(collection)
        self.index_type = current
        self._loaded = True

    def _flush(self, collection: str) -> None:
        # Milvus Lite searches unflushed rows by brute force in Python; a server seals segments
        # on its own schedule, and frequent flushes there only make small segments.
        if self.vectors.lite:
            self.client.flush(collection)

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = as_queries(queries)
        self.sync()
        if self.count == 0 or k < 1 or (subset is not None and len(subset) == 0):
            return empty_result(len(q))
        k = min(k, MAX_TOPK)
        expr = ""
        if subset is not None:
            filters = getattr(subset, "filters", None)
            found = filter_expression(filters, self.config.partition_key) if filters else None
            expr = found if found is not None else f"id in {[int(i) for i in subset]}"
        kind = self.index_type or "FLAT"
        _, _, params = choose_index(self.count, lite=self.vectors.lite, requested=kind)
        hits = self.client.search(
            self.name,
            data=q,
            limit=k,
            filter=expr,
            output_fields=["id"],
            search_params={"metric_type": "IP", "params": params},
            anns_field="vector",
        )
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for row, found_hits in enumerate(hits):
            for col, hit in enumerate(found_hits[:k]):
                scores[row, col] = hit["distance"]
                ids[row, col] = hit["id"]
        return scores, ids

    def ids(self) -> np.ndarray:
        """Every face id the collection holds (a full scan: for checks, not for serving)."""
        it = self.client.query_iterator(
            self.name, batch_size=4096, filter="", output_fields=["id"], consistency_level="Strong"
        )
        out: list[int] = []
        try:
            while batch := it.next():
                out.extend(int(r["id"]) for r in batch)
        finally:
            it.close()
        return np.array(sorted(out), dtype=np.int64)

    def committed(self) -> None:
        self.sync()

    def forget(self, ids: Sequence[int]) -> None:
        """Delete the rows in place when the collection was current just before the delete."""
        with self._lock:
            gen = self.source.generation()
            state = self._state()
            if state is None or state.generation != gen - 1 or state.dim != self.dim:
                return  # the next sync rebuilds it from the store
            if ids:
                self.client.delete(self.name, ids=[int(i) for i in ids])
                self._flush(self.name)
            self._record(state.physical, gen, self._rows_in(self.name))

    def save(self) -> None:
        self.sync()

    def close(self) -> None:
        pass


def open_vectors(uri: str) -> MilvusVectors | None:
    """The vector store a `vectors=` URI names; None for the engine's own faiss files."""
    config = parse_vectors_uri(uri)
    return None if config.kind == "faiss" else MilvusVectors(config)


__all__ = [
    "MilvusSpace",
    "MilvusVectors",
    "VectorsConfig",
    "choose_index",
    "filter_expression",
    "open_vectors",
    "parse_vectors_uri",
]
