"""Every layer: shapes, exact inverse, and log-det against the brute-force autograd Jacobian."""

from __future__ import annotations

import functools

import pytest
import torch

import nfcv
from nfcv.errors import ConfigError
from nfcv.flows import (
    MLP,
    NICE,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    BlockInvConv1x1,
    ColumnMerge,
    ColumnSplit,
    Flatten,
    FlowPP,
    FlowppNet,
    GlowNet,
    InvConv1x1LU,
    LearnedPrior,
    LogisticToNormal,
    Logit,
    MixLogCDFCoupling,
    MultiScale,
    NAFCoupling,
    RealNVP,
    ResNetNet,
    Sequential,
    Shift,
    Sigmoid,
    SplineCoupling,
    SplitPrior,
    Squeeze,
    SwapHalves,
    TarFlow,
    TarFlowBlock,
    Triangular1x1,
    VectorAdditiveCoupling,
    VectorScale,
)

NET = functools.partial(GlowNet, hidden_channels=6)


def _perturb(layer: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter off its (often identity) initial value so the checks mean something."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _actnorm(c):
    layer = ActNorm(c)
    layer.initialize(torch.randn(8, c, 4, 4) * 3 + 1)
    return _perturb(layer, 0.1)


RESNET = functools.partial(ResNetNet, hidden_channels=4, num_blocks=1)
FLOWPP_NET = functools.partial(FlowppNet, hidden_channels=8, num_blocks=1, heads=2)


def _actnorm_per_position(c, spatial):
    layer = ActNorm(c, spatial=spatial)
    layer.initialize(torch.randn(8, c, *spatial) * 3 + 1)
    return _perturb(layer, 0.1)


def _flowpp(shape, scales=((0, 1), (1, 1)), factor_out=False):
    coupling = functools.partial(MixLogCDFCoupling, net=FLOWPP_NET, num_components=3, tol=1e-12)
    flow = FlowPP(shape, coupling, scales=scales, factor_out=factor_out)
    for m in flow.modules():
        if isinstance(m, ActNorm):
            c, h, w = m.num_channels, *m.spatial
            m.initialize(torch.randn(8, c, h, w) * 2 + 0.5)
    return flow


def _tarflow(shape):
    block = functools.partial(TarFlowBlock, width=8, layers=1, head_dim=4)
    return TarFlow(shape, patch_size=2, num_blocks=2, block=block)


def _jet_spatial(split, _):
    layer = nfcv.build_layer(
        "jet_coupling", (8, 4), split=split, grid=[2, 4], net={"width": 8, "heads": 2}
    )
    return _perturb(layer, 0.05)


def _glow_step(c):
    return Sequential([_actnorm(c), InvConv1x1LU(c), AffineCoupling(c, NET)])


def _multiscale(c):
    return MultiScale(
        (c, 4, 4),
        num_levels=2,
        steps_per_level=1,
        step=[ActNorm, InvConv1x1LU, functools.partial(AffineCoupling, net=NET)],
    )


# Every catalogue layer on a (4, 4, 4) input, built by its config name. The test settings keep
# spline tails in play (bound 1.5 < some |x|) and bisection below the float64 check's tolerance.
CATALOGUE_SHAPE = (4, 4, 4)
CATALOGUE_OVERRIDES = {
    "spline_coupling": {"num_bins": 4, "bound": 1.5},
    "mixlogcdf_coupling": {"num_components": 3, "tol": 1e-12},
    "naf_coupling": {"num_hidden": 3, "tol": 1e-12},
    # The ODE solver's tolerance; the exact trace costs D backward passes per evaluation, so
    # the ODE layer is checked on a smaller input.
    "ffjord": {"hidden": 4, "rtol": 1e-7, "atol": 1e-7},
    "tarflow_block": {"width": 8, "head_dim": 4, "layers": 2},
    # Residual flow: the brute-force log-det (the estimators have their own tests below) and a
    # fixed-point tolerance below the float64 check's.
    "resflow": {"hidden": 8, "logdet": "exact", "tol": 1e-12},
    "jet_coupling": {"net": {"width": 8, "heads": 2}},
}
# Token layers take (N, D): N tokens of D values.
SHAPES = {"ffjord": (2, 2, 2), "tarflow_block": (5, 3), "jet_coupling": (4, 6)}
# Layers exact only to a stated tolerance: (float64 inverse, float32 inverse, log-det).
TOLERANCES = {"ffjord": (1e-5, 1e-3, 1e-6)}
EXACT = (1e-10, 1e-4, 1e-8)


def _catalogue(name):
    shape = SHAPES.get(name, CATALOGUE_SHAPE)

    def factory(c):
        layer = nfcv.build_layer(name, shape, **CATALOGUE_OVERRIDES.get(name, {}))
        if isinstance(layer, ActNorm):
            layer.initialize(torch.randn(8, *shape) * 3 + 1)
        # Couplings: network outputs of order 1 (larger ones make bins so narrow that float32
        # cannot invert them to 1e-4, which says nothing about the code).
        return _perturb(layer, 0.05 if hasattr(layer, "net") else 0.2)

    return factory, shape


# name -> (factory(num_channels) -> layer, input shape): the catalogue, and composite or
# multi-scale pieces that are not catalogue layers of their own.
LAYERS = {name: _catalogue(name) for name in nfcv.layer_names()}
LAYERS.update(
    {
        "actnorm_3ch": (_actnorm, (3, 4, 4)),
        "affine_coupling_odd": (lambda c: _perturb(AffineCoupling(c, NET)), (3, 3, 3)),
        # Checkerboard masks (RealNVP), on one channel, where a channel mask cannot split.
        "affine_checkerboard": (
            lambda c: _perturb(AffineCoupling(c, NET, mask="checkerboard")),
            (1, 4, 4),
        ),
        "additive_checkerboard_odd": (
            lambda c: _perturb(AdditiveCoupling(c, NET, mask="checkerboard", parity=1)),
            (2, 3, 3),
        ),
        "spline_checkerboard": (
            lambda c: _perturb(SplineCoupling(c, NET, 4, 1.5, mask="checkerboard"), 0.05),
            (2, 4, 4),
        ),
        "mixlogcdf_checkerboard": (
            lambda c: _perturb(
                MixLogCDFCoupling(c, NET, 3, 1e-12, mask="checkerboard", parity=1), 0.05
            ),
            (2, 4, 4),
        ),
        "naf_checkerboard": (
            lambda c: _perturb(NAFCoupling(c, NET, 3, 1e-12, mask="checkerboard", parity=1), 0.05),
            (2, 4, 4),
        ),
        "split_prior": (lambda c: _perturb(SplitPrior(c)), (4, 3, 3)),
        "learned_prior": (lambda c: _perturb(LearnedPrior(c)), (4, 3, 3)),
        "shift": (lambda c: Shift(-0.5), (2, 3, 3)),
        "glow_step": (lambda c: _perturb(_glow_step(c), 0.05), (4, 2, 2)),
        "multiscale": (lambda c: _perturb(_multiscale(c), 0.05), (1, 4, 4)),
        "flatten": (lambda c: Flatten((2, 3, 3)), (2, 3, 3)),
        # The pieces of the NICE, RealNVP and Flow++ presets, and the presets' assemblers.
        "logit": (lambda c: Logit(0.05), (2, 3, 3)),
        "sigmoid": (lambda c: Sigmoid(), (2, 3, 3)),
        "logistic_to_normal": (lambda c: LogisticToNormal(), (2, 3, 3)),
        "actnorm_per_position": (lambda c: _actnorm_per_position(c, (3, 2)), (2, 3, 2)),
        "block_invconv": (lambda c: _perturb(BlockInvConv1x1(c, groups=2)), (4, 2, 2)),
        "column_split": (lambda c: ColumnSplit(), (2, 3, 4)),
        "column_merge": (lambda c: ColumnMerge(), (4, 3, 2)),
        "swap_halves_odd": (lambda c: SwapHalves(), (3, 2, 2)),
        "squeeze_depth_order": (lambda c: Squeeze(order="depth"), (2, 4, 4)),
        "affine_tanh_checkerboard": (
            lambda c: _perturb(AffineCoupling(c, RESNET, mask="checkerboard", scale="tanh")),
            (2, 4, 4),
        ),
        "affine_tanh_channel_parity1": (
            lambda c: _perturb(AffineCoupling(c, RESNET, parity=1, scale="tanh")),
            (3, 2, 2),
        ),
        "mixlogcdf_flowpp_net": (
            lambda c: _perturb(
                MixLogCDFCoupling(c, FLOWPP_NET, 3, 1e-12, net_kwargs={"spatial": (2, 2)}), 0.05
            ),
            (4, 2, 2),
        ),
        "vector_additive_coupling": (
            lambda c: _perturb(VectorAdditiveCoupling(5, functools.partial(MLP, hidden=6))),
            (5,),
        ),
        "vector_scale": (lambda c: _perturb(VectorScale(5)), (5,)),
        "nice": (lambda c: _perturb(NICE((1, 2, 3), functools.partial(MLP, hidden=6))), (1, 2, 3)),
        "realnvp": (
            lambda c: _perturb(
                RealNVP((1, 4, 4), functools.partial(AffineCoupling, net=RESNET, scale="tanh")),
                0.05,
            ),
            (1, 4, 4),
        ),
        "flowpp": (lambda c: _perturb(_flowpp((2, 4, 4)), 0.05), (2, 4, 4)),
        # TarFlow: a block on the reversed token order, a class-conditional one (no context:
        # its null class), and the whole model (patches, blocks of both orders, flatten).
        "tarflow_block_flip_conditional": (
            lambda c: _perturb(
                TarFlowBlock(4, 3, width=8, layers=1, head_dim=4, flip=True, num_classes=3), 0.2
            ),
            (4, 3),
        ),
        "tarflow": (lambda c: _perturb(_tarflow((2, 4, 4)), 0.1), (2, 4, 4)),
        # The Jet coupling's spatial splits (the catalogue's entry is the channel split), on a
        # 2x4 grid of tokens, where the stripes and the checkerboard are different patterns.
        **{
            f"jet_coupling_{split}": (
                functools.partial(_jet_spatial, split),
                (8, 4),
            )
            for split in ("checkerboard", "vstripes-inv", "hstripes")
        },
        "flowpp_factor_out": (
            lambda c: _perturb(_flowpp((2, 4, 4), scales=[[0, 1], [1, 1]], factor_out=True), 0.05),
            (2, 4, 4),
        ),
    }
)
# Layers defined on part of the real line get inputs there: randn mapped by these.
INPUTS = {"logit": torch.sigmoid}


def _build(name: str, dtype: torch.dtype):
    factory, shape = LAYERS[name]
    layer = factory(shape[0]).to(dtype).eval()
    return layer, shape


def _inputs(name: str, n: int, shape, dtype) -> torch.Tensor:
    return INPUTS.get(name, lambda v: v)(torch.randn(n, *shape, dtype=dtype))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_shape_and_inverse_float64(name):
    layer, shape = _build(name, torch.float64)
    x = _inputs(name, 3, shape, torch.float64)
    z, logdet = layer(x)
    assert tuple(z.shape[1:]) == layer.output_shape(shape)
    assert logdet.shape == (3,)
    x_rec, inv_logdet = layer.inverse(z)
    tol = TOLERANCES.get(name, EXACT)[0]
    torch.testing.assert_close(x_rec, x, atol=tol, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet, atol=tol, rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inverse_float32(name):
    layer, shape = _build(name, torch.float32)
    x = _inputs(name, 3, shape, torch.float32)
    z, _ = layer(x)
    x_rec, _ = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=TOLERANCES.get(name, EXACT)[1], rtol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_matches_brute_force_jacobian(name):
    layer, shape = _build(name, torch.float64)
    x = _inputs(name, 2, shape, torch.float64)
    _, logdet = layer(x)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda v: layer(v.view(1, *shape))[0].reshape(-1), x[i].reshape(-1)
        )
        assert jac.shape[0] == jac.shape[1], "a bijection keeps the dimension"
        sign, expected = torch.linalg.slogdet(jac)
        assert sign != 0
        tol = TOLERANCES.get(name, EXACT)[2]
        torch.testing.assert_close(logdet[i], expected, atol=tol, rtol=tol)


def test_squeeze_layout_is_glows():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    # Channel 2i + j holds pixel (2h + i, 2w + j).
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert z[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_lu_conv_keeps_permutation_and_signs_fixed():
    layer = InvConv1x1LU(5)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"lower", "upper", "log_s"}
    assert {"perm", "sign_s"} <= {n for n, _ in layer.named_buffers()}
    w = layer.weight().double()
    torch.testing.assert_close(torch.linalg.slogdet(w)[1], layer.log_abs_det().double())


def test_couplings_start_as_identity():
    for cls in (AffineCoupling, AdditiveCoupling):
        layer = cls(4, NET)
        x = torch.randn(2, 4, 3, 3)
        z, logdet = layer(x)
        # Glow's scale is sigmoid(0 + 2) at init: the transformed half is only scaled.
        if cls is AffineCoupling:
            s = torch.sigmoid(torch.tensor(2.0))
            torch.testing.assert_close(z[:, 2:], x[:, 2:] * s)
            expected = 2 * 3 * 3 * torch.log(s)  # 2 transformed channels x 3 x 3 pixels
            torch.testing.assert_close(logdet, expected.expand(2))
        else:
            torch.testing.assert_close(z, x)
            assert torch.all(logdet == 0)
        torch.testing.assert_close(z[:, :2], x[:, :2])


def test_affine_coupling_stays_finite_for_extreme_net_outputs():
    # log s is logsigmoid(h + 2): log(sigmoid(-1e4)) would be log(0) = -inf.
    layer = AffineCoupling(4, NET)
    with torch.no_grad():
        layer.net.net[-1].conv.bias.fill_(1e4)
    z, logdet = layer(torch.randn(2, 4, 3, 3))
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    with torch.no_grad():
        layer.net.net[-1].conv.bias.fill_(-1e4)
    z, logdet = layer(torch.randn(2, 4, 3, 3))
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()


def test_shapes_are_checked_at_build_time():
    with pytest.raises(ValueError, match=r"\(1, 12, 12\).*2\*\*3 = 8 for levels=3"):
        _multiscale_levels((1, 12, 12), 3)
    with pytest.raises(ValueError, match=r"built for \(C=3, H, W\).*\(4, 2, 2\)"):
        Sequential([ActNorm(3)]).output_shape((4, 2, 2))
    for layer in (SplitPrior(4), LearnedPrior(4), InvConv1x1LU(4), AffineCoupling(4, NET)):
        with pytest.raises(ValueError, match=r"\(6, 2, 2\)"):
            layer.output_shape((6, 2, 2))


def _multiscale_levels(shape, levels):
    return MultiScale(shape, num_levels=levels, steps_per_level=1, step=[ActNorm])


def test_multiscale_latent_order_first_factored_level_first():
    flow = MultiScale(
        (1, 8, 8), num_levels=3, steps_per_level=0, step=[], split_prior=None, top_prior=None
    )
    assert flow.factored_shapes == [(2, 4, 4), (4, 2, 2), (16, 1, 1)]
    x = torch.randn(2, 1, 8, 8)
    eps, _ = flow(x)
    sq1, _ = Squeeze()(x)
    torch.testing.assert_close(eps[:, :32], sq1[:, 2:].reshape(2, -1))


def test_inverse_weight_cache_follows_parameter_updates():
    layer = InvConv1x1LU(3).eval()
    z = torch.randn(1, 3, 2, 2)
    with torch.no_grad():
        layer.inverse(z)
        layer.log_s.add_(0.5)  # an in-place update, as an optimizer makes
        x, _ = layer.inverse(z)
        z2, _ = layer(x)
    torch.testing.assert_close(z2, z, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cls", [AdditiveCoupling, AffineCoupling, SplineCoupling, MixLogCDFCoupling, NAFCoupling]
)
def test_coupling_pass_through_half_is_bit_exact(cls):
    x = torch.randn(2, 4, 3, 3)
    z, _ = _perturb(cls(4, NET))(x)
    assert torch.equal(z[:, :2], x[:, :2])
    assert not torch.allclose(z[:, 2:], x[:, 2:])
    for parity in (0, 1):
        z, _ = _perturb(cls(4, NET, mask="checkerboard", parity=parity))(x)
        keep = (torch.arange(3)[:, None] + torch.arange(3)[None, :] + parity) % 2 == 0
        assert torch.equal(z[:, :, keep], x[:, :, keep])
        assert not torch.allclose(z[:, :, ~keep], x[:, :, ~keep])


def test_new_couplings_start_as_the_identity():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for layer in (
        SplineCoupling(4, NET, 6, 2.0),
        MixLogCDFCoupling(4, NET, 3),
        NAFCoupling(4, NET),
    ):
        z, logdet = layer.double()(x)
        torch.testing.assert_close(z, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_triangular_jacobian_is_lower_triangular_in_channel_order():
    layer = _perturb(Triangular1x1(4)).double()
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, 4, 1, 1))[0].reshape(-1), x.reshape(-1)
    )
    assert torch.all(torch.triu(jac, 1) == 0) and torch.all(torch.diagonal(jac) > 0)


def test_mixlogcdf_inverse_meets_its_bisection_tolerance_in_float32():
    layer = _perturb(MixLogCDFCoupling(4, NET, 4, tol=1e-6)).eval()
    x = torch.randn(3, 4, 3, 3) * 3
    z, _ = layer(x)
    x_rec, _ = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-4, rtol=0)


def test_naf_inverse_meets_its_bisection_tolerance_in_float32():
    layer = _perturb(NAFCoupling(4, NET, 4, tol=1e-6)).eval()
    x = torch.randn(3, 4, 3, 3) * 3
    z, logdet = layer(x)
    x_rec, inv_logdet = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-3, rtol=1e-5)


def test_naf_inverse_brackets_far_tails_and_steep_units():
    from nfcv.flows.splines import deep_sigmoidal_flow, deep_sigmoidal_flow_inverse

    # Units far apart and steep, slopes at both clamp ends, and outputs far in the tails: the
    # bracket from the extreme units must still hold the root.
    n, k = 4000, 5
    gen = torch.Generator().manual_seed(0)
    log_w = torch.log_softmax(4 * torch.randn(n, k, generator=gen, dtype=torch.float64), -1)
    log_a = (7 * (2 * torch.rand(n, k, generator=gen, dtype=torch.float64) - 1)).clamp(-7, 7)
    b = 20 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    x = 50 * torch.randn(n, generator=gen, dtype=torch.float64)
    y, _ = deep_sigmoidal_flow(x, log_w, log_a, b)
    assert torch.isfinite(y).all()
    x_rec = deep_sigmoidal_flow_inverse(y, log_w, log_a, b, tol=1e-9)
    y_rec, _ = deep_sigmoidal_flow(x_rec, log_w, log_a, b)
    # Compared in y: where a unit is flat the inverse is ill-conditioned in x, not wrong.
    torch.testing.assert_close(y_rec, y, atol=1e-6, rtol=1e-9)


def test_naf_log_derivative_matches_autograd_in_float64():
    from nfcv.flows.splines import deep_sigmoidal_flow

    gen = torch.Generator().manual_seed(1)
    log_w = torch.log_softmax(torch.randn(50, 4, generator=gen, dtype=torch.float64), -1)
    log_a, b = torch.randn(50, 4, generator=gen, dtype=torch.float64), torch.randn(50, 4)
    x = 3 * torch.randn(50, dtype=torch.float64, requires_grad=True)
    y, log_dy = deep_sigmoidal_flow(x, log_w, log_a, b.double())
    (dy,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(log_dy, torch.log(dy))


def test_naf_stays_finite_for_extreme_net_outputs():
    layer = NAFCoupling(4, NET, 4)
    x = torch.randn(2, 4, 3, 3) * 3
    bias = layer.net.net[-1].conv.bias
    for fill in (
        lambda: bias.fill_(1e4),
        lambda: bias.fill_(-1e4),
        lambda: bias.copy_(1e4 * torch.sign(torch.randn_like(bias))),
    ):
        with torch.no_grad():
            fill()
        z, logdet = layer(x)
        assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
        x_rec, inv_logdet = layer.inverse(z)
        assert torch.isfinite(x_rec).all() and torch.isfinite(inv_logdet).all()
        z.sum().backward()  # and no NaN gradient from the clamped slopes
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        layer.zero_grad()


def test_naf_units_separate_in_training():
    # From the identity start every DSF unit gets the same gradient; the per-unit offset gains
    # must break that, or K units stay one unit and the coupling is affine.
    torch.manual_seed(0)
    layer = NAFCoupling(4, NET, 3)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 4, 3, 3) * 2
    for _ in range(5):
        z, logdet = layer(x)
        loss = (0.5 * z**2).sum() - logdet.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = layer._params(x[:, :2], None)
    for group in (p[..., :3], p[..., 3:6] * layer.offset_gains, p[..., 6:]):
        spread = group.max(-1).values - group.min(-1).values
        assert spread.abs().max() > 1e-3


@pytest.mark.parametrize("num_hidden", [0, -1, 2.5])
def test_naf_refuses_fewer_than_one_hidden_unit(num_hidden):
    with pytest.raises(ValueError, match="num_hidden"):
        nfcv.build_layer("naf_coupling", (4, 4, 4), num_hidden=num_hidden)
    with pytest.raises(ConfigError, match="num_hidden"):
        nfcv.build_model(
            nfcv.compose(
                ["model.coupling=naf", f"model.choices.coupling.naf.num_hidden={num_hidden}"]
            )
        )


def test_glow_with_naf_coupling_gives_finite_bpd_and_round_trips():
    model = nfcv.build_model(nfcv.compose(["model.coupling=naf"]))
    model.train()
    x = torch.randint(0, 17, (8, 1, 8, 8))
    bpd = model.bits_per_dim(x)  # also ActNorm's data-dependent init
    assert torch.isfinite(bpd).all() and (bpd > 0).all()
    model.eval()
    u = torch.rand(4, 1, 8, 8)
    eps, _ = model.transform(u)
    torch.testing.assert_close(model.inverse(eps), u, atol=1e-4, rtol=0)


def test_catalogue_names_and_unknown_name():
    names = nfcv.layer_names()
    for expected in ("actnorm", "invconv_lu", "affine_coupling", "spline_coupling", "squeeze"):
        assert expected in names
    with pytest.raises(ValueError, match="unknown layer 'nope'.*actnorm"):
        nfcv.build_layer("nope", (4, 4, 4))
    with pytest.raises(ValueError, match=r"\(5, 4, 4\)"):
        nfcv.build_layer("affine_coupling", (4, 4, 4)).output_shape((5, 4, 4))


@pytest.mark.parametrize("name", nfcv.layer_names())
def test_catalogue_layer_learns(name):
    """One optimizer step moves the layer off where it started; every parameter gets a gradient."""
    # Off the zero-initialised start, where the last zero conv blocks every earlier gradient.
    shape = SHAPES.get(name, CATALOGUE_SHAPE)
    layer = _perturb(nfcv.build_layer(name, shape), 0.05).train()
    params = list(layer.parameters())
    if not params:
        pytest.skip(f"{name} has no parameters")
    x = torch.randn(8, *shape)
    layer(x)  # data-dependent init, where a layer has one
    before = layer(x)[0].detach().clone()
    z, logdet = layer(x)
    # A generic loss: the Gaussian likelihood is stationary right after ActNorm's data init.
    loss = (z * torch.randn_like(z)).sum() - logdet.sum()
    loss.backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient for {missing}"
    torch.optim.Adam(params, lr=1e-2).step()
    assert not torch.allclose(layer(x)[0], before)


@pytest.mark.parametrize("size", [(5, 6), (2, 2), (1, 3)])
def test_periodic_conv_is_a_circular_cross_correlation(size):
    from nfcv.flows import PeriodicConv

    layer = _perturb(PeriodicConv(3, 3), 0.3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    z, _ = layer(x)
    # z[o, h, w] = sum_(i, a, b) W[o, i, a, b] x[i, h + a - 1, w + b - 1], indices mod (H, W).
    ref = torch.zeros_like(z)
    for a in range(3):
        for b in range(3):
            shifted = torch.roll(x, shifts=(1 - a, 1 - b), dims=(2, 3))
            ref += torch.einsum("oi,bihw->bohw", layer.weight[:, :, a, b], shifted)
    torch.testing.assert_close(z, ref)


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_autoregressive_jacobian_is_lower_triangular_in_raster_order(name):
    c, h, w = 3, 3, 4
    layer = _perturb(nfcv.build_layer(name, (c, h, w)), 0.2).double()
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, c, h, w))[0].reshape(-1), x.reshape(-1)
    )
    # Raster order: row, column, then channel; the tensor's flat index is (channel, row, column).
    order = torch.tensor(
        [k * h * w + i * w + j for i in range(h) for j in range(w) for k in range(c)]
    )
    jac = jac[order][:, order]
    assert torch.all(torch.triu(jac, 1) == 0)
    assert torch.tril(jac, -1).abs().sum() > 0  # it really is autoregressive, not elementwise


def test_hint_jacobian_is_channel_triangular_and_dense_below():
    layer = _perturb(nfcv.build_layer("hint", (4, 1, 1)), 0.3).double().eval()
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, 4, 1, 1))[0].reshape(-1), x.reshape(-1)
    )
    assert torch.all(torch.triu(jac, 1) == 0)
    # One coupling leaves the (x1 -> x1) block diagonal; the recursion fills it.
    assert jac[1, 0] != 0 and jac[3, 2] != 0


def test_ffjord_uses_hutchinson_in_training_and_is_unbiased():
    from nfcv.flows import FFJORD

    layer = _perturb(FFJORD(2, 4, rtol=1e-6, atol=1e-6), 0.1).double()
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64).expand(400, -1, -1, -1)
    exact = layer.eval()(x[:1])[1]
    estimates = layer.train()(x)[1]  # one Gaussian probe per image: independent estimates
    assert estimates.std() > 0
    stderr = estimates.std() / 400**0.5
    assert abs(estimates.mean() - exact[0]) < 4 * stderr


def test_spline_inverse_at_the_bounds_with_peaked_bins_in_float32():
    from nfcv.flows.splines import rational_quadratic_spline

    n, k, bound = 2000, 8, 3.0
    w, h, d = 3 * torch.randn(n, k), 3 * torch.randn(n, k), 3 * torch.randn(n, k - 1)
    for edge in (bound, -bound):
        x, logdet = rational_quadratic_spline(torch.full((n,), edge), w, h, d, bound, inverse=True)
        torch.testing.assert_close(x, torch.full((n,), edge), atol=1e-5, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros(n), atol=1e-5, rtol=0)  # slope 1 there
    x = torch.rand(n) * 2 * bound - bound
    y, _ = rational_quadratic_spline(x, w, h, d, bound)
    x_rec, _ = rational_quadratic_spline(y, w, h, d, bound, inverse=True)
    assert (x_rec - x).abs().median() < 1e-4


def test_mixlogcdf_inverse_carries_gradients():
    from nfcv.flows.splines import mixture_logistic_logit, mixture_logistic_logit_inverse

    logits, means = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    log_scales = 0.3 * torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = mixture_logistic_logit_inverse(y, logits, means, log_scales, tol=1e-12)
    (grad,) = torch.autograd.grad(x.sum(), y)
    _, log_slope = mixture_logistic_logit(x.detach(), logits, means, log_scales)
    torch.testing.assert_close(grad, torch.exp(-log_slope))  # dx/dy = 1 / f'(x)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_ffjord_evaluates_without_autograd_contexts(mode):
    from nfcv.flows import FFJORD

    layer = _perturb(FFJORD(2, 4, rtol=1e-7, atol=1e-7), 0.1).double().eval()
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    ref_z, ref_logdet = layer(x)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        z, logdet = layer(x)
        x_rec, _ = layer.inverse(z)
    torch.testing.assert_close(z, ref_z.detach())
    torch.testing.assert_close(logdet, ref_logdet.detach())
    torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)


def test_patchify_layout_and_errors():
    """Token n is the patch at grid row n // (W/p), column n % (W/p); its values run over the
    patch's rows, columns, then channels. Sizes the patch does not divide are refused."""
    layer = nfcv.build_layer("patchify", (2, 4, 6), patch_size=2)
    x = torch.randn(1, 2, 4, 6)
    z, logdet = layer(x)
    assert z.shape == (1, 6, 8) and not logdet.any()
    # token 4: grid row 1, column 1 -> pixels (2..3, 2..3)
    expected = x[0, :, 2:4, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(z[0, 4], expected)
    with pytest.raises(ValueError, match="does not divide the image size 5x6"):
        nfcv.build_layer("patchify", (2, 5, 6))


@pytest.mark.parametrize("mean_gains", [True, False])
def test_mixlogcdf_components_separate_in_training_only_with_mean_gains(mean_gains):
    """Flow++'s coupling starts as K identical standard logistics. Without per-component gains
    they get identical gradients and stay one logistic (the defect of checkpoints saved before
    `mean_gains`, kept for them); with the gains (every config) they separate."""
    torch.manual_seed(0)
    layer = MixLogCDFCoupling(4, NET, 3, mean_gains=mean_gains)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 4, 3, 3) * 2
    for _ in range(5):
        z, logdet = layer(x)
        loss = (0.5 * z**2).sum() - logdet.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = layer._params(x[:, :2], None)
    groups = (p[..., :3], p[..., 3:6] * layer.component_gains, p[..., 6:9])
    spreads = [float((g.max(-1).values - g.min(-1).values).abs().max()) for g in groups]
    if mean_gains:
        assert min(spreads) > 1e-3, spreads
    else:
        assert max(spreads) == 0.0, spreads


def test_the_configs_turn_mean_gains_on():
    assert nfcv.build_layer("mixlogcdf_coupling", (4, 4, 4)).mean_gains
    model = nfcv.build_model(nfcv.compose(["model=flowpp", "dequant=variational"]))
    couplings = [m for m in model.modules() if isinstance(m, MixLogCDFCoupling)]
    assert couplings and all(m.mean_gains for m in couplings)


def test_a_mixlogcdf_state_dict_from_before_mean_gains_keeps_its_function():
    """A checkpoint saved before `mean_gains` has no `component_gains`: it loads with gains of
    1 (the function it was trained as), also into a model built with today's config (a resumed
    run)."""
    torch.manual_seed(0)
    old = _perturb(MixLogCDFCoupling(4, NET, 3, mean_gains=False), 0.2)
    state = {k: v for k, v in old.state_dict().items() if k != "component_gains"}
    new = MixLogCDFCoupling(4, NET, 3, mean_gains=True)
    new.load_state_dict(state)  # strict: the missing entry is filled in
    assert not new.mean_gains and torch.equal(new.component_gains, torch.ones(3))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(new(x)[0], old(x)[0])
    gained = MixLogCDFCoupling(4, NET, 3, mean_gains=True)
    assert "component_gains" in gained.state_dict()
    reloaded = MixLogCDFCoupling(4, NET, 3)
    reloaded.load_state_dict(gained.state_dict())
    assert reloaded.mean_gains and torch.equal(reloaded.component_gains, gained.component_gains)
