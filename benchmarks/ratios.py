"""Prints, per benchmark group, each median and its ratio to the group's baseline, from one run's JSON:

    pytest benchmarks/bench_density.py --benchmark-json=/tmp/b.json && python benchmarks/ratios.py /tmp/b.json

A benchmark marks itself as the baseline with ``benchmark.extra_info["baseline"] = True``, or is a
parametrized case named eager, loop, released_structure or reference. Ratios come
from one run, side by side, because these machines are noisy.
"""
import json
import re
import sys
from collections import defaultdict


# the baseline ids of the parametrized benchmark files (eager composition, per-region loop, released
# code's structure, plain reference)
BASELINE_IDS = r"\[(eager|loop|released_structure|reference)[\]-]"


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or "-"].append(b)
    for group, items in sorted(groups.items()):
        base = next((b for b in items if b.get("extra_info", {}).get("baseline")), None)
        if base is None:  # parametrized files name their baseline implementation
            base = next((b for b in items if re.search(BASELINE_IDS, b["name"])), None)
        print(f"[{group}]")
        for b in sorted(items, key=lambda b: b["stats"]["median"], reverse=True):
            med = b["stats"]["median"]
            ratio = f"{base['stats']['median'] / med:9.1f}x" if base else ""
            extra = {k: v for k, v in b.get("extra_info", {}).items() if k != "baseline"}
            print(f"  {b['name']:<60} median {med * 1e3:11.3f} ms {ratio} {extra if extra else ''}")


if __name__ == "__main__":
    main(sys.argv[1])
