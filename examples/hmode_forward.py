"""HMoDE in a few lines: forward, the eq. 7 loss, one optimizer step, and the count.

    PYTHONPATH=. python examples/hmode_forward.py            # a small-width model, runs in seconds on a CPU

With ImageNet weights for the encoder (never downloaded; see crowdkernels.models.backbones):
    model = ck.HMoDE(pretrained="vgg16_bn-6c64b313.pth")
With the authors' released checkpoint (their forward pass, their loss weights):
    model = ck.HMoDE.from_official("best_model.pth")          # counts: out.final.sum() / model.density_scale
"""
import torch

import crowdkernels as ck

torch.manual_seed(0)
model = ck.HMoDE(width=0.25)                       # width=1.0 is the paper's model (82.6M parameters)
criterion = model.criterion()                      # eq. 7: density + REL on all 7 maps, attention, importance
optimizer = torch.optim.Adam(model.parameters(), lr=2e-5)

images = torch.randn(2, 3, 200, 264)               # ImageNet-normalized RGB; any size works
points = [torch.rand(40, 2) * torch.tensor([263.0, 199.0]), torch.rand(12, 2) * torch.tensor([263.0, 199.0])]
targets = {"density": ck.density_maps(points, (200, 264)), "points": points}

out = model(images)
print("final", tuple(out.final.shape), "(stride", model.stride, ")  experts", [tuple(e.shape) for e in out.experts])
print("group maps", tuple(out.group_maps.shape), " importance", tuple(out.importance.shape),
      " attention", tuple(out.attention.shape))
terms = criterion(out, targets)
print({k: round(float(v.detach()), 4) for k, v in terms.items()})
optimizer.zero_grad()
terms["total"].backward()
optimizer.step()
print("predicted counts", out.final.detach().sum(dim=(1, 2, 3)).tolist(), "true", [len(p) for p in points])
