"""Evaluation: the counts and counting metrics of a data set (:func:`evaluate`, whole images through
:func:`crowdkernels.engine.predict.predict_density`), and its per-image outputs (:class:`EvaluationWriter`).
"""
from __future__ import annotations

import torch

from .metrics import CountMetrics, game
from .predict import predict_density, spread_cells
from ..data.readers import ImageError
from ..ops.density import density_map
from ..viz import save_picture, save_scatter
from .._io import atomic_write, save_json

__all__ = ["evaluate", "EvaluationWriter"]


@torch.no_grad()
def evaluate(
    model,
    loader,
    device,
    *,
    tile: int | None = 2048,
    overlap: int = 64,
    align: int | None = None,
    amp: bool = False,
    levels: dict | None = None,
    game_levels: int = 3,
    all_reduce=None,
    strict: bool = False,
    warn=None,
    predict=None,
    on_image=None,
    progress=None,
) -> tuple[dict, CountMetrics]:
    """Counts and metrics of every image of ``loader`` (batches from :class:`crowdkernels.data.CrowdCollate`;
    padded images are cut back to their own size before inference).

    ``predict(image [3, h, w]) -> [1, 1, h', w']`` replaces the default, :func:`predict_density` of ``model``
    on ``device`` (:class:`crowdkernels.Counter` passes its own, which normalizes the image first).
    ``on_image(name, image [3, h, w], pred [1, 1, h', w'], points [N, 2])`` is called after each image
    (per-image files, pictures); ``progress`` (a :class:`crowdkernels._progress.Progress`) is advanced per image.

    Returns ``(metrics, accumulator)``: metrics as :meth:`CountMetrics.compute` (mae, mse (an RMSE),
    nae, game0..L, per-level results) plus ``skipped`` (images that failed to load). With
    ``all_reduce`` (distributed), the sums are added over processes first, so every process gets the
    metrics of the whole set.
    """
    if predict is None:
        def predict(image):
            return predict_density(model, image.to(device), tile=tile, overlap=overlap, align=align, amp=amp)

    was_training = model.training
    model.eval()
    acc = CountMetrics(game_levels=game_levels, levels=levels)
    skipped = []
    try:
        for batch in loader:
            for name, reason in batch["skipped"]:
                if strict:
                    path, sep, why = reason.partition(": ")
                    raise ImageError(path, why) if sep else ImageError(name, reason)
                skipped.append(name)
                if warn:
                    warn(f"skipping {reason}")
                if progress is not None:
                    progress.update(1, skipped=1)
            if batch["images"] is None:
                continue
            images = batch["images"]
            for i, (h, w) in enumerate(batch["sizes"]):
                image = images[i, :, :h, :w]
                pred = predict(image)
                pts = batch["points"][i]
                games = [game(pred, pts, lv, image_size=(h, w)) for lv in range(game_levels + 1)]
                acc.update(float(pred.sum(dtype=torch.float64)), float(pts.shape[0]), games, name=batch["names"][i])
                if on_image is not None:
                    on_image(batch["names"][i], image, pred, pts)
                if progress is not None:
                    progress.update(1)
    finally:
        model.train(was_training)
    n_skipped = torch.tensor([float(len(skipped))], dtype=torch.float64)
    if all_reduce is not None:
        acc.reduce(all_reduce)
        n_skipped = all_reduce(n_skipped)
    metrics = acc.compute()
    metrics["skipped"] = int(n_skipped.item())
    return metrics, acc


class EvaluationWriter:
    """The per-image outputs of an evaluation in ``save_dir``: pass it as ``on_image`` to :func:`evaluate` or
    :meth:`crowdkernels.Counter.evaluate`, then call :meth:`finish`.

    - ``predictions.csv``: one row per image: image (its path, or its name), true_count, predicted_count,
      error (predicted - true);
    - ``pictures/<name>.png``: the image beside its predicted and true maps
      (:func:`crowdkernels.viz.save_picture`; the true map is ``density_map(points)``, style exact), for the
      first ``pictures`` images (None: all);
    - ``scatter.png``: predicted against true counts, MAE and MSE in the title;
    - ``metrics.json``: the ``result`` given to :meth:`finish`.

    ``paths`` maps image names to their files (for the CSV). Images come as RGB in [0, 1] (unnormalized, as
    the Counter sees them), or normalized with ``norm`` given (then de-normalized for the pictures)."""

    def __init__(self, save_dir, *, pictures: int | None = None, paths: dict | None = None, norm=None):
        from pathlib import Path

        self.save_dir = Path(save_dir)
        self.pictures, self.paths, self.norm = pictures, dict(paths or {}), norm
        self.rows: list[dict] = []
        self.drawn = 0
        (self.save_dir / "pictures").mkdir(parents=True, exist_ok=True)

    def __call__(self, name, image, cells, points) -> None:
        count = float(cells.sum(dtype=torch.float64))
        true = float(points.shape[0])
        self.rows.append({"image": self.paths.get(name, name), "true_count": true, "predicted_count": count,
                          "error": count - true})
        if self.pictures is not None and self.drawn >= self.pictures:
            return
        size = tuple(image.shape[-2:])
        truth = density_map(points.detach().cpu().to(torch.float64).reshape(-1, 2), size).float()
        save_picture(self.save_dir / "pictures" / f"{name}.png", image, spread_cells(cells, size), truth=truth,
                     name=name, count=count, true_count=true, norm=self.norm)
        self.drawn += 1

    def finish(self, metrics: dict, result: dict | None = None, *, title: str = "") -> None:
        """Writes predictions.csv, scatter.png (``title`` above ``metrics``' mae and mse) and metrics.json
        (``result``, default ``metrics``)."""
        import csv


        def rows(f):
            writer = csv.DictWriter(f, fieldnames=["image", "true_count", "predicted_count", "error"])
            writer.writeheader()
            writer.writerows(self.rows)

        atomic_write(self.save_dir / "predictions.csv", rows, mode="w")
        save_scatter(self.save_dir / "scatter.png", [r["true_count"] for r in self.rows],
                     [r["predicted_count"] for r in self.rows], mae=metrics.get("mae"), mse=metrics.get("mse"), title=title)
        save_json(self.save_dir / "metrics.json", metrics if result is None else result)
