"""The LFW manifest: every aligned image once, identity-disjoint splits, captions by row."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tgfr_search.training.lfw import DatasetError, iter_manifest, read_manifest, write_manifest

LFW = Path(
    os.environ.get("TGFR_LFW", Path(__file__).resolve().parents[1].parent / "shared/datasets/lfw")
)

# From the dataset README; they count the aligned112/ images (11,150 in all).
IMAGES = {"train": 5678, "val": 671, "test": 2801, "distractor": 2000}
PEOPLE = {"train": 986, "val": 158, "test": 533, "distractor": 2000}
# Aligned images with no attribute row (measured; the spec expects 48 test probes).
WITHOUT_CAPTIONS = {"train": 126, "val": 7, "test": 48, "distractor": 52}


def write_attributes(lfw_dir: Path, text: str) -> None:
    with gzip.open(lfw_dir / "attributes.csv.gz", "wt") as f:
        f.write(text)


@pytest.fixture(scope="module")
def lfw() -> Path:
    if not (LFW / "aligned112").is_dir():
        pytest.skip(f"LFW not found at {LFW} (set TGFR_LFW)")
    return LFW


@pytest.fixture(scope="module")
def written(lfw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    out = tmp_path_factory.mktemp("manifest") / "sub" / "manifest.jsonl"
    counts = write_manifest(lfw, out)
    return counts, read_manifest(out)


def test_counts_match_the_readme(written: tuple[dict, list[dict]]) -> None:
    counts, records = written
    assert {k: counts[k] for k in IMAGES} == IMAGES
    assert counts["total"] == len(records) == sum(IMAGES.values())
    people: dict[str, set[str]] = defaultdict(set)
    for record in records:
        people[record["split"]].add(record["identity"])
    assert {split: len(names) for split, names in people.items()} == PEOPLE


def test_splits_are_identity_disjoint(written: tuple[dict, list[dict]]) -> None:
    _, records = written
    splits_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        splits_of[record["identity"]].add(record["split"])
    assert all(len(splits) == 1 for splits in splits_of.values())


def test_records_point_at_real_images(lfw: Path, written: tuple[dict, list[dict]]) -> None:
    _, records = written
    assert len({r["image"] for r in records}) == len(records)
    on_disk = {p.relative_to(lfw).as_posix() for p in (lfw / "aligned112").glob("*/*.jpg")}
    assert {r["image"] for r in records} == on_disk
    for record in records[:: max(1, len(records) // 200)]:
        assert record["image"] == f"aligned112/{record['identity']}/{Path(record['image']).name}"
        assert set(record) == {"image", "identity", "split", "captions"}


def test_images_without_attribute_rows(written: tuple[dict, list[dict]]) -> None:
    counts, records = written
    missing = Counter(r["split"] for r in records if not r["captions"])
    assert dict(missing) == WITHOUT_CAPTIONS
    assert counts["without_captions"] == sum(WITHOUT_CAPTIONS.values())
    assert all(2 <= len(r["captions"]) <= 5 for r in records if r["captions"])


def test_seed_and_ethnicity_options(lfw: Path, written: tuple[dict, list[dict]]) -> None:
    _, records = written
    first = [r for _, r in zip(range(30), iter_manifest(lfw), strict=False)]
    assert first == records[:30], "the manifest must be reproducible"
    reseeded = [r for _, r in zip(range(30), iter_manifest(lfw, seed=1), strict=False)]
    assert [r["captions"] for r in reseeded] != [r["captions"] for r in first]
    plain = [r for _, r in zip(range(300), iter_manifest(lfw, ethnicity=False), strict=False)]
    text = " ".join(c for r in plain for c in r["captions"]).lower()
    for word in ("caucasian", "white", "asian", "hispanic", "latino", "middle eastern"):
        assert word not in text


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "manifest.jsonl"
    out.write_text("old\n")
    with pytest.raises(DatasetError):
        write_manifest(tmp_path / "nowhere", out)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_small_dataset_end_to_end(tmp_path: Path) -> None:
    """A three-person folder in the same layout, so the builder is tested without the data."""
    for person in ("Ann_Able", "Bob_Baker", "Cy_Cole"):
        (tmp_path / "aligned112" / person).mkdir(parents=True)
        (tmp_path / "aligned112" / person / f"{person}_0001.jpg").write_bytes(b"")
    (tmp_path / "splits.json").write_text(
        json.dumps(
            {"train": ["Ann_Able"], "val": [], "test": ["Bob_Baker"], "distractors": ["Cy_Cole"]}
        )
    )
    write_attributes(
        tmp_path, "image,Male,Young,Eyeglasses\nAnn_Able/Ann_Able_0001.jpg,0.02,0.95,0.99\n"
    )
    out = tmp_path / "m.jsonl"
    counts = write_manifest(tmp_path, out, seed=3)
    assert counts == {
        "train": 1,
        "val": 0,
        "test": 1,
        "distractor": 1,
        "total": 3,
        "without_captions": 2,
    }
    records = read_manifest(out)
    assert [r["split"] for r in records] == ["train", "test", "distractor"]
    assert records[0]["image"] == "aligned112/Ann_Able/Ann_Able_0001.jpg"
    assert "woman" in " ".join(records[0]["captions"]).lower()
    assert records[1]["captions"] == []


def test_unknown_person_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "aligned112" / "Nobody").mkdir(parents=True)
    (tmp_path / "splits.json").write_text(json.dumps({"train": []}))
    write_attributes(tmp_path, "image,Male\n")
    with pytest.raises(DatasetError):
        list(iter_manifest(tmp_path))
