"""Small reusable layers."""
from __future__ import annotations

import torch
from torch import nn


class GeM(nn.Module):
    """Generalized-mean pooling with a learnable exponent p (Radenovic et al. 2018).

    p = 1 is average pooling and p -> inf approaches max pooling. The mean is signed,
    sign(mean(sign(x) |x|^p)) |mean(...)|^(1/p), so it also pools ViT patch tokens, whose features
    are negative as often as positive after LayerNorm; on non-negative CNN feature maps it is the
    usual GeM.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Pool `x` over `dims`: (2, 3) for B,C,H,W maps, (1, 2) for B,H,W,C maps, (1,) for B,N,C tokens."""
        x = x.float()  # |x|^p overflows float16 already for |x| > 40 at p = 3
        p = self.p.clamp(min=1.0)  # below 1 the mean would favour the weakest activations
        # the eps floors keep log(|x|), which d/dp needs, and the 1/p-th root's gradient finite at zero
        powered = x.sign() * x.abs().clamp(min=self.eps).pow(p)
        mean = powered.mean(dim=dims)
        return mean.sign() * mean.abs().clamp(min=self.eps).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"
