"""The search engine: enroll faces, query and verify, over a store and per-space vector indexes."""

from __future__ import annotations

import csv
import functools
import gc
import itertools
import json
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from tgfr_search.audit import AuditLog
from tgfr_search.errors import (
    ImageError,
    LockTimeout,
    ModelFileError,
    ModelMismatch,
    ModeUnavailable,
    NoFaceFound,
    TGFRError,
)
from tgfr_search.images import Arena, Decoded, decode_all, load_image, use_arena
from tgfr_search.index import (
    VectorIndex,
    VectorSpace,
    build_index,
    load_index,
    needs_rebuild,
    open_vectors,
)
from tgfr_search.store import FaceInfo, NewFace, Store, sqlite_url
from tgfr_search.store.store import DELETE_GENERATION

DEFAULT_DB = "./tgfr-db"
MODES = ("auto", "image", "fused", "refine", "text")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
FACE = "face"
FUSED = "fused"
ALIGNED = "aligned"
CAPTION = "caption"
DEFAULT_FAR = 1e-3

ImageLike = Any  # a path, bytes, a PIL image or an RGB numpy array


@dataclass(frozen=True)
class Match:
    """One search result: an identity, the face that matched best, and the scores."""

    rank: int
    identity: str
    face_id: int
    score: float
    source: str | None
    caption: str | None
    scores: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    decision: bool | None = None
    """Whether `score` clears the mode's threshold at the requested FAR (None: uncalibrated)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Quality:
    """What the engine can tell about a probe face's quality."""

    detector_score: float | None
    size: float
    """The face box's longer side in pixels of the original image."""
    blur: float
    """Variance of the Laplacian of the aligned crop: lower is blurrier."""
    norm: float | None = None
    """ArcFace's pre-normalisation norm, which falls with blur and low resolution."""


@dataclass
class Probe:
    crop: np.ndarray
    faces: int
    quality: Quality


def blur(crop: np.ndarray) -> float:
    """Variance of the Laplacian of a face crop, a standard sharpness estimate."""
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


class Matches(list[Match]):
    """The ranked results of one query, with what the engine did to get them."""

    def __init__(
        self,
        items: Iterable[Match] = (),
        *,
        mode: str,
        faces_found: int,
        quality: Quality | None = None,
        threshold: float | None = None,
        probe_crop: np.ndarray | None = None,
    ) -> None:
        super().__init__(items)
        self.mode = mode
        self.faces_found = faces_found
        self.quality = quality
        self.threshold = threshold
        self.probe_crop = probe_crop
        """The aligned face the search used (BGR), for display."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "faces_found": self.faces_found,
            "quality": None if self.quality is None else asdict(self.quality),
            "threshold": self.threshold,
            "results": [m.to_dict() for m in self],
        }


@dataclass
class EnrollItem:
    """One image to enroll and what is known about it."""

    image: ImageLike
    identity: str
    caption: str | None = None
    metadata: dict[str, Any] | None = None
    source: str | None = None


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass
class EnrollReport:
    """What an enrollment did: faces added, duplicates passed over, files skipped and why."""

    face_ids: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    multi_face: list[tuple[str, int]] = field(default_factory=list)
    images: int = 0

    @property
    def enrolled(self) -> int:
        return len(self.face_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "enrolled": self.enrolled,
            "duplicates": len(self.duplicates),
            "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped],
            "multiple_faces": [{"source": s, "faces": n} for s, n in self.multi_face],
        }


@dataclass(frozen=True)
class Verification:
    score: float
    faces_found: tuple[int, int]
    threshold: float | None = None
    decision: bool | None = None
    mode: str = "image"


@dataclass
class _Decoded:
    item: EnrollItem
    source: str
    image: np.ndarray | None = None
    digest: str = ""
    error: str | None = None
    data: bytes | None = None  # the file's bytes, when it is small enough to store as the crop


def _source_of(item: EnrollItem) -> str:
    if item.source is not None:
        return item.source
    if isinstance(item.image, (str, os.PathLike)):
        return str(item.image)
    return "<memory>"


# A decoding task: its items, their results to come, and the arena slot of the first one.
_Task = tuple[list[EnrollItem], Future[list[Decoded]], int | None]


def _decode_batch(
    chunk: list[EnrollItem],
    keep: int,
    threads: Executor,
    workers: int,
    processes: Executor | None,
    slots: int,
) -> list[_Task]:
    """Tasks decoding one batch: files and bytes in `processes` (their pixels into the arena
    slots from `slots` on) where there are some, the rest in `threads`."""
    # Each finished task costs the thread receiving it the GIL, which the thread feeding the
    # GPU holds for up to 5 ms at a time: one task per process and batch; a few dozen images
    # per thread task.
    if processes is not None:
        step = max(1, -(-len(chunk) // workers))
    else:
        step = max(1, min(64, -(-len(chunk) // (2 * workers))))
    tasks: list[_Task] = []
    for i in range(0, len(chunk), step):
        part = chunk[i : i + step]
        jobs = [(it.image, _source_of(it)) for it in part]
        if processes is not None and all(
            isinstance(src, (str, os.PathLike, bytes)) for src, _ in jobs
        ):
            tasks.append((part, processes.submit(decode_all, jobs, keep, slots + i), slots + i))
        else:
            tasks.append((part, threads.submit(decode_all, jobs, keep), None))
    return tasks


def _collect(pending: list[_Task], arena: Arena | None) -> list[_Decoded]:
    """The decoded images of a batch, in order, from its decoding tasks (views of the `arena`
    slots where the workers put the pixels)."""
    decoded: list[_Decoded] = []
    for part, task, first_slot in pending:
        results = task.result()
        views: list[np.ndarray] = []
        if first_slot is not None:
            assert arena is not None
            shapes = [r.image if isinstance(r.image, tuple) else (0,) for r in results]
            views = arena.images(first_slot, shapes)
        for k, (item, (image, digest, error, data)) in enumerate(zip(part, results)):
            if isinstance(image, tuple):  # the pixels are in the arena
                image = views[k]
            decoded.append(_Decoded(item, _source_of(item), image, digest, error, data))
    return decoded


def _wait_for(
    writing: tuple[Future[None], int] | None, progress: Callable[[int], None] | None
) -> None:
    """Wait for the batch being committed (raising what it raised), then report it."""
    if writing is not None:
        writing[0].result()
        if progress:
            progress(writing[1])


_paused_lock = threading.Lock()
_paused_runs = 0


@contextmanager
def _young_collections_only() -> Iterator[None]:
    """Hold off the garbage collector's automatic passes while bulk enrollment runs.

    The caller collects the young generations once per batch (`gc.collect(1)`), so the cycles
    a batch leaves behind (sessions, futures) still go; the full passes, which walk every
    object of the process (the models, the caller's data), wait until the run ends. After the
    decoding processes are forked, such a pass writes to pages the parent shares with them:
    on an H100 host two passes a run each stalled every thread for 0.35-0.5 s (37,694 page
    copies in one). Nested and concurrent runs share one pause; a collector already turned off
    by the caller stays off.
    """
    global _paused_runs
    with _paused_lock:
        ours = _paused_runs > 0 or gc.isenabled()
        if ours:
            gc.disable()
            _paused_runs += 1
    if not ours:
        yield
        return
    try:
        yield
    finally:
        with _paused_lock:
            _paused_runs -= 1
            if _paused_runs == 0:
                gc.enable()


# GPU enrollment's first batches are 1/8, 1/4 and 1/2 of the batch size: the writer starts
# after a small batch, not after a whole one has been decoded and embedded.
_RAMP = 3


def _chunks(items: Iterable[EnrollItem], size: int, ramp: int = 0) -> Iterator[list[EnrollItem]]:
    """Batches of `size` items, the first `ramp` of them 2**ramp, ..., 2 times smaller."""
    chunk: list[EnrollItem] = []
    want = max(1, size >> ramp)
    for item in items:
        chunk.append(item)
        if len(chunk) == want:
            yield chunk
            chunk, want = [], min(size, 2 * want)
    if chunk:
        yield chunk


def _check_aligned(image: np.ndarray, src: str) -> np.ndarray:
    if image.shape[:2] != (112, 112):
        raise ImageError(
            f"{src}: an aligned face must be 112x112, got {image.shape[1]}x{image.shape[0]}"
        )
    return image


# An aligned file up to this size is stored as it came (a 112x112 PNG is ~25 KB); a larger
# one (metadata, odd formats) is stored as a PNG of its pixels.
_KEEP_FILE_BYTES = 64 * 1024


def _png(crop: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", crop)
    assert ok
    return buf.tobytes()


def _pngs(crops: Sequence[np.ndarray]) -> list[bytes]:
    return [_png(c) for c in crops]


def _workers() -> int:
    """Threads for decoding and PNG encoding (both release the GIL): usable cores, 2 to 8.

    More did not help: on a 16-core H200 host, 16 threads enrolled 2,614 aligned files/s and 8
    enrolled 3,400, the extra threads queueing for the GIL with the thread feeding the GPU.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    return max(2, min(8, cores))


def _overlaps(models: Any) -> bool:
    """Whether enrollment overlaps its stages: when the models run on a GPU."""
    return getattr(models.face, "device", "cpu") != "cpu"


class _Inline(Executor):
    """Runs each task at once in the caller: the CPU pipeline's stages, which must not overlap."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        done: Future[Any] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as e:  # raised again by result(), as from a pool
            done.set_exception(e)
        return done


def _decode_processes(workers: int, arena: Arena) -> Executor | None:
    """Worker processes for decoding files on a GPU host, or None where they cannot start.

    At GPU rates, decoding threads queued for the interpreter lock with the thread feeding the
    GPU and the writer, and pixels sent back through a pipe kept the receiving thread busy:
    the workers write pixels into the shared `arena` instead. They are forked, as PyTorch's
    data loaders are on Linux: a fork server or spawned workers would import the caller's
    script again (running any code it has outside an `if __name__ == "__main__":` guard) and
    take seconds to start. They run `decode_all` alone, never CUDA, and are forked before any
    decoding thread runs.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    try:
        return ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=use_arena,
            initargs=(arena,),
        )
    except (OSError, ValueError):  # no semaphores here
        return None


class _Decoders:
    """Decoding processes and the arena they write pixels into: `slots` crop-sized slots."""

    def __init__(self, workers: int, slots: int) -> None:
        self.workers, self.slots = workers, slots
        self.arena = Arena(slots, 112 * 112 * 3)
        self.pool = _decode_processes(workers, self.arena)

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


_spare_lock = threading.Lock()
_spare: _Decoders | None = None  # the decoders a finished run left for the process's next one


def _drop_spare() -> None:
    """Shut down the decoders a run left (for tests that patch what a new fork decodes with)."""
    global _spare
    with _spare_lock:
        mine, _spare = _spare, None
    if mine is not None:
        mine.shutdown()


@contextmanager
def _decoders(workers: int, slots: int) -> Iterator[_Decoders]:
    """Decoding processes for one bulk run on a GPU host: those the process's last run left, or
    new ones. `pool` is None where processes cannot start.

    Forking them from a process that holds the models took ~0.4 s of each run on an H100 host,
    so a run that ends normally leaves them, its arena's pages given back, for the next run of
    any engine in the process (as the models are shared); a run while another holds them forks
    its own. A run that fails shuts its processes down: one may have died, or still be writing.
    """
    global _spare
    with _spare_lock:
        mine, _spare = _spare, None
    if mine is not None and (mine.workers != workers or mine.slots < slots):
        mine.shutdown()
        mine = None
    mine = mine or _Decoders(workers, slots)
    try:
        yield mine
    except BaseException:
        mine.shutdown()
        raise
    if mine.pool is None:
        return
    mine.arena.release()
    with _spare_lock:
        mine, _spare = _spare, mine
    if mine is not None:  # another run finished meanwhile: keep one set
        mine.shutdown()


@dataclass
class _Staged:
    """A batch on its way to the store: faces and crops, then its vectors, then its PNG crops."""

    faces: list[NewFace]
    crops: list[np.ndarray]
    todo: list[int]  # the faces whose crops `pngs` encode, in order
    pngs: list[Future[list[bytes]]]
    vectors: Callable[[], dict[str, np.ndarray]] | None = None
    """The batch's float16 vectors by space, maybe still on their way back from the GPU."""


def _half(vectors: np.ndarray) -> np.ndarray:
    """float32 vectors as the store's float16 (torch converts them ~5x faster than numpy)."""
    import torch

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    return torch.from_numpy(x).half().numpy()


class _SpaceIndex:
    """One vector space's index: a cache of the store's vectors, caught up or rebuilt on demand."""

    def __init__(
        self,
        store: Store,
        directory: Path,
        space: str,
        dim: int,
        query_generation: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.store, self.space, self.dim = store, space, dim
        self.query_generation = query_generation
        """The generation the query running on this thread read as it began, else None."""
        self.path = directory / f"index-{space}.faiss"
        self.meta_path = directory / f"index-{space}.json"
        self.index: VectorIndex | None = None
        self.generation = -1
        self.rebuilt_because: str | None = None
        # Searches and catch-ups of one engine may come from many threads.
        self._lock = threading.RLock()

    def _load(self) -> None:
        missing = [p.name for p in (self.path, self.meta_path) if not p.exists()]
        if missing:
            if self.store.generation() > 0:
                self.rebuilt_because = f"index file {missing[0]} missing; rebuilt from the database"
            return
        try:
            meta = json.loads(self.meta_path.read_text())
            generation, count = int(meta["generation"]), int(meta["count"])
            index = load_index(self.path)
            if index.dim != self.dim or len(index) != count:
                raise ValueError("size mismatch")
        except (ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.rebuilt_because = (
                f"index file {self.path.name} unreadable ({why}); rebuilt from the database"
            )
            return
        self.index, self.generation = index, generation

    def sync(self) -> VectorIndex:
        """Bring the index up to the store's generation: add new faces, or rebuild after deletes."""
        with self._lock:
            return self._sync()

    def search(
        self, queries: np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._sync().search(queries, k, subset)

    def _sync(self) -> VectorIndex:
        if self.index is None and self.generation < 0:
            self._load()
        if self.index is not None and self.query_generation() == self.generation:
            return self.index  # as the query found the store: nothing to read
        gen = self.store.generation()
        if self.index is not None and gen == self.generation:
            return self.index
        deleted_at = int(self.store.get(DELETE_GENERATION, 0))
        if self.index is None or self.generation < deleted_at or self.generation > gen:
            self._rebuild(gen)
        else:
            ids, vecs = self.store.vectors(
                self.space, dim=self.dim, after=self.generation, up_to=gen
            )
            self.index.add(ids, vecs)
            # The right kind of index changes with size (flat, then approximate).
            if needs_rebuild(self.index) is not None:
                self._rebuild(gen)
        self.generation = gen
        assert self.index is not None
        return self.index

    def extend(self, generation: int, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Add the faces just committed as `generation` without reading them back.

        Only when the index holds exactly the generation before (the caller holds the write
        lock); otherwise the next sync catches up from the store, as always.
        """
        with self._lock:
            if self.index is None or self.generation != generation - 1:
                return
            self.index.add(np.asarray(ids, dtype=np.int64), vectors)
            self.generation = generation
            if needs_rebuild(self.index) is not None:
                self._rebuild(generation)

    def _rebuild(self, generation: int) -> None:
        ids, vecs = self.store.vectors(self.space, dim=self.dim, up_to=generation)
        self.index = build_index(self.dim, ids, vecs)

    def committed(self) -> None:
        """Nothing to publish: other processes catch up from the store on their own."""

    def forget(self, ids: Sequence[int]) -> None:
        """Nothing to do now: the next sync sees the delete generation and rebuilds."""

    def close(self) -> None:
        pass

    def save(self) -> None:
        """Write the index, then the sidecar naming the generation it holds (both atomic)."""
        with self._lock:
            index = self._sync()
            for stale in self.path.parent.glob(f"{self.path.name}*.tmp"):
                stale.unlink(missing_ok=True)  # left by a writer killed mid-save
            index.save(self.path)
            tmp = self.meta_path.with_suffix(".json.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"generation": self.generation, "count": len(index)}, f)
            os.replace(tmp, self.meta_path)


@functools.lru_cache(maxsize=4)
def _load_models(name: str, model_dir: str | None, device: str = "auto") -> Any:
    """Models are shared by every engine of a process: sessions are thread-safe and costly."""
    from tgfr_search.models import load_models

    return load_models(name, model_dir=model_dir, device=device)


@functools.lru_cache(maxsize=4)
def _load_tgfr(name: str, model_dir: str | None, device: str, checkpoint: str) -> Any:
    from tgfr_search.models.fusion import TGFRRuntime

    models = _load_models(name, model_dir, device)
    return TGFRRuntime(checkpoint, models.face, models.text, device=device)


class SearchEngine:
    """An embedded face search engine stored in one directory.

    Example:
        with SearchEngine("./faces") as engine:
            engine.enroll("alice_1.jpg", identity="alice", caption="young woman with red hair")
            for m in engine.query("cam7_frame.jpg", k=5):
                print(m.rank, m.identity, m.score)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_DB,
        *,
        models: str = "vectron",
        model_dir: str | os.PathLike[str] | None = None,
        tgfr: str | os.PathLike[str] | None = "default",
        lock_timeout: float = 60.0,
        check_models: bool = True,
        device: str = "auto",
        vectors: str = "faiss",
        metadata: str | None = None,
    ) -> None:
        """Open (or create) an engine.

        `vectors` says where vectors are searched: `faiss` (files in the engine directory),
        `milvus-lite:///ABSOLUTE/PATH` or `http(s)://host:19530` (Milvus; token from
        $TGFR_MILVUS_TOKEN). `metadata` is a SQLAlchemy URL for the source-of-truth database
        (e.g. `postgresql+psycopg://user@host/db`); the default is `metadata.db` (SQLite) in
        the engine directory, which keeps the write lock and the audit log in any case.
        """
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = FileLock(str(self.path / "write.lock"), timeout=lock_timeout)
        # Only creating or upgrading the schema takes the write lock: readers open at once.
        url = metadata if metadata is not None else sqlite_url(self.path / "metadata.db")
        self.store = Store(url, migration_lock=self._write_lock)
        try:
            self._vectors = open_vectors(vectors)
        except BaseException:
            self.store.close()
            raise
        self._models_spec = (models, None if model_dir is None else str(model_dir), device)
        self._tgfr_spec = tgfr
        self._models: Any = None
        self._tgfr: Any = None
        self._tgfr_problem: str | None = None
        self._check_models = check_models
        self._indexes: dict[str, VectorSpace] = {}
        self._captioned: tuple[int, float] | None = None  # (generation, caption_fraction)
        self._query = threading.local()  # .generation: the running query's read (one_generation)
        self.audit = AuditLog(self.path / "audit.log")

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        if self._vectors is not None:
            self._vectors.close()
        self.store.close()

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """One writer at a time across threads and processes; readers never wait."""
        try:
            self._lock.acquire()
        except FileLockTimeout as e:
            raise LockTimeout(
                f"another process is writing to {self.path} (waited {self._lock.timeout:g}s); "
                "try again when it finishes"
            ) from e
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _try_write_lock(self) -> Iterator[bool]:
        """The write lock if it is free now (True), else False: no writer is waited for."""
        try:
            self._lock.acquire(timeout=0)
        except FileLockTimeout:
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()

    def _mismatch(self, what: str, stored: str, loaded: str) -> ModelMismatch:
        return ModelMismatch(
            f"the {what} vectors in {self.path} were made by {stored}, but the loaded model is "
            f"{loaded}; run `tgfr-search --db {self.path} reindex` to re-embed the stored faces"
        )

    @property
    def models(self) -> Any:
        """The detector, face encoder and text encoder, loaded on first use."""
        if self._models is None:
            models = _load_models(*self._models_spec)
            stored = self.store.get(f"fingerprint:{FACE}")
            if stored is None:
                self.store.set(f"fingerprint:{FACE}", models.face.fingerprint)
                self.store.set(f"dim:{FACE}", models.face.dim)
            elif stored != models.face.fingerprint and self._check_models:
                raise self._mismatch("face", stored, models.face.fingerprint)
            self._models = models
        return self._models

    @property
    def tgfr(self) -> Any:
        """The TGFR runtime (fused and aligned spaces), or None when there is none to load."""
        if self._tgfr is None and self._tgfr_problem is None:
            from tgfr_search.models.fusion import default_checkpoint

            spec = self._tgfr_spec
            checkpoint = default_checkpoint() if spec == "default" else spec
            if checkpoint is None:
                self._tgfr_problem = "no TGFR model is loaded"
                return None
            models = self.models
            try:
                runtime = _load_tgfr(*self._models_spec, str(checkpoint))
            except (ModelFileError, ValueError) as e:
                if spec != "default":
                    raise
                # The shipped checkpoint fits only the face model it was trained on.
                self._tgfr_problem = f"the shipped TGFR model does not fit these models ({e})"
                return None
            stored = self.store.get("fingerprint:tgfr")
            faces = self.store.counts()[0]
            if stored is None and faces == 0:
                self.store.set("fingerprint:tgfr", runtime.fingerprint)
                for space, dim in runtime.dims.items():
                    self.store.set(f"dim:{space}", dim)
            elif stored != runtime.fingerprint and self._check_models:
                raise self._mismatch(
                    "fused", stored or f"no TGFR model ({faces} faces)", runtime.fingerprint
                )
            del models
            self._tgfr = runtime
        return self._tgfr

    def _need_tgfr(self, mode: str) -> Any:
        runtime = self.tgfr
        if runtime is None:
            raise ModeUnavailable(f"mode {mode!r} needs the TGFR model: {self._tgfr_problem}")
        return runtime

    def _index(self, space: str = FACE) -> VectorSpace:
        if space not in self._indexes:
            dim = self.store.get(f"dim:{space}")
            if dim is None:
                dim = self.models.face.dim if space == FACE else self._need_tgfr(space).dims[space]
            self._indexes[space] = (
                _SpaceIndex(self.store, self.path, space, int(dim), self._query_generation)
                if self._vectors is None
                else self._vectors.space(self.store, space, int(dim), self._try_write_lock)
            )
        return self._indexes[space]

    def _spaces(self) -> list[str]:
        """The vector spaces this engine's store holds."""
        spaces = (FACE, FUSED, ALIGNED, CAPTION)
        return [s for s in spaces if self.store.get(f"dim:{s}") is not None]

    @property
    def warnings(self) -> list[str]:
        """Things the engine repaired on its own (e.g. a corrupt index file rebuilt)."""
        return [i.rebuilt_because for i in self._indexes.values() if i.rebuilt_because]

    # -- enrollment -------------------------------------------------------------------------
    def enroll(
        self,
        image: ImageLike,
        *,
        identity: str,
        caption: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        aligned: bool = False,
        all_faces: bool = False,
    ) -> list[int]:
        """Enroll one image; returns the new face ids ([] when it was already enrolled)."""
        report = self.enroll_many(
            [EnrollItem(image, identity, caption, dict(metadata or {}))],
            aligned=aligned,
            all_faces=all_faces,
        )
        if report.skipped:
            reason = report.skipped[0].reason
            raise (NoFaceFound if reason.startswith("no face") else ImageError)(reason)
        return report.face_ids

    def enroll_many(
        self,
        items: Iterable[EnrollItem],
        *,
        aligned: bool = False,
        all_faces: bool = False,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> EnrollReport:
        """Enroll images in batches: decode ahead, detect, embed, commit per batch.

        On a GPU three batches are in flight: the next one is decoded (files in worker
        processes), this one is checked for duplicates (or detected) and embedded in this
        thread while a thread pool encodes its PNG crops, and the one before is committed by a
        writer thread. On a CPU the stages run one after the other, with decoding one batch
        ahead in two threads. Each batch is one transaction, and batches commit in order.
        """
        report = EnrollReport()
        _ = self.models, self.tgfr  # load and check the models before taking the lock
        # On a CPU the stages compete for the same cores (2 here): overlapping them made
        # enrollment slower, so only decoding runs ahead there.
        on_gpu = _overlaps(self.models)
        workers = _workers() if on_gpu else 2
        keep = _KEEP_FILE_BYTES if aligned else 0
        with ExitStack() as stack:
            stack.enter_context(self._write_lock())
            stack.enter_context(_young_collections_only())
            threads = stack.enter_context(ThreadPoolExecutor(workers, "tgfr-pool"))
            # PNG crops and commits: alongside the models on a GPU, one after them on a CPU.
            writer: Executor = _Inline()
            pngs: Executor = writer
            if on_gpu:
                stack.enter_context(self.store.checkpoints_aside())
                writer = stack.enter_context(ThreadPoolExecutor(1, "tgfr-writer"))
                pngs = threads
            chunks = _chunks(items, batch_size, _RAMP if on_gpu else 0)
            first, second = next(chunks, []), next(chunks, [])
            processes, arena = None, None
            if on_gpu and second:  # a run of one batch starts no processes
                # Crop-sized slots (larger images, raw photos, come back through the pipe) for
                # three batches: batch n's slots are written again by batch n + 3, after the
                # commit of n (and its PNG crops) is done.
                decoders = stack.enter_context(_decoders(workers, 3 * batch_size))
                processes, arena = decoders.pool, decoders.arena
            for space in self._spaces():  # read the saved indexes before this run adds faces
                self._index(space).sync()
            # On a GPU the next batch's captions are tokenised in the pool meanwhile.
            tokenize = getattr(self.tgfr, "tokenize", None) if on_gpu else None
            pending: list[_Task] = []
            tokens: Future[Any] | None = None
            writing: tuple[Future[None], int] | None = None
            staged: set[str] = set()  # digests of this run: a later copy is a duplicate
            try:
                for n, chunk in enumerate(itertools.chain([first, second], chunks, [[]])):
                    slots = n % 3 * batch_size  # the arena slots of batch n
                    nxt = _decode_batch(chunk, keep, threads, workers, processes, slots)
                    nxt_tokens = None
                    if tokenize is not None and chunk:
                        nxt_tokens = threads.submit(tokenize, [item.caption for item in chunk])
                    if pending:
                        decoded = _collect(pending, arena)
                        batch = self._prepare_batch(
                            decoded, report, aligned, all_faces, staged, pngs
                        )
                        self._embed_batch(batch, tokens.result() if tokens else None)
                        _wait_for(writing, progress)
                        writing = (writer.submit(self._commit_batch, batch, report), len(decoded))
                        gc.collect(1)  # the young generations alone (_young_collections_only)
                    pending, tokens = nxt, nxt_tokens
            except BrokenProcessPool:  # a decoder crashed (a hostile file?) and took its process
                where = _source_of(pending[0][0][0]) if pending else "the first batch"
                raise ImageError(
                    f"a decoding process died on one of the images from {where} on; "
                    "the batches before them are stored"
                ) from None
            _wait_for(writing, progress)
            self._save_indexes(threads if on_gpu else None)
        return report

    def _embed(
        self, crops: list[np.ndarray], captions: list[str | None]
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Vectors of every space this engine keeps, and the ArcFace norms when known."""
        runtime = self.tgfr
        if runtime is None:
            return {FACE: self.models.face.embed(crops)}, None
        return runtime.embed(crops, captions)

    def _save_indexes(self, pool: Executor | None = None) -> None:
        """Write each space's index file; in `pool`, side by side (their writes and fsyncs)."""
        indexes = [self._index(space) for space in self._spaces()]
        for done in [(pool or _Inline()).submit(index.save) for index in indexes]:
            done.result()

    def _prepare_batch(
        self,
        decoded: list[_Decoded],
        report: EnrollReport,
        aligned: bool,
        all_faces: bool,
        staged: set[str],
        pngs: Executor,
    ) -> _Staged | None:
        """Check for duplicates and detect (or check) one batch; `pngs` encodes its PNG crops."""
        report.images += len(decoded)
        seen = self.store.existing((d.digest, 0) for d in decoded if d.error is None)
        fresh: list[_Decoded] = []
        for d in decoded:
            if d.error is not None:
                report.skipped.append(Skipped(d.source, d.error))
            elif (d.digest, 0) in seen or d.digest in staged:
                report.duplicates.append(d.source)
            else:
                staged.add(d.digest)  # the same file again, in this batch or one not committed yet
                fresh.append(d)
        faces: list[NewFace] = []
        crops: list[np.ndarray] = []
        if aligned:
            for d in fresh:
                try:
                    assert d.image is not None
                    crops.append(_check_aligned(d.image, d.source))
                except ImageError as e:
                    report.skipped.append(Skipped(d.source, str(e)))
                    continue
                face = self._new_face(d, 0, 1, None)
                if d.data is not None:
                    face.crop = d.data  # a small aligned file: stored as it came
                faces.append(face)
        else:
            detections = self.models.detector.detect([d.image for d in fresh])
            from tgfr_search.models.detector import align

            for d, dets in zip(fresh, detections):
                if not dets:
                    report.skipped.append(Skipped(d.source, f"no face found in {d.source}"))
                    continue
                if len(dets) > 1:
                    report.multi_face.append((d.source, len(dets)))
                assert d.image is not None  # decoded without error
                for i, det in enumerate(dets if all_faces else dets[:1]):
                    crops.append(align(d.image, det.landmarks))
                    faces.append(self._new_face(d, i, len(dets), det))
        if not faces:
            return None
        todo = [i for i, f in enumerate(faces) if not f.crop]  # crops to store as PNG
        step = 64  # cv2 releases the GIL: in a pool, the crops encode while the models run
        futures = [
            pngs.submit(_pngs, [crops[j] for j in todo[i : i + step]])
            for i in range(0, len(todo), step)
        ]
        return _Staged(faces, crops, todo, futures)

    def _embed_batch(self, staged: _Staged | None, ready: Any = None) -> None:
        """The batch's vectors in every space this engine keeps; on a GPU, without waiting."""
        if staged is None:
            return
        staged.vectors = self._embed_later(staged.crops, [f.caption for f in staged.faces], ready)
        staged.crops = []

    def _embed_later(
        self, crops: list[np.ndarray], captions: list[str | None], ready: Any = None
    ) -> Callable[[], dict[str, np.ndarray]]:
        """`_embed`'s vectors as the store's float16; call the result to wait for them.

        `ready`: the captions tokenised ahead (`TGFRRuntime.tokenize`).
        """
        runtime = self.tgfr
        if runtime is not None:
            return runtime.embed_later(crops, captions, ready)
        vectors = {FACE: _half(self.models.face.embed(crops))}
        return lambda: vectors

    def _commit_batch(self, staged: _Staged | None, report: EnrollReport) -> None:
        """One transaction for an embedded batch; its vectors go straight into the indexes."""
        if staged is None:
            return
        faces = staged.faces
        for j, png in zip(
            staged.todo, itertools.chain.from_iterable(p.result() for p in staged.pngs)
        ):
            faces[j].crop = png
        # float16, as the store keeps them: the indexes get what a rebuild would read back.
        assert staged.vectors is not None
        stored = staged.vectors()
        for i, f in enumerate(faces):
            f.vectors = {space: v[i] for space, v in stored.items()}
        ids = self.store.add_faces(faces)
        # Ours unless another writer committed since: extend() then declines and sync catches up.
        generation = self.store.generation()
        for space, vectors in stored.items():
            index = self._index(space)
            extend = getattr(index, "extend", None)  # the faiss-file spaces have it
            if extend is not None:
                extend(generation, ids, vectors)
            index.committed()
        report.face_ids.extend(ids)
        self.audit.record("enroll", face_ids=ids, identities=sorted({f.identity for f in faces}))

    @staticmethod
    def _new_face(d: _Decoded, i: int, n: int, det: Any) -> NewFace:
        return NewFace(
            identity=d.item.identity,
            content_hash=d.digest,
            crop=b"",
            vectors={},
            source=d.source,
            face_index=i,
            n_faces=n,
            box=None if det is None else [round(float(v), 2) for v in det.box],
            det_score=None if det is None else float(det.score),
            caption=d.item.caption,
            meta=dict(d.item.metadata or {}),
        )

    def enroll_folder(
        self,
        folder: str | os.PathLike[str],
        *,
        captions: str | os.PathLike[str] | None = None,
        aligned: bool = False,
        all_faces: bool = False,
        metadata: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> EnrollReport:
        """Enroll `folder/<identity>/<image>` files, captions from sidecars or a captions file."""
        items, problems = scan_gallery(folder, captions=captions, metadata=metadata)
        report = self.enroll_many(
            items, aligned=aligned, all_faces=all_faces, batch_size=batch_size, progress=progress
        )
        report.skipped[:0] = problems
        return report

    # -- search -----------------------------------------------------------------------------
    def _probes(self, images: Sequence[ImageLike], aligned: bool) -> list[Probe | TGFRError]:
        """Each probe's most prominent aligned face with its quality, or why there is none."""
        from tgfr_search.models.detector import align

        sources = [_source_of(EnrollItem(im, "")) for im in images]

        def decode(i: int) -> np.ndarray | TGFRError:
            try:
                return load_image(images[i], name=sources[i])
            except TGFRError as e:
                return e

        if len(images) == 1:  # a pool's thread costs 2-3 ms of a one-probe query
            decoded = [decode(0)]
        else:
            with ThreadPoolExecutor(max_workers=2) as pool:
                decoded = list(pool.map(decode, range(len(images))))
        out: list[Probe | TGFRError] = list(decoded)  # type: ignore[arg-type]
        todo = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        if aligned:
            for i in todo:
                try:
                    crop = _check_aligned(decoded[i], sources[i])  # type: ignore[arg-type]
                    out[i] = Probe(crop, 1, Quality(None, 112.0, blur(crop)))
                except ImageError as e:
                    out[i] = e
            return out
        detections = self.models.detector.detect([decoded[i] for i in todo]) if todo else []
        for i, dets in zip(todo, detections):
            if not dets:
                out[i] = NoFaceFound(f"no face found in {sources[i]}")
                continue
            det = dets[0]
            crop = align(decoded[i], det.landmarks)  # type: ignore[arg-type]
            size = float(max(det.box[2] - det.box[0], det.box[3] - det.box[1]))
            out[i] = Probe(crop, len(dets), Quality(float(det.score), size, blur(crop)))
        return out

    def _query_generation(self) -> int | None:
        return getattr(self._query, "generation", None)

    @contextmanager
    def _one_generation(self) -> Iterator[None]:
        """Read the store's generation once for a query (on this thread), for all its steps.

        A fused query asked three times (auto mode's caption share, the index's sync, its
        search), a settings read each, ~0.6 ms. An index at the generation read here is
        searched as it is; one behind or ahead of it is judged on a fresh read, as outside a
        query. The next query reads again, so it sees what another process wrote meanwhile.
        """
        if self._query_generation() is not None:
            yield  # nested: the outer read serves
            return
        self._query.generation = self.store.generation()
        try:
            yield
        finally:
            self._query.generation = None

    def _caption_fraction(self) -> float:
        """The share of faces with a caption (a scan of every face), again only after changes."""
        generation = self._query_generation()
        if generation is None:
            generation = self.store.generation()
        if self._captioned is None or self._captioned[0] != generation:
            self._captioned = (generation, self.store.caption_fraction())
        return self._captioned[1]

    def _resolve_mode(self, mode: str, image: Any, caption: str | None) -> str:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        has_caption = bool(caption and caption.strip())
        if mode == "auto":
            if image is None:
                mode = "text"
            elif not has_caption or self.tgfr is None:
                mode = "image"
            else:  # fused needs captioned gallery faces; refine serves caption-less galleries
                mode = "fused" if self._caption_fraction() >= 0.5 else "refine"
        if mode != "text" and image is None:
            raise ValueError(f"{mode} mode needs a probe image")
        if mode in ("text", "refine") and not has_caption:
            raise ValueError(f"{mode} mode needs a caption")
        return mode

    def query(
        self,
        image: ImageLike | None = None,
        *,
        caption: str | None = None,
        mode: str = "auto",
        k: int = 10,
        aligned: bool = False,
        filters: Mapping[str, Any] | None = None,
        far: float | None = None,
    ) -> Matches:
        """Rank enrolled identities against a probe and/or a description (best first).

        Modes: `image` (ArcFace), `fused` (face + caption through TGFR), `refine` (image
        candidates re-ranked with the caption-to-face score), `text` (description alone),
        `auto` (the best that the probe and the gallery allow). Each identity appears once,
        with its best-scoring face; `decision` is taken at the threshold for `far`.
        """
        result = self.query_batch(
            [image],
            captions=[caption],
            mode=mode,
            k=k,
            aligned=aligned,
            filters=filters,
            far=far,
        )[0]
        if isinstance(result, TGFRError):
            raise result
        return result

    def query_batch(
        self,
        images: Sequence[ImageLike | None],
        *,
        captions: Sequence[str | None] | None = None,
        mode: str = "auto",
        k: int = 10,
        aligned: bool = False,
        filters: Mapping[str, Any] | None = None,
        far: float | None = None,
    ) -> list[Matches | TGFRError]:
        """`query` for many probes at once: decoding, detection, encoders and search batched.

        A probe that cannot be searched (unreadable, no face) gets its error in its place.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        caps = list(captions) if captions is not None else [None] * len(images)
        if len(caps) != len(images):
            raise ValueError("give one caption (or None) per probe")
        with self._one_generation():
            modes = [self._resolve_mode(mode, im, c) for im, c in zip(images, caps)]
            subset = self.store.matching(filters) if filters else None
            with_image = [i for i, m in enumerate(modes) if m != "text"]
            probes: list[Probe | TGFRError | None] = [None] * len(images)
            for i, p in zip(with_image, self._probes([images[i] for i in with_image], aligned)):
                probes[i] = p
            results: list[Matches | TGFRError] = [
                p if isinstance(p, TGFRError) else Matches(mode=modes[i], faces_found=0)
                for i, p in enumerate(probes)
            ]
            for m in sorted(set(modes)):
                rows = [
                    i
                    for i in range(len(images))
                    if modes[i] == m and not isinstance(probes[i], TGFRError)
                ]
                if rows:
                    for i, ranked, extra in self._search(m, rows, probes, caps, k, subset):
                        results[i] = self._matches(ranked, m, probes[i], extra, far)  # type: ignore[arg-type]
        for i, r in enumerate(results):
            self.audit.record(
                "search",
                mode=modes[i],
                k=k,
                filters=dict(filters or {}),
                caption=caps[i],
                results=[x.identity for x in r] if isinstance(r, Matches) else None,
                error=str(r) if isinstance(r, TGFRError) else None,
            )
        return results

    def _search(
        self,
        mode: str,
        rows: list[int],
        probes: Sequence[Probe | TGFRError | None],
        captions: Sequence[str | None],
        k: int,
        subset: np.ndarray | None,
    ) -> Iterator[tuple[int, list[tuple[float, FaceInfo]], dict[str, np.ndarray]]]:
        """Search one mode's probes together; yields (row, ranked faces, probe vectors)."""
        crops = [] if mode == "text" else [probes[i].crop for i in rows]  # type: ignore[union-attr]
        caps = [captions[i] for i in rows]
        vecs: dict[str, np.ndarray] = {}
        runtime = self.tgfr if mode != "image" else None
        if mode == "image":
            vecs[FACE] = self.models.face.embed(crops)
        elif mode == "text":
            runtime = self._need_tgfr(mode)
        else:
            runtime = self._need_tgfr(mode)
            out, norms = runtime.embed(crops, caps)
            vecs.update(out)
            for i, n in zip(rows, norms):
                probes[i].quality.norm = float(n)  # type: ignore[union-attr]
        if runtime is not None and any(c and c.strip() for c in caps):
            vecs["text"] = runtime.caption_vectors([c or "" for c in caps])
        if mode == "image":
            ranked = self._ranked(self._index(FACE), vecs[FACE], k, subset)
        elif mode == "text":
            ranked = self._described(runtime, vecs["text"], k, subset)
        elif mode == "fused":
            ranked = self._ranked(self._index(FUSED), vecs[FUSED], k, subset)
        else:
            norms = np.array([probes[i].quality.norm for i in rows])  # type: ignore[union-attr]
            ranked = self._refined(runtime, vecs[FACE], vecs["text"], norms, k, subset)
        for n, i in enumerate(rows):
            yield i, ranked[n], {name: v[n] for name, v in vecs.items()}

    def _ranked(
        self, index: VectorSpace, vecs: np.ndarray, k: int, subset: np.ndarray | None
    ) -> list[list[tuple[float, FaceInfo]]]:
        """Per query row, the best face of each of the top-k identities, best first."""
        total = len(index.sync()) if subset is None else len(subset)
        want = min(total, 4 * k)
        out: list[list[tuple[float, FaceInfo]]] = [[] for _ in range(len(vecs))]
        todo = list(range(len(vecs)))
        while todo and want > 0:  # widen until k distinct identities, or everything was seen
            scores, ids = index.search(vecs[todo], want, subset)
            info = self.store.face_info(sorted({int(i) for i in ids.ravel() if i >= 0}))
            again = []
            for row, sc, hit in zip(todo, scores, ids):
                best: dict[str, tuple[float, FaceInfo]] = {}
                for s, i in zip(sc, hit):
                    f = info.get(int(i))
                    if f is not None and f.identity not in best:
                        best[f.identity] = (float(s), f)
                out[row] = sorted(best.values(), key=lambda t: -t[0])[:k]
                if len(best) < k and want < total:
                    again.append(row)
            todo, want = again, min(total, want * 4)
        return out

    def _refined(
        self,
        runtime: Any,
        face_vecs: np.ndarray,
        caption_vecs: np.ndarray,
        norms: np.ndarray,
        k: int,
        subset: np.ndarray | None,
    ) -> list[list[tuple[float, FaceInfo]]]:
        """Image-mode candidates re-ranked by face + w(q) * caption-to-face score.

        w(q) = max(0, weight + slope * q), q the probe's standardised ArcFace norm (a quality
        estimate), with the parameters fitted on val and shipped with the model.
        """
        params = runtime.summary.get("refine", {})
        wide = max(k, int(params.get("k", 100)))
        cfg = runtime.model.config
        q = (norms - cfg.quality_mean) / cfg.quality_std
        weights = np.maximum(0.0, params.get("weight", 0.1) + params.get("slope", 0.0) * q)
        out = []
        for shortlist, cap, weight in zip(
            self._ranked(self._index(FACE), face_vecs, wide, subset), caption_vecs, weights
        ):
            ids = [f.face_id for _, f in shortlist]
            text = self.store.vectors_of(ALIGNED, ids, dim=runtime.dims[ALIGNED]) @ cap
            scored = [(s + float(weight * t), f) for (s, f), t in zip(shortlist, text)]
            out.append(sorted(scored, key=lambda t: -t[0])[:k])
        return out

    def _described(
        self, runtime: Any, caption_vecs: np.ndarray, k: int, subset: np.ndarray | None
    ) -> list[list[tuple[float, FaceInfo]]]:
        """A description against each face, plus w times against the face's own caption.

        Candidates are the union of the best faces by either score (4k of each); w is fitted
        on val and shipped with the model. Faces without a caption score by their face alone.
        """
        w = float(runtime.summary.get("text", {}).get("caption_weight", 0.0))
        if not (w > 0 and CAPTION in self._spaces() and self._caption_fraction() > 0):
            return self._ranked(self._index(ALIGNED), caption_vecs, k, subset)
        by_face = self._ranked(self._index(ALIGNED), caption_vecs, 4 * k, subset)
        by_caption = self._ranked(self._index(CAPTION), caption_vecs, 4 * k, subset)
        out = []
        for a, b, cap in zip(by_face, by_caption, caption_vecs):
            faces = {f.face_id: f for _, f in a + b}
            ids = sorted(faces)
            score = self.store.vectors_of(ALIGNED, ids, dim=runtime.dims[ALIGNED]) @ cap
            stored = self.store.vectors_of(CAPTION, ids, dim=runtime.dims[CAPTION])
            score = score + w * (stored @ cap)
            best: dict[str, tuple[float, FaceInfo]] = {}
            for i, sc in zip(ids, score):
                f = faces[i]
                if f.identity not in best or sc > best[f.identity][0]:
                    best[f.identity] = (float(sc), f)
            out.append(sorted(best.values(), key=lambda t: -t[0])[:k])
        return out

    def _matches(
        self,
        ranked: list[tuple[float, FaceInfo]],
        mode: str,
        probe: Probe | None,
        probe_vecs: dict[str, np.ndarray],
        far: float | None,
    ) -> Matches:
        """Results with every score that applies (face, text, fused) and a decision."""
        ids = [f.face_id for _, f in ranked]
        extra: dict[str, np.ndarray] = {}
        if ids and FACE in probe_vecs:
            stored = self.store.vectors_of(FACE, ids, dim=self.models.face.dim)
            extra["face"] = stored @ probe_vecs[FACE]
        if ids and "text" in probe_vecs:
            runtime = self.tgfr
            stored = self.store.vectors_of(ALIGNED, ids, dim=runtime.dims[ALIGNED])
            extra["text"] = stored @ probe_vecs["text"]
        threshold = self.threshold(mode, far)
        results = []
        for r, (score, f) in enumerate(ranked):
            scores = {name: round(float(v[r]), 6) for name, v in extra.items()}
            scores["face" if mode == "image" else mode] = round(score, 6)
            decision = None if threshold is None else bool(score > threshold)
            results.append(
                Match(
                    r + 1,
                    f.identity,
                    f.face_id,
                    score,
                    f.source,
                    f.caption,
                    scores,
                    f.meta,
                    decision,
                )
            )
        return Matches(
            results,
            mode=mode,
            faces_found=0 if probe is None else probe.faces,
            quality=None if probe is None else probe.quality,
            threshold=threshold,
            probe_crop=None if probe is None else probe.crop,
        )

    def contact_sheet(
        self, matches: Matches, path: str | os.PathLike[str], caption: str | None = None
    ) -> Path:
        """Write a PNG of the probe (and caption), then each match's face, scores, decision."""
        from tgfr_search.sheet import contact_sheet

        crops = self.store.crops_of([m.face_id for m in matches])
        return contact_sheet(matches.probe_crop, caption, matches, crops, path)

    def threshold(self, mode: str, far: float | None = None) -> float | None:
        """The calibrated score threshold of a mode at a false accept rate (default 1e-3)."""
        runtime = self.tgfr
        table = runtime.summary.get("thresholds", {}) if runtime is not None else {}
        by_far = table.get(mode, {})
        key = f"{far if far is not None else DEFAULT_FAR:g}"
        if far is not None and by_far and key not in {f"{float(x):g}" for x in by_far}:
            raise ValueError(f"no threshold calibrated at FAR {far:g}; have {sorted(by_far)}")
        for name, value in by_far.items():
            if f"{float(name):g}" == key:
                return float(value)
        return None

    def verify(
        self,
        a: ImageLike,
        b: ImageLike,
        *,
        aligned: bool = False,
        far: float | None = None,
        captions: tuple[str | None, str | None] | None = None,
    ) -> Verification:
        """1:1 comparison of two images' most prominent faces.

        ArcFace cosine similarity; with `captions` for both (a description of each face), the
        cosine of their fused TGFR vectors, against the fused mode's threshold.
        """
        pa, pb = self._probes([a, b], aligned)
        if isinstance(pa, TGFRError):
            raise pa
        if isinstance(pb, TGFRError):
            raise pb
        crops = [pa.crop, pb.crop]
        mode = "fused" if captions and all(c and c.strip() for c in captions) else "image"
        if mode == "fused":
            vecs, _ = self._need_tgfr(mode).embed(crops, list(captions))  # type: ignore[arg-type]
            va, vb = vecs[FUSED]
        else:
            va, vb = self.models.face.embed(crops)
        score = float(va @ vb)
        threshold = self.threshold(mode, far)
        decision = None if threshold is None else score > threshold
        return Verification(score, (pa.faces, pb.faces), threshold, decision, mode)

    # -- management -------------------------------------------------------------------------
    def identities(self) -> list[tuple[str, int]]:
        """Every enrolled identity with its number of faces."""
        return self.store.identities()

    def info(self) -> dict[str, Any]:
        faces, identities = self.store.counts()
        return {
            "path": str(self.path),
            "faces": faces,
            "identities": identities,
            "spaces": self._spaces(),
            "face_model": self.store.get(f"fingerprint:{FACE}"),
            "tgfr_model": self.store.get("fingerprint:tgfr"),
            "generation": self.store.generation(),
            "vectors": "faiss" if self._vectors is None else self._vectors.config.uri,
            "metadata": self.store.engine.url.render_as_string(hide_password=True),
        }

    def delete(self, identity: str) -> int:
        """Forget an identity: its faces, crops, captions and vectors. Returns faces removed."""
        with self._write_lock():
            ids = self.store.delete_identity(identity)
            for space in self._spaces():
                self._index(space).forget(ids)
            self._save_indexes()
            self.store.checkpoint()  # no copy of the deleted rows stays behind in the WAL
        self.audit.record("delete", identity=identity, face_ids=ids)
        return len(ids)

    def reindex(
        self, *, batch_size: int = 256, progress: Callable[[int], None] | None = None
    ) -> int:
        """Re-embed every stored crop (and caption) with the loaded models; rebuild indexes."""
        self._check_models = False
        try:
            _ = self.models
            runtime = self.tgfr
            done = 0
            with self._write_lock():
                for rows in self.store.iter_crops(batch_size):
                    crops = [
                        load_image(data, name=f"stored crop of face {i}") for i, data, _ in rows
                    ]
                    vectors, _ = self._embed(crops, [c for _, _, c in rows])
                    self.store.replace_vectors([i for i, _, _ in rows], vectors)
                    done += len(rows)
                    if progress:
                        progress(len(rows))
                self.store.set(f"fingerprint:{FACE}", self.models.face.fingerprint)
                self.store.set(f"dim:{FACE}", self.models.face.dim)
                if runtime is not None:
                    self.store.set("fingerprint:tgfr", runtime.fingerprint)
                    for space, dim in runtime.dims.items():
                        self.store.set(f"dim:{space}", dim)
                for index in self._indexes.values():
                    index.close()
                self._indexes.clear()
                self._save_indexes()
        finally:
            self._check_models = True
        self.audit.record("reindex", faces=done)
        return done


def read_captions_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Captions keyed by image path relative to the gallery, from CSV or JSONL."""
    p = Path(path)
    out: dict[str, str] = {}
    with p.open(newline="", encoding="utf-8") as f:
        if p.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
            rows: Iterable[Mapping[str, Any]] = (json.loads(line) for line in f if line.strip())
        else:
            rows = csv.DictReader(f)
        for n, row in enumerate(rows, 1):
            image, caption = row.get("image"), row.get("caption")
            if not image or caption is None:
                raise ValueError(f"{p.name}: row {n} needs 'image' and 'caption' fields")
            out[Path(str(image)).as_posix()] = str(caption)
    return out


def scan_gallery(
    folder: str | os.PathLike[str],
    *,
    captions: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[list[EnrollItem], list[Skipped]]:
    """The images of `folder/<identity>/<image>`, and the entries that cannot be enrolled."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageError(f"{root} is not a folder")
    table = read_captions_file(captions) if captions else {}
    items: list[EnrollItem] = []
    problems: list[Skipped] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            if entry.is_symlink():  # a linked identity folder that leads nowhere
                problems.append(Skipped(str(entry), "dangling or looping symlink"))
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                problems.append(Skipped(str(entry), "not inside an <identity>/ folder"))
            continue
        try:
            files = sorted(entry.iterdir())
        except OSError as e:
            problems.append(Skipped(str(entry), f"cannot read folder: {e.strerror or e}"))
            continue
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                str(file).encode("utf-8")
            except UnicodeEncodeError:  # bytes from another locale: SQLite and JSON take UTF-8 only
                shown = os.fsencode(file).decode("utf-8", "backslashreplace")
                problems.append(Skipped(shown, "file name is not valid UTF-8; rename it"))
                continue
            if not file.is_file():  # links are followed; False for dangling links and loops
                why = "dangling or looping symlink" if file.is_symlink() else "not a regular file"
                problems.append(Skipped(str(file), why))
                continue
            rel = file.relative_to(root).as_posix()
            caption = table.get(rel)
            sidecar = file.with_suffix(".txt")
            if caption is None and sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() or None
            items.append(EnrollItem(file, entry.name, caption, dict(metadata or {}), str(file)))
    return items, problems
