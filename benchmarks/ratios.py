"""Prints one markdown table from one pytest-benchmark run's JSON:

    pytest benchmarks --benchmark-json=/tmp/b.json && python benchmarks/ratios.py /tmp/b.json

A row per case of the harness (op, device, size, mode, provider; benchmarks/harness.py): its median, its
peak memory, and two ratios within its (op, device, size, dtype, mode): "x reference" = the reference's
median / this median (the plain-PyTorch oracle of crowdkernels/ops/reference.py), "x baseline" = the issue's
baseline's median / this median (the provider marked "(baseline)", where it is not the reference), with the side-by-side `paired` ratio
where the run measured one. Ratios come from one run, side by side, because these machines are noisy.
Benchmarks outside the harness get a row each (op = their group), their extra_info as notes.
"""
import json
import sys
from collections import defaultdict

MODES = ("forward", "backward", "full")
HEADER = ("| op | device | size | mode | provider | median ms | peak MiB | x reference | x baseline | notes |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
SHOWN = {"op", "device", "dtype", "x", "size", "mode", "provider", "order", "baseline", "peak_MiB", "paired_ratio",
         "rounds", "threads"}


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.4g}" if ms < 1000 else f"{ms:,.0f}"


def _sort_key(x):
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))


def table(data: dict) -> str:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        e = b.get("extra_info", {})
        key = (e["op"], e["device"], e["dtype"], e["x"], e["mode"]) if "op" in e else (b.get("group") or b["name"],)
        groups[key].append(b)
    lines = [HEADER]

    def order(key):
        if len(key) == 1:
            return (1, key[0])
        op, device, dtype, x, mode = key
        return (0, op, device, dtype, _sort_key(x), MODES.index(mode) if mode in MODES else 9)

    for key in sorted(groups, key=order):
        items = sorted(groups[key], key=lambda b: b.get("extra_info", {}).get("order", 0))
        e0 = items[0].get("extra_info", {})
        ref = next((b for b in items if b.get("extra_info", {}).get("provider") == "reference"), None)
        base = next((b for b in items if b.get("extra_info", {}).get("baseline")), None)
        for b in items:
            e = b.get("extra_info", {})
            med = b["stats"]["median"]
            x_ref = f"{ref['stats']['median'] / med:.2f}" if ref and b is not ref else ""
            x_base = f"{base['stats']['median'] / med:.2f}" if base and b is not base and base is not ref else ""
            if "paired_ratio" in e:
                x_base += f" (paired {e['paired_ratio']})"
            notes = ", ".join(f"{k} {v}" for k, v in e.items() if k not in SHOWN)
            if len(key) == 1:
                op, device, size, mode, provider = key[0], "", "", "", b["name"]
            else:
                dtype = "" if e0["dtype"] == "float32" else f" {e0['dtype']}"
                op, device, size, mode, provider = e0["op"], e0["device"], e0["size"] + dtype, e0["mode"], e["provider"]
                provider = f"`{provider}`" + (" (baseline)" if e.get("baseline") else "")
            peak = e.get("peak_MiB", "")
            lines.append(f"| {op} | {device} | {size} | {mode} | {provider} | {_ms(med)} | {peak} | {x_ref} | "
                         f"{x_base} | {notes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
