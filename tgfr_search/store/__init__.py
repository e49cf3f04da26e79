"""Metadata storage: SQLAlchemy tables and the repository the engine talks to."""

from tgfr_search.store.store import FaceInfo, NewFace, Store, sqlite_url

__all__ = ["FaceInfo", "NewFace", "Store", "sqlite_url"]
