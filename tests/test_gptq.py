"""GPTQ (mrem_dist.quant.gptq) against a slow, obviously-correct Optimal Brain Quantization loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mrem_dist.quant.functional import dequantize, fake_quant, qrange
from mrem_dist.quant.clipping import clip_range, scale_zero_point
from mrem_dist.quant.gptq import GptqOptions, GptqResult, HessianAccumulator, gptq_quantize
from mrem_dist.quant.quantizers import WeightQuantizer


def correlated_inputs(tokens: int, features: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """x = z @ A with a random mixing A: H = 2/n X^T X is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + 0.5 * torch.eye(features)
    mix[:, : features // 4] += 0.8 * torch.randn(features, 1, generator=g)  # a strongly shared direction
    x = torch.randn(tokens, features, generator=g, dtype=torch.float64) @ mix.double()
    x = x * torch.rand(features, generator=g, dtype=torch.float64).add(0.2)  # uneven diag(H) for act_order
    x[:, list(dead)] = 0.0
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def obq_reference(w, h, bits, symmetric, group_size, damp, act_order):
    """Column-by-column OBQ with H_F^-1 = inv(H[F, F]) recomputed at every step, in float64."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    qmin, qmax = qrange(bits, symmetric)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    def grid(cols):  # this codebase's min-max grid, written out
        if symmetric:
            return (cols.abs().amax(1) / qmax).clamp_min(1e-8), None
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
        return s, torch.round(qmin - lo / s).clamp(qmin, qmax)

    gs = group_size or n
    static = group_size == 0 or act_order
    params = [grid(w[:, g * gs:(g + 1) * gs]) if static else None for g in range(n // gs)]
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(n))
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    q_all, codes, losses = torch.zeros_like(w), torch.zeros(w.shape, dtype=torch.long), 0.0
    remaining = list(order)
    for i in order:
        if not static and i % gs == 0:
            params[i // gs] = grid(w[:, i:i + gs])
        s, z = params[i // gs]
        c = torch.round(w[:, i] / s) + (0 if z is None else z)
        c = c.clamp(qmin, qmax)
        q = (c - (0 if z is None else z)) * s
        hinv = torch.linalg.inv(hd[remaining][:, remaining])  # remaining[0] == i
        d = hinv[0, 0]
        losses += float(((w[:, i] - q) ** 2).sum() / (2 * d))
        w[:, remaining] -= torch.outer((w[:, i] - q) / d, hinv[:, 0])
        w[:, i] = q
        q_all[:, i], codes[:, i] = q, c.long()
        remaining.pop(0)
    return q_all, codes, losses, hd


CASES = [  # (bits, symmetric, group_size, block_size, act_order, in_features)
    (4, True, 0, 128, False, 96),   # per-channel, one block
    (3, False, 0, 16, False, 96),   # per-channel, lazy batch updates across blocks
    (4, False, 32, 32, False, 128),  # groups aligned with blocks
    (3, True, 24, 16, False, 96),   # groups starting mid-block and running past it
    (4, False, 16, 64, False, 64),  # several groups inside one block
    (4, True, 32, 16, True, 96),    # act_order + static groups
    (3, False, 0, 32, True, 96),    # act_order, per-channel
]


@pytest.mark.parametrize("bits,symmetric,group_size,block_size,act_order,n", CASES)
def test_matches_obq_reference(bits, symmetric, group_size, block_size, act_order, n):
    out = 48
    x = correlated_inputs(4 * n, n, seed=n + bits, dead=(5,))
    h = hessian_of(x)
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    res = gptq_quantize(w, h, bits, symmetric, group_size, GptqOptions(block_size, 0.01, act_order))
    ref_q, ref_codes, ref_losses, hd = obq_reference(w, h, bits, symmetric, group_size, 0.01, act_order)
    assert isinstance(res, GptqResult) and res.weight.dtype == torch.float64 and res.codes.dtype == torch.int32
    ng = n // (group_size or n)
    assert res.scale.shape == (out, ng) and res.scale.dtype == torch.float32
    assert (res.zero_point is None) == symmetric
    differ = res.codes.long() != ref_codes
    assert differ.float().mean() < 0.005, f"{differ.float().mean():.4%} of the codes differ"
    assert (res.codes.long() - ref_codes).abs().max() <= 1
    # A flipped code changes the rest of that row's sweep: compare weights on the rows with no flip.
    same_rows = ~differ.any(1)
    assert same_rows.float().mean() > 0.8
    assert torch.allclose(res.weight[same_rows], ref_q[same_rows], rtol=0, atol=1e-4)
    assert torch.all(res.weight[:, 5] == 0)  # the dead input
    # The OBS identity the reference relies on: the step losses add up to 1/2 dW^T H_damped dW.
    wz = w.clone()
    wz[:, 5] = 0
    dw = wz - ref_q
    assert ref_losses == pytest.approx(0.5 * float(((dw @ hd) * dw).sum()), rel=1e-6)
    # GptqResult.error is sum_r (w_r - q_r)^T H (w_r - q_r) = 2/n ||X (W - Q)^T||^2.
    expected = 2.0 / x.shape[0] * float(((x @ (w - res.weight).T) ** 2).sum())
    assert res.error == pytest.approx(expected, rel=1e-4)


def rtn(w: torch.Tensor, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    qmin, qmax = qrange(bits, symmetric)
    wg = w.reshape(-1, group_size) if group_size else w
    s, z = scale_zero_point(*clip_range(wg, bits, symmetric, "minmax"), bits, symmetric)
    return fake_quant(wg, s, z, qmin, qmax).reshape(w.shape)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lower_output_error_than_round_to_nearest(bits, group_size, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = correlated_inputs(2048, 128, seed=1).float()
    x_cal, x_val = x[:1024], x[1024:]  # held-out tokens of the same distribution
    acc = HessianAccumulator("lin")
    acc.add(x_cal.reshape(8, 128, 128))
    w = lin.weight.detach()
    res = gptq_quantize(w, acc.hessian, bits, symmetric, group_size)
    q_rtn = rtn(w, bits, symmetric, group_size)

    def out_err(x, q):
        return float(((x @ w.T - x @ q.T) ** 2).sum())

    e_rtn, e_gptq = out_err(x_cal, q_rtn), out_err(x_cal, res.weight)
    v_rtn, v_gptq = out_err(x_val, q_rtn), out_err(x_val, res.weight)
    print(f"bits={bits} group_size={group_size} symmetric={symmetric}: calibration RTN {e_rtn:.4g} GPTQ {e_gptq:.4g} "
          f"(ratio {e_gptq / e_rtn:.3f}); held-out RTN {v_rtn:.4g} GPTQ {v_gptq:.4g} (ratio {v_gptq / v_rtn:.3f})")
    assert e_gptq < 0.9 * e_rtn
    assert v_gptq < v_rtn
    assert res.error == pytest.approx(2 / 1024 * e_gptq, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 16])
def test_scale_zero_layout_round_trip(dtype, symmetric, group_size):
    bits = 4
    x = correlated_inputs(256, 64, seed=3)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    res = gptq_quantize(w, hessian_of(x).float(), bits, symmetric, group_size, GptqOptions(block_size=16))
    assert res.weight.dtype == dtype
    gs = group_size or 64
    # codes + per-(row, group) scale / zero point give the weight exactly
    s = res.scale.repeat_interleave(gs, dim=1)
    z = None if symmetric else res.zero_point.repeat_interleave(gs, dim=1)
    assert torch.equal(dequantize(res.codes, s, z).to(dtype), res.weight)
    qmin, qmax = qrange(bits, symmetric)
    assert int(res.codes.min()) >= qmin and int(res.codes.max()) <= qmax
    if group_size == 0:
        wq = WeightQuantizer(bits, symmetric, granularity="row").init_from(res.weight)
        with torch.no_grad():
            wq.scale.copy_(res.scale.reshape(-1, 1))
            if not symmetric:
                wq.zero_point.copy_(res.zero_point.reshape(-1, 1))
        assert torch.equal(wq(res.weight), res.weight)
        assert torch.equal(wq.codes(res.weight), res.codes)
    else:  # groups of consecutive input columns, row 0's groups first
        wg = res.weight.reshape(-1, group_size).float()
        zp = None if symmetric else res.zero_point.reshape(-1, 1)
        back = fake_quant(wg, res.scale.reshape(-1, 1), zp, qmin, qmax).to(dtype).reshape(res.weight.shape)
        assert torch.equal(back, res.weight)


def test_error_paths():
    h = hessian_of(correlated_inputs(64, 8, seed=5)).float()
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(w.reshape(2, 2, 8), h, 4, True)
    with pytest.raises(ValueError, match=r"Hessian of this Linear has shape \(6, 6\)"):
        gptq_quantize(w, h[:6, :6], 4, True)
    bad = h.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="Hessian of l1 contains NaN/inf"):
        gptq_quantize(w, bad, 4, True, name="l1")
    with pytest.raises(ValueError, match="weight of this Linear contains NaN/inf"):
        gptq_quantize(torch.full((4, 8), float("inf")), h, 4, True)
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    with pytest.raises(ValueError, match=r"not positive definite even after damping=0.01: raise damp \(e.g. 0.1\)"):
        gptq_quantize(torch.randn(3, 2), indefinite, 4, True)
    with pytest.raises(ValueError, match="group_size=3 does not divide the 8 input columns of this Linear: "
                                         "use a divisor of 8, e.g. 1, 2, 4, 8"):
        gptq_quantize(w, h, 4, True, group_size=3)
    with pytest.raises(ValueError, match="group_size=16 does not divide"):
        gptq_quantize(w, h, 4, True, group_size=16)
    for kwargs in ({"group_size": -1}, {"group_size": True}):
        with pytest.raises(ValueError):
            gptq_quantize(w, h, 4, True, **kwargs)
    for options in (GptqOptions(block_size=0), GptqOptions(damp=-0.1), GptqOptions(damp=float("nan"))):
        with pytest.raises(ValueError):
            gptq_quantize(w, h, 4, True, options=options)
    with pytest.raises(ValueError, match="bits=9"):
        gptq_quantize(w, h, 9, True)

    acc = HessianAccumulator("encoder.layer.0.query")
    with pytest.raises(RuntimeError, match="no calibration activations were recorded for encoder.layer.0.query"):
        acc.hessian
    acc.add(torch.zeros(0, 8))
    with pytest.raises(RuntimeError, match="no calibration activations"):
        acc.hessian
    x = torch.randn(2, 3, 8, dtype=torch.float16)
    x[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration activations of encoder.layer.0.query contain NaN/inf"):
        acc.add(x)
    x[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN/inf"):
        acc.add(x.bfloat16())
    acc.add(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 8\]"):
        acc.add(torch.randn(5, 7))


def test_hessian_accumulator_equals_one_shot():
    g = torch.Generator().manual_seed(6)
    parts = [torch.randn(3, 7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(2, 2, 4, 16, generator=g)]
    acc = HessianAccumulator("lin", in_features=16)
    for p in parts:
        acc.add(p)
    x = torch.cat([p.reshape(-1, 16) for p in parts]).double()
    assert acc.rows == x.shape[0] == 42
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian.double(), hessian_of(x), rtol=1e-5, atol=1e-5)
    # low-precision inputs are accumulated in float32 (no float16 overflow)
    big = HessianAccumulator()
    for _ in range(4):
        big.add(torch.full((64, 4), 60000.0, dtype=torch.float16))
    assert torch.allclose(big.hessian, torch.full((4, 4), 2 * 60000.0**2), rtol=1e-5)


@pytest.mark.slow
def test_codes_do_not_depend_on_the_thread_count():
    """On SmolLM2's layer 0 over real Wikipedia windows, LAPACK's Cholesky factors differ in the last
    float32 bits between 1 and 2 threads; a float32 sweep turned that into 32 different k_proj codes
    (and 4 of q_proj) at W3 g64. The float64 sweep must give identical codes, so an MREM-P rank on 1
    thread starts from the GPTQ that one process on 2 computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mrem_dist.data.corpus import calibration_sequences, tokenize_corpus
    from mrem_dist.data.wiki import load_wiki
    from mrem_dist.models.gguf import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = calibration_sequences(tokenize_corpus(load_wiki("calibration"), AutoTokenizer.from_pretrained(path)), 8, 256, 0)
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
    acc = HessianAccumulator("model.layers.0.self_attn", 576)
    acc.add(x)
    threads = torch.get_num_threads()
    try:
        for name in ("k_proj", "q_proj"):
            weight = getattr(layer.self_attn, name).weight.detach()
            codes = []
            for t in (1, 2):
                torch.set_num_threads(t)
                codes.append(gptq_quantize(weight, acc.hessian, 3, False, 64, GptqOptions(act_order=True)).codes)
            assert torch.equal(codes[0], codes[1]), f"{name}: {int((codes[0] != codes[1]).sum())} codes differ"
    finally:
        torch.set_num_threads(threads)
