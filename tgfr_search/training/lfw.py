"""The LFW training manifest: one JSON line per aligned face, with its split and captions."""

from __future__ import annotations

import csv
import gzip
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tgfr_search.errors import TGFRError
from tgfr_search.training.captions import generate_captions

__all__ = ["DatasetError", "SPLITS", "iter_manifest", "read_manifest", "write_manifest"]

#: Manifest split names; splits.json calls the last one "distractors".
SPLITS = ("train", "val", "test", "distractor")
_SPLIT_KEYS = {"train": "train", "val": "val", "test": "test", "distractors": "distractor"}


class DatasetError(TGFRError, ValueError):
    """A dataset folder or manifest that is missing a part or does not parse."""


def _load_splits(lfw_dir: Path) -> dict[str, str]:
    """Map each person to its manifest split."""
    path = lfw_dir / "splits.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    person_split: dict[str, str] = {}
    for key, split in _SPLIT_KEYS.items():
        for person in raw.get(key, []):
            if person in person_split:
                raise DatasetError(
                    f"{path}: {person} is in both {person_split[person]} and {split}"
                )
            person_split[person] = split
    return person_split


def _load_attributes(lfw_dir: Path) -> dict[str, dict[str, str]]:
    """Map `<Person>/<file>.jpg` to its attribute row."""
    path = lfw_dir / "attributes.csv.gz"
    try:
        with gzip.open(path, "rt", newline="") as f:
            return {row["image"]: row for row in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e


def iter_manifest(lfw_dir: Path, *, ethnicity: bool = True, seed: int = 0) -> Iterator[dict]:
    """Yield one manifest record per image under `aligned112/`, in sorted order.

    Records are `{"image", "identity", "split", "captions"}`; images without an attribute row
    get no captions. Captions are seeded by `f"{seed}:{Person}/{file}"`, so they do not depend
    on the order or subset of images processed.
    """
    lfw_dir = Path(lfw_dir)
    aligned = lfw_dir / "aligned112"
    if not aligned.is_dir():
        raise DatasetError(f"{aligned} is not a folder; expected the LFW dataset layout")
    person_split = _load_splits(lfw_dir)
    attributes = _load_attributes(lfw_dir)
    for person_dir in sorted(p for p in aligned.iterdir() if p.is_dir()):
        person = person_dir.name
        if person not in person_split:
            raise DatasetError(f"{person} has aligned images but is in no split of splits.json")
        for image in sorted(person_dir.glob("*.jpg")):
            relative = f"{person}/{image.name}"
            row = attributes.get(relative)
            captions = (
                generate_captions(row, seed=f"{seed}:{relative}", ethnicity=ethnicity)
                if row is not None
                else []
            )
            yield {
                "image": f"aligned112/{relative}",
                "identity": person,
                "split": person_split[person],
                "captions": captions,
            }


def write_manifest(
    lfw_dir: Path, out_path: Path, *, ethnicity: bool = True, seed: int = 0
) -> dict[str, int]:
    """Write the manifest as JSONL, atomically, and return counts.

    `ethnicity` and `seed` are as for `iter_manifest`. The counts are images per split (all
    four keys always present), `total` and `without_captions`; a failed run leaves `out_path`
    as it was.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter({split: 0 for split in SPLITS})
    missing = 0
    # The temp file sits beside the target so that os.replace is a same-filesystem rename.
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in iter_manifest(lfw_dir, ethnicity=ethnicity, seed=seed):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[record["split"]] += 1
                missing += not record["captions"]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a manifest is meant to be shared
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        **{split: counts[split] for split in SPLITS},
        "total": sum(counts.values()),
        "without_captions": missing,
    }


def read_manifest(path: Path) -> list[dict]:
    """Read a JSONL manifest written by `write_manifest`."""
    path = Path(path)
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as e:
                        raise DatasetError(f"{path}:{number}: not JSON: {e}") from e
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    return records
