"""Count the people in images with a trained checkpoint, and draw each image beside its density map.

    python examples/count_images.py crowdkernels-demo/run/best.pt crowdkernels-demo/data/val --out counted/

IMAGES may be files, folders or glob patterns. The same from the command line:

    crowdkernels count crowdkernels-demo/data/val --checkpoint crowdkernels-demo/run/best.pt --save-dir counted/
"""
from __future__ import annotations

import argparse
from pathlib import Path

import crowdkernels as ck
from crowdkernels.data import image_points, point_file_beside, read_point_file
from crowdkernels.viz import save_prediction


def main(checkpoint, images, out=None, batch_size: int = 4) -> dict:
    """{image path: predicted count}; with ``out``, also OUT/<image stem>.png (with the true map when a
    point file lies beside the image)."""
    counter = ck.load(checkpoint)                  # the model, fed as it was trained
    counts = {}
    for pred in counter.predictions(images, batch_size):
        counts[pred.source] = pred.count
        print(f"{pred.source}: {pred.count:.1f} people")
        if out is not None:
            ann = point_file_beside(pred.source)
            # points annotate the stored pixels; a photo's EXIF orientation turns them with the image
            points = None if ann is None else image_points(read_point_file(ann), pred.source)
            save_prediction(Path(out) / f"{Path(pred.source).stem}.png", pred, points=points)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt from crowdkernels train (or the demo's run/best.pt)")
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--out", help="folder for the pictures")
    args = parser.parse_args()
    main(args.checkpoint, ck.inference.image_paths(args.images), args.out)
