"""``crowdkernels export``: a trained counter as one portable file, ONNX or ``torch.export``'s .pt2
(:func:`crowdkernels.engine.export.export`)."""
from __future__ import annotations

import argparse

from ._args import EXIT_OK, CliError, add_options, warn
from ..engine.export import EXPORT_OPTIONS, export

NAME = "export"
HELP = "export a trained checkpoint to ONNX (or a torch.export .pt2) that counts RGB images in [0, 1]"


def add_arguments(p: argparse.ArgumentParser):
    p.description = (
        "Writes the whole counter as one file: input 'images' float32 [N, 3, H, W], RGB in [0, 1], H and W "
        "dynamic; output 'cells' float32 [N, 1, ceil(H/s), ceil(W/s)], people per output cell of stride s. The "
        "model's normalization, padding and density scale are inside the graph; the model name, stride, padding "
        "multiple, max size, tile and crowdkernels version are in its metadata. crowdkernels.load(OUT) and "
        "'crowdkernels count --checkpoint OUT' count with it (ONNX Runtime, CPU). Needs the 'deploy' extra "
        "(pip install 'crowdkernels[deploy]')."
    )
    add_options(p, EXPORT_OPTIONS)
    return run


def run(args) -> int:
    try:
        path = export(args.checkpoint, args.out, args.format, opset=args.opset)
    except ImportError as exc:
        raise CliError(str(exc)) from None
    warn(f"wrote {path}")
    return EXIT_OK
