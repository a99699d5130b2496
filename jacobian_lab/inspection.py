"""Inspect a model: every diagnostic that applies to it, the findings they support, and the
remedies of the GSC paper applied to the model and measured again.

:func:`inspect` takes any :class:`~jacobian_lab.Model` (built in, or read by
:func:`~jacobian_lab.chain`) and returns an :class:`Inspection`: a per-layer table keyed by
the layer names (submodule paths for a model read whole), the input-output Jacobian's
spectrum, :class:`Finding` s with the measured number beside a documented threshold (and
the mean-field prediction where the theory covers the model), and :class:`Remedy` rows,
before and after, for the remedies of Philipp, Song & Carbonell (arXiv 1712.05577,
"The exploding gradient problem demystified - definition, prevalence, impact, origin,
tradeoffs, and solutions"):

* **branch scaling**: each residual branch multiplied by ``alpha`` (default
  ``1/sqrt(number of blocks)``), which raises every block's dilution (Section 4.4: skip
  connections reduce the gradient growth by the factor the skip dominates the branch);
* **weight scale**: the weights (every parameter array of two or more dimensions) of each
  repeated stage multiplied by ``c``, found numerically so that the GSC grows by a factor
  closest to 1 per layer across the stage while every forward length stays finite and
  nonzero; for a built-in network without normalization the mean-field critical value
  (:func:`~jacobian_lab.critical_sigma_w`) is given beside it;
* **identity skips** around every plain layer whose output has its input's shape: the
  residual trick made real (Section 4.3), with the dilution ``k`` each skip buys
  (:func:`~jacobian_lab.dilution`).

Each remedy row carries its prediction beside the measurement (:attr:`Remedy.predicted`):
the Pythagorean equation of the paper for branch scaling and skips, the mean-field growth
rate for the weight scale.

A remedy is applied by a front-end model, :class:`Remedied`, over the same stages and the
same params (plus the remedy's scalars as params, so a search over ``c`` reuses one
compiled program); no diagnostic knows about it.

Indexing: arrays over layers are in the GSC paper's order, ``l = 0`` the output and
``l = L`` the input; :meth:`Inspection.to_records` lists rows from the input to the
output with both the name and ``l``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jacobian_lab.checks import check_key
from jacobian_lab.dilution import dilution
from jacobian_lab.domain import domain_statistics
from jacobian_lab.driver import compute_dtype, prepare
from jacobian_lab.gsc import dense_gsc_bytes, gradient_norm, growth_rate, gsc, layer_gsc
from jacobian_lab.layered import layer_outputs
from jacobian_lab.matrix_free import choose_method
from jacobian_lab.meanfield import critical_sigma_w, gsc_growth_rate
from jacobian_lab.model import Block, Layer, Model, Params, Repeat, forward, stage_size, units_of
from jacobian_lab.networks import Network
from jacobian_lab.residual import block_gsc, pythagorean_decomposition
from jacobian_lab.spectra import Spectrum, jacobian_spectrum
from jacobian_lab.tokens import token_statistics

REMEDIES = ("branch_scale", "weight_scale", "skips")

GSC_RATE_TOLERANCE = 0.01
"""Weight scales whose per-layer GSC growth ``r`` has ``|log r|`` within this of the best
one's count as equally good; among them the one that keeps the forward lengths best wins."""

THRESHOLDS = {
    "rate_margin": 0.01,
    "exploding_gsc": 2.0,
    "vanishing_gsc": 0.5,
    "collapsed_cosine": 0.9,
    "input_cosine": 0.5,
    "rank_collapse": 0.1,
    "pseudo_linear_share": 0.99,
    "branch_ratio": 1.0,
}
"""The thresholds of the findings (see :class:`Finding`):

* exploding gradients: the growth rate's interval lies above ``1 + rate_margin`` and the
  median ``GSC(L, 0)`` exceeds ``exploding_gsc``; vanishing: below ``1 - rate_margin`` and
  under ``vanishing_gsc``;
* collapsing domain: the mean pairwise cosine of the output exceeds ``collapsed_cosine``
  while that of the inputs is below ``input_cosine`` (the paper's Section 4.2: the layers
  map distinct inputs towards one direction);
* rank collapse (token models): the output's rank-collapse residual is below
  ``rank_collapse`` times the input's (Dong et al., arXiv 2103.03404);
* pseudo-linear layers: a plain layer with a nonlinearity (a known pre-activation) whose
  linear share (:class:`~jacobian_lab.Dilution`) exceeds ``pseudo_linear_share`` (the
  paper's Section 4.3: such a layer adds depth without nonlinearity; a layer without a
  nonlinearity, a linear stem or head, is linear by construction and not reported);
* a branch that dominates its skip: ``||r|| / ||s|| > branch_ratio`` (Section 4.4: the
  block then dilutes nothing).
"""


class Finding(NamedTuple):
    """One statement about the model, with the number that supports it.

    Fields:
        name: ``"exploding_gradients"``, ``"vanishing_gradients"``, ``"collapsing_domain"``,
            ``"rank_collapse"``, ``"pseudo_linear_layers"`` or ``"branch_dominates_skip"``.
        layers: the names of the layers concerned (empty for the whole model).
        value: the measured number (a growth rate, a cosine, a ratio).
        threshold: the threshold it crossed (:data:`THRESHOLDS`).
        message: one sentence with the numbers.
        theory: the mean-field prediction of ``value`` where the theory covers the model,
            else ``None``.
    """

    name: str
    layers: tuple
    value: float
    threshold: float
    message: str
    theory: float | None = None


class Remedy(NamedTuple):
    """One remedy, applied and measured again.

    Fields:
        name: ``"branch_scale"``, ``"weight_scale"`` or ``"skips"``.
        applies: whether the model allows it; ``why`` says why not.
        setting: what was applied (``alpha``; ``c`` per stage with the mean-field critical
            value; the layers given a skip and the dilution ``k`` each one bought).
        before, after: the metrics of :func:`summary_metrics` (medians over seeds and
            samples); ``after`` is empty when the remedy does not apply.
        why: a sentence.
        predicted: what theory predicts ``after`` to be, from the model as it is: for
            ``branch_scale`` and ``skips``, ``gsc_L``, ``log10_gsc_L`` and
            ``growth_rate`` from the Pythagorean equation (each block's GSC from its
            measured branch GSC and its branch ratio, scaled by ``alpha`` or, for a new
            skip, the layer's measured GSC and ratio ``||f_l|| / ||f_{l+1}||``; see
            :func:`_pythagorean_block`), first order: the inputs of the layers after a
            changed block are taken as they were; for ``weight_scale``, the mean-field
            ``growth_rate`` at the scale found, where the theory covers the model. Empty
            where there is no prediction (``prediction`` says why).
        prediction: how ``predicted`` was obtained, or why there is none.
    """

    name: str
    applies: bool
    setting: dict
    before: dict
    after: dict
    why: str
    predicted: dict = {}  # noqa: RUF012 (never mutated: each Remedy gets its own dict)
    prediction: str = ""


@dataclasses.dataclass(frozen=True)
class Remedied(Model):
    """``base`` with remedies applied, over the params ``(base_params, knobs)``.

    ``knobs = {"c": (number of stages,), "alpha": ()}`` (see :meth:`knobs`): with
    ``scale_weights``, the weights (arrays of two or more dimensions) each stage's units
    use in their branch or layer are multiplied by ``c[stage]``; with ``scale_branches``,
    every residual branch's output by ``alpha``; each ``(stage, unit)`` in ``skips`` (a
    plain layer whose output has its input's shape) becomes a residual block with an
    identity skip. Names, samples and inputs are ``base`` 's; structurally equal remedies of
    one model share compiled programs (the knobs are params)."""

    base: Model
    scale_weights: bool = False
    scale_branches: bool = False
    skips: tuple = ()

    @property
    def names(self) -> tuple:
        return self.base.names

    @property
    def batch_coupled(self) -> bool:
        return self.base.batch_coupled

    @property
    def dtype(self):
        return compute_dtype(self.base)

    @property
    def example_shape(self):
        return getattr(self.base, "example_shape", None)

    @property
    def stages(self) -> tuple:
        out = []
        for i, stage in enumerate(self.base.stages):
            units = tuple(self._unit(u, (i, j)) for j, u in enumerate(units_of(stage)))
            if isinstance(stage, Repeat):
                one = isinstance(stage.stage, Layer | Block)
                out.append(Repeat(units[0] if one else units, stage.n))
            else:
                out.append(units[0])
        return tuple(out)

    def _unit(self, unit, where):
        scale = _scaled if self.scale_weights else (lambda p, c: p)
        if isinstance(unit, Layer) and where in self.skips:
            pre = unit.preactivation
            unit = Block(
                branch=unit.apply,
                preactivation=None if pre is None else (lambda p, h, f=pre: f(p, h)[1]),
                attention=unit.attention,
            )
        if isinstance(unit, Layer):
            return Layer(
                apply=lambda pk, h, f=unit.apply: f(scale(pk[0], pk[1]["c"]), h),
                preactivation=_lift(unit.preactivation, scale),
                attention=_lift(unit.attention, scale),
            )
        alpha = self.scale_branches

        def branch(pk, h, f=unit.branch):
            r = f(scale(pk[0], pk[1]["c"]), h)
            return jax.tree_util.tree_map(lambda a: pk[1]["alpha"] * a, r) if alpha else r

        return Block(
            branch=branch,
            skip=None if unit.skip is None else (lambda pk, h, f=unit.skip: f(pk[0], h)),
            post=None if unit.post is None else (lambda pk, z, f=unit.post: f(pk[0], z)),
            preactivation=_lift(unit.preactivation, scale),
            attention=_lift(unit.attention, scale),
        )

    def stage_params(self, params: Params) -> tuple:
        base_params, knobs = params
        out = []
        for i, (stage, p) in enumerate(
            zip(self.base.stages, self.base.stage_params(base_params), strict=True)
        ):
            k = {"c": knobs["c"][i], "alpha": knobs["alpha"]}
            if not isinstance(stage, Repeat):
                out.append((p, k))
                continue
            k = jax.tree_util.tree_map(lambda a, n=stage.n: jnp.broadcast_to(a, (n,)), k)
            if isinstance(stage.stage, Layer | Block):
                out.append((p, k))
            else:
                out.append(tuple((q, k) for q in p))
        return tuple(out)

    def samples(self, x):
        return self.base.samples(x)

    def embed_inputs(self, params: Params, x):
        return self.base.embed_inputs(params[0], x)

    def knobs(self, c=None, alpha=1.0) -> dict:
        """The remedy's scalars as params: ``c`` one weight scale per stage of ``base``
        (default 1), ``alpha`` the branch scale, in the model's dtype."""
        n = len(self.base.stages)
        dtype = compute_dtype(self.base) or jnp.float32
        c = jnp.ones(n, dtype) if c is None else jnp.asarray(c, dtype).reshape(n)
        return {"c": c, "alpha": jnp.asarray(alpha, dtype)}


def _scaled(p, c):
    return jax.tree_util.tree_map(
        lambda a: (
            a * c if jnp.ndim(a) >= 2 and jnp.issubdtype(jnp.result_type(a), jnp.inexact) else a
        ),
        p,
    )


def _lift(fn, scale):
    return None if fn is None else (lambda pk, h, f=fn: f(scale(pk[0], pk[1]["c"]), h))


# -- measurements -----------------------------------------------------------------------


def _quiet(fn, notes: list, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its warnings kept in ``notes`` (once each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    for w in caught:
        _note(notes, f"{w.category.__name__}: {w.message}")
    return out


def _note(notes: list, line: str) -> None:
    if line not in notes:
        notes.append(line)


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def summary_metrics(model: Model, params: Params, x, *, method: str = "auto", **kw) -> dict:
    """The numbers a remedy is judged by, medians over the samples: ``gsc_L`` (``GSC(L,
    0)``, input to output), ``log10_gsc_L``, ``growth_rate`` (the fitted per-layer rate of
    ``GSC(k, 0)``, :func:`~jacobian_lab.growth_rate`), ``output_cosine`` (the mean
    pairwise cosine of the outputs, :func:`~jacobian_lab.domain_statistics`) and
    ``length_ratio`` (``||f_0|| / ||f_L||``). Raises what the diagnostics raise (a
    non-finite layer, a zero output)."""
    notes: list = []
    log_g = _np(_quiet(gsc, notes, model, params, x, log=True, method=method, **kw))
    rate = _np(growth_rate(jnp.asarray(log_g), log=True).rate)
    lengths = _lengths(model, params, x)
    cosine = _np(_quiet(domain_statistics, notes, model, params, x).cosine)
    return {
        "gsc_L": float(np.exp(np.median(log_g[:, -1]))),
        "log10_gsc_L": float(np.median(log_g[:, -1]) / np.log(10)),
        "growth_rate": float(np.median(rate)),
        "output_cosine": float(cosine[0]),
        "length_ratio": float(np.median(lengths[:, 0] / lengths[:, -1])),
    }


def _lengths(model: Model, params: Params, x) -> np.ndarray:
    """``(S, L+1)``: ``||f_l||`` per sample (GSC-paper order)."""
    outs = layer_outputs(model, params, x)
    return np.stack(
        [
            np.sqrt(
                sum(
                    np.sum(_np(a).reshape(a.shape[0], -1) ** 2, axis=1)
                    for a in jax.tree_util.tree_leaves(f)
                )
            )
            for f in outs
        ],
        axis=1,
    )


@dataclasses.dataclass
class Inspection:
    """What :func:`inspect` measured.

    Attributes:
        labels: ``(L+1,)`` names in GSC-paper order: ``labels[l]`` names the layer whose
            output is ``f_l`` (``labels[L] = "input"``).
        blocks: ``(L+1,)`` booleans, whether ``f_l`` is a residual block's output.
        columns: name -> ``(n_seeds, L+1)`` float arrays (medians over the samples of each
            seed; NaN where a quantity is not defined at a layer): ``length`` (``||f_l||``),
            ``gsc`` (``GSC(l, 0)``), ``gsc_layer`` (``GSC(l+1, l)``, the one-layer GSC),
            ``gradient_norm``, ``cosine``, ``sign_diversity``, ``preact_std``,
            ``linear_share`` and ``dilution_k`` (:func:`~jacobian_lab.dilution`),
            ``branch_ratio`` and ``pythagorean_cosine`` (blocks), ``block_gsc`` and
            ``block_gsc_predicted`` (blocks), ``token_residual`` and ``token_cosine``
            (token-matrix outputs).
        gsc: ``(n_seeds, S, L+1)`` every ``GSC(k, 0)`` measured.
        growth: ``(n_seeds, S)`` the fitted per-layer growth rate of each profile.
        spectrum: the input-output Jacobian's spectrum at the first sample of the first
            seed (:class:`~jacobian_lab.Spectrum`, dense or matrix-free with errors).
        findings, remedies: :class:`Finding` and :class:`Remedy` lists.
        theory: mean-field predictions where the theory covers the model
            (``growth_rate``, ``critical_sigma_w``), else empty.
        notes: the warnings the diagnostics gave, once each.
        method: the GSC method used.
    """

    labels: tuple
    blocks: np.ndarray
    columns: dict
    gsc: np.ndarray
    growth: np.ndarray
    spectrum: Spectrum | None
    findings: list
    remedies: list
    theory: dict
    notes: list
    method: str

    @property
    def num_layers(self) -> int:
        """L."""
        return len(self.labels) - 1

    def to_records(self) -> list[dict]:
        """One dict per layer output, from the input (``l = L``) to the output (``l = 0``):
        ``layer`` (name), ``l``, ``block``, and for every column its median over seeds and,
        with several seeds, ``<column>_lo`` / ``<column>_hi`` (the smallest and largest
        seed). NaN where not defined."""
        rows = []
        many = next(iter(self.columns.values())).shape[0] > 1
        for l in range(self.num_layers, -1, -1):
            row = {"layer": self.labels[l], "l": l, "block": bool(self.blocks[l])}
            for name, a in self.columns.items():
                v = a[:, l]
                ok = ~np.isnan(v)
                row[name] = float(np.median(v[ok])) if ok.any() else math.nan
                if many:
                    row[f"{name}_lo"] = float(v[ok].min()) if ok.any() else math.nan
                    row[f"{name}_hi"] = float(v[ok].max()) if ok.any() else math.nan
            rows.append(row)
        return rows

    def to_frame(self):
        """:meth:`to_records` as a ``pandas.DataFrame`` (pandas is the optional extra
        ``jacobian-lab[pandas]``)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Inspection.to_frame needs pandas: pip install pandas (or use to_records)"
            ) from e
        return pd.DataFrame(self.to_records())

    def spectrum_summary(self) -> dict:
        """The spectrum's largest and smallest singular values (with their errors),
        condition number and mean squared singular value, as plain floats."""
        s = self.spectrum
        if s is None:
            return {}
        n = s.nodes.shape[1] if s.method == "dense" else None
        out = {
            "method": s.method,
            "largest": float(s.largest.value),
            "largest_error": float(s.largest.error),
            "smallest": float(s.smallest.value),
            "smallest_error": float(s.smallest.error),
            "condition_number": float(s.condition_number),
            "mean_sq": float(s.moment(1)),
        }
        if n is not None:
            out["size"] = int(n)
        return out

    def to_json(self) -> dict:
        """Everything as JSON-ready data (NaN as ``None``)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            if isinstance(v, dict):
                return {k: clean(w) for k, w in v.items()}
            if isinstance(v, list | tuple):
                return [clean(w) for w in v]
            if isinstance(v, np.floating | np.integer):
                return clean(v.item())
            return v

        return clean(
            {
                "layers": self.to_records(),
                "spectrum": self.spectrum_summary(),
                "findings": [f._asdict() for f in self.findings],
                "remedies": [r._asdict() for r in self.remedies],
                "theory": self.theory,
                "notes": self.notes,
                "method": self.method,
            }
        )


def inspect(
    model: Model,
    params: Params | None,
    x,
    *,
    keys: jax.Array | None = None,
    init: Callable[[jax.Array], Params] | None = None,
    method: str = "auto",
    remedies: Sequence[str] = REMEDIES,
    alpha: float | None = None,
    key: jax.Array | None = None,
    memory_budget: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Inspection:
    """Measure every diagnostic that applies to ``model``, state what they show, and try
    the GSC paper's remedies on it (see the module docstring).

    Args:
        model: any model, built in or read by :func:`~jacobian_lab.chain`.
        params: its params; ``None`` with ``keys``.
        x: inputs, at least 2 (as for every diagnostic, :func:`~jacobian_lab.driver.prepare`;
            a batch-norm model: one batch).
        keys: PRNG keys, one per seed (``jax.random.split(key, n)``): the params of seed
            ``i`` are ``init(keys[i])``, and the table gets seed bands.
        init: ``key -> params`` (default ``model.init``; a model read whole passes the
            function that builds it from a key and reads its params,
            ``lambda k: jl.chain(make(k), x)[1]``).
        method: the GSC's method (``"auto"``, ``"dense"``, ``"matrix_free"``; see
            :func:`~jacobian_lab.gsc`); the per-layer Jacobian columns (``gsc_layer``,
            ``gradient_norm``, the dilution and block columns) are measured only when it
            resolves to dense, and the spectrum is matrix-free past ``memory_budget``.
        remedies: any of :data:`REMEDIES`; ``()`` tries none.
        alpha: the branch scale (default ``1/sqrt(number of blocks)``).
        key: the PRNG key of the matrix-free estimates (default ``PRNGKey(0)``).
        memory_budget: bytes, as in :func:`~jacobian_lab.gsc`.
        progress: called with a line before each step (the CLI prints it on stderr).

    Returns:
        :class:`Inspection`.

    Raises:
        ValueError: an unknown remedy or method, or no params and no keys.
    """
    unknown = [r for r in remedies if r not in REMEDIES]
    if unknown:
        raise ValueError(f"remedies: unknown {unknown}; choose from {REMEDIES}")
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method must be 'auto', 'dense' or 'matrix_free', got {method!r}")
    say = progress or (lambda line: None)
    key = jax.random.PRNGKey(0) if key is None else check_key(key)
    if keys is None:
        if params is None:
            raise ValueError("params is None: pass the model's params, or keys= (and init=)")
        seeds = [params]
    else:
        make = init if init is not None else model.init
        seeds = [make(k) for k in keys]
    notes: list = []
    kw = {"key": key, "memory_budget": memory_budget}

    L = model.num_layers
    labels = tuple(model.names[L - 1 - l] for l in range(L)) + ("input",)
    blocks = np.zeros(L + 1, bool)
    blocks[list(model.block_outputs)] = True
    has_blocks = bool(model.block_outputs)

    per_seed = []
    gscs, growths = [], []
    dense = None
    for i, p in enumerate(seeds):
        say(f"seed {i + 1} of {len(seeds)}: GSC, lengths, domain")
        cols: dict[str, np.ndarray] = {}
        log_g = _np(_quiet(gsc, notes, model, p, x, log=True, method=method, **kw))
        if i == 0:
            log_g0 = log_g  # the first seed's profile: the remedies' predictions start there
        if dense is None:
            dense = _resolves_dense(model, p, x, method, memory_budget)
        gscs.append(np.exp(log_g))
        try:
            growths.append(_np(growth_rate(jnp.asarray(log_g), log=True).rate))
        except ValueError as e:  # a zero Jacobian product (the notes name the layer)
            growths.append(np.full(log_g.shape[0], np.nan))
            _note(notes, f"no growth rate for seed {i + 1}: {e}")
        cols["length"] = np.median(_lengths(model, p, x), axis=0)
        cols["gsc"] = np.exp(np.median(log_g, axis=0))
        dom = _quiet(domain_statistics, notes, model, p, x)
        cols["cosine"] = _np(dom.cosine)
        cols["sign_diversity"] = _pad(_np(dom.sign_diversity), L)
        cols["preact_std"] = _pad(_np(dom.preact_std), L)
        if dense:
            say(f"seed {i + 1}: per-layer Jacobians (gradient norm, one-layer GSC, dilution)")
            cols["gradient_norm"] = _median_rows(
                _np(_quiet(gradient_norm, notes, model, p, x, method="dense"))
            )
            G = _np(_quiet(layer_gsc, notes, model, p, x, log=True))
            cols["gsc_layer"] = _pad(np.exp(np.median(G, axis=0)), L)
            if model.batch_coupled:
                _note(
                    notes,
                    "the dilution columns need per-example Jacobians: not measured "
                    "for a model normalizing with batch statistics",
                )
            else:
                dil = _quiet(dilution, notes, model, p, x)
                cols["linear_share"] = _pad(_np(dil.linear_share), L)
                cols["dilution_k"] = _pad(_np(dil.dilution), L)
                if has_blocks:
                    cols["skip_dilution"] = _pad(_np(dil.skip_dilution), L)
        if has_blocks:
            say(f"seed {i + 1}: residual blocks")
            cols.update(_block_columns(model, p, x, L, notes, dense))
        tok = _token_columns(model, p, x, notes)
        if tok is not None:
            cols.update(tok)
        per_seed.append(cols)

    names = list(dict.fromkeys(n for cols in per_seed for n in cols))
    columns = {
        n: np.stack([cols.get(n, np.full(L + 1, np.nan)) for cols in per_seed]) for n in names
    }
    gsc_all = np.stack(gscs)
    growth = np.stack(growths)

    say("input-output Jacobian spectrum")
    spectrum = _spectrum(model, seeds[0], x, method, key, memory_budget, notes)
    theory = _theory(model, x, notes)
    findings = _findings(model, labels, blocks, columns, gsc_all, growth, theory)

    rows = []
    if remedies:
        say("remedies: measuring the model as it is")
        before = _measure(model, seeds[0], x, notes, method=method, **kw) or {}
        for name in remedies:
            say(f"remedy: {name}")
            rows.append(
                _REMEDY[name](
                    model,
                    seeds[0],
                    x,
                    before,
                    notes,
                    method=method,
                    alpha=alpha,
                    profile=log_g0,
                    **kw,
                )
            )
    return Inspection(
        labels, blocks, columns, gsc_all, growth, spectrum, findings, rows, theory, notes, method
    )


def _pad(a: np.ndarray, L: int) -> np.ndarray:
    """A per-layer ``(L,)`` vector (or ``(S, L)`` medians) as ``(L+1,)`` with NaN at the
    input row."""
    return np.concatenate([np.asarray(a, np.float64).reshape(L), [np.nan]])


def _nanmedian(a: np.ndarray, axis=0) -> np.ndarray:
    """``np.nanmedian`` with NaN (and no warning) where every entry is NaN: a quantity
    not defined at that layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def _median_rows(a: np.ndarray) -> np.ndarray:
    return _nanmedian(a, axis=0) if a.ndim == 2 else a


def _resolves_dense(model, params, x, method, budget) -> bool:
    if method != "auto":
        return method == "dense"
    xs = prepare(model, params, x)
    return choose_method("auto", dense_gsc_bytes(model, params, xs), budget) == "dense"


def _block_columns(model, p, x, L, notes, dense) -> dict:
    """Block columns ``(L+1,)`` with NaN at plain layers (the block axis of the block
    diagnostics is ``model.block_outputs``)."""
    where = list(model.block_outputs)
    cols = {}

    def put(name, values):
        col = np.full(L + 1, np.nan)
        col[where] = _median_rows(_np(values))
        cols[name] = col

    py = _quiet(pythagorean_decomposition, notes, model, p, x)
    put("branch_ratio", np.sqrt(_np(py.branch_sq) / _np(py.skip_sq)))
    put("pythagorean_cosine", py.cosine)
    if dense:
        bg = _quiet(block_gsc, notes, model, p, x)
        put("block_gsc", bg.gsc)
        put("block_gsc_predicted", bg.predicted)
    return cols


def _token_columns(model, p, x, notes) -> dict | None:
    try:
        st = _quiet(token_statistics, notes, model, p, x)
    except ValueError:  # no layer output is a token matrix: nothing to report
        return None
    return {
        "token_residual": _median_rows(_np(st.residual)),
        "token_cosine": _median_rows(_np(st.cosine)),
    }


def _spectrum(model, params, x, method, key, budget, notes) -> Spectrum | None:
    xs = prepare(model, params, x)
    first = jax.tree_util.tree_map(lambda a: a[0], xs)
    spec_method = {"dense": "dense", "matrix_free": "matrix_free"}.get(method, "auto")
    return _quiet(
        jacobian_spectrum,
        notes,
        lambda v: forward(model, params, v)[0],
        first,
        method=spec_method,
        key=key,
        memory_budget=budget,
    )


def _theory(model: Model, x, notes: list | None = None) -> dict:
    """Mean-field predictions for a built-in plain network with Gaussian weights, where
    :func:`~jacobian_lab.gsc_growth_rate` covers it; else empty (with a note naming the
    cause where the theory was tried and refused)."""
    if not (
        isinstance(model, Network)
        and model.num_blocks == 0
        and model.weight_init == "gaussian"
        and model.order == "linear-norm-act"
    ):
        return {}
    try:
        batch = int(np.shape(x)[-2]) if model.batch_coupled else None
        rate = gsc_growth_rate(
            model.activation, model.sigma_w, model.sigma_b, model.norm, batch_size=batch
        )
        out = {"growth_rate": float(np.asarray(rate))}
        if model.norm == "none":
            out["critical_sigma_w"] = float(critical_sigma_w(model.activation, model.sigma_b))
        return out
    except (ValueError, NotImplementedError, TypeError) as e:
        if notes is not None:
            _note(notes, f"no mean-field prediction for this network: {e}")
        return {}


def _findings(model, labels, blocks, columns, gsc_all, growth, theory) -> list[Finding]:
    T = THRESHOLDS
    out = []
    L = len(labels) - 1
    rates = growth.reshape(-1)
    if not np.isfinite(rates).all():  # no fit where a Jacobian product is zero
        rates = rates[np.isfinite(rates)]
    if rates.size == 0:
        rates = np.array([np.nan])
    lo, hi = np.quantile(rates, [0.05, 0.95])
    rate = float(np.median(rates))
    g_L = float(np.median(gsc_all[..., -1]))
    interval = f"{rate:.3f} per layer (5-95% over seeds and samples: {lo:.3f} to {hi:.3f})"
    if lo > 1 + T["rate_margin"] and g_L > T["exploding_gsc"]:
        out.append(
            Finding(
                "exploding_gradients",
                (),
                rate,
                1 + T["rate_margin"],
                f"gradients explode: GSC(k, 0) grows by {interval}; GSC(L, 0) = {g_L:.3g}",
                theory.get("growth_rate"),
            )
        )
    if hi < 1 - T["rate_margin"] and g_L < T["vanishing_gsc"]:
        out.append(
            Finding(
                "vanishing_gradients",
                (),
                rate,
                1 - T["rate_margin"],
                f"gradients vanish: GSC(k, 0) shrinks by {interval}; GSC(L, 0) = {g_L:.3g}",
                theory.get("growth_rate"),
            )
        )
    cos = _nanmedian(columns["cosine"], axis=0)
    if cos[0] > T["collapsed_cosine"] and cos[L] < T["input_cosine"]:
        out.append(
            Finding(
                "collapsing_domain",
                (labels[0],),
                float(cos[0]),
                T["collapsed_cosine"],
                f"the domain collapses: distinct inputs (mean pairwise cosine {cos[L]:.2f}) "
                f"leave the network aligned (cosine {cos[0]:.3f})",
            )
        )
    if "token_residual" in columns:
        res = _nanmedian(columns["token_residual"], axis=0)
        if np.isfinite(res[0]) and np.isfinite(res[L]) and res[0] < T["rank_collapse"] * res[L]:
            out.append(
                Finding(
                    "rank_collapse",
                    (labels[0],),
                    float(res[0] / res[L]),
                    T["rank_collapse"],
                    f"token rank collapses: the output's rank-collapse residual is "
                    f"{res[0] / res[L]:.3g} of the input's",
                )
            )
    if "linear_share" in columns:
        share = _nanmedian(columns["linear_share"], axis=0)
        nonlinear = np.isfinite(_nanmedian(columns["sign_diversity"], axis=0))
        plain = [
            l
            for l in range(L)
            if not blocks[l] and nonlinear[l] and share[l] > T["pseudo_linear_share"]
        ]
        if plain:
            out.append(
                Finding(
                    "pseudo_linear_layers",
                    tuple(labels[l] for l in plain),
                    float(np.min(share[plain])),
                    T["pseudo_linear_share"],
                    f"{len(plain)} layer(s) are pseudo-linear (linear share of at least "
                    f"{np.min(share[plain]):.4f}): they add depth without nonlinearity",
                )
            )
    if "branch_ratio" in columns:
        ratio = _nanmedian(columns["branch_ratio"], axis=0)
        big = [l for l in range(L) if blocks[l] and ratio[l] > T["branch_ratio"]]
        if big:
            out.append(
                Finding(
                    "branch_dominates_skip",
                    tuple(labels[l] for l in big),
                    float(np.max(ratio[big])),
                    T["branch_ratio"],
                    f"{len(big)} block(s) have a branch longer than their skip (||r|| / ||s|| up "
                    f"to {np.max(ratio[big]):.3g}): they dilute little; scale the branches",
                )
            )
    return out


# -- remedies ----------------------------------------------------------------------------


def _measure(model, params, x, notes, **kw) -> dict | None:
    try:
        return _quiet(summary_metrics, notes, model, params, x, **kw)
    except (FloatingPointError, ValueError, OverflowError):
        return None


def _pythagorean_block(skip_gsc2, branch_gsc, ratio):
    """A block's GSC from the Pythagorean equation: ``sqrt((g_s^2 + g_r^2 rho^2) / (1 +
    rho^2))`` for a skip of GSC ``g_s`` (1 for the identity; here squared) and a branch of
    GSC ``g_r`` and length ratio ``rho = ||r|| / ||s||`` (Philipp et al., arXiv
    1712.05577; :class:`~jacobian_lab.BlockGSC`)."""
    return np.sqrt((skip_gsc2 + (branch_gsc * ratio) ** 2) / (1 + ratio**2))


def _predict(model, params, x, notes, change: dict, profile=None, **kw) -> tuple[dict, str]:
    """The metrics of :func:`summary_metrics` that follow when the GSC across each block
    ``l`` (GSC-paper index of its output) changes by the factor ``change[l]`` (per
    sample, ``(S,)``) and nothing else does: ``GSC(k, 0)`` gains the factors of the
    blocks below ``k`` (``profile``: the model's log ``GSC(k, 0)``, ``(S, L+1)``, where
    already measured). Returns ``({}, why)`` where a factor is not finite."""
    factors = np.stack(list(change.values()), axis=1) if change else np.zeros((1, 0))
    if not np.all(np.isfinite(factors)) or not np.all(factors > 0):
        return {}, "no prediction: a block's predicted GSC is not finite (a zero branch?)"
    if profile is None:
        profile = _quiet(gsc, notes, model, params, x, log=True, **kw)
    log_g = _np(profile).astype(np.float64)  # a copy
    for l, f in change.items():
        log_g[:, l + 1 :] += np.log(f)[:, None]
    rate = _np(growth_rate(jnp.asarray(log_g), log=True).rate)
    out = {
        "gsc_L": float(np.exp(np.median(log_g[:, -1]))),
        "log10_gsc_L": float(np.median(log_g[:, -1]) / np.log(10)),
        "growth_rate": float(np.median(rate)),
    }
    return out, ""


def _miss(predicted: dict, after: dict, m, p, x, notes, blocks) -> str:
    """Where the prediction of ``gsc_L`` misses the measurement by more than 25%: a
    sentence with the factor and the remedied model's median ``|cos(skip, branch)|`` over
    ``blocks`` (GSC-paper indices of block outputs; the equation assumes 0), else ``""``."""
    if "gsc_L" not in predicted or "gsc_L" not in after:
        return ""
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = float(np.float64(after["gsc_L"]) / np.float64(predicted["gsc_L"]))
    if not (math.isfinite(factor) and factor > 0):  # a GSC that under- or overflowed
        return f" The measurement ({after['gsc_L']:.3g}) cannot be set against the prediction."
    if abs(math.log(factor)) <= math.log(1.25):
        return ""
    line = f" The measurement is {factor:.3g} times the prediction"
    try:
        cos = np.abs(_np(_quiet(pythagorean_decomposition, notes, m, p, x).cosine))
        cols = [i for i, l in enumerate(m.block_outputs) if l in set(blocks)]
        line += (
            f"; in the remedied model the median |cos(skip, branch)| of those blocks is "
            f"{float(np.median(cos[:, cols])):.2f} (the equation assumes 0), and the later "
            "layers see changed inputs."
        )
    except (FloatingPointError, ValueError, MemoryError):
        line += "."
    return line


_FIRST_ORDER = (
    " (first order: the layers after a changed block are taken to see the inputs they saw before)."
)


def _branch_scale(model, params, x, before, notes, *, alpha, profile=None, **kw) -> Remedy:
    n = len(model.block_outputs)
    if n == 0:
        return Remedy("branch_scale", False, {}, before, {}, "the model has no residual blocks")
    a = 1 / math.sqrt(n) if alpha is None else float(alpha)
    m = Remedied(model, scale_branches=True)
    after = _measure(m, (params, m.knobs(alpha=a)), x, notes, **kw) or {}
    why = f"every residual branch multiplied by alpha = {a:.4g}" + (
        " (1/sqrt of the number of blocks)" if alpha is None else ""
    )
    predicted, how = {}, "no prediction: it needs the blocks' Jacobians (the dense method)"
    if _resolves_dense(model, params, x, kw.get("method", "auto"), kw.get("memory_budget")):
        try:
            bg = _quiet(block_gsc, notes, model, params, x)
            g_r, rho, pred, meas = (
                _np(v).astype(np.float64)
                for v in (bg.branch_gsc, bg.branch_ratio, bg.predicted, bg.gsc)
            )
            g_s2 = pred**2 * (1 + rho**2) - (g_r * rho) ** 2  # the skip's GSC, squared
            new = _pythagorean_block(g_s2, g_r, a * rho)
            change = {l: new[:, b] / meas[:, b] for b, l in enumerate(model.block_outputs)}
            predicted, how = _predict(model, params, x, notes, change, profile, **kw)
            how = how or (
                "each block's GSC from the Pythagorean equation with its branch ratio rho "
                "scaled by alpha and its branch GSC kept" + _FIRST_ORDER
            )
            if any(model.block_posts):
                predicted, how = {}, "no prediction: blocks with a post are not skip + branch"
            how += _miss(predicted, after, m, (params, m.knobs(alpha=a)), x, notes, change)
        except (FloatingPointError, ValueError, MemoryError) as e:
            how = f"no prediction: {e}"
    return Remedy(
        "branch_scale", True, {"alpha": a, "blocks": n}, before, after, why, predicted, how
    )


def _stage_layers(model) -> list[tuple[int, int, int]]:
    """``(stage, first layer from the input, number of layers)`` of every repeated stage
    of two or more copies."""
    out, first = [], 0
    for i, s in enumerate(model.stages):
        if isinstance(s, Repeat) and s.n >= 2:
            out.append((i, first, stage_size(s)))
        first += stage_size(s)
    return out


def _stage_rates(model, params, x, notes, first, size, **kw) -> tuple[float, float] | None:
    """The per-layer growth of ``GSC(k, 0)`` and of the forward length ``||f_k||`` across
    one stage (least-squares slopes of their logarithms, medians over the samples), or
    ``None`` where a length or the GSC is not finite or a length is zero."""
    try:
        log_g = _np(_quiet(gsc, notes, model, params, x, log=True, **kw))
        lengths = _lengths(model, params, x)
    except (FloatingPointError, ValueError, OverflowError):
        return None
    L = log_g.shape[-1] - 1
    ks = np.arange(L - first - size, L - first + 1)
    with np.errstate(divide="ignore"):
        ys = np.median(log_g[:, ks], axis=0), np.median(np.log(lengths[:, ks]), axis=0)
    if not all(np.all(np.isfinite(y)) for y in ys):
        return None
    gsc_slope, length_slope = (np.polyfit(ks, y, 1)[0] for y in ys)
    return float(np.exp(gsc_slope)), float(np.exp(-length_slope))  # lengths: forward


def _weight_scale(model, params, x, before, notes, *, alpha, profile=None, **kw) -> Remedy:
    del alpha, profile
    stages = _stage_layers(model)
    if not stages:
        return Remedy(
            "weight_scale", False, {}, before, {}, "the model has no repeated stage to rescale"
        )
    m = Remedied(model, scale_weights=True)
    n = len(model.stages)
    found = np.ones(n)
    setting = {}
    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 17))
    for i, first, size in stages:
        rates: dict = {}

        def best(cs, i=i, first=first, size=size, rates=rates):
            """The scale whose GSC rate is within GSC_RATE_TOLERANCE of the best one's
            and whose length rate is closest to 1 (the lengths break the tie where the
            GSC is flat in c: a homogeneous stage, or an ordered phase)."""
            for c in cs:
                scales = np.ones(n)
                scales[i] = c
                rates[c] = _stage_rates(m, (params, m.knobs(scales)), x, notes, first, size, **kw)
            ok = [c for c in cs if rates[c] is not None]
            if not ok:
                return None
            g = {c: abs(math.log(rates[c][0])) for c in ok}
            near = [c for c in ok if g[c] <= min(g.values()) + GSC_RATE_TOLERANCE]
            return min(near, key=lambda c: abs(math.log(rates[c][1])))

        j = best(grid)
        j = 8 if j is None else int(np.argmin(np.abs(grid - j)))
        fine = np.exp(np.linspace(np.log(grid[max(j - 1, 0)]), np.log(grid[min(j + 1, 16)]), 9))
        c_best = best(fine)
        label = f"stage {i} ({model.names[first]!r} .. {model.names[first + size - 1]!r})"
        if c_best is None:
            return Remedy(
                "weight_scale",
                False,
                {},
                before,
                {},
                f"no weight scale in [0.25, 4] keeps {label}'s forward lengths finite",
            )
        found[i] = c_best
        setting[label] = {
            "c": float(c_best),
            "gsc_rate": rates[c_best][0],
            "length_rate": rates[c_best][1],
        }
        gsc_rates = [math.log(rates[c][0]) for c in grid if rates[c] is not None]
        if max(gsc_rates) - min(gsc_rates) <= 1e-6:
            setting[label]["note"] = (
                "the GSC across this stage does not change with the weight scale (a positively "
                "homogeneous stage without biases: the GSC is invariant to rescaling); c "
                "only keeps the forward lengths"
            )
        elif c_best in (grid[0], grid[-1]):
            setting[label]["note"] = "at the edge of the searched interval [0.25, 4]"
    critical = _critical_scale(model)
    if critical is not None:
        setting["mean_field_critical_c"] = critical
    after = _measure(m, (params, m.knobs(found)), x, notes, **kw) or {}
    why = (
        "the weights of each repeated stage scaled by the c whose per-layer GSC growth across "
        "the stage is closest to 1 (within 1% per layer, the forward lengths' growth closest "
        "to 1 decides; 17 scales in [0.25, 4], refined)"
    )
    predicted, how = {}, "no prediction: the mean-field theory does not cover this model"
    if _theory(model, x) and len(stages) == 1:
        c = float(found[stages[0][0]])
        scaled = dataclasses.replace(model, sigma_w=model.sigma_w * c)
        rate = _theory(scaled, x).get("growth_rate")
        if rate is not None:
            predicted = {"growth_rate": rate}
            how = f"the mean-field GSC growth rate at sigma_w = {scaled.sigma_w:.4g} (c = {c:.4g})"
    return Remedy("weight_scale", True, setting, before, after, why, predicted, how)


def _critical_scale(model) -> float | None:
    """The mean-field critical ``sigma_w`` over the model's, for a built-in network
    without normalization and with Gaussian weights."""
    if not (
        isinstance(model, Network) and model.norm == "none" and model.weight_init == "gaussian"
    ):
        return None
    try:
        crit = float(critical_sigma_w(model.activation, model.sigma_b))
    except (ValueError, TypeError):
        return None
    return crit / model.sigma_w if math.isfinite(crit) and model.sigma_w > 0 else None


def _same_shape_layers(model, params, x) -> list[tuple[int, int]]:
    """``(stage, unit)`` of every plain layer whose output has its input's shape in every
    copy (a repeated stage's unit counts only if all its copies do)."""
    outs = layer_outputs(model, params, x)  # GSC order: outs[L] is the input
    L = model.num_layers
    shapes = [jax.tree_util.tree_structure(o) for o in outs]
    leaf_shapes = [tuple(a.shape for a in jax.tree_util.tree_leaves(o)) for o in outs]
    same = [
        shapes[L - i] == shapes[L - 1 - i] and leaf_shapes[L - i] == leaf_shapes[L - 1 - i]
        for i in range(L)
    ]  # layer i (from the input): its input f_{L-i}, its output f_{L-1-i}
    out, first = [], 0
    for s_i, stage in enumerate(model.stages):
        units = units_of(stage)
        k = len(units)
        for j, u in enumerate(units):
            copies = range(first + j, first + stage_size(stage), k)
            if isinstance(u, Layer) and all(same[c] for c in copies):
                out.append((s_i, j))
        first += stage_size(stage)
    return out


def _skips(model, params, x, before, notes, *, alpha, profile=None, **kw) -> Remedy:
    del alpha
    where = _same_shape_layers(model, params, x)
    if not where:
        return Remedy("skips", False, {}, before, {}, "no plain layer keeps its input's shape")
    m = Remedied(model, skips=tuple(where))
    p = (params, m.knobs())
    after = _measure(m, p, x, notes, **kw) or {}
    setting: dict[str, Any] = {"layers": []}
    try:
        dil = _quiet(dilution, notes, m, p, x)
        k = _np(dil.skip_dilution)  # GSC order: the paper's Q||s|| / Q||r|| per block
        L = model.num_layers
        for l in sorted(set(m.block_outputs) - set(model.block_outputs), reverse=True):
            setting["layers"].append({"layer": model.names[L - 1 - l], "dilution_k": float(k[l])})
    except (FloatingPointError, ValueError, MemoryError) as e:
        setting["dilution_error"] = str(e)
    added = len(m.block_outputs) - len(model.block_outputs)
    why = (
        f"an identity skip around each of {added} plain layer(s) "
        "whose output has its input's shape: the residual trick made real"
    )
    predicted, how = {}, "no prediction: it needs the layers' Jacobians (the dense method)"
    if _resolves_dense(model, params, x, kw.get("method", "auto"), kw.get("memory_budget")):
        try:
            G = _np(_quiet(layer_gsc, notes, model, params, x, log=True)).astype(np.float64)
            g = np.exp(G)  # (S, L): GSC(l+1, l), the layer of f_l
            lengths = _lengths(model, params, x)
            new_blocks = sorted(set(m.block_outputs) - set(model.block_outputs))
            change = {}
            for l in new_blocks:
                rho = lengths[:, l] / lengths[:, l + 1]  # the layer's output over its input
                change[l] = _pythagorean_block(1.0, g[:, l], rho) / g[:, l]
                for row in setting["layers"]:
                    if row["layer"] == model.names[model.num_layers - 1 - l]:
                        row["predicted_k"] = float(np.median(1 / rho))
            predicted, how = _predict(model, params, x, notes, change, profile, **kw)
            how = how or (
                "each new block's GSC from the Pythagorean equation with the layer's GSC as "
                "the branch's and rho = ||f_l|| / ||f_{l+1}||" + _FIRST_ORDER
            )
            how += _miss(predicted, after, m, p, x, notes, new_blocks)
        except (FloatingPointError, ValueError, MemoryError) as e:
            how = f"no prediction: {e}"
    return Remedy("skips", True, setting, before, after, why, predicted, how)


_REMEDY = {"branch_scale": _branch_scale, "weight_scale": _weight_scale, "skips": _skips}
