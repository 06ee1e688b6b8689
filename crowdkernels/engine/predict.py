"""A model's density for whole images: padded to the model's multiple, tiled for huge images, and the map
of cells spread back over the image's pixels.

:func:`predict_density` pads the image with zeros to a multiple of ``align`` (the models downsample by
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

from ..models.conventions import conventions_of

__all__ = ["final_of", "autocast", "predict_density", "cell_stride", "spread_cells"]


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
    return out.float() / float(conventions_of(model).density_scale)


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
            the model's ``input_multiple`` (:class:`crowdkernels.models.Conventions`: 16; 1 for HMoDE's
            official variant, run unpadded as the released test.py runs it).
    Returns:
        [B, 1, ceil(H/s), ceil(W/s)] float32 (B = 1 for one image), s the model's output stride, in people
        per output cell (divided by the model's ``density_scale`` where it has one): its sum is the count.
    """
    if align is None:
        align = int(conventions_of(model).input_multiple)
    x = image if image.dim() == 4 else image[None]
    H, W = x.shape[-2:]
    Hp, Wp = -(-H // align) * align, -(-W // align) * align
    x = F.pad(x, (0, Wp - W, 0, Hp - H))
    if tile is None or (Hp <= tile and Wp <= tile):
        out = _run(model, x, amp)
        if align == 1 and Hp % out.shape[-2]:
            # a model that pads and crops itself (an exported graph): its map is the image's cells already
            cell_stride(out.shape[-2:], (H, W))  # ValueError when it is not
            return out
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


def cell_stride(cells_size, input_size) -> int:
    """The output stride s of a map of (h, w) cells over an (H', W') image: the power of two with
    ceil(H'/s) = h and ceil(W'/s) = w (the models pool by 2; where two strides fit, h = w = 1 and they
    split the image alike). ValueError when none fits."""
    (h, w), (H, W) = cells_size, input_size
    for k in range(16):
        s = 2**k
        if -(-H // s) == h and -(-W // s) == w:
            return s
    raise ValueError(f"a map of {h} x {w} cells does not tile an image of {H} x {W} pixels at a power-of-two stride")


def spread_cells(cells: torch.Tensor, size, input_size=None) -> torch.Tensor:
    """A map of people per cell ([h, w] over an image of ``input_size`` = (H', W') pixels, cells of s x s
    pixels, s = :func:`cell_stride`, the last row and column cut at the border) spread evenly over the
    pixels of an (H, W) = ``size`` image of the same scene (default: the same image). Image pixel (y, x)
    belongs to the cell holding input pixel (floor((y + 0.5) H'/H), floor((x + 0.5) W'/W)), and each
    cell's people are divided by the number of image pixels belonging to it. float32 [H, W], people per
    pixel; its sum is the map's (up to float32 rounding)."""
    H, W = (int(size[0]), int(size[1]))
    Hs, Ws = (H, W) if input_size is None else (int(input_size[0]), int(input_size[1]))
    h, w = cells.shape[-2:]
    s = cell_stride((h, w), (Hs, Ws))
    rows = torch.clamp(((torch.arange(H, dtype=torch.float64) + 0.5) * Hs / H).long(), max=Hs - 1) // s
    cols = torch.clamp(((torch.arange(W, dtype=torch.float64) + 0.5) * Ws / W).long(), max=Ws - 1) // s
    n_rows = torch.bincount(rows, minlength=h).to(torch.float64)
    n_cols = torch.bincount(cols, minlength=w).to(torch.float64)
    # a cell no image pixel falls in (only when the image is smaller than the model's input) keeps its
    # people out of the sum; clamp avoids 0/0 for it
    per_pixel = cells.detach().reshape(h, w).to("cpu", torch.float64) / (n_rows[:, None] * n_cols[None, :]).clamp_min(1.0)
    return per_pixel[rows][:, cols].to(torch.float32)
