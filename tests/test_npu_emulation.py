"""The test-only torch_npu emulation (tests/npu_emulation) against naive references, fp32 to 1e-5.

The emulation is loaded under a private module name, so no other test in this process can see a
`torch_npu`; only the subprocess test puts it on PYTHONPATH the way an emulated-NPU run would.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
EMULATION = REPO / "tests" / "npu_emulation"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _load_emulation():
    name = "_mtrain_tests_torch_npu_emulation"
    package = EMULATION / "torch_npu"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its relative imports resolve under the private name
    spec.loader.exec_module(module)
    return module


npu = _load_emulation()
CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


# ---- independent references ---------------------------------------------------------------


def reference(q, k, v, scale, hidden=None):
    """softmax(q k^T * scale, hidden -> -inf) v; q [B,N,Sq,D], k/v [B,N_kv,Skv,D], True = hidden."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def to_layout(x, layout):
    """[B,N,S,D] -> the layout npu_fusion_attention is given."""
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    return x.permute(0, 2, 1, 3) if layout == "BSND" else x


def causal(sq, skv, offset=0):
    """True where key j lies after query i + offset."""
    return torch.arange(skv)[None, :] > torch.arange(sq)[:, None] + offset


def qkv(b=2, heads=4, kv_heads=4, sq=6, skv=6, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, sq, d, generator=g).to(dtype)
    k = torch.randn(b, kv_heads, skv, d, generator=g).to(dtype)
    v = torch.randn(b, kv_heads, skv, d, generator=g).to(dtype)
    return q, k, v


def attention(q, k, v, **kwargs):
    """npu_fusion_attention on BNSD tensors, returning attention_out only."""
    kwargs.setdefault("scale", q.shape[-1] ** -0.5)
    return npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", **kwargs)[0]


# ---- npu_fusion_attention -----------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa4to2"])
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
def test_every_layout_equals_reference(layout, kv_heads):
    q, k, v = qkv(kv_heads=kv_heads, sq=5, skv=7)
    scale = 8**-0.5
    out = npu.npu_fusion_attention(
        to_layout(q, layout), to_layout(k, layout), to_layout(v, layout), 4, layout, scale=scale
    )[0]
    torch.testing.assert_close(out, to_layout(reference(q, k, v, scale), layout), **TOL)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa4to2"])
def test_tnd_equals_each_sequence_alone(kv_heads):
    lengths, ends = [3, 4, 5], [3, 7, 12]
    q, k, v = qkv(b=1, kv_heads=kv_heads, sq=12, skv=12)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # [T, N, D]
    out = npu.npu_fusion_attention(
        *packed, 4, "TND", scale=0.3, actual_seq_qlen=ends, actual_seq_kvlen=torch.tensor(ends)
    )[0]
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        expected = reference(q[:, :, part], k[:, :, part], v[:, :, part], 0.3)
        torch.testing.assert_close(out[part], expected[0].transpose(0, 1), **TOL)
        start += length


def test_outputs_have_the_real_ops_shapes_and_softmax_statistics():
    q, k, v = qkv(sq=5, skv=7)
    out, row_max, row_sum, softmax_out, seed, offset, numels = npu.npu_fusion_attention(
        q, k, v, 4, "BNSD", scale=0.5
    )
    scores = 0.5 * q @ k.transpose(-1, -2)
    expected_max = scores.amax(-1, keepdim=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert row_max.shape == row_sum.shape == (2, 4, 5, 8) and row_max.dtype == torch.float32
    torch.testing.assert_close(row_max, expected_max.expand(-1, -1, -1, 8), **TOL)
    torch.testing.assert_close(
        row_sum, torch.exp(scores - expected_max).sum(-1, keepdim=True).expand(-1, -1, -1, 8), **TOL
    )
    assert softmax_out.numel() == 0 and (seed, offset, numels) == (0, 0, 0)
    tnd = npu.npu_fusion_attention(
        *(t[0].transpose(0, 1) for t in (q, q, v[:, :, :5])), 4, "TND",
        actual_seq_qlen=[2, 5], actual_seq_kvlen=[2, 5],
    )  # fmt: skip
    assert tnd[1].shape == tnd[2].shape == (5, 4, 8)


def test_mask_true_means_masked_out():
    q, k, v = qkv()
    only_key0 = torch.ones(6, 6, dtype=torch.bool)
    only_key0[:, 0] = False
    out = attention(q, k, v, atten_mask=only_key0, sparse_mode=1)
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out), **TOL)


@pytest.mark.parametrize("shape", [(6, 6), (1, 1, 6, 6), (2, 1, 6, 6), (2, 4, 6, 6)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_every_mask_shape_equals_reference(shape, dtype):
    q, k, v = qkv()
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.4
    mask &= ~torch.eye(6, dtype=torch.bool)  # every query keeps at least its own key
    out = attention(q, k, v, atten_mask=mask.to(dtype))
    torch.testing.assert_close(out, reference(q, k, v, 8**-0.5, mask), **TOL)


@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0])
def test_scale_multiplies_the_scores(scale):
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, scale=scale), reference(q, k, v, scale), **TOL)


def test_left_up_causal_equals_dense_causal_mask_and_reference():
    q, k, v = qkv()
    compressed = attention(q, k, v, atten_mask=CAUSAL_2048, sparse_mode=2)
    dense = attention(q, k, v, atten_mask=causal(6, 6), sparse_mode=0)
    torch.testing.assert_close(compressed, dense, atol=0, rtol=0)
    torch.testing.assert_close(compressed, reference(q, k, v, 8**-0.5, causal(6, 6)), **TOL)


def test_causal_alignment_when_fewer_queries_than_keys():
    q, k, v = qkv(sq=3, skv=7)
    right_down = attention(q, k, v, atten_mask=CAUSAL_2048, sparse_mode=3)
    left_up = attention(q, k, v, atten_mask=CAUSAL_2048, sparse_mode=2)
    torch.testing.assert_close(right_down, reference(q, k, v, 8**-0.5, causal(3, 7, 7 - 3)), **TOL)
    torch.testing.assert_close(left_up, reference(q, k, v, 8**-0.5, causal(3, 7)), **TOL)


def test_band_mode_keeps_pre_to_next_tokens_aligned_bottom_right():
    q, k, v = qkv(sq=4, skv=7)
    out = attention(q, k, v, atten_mask=CAUSAL_2048, sparse_mode=4, pre_tockens=2, next_tockens=1)
    i, j = torch.arange(4)[:, None] + (7 - 4), torch.arange(7)[None, :]
    torch.testing.assert_close(out, reference(q, k, v, 8**-0.5, (j < i - 2) | (j > i + 1)), **TOL)


def test_default_mode_band_applies_only_together_with_a_mask():
    q, k, v = qkv()
    no_mask = attention(q, k, v, pre_tockens=1, next_tockens=0)
    with_mask = attention(
        q, k, v, atten_mask=torch.zeros(6, 6, dtype=torch.bool), pre_tockens=1, next_tockens=0
    )
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    torch.testing.assert_close(no_mask, reference(q, k, v, 8**-0.5), **TOL)
    torch.testing.assert_close(with_mask, reference(q, k, v, 8**-0.5, (j < i - 1) | (j > i)), **TOL)


def test_tnd_right_down_causal_is_causal_within_each_sequence():
    lengths, ends = [3, 4, 5], [3, 7, 12]
    q, k, v = qkv(b=1, kv_heads=2, sq=12, skv=12)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    out = npu.npu_fusion_attention(
        *packed, 4, "TND", scale=0.3, atten_mask=CAUSAL_2048, sparse_mode=3,
        actual_seq_qlen=ends, actual_seq_kvlen=ends,
    )[0]  # fmt: skip
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        expected = reference(
            q[:, :, part], k[:, :, part], v[:, :, part], 0.3, causal(length, length)
        )
        torch.testing.assert_close(out[part], expected[0].transpose(0, 1), **TOL)
        start += length


def test_a_fully_masked_row_gives_zeros_and_finite_gradients():
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = causal(6, 6).clone()
    mask[2] = True
    out = attention(q, k, v, atten_mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    keep = [0, 1, 3, 4, 5]
    expected = reference(q.detach(), k.detach(), v.detach(), 8**-0.5, mask)
    torch.testing.assert_close(out[:, :, keep].detach(), expected[:, :, keep], **TOL)
    assert all(t.grad.isfinite().all() for t in (q, k, v))


REFUSALS = {
    "compressed-mask-shape": (
        dict(atten_mask=causal(6, 6), sparse_mode=2),
        ValueError,
        "compressed",
    ),
    "compressed-mask-missing": (dict(sparse_mode=3), ValueError, "compressed"),
    "tnd-without-seqlen": (dict(layout="TND"), ValueError, "actual_seq_qlen"),
    "seqlen-without-tnd": (dict(actual_seq_qlen=[6], actual_seq_kvlen=[6]), ValueError, "TND"),
    "pse": (dict(pse=torch.zeros(2, 4, 6, 6)), NotImplementedError, "pse"),
    "sparse-mode-5": (dict(sparse_mode=5), NotImplementedError, "sparse_mode=5"),
    "float-mask": (dict(atten_mask=torch.zeros(6, 6)), TypeError, "bool or uint8"),
}


@pytest.mark.parametrize("kwargs,error,match", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals(kwargs, error, match):
    q, k, v = qkv(b=1)
    layout = kwargs.pop("layout", "BNSD")
    if layout == "TND":
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
    with pytest.raises(error, match=match):
        npu.npu_fusion_attention(q, k, v, 4, layout, **kwargs)


def test_keep_prob_one_is_deterministic():
    q, k, v = qkv()
    assert torch.equal(attention(q, k, v, keep_prob=1.0), attention(q, k, v, keep_prob=1.0))


def test_keep_prob_half_drops_about_half_and_rescales_the_rest():
    q, _, _ = qkv(sq=32, skv=32, d=32)
    k = torch.randn_like(q)
    identity = torch.eye(32).expand(2, 4, 32, 32)  # with v = I the output is the probabilities
    probs = reference(q, k, identity, 0.2)
    torch.manual_seed(0)
    draws = torch.stack([attention(q, k, identity, scale=0.2, keep_prob=0.5) for _ in range(20)])
    kept = draws != 0
    assert 0.45 < kept.float().mean() < 0.55
    torch.testing.assert_close(draws[kept], (2 * probs).expand_as(draws)[kept], **TOL)
    assert abs(draws.mean() / probs.mean() - 1) < 0.02  # E[dropout(p)] = p


@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_gradients_equal_reference_gradients(layout):
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(2)) < 0.3
    mask &= ~torch.eye(6, dtype=torch.bool)
    weight = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for use_emulation in (True, False):
        q, k, v = (t.requires_grad_() for t in qkv(kv_heads=2))
        if use_emulation:
            out = npu.npu_fusion_attention(
                *(to_layout(t, layout) for t in (q, k, v)), 4, layout, atten_mask=mask, scale=0.4
            )[0]
            loss = (out * to_layout(weight, layout)).sum()
        else:
            loss = (reference(q, k, v, 0.4, mask) * weight).sum()
        loss.backward()
        grads.append([t.grad for t in (q, k, v)])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TOL)


def _reference_grads(q, k, v, dy, scale, hidden):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.autograd.backward(reference(q, k, v, scale, hidden), dy)
    return [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BNSD"])
def test_attention_grad_of_a_lone_block_equals_autograd(layout):
    q, k, v = qkv(kv_heads=2)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    got = npu.npu_fusion_attention_grad(
        *(to_layout(t, layout) for t in (q, k, v, dy)), 4, layout, atten_mask=CAUSAL_2048,
        scale_value=0.3, sparse_mode=3,
    )  # fmt: skip
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
    for g, expected in zip(got[:3], _reference_grads(q, k, v, dy, 0.3, causal)):
        torch.testing.assert_close(g, to_layout(expected, layout), **TOL)


def test_attention_grad_per_key_block_adds_up_to_the_whole_as_ring_attention_uses_it():
    """Ring context parallelism runs the backward block by block of keys, each with the whole
    attention's softmax statistics and output: the blocks' dq add up to the whole dq, and each
    block's dk / dv are the whole dk / dv of its keys."""
    q, k, v = qkv(kv_heads=2)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    hidden = torch.rand(q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(7)) < 0.3
    hidden[:, 0] = False  # no row fully hidden
    out, row_max, row_sum = npu.npu_fusion_attention(
        q, k, v, 4, "BNSD", atten_mask=hidden, scale=0.3, sparse_mode=1
    )[:3]
    dq_total, dks, dvs = torch.zeros_like(q), [], []
    for cols in (slice(0, 3), slice(3, None)):
        dq, dk, dv, _ = npu.npu_fusion_attention_grad(
            q, k[:, :, cols], v[:, :, cols], dy, 4, "BNSD", atten_mask=hidden[:, cols],
            softmax_max=row_max, softmax_sum=row_sum, attention_in=out, scale_value=0.3,
            sparse_mode=1,
        )  # fmt: skip
        dq_total += dq
        dks.append(dk)
        dvs.append(dv)
    expected = _reference_grads(q, k, v, dy, 0.3, hidden)
    for got, want in zip((dq_total, torch.cat(dks, 2), torch.cat(dvs, 2)), expected):
        torch.testing.assert_close(got, want, **TOL)


def test_attention_grad_tnd_is_each_sequences_own():
    t, n, d = 7, 4, 8
    gen = torch.Generator().manual_seed(8)
    q, k, v, dy = (torch.randn(t, heads, d, generator=gen) for heads in (n, 2, 2, n))  # GQA
    got = npu.npu_fusion_attention_grad(
        q, k, v, dy, n, "TND", atten_mask=CAUSAL_2048, scale_value=0.5, sparse_mode=3,
        actual_seq_qlen=[3, 7], actual_seq_kvlen=[3, 7],
    )  # fmt: skip
    for a, b in ((0, 3), (3, 7)):
        causal = torch.ones(b - a, b - a, dtype=torch.bool).triu(1)
        parts = [x[a:b].transpose(0, 1)[None] for x in (q, k, v, dy)]
        for g, expected in zip(got[:3], _reference_grads(*parts, 0.5, causal)):
            torch.testing.assert_close(g[a:b], expected[0].transpose(0, 1), **TOL)


def test_bf16_in_bf16_out():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = reference(q.float(), k.float(), v.float(), 8**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


# ---- npu_rms_norm, npu_swiglu, rotary ----------------------------------------------------------


def test_rms_norm_equals_formula_and_rstd_keeps_the_normalised_dims():
    x, gamma = torch.randn(2, 3, 8), torch.randn(8)
    y, rstd = npu.npu_rms_norm(x, gamma, epsilon=1e-5)
    expected_rstd = 1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, x * expected_rstd * gamma, **TOL)
    torch.testing.assert_close(rstd, expected_rstd, **TOL)
    assert rstd.shape == (2, 3, 1) and rstd.dtype == torch.float32
    _, rstd2 = npu.npu_rms_norm(x, torch.randn(3, 8))
    assert rstd2.shape == (2, 1, 1)


def test_rms_norm_bf16_in_bf16_out():
    x, gamma = torch.randn(4, 16).bfloat16(), torch.randn(16).bfloat16()
    y, rstd = npu.npu_rms_norm(x, gamma)
    expected = (
        x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * gamma.float()
    )
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dim", [-1, 0])
def test_swiglu_is_silu_of_first_half_times_second(dim):
    x = torch.randn(4, 6)
    a, b = x.chunk(2, dim=dim)
    torch.testing.assert_close(npu.npu_swiglu(x, dim=dim), F.silu(a) * b, **TOL)


def rope_manual(x, cos, sin, interleaved):
    """Rotation of each (first, partner) pair written out: (a, b) -> (a cos - b sin, b cos + a sin)."""
    out = torch.empty_like(x)
    if interleaved:
        a, b, ca, cb, sa, sb = (
            x[..., 0::2],
            x[..., 1::2],
            cos[..., 0::2],
            cos[..., 1::2],
            sin[..., 0::2],
            sin[..., 1::2],
        )
        out[..., 0::2], out[..., 1::2] = a * ca - b * sa, b * cb + a * sb
    else:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h], out[..., h:] = (
            a * cos[..., :h] - b * sin[..., :h],
            b * cos[..., h:] + a * sin[..., h:],
        )
    return out


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleave"])
def test_rotary_matches_manual_formula_and_megatron(interleaved):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t = torch.randn(5, 2, 4, 8)  # [S, B, N, D], megatron's sbhd
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.outer(torch.arange(5).float(), inv_freq)
    freqs = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1)
    freqs = freqs[:, None, None, :]  # [S, 1, 1, D]
    cos, sin = freqs.cos(), freqs.sin()
    expected = rope_manual(t, cos, sin, interleaved)
    mul = npu.npu_rotary_mul(t, cos, sin, rotary_mode="interleave" if interleaved else "half")
    position = npu.npu_rotary_position_embedding(t, cos, sin, mode=int(interleaved))
    megatron = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    for got in (mul, position, megatron):
        torch.testing.assert_close(got, expected, **TOL)


# ---- the emulation as an installed torch_npu ------------------------------------------------


def run_with_emulation(script: str, **env: str) -> subprocess.CompletedProcess:
    """`script` in a fresh Python with the emulation first on PYTHONPATH (and `env` set)."""
    environ = dict(os.environ, **env)
    paths = (str(EMULATION), environ.get("PYTHONPATH"))
    environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run(
        [sys.executable, "-c", script], env=environ, cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_on_pythonpath_it_reads_as_torch_npu_2_7_1_and_mtrain_still_picks_cpu():
    script = (
        "import importlib.metadata as m, torch, torch_npu\n"
        "from torch_npu.contrib import transfer_to_npu\n"
        "print(torch_npu.__version__, m.version('torch-npu'))\n"
        "print(transfer_to_npu.imported, hasattr(torch, 'npu'))\n"
        "from mtrain import accel\n"
        "print(accel.resolve('auto'))\n"
    )
    result = run_with_emulation(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["2.7.1 2.7.1", "True False", "cpu"]


def test_on_the_emulated_host_kernels_for_the_npu_dispatch_key_serve_cpu_tensors():
    """MindSpeed registers its custom ops (mindspeed::npu_gmm, ...) for PrivateUse1, the NPU's
    dispatch key; the host emulation's "npu" tensors are CPU tensors, so those kernels must
    answer them too, autograd included (the kernel applies an autograd.Function)."""
    script = (
        "import torch, torch_npu, warnings\n"
        "from torch.library import Library, impl\n"
        "warnings.simplefilter('ignore')\n"
        "lib = Library('emulation_probe', 'DEF')\n"
        "lib.define('double(Tensor x) -> Tensor')\n"
        "class Double(torch.autograd.Function):\n"
        "    forward = staticmethod(lambda ctx, x: 2 * x)\n"
        "    backward = staticmethod(lambda ctx, g: 2 * g)\n"
        "@impl(lib, 'double', 'PrivateUse1')\n"
        "def double(x):\n"
        "    return Double.apply(x)\n"
        "x = torch.ones(3, device='npu', requires_grad=True)\n"
        "torch.ops.emulation_probe.double(x).sum().backward()\n"
        "print(x.device, x.grad.tolist())\n"
    )
    result = run_with_emulation(script, TORCH_NPU_EMULATION_HOST="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["cpu", "[2.0,", "2.0,", "2.0]"]
