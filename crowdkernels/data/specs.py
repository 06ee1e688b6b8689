"""The registry of named datasets: one :class:`DatasetSpec` per dataset (the CLI's ``--dataset``), saying how
one split folder is laid out (its :class:`~crowdkernels.data.layouts.DatasetFormat`: images, annotation
files, their reader), where the splits are (a split policy), and the per-dataset facts the training engine
reads. :data:`DATASET_NAMES`, :data:`crowdkernels.data.layouts.FORMATS` and :func:`dataset_samples` derive
from it: a new dataset is one :func:`register_dataset` call.

==============  ==================================================  ============================
dataset         splits under the root a user passes                 policy
==============  ==================================================  ============================
shanghaitech-a  part_A/train_data, part_A/test_data                 :class:`FolderSplits`
shanghaitech-b  part_B/train_data, part_B/test_data                 :class:`FolderSplits`
ucf-cc-50       one folder of 50 images in 5 folds                  :class:`CrossValidation`
ucf-qnrf        Train, Test                                         :class:`FolderSplits`
jhu             train, val, test                                    :class:`FolderSplits`
nwpu            one folder, train.txt / val.txt listing the images  :class:`ListedSplits`
synthetic       rendered, no files (:class:`.SyntheticCrowds`)      none
folder          train, val, test (or one folder of images)          :class:`FolderSplits`
==============  ==================================================  ============================

A root that holds a training split but no validation split (e.g. a single ``train_data`` folder) has every
10th image held out for "val" (:func:`holdout`).

A split policy is an object with ``samples(spec, root, split, *, fold, missing, warn, whole, fallback)``
returning ``(samples, note)`` (see :func:`dataset_samples` for the arguments); the three here cover the
public datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .layouts import FORMATS, DatasetFormat, LayoutError, has_layout, list_samples, natural_key, point_file_beside
from .readers import (POINT_EXTENSIONS, read_jhu_txt, read_nwpu_json, read_point_file, read_shanghaitech_mat,
                      read_ucf_mat)

__all__ = [
    "DatasetSpec",
    "FolderSplits",
    "ListedSplits",
    "CrossValidation",
    "DATASETS",
    "DATASET_NAMES",
    "register_dataset",
    "dataset_spec",
    "dataset_samples",
    "holdout",
    "cross_validation",
    "ucf_cc_50_folds",
]


# ----------------------------------------------------------------------------------------- splits
def holdout(samples: list, every: int = 10) -> tuple[list, list]:
    """(train, held-out): every ``every``-th sample (natural order) is held out, at least one; the split
    used when a dataset root has no validation/test split."""
    ordered = sorted(samples, key=lambda s: natural_key(s.name))
    if len(ordered) < 2:
        return ordered, list(ordered)
    held = set(range(every - 1, len(ordered), every)) or {len(ordered) - 1}
    return [s for i, s in enumerate(ordered) if i not in held], [s for i, s in enumerate(ordered) if i in held]


def cross_validation(samples: list, fold: int, folds: int = 5) -> tuple[list, list]:
    """(train, test) of ``folds``-fold cross-validation: the samples in natural order of their names, fold
    k (1..folds) testing on the k-th of ``folds`` equal parts and training on the others."""
    if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= folds:
        raise ValueError(f"fold must be an int in 1..{folds}, got {fold!r}")
    ordered = sorted(samples, key=lambda s: natural_key(s.name))
    n = len(ordered)
    lo, hi = (fold - 1) * n // folds, fold * n // folds
    return ordered[:lo] + ordered[hi:], ordered[lo:hi]


def ucf_cc_50_folds(samples: list, fold: int) -> tuple[list, list]:
    """(train, test) of 5-fold cross-validation on UCF_CC_50 (:func:`cross_validation`): fold k (1-5) tests
    on images 10k-9 .. 10k of the full set and trains on the other four fifths."""
    return cross_validation(samples, fold, 5)


@dataclass(frozen=True)
class FolderSplits:
    """Splits as sub-folders of the root a user passes (the dataset's folder, or one part of it), each a
    split folder of the dataset's format; a split takes the first of its folders that has the layout. Where
    the root has a training split but not the one asked for, or is itself one folder of images, every 10th
    image is held out for it (:func:`holdout`), unless ``fallback`` is False."""

    train: tuple[str, ...]
    val: tuple[str, ...]  # the test split's folders where the dataset has no validation split (as the papers do)
    test: tuple[str, ...]

    def folders(self, split: str) -> tuple[str, ...]:
        return {"train": self.train, "val": self.val, "test": self.test}[split]

    def _found(self, root: Path, fmt: DatasetFormat) -> str:
        """The split folders under ``root`` (for an error about one that is not there)."""
        found = []
        for split in ("train", "val", "test"):
            for rel in self.folders(split):
                if rel not in found and has_layout(root / rel, fmt):
                    found.append(rel)
        if found:
            return ", ".join(f"{root / rel}/" for rel in found)
        if has_layout(root, fmt):
            return f"{root}/ itself (one folder of images, no split folders)"
        subs = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
        return f"no split folder ({', '.join(subs[:10]) + (' ...' if len(subs) > 10 else '') if subs else 'no folders'})"

    def samples(self, spec: DatasetSpec, root: Path, split: str, *, fold, missing, warn, whole, fallback):
        fmt, dataset = spec.format, spec.name
        other = "val" if split == "train" else "train"
        has_other = any(has_layout(root / rel, fmt) for rel in self.folders(other))
        for rel in self.folders(split):
            if has_layout(root / rel, fmt):
                if split == "train" and not has_other and not whole:
                    # no validation split beside it: hold out the same images "val" will get
                    train, _ = holdout(list_samples(root / rel, fmt.name, missing=missing, warn=warn))
                    return train, f"{root / rel} less every 10th image (held out: there is no val/test split)"
                return list_samples(root / rel, fmt.name, missing=missing, warn=warn), f"{root / rel}"
        train_folders = [rel for rel in self.folders("train") if has_layout(root / rel, fmt)]
        if train_folders:  # the dataset has a train split but not this one
            base = root / train_folders[0]
        elif has_layout(root, fmt):
            base = root
        else:
            expected = " or ".join(f"ROOT/{r}/" for r in self.folders("train"))
            raise LayoutError(
                f"{root} does not have the {dataset} layout: expected {expected + ' holding ' if expected else ''}"
                f"{fmt.layout}"
            )
        if whole and split == "train":
            return list_samples(base, fmt.name, missing=missing, warn=warn), f"every image of {base}"
        if not fallback and split != "train":
            looked = ", ".join(f"{root / rel}/" for rel in self.folders(split))
            raise LayoutError(
                f"there is no {split} split under {root} (looked for {looked}); found: {self._found(root, fmt)}. "
                "Leave out --split to evaluate the training images held out for validation (every 10th, or those "
                "--val-from-train held out), or pass --split train")
        train, held = holdout(list_samples(base, fmt.name, missing=missing, warn=warn))
        return (train if split == "train" else held), f"no {split} split under {root}: every 10th image of {base} held out"


@dataclass(frozen=True)
class ListedSplits:
    """One folder of images whose splits are lists beside it, ``ROOT/<split>.txt``, one image id (the name
    without extension) first on each line (NWPU-Crowd's ``train.txt``, ``val.txt``). Without the list, every
    10th image is held out for "val" (:func:`holdout`), unless ``fallback`` is False."""

    def samples(self, spec: DatasetSpec, root: Path, split: str, *, fold, missing, warn, whole, fallback):
        samples = list_samples(root, spec.format.name, missing=missing, warn=warn)
        listed = root / f"{split}.txt"
        if listed.is_file():
            ids = {line.split()[0] for line in listed.read_text().splitlines() if line.strip()}
            return [s for s in samples if s.name in ids], f"the images listed in {listed.name}"
        if whole and split == "train":
            return samples, f"every image of {root}"
        if not fallback and split != "train":
            lists = sorted(p.name for p in root.glob("*.txt")) or ["none"]
            raise LayoutError(f"there is no {split} split in {root}: no {split}.txt listing its images (lists found: "
                              f"{', '.join(lists)}); leave out --split to evaluate the images held out for validation")
        train, held = holdout(samples)
        return (train if split == "train" else held), f"no {split}.txt in {root}: every 10th image held out"


@dataclass(frozen=True)
class CrossValidation:
    """One folder of images in ``folds`` cross-validation folds (:func:`cross_validation`): ``fold`` k (default
    1) tests ("val" and "test") on the k-th part and trains on the others."""

    folds: int = 5

    def samples(self, spec: DatasetSpec, root: Path, split: str, *, fold, missing, warn, whole, fallback):
        samples = list_samples(root, spec.format.name, missing=missing, warn=warn)
        train, test = cross_validation(samples, 1 if fold is None else fold, self.folds)
        return (train if split == "train" else test), f"fold {fold or 1} of {self.folds} ({len(test)} test images)"


# ----------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset.

    Attributes:
        name: its name on the command line (``--dataset``).
        format: the layout of one of its split folders; None for a dataset rendered rather than read
            (synthetic).
        splits: where its splits are (:class:`FolderSplits`, :class:`ListedSplits`, :class:`CrossValidation`);
            None without a format.
        small_crop: training crops take the model's smaller default crop (the engine's ``crop_sha``: 128 x 128
            instead of 256 x 256, HMoDE sec. IV-B2): ShanghaiTech A's images vary in size, some under 300 px a side.
        max_size: the box (a, b) in pixels that training and evaluation images are shrunk to fit in either
            orientation (the engine's ``max_size``, :func:`crowdkernels.data.transforms.resized_shape`), or None:
            UCF-QNRF's images above 1080p are shrunk to fit 1920 x 1080 (L2SM sec. 4.2).
    """

    name: str
    format: DatasetFormat | None
    splits: FolderSplits | ListedSplits | CrossValidation | None = None
    small_crop: bool = False
    max_size: tuple[int, int] | None = None


#: name -> :class:`DatasetSpec`, in registration order (the order of ``--dataset``'s choices).
DATASETS: dict[str, DatasetSpec] = {}

#: The dataset names of the CLI (``--dataset``), in registration order.
DATASET_NAMES: tuple[str, ...] = ()


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Adds ``spec`` to :data:`DATASETS`, its name to :data:`DATASET_NAMES` and its format to
    :data:`~crowdkernels.data.layouts.FORMATS`; returns it. Raises ValueError for a name already registered,
    a format without splits, or a format name already taken by another format."""
    global DATASET_NAMES
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is registered already")
    fmt = spec.format
    if fmt is not None:
        if spec.splits is None:
            raise ValueError(f"dataset {spec.name!r} has a format but no split policy")
        if FORMATS.setdefault(fmt.name, fmt) is not fmt:
            raise ValueError(f"dataset {spec.name!r}: the format name {fmt.name!r} is taken by another format")
    DATASETS[spec.name] = spec
    DATASET_NAMES = tuple(DATASETS)
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` registered as ``name``; ValueError naming the registered ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    return DATASETS[name]


def dataset_samples(dataset: str, root, split: str = "train", *, fold: int | None = None, missing: str = "keep",
                    warn=None, whole: bool = False, fallback: bool = True):
    """The samples of one split of a named dataset (:data:`DATASET_NAMES`, not "synthetic").

    ``root`` is the dataset folder (e.g. ``ShanghaiTech/`` holding ``part_A/train_data``), one part of it,
    or a split folder. ``split`` is "train" or "val" ("val" is the test split where the dataset has no
    validation split, as the papers do; JHU and NWPU use their val split). UCF_CC_50 takes ``fold``
    (1-5). Where the root holds only one split (e.g. a single train_data folder), every 10th image is
    held out for "val" (:func:`holdout`); ``whole=True`` keeps every training image instead (for a
    validation split the caller makes itself, ``train --val-from-train``). ``fallback=False`` (a split the
    user named, ``eval --split val|test``) raises a LayoutError naming the split folders found instead of
    holding out training images for a "val" or "test" split the dataset does not have. ``warn`` reports
    annotation files without an image (see :func:`list_samples`). Returns (samples, note) with note saying
    which split was used. Raises LayoutError naming the expected layout.
    """
    spec = DATASETS.get(dataset)
    if spec is None or spec.format is None:
        raise ValueError(f"dataset must be one of {[n for n, s in DATASETS.items() if s.format is not None]}, "
                         f"got {dataset!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"--root {root} is not a folder (expected the {dataset} dataset: {spec.format.layout})")
    return spec.splits.samples(spec, root, split, fold=fold, missing=missing, warn=warn, whole=whole,
                               fallback=fallback)


# ----------------------------------------------------------------------------------------- the datasets
_SHANGHAITECH = DatasetFormat(  # parts A and B
    name="shanghaitech",
    layout="ROOT/images/IMG_N.jpg with ROOT/ground-truth/GT_IMG_N.mat (e.g. ROOT = part_A/train_data)",
    image_dir="images",
    annotation_path=lambda root, img: root / "ground-truth" / f"GT_{img.stem}.mat",
    reader=read_shanghaitech_mat,
    required_dirs=("images", "ground-truth"),
    annotation_dir="ground-truth",
    annotation_globs=("GT_*.mat",),
    split_hint=("train_data", "test_data", "part_A", "part_B"),
)

register_dataset(DatasetSpec(
    name="shanghaitech-a",
    format=_SHANGHAITECH,
    splits=FolderSplits(train=("part_A/train_data", "part_A_final/train_data", "train_data"),
                        val=("part_A/test_data", "part_A_final/test_data", "test_data"),
                        test=("part_A/test_data", "part_A_final/test_data", "test_data")),
    small_crop=True,
))

register_dataset(DatasetSpec(
    name="shanghaitech-b",
    format=_SHANGHAITECH,
    splits=FolderSplits(train=("part_B/train_data", "part_B_final/train_data", "train_data"),
                        val=("part_B/test_data", "part_B_final/test_data", "test_data"),
                        test=("part_B/test_data", "part_B_final/test_data", "test_data")),
))

register_dataset(DatasetSpec(
    name="ucf-cc-50",
    format=DatasetFormat(
        name="ucf_cc_50",
        layout="ROOT/N.jpg with ROOT/N_ann.mat side by side (N = 1..50)",
        image_dir="",
        annotation_path=lambda root, img: img.with_name(f"{img.stem}_ann.mat"),
        reader=read_ucf_mat,
        image_filter=lambda p: p.stem.isdigit(),
        annotation_globs=("[0-9]*_ann.mat",),
    ),
    splits=CrossValidation(folds=5),
))

register_dataset(DatasetSpec(
    name="ucf-qnrf",
    format=DatasetFormat(
        name="ucf_qnrf",
        layout="ROOT/img_XXXX.jpg with ROOT/img_XXXX_ann.mat side by side (e.g. ROOT = UCF-QNRF_ECCV18/Train)",
        image_dir="",
        annotation_path=lambda root, img: img.with_name(f"{img.stem}_ann.mat"),
        reader=read_ucf_mat,
        image_filter=lambda p: p.stem.startswith("img_") and not p.stem.endswith("_ann"),
        annotation_globs=("img_*_ann.mat",),
        split_hint=("Train", "Test"),
    ),
    splits=FolderSplits(train=("Train",), val=("Test",), test=("Test",)),
    max_size=(1920, 1080),
))

register_dataset(DatasetSpec(
    name="jhu",
    format=DatasetFormat(
        name="jhu",
        layout="ROOT/images/XXXX.jpg with ROOT/gt/XXXX.txt (e.g. ROOT = jhu_crowd_v2.0/train)",
        image_dir="images",
        annotation_path=lambda root, img: root / "gt" / f"{img.stem}.txt",
        reader=read_jhu_txt,
        required_dirs=("images", "gt"),
        split_hint=("train", "val", "test"),
        annotation_dir="gt",
        annotation_globs=("*.txt",),
    ),
    splits=FolderSplits(train=("train",), val=("val", "test"), test=("test",)),
))

register_dataset(DatasetSpec(
    name="nwpu",
    format=DatasetFormat(
        name="nwpu",
        layout="ROOT/images/XXXX.jpg with ROOT/jsons/XXXX.json",
        image_dir="images",
        annotation_path=lambda root, img: root / "jsons" / f"{img.stem}.json",
        reader=read_nwpu_json,
        required_dirs=("images", "jsons"),
        annotation_dir="jsons",
        annotation_globs=("*.json",),
    ),
    splits=ListedSplits(),
))

register_dataset(DatasetSpec(name="synthetic", format=None))

register_dataset(DatasetSpec(
    name="folder",
    format=DatasetFormat(
        name="folder",
        layout="ROOT/NAME.jpg (or .png, ...) with a point file ROOT/NAME.txt, NAME.csv or NAME.json side by side",
        image_dir="",
        # the first point file that exists; NAME.txt (absent) when there is none, for the error to name
        annotation_path=lambda root, img: point_file_beside(img) or img.with_suffix(".txt"),
        reader=read_point_file,
        split_hint=("train", "val", "test"),
        annotation_globs=tuple(f"*{ext}" for ext in POINT_EXTENSIONS),
        annotations_by_stem=True,
    ),
    splits=FolderSplits(train=("train",), val=("val", "test"), test=("test",)),
))
