"""MkDocs hook: the analysis pages' claims, verdicts and figures, read from a report run.

``jacobian-lab report --out DIR`` writes, per analysis, ``DIR/<name>/<name>.json`` (config,
library versions, device, the summarized numbers and the verdicts) and the figures drawn
from it (``DIR/<name>/*.png``). This hook reads them, never recomputes anything, and fills
the markers of the hand-written pages under ``docs/analyses/``:

* ``<!-- analysis: NAME -->`` on an analysis page: the claim and notes (from the analysis
  itself, :data:`jacobian_lab.experiments.registry.ANALYSES`), the run it was measured in
  (date, size preset or config, versions, device), each verdict with its measured line,
  the figures and the saved data files;
* ``<!-- claims table -->`` on ``analyses/index.md``: the claims table that opens the
  report (:func:`jacobian_lab.experiments.claims.claims_table`) and the verdict count.

The results folder is ``$JACOBIAN_LAB_DOCS_RESULTS``, else ``results/report`` beside
``mkdocs.yml``. Where an analysis has no results there, its page says how to produce them
instead of failing.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

from mkdocs.structure.files import File, Files

ENV = "JACOBIAN_LAB_DOCS_RESULTS"
DEFAULT = "results/report"
MARK = re.compile(r"<!--\s*analysis:\s*(\w+)\s*-->")
CLAIMS_MARK = "<!-- claims table -->"
SITE_DIR = "analyses"  # figures and data land under analyses/<name>/ in the site

_state: dict = {}


def results_dir(config) -> Path:
    """The report folder the pages are read from."""
    root = Path(config.config_file_path).parent
    return (root / os.environ.get(ENV, DEFAULT)).resolve()


def registry() -> dict:
    from jacobian_lab.experiments.registry import ANALYSES

    return ANALYSES


def load(results: Path, name: str) -> dict | None:
    """The saved JSON of analysis ``name`` (with its verdicts), or None."""
    path = results / name / f"{name}.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if "verdicts" not in payload:  # written before its figures and verdicts: unfinished
        return None
    payload["_path"] = path
    return payload


def size_of(analysis, config: dict) -> str:
    """The preset whose config was run (``tiny``, ``small``, ``paper``), or ``custom``."""
    for size, preset in analysis.sizes.items():
        if json.loads(json.dumps(preset)) == config:
            return size
    return "custom"


def how_to_produce(name: str, results: Path) -> str:
    return (
        '!!! warning "No results in this build"\n'
        f"    This page's verdicts and figures are read from a report run, and there is none "
        f"in `{results}/{name}/`. Produce them with\n\n"
        "    ```bash\n"
        f"    jacobian-lab report --size small --analyses {name} --out results/report\n"
        "    ```\n\n"
        "    (all twelve analyses: `jacobian-lab report --size small --out results/report`, "
        "about 10 min on 2 CPU cores) and rebuild the docs; `JACOBIAN_LAB_DOCS_RESULTS=DIR` "
        "reads another report folder.\n"
    )


def analysis_markdown(name: str, results: Path, payload: dict | None) -> str:
    """The generated part of an analysis page (see the module docstring)."""
    analysis = registry()[name]
    parts = [f"**Claim.** {analysis.claim}", ""]
    if payload is None:
        parts += [how_to_produce(name, results)]
        if analysis.notes:
            parts += [f"*Notes.* {analysis.notes}", ""]
        return "\n".join(parts)
    path: Path = payload["_path"]
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    size = size_of(analysis, payload["config"])
    held = sum(v["holds"] for v in payload["verdicts"])
    parts += [
        f"**Measured** ({held} of {len(payload['verdicts'])} verdicts hold), in the run saved "
        f"in `{path.parent}` on {stamp}: size `{size}`, jacobian_lab "
        f"{payload.get('jacobian_lab', '?')}, jax {payload.get('jax', '?')}, "
        f"device {payload.get('device', '?')}.",
        "",
    ]
    for v in payload["verdicts"]:
        mark = "✔ holds" if v["holds"] else "✘ does not hold"
        tags = f" (claims {', '.join(v['claims'])})" if v.get("claims") else ""
        parts += [f"- **{mark}**: {v['claim']}{tags}. {v['measured']}"]
    parts += [""]
    if analysis.notes:
        parts += [f"*Notes.* {analysis.notes}", ""]
    for fig in sorted(path.parent.glob("*.png")):
        parts += [f"![{name}: {fig.stem}]({name}/{fig.name})", ""]
    data = [p for p in (path, path.with_suffix(".csv")) if p.is_file()]
    links = ", ".join(f"[{p.name}]({name}/{p.name})" for p in data)
    parts += [
        f"Data: {links}. Config:",
        "",
        "```json",
        json.dumps(payload["config"], indent=1),
        "```",
        "",
    ]
    return "\n".join(parts)


def claims_markdown(results: Path, payloads: dict) -> str:
    """The claims table from the verdicts of every analysis that has results."""
    from jacobian_lab.experiments.claims import claims_table
    from jacobian_lab.experiments.report import Verdict

    found = [
        SimpleNamespace(
            name=n,
            verdicts=[
                Verdict(v["claim"], v["holds"], v["measured"], tuple(v["claims"]))
                for v in p["verdicts"]
            ],
        )
        for n, p in payloads.items()
        if p is not None
    ]
    missing = [n for n, p in payloads.items() if p is None]
    if not found:
        return (
            '!!! warning "No results in this build"\n'
            f"    The claims table is read from a report run, and there is none in "
            f"`{results}`. Produce it with\n\n"
            "    ```bash\n    jacobian-lab report --size small --out results/report\n    ```\n\n"
            "    (about 10 min on 2 CPU cores) and rebuild the docs; "
            "`JACOBIAN_LAB_DOCS_RESULTS=DIR` reads another report folder.\n"
        )
    held = sum(v.holds for r in found for v in r.verdicts)
    total = sum(len(r.verdicts) for r in found)
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    rows = [
        f"| {c.id} | {cell(c.text)} ({c.source}) | "
        + (", ".join(f"[{a}]({a}.md)" for a in c.analyses) or "-")
        + f" | {c.status} | {cell(c.evidence)} |"
        for c in claims_table(found)
    ]
    note = f" Not in this run: {', '.join(f'[{n}]({n}.md)' for n in missing)}." if missing else ""
    return "\n".join(
        [
            f"Read from the report run in `{results}`: {held} of {total} verdicts hold.{note}",
            "",
            "| id | claim | measured by | verdict | key number |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def on_config(config, **kwargs):
    _state["results"] = results_dir(config)
    _state["payloads"] = {n: load(_state["results"], n) for n in registry()}
    return config


def on_files(files: Files, config, **kwargs) -> Files:
    """Copy each analysis's figures and data files into the site."""
    for name, payload in _state["payloads"].items():
        if payload is None:
            continue
        folder = payload["_path"].parent
        for path in sorted(folder.iterdir()):
            if path.suffix in (".png", ".json", ".csv") and path.is_file():
                uri = f"{SITE_DIR}/{name}/{path.name}"
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if not page.file.src_uri.startswith(f"{SITE_DIR}/"):
        return markdown
    results, payloads = _state["results"], _state["payloads"]
    markdown = MARK.sub(
        lambda m: analysis_markdown(m.group(1), results, payloads[m.group(1)]), markdown
    )
    if CLAIMS_MARK in markdown:
        markdown = markdown.replace(CLAIMS_MARK, claims_markdown(results, payloads))
    return markdown
