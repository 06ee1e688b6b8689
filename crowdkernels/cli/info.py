"""``crowdkernels info``: what this installation can run (:func:`crowdkernels.backends`)."""
from __future__ import annotations

import argparse
import json

from ._args import EXIT_OK
import crowdkernels

NAME = "info"
HELP = "what this installation can run: compiled backends, CUDA archs, Triton, threads"


def _yes_no(flag) -> str:
    return "yes" if flag else "no"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return run


def run(args) -> int:
    info = {"crowdkernels": crowdkernels.__version__, **crowdkernels.backends()}
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    fallback = "" if info["cpu"] else " (the plain-PyTorch reference runs instead: slower, same results)"
    triton = f"{info['triton']} (runs here: {_yes_no(info['triton_runs'])})" if info["triton"] else "not installed"
    rows = [
        ("crowdkernels", info["crowdkernels"]),
        ("torch", info["torch"]),
        ("C++ kernels (cpu)", _yes_no(info["cpu"]) + fallback),
        ("OpenMP", info["openmp"] or "no"),
        ("CUDA kernels", _yes_no(info["cuda"])),
        ("CUDA archs", ", ".join(info["cuda_archs"]) or "-"),
        ("GPU visible", _yes_no(info["cuda_device"])),
        ("Triton", triton),
        ("threads", info["threads"]),
    ]
    if "load_error" in info:
        rows.append(("load error", info["load_error"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return EXIT_OK
