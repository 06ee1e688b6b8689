"""Density-map crowd-counting models built on crowdkernels' ops: VGG16 backbones, SPN and L2SM (Xu et al., ICCV
2019), HMoDE (Du et al., TIP 2023; the paper's and the released code's variants) and CSRNet.

Every model is a `DensityModel`: it declares its conventions (input normalization, output stride, padding,
density scale: `Conventions`) and registers its names (`build_model(name)`); its forward(images) returns a
dataclass with `.final` [B, 1, h, w]; `model.criterion(**options)` returns an nn.Module called as
``criterion(output, {"density": [B,1,H,W], "points": [...]})`` that returns a dict of named loss terms with
"total".

Parameter counts (width 1; the papers give none, CSRNet's reports 16.26M):
VGG16 features 14,714,688 / VGG16-BN 14,723,136 (torchvision's), CSRNet 16,263,489, SPN 17,849,921,
L2SM 19,417,475, HMoDE (K=3, N=2, either variant) 82,621,261 (the released HMoDE.py builds the same).
"""
from .backbones import VGG16
from .conventions import Conventions, DensityModel, conventions_of
from .csrnet import CSRNet, DensityOutput
from .hmode import HMoDE, HMoDEOutput, official_key_map
from .l2sm import L2SM, L2SMOutput
from .registry import build_model, model_names, register_model
from .spn import SPN, SPNOutput

#: the names of the models registered above (``build_model(name, **model_kwargs)``), by rank
MODEL_NAMES = model_names()

__all__ = ["VGG16", "CSRNet", "DensityOutput", "HMoDE", "HMoDEOutput", "official_key_map", "SPN", "SPNOutput",
           "L2SM", "L2SMOutput", "Conventions", "DensityModel", "conventions_of", "MODEL_NAMES", "build_model",
           "model_names", "register_model"]
