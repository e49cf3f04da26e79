"""Initial schema: identities, faces (with aligned crops), vectors, settings.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(512), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "faces",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "identity_id",
            sa.Integer,
            sa.ForeignKey("identities.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("source", sa.Text),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("face_index", sa.Integer, nullable=False),
        sa.Column("n_faces", sa.Integer, nullable=False),
        sa.Column("box", sa.JSON),
        sa.Column("det_score", sa.Float),
        sa.Column("crop", sa.LargeBinary, nullable=False),
        sa.Column("caption", sa.Text),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("content_hash", "face_index", name="uq_faces_content"),
    )
    op.create_index("ix_faces_identity_id", "faces", ["identity_id"])
    op.create_index("ix_faces_generation", "faces", ["generation"])
    op.create_table(
        "vectors",
        sa.Column(
            "face_id",
            sa.Integer,
            sa.ForeignKey("faces.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("space", sa.String(32), primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("value", sa.JSON),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("vectors")
    op.drop_index("ix_faces_generation", "faces")
    op.drop_index("ix_faces_identity_id", "faces")
    op.drop_table("faces")
    op.drop_table("identities")
