"""TarFlow (arXiv:2412.06329): the block's cached inverse against the cache-free one, round trips,
guidance, the preset's bad inputs, and the ImageNet 64x64 experiment's parameter count against a
count from the reference code's module shapes."""

from __future__ import annotations

import math

import pytest
import torch

import nfcv
from nfcv.errors import ConfigError
from nfcv.flows import TarFlow, TarFlowBlock
from nfcv.flows.tarflow import Guidance


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _block(flip=False, num_classes=None, n=6, d=3, layers=2) -> TarFlowBlock:
    torch.manual_seed(0)
    block = TarFlowBlock(
        n, d, width=8, layers=layers, head_dim=4, flip=flip, num_classes=num_classes
    )
    return _perturb(block, 0.2).double().eval()


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_cached_inverse_equals_cache_free_inverse_and_round_trips(flip, num_classes):
    block = _block(flip, num_classes)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, -1, 1]) if num_classes else None
    z, logdet = block(x, labels)
    with torch.no_grad():  # the cache's preallocated buffers (without autograd)
        cached, ld_cached = block.inverse(z, labels)
        plain, ld_plain = block.inverse(z, labels, cache=False)
    # With autograd the cache concatenates instead: the same values, and a gradient.
    z_grad = z.detach().requires_grad_()
    x_grad, _ = block.inverse(z_grad, labels)
    torch.testing.assert_close(x_grad, cached, atol=1e-12, rtol=0)
    x_grad.sum().backward()
    assert torch.isfinite(z_grad.grad).all() and z_grad.grad.abs().sum() > 0
    torch.testing.assert_close(cached, plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_cached, ld_plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(cached, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_cached, -logdet, atol=1e-12, rtol=0)
    # Float32: the round trip to float32 rounding.
    block32 = block.float()
    z32, _ = block32(x.float(), labels)
    torch.testing.assert_close(block32.inverse(z32, labels)[0], x.float(), atol=1e-5, rtol=0)


def test_block_is_autoregressive_in_its_token_order():
    block = _block(flip=False)
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda v: block(v.view(1, 6, 3))[0].reshape(6, 3), x
    ).reshape(6, 3, 6, 3)
    for i in range(6):
        assert torch.all(jac[i, :, i + 1 :] == 0)  # z_i reads no later token
        assert torch.all(jac[i, :, i].diagonal() != 0)
    # Token 0: a = b = 0, so z_0 = x_0 exactly.
    torch.testing.assert_close(block(x)[0][:, 0], x[:, 0], atol=0, rtol=0)
    # Flipped: the last token passes through.
    flipped = _block(flip=True)
    torch.testing.assert_close(flipped(x)[0][:, -1], x[:, -1], atol=0, rtol=0)


def test_block_starts_as_the_identity_and_logdet_is_the_exact_sum():
    block = TarFlowBlock(5, 4, width=8, layers=1, head_dim=4).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    z, logdet = block(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    # A constant a = 0.3 from the bias: every token but the first is scaled by exp(-0.3), and
    # the log-det is the sum over (N - 1) * D values (the reference's mean would be 0.3 * 4/5).
    with torch.no_grad():
        block.proj_out.bias[:4] = 0.3
    z, logdet = block(x)
    torch.testing.assert_close(z[:, 1:], x[:, 1:] * math.exp(-0.3))
    torch.testing.assert_close(logdet, torch.full((2,), -0.3 * 4 * 4, dtype=torch.float64))


def _tarflow(num_classes=None) -> TarFlow:
    torch.manual_seed(1)

    def block(n, d, **kw):
        return TarFlowBlock(n, d, width=8, layers=1, head_dim=4, **kw)

    flow = TarFlow((1, 4, 4), 2, 3, block, num_classes=num_classes)
    return _perturb(flow, 0.05).double().eval()


def test_guidance_at_zero_equals_plain_sampling():
    for num_classes, temp in ((3, 1.0), (None, 1.5)):
        flow = _tarflow(num_classes)
        z = torch.randn(4, 16, dtype=torch.float64)
        labels = torch.tensor([0, 1, 2, 0]) if num_classes else None
        plain, _ = flow.inverse(z, labels)
        # Guidance(0) runs the guided path (two streams in one batch) with weight 0.
        zero, _ = flow.inverse(z, labels, guidance=Guidance(0.0, attn_temp=temp))
        torch.testing.assert_close(zero, plain, atol=1e-12, rtol=0)
        guided, _ = flow.inverse(z, labels, guidance=Guidance(2.0, attn_temp=temp))
        assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("annealed", [False, True])
def test_classifier_free_guidance_on_a_and_b_by_hand(annealed):
    # One block of three tokens: token i + 1 = z_{i+1} exp(a) + b with (a, b) from tokens 0..i,
    # guided as a = a_c + w (a_c - a_u) from the conditional and the null-class predictions (the
    # null class at attention temperature 1.3), w = G or, annealed, G (i + 1) / (N - 1).
    torch.manual_seed(2)
    block = _perturb(TarFlowBlock(3, 3, width=8, layers=2, head_dim=4, num_classes=4), 0.3)
    block = block.double().eval()
    z = torch.randn(3, 3, 3, dtype=torch.float64)
    labels = torch.tensor([1, 3, 0])
    x, _ = block.inverse(z, labels, guidance=Guidance(1.7, annealed=annealed, attn_temp=1.3))

    def ab(prefix, labels, temp):  # the whole prefix, causally masked: no cache
        scale = torch.full((3, 1, 1, 1), 1 / temp, dtype=torch.float64)
        return block.proj_out(block.net(prefix, labels, scale))[:, -1].chunk(2, -1)

    tokens = [z[:, 0]]
    for i in range(2):
        prefix = torch.stack(tokens, 1)
        (a_c, b_c), (a_u, b_u) = ab(prefix, labels, 1.0), ab(prefix, None, 1.3)
        w = 1.7 * ((i + 1) / 2 if annealed else 1.0)
        a, b = a_c + w * (a_c - a_u), b_c + w * (b_c - b_u)
        tokens.append(z[:, i + 1] * torch.exp(a) + b)
    torch.testing.assert_close(x, torch.stack(tokens, 1), atol=1e-12, rtol=1e-12)


def test_annealed_guidance_grows_over_the_tokens():
    flow = _tarflow(3)
    z = torch.randn(2, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    plain, _ = flow.inverse(z, labels)
    full, _ = flow.inverse(z, labels, guidance=Guidance(1.0))
    annealed, _ = flow.inverse(z, labels, guidance=Guidance(1.0, annealed=True))
    assert not torch.allclose(annealed, full) and not torch.allclose(annealed, plain)


def test_unconditional_guidance_needs_an_attention_temperature():
    flow = _tarflow(None)
    with pytest.raises(ValueError, match="attention-temperature guidance.*attn_temp"):
        flow.inverse(torch.randn(1, 16, dtype=torch.float64), guidance=Guidance(1.0))


def test_label_dropout_only_in_training_and_null_class_without_labels():
    flow = _tarflow(3)
    flow.label_dropout = 0.5
    x = torch.rand(64, 1, 4, 4, dtype=torch.float64)
    labels = torch.arange(64) % 3
    z_eval, _ = flow(x, labels)
    z_null, _ = flow(x)
    z_neg, _ = flow(x, torch.full((64,), -1))
    torch.testing.assert_close(z_null, z_neg, atol=0, rtol=0)
    flow.train()
    torch.manual_seed(0)
    z_train, _ = flow(x, labels)
    dropped = ~torch.isclose(z_train, z_eval).all(1)
    assert 10 < dropped.sum() < 54  # about half the labels dropped...
    torch.testing.assert_close(z_train[dropped], z_null[dropped])  # ...to the null class


def test_preset_builds_and_trains_a_step_conditional():
    cfg = nfcv.compose(
        [
            "model=tarflow",
            "model.conditional=true",
            "model.num_classes=10",
            "model.width=16",
            "model.head_dim=8",
            "model.blocks=2",
            "model.layers=1",
        ]
    )
    model = nfcv.build_model(cfg)
    assert model.class_prior is None and model.labels_in_flow
    x, y = torch.randint(0, 17, (8, 1, 8, 8)), torch.arange(8)
    model.train()
    model.bits_per_dim(x, labels=y).mean().backward()
    names = [n for n, p in model.named_parameters() if p.grad is None]
    assert not names
    with pytest.raises(ValueError, match="pass the labels"):
        model.bits_per_dim(x)
    model.eval()
    with torch.no_grad():
        eps, _ = model.transform(x.float() / 17 + 0.01, y)
        torch.testing.assert_close(model.inverse(eps, y), x.float() / 17 + 0.01, atol=1e-4, rtol=0)
    assert model.sample(3, label=2, guidance=Guidance(1.0)).shape == (3, 1, 8, 8)


def test_bad_patch_size_and_width_fail_when_the_config_is_composed():
    with pytest.raises(ConfigError, match=r"model.patch_size=3: .*divides the image's height"):
        nfcv.compose(["model=tarflow", "model.patch_size=3"])
    with pytest.raises(ConfigError, match=r"model.head_dim=32: .*divides model.width"):
        nfcv.compose(["model=tarflow", "model.width=48"])
    nfcv.compose(["model=tarflow", "data=fashion_mnist", "model.patch_size=7"])  # 28 = 4 x 7


def test_bad_patch_size_and_width_fail_when_the_model_is_built():
    # A config composed before the rules (a stored one) still fails when the model is built.
    cfg = nfcv.compose(["model=tarflow"])
    cfg.model.patch_size = 3
    with pytest.raises(ConfigError, match="patch size 3 does not divide the image size 8x8"):
        nfcv.build_model(cfg)
    cfg = nfcv.compose(["model=tarflow"])
    cfg.model.width = 48
    with pytest.raises(ConfigError, match="width 48 is not a multiple of head_dim 32"):
        nfcv.build_model(cfg)


def test_guidance_on_a_model_without_it_is_an_error():
    model = nfcv.build_model(nfcv.compose(["model=nice", "model.hidden=8", "model.layers=1"]))
    with pytest.raises(ValueError, match="guidance needs a TarFlow model"):
        model.sample(2, guidance=Guidance(1.0))


def _reference_imagenet64_count() -> int:
    """Parameters of apple/ml-tarflow's ``Model(in_channels=3, img_size=64, patch_size=2,
    channels=768, num_blocks=8, layers_per_block=8, nvp=True, num_classes=0)`` (the README's
    unconditional ImageNet 64x64 command), from the modules' shapes in transformer_flow.py."""
    c, n, d, layers, blocks, expansion = 768, (64 // 2) ** 2, 3 * 2 * 2, 8, 8, 4

    def linear(i, o):  # torch.nn.Linear with bias
        return i * o + o

    layer_norm = 2 * c
    attention = layer_norm + linear(c, 3 * c) + linear(c, c)  # norm, qkv, proj
    mlp = layer_norm + linear(c, expansion * c) + linear(expansion * c, c)
    meta_block = linear(d, c) + n * c + layers * (attention + mlp) + linear(c, 2 * d)
    return blocks * meta_block  # the prior's `var` is a buffer


def test_imagenet64_experiment_matches_the_reference_parameter_count():
    cfg = nfcv.compose(["experiment=tarflow_imagenet64"])
    assert tuple(cfg.data.image_shape) == (3, 64, 64)
    with torch.device("meta"):
        model = nfcv.build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == _reference_imagenet64_count() == 460_142_784
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    assert list(cfg.optim.optimizer.betas) == [0.9, 0.95]
    assert cfg.optim.optimizer.weight_decay == 1e-4 and cfg.optim.optimizer.lr == 1e-4
    assert cfg.optim.decay == "cosine" and cfg.data.batch_size == 256
    assert cfg.dequant._target_ == "nfcv.dequant.UniformDequantization"
