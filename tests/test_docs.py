"""The documentation: the site builds with ``mkdocs build --strict``, every ``python`` code
block of README.md and docs/ runs as it stands, and the facts the pages state about the
code (a recipe that is the multi-host test's, the coverage table's place, the analysis
and gallery pages' generators) stay true.

The build runs with ``JACOBIAN_LAB_DOCS_FAST=1`` (the gallery's examples are not
executed: that takes minutes) and without a report run (the analysis pages then say how
to produce one); the generators are tested on their own below, the analysis pages on a
small synthetic report folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, CodeBlock, all_blocks, blocks_of, run_blocks

BLOCKS = all_blocks()
HOOKS = ROOT / "docs" / "hooks"


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_mkdocs = pytest.mark.skipif(
    not _has("mkdocs", "material", "mkdocstrings_handlers.python"),
    reason="the docs tools are not installed: pip install -e '.[docs]' (the test extra "
    "includes them)",
)


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", HOOKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# -- the site --------------------------------------------------------------------------------


@needs_mkdocs
def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict``: no broken link, no docstring the reference cannot render,
    no argument documented that a function does not have."""
    env = {
        **os.environ,
        "JACOBIAN_LAB_DOCS_FAST": "1",
        "JACOBIAN_LAB_DOCS_RESULTS": str(tmp_path / "no-report"),
        "NO_MKDOCS_2_WARNING": "1",
    }
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    gsc = (site / "reference" / "gsc" / "index.html").read_text()
    assert 'id="jacobian_lab.gsc.gsc"' in gsc
    for section in ("Parameters:", "Returns:", "Raises:"):
        assert section in gsc, section
    # the docstrings' roles became links into the reference
    assert 'href="../models/#jacobian_lab.driver.prepare"' in gsc
    guide = (site / "guides" / "indexing" / "index.html").read_text()
    assert '<div class="highlight">' in guide  # highlighted by Pygments
    assert '<span class="kn">import</span>' in guide
    # without a report run the analysis pages say how to make one
    assert (
        "jacobian-lab report --size small"
        in (site / "analyses" / "path_lengths" / "index.html").read_text()
    )
    # the coverage table is included from the README
    assert "<code>attention_entropy</code>" in (site / "coverage" / "index.html").read_text()
    for page in ("gpt2_nnx", "equinox_mlp"):
        assert (site / "gallery" / page / "index.html").is_file()


# -- the code blocks -------------------------------------------------------------------------


# blocks that check the runner itself (run in the same process as the docs' blocks)
SELF_TEST = [
    CodeBlock("self-test.md", 1, "import math\nassert math.pi > 3\n", True),
    CodeBlock("self-test.md", 5, "raise ValueError('from the block')\n", True),
    CodeBlock("self-test.md", 9, "print(math)\n", True),  # math was another block's import
]


@pytest.fixture(scope="module")
def block_results():
    """Every block run once, in one fresh process (see tests/doc_blocks.py)."""
    return run_blocks(BLOCKS + SELF_TEST)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.run], ids=lambda b: b.id)
def test_code_block_runs(block, block_results):
    """Each ``python`` block of README.md and docs/ runs on its own, as a script would (a
    fresh namespace, 64-bit JAX off); ``<!-- no-test -->`` above a block skips it."""
    error = block_results[block.id]["error"]
    assert error is None, f"{block.id}:\n{block.code}\n{error}"


def test_blocks_found_and_skipped_sparingly():
    """The extraction sees the README's and the guides' blocks, and ``no-test`` is kept for
    what a test cannot run (the multi-host launch)."""
    guides = [b for b in BLOCKS if b.path.startswith("docs/guides/")]
    assert len(guides) >= 8 and any(b.path == "README.md" for b in BLOCKS)
    skipped = [b.id for b in BLOCKS if not b.run]
    assert [s.split(":")[0] for s in skipped] == ["docs/scale.md"], skipped


def test_no_test_marker(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
    )
    rel = Path(os.path.relpath(page, ROOT))
    got = blocks_of(ROOT / rel)
    assert [(b.code, b.run) for b in got] == [("x = 1\n", True), ("raise SystemExit\n", False)]


def test_block_runner_reports_failures(block_results):
    """A failing block is reported with its error, and blocks share no namespace."""
    assert block_results["self-test.md:1"]["error"] is None
    assert "from the block" in block_results["self-test.md:5"]["error"]
    assert "NameError" in block_results["self-test.md:9"]["error"]


# -- facts the pages state -------------------------------------------------------------------


def test_readme_is_a_landing_page():
    """The README stays short and keeps its two quick-start commands with their times, the
    coverage table between its markers (tests/test_coverage.py checks its content) inside
    the section the docs include, the dependencies, and the docs build command."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for line in (
        "pip install -e . && jacobian-lab report --out results/report",
        "(~24 min on 2 CPU cores; ~9 min again, with the compilation cache)",
        "pip install -e '.[test]' && python -m pytest -q",
        "(~10 min on 2 idle CPU cores, longer on a busy machine)",
        "pip install -e '.[docs]' && mkdocs serve",
        "## Dependencies",
        "**jax/jaxlib 0.10.2 is excluded.**",
    ):
        assert line in text, line
    start, end = "<!-- --8<-- [start:coverage] -->", "<!-- --8<-- [end:coverage] -->"
    table = text[text.index(start) : text.index(end)]
    assert "<!-- coverage table: python tests/test_coverage.py -->" in table
    assert "<!-- end coverage table -->" in table
    for link in ("docs/guides/indexing.md", "docs/analyses/index.md", "docs/reference/index.md"):
        assert (ROOT / link).is_file() and link in text, link


def test_every_analysis_has_a_page():
    """One page per analysis of the registry, each with the marker the hook fills, and
    each in the site's navigation."""
    from jacobian_lab.experiments.registry import ANALYSES

    nav = (ROOT / "mkdocs.yml").read_text()
    for name in ANALYSES:
        page = ROOT / "docs" / "analyses" / f"{name}.md"
        assert f"<!-- analysis: {name} -->" in page.read_text(), name
        assert f"analyses/{name}.md" in nav, name


def _fake_report(folder: Path, name: str, config: dict) -> None:
    """A report folder as run_analysis writes it: <name>.json with verdicts, a CSV, a PNG."""
    sub = folder / name
    sub.mkdir(parents=True)
    verdicts = [
        {
            "claim": "Short paths carry the gradient",
            "holds": True,
            "measured": "mean 3.5",
            "claims": ["D2.2"],
        },
        {"claim": "Without norm too", "holds": False, "measured": "mean 5.8", "claims": ["D2.2"]},
    ]
    payload = {
        "analysis": name,
        "config": config,
        "jacobian_lab": "0.1.0",
        "jax": "0.10.1",
        "device": "cpu:0",
        "data": {},
        "verdicts": verdicts,
    }
    (sub / f"{name}.json").write_text(json.dumps(payload))
    (sub / f"{name}.csv").write_text("a,b\n1,2\n")
    (sub / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def test_analysis_pages_read_the_saved_run(tmp_path):
    """The analysis hook renders a page from the saved JSON (verdicts, preset, figure and
    data links) and, where an analysis has no results, says how to produce them."""
    pytest.importorskip("mkdocs")
    hook = _hook("analyses")
    from jacobian_lab.experiments.registry import ANALYSES

    tiny = ANALYSES["path_lengths"].sizes["tiny"]
    _fake_report(tmp_path, "path_lengths", json.loads(json.dumps(tiny)))
    page = hook.analysis_markdown("path_lengths", tmp_path, hook.load(tmp_path, "path_lengths"))
    assert ANALYSES["path_lengths"].claim in page
    assert "size `tiny`" in page and "1 of 2 verdicts hold" in page
    assert "**✔ holds**: Short paths carry the gradient (claims D2.2). mean 3.5" in page
    assert "![path_lengths: path_lengths](path_lengths/path_lengths.png)" in page
    assert "[path_lengths.csv](path_lengths/path_lengths.csv)" in page
    missing = hook.analysis_markdown("pythagorean", tmp_path, hook.load(tmp_path, "pythagorean"))
    assert "jacobian-lab report --size small --analyses pythagorean --out results/report" in (
        missing
    )
    payloads = {n: hook.load(tmp_path, n) for n in ANALYSES}
    claims = hook.claims_markdown(tmp_path, payloads)
    assert "1 of 2 verdicts hold" in claims
    assert "| D2.2 |" in claims and "mixed (1 of 2 verdicts support it)" in claims


def test_gallery_pages_without_running(tmp_path, monkeypatch):
    """The gallery hook, with JACOBIAN_LAB_DOCS_FAST=1 and no cached run, writes every page
    (description, command, source) without executing anything."""
    pytest.importorskip("mkdocs")
    hook = _hook("gallery")
    nav = (ROOT / "mkdocs.yml").read_text()
    for slug, page in hook.PAGES.items():
        assert f"gallery/{slug}.md" in nav, slug
        run = hook.Run("python " + page.source)
        md, assets = hook.page_markdown(ROOT, slug, page, run)
        assert md.startswith(f"# {page.title}") and "Not executed in this build" in md
        assert (ROOT / page.source).read_text().splitlines()[0] in md  # the source is shown
        assert assets == []
    argv, _ = hook.jobs()["gallery"]
    assert argv[0] == "examples/gallery/run.py" and "--size" in argv


def test_grouped_arguments_become_one_entry_each():
    """``net, params, x: ...`` in an Args section renders as one row per parameter (so the
    reference shows each one's type and default, and griffe checks each name)."""
    pytest.importorskip("griffe")
    hook = _hook("sphinx_roles")
    text = (
        "Doc.\n\nArgs:\n    net, params, x: any model, its params\n        and inputs.\n"
        "    log: logs.\n\nReturns:\n    g.\n"
    )
    assert hook.split_grouped_arguments(text) == (
        "Doc.\n\nArgs:\n    net: any model, its params\n        and inputs.\n"
        "    params: See ``net``.\n    x: See ``net``.\n    log: logs.\n\nReturns:\n    g.\n"
    )
