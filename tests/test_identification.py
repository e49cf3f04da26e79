"""The issue's acceptance check: 80 people enrolled with their first photo, 293 probes."""

from __future__ import annotations

import pytest

from tgfr_search import EnrollItem


@pytest.mark.slow
def test_rank1_on_lfw_raw_is_at_least_097(make_engine, raw_people) -> None:
    engine = make_engine()
    report = engine.enroll_many([EnrollItem(p[0], name) for name, p in raw_people.items()])
    assert report.enrolled == len(raw_people) == 80
    probes = [(name, p) for name, photos in raw_people.items() for p in photos[1:]]
    assert len(probes) == 293
    hits = sum(engine.query(p, k=1)[0].identity == name for name, p in probes)
    print(f"rank-1 {hits}/{len(probes)} = {hits / len(probes):.4f}")
    assert hits / len(probes) >= 0.97
