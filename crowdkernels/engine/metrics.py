"""Counting metrics: MAE, "MSE", NAE, GAME(0-3), with per-density-level breakdowns.

With c_i the true and c^_i the estimated count of test image i (L2SM eq. 4):

- MAE = 1/M sum |c_i - c^_i|;
- "MSE" = sqrt(1/M sum (c_i - c^_i)^2). **This is a root mean squared error.** The crowd-counting papers
  (MCNN, CSRNet, L2SM eq. 4, HMoDE sec. IV-C and every table they compare with) call it MSE, so the
  results here use their name to be comparable with the published numbers;
- NAE = 1/M' sum |c_i - c^_i| / c_i over the M' images with c_i > 0 (NWPU-Crowd's normalized error);
- GAME(L) (Guerrero-Gomez-Olmedo et al., 2015; HMoDE sec. IV-C) = 1/M sum_i sum_{r=1}^{4^L} |c_i^r - c^_i^r|:
  the image split into a 2^L x 2^L grid and the absolute count errors of the cells summed. GAME(0) = MAE.

The grid is laid on the predicted map: cell rows are [round(r h / 2^L), round((r+1) h / 2^L)) of its h
rows (columns alike). The true cell counts come from a map of the same shape, or from the head points,
each point (x, y) of an (H, W) image falling in map pixel (floor(y h / H), floor(x w / W)), so the cells
cover the same part of the image in both.

:class:`CountMetrics` accumulates sums that add across batches and processes (``reduce`` takes an
all-reduce), so a distributed evaluation gives the metrics of the whole set.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["grid_counts", "grid_counts_from_points", "game", "CountMetrics", "MSE_NOTE", "metrics_text"]

MSE_NOTE = (
    "'mse' is the root of the mean squared count error (RMSE), named MSE as in the crowd-counting "
    "papers (L2SM eq. 4) so that it compares with their tables"
)


def _bounds(n: int, cells: int) -> torch.Tensor:
    return torch.tensor([int(round(i * n / cells)) for i in range(cells + 1)])


def grid_counts(density: torch.Tensor, level: int) -> torch.Tensor:
    """Cell sums of a [h, w] (or [..., h, w]) map on the 2^L x 2^L grid: [..., 2^L, 2^L], float64."""
    cells = 2**level
    h, w = density.shape[-2:]
    rows, cols = _bounds(h, cells), _bounds(w, cells)
    # index of each pixel's cell, then one scatter: no Python loop over cells
    ri = torch.bucketize(torch.arange(h), rows[1:], right=True).clamp_max(cells - 1)
    ci = torch.bucketize(torch.arange(w), cols[1:], right=True).clamp_max(cells - 1)
    cell = (ri[:, None] * cells + ci[None, :]).reshape(-1).to(density.device)
    flat = density.reshape(*density.shape[:-2], h * w).to(torch.float64)
    out = flat.new_zeros(*density.shape[:-2], cells * cells)
    out.index_add_(-1, cell, flat)
    return out.reshape(*density.shape[:-2], cells, cells)


def grid_counts_from_points(points: torch.Tensor, image_size, map_size, level: int) -> torch.Tensor:
    """Head counts of the 2^L x 2^L cells laid on an (h, w) = ``map_size`` map of an (H, W) =
    ``image_size`` image: [2^L, 2^L] float64. Points outside the image count nowhere."""
    cells = 2**level
    H, W = image_size
    h, w = map_size
    out = torch.zeros(cells * cells, dtype=torch.float64)
    pts = points.detach().to("cpu", torch.float64).reshape(-1, 2)
    keep = (pts[:, 0] >= 0) & (pts[:, 0] < W) & (pts[:, 1] >= 0) & (pts[:, 1] < H)
    pts = pts[keep]
    if pts.shape[0] == 0:
        return out.reshape(cells, cells)
    my = torch.floor(pts[:, 1] * h / H).long().clamp_(0, h - 1)
    mx = torch.floor(pts[:, 0] * w / W).long().clamp_(0, w - 1)
    rows, cols = _bounds(h, cells), _bounds(w, cells)
    ri = torch.bucketize(my, rows[1:], right=True).clamp_max(cells - 1)
    ci = torch.bucketize(mx, cols[1:], right=True).clamp_max(cells - 1)
    out.index_add_(0, ri * cells + ci, torch.ones_like(pts[:, 0]))
    return out.reshape(cells, cells)


def game(pred: torch.Tensor, target, level: int, *, image_size=None) -> float:
    """GAME(L) of one image: sum over the 4^L cells of |predicted - true| counts.

    Args:
        pred: [h, w] predicted density (any leading singleton dims are squeezed).
        target: a [h, w] true density map, or [N, 2] (x, y) head points of the image (then
            ``image_size`` = (H, W) is required).
        level: L >= 0.
    """
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be an int >= 0, got {level!r}")
    pred = pred.detach()
    while pred.dim() > 2:
        pred = pred[0]
    p = grid_counts(pred.cpu(), level)
    if image_size is None:
        t = target.detach()
        while t.dim() > 2:
            t = t[0]
        if tuple(t.shape) != tuple(pred.shape):
            raise ValueError(
                f"target map must have the prediction's shape {tuple(pred.shape)}, got {tuple(t.shape)} "
                "(pass head points with image_size for maps of another resolution)"
            )
        g = grid_counts(t.cpu(), level)
    else:
        g = grid_counts_from_points(target, image_size, pred.shape, level)
    return float((p - g).abs().sum())


class CountMetrics:
    """Accumulates per-image counts (and GAME errors) into the metrics of a set.

    Per image: ``update(pred_count, true_count, games=[GAME(0), ..., GAME(L)], name=...)``. ``compute()``
    returns ``{"images", "mae", "mse", "nae", "game0".."gameL", "levels": {level: {...}}}`` (levels only
    when ``levels`` is given, e.g. :data:`crowdkernels.data.DENSITY_LEVELS`, images binned by their true
    count). "mse" is an RMSE: see :data:`MSE_NOTE`.
    """

    # per group: images, sum |e|, sum e^2, sum |e|/c (c > 0), images with c > 0, images with GAME,
    # GAME(0..L) sums
    def __init__(self, game_levels: int = 3, levels: dict | None = None):
        self.game_levels = int(game_levels)
        self.levels = dict(levels) if levels else {}
        self._groups = ["all", *self.levels]
        self._width = 6 + self.game_levels + 1
        self.sums = torch.zeros(len(self._groups), self._width, dtype=torch.float64)
        self.per_image: list[dict] = []

    def _group_of(self, count: float) -> int | None:
        c = int(round(count))
        for g, (lo, hi) in enumerate(self.levels.values(), 1):
            if c >= lo and (hi is None or c <= hi):
                return g
        return None

    def update(self, pred_count: float, true_count: float, games=None, name: str | None = None) -> None:
        pred_count, true_count = float(pred_count), float(true_count)
        e = pred_count - true_count
        row = torch.zeros(self._width, dtype=torch.float64)
        row[0], row[1], row[2] = 1.0, abs(e), e * e
        if true_count > 0:
            row[3], row[4] = abs(e) / true_count, 1.0
        if games is not None:
            if len(games) != self.game_levels + 1:
                raise ValueError(f"games must hold GAME(0..{self.game_levels}), got {len(games)} values")
            row[5] = 1.0
            row[6:] = torch.tensor([float(g) for g in games], dtype=torch.float64)
        self.sums[0] += row
        g = self._group_of(true_count)
        if g is not None:
            self.sums[g] += row
        self.per_image.append({"name": name, "pred": pred_count, "true": true_count})

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sums the accumulators over processes: ``all_reduce(tensor)`` returns the sum (see
        :func:`crowdkernels.engine.distributed.all_reduce_sum`). Per-image rows stay local."""
        self.sums = all_reduce(self.sums)

    @staticmethod
    def _row_metrics(row: torch.Tensor, game_levels: int) -> dict:
        n = float(row[0])
        if n == 0:
            return {"images": 0}
        out = {
            "images": int(n),
            "mae": float(row[1]) / n,
            "mse": math.sqrt(float(row[2]) / n),
            "nae": float(row[3]) / float(row[4]) if float(row[4]) > 0 else None,
        }
        if float(row[5]) == n:  # GAME only when every image had it
            for lv in range(game_levels + 1):
                out[f"game{lv}"] = float(row[6 + lv]) / n
        return out

    def compute(self) -> dict:
        out = self._row_metrics(self.sums[0], self.game_levels)
        if self.levels:
            out["levels"] = {name: self._row_metrics(self.sums[g], self.game_levels) for g, name in enumerate(self.levels, 1)}
        return out


def metrics_text(metrics: dict, title: str) -> str:
    """The metrics of :meth:`crowdkernels.Counter.evaluate` as text: ``title``, the images and every metric on
    one line, then one line a density level that has images, then the note on 'MSE' and the files skipped."""
    lines = [f"{title}: {metrics['images']} images  MAE {metrics['mae']:.3f}  MSE {metrics['mse']:.3f}  "
             f"NAE {metrics['nae'] if metrics['nae'] is None else round(metrics['nae'], 4)}  "
             + "  ".join(f"GAME{lv} {metrics[f'game{lv}']:.3f}" for lv in range(4))]
    lines += [f"  {name:<6} {m['images']:5d} images  MAE {m['mae']:.3f}  MSE {m['mse']:.3f}"
              for name, m in metrics.get("levels", {}).items() if m["images"]]
    lines.append(f"  ('MSE' is the root mean squared error, the papers' name); {metrics['skipped']} file(s) skipped")
    return "\n".join(lines)
