"""Images as sequences of patch tokens, for the transformer flows (TarFlow, Jet)."""

from __future__ import annotations

from torch import Tensor

from nfcv.flows.base import Bijector, Shape, zero_logdet


class Patchify(Bijector):
    """``(C, H, W) -> (N, p*p*C)``: the image cut into ``N = (H/p)(W/p)`` non-overlapping p x p
    patches in raster order (row by row), each flattened to one token in (row, column, channel)
    order, as ViTs and Jet do (``b (h p1) (w p2) c -> b (h w) (p1 p2 c)`` in channels-last terms).
    A permutation of the values: log-det 0. `inverse` puts the patches back; it needs the image's
    (H, W), `spatial`, to know the grid of patches (without it, the grid must be square).
    """

    def __init__(self, patch_size: int, spatial: tuple[int, int] | None = None):
        super().__init__()
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)
        self.spatial = None if spatial is None else tuple(int(s) for s in spatial)
        if self.spatial is not None:
            self.output_shape((1, *self.spatial))

    def _grid(self, num_tokens: int) -> tuple[int, int]:
        p = self.patch_size
        if self.spatial is not None:
            gh, gw = self.spatial[0] // p, self.spatial[1] // p
        else:
            gh = gw = round(num_tokens**0.5)
        if gh * gw != num_tokens:
            raise ValueError(
                f"Patchify got {num_tokens} tokens, which is not the patch grid of "
                + (
                    f"a {self.spatial[0]}x{self.spatial[1]} image"
                    if self.spatial
                    else "a square image"
                )
                + "; give Patchify the image size (spatial=[H, W])"
            )
        return gh, gw

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        p = self.patch_size
        z = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return z.reshape(b, (h // p) * (w // p), p * p * c), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, n, d = z.shape
        p = self.patch_size
        gh, gw = self._grid(n)
        c = d // (p * p)
        x = z.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p), zero_logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        if len(shape) != 3:
            raise ValueError(f"Patchify takes (C, H, W) images, got shape {tuple(shape)}")
        c, h, w = (int(s) for s in shape)
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"patch size {p} does not divide the image size {h}x{w}: choose a patch size "
                f"that divides both (a divisor of {_gcd(h, w)})"
            )
        if self.spatial is not None and (h, w) != self.spatial:
            raise ValueError(
                f"Patchify was built for {self.spatial[0]}x{self.spatial[1]} images, got {h}x{w}"
            )
        return ((h // p) * (w // p), p * p * c)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
