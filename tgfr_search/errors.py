"""The errors tgfr-search raises: one base class, each also a matching built-in."""

from __future__ import annotations


class TGFRError(Exception):
    """Base class of every error tgfr-search raises on purpose."""


class NoFaceFound(TGFRError, ValueError):
    """An image in which the detector found no face."""


class ImageError(TGFRError, ValueError):
    """A file or buffer that cannot be decoded as an image, or is refused (too large, too small)."""


class ModelMismatch(TGFRError, RuntimeError):
    """The engine's stored vectors were made by other models than the ones loaded."""


class ModelFileError(TGFRError, FileNotFoundError):
    """A model file is missing or does not match its pinned checksum."""


class MissingDependency(TGFRError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


class NotFound(TGFRError, KeyError):
    """An identity or face that the engine does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LockTimeout(TGFRError, TimeoutError):
    """Another process holds the engine's write lock for longer than the timeout."""


class ModeUnavailable(TGFRError, ValueError):
    """A search mode that the loaded models or the gallery cannot serve."""


class BackendUnavailable(TGFRError, ConnectionError):
    """The metadata database or the vector store cannot be reached or opened."""
