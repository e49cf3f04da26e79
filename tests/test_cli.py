"""The command line through click's CliRunner: exact outputs, exit codes, JSON on stdout only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tgfr_search.cli import cli


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, raw_people):
    """gallery/<identity>/<image>: the first photo of 6 people, one with a sidecar caption."""
    root = tmp_path_factory.mktemp("gallery")
    people = list(raw_people.items())[:6]
    for name, photos in people:
        (root / name).mkdir()
        shutil.copy(photos[0], root / name / photos[0].name)
    first_name, first_photos = people[0]
    (root / first_name / first_photos[0].with_suffix(".txt").name).write_text("a man in a suit\n")
    (root / people[1][0] / "notes.jpg").write_text("not a jpeg")
    return root, dict(people)


def run(args, db: Path, **kw):
    result = CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False, **kw)
    return result


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name, command in cli.commands.items():
        assert command.help, f"{name} has no help text"
        assert runner.invoke(cli, [name, "--help"]).exit_code == 0


def test_enroll_query_info_list_delete(gallery, tmp_path: Path) -> None:
    root, people = gallery
    db = tmp_path / "db"
    out = run(["enroll", str(root), "--json"], db)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["enrolled"] == 6 and doc["images"] == 7 and doc["duplicates"] == 0
    assert [Path(s["source"]).name for s in doc["skipped"]] == ["notes.jpg"]
    assert "skipped" in out.stderr and "notes.jpg" in out.stderr

    name, photos = next(iter(people.items()))
    out = run(["query", str(photos[1]), "-k", "3", "--json"], db)
    assert out.exit_code == 0
    doc = json.loads(out.stdout)
    assert doc["mode"] == "image" and len(doc["results"]) == 3
    first = doc["results"][0]
    assert set(first) >= {"rank", "identity", "face_id", "score", "source", "caption"}
    assert (first["rank"], first["identity"], first["caption"]) == (1, name, "a man in a suit")
    assert isinstance(first["face_id"], int) and isinstance(first["score"], float)

    out = run(["info", "--json"], db)
    info = json.loads(out.stdout)
    assert (info["faces"], info["identities"]) == (6, 6)

    again = json.loads(run(["enroll", str(root), "--json"], db).stdout)
    assert again["enrolled"] == 0 and again["duplicates"] == 6
    assert json.loads(run(["info", "--json"], db).stdout)["faces"] == 6

    listed = json.loads(run(["list", "--json"], db).stdout)["identities"]
    assert sorted(i["identity"] for i in listed) == sorted(people)

    out = run(["delete", name, "--yes", "--json"], db)
    assert json.loads(out.stdout) == {"identity": name, "faces_deleted": 1}
    doc = json.loads(run(["query", str(photos[1]), "--json"], db).stdout)
    assert name not in [r["identity"] for r in doc["results"]]

    out = run(["query", str(photos[1]), "-k", "1"], db)
    lines = out.stdout.splitlines()
    assert out.exit_code == 0 and lines[0].startswith("  probe quality: detector 0.")
    assert lines[1].startswith("  1  ") and len(lines) == 2


def test_captions_file_and_metadata(gallery, tmp_path: Path) -> None:
    root, people = gallery
    db = tmp_path / "db"
    name, photos = list(people.items())[2]
    table = tmp_path / "captions.csv"
    table.write_text(f'image,caption\n{name}/{photos[0].name},"woman, smiling"\n')
    out = run(["enroll", str(root), "--captions", str(table), "--meta", "site=hq", "--json"], db)
    assert out.exit_code == 0
    doc = json.loads(
        run(["query", str(photos[1]), "-k", "1", "--where", "site=hq", "--json"], db).stdout
    )
    assert doc["results"][0]["caption"] == "woman, smiling"
    none = json.loads(
        run(["query", str(photos[1]), "--where", "site=elsewhere", "--json"], db).stdout
    )
    assert none["results"] == []


def test_errors_are_one_line_exit_1(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 120, 3), 90, np.uint8))
    out = run(["query", str(blank)], tmp_path / "db")
    assert out.exit_code == 1
    assert out.stderr == f"Error: no face found in {blank}\n"

    out = run(["delete", "nobody", "--yes"], tmp_path / "db")
    assert (out.exit_code, out.stderr) == (1, "Error: no identity named 'nobody'\n")

    out = run(["query", str(blank), "--mode", "fused", "--caption", "x"], tmp_path / "db")
    assert out.exit_code == 1 and out.stderr.count("\n") == 1


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run(["query", "--mode", "nope"], tmp_path / "db").exit_code == 2
    assert run(["enroll", str(tmp_path / "missing")], tmp_path / "db").exit_code == 2
    assert run(["enroll", str(tmp_path), "--meta", "novalue"], tmp_path / "db").exit_code == 2


def test_db_from_environment(gallery, tmp_path: Path) -> None:
    root, _ = gallery
    db = tmp_path / "from-env"
    out = CliRunner().invoke(cli, ["info", "--json"], env={"TGFR_DB": str(db)})
    assert out.exit_code == 0 and json.loads(out.stdout)["faces"] == 0
    assert (db / "metadata.db").exists()


def test_demo_runs_on_the_shipped_samples(tmp_path: Path) -> None:
    out = run(["demo", "--keep", str(tmp_path / "demo"), "--json"], tmp_path / "unused")
    assert out.exit_code == 0
    doc = json.loads(out.stdout)
    assert doc["enrolled"] == doc["gallery_faces"] >= 30
    assert doc["rank1_correct"] >= 0.7 * len(doc["queries"])
    assert not (tmp_path / "unused").exists()


def test_query_a_folder_of_probes_and_contact_sheet(gallery, tmp_path: Path) -> None:
    root, people = gallery
    db = tmp_path / "db"
    assert run(["enroll", str(root)], db).exit_code == 0
    probes = tmp_path / "probes"
    probes.mkdir()
    for name, photos in list(people.items())[:3]:
        shutil.copy(photos[1], probes / f"{name}.jpg")
    (probes / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = run(["query", str(probes), "-k", "2", "--json"], db)
    assert out.exit_code == 0
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(d["probe"]).name for d in lines] == sorted(p.name for p in probes.iterdir())
    errors = [d for d in lines if "error" in d]
    assert len(errors) == 1 and "broken.jpg" in errors[0]["error"]
    for d in lines:
        if "error" not in d:
            assert d["results"][0]["identity"] == Path(d["probe"]).stem
    sheet = tmp_path / "matches.png"
    name, photos = next(iter(people.items()))
    out = run(["query", str(photos[1]), "-k", "3", "--show", str(sheet)], db)
    assert out.exit_code == 0
    import cv2

    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[1] >= 4 * 112


def test_verify_json(gallery, tmp_path: Path) -> None:
    _, people = gallery
    (a, b), (c, _) = [(p[0], p[1]) for p in list(people.values())[:2]]
    same = json.loads(run(["verify", str(a), str(b), "--json"], tmp_path / "db").stdout)
    other = json.loads(run(["verify", str(a), str(c), "--json"], tmp_path / "db").stdout)
    assert set(same) == {"mode", "score", "threshold", "decision", "faces_found"}
    assert same["score"] > other["score"]
    assert (same["mode"], same["decision"], other["decision"]) == ("image", True, False)
    caps = ["--captions", "a man", "a man"]
    fused = json.loads(run(["verify", str(a), str(b), *caps, "--json"], tmp_path / "db").stdout)
    assert fused["mode"] == "fused" and fused["decision"] is True
    assert fused["threshold"] != same["threshold"]
