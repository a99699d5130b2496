"""Compare two report folders analysis by analysis: the verdicts (holds, and the measured
text as printed) and every saved number.

    python benchmarks/compare_reports.py OLD_FOLDER NEW_FOLDER

A folder is a ``jacobian-lab report --out`` folder (or ``build/profile_runs`` of
``profile_compile.py``): ``<analysis>/<analysis>.json`` each. One line per analysis: whether
the verdicts agree, how many numbers the two share, and the largest relative difference
among them (NaN and infinities skipped); ``--worst N`` lists the N largest.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib


def numbers(x, path: str = ""):
    """``(path, value)`` of every number in a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, int | float) and not isinstance(x, bool):
        yield path, float(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=pathlib.Path)
    ap.add_argument("new", type=pathlib.Path)
    ap.add_argument("--worst", type=int, default=0)
    args = ap.parse_args(argv)
    differ = 0
    for f in sorted(args.old.glob("*/*.json")):
        g = args.new / f.parent.name / f.name
        if not g.exists():
            print(f"{f.parent.name}: not in {args.new}")
            differ += 1
            continue
        a, b = json.loads(f.read_text()), json.loads(g.read_text())
        va, vb = (
            [(v["claim"], v["holds"], v["measured"]) for v in d.get("verdicts", [])] for d in (a, b)
        )
        na, nb = dict(numbers(a.get("data", {}))), dict(numbers(b.get("data", {})))
        rel = []
        for k in na.keys() & nb.keys():
            x, y = na[k], nb[k]
            if math.isfinite(x) and math.isfinite(y) and max(abs(x), abs(y)) > 0:
                rel.append((abs(x - y) / max(abs(x), abs(y)), k, x, y))
        rel.sort(reverse=True)
        differ += va != vb
        print(
            f"{f.parent.name}: verdicts {'same' if va == vb else 'DIFFER'}; "
            f"{len(na.keys() & nb.keys())} numbers shared of {len(na)} / {len(nb)}, largest "
            f"relative difference {rel[0][0] if rel else 0.0:.2e}"
        )
        for r in rel[: args.worst]:
            print(f"    {r[1]}: {r[2]!r} vs {r[3]!r}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
