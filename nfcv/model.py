"""`ImageFlow`: one bijection from [0, 1]^D onto a standard normal latent, plus dequantization."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from nfcv.dequant import Dequantizer, UniformDequantization, standard_normal_log_prob
from nfcv.errors import DataRangeError
from nfcv.flows.base import Bijector

# Importance samples evaluated in one pass of bits_per_dim(k > 1): bounds memory for large k.
MAX_IMAGES_PER_PASS = 1024


def check_class_labels(y: Tensor, num_classes: int) -> None:
    """Raise unless `y` is a (B,) tensor of class indices in [0, num_classes) (reads them on the
    host: done once by callers that validate, not in every training step)."""
    y = torch.as_tensor(y)
    if y.dim() != 1 or (y.numel() and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(
            f"labels must be a (B,) tensor of class indices in [0, {num_classes - 1}]"
        )


def _coupling_layers(model: nn.Module) -> list[nn.Module]:
    """The layers with a coupling network `net` that gradient checkpointing and compile act on:
    the image couplings, Jet's token couplings and TarFlow's blocks."""
    from nfcv.flows.coupling import Coupling
    from nfcv.flows.jet import JetCoupling
    from nfcv.flows.tarflow import TarFlowBlock

    kinds = (Coupling, JetCoupling, TarFlowBlock)
    return [m for m in model.modules() if isinstance(m, kinds)]


class ClassConditionalPrior(nn.Module):
    """Glow's class-conditional prior for the top latent (arXiv:1807.03039, section 5, "ycond"):
    ``z_top ~ N(mu_y, sigma_y^2)`` with a mean and log-scale per channel from a zero-initialised
    embedding of the label (so it starts as the standard normal). `shape` is the top block's
    (C, H, W), or (D,) for a flat flow (one mean and scale per dimension)."""

    def __init__(self, shape: Sequence[int], num_classes: int):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.channels = self.shape[0]
        self.positions = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        self.embed = nn.Embedding(self.num_classes, 2 * self.channels)
        nn.init.zeros_(self.embed.weight)

    def check_labels(self, y: Tensor) -> None:
        check_class_labels(y, self.num_classes)

    def _params(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.as_tensor(y, device=self.embed.weight.device).long()
        if y.dim() != 1:
            raise ValueError(
                f"labels must be a (B,) tensor of class indices, got shape {tuple(y.shape)}"
            )
        h = self.embed(y)
        mean, log_sigma = h[:, : self.channels], h[:, self.channels :]
        if len(self.shape) > 1:  # per channel, the same at every position
            mean = mean.repeat_interleave(self.positions, dim=1)
            log_sigma = log_sigma.repeat_interleave(self.positions, dim=1)
        return mean, log_sigma

    def log_prob(self, z: Tensor, y: Tensor, check: bool = True) -> Tensor:
        """log N(z; mu_y, sigma_y^2) per sample, `z` the flat top block (B, prod(shape)).
        `check=False` skips the label-range check (`ImageFlow` checks labels where they enter)."""
        if check:
            self.check_labels(y)
        mean, log_sigma = self._params(y)
        e = (z - mean.to(z.dtype)) * torch.exp(-log_sigma.to(z.dtype))
        return standard_normal_log_prob(e) - log_sigma.to(z.dtype).sum(1)

    def to_latent(self, eps: Tensor, y: Tensor) -> Tensor:
        """``mu_y + sigma_y * eps``: a standard normal draw of the top block made class-y."""
        self.check_labels(y)
        mean, log_sigma = self._params(y)
        return mean.to(eps.dtype) + torch.exp(log_sigma.to(eps.dtype)) * eps


@dataclass
class LogWeightParts:
    """The parts of ``log w = sum(latent) + logdet - log_q - discrete`` (nats, per sample)."""

    latent: list[Tensor]  # log-density of each latent block under the base
    logdet: Tensor  # log|det| of the whole bijection (preprocessing and learned priors included)
    log_q: Tensor  # log q(u | x) of the dequantization noise (0 for uniform noise)
    discrete: float  # D log(num_bins): densities on [0, 1]^D -> probabilities of bins (0 for
    # Gaussian noise augmentation, whose figure is the continuous density of the noised images)

    def total(self, dtype: torch.dtype | None = None) -> Tensor:
        """``log w``, accumulated in `dtype` (default: the parts' own)."""
        cast = (lambda v: v.to(dtype)) if dtype is not None else (lambda v: v)
        latent = torch.stack([cast(lp) for lp in self.latent]).sum(0)
        return latent + cast(self.logdet) - cast(self.log_q) - self.discrete


class ImageFlow(nn.Module):
    """A normalizing flow over images ``x in [0, 1]^(C, H, W)`` with base N(0, I).

    `preprocess` (e.g. Glow's shift to [-0.5, 0.5]) and `flow` (e.g. a `MultiScale`) are
    bijections whose log-dets enter the density; `flow` must output ``(B, D)``.

    With `num_classes` the model is class-conditional: the top latent block has the prior
    `ClassConditionalPrior` and every density is p(x | y), so `log_prob`, `log_weights` and
    `bits_per_dim` need the labels ``y``; `transform` and `inverse` are the same bijection for
    every class, and `sample` takes a `label`.

    `config`: the resolved train config the model was built from (`nfcv.build_model` and
    `nfcv.load` set it; None for a model assembled by hand).
    """

    config: DictConfig | None = None

    def __init__(
        self,
        flow: Bijector,
        image_shape: Sequence[int],
        num_bins: int,
        dequantizer: Dequantizer | None = None,
        preprocess: Bijector | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.dim = math.prod(self.image_shape)
        # An empty buffer that moves with the model: its device and dtype are the model's, even
        # for a flow without parameters.
        self.register_buffer("_probe", torch.zeros(0), persistent=False)
        self.preprocess = preprocess
        self.flow = flow
        self.dequantizer = dequantizer if dequantizer is not None else UniformDequantization()
        if not getattr(self.dequantizer, "bounded", True) and preprocess is not None:
            from nfcv.flows.elementwise import Logit

            if any(isinstance(m, Logit) for m in preprocess.modules()):
                raise ValueError(
                    f"{type(self.dequantizer).__name__} adds noise that leaves [0, 1], and the "
                    "model's logit preprocessing is defined on [0, 1] only: use a model without "
                    "a logit (glow, nice, maf, hint, ffjord) or dequant=uniform|variational"
                )
        shape = self.image_shape
        if preprocess is not None:
            shape = preprocess.output_shape(shape)
        out = flow.output_shape(shape)
        if tuple(out) != (self.dim,):
            raise ValueError(
                f"the flow maps images of shape {self.image_shape} to latents of shape "
                f"{tuple(out)}; ImageFlow needs a flat latent of shape ({self.dim},)"
            )
        self.num_classes = int(num_classes) if num_classes else None
        self.class_prior = None
        # A flow that reads the labels itself (TarFlow's class embedding) gets them through
        # `context`; its base stays N(0, I). Other flows get a class-conditional prior.
        self.labels_in_flow = bool(getattr(flow, "label_conditional", False))
        flow_classes = getattr(flow, "num_classes", None) if self.labels_in_flow else None
        if self.labels_in_flow and flow_classes != self.num_classes:
            raise ValueError(
                f"the flow is class-conditional with {flow_classes} classes but the model has "
                f"num_classes={self.num_classes}: build both from the same model.num_classes"
            )
        if self.num_classes and not self.labels_in_flow:
            shapes = getattr(flow, "factored_shapes", None)
            top = tuple(shapes[-1]) if shapes else (self.latent_sizes[-1],)
            self.class_prior = ClassConditionalPrior(top, self.num_classes)

    def checkpoint_networks(self, enabled: bool = True) -> int:
        """Gradient checkpointing of every coupling network (in the flow and in a variational
        dequantizer): their activations are recomputed in the backward pass instead of kept,
        which cuts training memory for about one more forward pass of the networks. Batch norm
        (RealNVP's networks) sees each batch twice in training, so its running statistics move
        twice as fast. Returns the number of networks affected."""
        layers = _coupling_layers(self)
        for layer in layers:
            layer.checkpoint_grads = bool(enabled)
        return len(layers)

    def compile_networks(self, **kwargs) -> int:
        """`torch.compile` every coupling network in place (`nn.Module.compile`, so parameter
        names and checkpoints are unchanged); keyword arguments go to `torch.compile`. Returns
        the number of networks compiled."""
        layers = _coupling_layers(self)
        for layer in layers:
            layer.net.compile(**kwargs)
        return len(layers)

    @property
    def discrete_bound(self) -> bool:
        """Whether `bits_per_dim` bounds the discrete likelihood of integer images (uniform and
        variational dequantization) or is the continuous density of noised images (Gaussian
        noise augmentation, `nfcv.dequant.GaussianDequantization`)."""
        return bool(getattr(self.dequantizer, "discrete_bound", True))

    @property
    def noise_std(self) -> float | None:
        """The standard deviation of the Gaussian noise the model was trained on (in [0, 1]
        image units), or None for a model trained with (uniform, variational) dequantization."""
        std = getattr(self.dequantizer, "noise_std", None)
        return None if std is None else float(std)

    def figure(self) -> str:
        """What `bits_per_dim` computes for this model, in words (for labels)."""
        describe = getattr(self.dequantizer, "figure", None)
        return describe() if describe is not None else "bits per dim"

    @property
    def latent_sizes(self) -> list[int]:
        """Sizes of the blocks of ``eps``, in order (first factored-out level first); a flow
        without levels is one block of size D."""
        return list(getattr(self.flow, "latent_sizes", [self.dim]))

    @property
    def device(self) -> torch.device:
        """Where the model lives (follows `.to()`)."""
        return self._probe.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's float dtype (follows `.double()`, `.to(dtype)`): what noise and
        dequantized images are made in."""
        return self._probe.dtype

    def _check_images(self, x: Tensor) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"expected a tensor of images, got {type(x).__name__}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(
                f"images must be a real tensor (integer or floating point), got dtype {x.dtype}"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"got an empty batch (shape {tuple(x.shape)}): pass one image or more"
            )

    def _check_labels(self, labels: Tensor | None, batch: int, values: bool = True) -> None:
        """Labels only for a class-conditional model, one per image; with `values`, each a class
        index in range (a host read of the labels: skipped in training steps after the first)."""
        if labels is None:
            return
        if not self.num_classes:
            raise ValueError(
                "labels= given, but this model is not class-conditional (it models p(x); train "
                "with model.conditional=true for p(x | y)): drop the labels"
            )
        if torch.is_tensor(labels) and tuple(labels.shape) != (batch,):
            raise ValueError(
                f"labels must be a ({batch},) tensor of class indices, one per image, got shape "
                f"{tuple(labels.shape)}"
            )
        if values:
            check_class_labels(labels, self.num_classes)

    def transform(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] -> (eps of shape (B, D), log|det d eps / dx| of shape (B,)).

        `labels` matter only to a flow that reads them (a class-conditional TarFlow; without
        them it runs as its null class, the same bijection both ways); others ignore them."""
        self._check_images(x)
        logdet = x.new_zeros(x.shape[0])
        if self.preprocess is not None:
            x, ld = self.preprocess(x)
            logdet = logdet + ld
        if self.labels_in_flow and labels is not None:
            eps, ld = self.flow(x, labels)
        else:
            eps, ld = self.flow(x)
        return eps, logdet + ld

    def inverse(self, eps: Tensor, labels: Tensor | None = None, guidance=None) -> Tensor:
        """Exact inverse of `transform` (given the same `labels`): (B, D) latents -> (B, C, H,
        W) images. `guidance` (an `nfcv.flows.tarflow.Guidance`) guides a TarFlow's sampling, and
        the result is then no longer the inverse."""
        if eps.dim() != 2 or eps.shape[1] != self.dim:
            raise ValueError(f"expected latents of shape (B, {self.dim}), got {tuple(eps.shape)}")
        if labels is not None and self.num_classes:
            check_class_labels(labels, self.num_classes)  # a TarFlow reads negatives as null
        if guidance is not None and getattr(guidance, "scale", 0) > 0:
            if not hasattr(self.flow, "label_conditional"):
                raise ValueError(
                    f"guidance needs a TarFlow model (model=tarflow); this one is "
                    f"{type(self.flow).__name__}, which has no guided sampling"
                )
            x, _ = self.flow.inverse(
                eps, labels if self.labels_in_flow else None, guidance=guidance
            )
        elif self.labels_in_flow and labels is not None:
            x, _ = self.flow.inverse(eps, labels)
        else:
            x, _ = self.flow.inverse(eps)
        if self.preprocess is not None:
            x, _ = self.preprocess.inverse(x)
        return x

    def latent_log_probs(self, eps: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """log-density of each block of `eps` (`latent_sizes`) under the base, per sample: the
        standard normal, and for a class-conditional model the labels' prior for the top."""
        blocks = torch.split(eps, self.latent_sizes, dim=1)
        out = [standard_normal_log_prob(b) for b in blocks[:-1]]
        if self.class_prior is None:
            self._check_labels(labels, eps.shape[0], values=False)  # values: at the entry points
            if self.labels_in_flow and labels is None:
                raise ValueError(
                    "this model is class-conditional (its densities are p(x | y)): pass the labels"
                )
            return [*out, standard_normal_log_prob(blocks[-1])]
        if labels is None:
            raise ValueError(
                "this model is class-conditional (its densities are p(x | y)): pass the labels"
            )
        return [*out, self.class_prior.log_prob(blocks[-1], labels, check=False)]

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Continuous log-density of images in [0, 1]^D, in nats, shape (B,); ``p(x | y)`` for a
        class-conditional model. Values outside [0, 1] are refused (integer pixel values go to
        `bits_per_dim`)."""
        self._check_images(x)
        self._check_labels(labels, x.shape[0])
        lo, hi = x.min().item(), x.max().item()
        if not 0.0 <= lo <= hi <= 1.0:  # NaN fails every comparison
            raise ValueError(
                f"log_prob takes images in [0, 1] (a density on [0, 1]^D), got values in "
                f"[{lo:g}, {hi:g}]: pass images scaled to [0, 1] (integer pixel values go to "
                "bits_per_dim)"
            )
        eps, logdet = self.transform(x, labels)
        if self.class_prior is None and not self.labels_in_flow:
            return standard_normal_log_prob(eps) + logdet
        return torch.stack(self.latent_log_probs(eps, labels)).sum(0) + logdet

    def score(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``grad_x log p(x)``: the gradient of the model's continuous log-density at images `x`
        of shape (B, C, H, W), by autograd through the flow (`transform` and the prior), in the
        model's [0, 1] image units. Any real values are taken (noised images leave [0, 1]).
        One value per image in eval mode; in train mode dropout and batch statistics enter it.
        Works under ``torch.no_grad`` (not under ``torch.inference_mode``)."""
        self._check_images(x)
        self._check_labels(labels, x.shape[0])
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            eps, logdet = self.transform(y, labels)
            log_p = torch.stack(self.latent_log_probs(eps, labels)).sum(0) + logdet
            (grad,) = torch.autograd.grad(log_p.sum(), y)
        return grad.detach()

    def denoise(
        self, x: Tensor, sigma: float | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """Score-based denoising in one step (Tweedie's formula; TarFlow, arXiv:2412.06329):
        ``x + sigma^2 grad_x log p(x)``, the posterior mean of the clean image given x when p is
        the density of clean images plus N(0, sigma^2 I) noise, which a model trained with
        Gaussian noise augmentation (`nfcv.dequant.GaussianDequantization`) learns.

        `sigma` defaults to that noise's standard deviation (`noise_std`); a model trained
        without Gaussian noise has none, and needs `sigma` given. Not clamped to [0, 1]."""
        if sigma is None:
            sigma = self.noise_std
            if sigma is None:
                raise ValueError(
                    "this model was trained without Gaussian noise (dequantization "
                    f"{type(self.dequantizer).__name__}), so it has no noise level for "
                    "Tweedie's formula: pass sigma= (or train with dequant=gaussian)"
                )
        try:
            s = float(sigma)
        except (TypeError, ValueError):
            s = math.nan
        if not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"sigma must be a finite number > 0 (a noise level in [0, 1] image units), got "
                f"{sigma!r}"
            )
        return (x + s * s * self.score(x, labels)).detach()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        label: int | Tensor | None = None,
        denoise_sigma: float | None = None,
        guidance=None,
    ) -> Tensor:
        """n images in [0, 1]: ``inverse(temperature * randn)``, clamped to the image range.

        Class-conditional models draw the top block from class `label`'s prior (an int for all
        n, or a (n,) tensor), or a TarFlow decodes with class `label`; without a label, image i
        gets class ``i % num_classes``. `guidance`: an `nfcv.flows.tarflow.Guidance` (TarFlow).
        `denoise_sigma`: denoise the draws with `denoise` at that noise level before the clamp
        (e.g. ``model.noise_std`` for a model trained with Gaussian noise); None: no denoising.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be an integer >= 1 (images to draw), got {n!r}")
        try:
            t = float(temperature)
        except (TypeError, ValueError, RuntimeError):
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(
                f"temperature must be a finite number >= 0 (1: the model's distribution; 0: the "
                f"latent's mean), got {temperature!r}"
            )
        device, dtype = self.device, self.dtype
        eps = temperature * torch.randn(
            n, self.dim, generator=generator, device=device, dtype=dtype
        )
        labels = None
        if self.num_classes:
            if label is None:
                labels = torch.arange(n, device=device) % self.num_classes
            else:
                labels = torch.as_tensor(label, device=device).long().expand(n)
        elif label is not None:
            raise ValueError("label= needs a class-conditional model (model.conditional=true)")
        if self.class_prior is not None:
            top = self.latent_sizes[-1]
            eps = torch.cat([eps[:, :-top], self.class_prior.to_latent(eps[:, -top:], labels)], 1)
        x = self.inverse(eps, labels, guidance=guidance)
        if denoise_sigma is not None:
            x = self.denoise(x, denoise_sigma, labels)
        return x.clamp(0.0, 1.0)

    def check_range(self, x_int: Tensor) -> None:
        """Raise `DataRangeError` unless every value is an integer in [0, num_bins - 1]."""
        lo, hi = x_int.min().item(), x_int.max().item()
        if lo < 0 or hi > self.num_bins - 1:
            raise DataRangeError(
                f"pixel values must be integers in [0, {self.num_bins - 1}] for num_bins="
                f"{self.num_bins}, got values in [{lo:g}, {hi:g}]; pass integer images (not "
                "images scaled to [0, 1]) and set data.num_bins (or data.num_bits) to match the "
                "data"
            )
        if x_int.is_floating_point() and not torch.equal(x_int, torch.round(x_int)):
            raise DataRangeError(
                "pixel values must be integers (integer-valued tensors); got fractional values. "
                "Pass the quantised image, not a dequantised or normalised one"
            )

    def check_inputs(
        self, x_int: Tensor, k: int = 1, check: bool = True, labels: Tensor | None = None
    ) -> None:
        """The checks of `bits_per_dim`: a non-empty batch of real images of the model's shape,
        `k`, labels only for a class-conditional model, and (with `check`) the pixel range and
        the label values."""
        self._check_images(x_int)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if k > 1 and not self.discrete_bound:
            raise ValueError(
                f"k={k}: importance samples tighten a bound on the discrete likelihood, and this "
                "model was trained with Gaussian noise (its figure is the continuous density of "
                "the noised images, which has no bound to tighten): use k=1"
            )
        self._check_labels(labels, x_int.shape[0], values=check)
        if check:
            self.check_range(x_int)

    def log_weight_passes(
        self, x_int: Tensor, k: int = 1, labels: Tensor | None = None
    ) -> Iterator[tuple[int, LogWeightParts]]:
        """The `k` importance weights of each image, in its parts, one pass at a time.

        Each pass dequantizes ``m`` copies of the batch at once (at most `MAX_IMAGES_PER_PASS`
        images a pass, so k = 1024 needs the memory of k = 1's largest pass) and yields
        ``(m, parts)``, the parts' tensors of shape (m * B,), copy-major. `bits_per_dim` and
        `nfcv.evaluate` both read the weights from here, so from the same random state they see
        the same noise.
        """
        b = x_int.shape[0]
        x = x_int.to(self.dtype)
        per_pass = 1 if k == 1 else max(1, MAX_IMAGES_PER_PASS // b)
        # Densities on [0, 1]^D -> probabilities of bins; none for Gaussian noise augmentation,
        # whose figure is the continuous density of the noised images.
        discrete = self.dim * math.log(self.num_bins) if self.discrete_bound else 0.0
        for start in range(0, k, per_pass):
            m = min(per_pass, k - start)
            xs = x.repeat(m, 1, 1, 1) if m > 1 else x
            ys = labels.to(x.device).repeat(m) if labels is not None and m > 1 else labels
            y, log_q = self.dequantizer(xs, self.num_bins)
            eps, logdet = self.transform(y, ys)
            yield m, LogWeightParts(self.latent_log_probs(eps, ys), logdet, log_q, discrete)

    def log_weights(self, x_int: Tensor, labels: Tensor | None = None) -> Tensor:
        """One importance weight per image: ``log p(y) - log q(u|x) - D log(num_bins)``, nats.

        A lower bound on log P(x) for the discrete image x (one dequantization sample);
        `labels` for a class-conditional model. With Gaussian noise augmentation
        (`discrete_bound` False): ``log p(y)`` of the noised image, no bound.
        """
        self._check_labels(labels, x_int.shape[0])
        ((_, parts),) = self.log_weight_passes(x_int, 1, labels)
        return parts.total()

    def bits_per_dim(
        self, x_int: Tensor, k: int = 1, check: bool = True, labels: Tensor | None = None
    ) -> Tensor:
        """Discrete bits per dim of integer images, shape (B,), with k dequantization samples.

        ``k > 1`` gives the importance-weighted bound ``logsumexp_k(log w_k) - log k``. For a
        model trained with Gaussian noise (``discrete_bound`` False) the figure is instead the
        continuous ``-log2 p(y) / D`` of the noised images ``y = (x + 1/2) / num_bins + sigma
        n``, no bound on the discrete likelihood (`figure` says so), and k must be 1.
        `check=False` skips the pixel-range check (for data validated already). `labels`: the
        classes, for a class-conditional model (then the figure is for p(x | y)).
        """
        self.check_inputs(x_int, k, check, labels)
        b = x_int.shape[0]
        weights = torch.cat(
            [parts.total().view(m, b) for m, parts in self.log_weight_passes(x_int, k, labels)]
        )
        log_px = weights[0] if k == 1 else torch.logsumexp(weights, dim=0) - math.log(k)
        return -log_px / (self.dim * math.log(2))
