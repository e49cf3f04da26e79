"""MiniLM on ONNX Runtime (the CPU backend) against torch, and the cache of its exported graph."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tgfr_search.models import text as text_module
from tgfr_search.models.registry import minilm_dir
from tgfr_search.models.text import MiniLM, TextEncoding

ODD = ["", " ", "\ud800 lone surrogate \x00\x01\x7f", "x y z " * 20_000, "中文描述", "A."]


@pytest.fixture(scope="module")
def captions(lfw: Path) -> list[str]:
    """Sixty generated captions of real LFW faces, of varied lengths."""
    from tgfr_search.training.lfw import iter_manifest

    rows = itertools.islice((r for r in iter_manifest(lfw) if r["captions"]), 30)
    return [c for r in rows for c in r["captions"][:2]]


@pytest.fixture(scope="module")
def on_torch() -> MiniLM:
    return MiniLM(minilm_dir(), backend="torch")


@pytest.fixture(scope="module")
def on_ort() -> MiniLM:
    encoder = MiniLM(minilm_dir())
    encoder.encode(["load"])
    assert encoder.backend == "onnxruntime"
    return encoder


def assert_same(got: TextEncoding, want: TextEncoding) -> None:
    np.testing.assert_array_equal(got.mask, want.mask)
    assert got.tokens.shape == want.tokens.shape and got.tokens.dtype == np.float32
    assert np.abs(got.tokens - want.tokens).max() < 1e-5
    assert not got.tokens[~got.mask].any()
    cosine = (got.sentence * want.sentence).sum(axis=1)
    assert cosine.min() > 1 - 1e-5
    np.testing.assert_allclose(np.linalg.norm(got.sentence, axis=1), 1.0, atol=1e-5)


def test_onnx_matches_torch_on_real_captions(captions, on_ort, on_torch) -> None:
    assert len(captions) == 60 and len({len(c) for c in captions}) > 10
    for caption in captions[:8]:  # one at a time, as a query encodes it
        assert_same(on_ort.encode([caption]), on_torch.encode([caption]))
    assert_same(on_ort.encode(captions), on_torch.encode(captions))  # padded to the longest
    assert_same(on_ort.encode(ODD + captions[:3]), on_torch.encode(ODD + captions[:3]))


def test_padding_does_not_change_a_caption(captions, on_ort) -> None:
    short = min(captions, key=len)
    alone = on_ort.encode([short])
    batch = on_ort.encode([max(captions, key=len), short, "x y z " * 100])
    n = alone.mask.sum()
    assert batch.mask[1].sum() == n and batch.tokens.shape[1] > n
    assert np.abs(batch.tokens[1, :n] - alone.tokens[0, :n]).max() < 1e-5
    assert (batch.sentence[1] @ alone.sentence[0]) > 1 - 1e-6


def test_tokenised_ahead_is_tokenised_now(captions, on_ort) -> None:
    texts = [captions[3], "", captions[0], ODD[2], captions[3]]
    ready = on_ort.tokenize(captions[:8] + ODD)  # more texts than encoded, padded longer
    assert ready.take(["not tokenised"]) is None
    got, want = on_ort.encode(texts, ready=ready), on_ort.encode(texts)
    np.testing.assert_array_equal(got.mask, want.mask)  # the same length: the longest of these
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.sentence, want.sentence)
    missing = on_ort.encode(["not tokenised", texts[0]], ready=ready)  # tokenised now instead
    np.testing.assert_array_equal(
        missing.sentence, on_ort.encode(["not tokenised", texts[0]]).sentence
    )


def test_encode_tensors_on_cpu_is_encode(captions, on_ort) -> None:
    tokens, mask, sentence = on_ort.encode_tensors(captions[:5])
    enc = on_ort.encode(captions[:5])
    assert tokens is not None
    np.testing.assert_array_equal(tokens.numpy(), enc.tokens)
    np.testing.assert_array_equal(mask.numpy(), enc.mask)
    np.testing.assert_array_equal(sentence.numpy(), enc.sentence)


def test_exported_graph_is_cached_and_repaired(tmp_path, monkeypatch, captions, on_torch) -> None:
    # A cache folder that cannot be made: the export is kept in memory, nothing is written.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("TGFR_CACHE_DIR", str(blocked / "cache"))
    in_memory = MiniLM(minilm_dir())
    assert_same(in_memory.encode(captions[:3]), on_torch.encode(captions[:3]))
    assert in_memory.backend == "onnxruntime"

    monkeypatch.setenv("TGFR_CACHE_DIR", str(tmp_path / "cache"))
    MiniLM(minilm_dir()).encode(["first use exports"])
    (cached,) = (tmp_path / "cache" / "text").glob("minilm-*.onnx")
    assert not list(cached.parent.glob("*.tmp"))

    def no_export(*_: object) -> bytes:
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(text_module, "_export_onnx", no_export)
    again = MiniLM(minilm_dir())  # a later process: reads the file, exports nothing
    assert_same(again.encode(captions[:3]), on_torch.encode(captions[:3]))
    assert again.backend == "onnxruntime"

    cached.write_bytes(b"not an onnx file")  # damaged: dropped, and with no exporter, torch
    with pytest.warns(UserWarning, match="stays on torch: ONNX export failed"):
        fallback = MiniLM(minilm_dir())
        got = fallback.encode(captions[:3])
    assert fallback.backend == "torch" and not cached.exists()
    assert_same(got, on_torch.encode(captions[:3]))


def test_torch_backend_can_be_chosen_and_others_are_refused() -> None:
    assert MiniLM(minilm_dir(), backend="torch").backend == "torch"
    assert MiniLM(minilm_dir(), half=True).backend == "torch"  # fp16 weights: torch
    with pytest.raises(ValueError, match="backend must be auto or torch"):
        MiniLM(minilm_dir(), backend="tensorrt")


def test_rust_tokenizer_gives_the_wrappers_inputs(captions, on_ort) -> None:
    """`_tokenize` (the Rust tokenizer alone) feeds the model what `transformers` would."""
    from tgfr_search.models.text import _sanitise

    tokenizer, _ = on_ort._load()
    assert on_ort._fast is not None
    odd = ["", " ", "x" * 5000, "glasses " * 200, "café über 😀 眼镜", "a\ud800b"]
    clean = [_sanitise(t, on_ort.max_length * 200) for t in [*captions, *odd]]
    got = on_ort._tokenize(tokenizer, clean)
    want = tokenizer(clean, padding=True, truncation=True, max_length=on_ort.max_length)
    assert set(got) == set(want)
    for name, ids in got.items():
        assert ids.dtype == np.int64
        assert np.array_equal(ids, np.array(want[name])), name
