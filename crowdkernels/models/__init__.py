"""Density-map crowd-counting models built on crowdkernels' ops: VGG16 backbones, SPN and L2SM (Xu et al., ICCV
2019), HMoDE (Du et al., TIP 2023; the paper's and the released code's variants) and CSRNet.

Every model's forward(images) returns a dataclass with `.final` [B, 1, h, w]; `model.criterion(**options)`
returns an nn.Module called as ``criterion(output, {"density": [B,1,H,W], "points": [...]})`` that returns a
dict of named loss terms with "total".
"""
from .backbones import VGG16
from .csrnet import CSRNet, DensityOutput

__all__ = ["VGG16", "CSRNet", "DensityOutput"]
