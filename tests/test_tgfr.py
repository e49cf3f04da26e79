"""TGFR heads and losses on tiny tensors: shapes, norms, masking, gradients, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tgfr_search.models.tgfr import TGFR, TGFRConfig, wrcl_scores
from tgfr_search.training import losses

SMALL = dict(
    face_dim=32,
    region_dim=16,
    n_regions=9,
    text_dim=24,
    embed_dim=16,
    cross_dim=8,
    heads=2,
    ffn_dim=32,
    dropout=0.0,
)


def _batch(b=6, length=7, cfg=None, seed=0):
    cfg = cfg or TGFRConfig(**SMALL)
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 4:] = False
    return dict(
        globals_=F.normalize(torch.randn(b, cfg.face_dim, generator=g), dim=1),
        norms=torch.rand(b, generator=g) * 20 + 5,
        regions=torch.randn(b, cfg.n_regions, cfg.region_dim, generator=g).half(),
        tokens=torch.randn(b, length, cfg.text_dim, generator=g).half(),
        mask=mask,
        sentence=F.normalize(torch.randn(b, cfg.text_dim, generator=g), dim=1),
    )


@pytest.mark.parametrize("use_regions", [True, False])
def test_shapes_and_norms(use_regions):
    cfg = TGFRConfig(**SMALL, use_regions=use_regions)
    model = TGFR(cfg).eval()
    x = _batch(cfg=cfg)
    img = model.encode_image(x["globals_"], x["norms"], x["regions"])
    txt = model.encode_text(x["tokens"], x["mask"], x["sentence"])
    assert img["global"].shape == (6, 16) and txt["sentence"].shape == (6, 16)
    assert torch.allclose(img["global"].norm(dim=1), torch.ones(6), atol=1e-5)
    if use_regions:
        assert img["regions"].shape == (6, 9, 16)
        assert torch.allclose(img["regions"].norm(dim=-1), torch.ones(6, 9), atol=1e-5)
        assert txt["words"].shape == (6, 7, 16)
        assert (txt["words"][0, 4:] == 0).all()  # padded words are zero
    fused = model.fuse(img, txt)
    assert fused.shape == (6, cfg.fused_dim)
    assert torch.allclose(fused.norm(dim=1), torch.ones(6), atol=1e-5)


def test_padding_does_not_change_text():
    model = TGFR(TGFRConfig(**SMALL)).eval()
    x = _batch()
    img = model.encode_image(x["globals_"], x["norms"], x["regions"])
    txt = model.encode_text(x["tokens"], x["mask"], x["sentence"])
    a = model.fuse(img, txt)[0]
    # Garbage in padded positions must not reach the fused vector.
    tokens = x["tokens"].clone()
    tokens[0, 4:] = 100.0
    txt2 = model.encode_text(tokens, x["mask"], x["sentence"])
    assert torch.allclose(model.fuse(img, txt2)[0], a, atol=1e-5)


def test_no_text_falls_back_to_face_part():
    model = TGFR(TGFRConfig(**SMALL)).eval()
    x = _batch()
    img = model.encode_image(x["globals_"], x["norms"], x["regions"])
    txt = model.encode_text(x["tokens"], x["mask"], x["sentence"])
    has = torch.tensor([True, False, True, True, False, True])
    fused = model.fuse(img, txt, has_text=has)
    assert (fused[~has, 32:] == 0).all()
    assert torch.allclose(fused[~has, :32], img["face"][~has], atol=1e-5)


def test_fresh_model_keeps_arcface_dominant():
    # The residual starts at zero, so a new model's face part is exactly ArcFace.
    model = TGFR(TGFRConfig(**SMALL)).eval()
    x = _batch()
    img = model.encode_image(x["globals_"], x["norms"], x["regions"])
    assert torch.allclose(img["face"], x["globals_"], atol=1e-5)
    # Lower quality (smaller norm) gives the cross part more weight.
    theta = model.mix_angle(model.quality(torch.tensor([5.0, 30.0])))
    assert theta[0] > theta[1]


def test_caption_image_score_precomputed_matches():
    model = TGFR(TGFRConfig(**SMALL)).eval()
    x = _batch()
    img = model.encode_image(x["globals_"], x["norms"], x["regions"])
    txt = model.encode_text(x["tokens"], x["mask"], x["sentence"])
    s = model.caption_image_score(txt, img)
    assert torch.allclose(s, model.caption_image_score(txt, img["global"]))
    assert s.shape == (6, 6)
    s2 = model.caption_image_score(txt, img, word_region=True)
    assert s2.shape == (6, 6) and not torch.allclose(s, s2)


def test_save_load_roundtrip(tmp_path):
    cfg = TGFRConfig(**SMALL)
    model = TGFR(cfg).eval()
    x = _batch()
    with torch.no_grad():
        before = model(**x)
    model.save(tmp_path / "ck", fingerprints={"face": "arc:1"}, summary={"val": {"rank1": 0.5}})
    meta = json.loads((tmp_path / "ck/config.json").read_text())
    assert meta["fingerprints"] == {"face": "arc:1"} and meta["fused_dim"] == 40
    loaded = TGFR.load(tmp_path / "ck")
    assert loaded.config == cfg and loaded.summary["val"]["rank1"] == 0.5
    with torch.no_grad():
        assert torch.allclose(loaded(**x), before, atol=1e-6)
    assert loaded.fingerprint == model.fingerprint


def test_load_missing_raises(tmp_path):
    from tgfr_search.errors import ModelFileError

    with pytest.raises(ModelFileError):
        TGFR.load(tmp_path)


# ---- losses ---------------------------------------------------------------------------


def test_cicl_alignment_and_identity_mask():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(8, 16), dim=1)
    labels = torch.arange(8)
    perfect = losses.cicl(x, x, labels, scale=20.0)
    shuffled = losses.cicl(x, x[torch.randperm(8)], labels, scale=20.0)
    assert perfect < 0.05 < shuffled
    # Two rows of one person with identical features: without the mask they would be
    # confusable negatives; with it the loss stays as low as for distinct people.
    y = x.clone()
    y[1] = y[0]
    same = torch.tensor([0, 0, 2, 3, 4, 5, 6, 7])
    assert losses.cicl(y, y, same, scale=20.0) < 0.05
    assert losses.cicl(y, y, labels, scale=20.0) > 0.15  # 2 of 8 rows at log 2


def test_info_nce_gradients_flow():
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    loss = losses.cicl(F.normalize(a, dim=1), F.normalize(b, dim=1), torch.arange(5))
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_wrcl_scores_and_loss():
    torch.manual_seed(1)
    regions = F.normalize(torch.randn(4, 6, 8), dim=-1)
    # Captions whose words are exactly regions of their own image.
    words = regions[:, :3].clone()
    mask = torch.ones(4, 3, dtype=torch.bool)
    s = wrcl_scores(words, mask, regions, 4.0, 5.0)
    assert s.shape == (4, 4)
    assert (s.diagonal() > s.masked_fill(torch.eye(4, dtype=torch.bool), -9).max(1).values).all()
    labels = torch.arange(4)
    matched = losses.wrcl(words, mask, regions, labels)
    mismatched = losses.wrcl(words, mask, regions.roll(1, 0), labels)
    assert matched < mismatched
    # A masked word does not count: garbage there leaves the score unchanged.
    mask2 = mask.clone()
    mask2[:, 2] = False
    w2 = words.clone()
    w2[:, 2] = F.normalize(torch.randn(4, 8), dim=-1)
    assert torch.allclose(
        wrcl_scores(words[:, :2], mask[:, :2], regions),
        wrcl_scores(w2, mask2, regions),
        atol=1e-5,
    )
    w = words.clone().requires_grad_(True)
    losses.wrcl(w, mask, regions, labels).backward()
    assert w.grad.abs().sum() > 0


def test_supcon():
    torch.manual_seed(2)
    centers = F.normalize(torch.randn(4, 16), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    clustered = F.normalize(centers[labels] + 0.01 * torch.randn(8, 16), dim=1)
    scattered = F.normalize(torch.randn(8, 16), dim=1)
    assert losses.supcon(clustered, labels) < losses.supcon(scattered, labels)
    # No positives: zero, with a graph.
    x = scattered.clone().requires_grad_(True)
    z = losses.supcon(x, torch.arange(8))
    assert z.item() == 0.0
    z.backward()


def test_arc_margin():
    torch.manual_seed(3)
    head = losses.ArcMarginLoss(16, 5, s=30.0, m=0.5)
    labels = torch.tensor([0, 1, 2, 3, 4])
    on_center = head.weight.detach().clone()
    far = -on_center
    assert head(on_center, labels) < 0.1 < head(far, labels)
    # The margin lowers the true-class logit below plain scaled cosine.
    logits = head.logits(on_center, labels)
    assert torch.allclose(
        logits[0, 0], torch.tensor(30 * torch.cos(torch.tensor(0.5)).item()), atol=0.02
    )
    x = torch.randn(5, 16, requires_grad=True)
    head(x, labels).backward()
    assert x.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_model_gradients_flow_through_all_losses():
    cfg = TGFRConfig(**SMALL)
    model = TGFR(cfg).train()
    x = _batch(b=6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    img = model.encode_image(x["globals_"], x["norms"], x["regions"])
    txt = model.encode_text(x["tokens"], x["mask"], x["sentence"])
    fused = model.fuse(img, txt)
    head = losses.ArcMarginLoss(cfg.fused_dim, 3)
    loss = (
        losses.cicl(txt["sentence"], img["global"], labels)
        + losses.wrcl(txt["words"], txt["mask"], img["regions"], labels)
        + losses.supcon(img["global"], labels)
        + head(fused, labels)
    )
    loss.backward()
    for name in [
        "img_global.0.weight",
        "sent.0.weight",
        "region_in.weight",
        "w2r.attn.in_proj_weight",
        "cross.0.weight",
        "theta",
        "word_convs.1.weight",
    ]:
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_wrcl_scores_match_direct_context():
    """The Gram-matrix shortcut equals building each word's region context explicitly."""
    torch.manual_seed(4)
    words = F.normalize(torch.randn(3, 5, 8), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    words = words * mask[..., None]
    regions = F.normalize(torch.randn(4, 6, 8), dim=-1)
    s = torch.einsum("tld,ird->tilr", words, regions)
    m = mask[:, None, :, None]
    a = torch.softmax(s.masked_fill(~m, float("-inf")), dim=2).masked_fill(~m, 0.0)
    a = torch.softmax(4.0 * a, dim=3)
    ctx = torch.einsum("tilr,ird->tild", a, regions)
    r = F.cosine_similarity(ctx, words[:, None], dim=-1)
    r = (5.0 * r).masked_fill(~mask[:, None, :], float("-inf"))
    direct = torch.logsumexp(r, dim=2) / 5.0
    assert torch.allclose(wrcl_scores(words, mask, regions, 4.0, 5.0), direct, atol=1e-5)
