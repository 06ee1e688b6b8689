"""``crowdkernels export``: a trained counter as one portable file, ONNX or ``torch.export``'s .pt2
(:func:`crowdkernels.engine.export.export`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._args import EXIT_OK, CliError, warn
from ..engine.export import FORMATS, ONNX_OPSET, export

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
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a .pt from crowdkernels train, or the authors' released HMoDE weights")
    p.add_argument("--out", required=True, type=Path, help="the file to write (e.g. model.onnx)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default) or pt2 (torch.export.load reads it)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"the ONNX opset; default: {ONNX_OPSET}")
    return run


def run(args) -> int:
    try:
        path = export(args.checkpoint, args.out, args.format, opset=args.opset)
    except (ImportError, NotImplementedError) as exc:
        raise CliError(str(exc)) from None
    warn(f"wrote {path}")
    return EXIT_OK
