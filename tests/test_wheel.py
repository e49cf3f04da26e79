"""The built wheel, installed into a fresh venv, works on its own."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("tgfr_search-*.whl"))


def test_wheel_ships_migrations_inside_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "tgfr_search/migrations/env.py" in names
    assert "tgfr_search/migrations/script.py.mako" in names
    assert "tgfr_search/migrations/versions/0001_initial.py" in names
    assert "tgfr_search/py.typed" in names
    # The shipped TGFR checkpoint (a few MB), not the experiment log beside it.
    assert {"tgfr_search/weights/model.safetensors", "tgfr_search/weights/config.json"} <= set(
        names
    )
    assert not [n for n in names if n.endswith(".md")]
    top = {n.split("/")[0] for n in names}
    assert top == {
        "tgfr_search",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }


@pytest.mark.slow
def test_wheel_in_fresh_venv_runs_the_cli(wheel: Path, tmp_path: Path, raw_people) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # The dependencies come from this interpreter's site-packages (installing torch again
    # would take minutes); the package itself only from the wheel, never from the checkout.
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    exe = env_dir / "bin" / "tgfr-search"
    where = subprocess.check_output(
        [str(py), "-c", "import tgfr_search; print(tgfr_search.__file__)"], text=True, cwd=tmp_path
    )
    assert where.startswith(str(env_dir))
    gallery = tmp_path / "gallery"
    people = list(raw_people.items())[:3]
    for name, photos in people:
        (gallery / name).mkdir(parents=True)
        (gallery / name / photos[0].name).write_bytes(photos[0].read_bytes())
    db = tmp_path / "db"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(exe), "--db", str(db), *args, "--json"],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )

    assert json.loads(run("enroll", str(gallery)).stdout)["enrolled"] == 3
    doc = json.loads(run("query", str(people[1][1][1])).stdout)
    assert doc["results"][0]["identity"] == people[1][0]
    # The packaged checkpoint loads from the installed wheel: fused vectors were filled.
    assert "fused" in json.loads(run("info").stdout)["spaces"]
    assert (db / "metadata.db").stat().st_mode & 0o077 == 0
