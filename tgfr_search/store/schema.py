"""SQLAlchemy tables: the source of truth for identities, faces, captions and vectors."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Identity(Base):
    """A person: the unit that searches return and `delete` removes."""

    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    faces: Mapped[list[Face]] = relationship(
        back_populates="identity", cascade="all, delete-orphan", passive_deletes=True
    )


class Face(Base):
    """One enrolled face: where it came from, the aligned crop itself, its caption and metadata."""

    __tablename__ = "faces"
    __table_args__ = (UniqueConstraint("content_hash", "face_index", name="uq_faces_content"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str | None] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    # Which face of the source image (0 = most prominent); with n_faces, what the detector saw.
    face_index: Mapped[int] = mapped_column(Integer, default=0)
    n_faces: Mapped[int] = mapped_column(Integer, default=1)
    box: Mapped[list[float] | None] = mapped_column(JSON)
    det_score: Mapped[float | None] = mapped_column(Float)
    # The aligned 112x112 crop as an image file, so faces can be re-embedded without the
    # originals: an enrolled aligned file's own bytes, else a lossless PNG.
    crop: Mapped[bytes] = mapped_column(LargeBinary)
    caption: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The engine generation that added this face: lets an index catch up instead of rebuilding.
    generation: Mapped[int] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    identity: Mapped[Identity] = relationship(back_populates="faces")
    vectors: Mapped[list[Vector]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class Vector(Base):
    """One embedding of a face in a named space ("face" = ArcFace, "fused" = TGFR)."""

    __tablename__ = "vectors"

    face_id: Mapped[int] = mapped_column(
        ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True
    )
    space: Mapped[str] = mapped_column(String(32), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float16, little-endian (0002)


class Setting(Base):
    """Engine-wide state: model fingerprints per space and the change counters."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
