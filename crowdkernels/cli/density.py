"""``crowdkernels density``: the density maps of a dataset split as files
(:func:`crowdkernels.data.density_job.run_density_job`)."""
from __future__ import annotations

import argparse
import sys

from ._args import EXIT_FAILED, EXIT_OK, add_options
from .._io import output_dir
from ..data import FORMATS
from ..data.density_job import DENSITY_OPTIONS, DensitySettings, run_density_job, summary_line

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
    add_options(p, DENSITY_OPTIONS)
    return run


def run(args) -> int:
    output_dir(args.out, "--out")
    settings = DensitySettings(args.style, args.sigma, args.k, args.beta, args.truncate, args.kernel_size, args.stride)
    manifest = run_density_job(args.root, args.format, args.out, settings, device=args.device,
                               overwrite=args.overwrite, strict=args.strict)
    failures = manifest["failures"]
    print(summary_line(manifest, args.out))
    if failures:
        if args.strict:
            print("stopped at the first failure (--strict)", file=sys.stderr)
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for name, msg in failures.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
