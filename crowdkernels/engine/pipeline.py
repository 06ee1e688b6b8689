"""A run's data: the sample transforms, the training and validation sets of its ``config``
(:class:`crowdkernels.engine.config.TrainConfig`), the images evaluation reads, and the mean-count baseline.

Every image goes through the same pipeline in training, validation and evaluation: resized (``max_size``),
cropped and flipped (training only) as RGB in [0, 1], then normalized with the run's ``input_norm`` last
(training; evaluation leaves that to :class:`crowdkernels.Counter`).
"""
from __future__ import annotations

from dataclasses import replace

from .config import TrainConfig, TrainError, require_root
from ..data.targets import DensityTarget
from ..data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, Resize
from ..data.layouts import natural_key
from ..data.datasets import CrowdDataset, SyntheticCrowds
from ..data.specs import dataset_samples
from ..data.patches import NinePatches, Repeated

__all__ = ["target_from_config", "build_transforms", "build_datasets", "evaluation_dataset", "split_off",
           "held_out_seed", "mean_count_baseline"]


def held_out_seed(seed: int) -> int:
    """The seed of the synthetic held-out images of a run seeded ``seed`` (its training images use ``seed``):
    another draw of crowds, the same in training, evaluation and the demo."""
    return seed + 1000


def target_from_config(config: TrainConfig):
    """The run's :class:`crowdkernels.data.DensityTarget` (``config.target`` without its scale)."""
    t = {k: v for k, v in (config.target or {}).items() if k != "scale"}
    return DensityTarget(**t)


def build_transforms(config: TrainConfig, train: bool, sha: bool = False):
    """The sample pipeline of a run: resizing, cropping and flipping (training) on RGB in [0, 1], then the
    model's input normalization (``config.input_norm``), always last."""
    steps = []
    max_size = _max_size(config)
    if train:
        if config.crop:
            steps += [Resize(max_size=max_size, min_size=config.crop), RandomCrop(config.crop)]
        elif max_size is not None:
            steps.append(Resize(max_size=max_size, multiple=config.multiple))
        if config.flip:
            steps.append(RandomHorizontalFlip())
    elif max_size is not None:
        steps.append(Resize(max_size=max_size))
    if config.input_norm is not None:
        steps.append(Normalize(config.input_norm))
    return Compose(steps) if steps else None


def split_off(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): ``round(fraction * n)`` samples (at least 1, leaving at least 1) drawn with ``seed``
    from the samples in natural name order, so the split does not depend on the file system's order."""
    import numpy as np


    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1):
        raise ValueError(f"--val-from-train must be a fraction in (0, 1), got {fraction!r}")
    ordered = sorted(samples, key=lambda s: natural_key(s.name))
    n = len(ordered)
    if n < 2:
        raise TrainError(f"--val-from-train needs at least 2 training images, got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [s for i, s in enumerate(ordered) if i not in held], [s for i, s in enumerate(ordered) if i in held]


def _warn_upsampling_crop(samples, crop: int, warn) -> None:
    """A crop larger than an image makes Resize(min_size=crop) upsample it first: slower (an epoch of
    small images at a large crop took 250x longer) and heads drawn larger than they are."""
    small = []
    for s in samples:
        try:
            h, w = s.size()
        except Exception:  # unreadable files are reported by the dataset itself
            continue
        if min(h, w) < crop:
            small.append(crop / min(h, w))
    if small and warn:
        warn(f"warning: {len(small)} training image(s) are smaller than --crop {crop} and are upsampled first "
             f"(up to {max(small):.1f}x): training is slower and heads look larger; pass a smaller --crop")


def build_datasets(config: TrainConfig, *, split: str = "train", warn=None, levels=None):
    """(train_set, val_set) of ``config.dataset`` with the training transforms (split "train"), or
    (None, eval_set) for ``split`` "val"/"test". Synthetic crowds: ``config.synthetic`` gives the sizes;
    the held-out set uses another seed (:func:`held_out_seed`). ``config.val_from_train`` holds a seeded
    fraction of the training images out as the validation set (instead of the dataset's val/test split);
    ``config.patches`` = "csrnet9" trains on CSRNet's nine patches per image
    (:class:`crowdkernels.data.patches.NinePatches`). ``config.repeat`` > 1 reads each training sample that
    many times an epoch (a new random crop and flip each time). The training set's ``unaugmented()`` gives its
    images once each, without the random transforms."""
    if config.dataset == "synthetic":
        syn = config.synthetic
        val = SyntheticCrowds(int(syn["val"]), int(syn["size"]), held_out_seed(config.seed),
                              transform=build_transforms(config, False))
        if split != "train":
            return None, val
        if config.crop and config.crop > int(syn["size"]) and warn:
            warn(f"warning: the synthetic images ({syn['size']} px) are smaller than --crop {config.crop} and are upsampled first")
        train = SyntheticCrowds(int(syn["train"]), int(syn["size"]), config.seed, transform=build_transforms(config, True))
        train.unaugmented = lambda: SyntheticCrowds(int(syn["train"]), int(syn["size"]), config.seed,
                                                    transform=build_transforms(config, False))
        return _repeated(train, config), val
    require_root(config.dataset, config.root)
    if split != "train":
        val_samples, note = dataset_samples(config.dataset, config.root, split, fold=config.fold)
        return None, CrowdDataset(val_samples, build_transforms(config, False), strict=config.strict, warn=warn, levels=levels)
    if config.val_from_train is not None:
        everything, train_note = dataset_samples(config.dataset, config.root, "train", fold=config.fold, whole=True)
        train_samples, val_samples = split_off(everything, config.val_from_train, config.seed)
        note = f"{config.val_from_train:g} of the training images held out with seed {config.seed} (--val-from-train)"
    else:
        val_samples, note = dataset_samples(config.dataset, config.root, "val", fold=config.fold)
        train_samples, train_note = dataset_samples(config.dataset, config.root, "train", fold=config.fold)
    val = CrowdDataset(val_samples, build_transforms(config, False), strict=config.strict, warn=warn, levels=levels)
    if warn:
        warn(f"train: {len(train_samples)} images ({train_note}); val: {len(val_samples)} images ({note})")
    if config.crop:
        _warn_upsampling_crop(train_samples, config.crop, warn)
    plain = build_transforms(config, False)
    if config.patches is not None:
        if config.patches != "csrnet9":
            raise ValueError(f"patches must be None or 'csrnet9', got {config.patches!r}")
        # the patches are cut from the (resized) RGB image, then normalized
        resize = None if config.max_size is None else Resize(max_size=_max_size(config))
        train = NinePatches(CrowdDataset(train_samples, resize, strict=config.strict, warn=warn),
                            post=Normalize(config.input_norm))
    else:
        train = CrowdDataset(train_samples, build_transforms(config, True), strict=config.strict, warn=warn)
    train.unaugmented = lambda: CrowdDataset(train_samples, plain, strict=config.strict)
    return _repeated(train, config), val


def _repeated(train, config: TrainConfig):
    """The training set with each of its samples ``config.repeat`` times an epoch (:class:`Repeated`)."""
    times = config.repeat
    return train if type(times) is int and times == 1 else Repeated(train, times)


def _max_size(config: TrainConfig):
    """``config.max_size`` as Resize takes it: an int, or a (a, b) box (JSON keeps it as a list)."""
    return tuple(config.max_size) if isinstance(config.max_size, (list, tuple)) else config.max_size


def evaluation_dataset(config, split: str | None = "val", *, warn=None, must_exist: bool = False):
    """The images of one split of ``config.dataset``, as evaluation sees them: its own split (``"train"``
    gives the training images, not the validation ones), with the evaluation transforms (``config.max_size``
    only: no crops, no flips) and *not* normalized (RGB in [0, 1]: :class:`crowdkernels.Counter` applies the
    model's normalization). Synthetic crowds: ``config.synthetic`` sizes, the training seed for "train",
    :func:`held_out_seed` for "val"/"test", as :func:`build_datasets` draws them.

    ``"val"`` is the dataset's val split, its test split where there is none, and every 10th training image
    where there is neither; ``split=None``: the images the training of ``config`` validated on, as
    :func:`build_datasets` picks them: those ``config.val_from_train`` held out (seeded), else as "val".
    ``must_exist=True`` (a split the user named: ``eval --split val|test``): a "val"
    or "test" split the dataset does not have raises a LayoutError naming the split folders found, instead of
    taking training images.

    Returns ``(dataset, note)``, the note saying which images were used. ``warn`` reports left-out files.
    """
    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be None, 'train', 'val' or 'test', got {split!r}")
    transform = build_transforms(replace(config, input_norm=None), False)
    if config.dataset == "synthetic":
        syn = config.synthetic
        train = split == "train"
        n, seed = (int(syn["train"]), config.seed) if train else (int(syn["val"]), held_out_seed(config.seed))
        return SyntheticCrowds(n, int(syn["size"]), seed, transform=transform), (
            f"{n} synthetic {'training' if train else 'held-out'} images (seed {seed})")
    require_root(config.dataset, config.root)
    if split is None and config.val_from_train is not None:
        everything, _ = dataset_samples(config.dataset, config.root, "train", fold=config.fold, whole=True, warn=warn)
        _, samples = split_off(everything, config.val_from_train, config.seed)
        note = (f"the {config.val_from_train:g} of the training images the training held out with seed {config.seed} "
                "(--val-from-train)")
    else:
        samples, note = dataset_samples(config.dataset, config.root, split or "val", fold=config.fold, warn=warn,
                                        fallback=not must_exist)
    return CrowdDataset(samples, transform, strict=config.strict, warn=warn), note


def mean_count_baseline(train_set, val_set) -> dict | None:
    """The MAE on ``val_set`` of predicting the training images' mean count for every image: the score a
    model that learned nothing about the images gets. None when the counts are not known."""
    import numpy as np

    train = getattr(train_set, "counts", None)
    val = getattr(val_set, "counts", None)
    if not train or not val:
        return None
    mean = float(np.mean(train))
    return {"count": mean, "mae": float(np.mean(np.abs(np.asarray(val, dtype=np.float64) - mean)))}
