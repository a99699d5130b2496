import json
import math

import pytest

from jacobian_lab.experiments.report import (
    Analysis,
    Verdict,
    analysis_config,
    jsonable,
    run_analysis,
    script_main,
    write_report,
)


def _toy(calls, interrupt_at=None):
    """A fast analysis: unit i computes i^2; interrupting at a unit mimics Ctrl-C."""

    def compute(unit):
        if unit["i"] == interrupt_at:
            raise KeyboardInterrupt
        calls.append(unit["i"])
        return {"square": unit["i"] ** 2}

    def plot(data, folder, formats):
        import matplotlib.pyplot as plt

        from jacobian_lab.plot import save_figure

        fig, ax = plt.subplots()
        ax.plot([r["square"] for r in data["table"]])
        return save_figure(fig, folder / "toy", formats)

    return Analysis(
        name="toy",
        title="Toy analysis",
        claim="squares are non-negative",
        sizes={"tiny": {"n": 4, "seeds": 1}, "small": {"n": 6, "seeds": 1}},
        configs=lambda c: [{"i": i} for i in range(c["n"])],
        compute=compute,
        summarize=lambda c, recs: {"table": [r["result"] for r in recs], "nan": math.nan},
        plot=plot,
        verdicts=lambda d: [
            Verdict(
                "non-negative",
                min(r["square"] for r in d["table"]) >= 0,
                f"{len(d['table'])} squares",
            )
        ],
    )


def test_interrupted_run_keeps_finished_units_and_resumes(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_analysis(_toy(calls, interrupt_at=2), {"n": 4}, tmp_path, log=lambda m: None)
    assert calls == [0, 1]
    calls.clear()
    result = run_analysis(_toy(calls), {"n": 4}, tmp_path, log=lambda m: None)
    assert calls == [2, 3]  # 0 and 1 were read back, not recomputed
    payload = json.loads((tmp_path / "toy" / "toy.json").read_text())
    assert [r["square"] for r in payload["data"]["table"]] == [0, 1, 4, 9]
    assert payload["data"]["nan"] is None  # valid JSON: non-finite numbers become null
    assert payload["verdicts"] == [
        {"claim": "non-negative", "holds": True, "measured": "4 squares", "claims": []}
    ]
    assert [p.suffix for p in result.figures] == [".pdf", ".png"]
    pages = write_report(tmp_path, [result])
    assert "✔ non-negative: 4 squares [holds]" in pages[0].read_text()
    assert "toy/toy.png" in pages[1].read_text()


def test_config_overrides_and_their_checks():
    toy = _toy([])
    assert analysis_config(toy, "tiny", seeds=3, widths=[8]) == {"n": 4, "seeds": 3}
    with pytest.raises(ValueError, match="unknown size"):
        analysis_config(toy, "huge")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        analysis_config(toy, "tiny", seeds=0)


def test_jsonable_turns_arrays_and_non_finite_values_into_json():
    import numpy as np

    assert jsonable({"a": np.array([1.0, np.inf]), "b": (np.float32(2.0), np.bool_(True))}) == {
        "a": [1.0, None],
        "b": [2.0, True],
    }


def test_script_entry_point_runs_an_analysis(tmp_path, capsys):
    from jacobian_lab.experiments import path_lengths

    assert (
        script_main(
            path_lengths.ANALYSIS,
            ["--size", "tiny", "--widths", "8", "--out", str(tmp_path), "--formats", "svg"],
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Most of the gradient comes from short paths" in out
    assert (tmp_path / "path_lengths" / "path_lengths.svg").exists()
    assert not (tmp_path / "path_lengths" / "path_lengths.png").exists()


def test_claims_table_pairs_every_claim_with_its_verdicts_and_opens_the_report(tmp_path):
    """A verdict tagged ``id`` supports the claim when it holds, one tagged ``-id`` when it
    does not; a claim with supporting and opposing verdicts is mixed; one without is not
    measured; an unknown id is an error. The report starts with the table, all 15 rows."""
    from jacobian_lab.experiments.claims import CLAIMS, claims_table
    from jacobian_lab.experiments.report import AnalysisResult

    verdicts = [
        Verdict("a", True, "x = 1", claims=("D1.1", "-D1.2")),
        Verdict("b", False, "y = 2", claims=("P1",)),
        Verdict("c", True, "z = 3", claims=("P1",)),
    ]
    result = AnalysisResult("toy", "Toy", "claim", "", {}, [], [], verdicts, 0.0)
    rows = {r.id: r for r in claims_table([result])}
    assert len(rows) == len(CLAIMS) == 15
    assert rows["D1.1"].status == "holds" and rows["D1.1"].evidence == "a: x = 1"
    assert rows["D1.2"].status == "does not hold"
    assert rows["P1"].status == "mixed (1 of 2 verdicts support it)"
    assert rows["P5"].status == "not measured" and rows["P5"].analyses == ()
    bad = result._replace(verdicts=[Verdict("d", True, "", claims=("D9",))])
    with pytest.raises(ValueError, match="unknown claim id 'D9'"):
        claims_table([bad])
    md = write_report(tmp_path, [result])[0].read_text()
    assert md.index("## Claims") < md.index("## Toy")
    assert sum(line.startswith(("| D", "| P")) for line in md.splitlines()) == 15
