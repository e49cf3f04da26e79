"""Vectors stored as float16 instead of float32: half the bytes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_vectors = sa.table(
    "vectors",
    sa.column("face_id", sa.Integer),
    sa.column("space", sa.String),
    sa.column("vector", sa.LargeBinary),
)


def _convert(old: str, new: str, step: int = 5000) -> None:
    """Rewrite every vector blob from dtype `old` to `new`, `step` rows at a time by key."""
    conn = op.get_bind()
    t = _vectors.c
    update = (
        sa.update(_vectors)
        .where(t.face_id == sa.bindparam("f"), t.space == sa.bindparam("s"))
        .values(vector=sa.bindparam("v"))
    )
    after = (0, "")
    while True:
        rows = conn.execute(
            sa.select(t.face_id, t.space, t.vector)
            .where(sa.tuple_(t.face_id, t.space) > sa.tuple_(*after))
            .order_by(t.face_id, t.space)
            .limit(step)
        ).all()
        if not rows:
            return
        conn.execute(
            update,
            [
                {"f": f, "s": s, "v": np.frombuffer(v, dtype=old).astype(new).tobytes()}
                for f, s, v in rows
            ],
        )
        after = (rows[-1][0], rows[-1][1])


def upgrade() -> None:
    _convert("<f4", "<f2")


def downgrade() -> None:
    _convert("<f2", "<f4")
