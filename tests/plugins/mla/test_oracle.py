"""Tests of the HF-based MLA oracle itself (tests/helpers/mla_oracle.py), CPU only."""

import dataclasses
import math

import pytest
import torch

from tests.helpers.mla_oracle import MLAShape, expected_weight_shapes, hf_mla, random_weights

SHAPE = MLAShape(
    hidden=32,
    heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=8,
    v_head_dim=6,
)
YARN = {
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
}


def _x(shape, batch=2, seq=7, seed=1):
    return torch.randn(batch, seq, shape.hidden, generator=torch.Generator().manual_seed(seed))


def _reference_mla(w, x, s):
    """Independent re-implementation of the math documented in mla_oracle's docstring (a)-(d)."""
    b, t, _ = x.shape
    n, nope, rope, v = s.heads, s.qk_head_dim, s.qk_pos_emb_head_dim, s.v_head_dim

    def rms(z, g):
        return g * z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + s.eps)

    if s.q_lora_rank is None:
        q = x @ w["linear_q_proj.weight"].T
    else:
        q = rms(x @ w["linear_q_down_proj.weight"].T, w["q_layernorm.weight"]) @ w["linear_q_up_proj.weight"].T
    q = q.view(b, t, n, nope + rope)
    q_nope, q_rope = q[..., :nope], q[..., nope:]
    ckv = x @ w["linear_kv_down_proj.weight"].T
    latent, k_rope = ckv[..., : s.kv_lora_rank], ckv[..., s.kv_lora_rank :]
    kv = (rms(latent, w["kv_layernorm.weight"]) @ w["linear_kv_up_proj.weight"].T).view(b, t, n, nope + v)
    k_nope, val = kv[..., :nope], kv[..., nope:]
    k_rope = k_rope[:, :, None, :].expand(b, t, n, rope)

    # (d) inv_freq and (c) attention factor
    d = rope
    exps = torch.arange(0, d, 2, dtype=torch.float32) / d
    base_inv = 1.0 / (s.rope_theta**exps)
    scale = (nope + rope) ** -0.5
    att = 1.0
    inv = base_inv
    if s.yarn is not None:
        f = float(s.yarn["factor"])
        big_l = s.yarn["original_max_position_embeddings"]

        def corr(r):
            return d * math.log(big_l / (r * 2 * math.pi)) / (2 * math.log(s.rope_theta))

        lo = max(math.floor(corr(s.yarn.get("beta_fast", 32))), 0)
        hi = min(math.ceil(corr(s.yarn.get("beta_slow", 1))), d - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        inv = base_inv / f * ramp + base_inv * (1 - ramp)

        def gm(sc, m=1.0):
            return 1.0 if sc <= 1 else 0.1 * m * math.log(sc) + 1.0

        ms, msa = s.yarn.get("mscale"), s.yarn.get("mscale_all_dim")
        att = gm(f, ms) / gm(f, msa) if (ms and msa) else gm(f)
        if msa:
            scale *= gm(f, msa) ** 2
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]  # [t, d/2]
    cos, sin = (ang.cos() * att)[None, :, None, :], (ang.sin() * att)[None, :, None, :]

    def rot(z):
        if s.rope_interleave:  # pairs (2i, 2i+1), output in [evens | odds] order
            a, bb = z[..., 0::2], z[..., 1::2]
        else:  # pairs (i, i + d/2)
            a, bb = z[..., : d // 2], z[..., d // 2 :]
        return torch.cat((a * cos - bb * sin, bb * cos + a * sin), dim=-1)

    qq = torch.cat((q_nope, rot(q_rope)), -1).transpose(1, 2)
    kk = torch.cat((k_nope, rot(k_rope)), -1).transpose(1, 2)
    logits = qq @ kk.transpose(-1, -2) * scale
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = (logits.softmax(-1) @ val.transpose(1, 2)).transpose(1, 2).reshape(b, t, n * v)
    return o @ w["linear_proj.weight"].T


def test_output_shape_and_finite():
    w = random_weights(SHAPE, seed=0)
    out = hf_mla(w, _x(SHAPE), SHAPE)
    assert out.shape == (2, 7, SHAPE.hidden)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 20.0  # activations O(1)


def test_random_weights_shapes_and_seed():
    w = random_weights(SHAPE, seed=3)
    assert {k: tuple(t.shape) for k, t in w.items()} == expected_weight_shapes(SHAPE)
    assert expected_weight_shapes(SHAPE)["linear_q_up_proj.weight"] == (4 * 16, 24)
    assert expected_weight_shapes(SHAPE)["linear_kv_down_proj.weight"] == (16 + 8, 32)
    assert torch.equal(w["linear_proj.weight"], random_weights(SHAPE, seed=3)["linear_proj.weight"])
    assert not torch.equal(w["linear_proj.weight"], random_weights(SHAPE, seed=4)["linear_proj.weight"])
    assert (w["kv_layernorm.weight"] - 1).abs().max() < 1.0


def test_causal():
    w = random_weights(SHAPE, seed=0)
    x = _x(SHAPE)
    x2 = x.clone()
    x2[:, -1] += 3.0 * torch.randn(x.shape[0], x.shape[2])
    out, out2 = hf_mla(w, x, SHAPE), hf_mla(w, x2, SHAPE)
    torch.testing.assert_close(out[:, :-1], out2[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(out[:, -1], out2[:, -1])
    # position 0 attends only to itself: a length-1 run gives the same first row
    torch.testing.assert_close(hf_mla(w, x[:, :1], SHAPE), out[:, :1], rtol=1e-5, atol=1e-6)


def test_q_lora_rank_none_runs():
    s = dataclasses.replace(SHAPE, q_lora_rank=None)
    w = random_weights(s, seed=0)
    assert "linear_q_proj.weight" in w and "linear_q_down_proj.weight" not in w
    out = hf_mla(w, _x(s), s)
    assert out.shape == (2, 7, s.hidden) and torch.isfinite(out).all()


def test_yarn_differs_from_plain_rope():
    w = random_weights(SHAPE, seed=0)
    x = _x(SHAPE)
    plain = hf_mla(w, x, SHAPE)
    yarn = hf_mla(w, x, dataclasses.replace(SHAPE, yarn=YARN))
    assert not torch.allclose(plain[:, 1:], yarn[:, 1:], atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"rope_interleave": False},
        {"q_lora_rank": None},
        {"yarn": YARN},
        {"yarn": YARN, "rope_interleave": False},
        {"yarn": {"factor": 8.0, "original_max_position_embeddings": 4, "mscale": 0.5, "mscale_all_dim": 1.0}},
        {"yarn": {"factor": 2.0, "original_max_position_embeddings": 32}},
    ],
)
def test_matches_documented_math(kw):
    s = dataclasses.replace(SHAPE, **kw)
    w = random_weights(s, seed=5)
    x = _x(s, seq=9)
    torch.testing.assert_close(hf_mla(w, x, s), _reference_mla(w, x, s), rtol=1e-4, atol=1e-5)


def test_interleave_flag_matters():
    w = random_weights(SHAPE, seed=0)
    x = _x(SHAPE)
    a = hf_mla(w, x, SHAPE)
    b = hf_mla(w, x, dataclasses.replace(SHAPE, rope_interleave=False))
    assert not torch.allclose(a[:, 1:], b[:, 1:], atol=1e-4)


def test_missing_and_unexpected_keys_named():
    w = random_weights(SHAPE, seed=0)
    bad = dict(w)
    del bad["kv_layernorm.weight"]
    with pytest.raises(KeyError, match=r"kv_layernorm\.weight"):
        hf_mla(bad, _x(SHAPE), SHAPE)
    extra = dict(w, **{"linear_q_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(KeyError, match=r"unexpected=\['linear_q_proj\.weight'\]"):
        hf_mla(extra, _x(SHAPE), SHAPE)
    s = dataclasses.replace(SHAPE, q_lora_rank=None)  # q-LoRA names are wrong without q_lora_rank
    with pytest.raises(KeyError, match=r"linear_q_down_proj\.weight"):
        hf_mla(w, _x(s), s)


def test_wrong_shape_rejected():
    w = random_weights(SHAPE, seed=0)
    w["kv_layernorm.weight"] = torch.ones(1)  # would silently broadcast in copy_
    with pytest.raises(ValueError, match=r"kv_layernorm\.weight"):
        hf_mla(w, _x(SHAPE), SHAPE)
