"""Evaluation: full-image inference (tiled for huge images) and the counting metrics of a data set.

Full-image inference pads the image with zeros to a multiple of ``align`` (the models downsample by
8 or 16), runs the model, and crops the predicted map back to ceil(H/s) x ceil(W/s) (s = the model's
output stride). Images larger than ``tile`` are cut into tiles whose *cores* partition the padded
image, each run with ``overlap`` pixels of context on every side; only the core of each tile's output
is kept. Every output pixel thus comes from exactly one tile (the count is neither doubled in the
overlaps nor lost in gaps), memory is bounded by one tile, and with an overlap at least the model's
receptive field the result equals the untiled prediction. UCF-QNRF's 9000 x 6000 images need this on
most GPUs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .metrics import CountMetrics, game

__all__ = ["final_of", "predict_density", "evaluate", "evaluation_dataset", "EvaluationWriter", "autocast"]


def final_of(output) -> torch.Tensor:
    """The final [B, 1, h, w] density of a model's output (a named output with ``.final``, or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    final = getattr(output, "final", None)
    if final is None and isinstance(output, dict):
        final = output.get("final")
    if not isinstance(final, torch.Tensor):
        raise TypeError(f"the model's output has no .final density tensor (got {type(output).__name__})")
    return final


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on GPUs that have it (float16 otherwise); nothing on the CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _run(model, x: torch.Tensor, amp: bool) -> torch.Tensor:
    with autocast(x.device, amp):
        out = final_of(model(x))
    # models whose maps are scaled (HMoDE's official variant: people per pixel x 100) say so
    return out.float() / float(getattr(model, "density_scale", 1.0))


def _stride(in_size: int, out_size: int) -> int:
    if out_size < 1 or in_size % out_size:
        raise ValueError(f"the model maps {in_size} input pixels to {out_size} output pixels: not an integer stride")
    return in_size // out_size


@torch.no_grad()
def predict_density(model, image: torch.Tensor, *, tile: int | None = None, overlap: int = 64, align: int | None = None,
                    amp: bool = False) -> torch.Tensor:
    """The model's density for one whole image.

    Args:
        model: ``model(images)`` returning ``.final`` [B, 1, h, w] (or a tensor); in eval mode.
        image: [3, H, W], or a batch [B, 3, H, W] of images of one size, on the model's device.
        tile: the largest tile side in pixels (None: never tile). Tiles are used when H or W exceeds it.
        overlap: context around each tile core, pixels; a multiple of ``align``.
        align: the image is zero-padded to a multiple of it (>= the model's total downsampling); default:
            the model's ``input_multiple`` (1 for HMoDE's official variant, run unpadded as the released
            test.py runs it), else 16.
    Returns:
        [B, 1, ceil(H/s), ceil(W/s)] float32 (B = 1 for one image), s the model's output stride, in people
        per output cell (divided by the model's ``density_scale`` where it has one): its sum is the count.
    """
    if align is None:
        align = int(getattr(model, "input_multiple", 16))
    x = image if image.dim() == 4 else image[None]
    H, W = x.shape[-2:]
    Hp, Wp = -(-H // align) * align, -(-W // align) * align
    x = F.pad(x, (0, Wp - W, 0, Hp - H))
    if tile is None or (Hp <= tile and Wp <= tile):
        out = _run(model, x, amp)
        s = _stride(Hp, out.shape[-2])
        return out[..., : -(-H // s), : -(-W // s)]
    if overlap % align or overlap < 0:
        raise ValueError(f"overlap must be a non-negative multiple of align={align}, got {overlap}")
    core = (tile - 2 * overlap) // align * align
    if core < align:
        raise ValueError(f"tile={tile} leaves no core after an overlap of {overlap} on each side (align {align})")
    canvas = None
    for y0 in range(0, Hp, core):
        y1, ty0 = min(y0 + core, Hp), max(0, y0 - overlap)
        ty1 = min(Hp, y1 + overlap)
        for x0 in range(0, Wp, core):
            x1, tx0 = min(x0 + core, Wp), max(0, x0 - overlap)
            tx1 = min(Wp, x1 + overlap)
            out = _run(model, x[..., ty0:ty1, tx0:tx1], amp)
            s = _stride(ty1 - ty0, out.shape[-2])
            if canvas is None:
                if align % s:
                    raise ValueError(f"align={align} must be a multiple of the model's output stride {s}")
                canvas = out.new_zeros(x.shape[0], out.shape[1], Hp // s, Wp // s)
            canvas[..., y0 // s : y1 // s, x0 // s : x1 // s] = out[
                ..., (y0 - ty0) // s : (y1 - ty0) // s, (x0 - tx0) // s : (x1 - tx0) // s
            ]
    return canvas[..., : -(-H // s), : -(-W // s)]


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
                    from ..data.datasets import ImageError

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


def evaluation_dataset(config, split: str | None = "val", *, warn=None, must_exist: bool = False):
    """The images of one split of ``config.dataset``, as evaluation sees them: its own split (``"train"``
    gives the training images, not the validation ones), with the evaluation transforms (``config.max_size``
    only: no crops, no flips) and *not* normalized (RGB in [0, 1]: :class:`crowdkernels.Counter` applies the
    model's normalization). Synthetic crowds: ``config.synthetic`` sizes, the training seed for "train",
    seed + 1000 for "val"/"test", as :func:`crowdkernels.engine.train.build_datasets` draws them.

    ``"val"`` is the dataset's val split, its test split where there is none, and every 10th training image
    where there is neither; ``split=None``: the images the training of ``config`` validated on, as
    :func:`crowdkernels.engine.train.build_datasets` picks them: those ``config.val_from_train`` held out
    (seeded), else as "val". ``must_exist=True`` (a split the user named: ``eval --split val|test``): a "val"
    or "test" split the dataset does not have raises a LayoutError naming the split folders found, instead of
    taking training images.

    Returns ``(dataset, note)``, the note saying which images were used. ``warn`` reports left-out files.
    """
    from dataclasses import replace

    from ..data.datasets import CrowdDataset, SyntheticCrowds, dataset_samples
    from .train import TrainError, build_transforms, split_off

    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be None, 'train', 'val' or 'test', got {split!r}")
    transform = build_transforms(replace(config, input_norm=None), False)
    if config.dataset == "synthetic":
        syn = config.synthetic
        train = split == "train"
        n, seed = (int(syn["train"]), config.seed) if train else (int(syn["val"]), config.seed + 1000)
        return SyntheticCrowds(n, int(syn["size"]), seed, transform=transform), (
            f"{n} synthetic {'training' if train else 'held-out'} images (seed {seed})")
    if config.root is None:
        raise TrainError(f"--root is required for --dataset {config.dataset}")
    if split is None and config.val_from_train is not None:
        everything, _ = dataset_samples(config.dataset, config.root, "train", fold=config.fold, whole=True, warn=warn)
        _, samples = split_off(everything, config.val_from_train, config.seed)
        note = (f"the {config.val_from_train:g} of the training images the training held out with seed {config.seed} "
                "(--val-from-train)")
    else:
        samples, note = dataset_samples(config.dataset, config.root, split or "val", fold=config.fold, warn=warn,
                                        fallback=not must_exist)
    return CrowdDataset(samples, transform, strict=config.strict, warn=warn), note


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
        from ..inference import spread_cells
        from ..ops.density import density_map
        from ..viz import save_picture

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

        from .._io import atomic_write, save_json
        from ..viz import save_scatter

        def rows(f):
            writer = csv.DictWriter(f, fieldnames=["image", "true_count", "predicted_count", "error"])
            writer.writeheader()
            writer.writerows(self.rows)

        atomic_write(self.save_dir / "predictions.csv", rows, mode="w")
        save_scatter(self.save_dir / "scatter.png", [r["true_count"] for r in self.rows],
                     [r["predicted_count"] for r in self.rows], mae=metrics.get("mae"), mse=metrics.get("mse"), title=title)
        save_json(self.save_dir / "metrics.json", metrics if result is None else result)
