"""The main job end to end: ``jacobian-lab report`` at the tiny size into a temporary folder,
its files, its verdicts on facts that hold even at that size, resuming, and bad input."""

import json
import re

import pytest

from jacobian_lab.experiments.cli import main
from jacobian_lab.experiments.registry import ANALYSES

TINY = ["report", "--size", "tiny"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def _data(out, name):
    return json.loads((out / name / f"{name}.json").read_text())


def test_report_has_every_analysis_with_figures_data_and_verdicts(report):
    page = (report / "report.html").read_text()
    md = (report / "report.md").read_text()
    assert len(ANALYSES) == 12
    for name, analysis in ANALYSES.items():
        assert analysis.title in page and analysis.title in md
        payload = _data(report, name)
        assert payload["config"]["seeds"] >= 1 and payload["jacobian_lab"]
        assert payload["verdicts"], f"{name} states no verdict"
        assert (report / name / f"{name}.csv").read_text().count("\n") >= 2
        pngs = list((report / name).glob("*.png"))
        assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
        assert all(p.with_suffix(".pdf").stat().st_size > 0 for p in pngs)
        assert all(f'src="{name}/{p.name}"' in page for p in pngs)
    assert page.count("<section>") == len(ANALYSES) + 1  # the claims table first
    assert md.index("## Claims") < md.index("## " + next(iter(ANALYSES.values())).title)
    claim_rows = [line for line in md.splitlines() if line.startswith(("| D", "| P"))]
    assert len(claim_rows) == 15


def test_report_verdicts_at_tiny_size(report):
    gsc = {r["architecture"]: r for r in _data(report, "gsc_across_depth")["data"]["table"]}
    for family in ("layer-tanh", "batch-tanh"):  # plain tanh explodes faster than its ResNet
        assert gsc[family]["rate_mean"] > gsc[f"resnet-{family}"]["rate_mean"]

    rows = _data(report, "pythagorean")["data"]["table"]
    err = {r["width"]: r["median_relative_error"] for r in rows if r["sweep"] == "width"}
    assert err[256] < err[16] / 2  # theory: a factor sqrt(16) = 4

    norm = {
        (r["arch"], r["blocks"]): r["rms_deviation"]
        for r in _data(report, "norm_preservation")["data"]["table"]
    }
    assert norm[("resnet-layer-relu", 8)] < norm[("resnet-layer-relu", 2)]
    assert norm[("layer-relu", 8)] > 2 * norm[("resnet-layer-relu", 8)]

    domain = {r["arch"]: r for r in _data(report, "collapsing_domain")["data"]["table"]}
    assert domain["relu"]["output_cosine"] > domain["batch-relu"]["output_cosine"] + 0.3

    spectra = {v["claim"]: v["holds"] for v in _data(report, "jacobian_spectra")["verdicts"]}
    assert spectra["Orthogonal linear networks are exact isometries"]

    theory = _data(report, "theory_validation")["data"]["table"]
    exact = [r for r in theory if r["setting"].startswith("linear, orthogonal")]
    assert exact and all(r["status"] == "agrees" for r in exact)
    linear = [r for r in theory if r["setting"] == "linear, gaussian, depth 1"]
    assert all(abs(r["z"]) < 4 for r in linear)  # Marchenko-Pastur moments, 3 seeds

    paths = {r["arch"]: r for r in _data(report, "path_lengths")["data"]["table"]}
    short = paths["resnet-layer-relu"]
    assert short["gradient_weighted_length"] < 0.8 * short["mean_path_length"]


def test_rerun_resumes_every_analysis(report, capsys):
    assert main([*TINY, "--analyses", "pythagorean", "path_lengths", "--out", str(report)]) == 0
    err = capsys.readouterr().err
    assert "resuming: 4 of 4 configurations" in err  # pythagorean: 2 widths + 2 depths
    assert "resuming: 3 of 3 configurations" in err  # path_lengths: 3 architectures
    # unit progress lines start with "[i/n]" (analysis headers with "== "): none ran
    assert not any(line.startswith("[") for line in err.splitlines())


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main([*TINY, "--analyses", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown analysis 'nope'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*TINY, "--out", str(blocker / "x")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    assert main([*TINY, "--depths", "0", "--out", str(tmp_path)]) == 2
    assert "depths must be positive integers" in capsys.readouterr().err
    assert (
        main([*TINY, "--analyses", "gsc_across_depth", "--depths", "7", "--out", str(tmp_path)])
        == 2
    )
    assert "needs even depths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--formats", "jpg"])


FACTORY = """
import jax
import jax.numpy as jnp
import jacobian_lab as jl


def make(key):
    net = jl.resmlp(3, 8, "tanh", in_dim=8)
    return net, net.init(key), jax.random.normal(jax.random.PRNGKey(1), (6, 8))


def apply(params, x):
    for W in params:
        x = jl.tap(jnp.tanh(x @ W))
    return x


def plain(key):
    ks = jax.random.split(key, 4)
    params = [jax.random.normal(k, (8, 8)) * 0.6 for k in ks]
    return apply, params, jax.random.normal(jax.random.PRNGKey(1), (6, 8))
"""


def test_inspect_writes_page_figures_json_and_csv(tmp_path, capsys):
    """`jacobian-lab inspect FILE.py:FACTORY` on a built-in ResNet (two seeds) and on a
    plain-JAX model read whole: the page, the figures as PDF and PNG, the JSON and CSV,
    one line per remedy on stdout; a missing factory is one error line with exit 2."""
    (tmp_path / "models.py").write_text(FACTORY)
    out = tmp_path / "out"
    spec = f"{tmp_path / 'models.py'}:make"
    assert main(["inspect", spec, "--seeds", "2", "--out", str(out), "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "remedy branch_scale: GSC(L, 0)" in printed and "remedy skips" in printed
    for name in ("inspection.html", "inspection.json", "layers.csv", "remedies.csv"):
        assert (out / name).stat().st_size > 0
    for fig in ("gsc_profile", "spectrum", "pythagorean", "block_gsc", "remedies"):
        assert (out / f"{fig}.png").stat().st_size > 0 and (out / f"{fig}.pdf").exists()
    page = (out / "inspection.html").read_text()
    referenced = re.findall(r'(?:src|href)="([^"#:]+)"', page)
    assert "gsc_profile.png" in referenced
    for name in referenced:  # every file the page shows exists and is not empty
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "inspection.json").read_text())
    assert [r["layer"] for r in data["layers"]][0] == "input"
    assert {r["name"] for r in data["remedies"]} == {"branch_scale", "weight_scale", "skips"}
    assert "gsc_lo" in data["layers"][0]  # seed bands

    out2 = tmp_path / "out2"
    spec2 = f"{tmp_path / 'models.py'}:plain"
    assert main(["inspect", spec2, "--remedies", "skips", "--out", str(out2), "--no-cache"]) == 0
    rows = (out2 / "layers.csv").read_text().splitlines()
    assert len(rows) == 1 + 5  # header, the input and 4 tapped layers

    assert main(["inspect", f"{tmp_path / 'models.py'}:nothing", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "models.py has no function 'nothing'; its functions: " in err and "make" in err


def test_report_help_names_every_analysis(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ANALYSES:
        assert name in text, name
