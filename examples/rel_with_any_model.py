"""Add the relative local counting loss (REL, HMoDE eq. 2) to any density-map model in a few lines.

A tiny CSRNet-like model (a VGG-style front end and a dilated back end) is trained for a few steps on
synthetic crowds with the usual pixel-wise MSE plus REL:

    python examples/rel_with_any_model.py --steps 20
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from crowdkernels.losses import RelativeLocalCountLoss, density_loss


class TinyCSRNet(nn.Module):
    """CSRNet's shape in miniature: 3x3 convs and a max-pool, then dilated 3x3 convs, a 1x1 density head."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.frontend = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.backend = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        density = self.head(self.backend(self.frontend(x)))
        return F.interpolate(density, size=x.shape[2:], mode="bilinear", align_corners=False) / 4


def synthetic_batch(batch: int, size: int, generator: torch.Generator):
    """Images with bright blobs where the heads are, and their density maps (each head sums to 1)."""
    impulses = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        n = int(torch.randint(5, 40, (1,), generator=generator))
        ys = torch.randint(0, size, (n,), generator=generator)
        xs = torch.randint(0, size, (n,), generator=generator)
        impulses[b, 0].index_put_((ys, xs), torch.ones(n), accumulate=True)
    r = torch.arange(-6, 7, dtype=torch.float32)
    g = torch.exp(-(r ** 2) / (2 * 2.0 ** 2))
    kernel = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    density = F.conv2d(impulses, kernel[None, None], padding=6)
    images = density.repeat(1, 3, 1, 1) * 20 + 0.1 * torch.rand(batch, 3, size, size, generator=generator)
    return images, density


def main(steps: int = 20, batch: int = 4, size: int = 64, seed: int = 0) -> list:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TinyCSRNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rel = RelativeLocalCountLoss(region=0.125, num_hard=9, num_sublists=3)  # <- REL, HMoDE eq. 2
    history = []
    for step in range(steps):
        images, gt = synthetic_batch(batch, size, generator)
        pred = model(images)
        loss = density_loss(pred, gt, reduction="sum") / batch + rel(pred, gt)  # <- L_E = L_Des + L_Rel (eq. 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        print(f"step {step:3d}  loss {history[-1]:.4f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    main(args.steps, args.batch, args.size)
