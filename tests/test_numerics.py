"""Numerical safety of the layers: couplings under extreme network outputs, singular 1x1 convs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nfcv
from nfcv.errors import NumericalError
from nfcv.flows.conv1x1 import InvConv1x1, name_layers

COUPLINGS = [
    ("affine_coupling", {}),
    ("affine_coupling", {"scale": "tanh"}),
    ("additive_coupling", {}),
    ("spline_coupling", {}),
    ("mixlogcdf_coupling", {}),
    ("naf_coupling", {}),
]


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("name, options", COUPLINGS)
def test_couplings_stay_finite_when_the_network_outputs_are_extreme(name, options, value):
    layer = nfcv.build_layer(name, (4, 4, 4), **options)
    last = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    with torch.no_grad():  # every output of the coupling network is `value`
        last.weight.zero_()
        last.bias.fill_(value)
    x = torch.rand(3, 4, 4, 4)
    z, logdet = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    if name == "affine_coupling" and not options and value < 0:
        return  # scale sigmoid(-1e4) is 0 in float32: that half cannot be inverted
    x_back, logdet_back = layer.inverse(z)
    assert torch.isfinite(x_back).all() and torch.isfinite(logdet_back).all()


def _singular_model():
    model = nfcv.build_model(nfcv.compose(["model.permutation=plain", "model.steps=1"]))
    conv = next(m for m in model.modules() if isinstance(m, InvConv1x1))
    with torch.no_grad():
        conv.w[1] = conv.w[0]  # two equal rows: det W = 0
    return model, conv


def test_a_singular_plain_1x1_conv_is_reported_by_name_in_training():
    model, conv = _singular_model()
    assert conv.layer_name and "." in conv.layer_name  # its path in the model
    with pytest.warns(RuntimeWarning, match=rf"{conv.layer_name}: \|det W\| = .* below 1e-06"):
        model.sample(2)


def test_a_singular_plain_1x1_conv_is_an_error_in_evaluation():
    model, conv = _singular_model()
    name_layers(model, singular="raise")  # what nfcv.load does
    with pytest.raises(NumericalError, match=rf"{conv.layer_name}.*model.permutation=lu"):
        model.sample(2)


def test_loaded_models_refuse_to_invert_a_singular_conv(tiny, tmp_path):
    from nfcv.training.run import train

    overrides = tiny(**{"model.permutation": "plain", "trainer.max_steps": "2"})
    summary = train(nfcv.compose(overrides), tmp_path / "run")
    ckpt = torch.load(summary["last_ckpt"], weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith(".w"))
    ckpt["state_dict"][key][1] = ckpt["state_dict"][key][0]
    torch.save(ckpt, tmp_path / "singular.ckpt")
    model = nfcv.load(tmp_path / "singular.ckpt", ema=False)
    with pytest.raises(NumericalError, match="cannot be inverted"):
        model.sample(2)


def test_a_well_conditioned_conv_is_not_reported():
    model = nfcv.build_model(nfcv.compose(["model.permutation=plain", "model.steps=1"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.sample(2)
