"""Rotations: norm fusion + R1/R2/R3/R4 leave the float model's logits unchanged; the OffQ R1 maps
the outlier direction onto a constant over one activation group."""
import numpy as np
import pytest

from offq.model.arch import architecture_of
from offq.model.config import ModelConfig
from offq.quant.online import r3_qk_transform, r4_input_transform
from offq.recipe import rotations as rot


# ------------------------------------------------------------------ minimal numpy Llama forward
def rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope(x, theta):
    t, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + half * sin


def forward(w, cfg, ids, *, qk_transform=None, down_input_transform=None):
    """Plain Llama/Qwen2 forward in float64 -> logits [T, V]."""
    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    t, hd, nh, nkv = len(ids), cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)

        def lin(name, v):
            y = v @ w[p + name + ".weight"].T
            return y + w[p + name + ".bias"] if p + name + ".bias" in w else y
        q = lin("self_attn.q_proj", h).reshape(t, nh, hd).transpose(1, 0, 2)
        k = lin("self_attn.k_proj", h).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = lin("self_attn.v_proj", h).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        if qk_transform is not None:
            q, k = qk_transform(q, k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        x = x + lin("self_attn.o_proj", o)
        h = rms(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g, u = lin("mlp.gate_proj", h), lin("mlp.up_proj", h)
        m = g / (1 + np.exp(-g)) * u
        if down_input_transform is not None:
            m = down_input_transform(m)
        x = x + lin("mlp.down_proj", m)
    x = rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


#: (architecture, attention_bias, mlp_bias): Llama without biases, with HF's attention_bias
#: (q/k/v/o biases), with mlp_bias (gate/up/down biases), both; Qwen2 (q/k/v biases)
BIAS_VARIANTS = [("llama", False, False), ("llama", True, False), ("llama", False, True),
                 ("llama", True, True), ("qwen2", True, False)]


def tiny_model(seed, *, bias=False, tie=True, d=64, hd=16, nh=4, nkv=2, f=128, layers=2, v=97,
               arch="qwen2", mlp_bias=False):
    """Random float32 weights of a tiny model (HF names) and its ModelConfig; ``bias`` is the
    config's attention_bias (always on for qwen2)."""
    if arch == "qwen2" and not bias:
        arch = "llama"  # a model without q/k/v biases is a Llama
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(architecture=arch, vocab_size=v, hidden_size=d, intermediate_size=f,
                      num_hidden_layers=layers, num_attention_heads=nh, num_key_value_heads=nkv,
                      head_dim=hd, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tie, attention_bias=bias or arch == "qwen2",
                      mlp_bias=mlp_bias)
    f32 = lambda *s, scale=0.2: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    shapes = cfg.tensor_shapes()
    w = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            w[name] = (1 + f32(*shape)).astype(np.float32)
        elif name.endswith("embed_tokens.weight"):
            w[name] = f32(*shape, scale=1.0)
        else:
            w[name] = f32(*shape)
    return w, cfg


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def outlier_cov(d, rng):
    """Second moment with one dominant direction (all channels positive, like massive acts)."""
    u = np.abs(rng.standard_normal(d))
    u /= np.linalg.norm(u)
    x = rng.standard_normal((200, d))
    return x.T @ x + 1e4 * np.outer(u, u), u


# ------------------------------------------------------------------ tests
def test_norm_fusion_keeps_logits():
    for bias, tie in [(False, True), (True, False)]:
        w, cfg = tiny_model(0, bias=bias, tie=tie)
        ids = np.arange(11) % cfg.vocab_size
        ref = forward(w, cfg, ids)
        fused = dict(w)
        rot.fuse_norms(fused, cfg.num_hidden_layers, architecture_of(cfg))
        assert "lm_head.weight" in fused
        assert all(np.all(fused[k] == 1) for k in fused if k.endswith("norm.weight"))
        assert rel(forward(fused, cfg, ids), ref) < 1e-5


@pytest.mark.parametrize("variant", ["offq", "offq-standard-unsorted-other", "offq-none", "quarot"])
@pytest.mark.parametrize("arch,bias,mlp_bias", BIAS_VARIANTS)
@pytest.mark.parametrize("tie", [True, False])
def test_full_rotation_invariance(variant, arch, bias, mlp_bias, tie):
    """Fuse norms, R1, R2 (Hadamard or per-head PCA) and R4; run with online R3/R4: logits equal
    the original model's (float32 weights, <= 1e-4 relative), with every bias placement of the
    supported architectures (o_proj and down_proj biases live in the residual basis)."""
    w, cfg = tiny_model(1, bias=bias, tie=tie, arch=arch, mlp_bias=mlp_bias)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 13)
    ref = forward(w, cfg, ids)
    rng = np.random.default_rng(3)
    cov, _ = outlier_cov(cfg.hidden_size, rng)
    if variant == "quarot":
        r1 = rot.quarot_r1(cfg.hidden_size, seed=0)
    elif variant == "offq":
        r1 = rot.offq_r1(cov, cfg.hidden_size, 16)
    elif variant == "offq-none":
        r1 = rot.offq_r1(None, cfg.hidden_size, 16, pca="none")
    else:
        r1 = rot.offq_r1(cov, cfg.hidden_size, 32, pca="standard", sorted_groups=False,
                         outlier_index="other")
    np.testing.assert_allclose(r1 @ r1.T, np.eye(cfg.hidden_size), atol=1e-12)
    if variant == "offq":
        covs = np.stack([outlier_cov(cfg.head_dim, rng)[0] for _ in range(cfg.num_key_value_heads)])
        r2 = rot.r2_matrices(cfg.head_dim, cfg.num_key_value_heads, covs)
    else:
        r2 = rot.r2_matrices(cfg.head_dim, cfg.num_key_value_heads)
    out = dict(w)
    rot.fuse_norms(out, cfg.num_hidden_layers, architecture_of(cfg))
    rot.rotate_model(out, cfg, r1=r1, r2=r2, r4=True)
    assert all(v.dtype == np.float32 for v in out.values())
    qk = r3_qk_transform(cfg.head_dim)
    down = r4_input_transform(cfg.intermediate_size)
    got = forward(out, cfg, ids,
                  qk_transform=lambda q, k: tuple(a.astype(np.float64) for a in qk(q, k)),
                  down_input_transform=lambda m: down(m).astype(np.float64))
    assert rel(got, ref) < 1e-4, rel(got, ref)
    # R3 and R4 are both needed: dropping the online R4 breaks the product
    broken = forward(out, cfg, ids)
    assert rel(broken, ref) > 1e-2


def test_offq_r1_maps_outliers_to_group_constants():
    """The top direction lands on the all-ones Hadamard row of group 0 (a constant over the
    group), the next ranks lead groups 1.. (sorted grouping); with outlier_index='other' it is
    no longer constant."""
    rng = np.random.default_rng(4)
    d, g = 64, 16
    x = rng.standard_normal((500, d))
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = np.array([1000.0, 300.0, 100.0, 30.0] + [1.0] * (d - 4))
    cov = basis @ np.diag(spectrum) @ basis.T + 1e-3 * (x.T @ x)
    vals, u1 = rot.pca_basis(cov)
    assert np.all(np.diff(vals) <= 0)
    r1 = rot.offq_r1(cov, d, g)
    for b in range(d // g):
        y = u1[:, b] @ r1
        np.testing.assert_allclose(np.abs(y[b * g:(b + 1) * g]), 1 / np.sqrt(g), atol=1e-9)
        assert np.ptp(y[b * g:(b + 1) * g]) < 1e-9  # one constant over the group
        assert np.abs(np.delete(y, np.s_[b * g:(b + 1) * g])).max() < 1e-9
    other = rot.offq_r1(cov, d, g, outlier_index="other")
    assert np.ptp((u1[:, 0] @ other)[:g]) > 1.9 / np.sqrt(g)  # +-1/sqrt(g) pattern
    unsorted = rot.offq_r1(cov, d, g, sorted_groups=False)
    assert np.abs((u1[:, 1] @ unsorted)[g:]).max() < 1e-9  # rank 1 stays in group 0


def test_sorted_grouping_permutation():
    order = rot.sorted_grouping(12, 4)  # G = 3
    assert list(order) == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    with pytest.raises(ValueError, match="divide"):
        rot.sorted_grouping(12, 5)


def test_quarot_r1_orthogonal_and_seeded():
    a, b = rot.quarot_r1(32, seed=1), rot.quarot_r1(32, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a @ a.T, np.eye(32), atol=1e-12)
    assert not np.array_equal(a, rot.quarot_r1(32, seed=2))


def test_validation():
    with pytest.raises(ValueError, match="pca"):
        rot.offq_r1(np.eye(8), 8, 4, pca="robust")
    with pytest.raises(ValueError, match="cov"):
        rot.offq_r1(np.eye(4), 8, 4)
    with pytest.raises(ValueError, match="NaN"):
        rot.pca_basis(np.full((4, 4), np.nan))
    w, cfg = tiny_model(0)
    with pytest.raises(ValueError, match="r2"):
        rot.rotate_layer(dict(w), 0, cfg, r2=np.zeros((3, 16, 16)))


def test_non_power_of_two_sizes():
    """d = 48 = 12 x 4 (QuaRot full Hadamard) and blocks of 12: needs the real kernels."""
    w, cfg = tiny_model(5, d=48, hd=12, nh=4, nkv=2, f=96)
    ids = np.arange(9)
    ref = forward(w, cfg, ids)
    for r1 in (rot.quarot_r1(48, seed=0), rot.offq_r1(outlier_cov(48, np.random.default_rng(0))[0], 48, 12)):
        out = dict(w)
        rot.fuse_norms(out, cfg.num_hidden_layers, architecture_of(cfg))
        rot.rotate_model(out, cfg, r1=r1, r2=rot.r2_matrices(12, 2), r4=True)
        qk, down = r3_qk_transform(12), r4_input_transform(96)
        got = forward(out, cfg, ids, qk_transform=lambda q, k: tuple(a.astype(np.float64) for a in qk(q, k)),
                      down_input_transform=lambda m: down(m).astype(np.float64))
        assert rel(got, ref) < 1e-4


@pytest.mark.parametrize("arch,bias,mlp_bias", BIAS_VARIANTS)
def test_invariance_through_offq_forward(arch, bias, mlp_bias):
    """Same invariance through offq's own float32 forward (offq.model.Model) with its R3/R4 hooks."""
    from offq.model import Model

    w, cfg = tiny_model(6, bias=bias, tie=True, arch=arch, mlp_bias=mlp_bias)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 12))
    ref = Model.from_tensors(cfg, w).forward(ids)
    out = dict(w)
    rot.fuse_norms(out, cfg.num_hidden_layers, architecture_of(cfg))
    cov, _ = outlier_cov(cfg.hidden_size, np.random.default_rng(8))
    rot.rotate_model(out, cfg, r1=rot.offq_r1(cov, cfg.hidden_size, 16),
                     r2=rot.r2_matrices(cfg.head_dim, cfg.num_key_value_heads), r4=True)
    qk, down = r3_qk_transform(cfg.head_dim), r4_input_transform(cfg.intermediate_size)

    def hook(layer):
        layer.qk_transform, layer.down_input_transform = qk, down
        return layer

    got = Model.from_tensors(cfg.replace(tie_word_embeddings=False), out, layer_hook=hook).forward(ids)
    assert rel(got, ref) < 1e-4, rel(got, ref)


# ---------------------------------------------------------------------- found by mutation
def test_pca_basis_fixes_each_direction_s_sign():
    """Each eigenvector's largest entry is positive, whatever sign LAPACK returns: R1 and the
    checkpoint are then the same bits on every build (dropping the fix flips column 0 here)."""
    vals, vecs = rot.pca_basis(np.array([[2.0, 1.0], [1.0, 2.0]]))
    np.testing.assert_allclose(vecs, np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2), atol=1e-12)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6))
    _, vecs = rot.pca_basis(x.T @ x)
    assert np.all(vecs[np.abs(vecs).argmax(axis=0), np.arange(6)] > 0)
