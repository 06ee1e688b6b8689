"""crowdkernels: fast, tested kernels, losses and models for density-map crowd counting.

    >>> import torch, crowdkernels as ck
    >>> counter = ck.load("runs/b/best.pt")      # a trained checkpoint: counter.count("crowd.jpg") -> float
    >>> pts = torch.tensor([[10.5, 20.2], [30.0, 12.7]])
    >>> d = ck.density_map(pts, (64, 64))        # geometry-adaptive Gaussian density map, sums to 2
    >>> ck.density_to_points(d)                  # [2, 3] (x, y, score): the heads back, as many as the count
"""
from ._ext import backends, cpu_cache_info, empty_cache, set_cpu_cache_limit

# ---- density maps (issue 2)
from .ops.density import density_map, density_maps, knn_sigma


# ---- region rescaling, L2SM (issue 3)
from .ops.regions import (
    grid_boxes,
    region_means,
    region_points,
    scale_regions,
    transform_region_targets,
    unscale_regions,
)


# ---- hierarchical gating, HMoDE eq. 1 (issue 4)
from .ops.gating import GatingOutput, hierarchical_gating


# ---- local counts and losses, HMoDE eq. 2 (issue 5)
from .ops.local_count import local_counts
from . import losses


# ---- models (issue 6)
from . import models
from .models import CSRNet, HMoDE, L2SM, SPN, VGG16


# ---- one-line inference (issue 15)
from .inference import Counter, Prediction, load


# ---- head locations from density maps (issue 21)
from .data.points import density_to_points, match_points


from ._constants import VERSION as __version__

__all__ = [
    "CSRNet", "Counter", "GatingOutput", "HMoDE", "L2SM", "Prediction", "SPN", "VGG16", "__version__",
    "backends", "cpu_cache_info", "density_map", "density_maps", "density_to_points", "empty_cache", "grid_boxes",
    "hierarchical_gating", "knn_sigma", "load", "local_counts", "losses", "match_points", "models", "region_means",
    "region_points", "scale_regions", "set_cpu_cache_limit", "transform_region_targets", "unscale_regions",
]
