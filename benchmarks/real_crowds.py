"""The recipes on real crowds, from random weights, on one CPU core each: does REL help? (issue 22)

Trains each arm below on ``ShanghaiTech-full/part_B`` (400 training images; 40 of them held out with
``--val-from-train 0.1 --seed 640``, the same 40 for every arm), at width 0.25 with images capped at 512 px,
for a fixed number of optimizer steps (the same work on any machine; each arm's budget is about 15 minutes
of one idle core of the 2-core machine the figures in ``benchmarks/RESULTS.md`` come from), validating on
the held-out images every ``--every`` steps (a run stopped by ``--max-steps`` is saved, validated and
resumed exactly, so the chunks are one uninterrupted run). A pair that compares REL gets the same budget,
seed and held-out images. Then it writes the table of ``RESULTS.md`` and the learning curves (a PNG).

    python benchmarks/real_crowds.py --root ../shared/data/ShanghaiTech-full --out runs/real-crowds --jobs 2
    python benchmarks/real_crowds.py --out runs/real-crowds --report      # the table and the picture only

Runs are resumable: a second call continues each arm where it stopped. ``--arms`` picks arms by name.
Not a pytest benchmark (it takes hours of CPU); nothing in CI runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: what every arm shares: the held-out split, the size of the model and of the images, one process
COMMON = ["--dataset", "shanghaitech-b", "--width", "0.25", "--max-size", "512", "--val-from-train", "0.1",
          "--seed", "640", "--workers", "0", "--val-start", "1"]

#: name -> (recipe flags, step budget, validation every N steps). "hmode-paper" is the recipe as it stands (the
#: released code's summed losses; REL on the windows' mean densities at eq. 4's unit weight); the other hmode
#: arms change one thing: no REL; REL on raw window counts as eq. 2 prints it; or, beside that REL, eq. 3 and
#: eq. 5 as printed (per-pixel means), the reading that collapsed on the 24 samples.
_RAW_REL = ["--set", 'criterion_kwargs.rel_normalize="none"']
_AS_PRINTED = [*_RAW_REL, "--set", 'criterion_kwargs.reduction="mean"', "--set", 'criterion_kwargs.attention_reduction="mean"',
               "--set", "criterion_kwargs.per_batch=false"]
CSRNET_STEPS, CSRNET_EVERY = 6000, 750  # 0.14 s a step on one idle core: 15 minutes with 8 validations
L2SM_STEPS, L2SM_EVERY = 1080, 180  # 0.75 s a step (whole images): 15 minutes with 6 validations
ARMS = {
    "hmode-paper": (["--recipe", "hmode-paper"], 3600, 360),
    "hmode-paper --no-rel": (["--recipe", "hmode-paper", "--no-rel"], 3600, 360),
    "hmode-paper, REL on raw counts": (["--recipe", "hmode-paper", *_RAW_REL], 3600, 360),
    "hmode-paper, eq. 2, 3 and 5 as printed": (["--recipe", "hmode-paper", *_AS_PRINTED], 1440, 360),
    "csrnet": (["--recipe", "csrnet"], CSRNET_STEPS, CSRNET_EVERY),
    "csrnet --rel": (["--recipe", "csrnet", "--rel"], CSRNET_STEPS, CSRNET_EVERY),
    "l2sm-paper": (["--recipe", "l2sm-paper"], L2SM_STEPS, L2SM_EVERY),
}


def _folder(out: Path, arm: str) -> Path:
    return out / re.sub("_+", "_", "".join(c if c.isalnum() else "_" for c in arm)).strip("_")


def _reached(run: Path) -> int:
    """The global step of the run's last log entry (0 for none)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return 0
    steps = [json.loads(line).get("global_step", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def train_arm(arm: str, root: str, out: Path) -> None:
    flags, budget, every = ARMS[arm]
    run = _folder(out, arm)
    cpu_file = run.parent / (run.name + ".cpu.json")
    cpu = json.loads(cpu_file.read_text()) if cpu_file.is_file() else {"seconds": 0.0}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while (done := _reached(run)) < budget:
        target = min(budget, (done // every + 1) * every)
        cmd = [sys.executable, "-m", "crowdkernels", "train", *COMMON, *flags, "--root", root, "--out", str(run),
               "--max-steps", str(target)] + (["--resume"] if (run / "last.pt").is_file() else [])
        print(f"[{arm}] steps {done} -> {target}", file=sys.stderr, flush=True)
        with open(run.parent / (run.name + ".log"), "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"[{arm}] {' '.join(cmd)} failed (status {status}); see {run}.log")
        cpu["seconds"] += usage.ru_utime + usage.ru_stime
        cpu_file.write_text(json.dumps(cpu))


def _entries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def report(out: Path, png: Path | None) -> str:
    rows = ["| arm | steps | CPU s | best held-out MAE (step) | its MSE | final MAE | final MSE | baseline MAE |",
            "|---|---|---|---|---|---|---|---|"]
    curves = {}
    for arm in ARMS:
        run = _folder(out, arm)
        if not (run / "log.jsonl").is_file():
            continue
        vals = [(e["global_step"], e["val"]) for e in _entries(run) if e.get("val") and e["val"].get("mae") is not None]
        if not vals:
            continue
        curves[arm] = [(s, v["mae"]) for s, v in vals]
        best_step, best = min(vals, key=lambda sv: sv[1]["mae"])
        last_step, last = vals[-1]
        cpu_file = run.parent / (run.name + ".cpu.json")
        cpu = f"{json.loads(cpu_file.read_text())['seconds']:.0f}" if cpu_file.is_file() else "not recorded"
        rows.append(f"| `{arm}` | {last_step} | {cpu} | **{best['mae']:.2f}** ({best_step}) | {best['mse']:.2f} | "
                    f"{last['mae']:.2f} | {last['mse']:.2f} | {last.get('baseline_mae', float('nan')):.2f} |")
        baseline = last.get("baseline_mae")
    table = "\n".join(rows) + "\n"
    if png is not None and curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        families = [("hmode", "hmode-paper"), ("csrnet", "csrnet"), ("l2sm", "l2sm-paper")]
        fig, axes = plt.subplots(1, len(families), figsize=(15, 4.2), dpi=100)
        for ax, (key, title) in zip(axes, families):
            for arm, pts in curves.items():
                if arm.startswith(key):
                    ax.plot(*zip(*pts), "o-", markersize=3, label=arm)
            if baseline is not None:
                ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label=f"mean-count baseline {baseline:.1f}")
                ax.axhline(baseline / 2, color="gray", linestyle=":", linewidth=1, label="half the baseline")
            ax.set_title(f"{title}: held-out MAE, SHB (40 images)")
            ax.set_xlabel("optimizer steps (batch as the recipe)")
            ax.set_ylabel("MAE (heads)")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="the ShanghaiTech-full folder (holding part_B/train_data)")
    p.add_argument("--out", type=Path, required=True, help="where the runs go")
    p.add_argument("--arms", nargs="*", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--jobs", type=int, default=1, help="arms trained at once (one core each)")
    p.add_argument("--report", action="store_true", help="only write the table and the picture")
    p.add_argument("--png", type=Path, default=None, help="the learning curves (default: OUT/curves.png)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        if not args.root:
            p.error("--root is required to train")
        t0 = time.time()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for f in [pool.submit(train_arm, arm, args.root, args.out) for arm in args.arms]:
                f.result()
        print(f"trained in {time.time() - t0:.0f} s", file=sys.stderr)
    print(report(args.out, args.png or args.out / "curves.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
