import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrem_dist.quant import (
    ActQuantizer,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    calibrating,
    dequantize,
    expand_to_rows,
    group_view,
    iter_quantizers,
    qrange,
)


def _w(out=8, n_in=12, seed=0):
    return torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed))


def _sqnr_db(y, yq):
    return 20 * math.log10(y.norm().item() / (y - yq).norm().item())


# ---------------------------------------------------------------- group-wise / WeightQuantizer


def test_group_view_consecutive_rows():
    w = torch.arange(24.0).reshape(6, 4)
    g = group_view(w, 3)
    assert g.shape == (3, 8)
    assert torch.equal(g[1], torch.cat([w[2], w[3]]))


def test_groupwise_scales_by_hand():
    w = _w(8, 4)
    q = WeightQuantizer(4, granularity="group", groups=2, learnable=False).init_from(w)
    scale, zp = q.dequant_params()
    assert zp is None and scale.shape == (2, 1)
    expected = torch.stack([w[:4].abs().max(), w[4:].abs().max()]).reshape(2, 1) / 7
    assert torch.equal(scale, expected)


def test_groups_not_dividing_rows():
    with pytest.raises(ValueError, match="384 rows") as e:
        WeightQuantizer(4, granularity="group", groups=5).init_from(torch.randn(384, 2))
    assert "divisor of 384" in str(e.value) and "1, 2, 3, 4, 6, 8" in str(e.value)
    with pytest.raises(ValueError, match="groups > 0"):
        WeightQuantizer(4, granularity="group")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="bits=9"):
        WeightQuantizer(9)
    with pytest.raises(ValueError, match="granularity='channel'"):
        WeightQuantizer(4, granularity="channel")
    with pytest.raises(ValueError, match="grid='ternary' needs bits=2"):
        WeightQuantizer(4, grid="ternary")
    with pytest.raises(ValueError, match="dynamic"):
        ActQuantizer(8, mode="dynamic", symmetric=False)
    with pytest.raises(ValueError, match="mode='per_token'"):
        ActQuantizer(8, mode="per_token")


def test_uninitialised_weight_quantizer():
    with pytest.raises(RuntimeError, match="init_from"):
        WeightQuantizer(4)(_w())


@pytest.mark.parametrize("granularity", ["tensor", "row", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_in_range_and_dequant_invariant(bits, symmetric, granularity):
    w = _w(8, 12, seed=bits)
    for clip in ("minmax", "aciq", "mse") if bits in (3, 8) else ("minmax",):
        q = WeightQuantizer(bits, symmetric, granularity, groups=4, clip=clip).init_from(w)
        codes = q.codes(w)
        assert codes.dtype == torch.int32 and codes.shape == w.shape
        assert (q.qmin, q.qmax) == qrange(bits, symmetric)
        assert codes.min() >= q.qmin and codes.max() <= q.qmax
        scale, zp = q.dequant_params()
        zp_rows = None if zp is None else expand_to_rows(zp, 8)
        assert torch.equal(dequantize(codes, expand_to_rows(scale, 8), zp_rows), q(w))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_full_range_grid_is_zeroquants(bits):
    """full_range: step max|w| / 2^(b-1), codes [-2^(b-1), 2^(b-1)-1] (DeepSpeed's SymQuantizer), so
    2 bits gives 4 levels {-2, -1, 0, 1} * max/2 where the restricted grid gives {-1, 0, 1} * max."""
    w = _w(8, 64, seed=bits)
    q = WeightQuantizer(bits, granularity="row", grid="full").init_from(w)
    half = 2 ** (bits - 1)
    torch.testing.assert_close(q.scale, w.abs().amax(dim=1, keepdim=True) / half)
    codes = q.codes(w)
    assert (q.qmin, q.qmax) == (-half, half - 1) and codes.min() >= -half and codes.max() <= half - 1
    # -max|w| of a row reaches the code no restricted grid has.
    row = int(torch.argmax(-w.min(dim=1).values / w.abs().amax(dim=1)))
    assert int(codes[row].min()) == -half
    assert torch.equal(dequantize(codes, expand_to_rows(q.scale, 8), None), q(w))
    if bits == 2:
        assert len(torch.unique(codes)) == 4
        restricted = WeightQuantizer(bits, granularity="row").init_from(w)
        assert len(torch.unique(restricted.codes(w))) == 3
        # Four levels fit these (Gaussian) rows better than three.
        assert (q(w) - w).norm() < (restricted(w) - w).norm()
    mse = WeightQuantizer(bits, granularity="row", clip="mse", grid="full").init_from(w)
    assert (mse(w) - w).norm() <= (q(w) - w).norm() + 1e-6  # the search starts at minmax


def test_full_range_needs_a_symmetric_grid_and_grids_are_one_choice():
    with pytest.raises(ValueError, match="asymmetric grid already uses them"):
        WeightQuantizer(4, symmetric=False, grid="full")
    # full range and ternary are values of one setting: a weight cannot ask for both.
    with pytest.raises(ValueError, match="grid='trinary' is not one of restricted, full, ternary"):
        WeightQuantizer(2, grid="trinary")


def test_weight_quantizer_8bit_is_accurate_and_lsq_learnable():
    w = _w(16, 32).requires_grad_()
    q = WeightQuantizer(8).init_from(w)
    assert isinstance(q.scale, nn.Parameter)
    wq = q(w)
    assert _sqnr_db(w.detach(), wq.detach()) > 40
    (wq * torch.randn_like(wq)).sum().backward()
    assert w.grad is not None and q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_reinit_keeps_parameter_identity():
    q = WeightQuantizer(4).init_from(_w())
    p = q.scale
    q.init_from(_w(seed=1) * 3)
    assert q.scale is p
    torch.testing.assert_close(q.scale, (_w(seed=1) * 3).abs().amax(1, keepdim=True) / 7)


def test_ternary_twn():
    w = _w(6, 10).requires_grad_()
    q = WeightQuantizer(2, granularity="row", grid="ternary").init_from(w)
    out = q(w)
    a = w.detach().abs()
    delta = 0.7 * a.mean(1, keepdim=True)
    mask = a > delta
    alpha = (a * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    codes = q.codes(w)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(codes, (torch.sign(w.detach()) * mask).int())
    torch.testing.assert_close(q.dequant_params()[0], alpha)
    assert torch.equal(out, dequantize(codes, expand_to_rows(q.scale, 6), None))
    assert not isinstance(q.scale, nn.Parameter)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # STE: identity gradient
    # alpha follows the current weight on every forward
    with torch.no_grad():
        w.mul_(2)
    q(w)
    torch.testing.assert_close(q.scale, 2 * alpha)


def test_weight_quantizer_state_dict_round_trip():
    w = _w()
    for kwargs in ({}, {"symmetric": False, "granularity": "group", "groups": 2}, {"bits": 2, "grid": "ternary"}):
        kwargs = {"bits": 4, **kwargs}
        q = WeightQuantizer(**kwargs).init_from(w)
        sd = q.state_dict()
        fresh = WeightQuantizer(**kwargs).init_from(_w(seed=5))
        fresh.load_state_dict(sd)
        assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh(w), q(w))
        never_init = WeightQuantizer(**kwargs)
        never_init.load_state_dict(sd)
        assert torch.equal(never_init(w), q(w))


# ---------------------------------------------------------------- ActQuantizer


def test_static_not_calibrated():
    with pytest.raises(RuntimeError, match="was not calibrated: run calibration batches first"):
        ActQuantizer(8)(torch.randn(2, 3))


def test_observing_nan_names_the_quantizer():
    q = ActQuantizer(8, name="layer.3.attn.q")
    q.start_observing()
    with pytest.raises(FloatingPointError, match="layer.3.attn.q") as e:
        q(torch.tensor([1.0, float("nan")]))
    assert "non-finite activations" in str(e.value)


@pytest.mark.parametrize("learnable", [True, False])
def test_static_minmax_calibration(learnable):
    q = ActQuantizer(8, learnable=learnable)
    q.start_observing()
    xs = [torch.randn(4, 5, 16) * (i + 1) for i in range(3)]
    for x in xs:
        assert torch.equal(q(x), x)  # pass-through while observing
    q.stop_observing()
    amax = max(x.abs().max() for x in xs)
    assert torch.equal(q.scale.detach(), (amax / 127).reshape(1))
    y = q(xs[0])
    assert not torch.equal(y, xs[0]) and _sqnr_db(xs[0], y) > 30


def test_static_asymmetric_and_clipped_calibration():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((64, 128, 32))  # 262144 values > SAMPLE_SIZE
    for clip in ("minmax", "aciq", "mse"):
        q = ActQuantizer(4, symmetric=False, clip=clip)
        q.start_observing()
        for chunk in x.split(16):
            q(chunk)
        assert clip == "minmax" or q._sample.numel() <= 2**16
        q.stop_observing()
        assert q.zero_point is not None and 0 <= q.zero_point.item() <= 15
        if clip == "minmax":
            torch.testing.assert_close(q.scale, ((x.max() - x.min()) / 15).reshape(1))
        else:  # clipped: a narrower range than minmax on heavy-tailed data
            assert q.scale.item() < ((x.max() - x.min()) / 15).item()


def test_dynamic_per_token_scales():
    q = ActQuantizer(8, mode="dynamic")
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = q(x)  # no calibration needed
    scale = x.detach().abs().amax(-1, keepdim=True) / 127
    assert torch.equal(y, torch.clamp(torch.round(x.detach() / scale), -127, 127) * scale)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_the_full_activation_grid_is_compressed_tensors_one():
    # Dynamic: step max|x| / 127.5 per token, codes -128..127 (-max|x| reaches -128).
    q = ActQuantizer(8, mode="dynamic", full_range=True)
    x = torch.randn(2, 3, 16)
    x[0, 0, 0] = -x[0, 0].abs().max() - 1
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    codes = torch.clamp(torch.round(x / scale), -128, 127)
    assert torch.equal(q(x), codes * scale) and codes.min() == -128 and (q.qmin, q.qmax) == (-128, 127)
    # Static: the calibrated step is max|x| / 127.5 as well.
    s = ActQuantizer(8, full_range=True, learnable=False)
    with torch.no_grad(), calibrating(nn.Sequential(s)):
        s(x)
    assert torch.equal(s.scale, (x.abs().max() / 127.5).reshape(1))
    with pytest.raises(ValueError, match="asymmetric grid already uses"):
        ActQuantizer(8, symmetric=False, full_range=True)


def test_act_quantizer_state_dict_round_trip():
    for kwargs in ({}, {"symmetric": False, "learnable": False}):
        q = ActQuantizer(8, **kwargs)
        q.start_observing()
        q(torch.randn(3, 8) + 0.5)
        q.stop_observing()
        fresh = ActQuantizer(8, **kwargs)
        fresh.load_state_dict(q.state_dict())
        x = torch.randn(3, 8)
        assert torch.equal(fresh(x), q(x))


# ---------------------------------------------------------------- QuantLinear / QuantEmbedding


def _linear(n_in=32, out=24, seed=0, outlier=True):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, out)
    if outlier:
        with torch.no_grad():
            lin.weight[:, 5] *= 20
    return lin


def test_quant_linear_without_quantizers_is_exact():
    lin = _linear()
    x = torch.randn(4, 7, 32)
    assert torch.equal(QuantLinear(lin, None, None)(x), lin(x))


def test_quant_linear_ocs_without_quantizers():
    lin = _linear()
    ql = QuantLinear(lin, None, None, ocs_ratio=0.1)
    assert ql.weight.shape == (24, 32 + 4) and ql.in_index.shape == (36,) and ql.ocs_extra == 4
    x = torch.randn(4, 7, 32)
    # same function; only the summation order differs
    torch.testing.assert_close(ql(x), lin(x), rtol=1e-5, atol=1e-5)
    assert "in_index" in ql.state_dict() and "in_index" not in QuantLinear(lin, None, None).state_dict()


@pytest.mark.parametrize("ocs_ratio,quant_aware", [(0.0, True), (0.05, False), (0.05, True)])
@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
def test_quant_linear_w8a8_close_and_trainable(ocs_ratio, quant_aware, a_mode):
    lin = _linear()
    wq, aq = WeightQuantizer(8), ActQuantizer(8, mode=a_mode)
    ql = QuantLinear(lin, wq, aq, ocs_ratio=ocs_ratio, ocs_quant_aware=quant_aware)
    x = torch.randn(4, 7, 32)
    with torch.no_grad(), calibrating(ql):
        ql(x)
    y, yq = lin(x), ql(x)
    assert _sqnr_db(y.detach(), yq.detach()) > 30
    yq.pow(2).sum().backward()
    assert ql.weight.grad is not None and ql.weight.grad.abs().sum() > 0
    assert ql.weight_quantizer.scale.grad is not None and ql.weight_quantizer.scale.grad.abs().sum() > 0
    assert lin.weight.grad is None  # the FP Linear is untouched


@pytest.mark.parametrize("case", ["w3_asym_g8", "w4_row_bias", "w2_ternary", "w2_full", "w4_ocs_a8", "w3_outliers",
                                  "w4_bf16"])
def test_training_recomputes_the_fake_quantized_weight_with_the_same_gradients(case):
    """With gradients on, QuantLinear recomputes its fake-quantized weight in the backward pass
    instead of keeping it (and the codes it came from): outputs and every gradient are those of
    autograd keeping them all (`_linear`), bit for bit, in every weight grid and with OCS, outlier
    columns, a bias and bfloat16 inputs."""
    wq = {"w3_asym_g8": lambda: WeightQuantizer(3, symmetric=False, granularity="input_group", groups=8),
          "w2_ternary": lambda: WeightQuantizer(2, grid="ternary"),
          "w2_full": lambda: WeightQuantizer(2, grid="full")}.get(case, lambda: WeightQuantizer(4))()
    ql = QuantLinear(_linear(), wq, ActQuantizer(8, mode="dynamic") if case == "w4_ocs_a8" else None,
                     ocs_ratio=0.1 if case == "w4_ocs_a8" else 0.0)
    if case != "w4_row_bias":
        ql.bias = None
    if case == "w3_outliers":
        ql.set_outliers(torch.tensor([5, 9]))
    dtype = torch.bfloat16 if case == "w4_bf16" else torch.float32
    x = torch.randn(3, 5, 32)

    weight_sized = []  # tensors of the weight's size that the graph keeps, other than the weight itself

    def keep(t):
        if t.numel() == ql.weight.numel() and t.untyped_storage().data_ptr() != ql.weight.untyped_storage().data_ptr():
            weight_sized.append(t.shape)
        return t

    def run(forward):
        ql.zero_grad(set_to_none=True)
        weight_sized.clear()
        xi = x.to(dtype).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = forward(xi)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
        return [y.detach(), xi.grad, *(p.grad for p in ql.parameters())], len(weight_sized)

    (kept, n_kept), (recomputed, n_recomputed) = run(lambda xi: ql._linear(ql.inputs(xi))), run(ql)
    assert n_kept >= 1 and n_recomputed == 0
    assert all(g is not None for g in kept[1:]) and len(kept) >= 3  # output, input, weight (, scale, ...)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


def test_quant_linear_ocs_quant_aware_uses_quantizer_step():
    lin = _linear()
    ql = QuantLinear(lin, WeightQuantizer(4), None, ocs_ratio=0.05)
    plain = QuantLinear(lin, WeightQuantizer(4), None, ocs_ratio=0.05, ocs_quant_aware=False)
    assert torch.equal(ql.in_index, plain.in_index)
    assert not torch.equal(ql.weight, plain.weight)
    x = torch.randn(5, 32)
    torch.testing.assert_close(x[:, ql.in_index] @ ql.weight.T, x @ lin.weight.T, rtol=1e-5, atol=1e-4)
    # the quantizer was re-initialised on the final (quant-aware) weight
    torch.testing.assert_close(ql.weight_quantizer.scale.detach(), ql.weight.detach().abs().amax(1, keepdim=True) / 7)


def test_quant_embedding():
    emb = nn.Embedding(50, 16, padding_idx=0)
    ids = torch.randint(0, 50, (3, 9))
    assert torch.equal(QuantEmbedding(emb, None)(ids), emb(ids))
    qe = QuantEmbedding(emb, WeightQuantizer(8))
    assert qe.weight_quantizer.scale.shape == (50, 1)  # per row
    assert (qe.num_embeddings, qe.embedding_dim, qe.padding_idx) == (50, 16, 0)
    assert _sqnr_db(emb(ids).detach(), qe(ids).detach()) > 30


def test_iter_quantizers_and_calibrating():
    model = nn.Sequential(
        QuantLinear(_linear(), WeightQuantizer(8), ActQuantizer(8)),
        nn.ReLU(),
        QuantLinear(_linear(24, 8, outlier=False), WeightQuantizer(8), ActQuantizer(8, mode="dynamic")),
    )
    names = [n for n, _ in iter_quantizers(model)]
    assert names == ["0.weight_quantizer", "0.act_quantizer", "2.weight_quantizer", "2.act_quantizer"]
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="was not calibrated"):
        model(x)
    # an exception inside the block cancels observation and leaves the quantizer uncalibrated
    with pytest.raises(KeyError):
        with calibrating(model):
            model(x)
            raise KeyError("boom")
    assert not model[0].act_quantizer.observing
    with pytest.raises(RuntimeError, match="was not calibrated"):
        model(x)
    with torch.no_grad(), calibrating(model):
        model(x)
    assert model[0].act_quantizer.name == "0.act_quantizer"
    assert torch.equal(model[0].act_quantizer.scale.detach(), (x.abs().max() / 127).reshape(1))
    model(x)


def test_calibrating_reports_quantizers_that_saw_nothing():
    model = nn.ModuleDict(
        {"used": QuantLinear(_linear(), None, ActQuantizer(8)), "unused": QuantLinear(_linear(), None, ActQuantizer(8))}
    )
    with pytest.raises(RuntimeError, match="unused.act_quantizer"):
        with calibrating(model):
            model["used"](torch.randn(2, 32))
    model["used"](torch.randn(2, 32))  # the one that saw data is calibrated


def test_reprs():
    wq = WeightQuantizer(4, granularity="group", groups=4)
    ql = QuantLinear(_linear(), wq, ActQuantizer(8, name="fc"), ocs_ratio=0.05)
    text = repr(ql)
    for part in ("bits=4", "granularity=group", "groups=4", "clip=minmax", "ternary=False", "ocs_extra=2", "name='fc'"):
        assert part in text


@pytest.mark.parametrize("bits,learnable", [(8, False), (4, True), (2, True)])
def test_embedding_quantizes_only_looked_up_rows_with_identical_values_and_gradients(bits, learnable):
    torch.manual_seed(0)
    emb = nn.Embedding(100, 16, padding_idx=0)
    fast = QuantEmbedding(emb, WeightQuantizer(bits, learnable=learnable))
    ref = QuantEmbedding(emb, WeightQuantizer(bits, learnable=learnable))
    ids = torch.randint(0, 100, (3, 7))
    ids[0, 0] = 0  # the padding row gets no gradient, as in F.embedding
    y = fast(ids)
    y_ref = F.embedding(ids, ref.weight_quantizer(ref.weight), 0)
    assert torch.equal(y, y_ref)
    (y**2).sum().backward()
    (y_ref**2).sum().backward()
    assert torch.allclose(fast.weight.grad, ref.weight.grad, atol=1e-6)
    assert fast.weight.grad[0].abs().sum() == 0
    if learnable:
        assert torch.allclose(fast.weight_quantizer.scale.grad, ref.weight_quantizer.scale.grad, atol=1e-6)
