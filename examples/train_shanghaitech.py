"""Train HMoDE on ShanghaiTech part B with the paper's settings, then evaluate the best checkpoint.

    python examples/train_shanghaitech.py /path/to/ShanghaiTech runs/hmode-shb [--epochs 200] [--width 1.0]

The same run from the command line:

    crowdkernels train --model hmode --dataset shanghaitech-b --root /path/to/ShanghaiTech --out runs/hmode-shb
    crowdkernels eval --checkpoint runs/hmode-shb/best.pt --dataset shanghaitech-b --root /path/to/ShanghaiTech

On several GPUs: ``torchrun --nproc_per_node 4 -m crowdkernels train ...`` (--batch-size is per process).
Stop with Ctrl-C at any time; add ``--resume`` to continue exactly where it stopped.
"""
import argparse

import crowdkernels as ck
from crowdkernels.data import DENSITY_LEVELS
from crowdkernels.engine import PAPER_DEFAULTS, TrainConfig, Trainer, build_datasets, build_model, evaluation_dataset

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("root", help="the ShanghaiTech folder (holding part_B/train_data and part_B/test_data)")
parser.add_argument("out", help="run folder")
parser.add_argument("--epochs", type=int, default=PAPER_DEFAULTS["hmode"]["epochs"])
parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (< 1 for a quick CPU try)")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

d = PAPER_DEFAULTS["hmode"]  # Adam, lr 2e-5 halved after 100 epochs, 256 x 256 crops, flips
config = TrainConfig(out=args.out, model="hmode", model_kwargs={"width": args.width}, dataset="shanghaitech-b",
                     root=args.root, epochs=args.epochs, batch_size=d["batch_size"], lr=d["lr"], lr_step=d["lr_step"],
                     crop=d["crop"], resume=args.resume)
model = build_model(config.model, **config.model_kwargs)
train_set, val_set = build_datasets(config, warn=print)
summary = Trainer(model, model.criterion(), train_set, val_set, config).run()
print(f"{summary['status']} after {summary['epoch']} epochs; best validation MAE {summary['best']['mae']}")

counter = ck.load(f"{args.out}/best.pt")            # the best model, fed as it was trained; tiles huge images
test_set, note = evaluation_dataset(config, "val")  # ShanghaiTech B's test_data, unnormalized: the counter normalizes
metrics, _ = counter.evaluate(test_set, levels=DENSITY_LEVELS)
print(note, {k: metrics[k] for k in ("images", "mae", "mse", "nae", "game0", "game1", "game2", "game3")})
