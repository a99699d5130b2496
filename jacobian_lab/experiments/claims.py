"""The claims jacobian_lab checks, and the table that pairs each with its measured verdicts.

The project started from three public Q&A discussions about skip connections and gradients
(``D1``: exploding gradients and skips, ``D2``: vanishing gradients and identity maps,
``D3``: backpropagation through skips) and the abstract of the GSC paper (``P``; Philipp,
Song & Carbonell, arXiv 1712.05577). Each analysis tags the verdicts that decide a claim
with its id (:class:`~jacobian_lab.experiments.report.Verdict` ``claims``); an id written
``-D1.2`` means the verdict holding *refutes* the claim. :func:`claims_table` collects them
into the table that opens the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Claim(NamedTuple):
    text: str
    source: str


CLAIMS = {
    "D1.1": Claim(
        "Skip connections let the gradient reach early layers with larger magnitude",
        "discussion 1",
    ),
    "D1.2": Claim(
        "The add node passes the same gradient to both branches, so a large gradient "
        "through the skip could make explosion worse",
        "discussion 1",
    ),
    "D1.3": Claim(
        "Normalization, not skip connections, prevents exploding gradients: ResNets explode "
        "without it, plain nets with well-placed BatchNorm do not",
        "discussion 1",
    ),
    "D1.4": Claim(
        "An activation after BatchNorm may be crucial; the activation before BatchNorm blew up",
        "discussion 1",
    ),
    "D1.5": Claim(
        "Residual connections make the network less sensitive to its input, hence smaller "
        "gradients",
        "discussion 1",
    ),
    "D2.1": Claim(
        "Sigmoid and tanh make gradients vanish because of their derivative; ReLU solves it",
        "discussion 2",
    ),
    "D2.2": Claim(
        "ResNets avoid vanishing gradients through short paths (Veit et al., 1605.06431)",
        "discussion 2",
    ),
    "D2.3": Claim(
        "Residual blocks are increasingly norm preserving as the network gets deeper "
        "(Zaeemzadeh et al., 1805.07477)",
        "discussion 2",
    ),
    "D3.1": Claim(
        "The add node sends the gradient back unchanged to both inputs; the branch modifies "
        "its share slightly",
        "discussion 3",
    ),
    "D3.2": Claim(
        "Without skips the gradient is nearly gone after ten or so of fifty layers; with "
        "them it flows back almost unchanged",
        "discussion 3",
    ),
    "P1": Claim(
        "Exploding gradients exist at initialization in many popular MLPs, including with "
        "batch norm, layer norm and SeLU",
        "1712.05577",
    ),
    "P2": Claim(
        "Exploding gradients limit the depth to which networks can be trained; Adam and "
        "batch norm do not solve them",
        "1712.05577",
    ),
    "P3": Claim(
        "Architectures that avoid exploding gradients can suffer a collapsing domain",
        "1712.05577",
    ),
    "P4": Claim(
        "ResNets have much lower gradients, as a consequence of the Pythagorean equation",
        "1712.05577",
    ),
    "P5": Claim(
        "Any network is a residual network; skip connections simplify it (dilution)",
        "1712.05577",
    ),
}


class ClaimRow(NamedTuple):
    """One row of the claims table.

    Fields:
        id, text, source: the claim (:data:`CLAIMS`).
        analyses: names of the analyses with a verdict on it (empty: not measured in this
            run).
        status: ``"holds"``, ``"does not hold"``, ``"mixed (k of n verdicts support it)"``
            or ``"not measured"``.
        evidence: the measured line of the first deciding verdict (the key number).
    """

    id: str
    text: str
    source: str
    analyses: tuple[str, ...]
    status: str
    evidence: str


def claims_table(results: Sequence) -> list[ClaimRow]:
    """One :class:`ClaimRow` per claim of :data:`CLAIMS`, in order, from the verdicts of
    ``results`` (:class:`~jacobian_lab.experiments.report.AnalysisResult`). A verdict tagged
    ``id`` supports the claim when it holds; one tagged ``-id`` supports it when it does not.
    Unknown ids raise ``ValueError`` (a typo would silently drop a verdict)."""
    found: dict[str, list] = {cid: [] for cid in CLAIMS}
    for r in results:
        for v in r.verdicts:
            for tag in v.claims:
                cid = tag.lstrip("-")
                if cid not in CLAIMS:
                    raise ValueError(
                        f"analysis {r.name!r} tags a verdict with unknown claim id {tag!r}; "
                        f"known: {', '.join(CLAIMS)}"
                    )
                found[cid].append((r.name, v, v.holds != tag.startswith("-")))
    rows = []
    for cid, claim in CLAIMS.items():
        hits = found[cid]
        support = sum(s for _, _, s in hits)
        if not hits:
            status = "not measured"
        elif support == len(hits):
            status = "holds"
        elif support == 0:
            status = "does not hold"
        else:
            status = f"mixed ({support} of {len(hits)} verdicts support it)"
        names = tuple(dict.fromkeys(name for name, _, _ in hits))
        evidence = f"{hits[0][1].claim}: {hits[0][1].measured}" if hits else ""
        rows.append(ClaimRow(cid, claim.text, claim.source, names, status, evidence))
    return rows
