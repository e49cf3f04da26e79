"""The `tgfr-search` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from tgfr_search.errors import TGFRError

DEFAULT_DB = "./tgfr-db"


def _stderr(msg: str) -> None:
    click.echo(msg, err=True)


def _emit(doc: Any) -> None:
    click.echo(json.dumps(doc, ensure_ascii=False, indent=None))


def _library_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become one clear line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TGFRError, FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else repr(e)) from e

    return wrapper


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar with ETA on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _parse_pairs(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint=option)
        out[key] = value
    return out


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="TGFR_DB",
    default=DEFAULT_DB,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Engine directory (env TGFR_DB).",
)
@click.option(
    "--models",
    default="vectron",
    show_default=True,
    help="Face model pack: vectron (installed with tgfr-search) or an insightface pack "
    "such as buffalo_l.",
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder holding the pack's ONNX files (e.g. ~/.insightface/models/buffalo_l).",
)
@click.option(
    "--vectors",
    envvar="TGFR_VECTORS",
    default="faiss",
    show_default=True,
    metavar="URI",
    help="Where vectors are searched: faiss (files in --db), milvus-lite:///ABSOLUTE/PATH, or "
    "http(s)://host:19530 for a Milvus server (token from env TGFR_MILVUS_TOKEN). "
    "Env TGFR_VECTORS.",
)
@click.option(
    "--metadata",
    envvar="TGFR_METADATA",
    metavar="URL",
    help="SQLAlchemy URL of the metadata database, e.g. postgresql+psycopg://user@host/db "
    "(default: SQLite in --db). Env TGFR_METADATA.",
)
@click.version_option(package_name="tgfr-search")
@click.pass_context
def cli(
    ctx: click.Context,
    db: Path,
    models: str,
    model_dir: Path | None,
    vectors: str,
    metadata: str | None,
) -> None:
    """Text-guided face search: enroll faces with captions, search by face and description."""
    ctx.obj = {
        "db": db,
        "models": models,
        "model_dir": model_dir,
        "vectors": vectors,
        "metadata": metadata,
    }


def _engine(ctx: click.Context, **kw: Any) -> Any:
    from tgfr_search.engine import SearchEngine

    o = ctx.obj
    return SearchEngine(
        o["db"],
        models=o["models"],
        model_dir=o["model_dir"],
        vectors=o["vectors"],
        metadata=o["metadata"],
        **kw,
    )


@cli.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--captions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV or JSONL with image (relative to GALLERY) and caption columns.",
)
@click.option("--aligned", is_flag=True, help="Images are aligned 112x112 crops: skip detection.")
@click.option(
    "--all-faces", is_flag=True, help="Enroll every face of an image, not just the most prominent."
)
@click.option(
    "--meta", multiple=True, metavar="KEY=VALUE", help="Metadata for every face (repeatable)."
)
@click.option("--batch-size", default=32, show_default=True, help="Images per batch.")
@json_option
@click.pass_context
@_library_errors
def enroll(
    ctx: click.Context,
    gallery: Path,
    captions: Path | None,
    aligned: bool,
    all_faces: bool,
    meta: tuple[str, ...],
    batch_size: int,
    as_json: bool,
) -> None:
    """Enroll GALLERY/<identity>/<image> files; captions from <image>.txt or --captions."""
    from tgfr_search.engine import scan_gallery

    metadata = _parse_pairs(meta, "--meta")
    items, problems = scan_gallery(gallery, captions=captions, metadata=metadata)
    with _engine(ctx) as engine:
        t0 = time.perf_counter()
        _ = engine.models  # load (and check) the models before the clock starts
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _progress(len(items), "enrolling") as advance:
            report = engine.enroll_many(
                items, aligned=aligned, all_faces=all_faces, batch_size=batch_size, progress=advance
            )
        seconds = time.perf_counter() - t0
        report.skipped[:0] = problems
        for w in engine.warnings:
            _stderr(f"warning: {w}")
    for s in report.skipped:
        _stderr(f"skipped {s.source}: {s.reason}")
    for src, n in report.multi_face:
        _stderr(f"{src}: {n} faces found, enrolled {'all' if all_faces else 'the most prominent'}")
    rate = report.images / seconds if seconds > 0 else 0.0
    if as_json:
        doc = report.to_dict()
        doc.update(
            seconds=round(seconds, 3),
            model_load_seconds=round(load_s, 3),
            images_per_second=round(rate, 2),
        )
        _emit(doc)
    else:
        click.echo(
            f"enrolled {report.enrolled} faces from {report.images} images "
            f"({len(report.duplicates)} already enrolled, {len(report.skipped)} skipped) "
            f"in {seconds:.1f}s ({rate:.1f} images/s)"
        )


def _probe_files(folder: Path) -> list[Path]:
    from tgfr_search.engine import IMAGE_SUFFIXES

    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _print_matches(matches: Any, label: str | None = None) -> None:
    if label:
        click.echo(f"{label}  [{matches.mode}]")
    if matches.faces_found > 1:
        _stderr(f"{matches.faces_found} faces found in the probe; searched with the most prominent")
    q = matches.quality
    if q is not None:
        det = "-" if q.detector_score is None else f"{q.detector_score:.2f}"
        click.echo(f"  probe quality: detector {det}, face {q.size:.0f}px, blur {q.blur:.0f}")
    if not matches:
        click.echo("  no enrolled faces")
    for m in matches:
        verdict = {True: "match", False: "-", None: ""}[m.decision]
        extra = "  ".join(f"{k} {v:.3f}" for k, v in m.scores.items() if k != matches.mode)
        click.echo(
            f"{m.rank:>3}  {m.score:7.4f}  {verdict:<5}  {m.identity}  (face {m.face_id}; {extra})"
        )


@cli.command()
@click.argument("probe", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--caption", help="A description of the person.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "image", "fused", "refine", "text"]),
    default="auto",
    show_default=True,
    help="What to search with.",
)
@click.option("-k", "--top", "k", default=10, show_default=True, help="Results to return.")
@click.option("--aligned", is_flag=True, help="PROBE is an aligned 112x112 crop.")
@click.option(
    "--where",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only faces with this metadata (repeatable; key 'identity' too).",
)
@click.option("--far", type=float, help="False accept rate of the decision threshold [1e-3].")
@click.option(
    "--show",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a contact sheet PNG of the probe and its matches.",
)
@click.option("--batch-size", default=64, show_default=True, help="Probes per batch (folders).")
@json_option
@click.pass_context
@_library_errors
def query(
    ctx: click.Context,
    probe: Path | None,
    caption: str | None,
    mode: str,
    k: int,
    aligned: bool,
    where: tuple[str, ...],
    far: float | None,
    show: Path | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """Find the enrolled identities that best match PROBE and/or --caption.

    PROBE may be a folder: every image in it is searched, one JSON line per probe with
    --json (a probe's caption comes from its <image>.txt sidecar, else --caption).
    """
    filters = _parse_pairs(where, "--where") or None
    if probe is None and not caption:
        raise click.UsageError("give a PROBE image, a --caption, or both")
    with _engine(ctx) as engine:
        if probe is None or probe.is_file():
            matches = engine.query(
                probe, caption=caption, mode=mode, k=k, aligned=aligned, filters=filters, far=far
            )
            if show is not None:
                engine.contact_sheet(matches, show, caption)
            if as_json:
                _emit(matches.to_dict())
            else:
                _print_matches(matches)
            return
        files = _probe_files(probe)
        failed = 0
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            caps = [
                p.with_suffix(".txt").read_text(errors="replace").strip()
                if p.with_suffix(".txt").is_file()
                else caption
                for p in chunk
            ]
            for path, result in zip(
                chunk,
                engine.query_batch(
                    chunk, captions=caps, mode=mode, k=k, aligned=aligned, filters=filters, far=far
                ),
            ):
                if not hasattr(result, "to_dict"):
                    failed += 1
                    _stderr(f"skipped {path}: {result}")
                    if as_json:
                        _emit({"probe": str(path), "error": str(result)})
                    continue
                if as_json:
                    _emit({"probe": str(path), **result.to_dict()})
                else:
                    _print_matches(result, str(path))
    if failed == len(files) and files:
        raise click.ClickException(f"none of the {len(files)} probes could be searched")


@cli.command()
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--aligned", is_flag=True, help="A and B are aligned 112x112 crops.")
@click.option("--far", type=float, help="False accept rate of the decision threshold [1e-3].")
@click.option(
    "--captions",
    nargs=2,
    metavar="TEXT_A TEXT_B",
    help="Describe both faces: compare their fused TGFR vectors instead of ArcFace alone.",
)
@json_option
@click.pass_context
@_library_errors
def verify(
    ctx: click.Context,
    a: Path,
    b: Path,
    aligned: bool,
    far: float | None,
    captions: tuple[str, str] | None,
    as_json: bool,
) -> None:
    """Compare the faces in two images (1:1): score, threshold and decision."""
    with _engine(ctx) as engine:
        v = engine.verify(a, b, aligned=aligned, far=far, captions=captions)
    if as_json:
        _emit(
            {
                "mode": v.mode,
                "score": v.score,
                "threshold": v.threshold,
                "decision": v.decision,
                "faces_found": list(v.faces_found),
            }
        )
    else:
        verdict = {True: "same person", False: "different people", None: "uncalibrated"}
        thr = "" if v.threshold is None else f" (threshold {v.threshold:.4f})"
        click.echo(f"score {v.score:.4f}{thr}: {verdict[v.decision]}")


@cli.command("list")
@json_option
@click.pass_context
@_library_errors
def list_(ctx: click.Context, as_json: bool) -> None:
    """List enrolled identities and their face counts."""
    with _engine(ctx) as engine:
        rows = engine.identities()
    if as_json:
        _emit({"identities": [{"identity": n, "faces": c} for n, c in rows]})
    else:
        for name, count in rows:
            click.echo(f"{count:>5}  {name}")


@cli.command()
@json_option
@click.pass_context
@_library_errors
def info(ctx: click.Context, as_json: bool) -> None:
    """Show what the engine holds."""
    with _engine(ctx) as engine:
        doc = engine.info()
    if as_json:
        _emit(doc)
    else:
        for key, value in doc.items():
            click.echo(f"{key}: {value}")


@cli.command()
@click.argument("identity")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_context
@_library_errors
def delete(ctx: click.Context, identity: str, yes: bool, as_json: bool) -> None:
    """Forget IDENTITY: its faces, crops, captions and vectors."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Delete {identity!r} and all its faces?", abort=True)
    with _engine(ctx) as engine:
        n = engine.delete(identity)
    if as_json:
        _emit({"identity": identity, "faces_deleted": n})
    else:
        click.echo(f"deleted {identity} ({n} faces)")


@cli.command()
@json_option
@click.pass_context
@_library_errors
def reindex(ctx: click.Context, as_json: bool) -> None:
    """Re-embed every stored face with the loaded models and rebuild the index."""
    with _engine(ctx, check_models=False) as engine:
        total = engine.info()["faces"]
        with _progress(total, "re-embedding") as advance:
            n = engine.reindex(progress=advance)
    if as_json:
        _emit({"faces": n})
    else:
        click.echo(f"re-embedded {n} faces")


@cli.command()
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Build the demo engine here and keep it (default: a temporary folder).",
)
@json_option
@click.pass_context
@_library_errors
def demo(ctx: click.Context, keep: Path | None, as_json: bool) -> None:
    """Enroll the sample faces shipped with the models, then search with degraded copies."""
    import tempfile

    from tgfr_search.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(
            keep or Path(tmp) / "demo-db", models=ctx.obj["models"], model_dir=ctx.obj["model_dir"]
        )
    if as_json:
        _emit(result)
        return
    click.echo(
        f"enrolled {result['enrolled']} faces from {len(result['photos'])} sample photos: "
        + ", ".join(result["photos"])
    )
    click.echo("queried each face with a low-quality copy (1/4 size, blurred, JPEG q40):")
    for q in result["queries"]:
        ok = "ok " if q["correct"] else "MISS"
        top = (
            ", ".join(f"{m['identity']} {m['score']:.3f}" for m in q["results"]) or "no face found"
        )
        click.echo(f"  {ok} {q['probe']:<14} -> {top}")
    click.echo(f"rank-1: {result['rank1_correct']}/{len(result['queries'])}")


@cli.group()
def data() -> None:
    """Build training and evaluation manifests from datasets (ignores --db)."""


@data.command("lfw")
@click.argument("lfw_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Manifest to write (JSON lines).",
)
@click.option("--no-ethnicity", is_flag=True, help="Leave ethnicity out of every caption.")
@click.option("--seed", default=0, show_default=True, help="Seed of the caption grammar.")
@json_option
@_library_errors
def data_lfw(lfw_dir: Path, out: Path, no_ethnicity: bool, seed: int, as_json: bool) -> None:
    """Write one JSON line per LFW face: image, identity, split and generated captions."""
    from tgfr_search.training.lfw import write_manifest

    counts = write_manifest(lfw_dir, out, ethnicity=not no_ethnicity, seed=seed)
    if as_json:
        _emit(counts)
    else:
        click.echo(
            f"wrote {counts['total']} images to {out}: "
            + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
        )


DEFAULT_LFW = "../shared/datasets/lfw"
lfw_option = click.option(
    "--lfw",
    envvar="TGFR_LFW",
    default=DEFAULT_LFW,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder the manifest's image paths are relative to (env TGFR_LFW).",
)
manifest_option = click.option(
    "--manifest",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A manifest written by `tgfr-search data lfw`.",
)


def _cache(
    manifest: Path,
    lfw: Path,
    cache: Path,
    splits: tuple[str, ...] = ("train", "val", "test", "distractor"),
) -> Any:
    """The frozen-feature cache of a manifest's `splits`: built once (minutes), then reused."""
    from tgfr_search.training.features import build_cache

    def progress(stage: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            _stderr(f"features {stage}: {done}/{total}")

    return build_cache(manifest, lfw, cache, splits=splits, progress=progress)


@cli.command()
@manifest_option
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoint folder to write (model.safetensors + config.json).",
)
@lfw_option
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature cache folder [OUT/features].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--stages",
    type=click.Choice(["two", "joint"]),
    default="two",
    show_default=True,
    help="Align then fuse (the paper), or both at once.",
)
@click.option(
    "--variant",
    type=click.Choice(["banded", "global", "full", "no-wrcl"]),
    default="banded",
    show_default=True,
    help="banded: the shipped recipe (global fusion; the aligned head also reads the region "
    "map pooled in bands); global: no region input; full: TGFR with word-region attention; "
    "no-wrcl: full without the word-region loss.",
)
@click.option("--epochs", type=int, help="Override the number of epochs.")
@click.option("--seed", default=0, show_default=True)
@json_option
@_library_errors
def train(
    manifest: Path,
    out: Path,
    lfw: Path,
    cache: Path | None,
    device: str,
    stages: str,
    variant: str,
    epochs: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Train the TGFR heads on a manifest's train people; select on val (ignores --db)."""
    from tgfr_search.training.train import RECIPES
    from tgfr_search.training.train import train as run_training

    # Training reads train and val only; test and distractors are cached by `evaluate`.
    features = _cache(manifest, lfw, cache or out / "features", ("train", "val"))
    from tgfr_search.models.tgfr import TGFRConfig

    ablation, config, options = RECIPES[variant]
    summary = run_training(
        features,
        out,
        device=device,
        stages=stages,
        ablation=ablation,
        config=TGFRConfig(**config),
        options=options,
        epochs=epochs,
        seed=seed,
        fingerprints=features.meta.get("fingerprints"),
        progress=None if as_json else _stderr,
    )
    summary.pop("model")
    if as_json:
        _emit(summary)
    else:
        best = summary["best"]
        click.echo(f"saved {out}: epoch {best['epoch']}, val {json.dumps(best['val'])}")


@cli.command()
@manifest_option
@lfw_option
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Feature cache folder [next to the manifest: <manifest>.features].",
)
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option(
    "--level",
    type=click.IntRange(0, 3),
    default=0,
    show_default=True,
    help="Probe degradation level of the low-quality protocol.",
)
@click.option(
    "--mode",
    type=click.Choice(["image", "fused", "refine", "text", "score", "words"]),
    default="image",
    show_default=True,
    help="image: ArcFace; fused: TGFR; refine: image shortlist re-ranked by the caption; "
    "text: the caption alone; score, words: the score-fusion and bag-of-words baselines.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="TGFR checkpoint [the one shipped in the package].",
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="ROC curves PNG.")
@click.option(
    "--by",
    type=click.Choice(["gender", "age", "ethnicity"]),
    help="Add false match / non-match rates per group at FAR 1e-3.",
)
@click.option(
    "--open-set",
    "open_set",
    type=float,
    default=0.0,
    help="Leave this fraction of test people out of the gallery; report FNIR@FPIR.",
)
@json_option
@_library_errors
def evaluate(
    manifest: Path,
    lfw: Path,
    cache: Path | None,
    split: str,
    level: int,
    mode: str,
    model_dir: Path | None,
    plot: Path | None,
    by: str | None,
    open_set: float,
    as_json: bool,
) -> None:
    """Identification and verification on held-out people (ignores --db)."""
    from tgfr_search.models.fusion import default_checkpoint
    from tgfr_search.training.evaluate import evaluate as run_evaluation

    features = _cache(manifest, lfw, cache or manifest.with_suffix(".features"))
    doc = run_evaluation(
        features,
        split=split,
        level=level,
        mode=mode,
        model=model_dir or default_checkpoint(),
        plot=plot,
        by=by,
        lfw_root=lfw,
        open_set=open_set,
    )
    if as_json:
        _emit(doc)
    else:
        tar = ", ".join(f"{k} {v:.4f}" for k, v in doc["tar_at_far"].items())
        click.echo(
            f"{split} L{level} {mode}: rank-1 {doc['rank1']:.4f}, rank-5 {doc['rank5']:.4f}, "
            f"TAR@FAR {tar}, EER {doc['eer']:.4f} ({doc['n_probes']} probes, "
            f"{doc['n_gallery']} gallery)"
        )


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cli(prog_name="tgfr-search")


if __name__ == "__main__":
    main()
