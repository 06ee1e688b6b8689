"""``crowdkernels density``: the density maps of a dataset split as files
(:func:`crowdkernels.data.density_job.run_density_job`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._args import EXIT_FAILED, EXIT_OK
from .._io import output_dir
from ..data import FORMATS
from ..data.density_job import DensitySettings, run_density_job
from ..engine.config import positive_float, positive_int, sigma_arg

NAME = "density"
HELP = "write the density maps of a dataset split (.npy per image + manifest.json)"


def add_arguments(p: argparse.ArgumentParser):
    p.description = (
        "Reads every image's head annotations in a dataset split, makes its density map with "
        "crowdkernels.density_map, and writes OUT/<image stem>.npy (float32 [ceil(H/s), ceil(W/s)]) and "
        "OUT/manifest.json. Files are written atomically; a rerun reuses a finished map only when its "
        "annotation file (SHA-256), image size and settings are the recorded ones. Layouts: "
        + "; ".join(f"{f.name}: {f.layout}" for f in FORMATS.values())
    )
    p.add_argument("root", type=Path, help="the split folder (e.g. ShanghaiTech/part_A/train_data)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="the dataset's layout")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    p.add_argument("--style", default="exact", choices=("exact", "csrnet", "matlab"), help="default: exact")
    p.add_argument("--sigma", default="adaptive", type=sigma_arg,
                   help="'adaptive' (kNN geometry-adaptive; matlab: 4.0) or a fixed sigma in pixels; default: adaptive")
    p.add_argument("--stride", default=1, type=positive_int, help="maps at 1/stride resolution, count kept; default: 1")
    p.add_argument("--k", default=3, type=positive_int, help="neighbours of the adaptive sigma; default: 3")
    p.add_argument("--beta", default=0.3, type=positive_float, help="adaptive sigma = beta x mean kNN distance; default: 0.3")
    p.add_argument("--truncate", default=4.0, type=positive_float, help="Gaussian radius in sigmas; default: 4.0")
    p.add_argument("--kernel-size", default=15, type=positive_int, help="window of style matlab (odd); default: 15")
    p.add_argument("--device", default="cpu", help="torch device for the kernels, e.g. cuda; default: cpu")
    p.add_argument("--overwrite", action="store_true", help="recompute every map, even finished ones")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    return run


def run(args) -> int:
    output_dir(args.out, "--out")
    settings = DensitySettings(args.style, args.sigma, args.k, args.beta, args.truncate, args.kernel_size, args.stride)
    manifest = run_density_job(args.root, args.format, args.out, settings, device=args.device,
                               overwrite=args.overwrite, strict=args.strict)
    s, failures = manifest["summary"], manifest["failures"]
    outside = ""
    if s["points_outside"]:
        what = "clipped to the border (style matlab)" if settings.style == "matlab" else "dropped"
        outside = f"; {s['points_outside']} point(s) outside their images {what}"
    print(
        f"density: {s['done']}/{s['images']} images in {args.out} ({s['written']} written, {s['reused']} reused), "
        f"{s['heads']} heads, map sum {s['map_sum']:.2f}{outside}; {len(failures)} failed"
    )
    if failures:
        if args.strict:
            print("stopped at the first failure (--strict)", file=sys.stderr)
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for name, msg in failures.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
