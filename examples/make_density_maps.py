"""Make the density map of one ShanghaiTech image and save it as a PNG beside the image.

    python examples/make_density_maps.py path/to/part_A/train_data IMG_215 --out IMG_215_density.png

For a whole split, use the command line instead: it writes one .npy per image and a manifest, and can
be resumed:

    crowdkernels density path/to/part_A/train_data --format shanghaitech --out maps/
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import torch

import crowdkernels
from crowdkernels.data import image_points, image_size, load_image, read_shanghaitech_mat

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("root", type=Path, help="a ShanghaiTech split folder (holds images/ and ground-truth/)")
parser.add_argument("name", nargs="?", default="IMG_215", help="the image stem, e.g. IMG_215")
parser.add_argument("--style", default="exact", choices=["exact", "csrnet", "matlab"])
parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <name>_density.png)")
args = parser.parse_args()

image_path = args.root / "images" / f"{args.name}.jpg"
points = read_shanghaitech_mat(args.root / "ground-truth" / f"GT_{args.name}.mat")  # float64 [N, 2] (x, y)
points = image_points(points, image_path)  # turned with the image when it carries an EXIF orientation
size = image_size(image_path)  # (H, W) of the image shown upright, from the header

# geometry-adaptive sigma (beta = 0.3 x mean distance to the 3 nearest heads); "exact": sums to the count
density = crowdkernels.density_map(torch.from_numpy(points), size, style=args.style)
print(f"{args.name}: {len(points)} heads, map {tuple(density.shape)}, sum {density.sum().item():.3f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax1.imshow(load_image(image_path).permute(1, 2, 0).numpy())
ax1.set_title(f"{args.name}: {len(points)} heads")
ax2.imshow(density.numpy(), cmap="jet")
ax2.set_title(f"density ({args.style}), sum {density.sum().item():.1f}")
for ax in (ax1, ax2):
    ax.set_axis_off()
fig.tight_layout()
out = args.out or Path(f"{args.name}_density.png")
fig.savefig(out, dpi=100)
print(f"saved {out}")
