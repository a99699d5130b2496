"""``jacobian-lab inspect`` on the gallery's five models and on two built-in families the
GSC paper discusses (a plain exploding tanh MLP, a ResNet without normalization), each page
checked: every file it references exists and every figure is non-empty.

    python examples/inspect_all.py --out results/inspect [--only NAME ...]

Writes ``<out>/<name>/`` (the page, figures, JSON, CSV) and ``<out>/summary.md``: per model
its findings, and per remedy GSC(L, 0) and the growth rate before, after, and predicted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import jax

import jacobian_lab as jl
from jacobian_lab.experiments.cli import main as cli

HERE = pathlib.Path(__file__).resolve().parent
GALLERY = HERE / "gallery" / "run.py"
GALLERY_MODELS = ["mlp_jax", "resnet18_linen", "vit_equinox", "gpt2_nnx", "mixer_linen"]


def plain_tanh(key):
    """The GSC paper's plain tanh family, exploding (sigma_w = 2: chaotic), depth 20."""
    net = jl.mlp(20, 64, "tanh", sigma_w=2.0)
    return net, net.init(key), jax.random.normal(jax.random.fold_in(key, 1), (16, 64))


def resnet_no_norm(key):
    """A pre-activation ResNet without normalization: 10 ReLU blocks of two layers."""
    net = jl.resmlp(10, 64, "relu")
    return net, net.init(key), jax.random.normal(jax.random.fold_in(key, 1), (16, 64))


def check_page(folder: pathlib.Path) -> list[str]:
    """The page's problems: a referenced file missing or empty, a figure missing."""
    page = (folder / "inspection.html").read_text()
    problems = []
    refs = re.findall(r'(?:src|href)="([^"#:]+)"', page)
    if not any(r.endswith(".png") for r in refs):
        problems.append("no figure on the page")
    for name in refs:
        p = folder / name
        if not p.exists() or p.stat().st_size == 0:
            problems.append(f"{name} missing or empty")
    for png in folder.glob("*.png"):
        if not png.with_suffix(".pdf").exists():
            problems.append(f"{png.stem}.pdf missing")
    return problems


def _fmt(d: dict, key: str) -> str:
    v = d.get(key)
    return "-" if v is None else f"{v:.4g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/inspect"))
    ap.add_argument("--only", nargs="+", help="these models only")
    args = ap.parse_args(argv)
    specs = {name: f"{GALLERY}:{name}" for name in GALLERY_MODELS}
    specs |= {name: f"{__file__}:{name}" for name in ("plain_tanh", "resnet_no_norm")}
    lines = [
        "| model | findings | remedy | GSC(L, 0) before / after / predicted | "
        "growth rate before / after / predicted | s |",
        "|---|---|---|---|---|---|",
    ]
    failed = []
    for name, spec in specs.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        folder = args.out / name
        if cli(["inspect", spec, "--out", str(folder)]) != 0:
            failed.append(f"{name}: the command failed")
            continue
        problems = check_page(folder)
        failed += [f"{name}: {p}" for p in problems]
        data = json.loads((folder / "inspection.json").read_text())
        found = ", ".join(f["name"] for f in data["findings"]) or "none"
        secs = time.perf_counter() - t0
        for r in data["remedies"]:
            if not r["applies"]:
                lines.append(
                    f"| {name} | {found} | {r['name']}: no ({r['why']}) | | | {secs:.0f} |"
                )
                continue
            b, a, p = r["before"], r["after"], r["predicted"]
            lines.append(
                f"| {name} | {found} | {r['name']} | {_fmt(b, 'gsc_L')} / {_fmt(a, 'gsc_L')} / "
                f"{_fmt(p, 'gsc_L')} | {_fmt(b, 'growth_rate')} / {_fmt(a, 'growth_rate')} / "
                f"{_fmt(p, 'growth_rate')} | {secs:.0f} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for f in failed:
        print(f"PROBLEM {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
