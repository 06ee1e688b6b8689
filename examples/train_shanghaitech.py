"""Train HMoDE on ShanghaiTech part B the paper's way (the `hmode-paper` recipe), then evaluate the best checkpoint.

    python examples/train_shanghaitech.py /path/to/ShanghaiTech runs/hmode-shb --pretrained vgg16_bn-6c64b313.pth
    python examples/train_shanghaitech.py /path/to/ShanghaiTech runs/try --epochs 2 --width 0.125   # a quick CPU try

The same run from the command line:

    crowdkernels train --recipe hmode-paper --dataset shanghaitech-b --root /path/to/ShanghaiTech \\
        --pretrained vgg16_bn-6c64b313.pth --out runs/hmode-shb
    crowdkernels eval --checkpoint runs/hmode-shb/best.pt --dataset shanghaitech-b --root /path/to/ShanghaiTech

`--recipe hmode-released` trains as the authors' released train.py does. On several GPUs: ``torchrun
--nproc_per_node 4 -m crowdkernels train ...`` (--batch-size is per process). Stop with Ctrl-C at any time; add
``--resume`` to continue exactly where it stopped.
"""
import argparse

import crowdkernels as ck
from crowdkernels.data import DENSITY_LEVELS
from crowdkernels.engine import Trainer, build_config, build_run, evaluation_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the ShanghaiTech folder (holding part_B/train_data and part_B/test_data)")
    parser.add_argument("out", help="run folder")
    parser.add_argument("--recipe", default="hmode-paper")
    parser.add_argument("--pretrained", help="torchvision's vgg16_bn ImageNet weights (a local file)")
    parser.add_argument("--epochs", type=int, help="default: the recipe's (200)")
    parser.add_argument("--width", type=float, help="channel multiplier (< 1 for a quick CPU try; no --pretrained)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    overrides = {"workers": args.workers}
    for key, value in (("pretrained", args.pretrained), ("epochs", args.epochs), ("model_kwargs.width", args.width)):
        if value is not None:
            overrides[key] = value
    config = build_config(recipe=args.recipe, dataset="shanghaitech-b", overrides=overrides)
    config.root, config.out, config.resume = args.root, args.out, args.resume
    model, criterion, train_set, val_set = build_run(config, warn=print)
    summary = Trainer(model, criterion, train_set, val_set, config).run()
    print(f"{summary['status']} after {summary['epoch']} epochs; best validation MAE {summary['best']['mae']}")

    counter = ck.load(f"{args.out}/best.pt")            # the best model, fed as it was trained; tiles huge images
    test_set, note = evaluation_dataset(config, "val")  # ShanghaiTech B's test_data, unnormalized: the counter normalizes
    metrics, _ = counter.evaluate(test_set, levels=DENSITY_LEVELS)
    print(note, {k: metrics[k] for k in ("images", "mae", "mse", "nae", "game0", "game1", "game2", "game3")})
    return summary, metrics


if __name__ == "__main__":
    main()
