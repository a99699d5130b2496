"""MkDocs hook: the executed gallery, one page per example under ``examples/``.

Each page shows what the example is (its module docstring), the command that ran, what it
printed, the figures it drew, and its source. The examples run when the docs are built, at
a small size (the arguments in :data:`SCRIPTS`; the gallery models of
``examples/gallery/run.py`` at ``--size`` :data:`GALLERY_SIZE`), in a subprocess each, and
their output goes into the built site. A failing example fails the build (a warning, an
error under ``--strict``).

* ``JACOBIAN_LAB_DOCS_FAST=1`` runs nothing (quick builds, the test suite): a page then
  shows the output of an earlier build with the same code if one is cached, else says how
  to run the example.
* Runs are cached in ``build/docs-gallery/`` by a hash of the command and of every Python
  file under ``examples/`` and ``jacobian_lab/``: ``mkdocs serve`` reruns an example only
  after the code changed. ``JACOBIAN_LAB_DOCS_RERUN=1`` ignores the cache.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mkdocs.structure.files import File, Files

LOG = logging.getLogger("mkdocs.plugins.jacobian_lab.gallery")
FAST = "JACOBIAN_LAB_DOCS_FAST"
RERUN = "JACOBIAN_LAB_DOCS_RERUN"
GALLERY_SIZE = "tiny"
TIMEOUT_S = 900


@dataclass(frozen=True)
class Page:
    """One gallery page: the example ``source``, run by ``job`` (a key of :func:`jobs`)."""

    title: str
    source: str
    job: str
    models: tuple[str, ...] = ()  # gallery models shown on this page (run.py's names)


PAGES = {
    "resnet18_linen": Page(
        "Flax linen ResNet-18",
        "examples/gallery/resnet18_linen.py",
        "gallery",
        ("resnet18_linen", "resnet18_linen_batch_stats"),
    ),
    "vit_equinox": Page(
        "Equinox ViT", "examples/gallery/vit_equinox.py", "gallery", ("vit_equinox",)
    ),
    "gpt2_nnx": Page("Flax NNX GPT", "examples/gallery/gpt2_nnx.py", "gallery", ("gpt2_nnx",)),
    "mlp_jax": Page("Plain-JAX MLP", "examples/gallery/mlp_jax.py", "gallery", ("mlp_jax",)),
    "mixer_linen": Page(
        "Flax linen MLP-Mixer", "examples/gallery/mixer_linen.py", "gallery", ("mixer_linen",)
    ),
    "equinox_mlp": Page("Equinox MLP vs the zoo", "examples/equinox_mlp.py", "equinox_mlp"),
    "flax_resnet": Page("Flax ResNet vs the zoo", "examples/flax_resnet.py", "flax_resnet"),
    "flax_transformer": Page(
        "Flax NNX transformer", "examples/flax_transformer.py", "flax_transformer"
    ),
}

# the small sizes the docs run the examples at (their defaults are the papers' sizes)
SCRIPTS = {
    "equinox_mlp": ("examples/equinox_mlp.py", "--depth 16 --width 32 --seeds 2 --batch 4"),
    "flax_resnet": ("examples/flax_resnet.py", "--blocks 8 --width 32 --seeds 2 --batch 4"),
    "flax_transformer": (
        "examples/flax_transformer.py",
        "--blocks 3 --width 16 --heads 2 --tokens 8 --seeds 2 --batch 2",
    ),
}


@dataclass
class Run:
    """One executed job: its command as shown, output, figures, and how long it took."""

    shown: str
    output: str = ""
    folder: Path | None = None
    seconds: float = 0.0
    cached: bool = False
    ran: bool = False
    figures: dict = field(default_factory=dict)


def jobs() -> dict[str, tuple[list[str], str]]:
    """``job -> (arguments after python, nominal --out shown on the page)``."""
    out = {
        name: ([script, *args.split()], f"results/examples/{name}")
        for name, (script, args) in SCRIPTS.items()
    }
    models = [m for p in PAGES.values() if p.job == "gallery" for m in p.models]
    out["gallery"] = (
        ["examples/gallery/run.py", "--models", *models, "--size", GALLERY_SIZE],
        "results/gallery",
    )
    return out


def code_hash(root: Path, argv: list[str]) -> str:
    h = hashlib.sha256(" ".join(argv).encode())
    for folder in ("examples", "jacobian_lab"):
        for path in sorted((root / folder).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def execute(root: Path, name: str, argv: list[str], nominal: str, fast: bool) -> Run:
    """Run (or read from the cache) one job; see the module docstring."""
    shown = "python " + " ".join([*argv, "--out", nominal])
    cache = root / "build" / "docs-gallery" / f"{name}-{code_hash(root, argv)}"
    meta = cache / "meta.json"
    if meta.is_file() and not os.environ.get(RERUN):
        info = json.loads(meta.read_text())
        return Run(shown, info["output"], cache / "out", info["seconds"], cached=True)
    if fast:
        return Run(shown)
    for old in cache.parent.glob(f"{name}-*"):  # runs of older code
        shutil.rmtree(old)
    (cache / "out").mkdir(parents=True)
    LOG.info(f"gallery: running {shown}")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv, "--out", str(cache / "out")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    seconds = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).replace(str(cache / "out"), nominal)
    if proc.returncode != 0:
        LOG.warning(f"gallery: {shown} failed (exit {proc.returncode}):\n{output[-3000:]}")
        return Run(shown, output, None, seconds, ran=True)
    meta.write_text(json.dumps({"output": output, "seconds": seconds}))
    return Run(shown, output, cache / "out", seconds, ran=True)


def docstring(path: Path) -> str:
    """The module docstring as Markdown (roles as code, ``::`` as ``:``)."""
    text = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = re.sub(r":\w+:`~?([^`]+)`", r"``\1``", text)
    text = re.sub(r"(?m)^\s*::\s*$", "", text)
    return re.sub(r"(?m)(?<=\S)::\s*$", ":", text)


def section_of(output: str, model: str) -> str:
    """The lines run.py printed for ``model`` (from its ``[i/n] model`` line to the next)."""
    keep, lines = False, []
    for line in output.splitlines():
        if re.match(r"\[\d+/\d+\] ", line):
            keep = line.split()[1] == model
        if keep:
            lines.append(line)
    return "\n".join(lines)


def figure_order(path: Path) -> tuple:
    """The profile first, then the all-pairs matrix, then the rest by name."""
    first = ("gsc_profile", "gsc_matrix")
    return (first.index(path.stem) if path.stem in first else len(first), path.stem)


def fenced(text: str, lang: str = "text", indent: str = "") -> str:
    body = "\n".join(indent + line if line else line for line in text.rstrip().splitlines())
    return f"{indent}```{lang}\n{body}\n{indent}```"


def page_markdown(root: Path, slug: str, page: Page, run: Run) -> tuple[str, list[tuple]]:
    """The page for ``slug`` and the files it shows ``[(site uri, path)]``."""
    src = root / page.source
    md = [f"# {page.title}", "", docstring(src), ""]
    shown = run.shown
    if page.models:
        nominal = shown.split("--out ")[-1]
        shown = (
            f"python {page.source.rsplit('/', 1)[0]}/run.py --models {' '.join(page.models)} "
            f"--size {GALLERY_SIZE} --out {nominal}"
        )
        md += [
            f"Run for this page (at size `{GALLERY_SIZE}`; the build runs every gallery model "
            "in one process), from the repository root:",
            "",
        ]
    else:
        md += [
            "Run for this page (a small size; the defaults are the papers'), from the "
            "repository root:",
            "",
        ]
    md += [fenced(shown, "bash"), ""]
    assets: list[tuple] = []
    if run.folder is None:
        if run.ran:
            md += [
                '!!! failure "The example failed in this build"',
                "",
                fenced(run.output[-3000:], indent="    "),
                "",
            ]
        else:
            md += [
                '!!! note "Not executed in this build"',
                f"    This build ran with `{FAST}=1`, which skips the examples. Run the "
                "command above (or build the docs without the variable) to see its output "
                "and figures here.",
                "",
            ]
    else:
        when = "cached from an earlier build of the same code" if run.cached else "this build"
        total = "all gallery models" if page.models else "the example"
        md += [f"Output ({when}; {run.seconds:.0f} s for {total}):", ""]
        folders = [run.folder / m for m in page.models] if page.models else [run.folder]
        for model, folder in zip(page.models or (None,), folders, strict=True):
            if model is not None:
                md += [f"## `{model}`", "", fenced(section_of(run.output, model)), ""]
                numbers = folder / "numbers.json"
                if numbers.is_file():
                    data = json.loads(numbers.read_text())
                    md += [
                        "What `jl.chain` found: layer outputs "
                        + ", ".join(f"`{n}`" for n in data["names"])
                        + (
                            f"; batch-coupled: {data['batch_coupled']}."
                            if data.get("batch_coupled")
                            else "."
                        ),
                        "",
                    ]
                    md += [f"- {line}" for line in data.get("report", [])] + [""]
            else:
                md += [fenced(run.output), ""]
            for fig in sorted(folder.glob("*.png"), key=figure_order):
                sub = f"{slug}/{model}" if model else slug
                uri = f"gallery/{sub}/{fig.name}"
                assets.append((uri, fig))
                rel = uri.removeprefix("gallery/")
                md += [f"![{fig.stem}]({rel})", ""]
    md += [
        f'??? example "Source: {page.source}"',
        "",
        fenced(src.read_text(), "python", "    "),
        "",
    ]
    return "\n".join(md), assets


def on_files(files: Files, config, **kwargs) -> Files:
    root = Path(config.config_file_path).parent
    fast = bool(os.environ.get(FAST))
    runs = {}
    start = time.perf_counter()
    for name, (argv, nominal) in jobs().items():
        runs[name] = execute(root, name, argv, nominal, fast)
    if not fast:
        LOG.info(f"gallery: examples ready in {time.perf_counter() - start:.1f} s")
    for slug, page in PAGES.items():
        md, assets = page_markdown(root, slug, page, runs[page.job])
        uri = f"gallery/{slug}.md"
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, uri, content=md))
        for asset_uri, path in assets:
            files.append(File.generated(config, asset_uri, abs_src_path=str(path)))
    return files
