"""Class-conditional models (Glow's y-conditioning): a class prior on the top latent, bits per
dim of p(x | y), and sampling by label, through training, eval and sample."""

from __future__ import annotations

import math

import pytest
import torch

import nfcv
from nfcv.model import ClassConditionalPrior


def _conditional(*extra: str) -> nfcv.ImageFlow:
    cfg = nfcv.compose(
        [
            "model.hidden=8",
            "model.steps=1",
            "model.conditional=true",
            "model.num_classes=10",
            *extra,
        ]
    )
    model = nfcv.build_model(cfg)
    model.train()
    model.bits_per_dim(torch.randint(0, 17, (16, 1, 8, 8)), labels=torch.arange(16) % 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_class_prior_is_the_normal_density_of_its_class_by_hand():
    prior = ClassConditionalPrior((2, 3, 3), num_classes=4)
    with torch.no_grad():
        prior.embed.weight.normal_()
    z = torch.randn(5, 18, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    prior = prior.double()
    mean, log_sigma = prior.embed.weight[y, :2], prior.embed.weight[y, 2:]
    mean, sigma = mean.repeat_interleave(9, 1), log_sigma.exp().repeat_interleave(9, 1)
    expected = torch.distributions.Normal(mean, sigma).log_prob(z).sum(1)
    torch.testing.assert_close(prior.log_prob(z, y), expected)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\]"):
        prior.log_prob(z, torch.tensor([0, 1, 2, 3, 4]))


def test_densities_need_labels_and_depend_on_them():
    model = _conditional()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)
    a = model.log_prob(x, torch.zeros(4, dtype=torch.long))
    b = model.log_prob(x, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)
    # The transform is the same bijection for every class; only the top block's prior changes.
    eps, logdet = model.transform(x)
    blocks = torch.split(eps, model.latent_sizes, dim=1)
    normal = sum(
        -0.5 * (v.pow(2).sum(1) + v.shape[1] * math.log(2 * math.pi)) for v in blocks[:-1]
    )
    top = model.class_prior.log_prob(blocks[-1], torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(a, normal + top + logdet)


def test_sampling_by_label_draws_the_top_block_from_that_class():
    model = _conditional().double()
    x = model.sample(3, temperature=0.0, label=7)  # the class mean, decoded
    eps, _ = model.transform(x.clamp(1e-6, 1 - 1e-6))
    mean, _ = model.class_prior._params(torch.full((3,), 7))
    top = eps[:, -model.latent_sizes[-1] :]
    # Decoding is exact; clamping to [0, 1] may move a few pixels of an untrained model.
    if ((x > 0) & (x < 1)).all():
        torch.testing.assert_close(top, mean.double(), atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="class-conditional"):
        nfcv.build_model(nfcv.compose(["model.hidden=8", "model.steps=1"])).sample(2, label=1)


def test_conditional_training_eval_and_sample_end_to_end(tmp_path, tiny):
    from omegaconf import OmegaConf

    from nfcv.cli.eval import evaluate
    from nfcv.cli.sample import sample
    from nfcv.errors import ConfigError
    from nfcv.training.run import train

    summary = train(nfcv.compose([*tiny(), "model.conditional=true"]), run_dir=tmp_path / "run")
    assert 0 < summary["test_bpd"] < 10
    model = nfcv.load(summary["best_ckpt"])
    assert model.num_classes == 10  # from the digits' labels
    assert model.config.model.num_classes == 10
    result = evaluate(
        nfcv.compose(
            [f"ckpt={summary['best_ckpt']}", "progress=false", f"out={tmp_path / 'e.json'}"],
            config_name="eval",
        )
    )
    assert result["bpd"] == pytest.approx(summary["test_bpd"], abs=0.05)
    cfg = nfcv.compose(
        [f"ckpt={summary['best_ckpt']}", "label=3", "n=4", f"out={tmp_path / 's.png'}"],
        config_name="sample",
    )
    assert sample(cfg).is_file()
    with pytest.raises(ConfigError, match=r"label must be in \[0, 9\]"):
        sample(OmegaConf.merge(cfg, {"label": 12}))
