"""Plain-PyTorch / NumPy oracles for every op, written from the papers' equations, readable first.

They are the ground truth the compiled kernels are tested against, and the fallback where no compiled
kernel exists. Speed does not matter here; clarity does.
"""
from __future__ import annotations

import math

import numpy as np
import torch


# ===================================================================================== density (issue 2)
# (filled in below by the density section)


# ===================================================================================== regions (issue 3)


# ===================================================================================== gating (issue 4)


# ===================================================================================== local counts (issue 5)
