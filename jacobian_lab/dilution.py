"""The residual trick and the add node: every layer as a residual block.

**Residual trick** (Philipp, Song & Carbonell, arXiv 1712.05577, "any neural network is a
residual network"): any layer (or block) ``f`` splits into a linear part and a nonlinear
remainder, ``f(v) = S v + rho(v)``. Its *dilution* is ``k = Q||S v|| / Q||rho(v)||``,
``Q`` the quadratic expectation over the layer's input distribution
(``Q||a|| = sqrt(E ||a||^2)``). A large ``k`` means a pseudo-linear layer. If the
two parts are orthogonal (the Pythagorean equation, in lengths and in Jacobians), the
layer's GSC is a weighted quadratic mean of the two parts' GSCs::

    GSC(f)^2 = (k^2 GSC(S)^2 + GSC(rho)^2) / (k^2 + 1)                          (*)

So diluting a nonlinearity by ``k`` pulls its GSC towards that of the linear part (1 for
an orthogonal ``S`` or an identity skip). The GSC of a residual block, with the skip ``s``
as the linear part and the branch ``r`` as the remainder, is the same formula with
``k = Q||s|| / Q||r||`` (:func:`jacobian_lab.block_gsc` uses it per sample).

What was reconstructed: the paper's full text could not be read here (only its abstract
and summaries; see docs/fidelity.md). The abstract names the residual
trick and dilution. The ``k`` above and formula (*) follow from the Pythagorean argument
that the library already checks for ResNet blocks (:func:`~jacobian_lab.block_gsc`, where
``rho = ||r|| / ||s|| = 1 / k``). The paper does not fix how ``S`` is chosen for a layer
without a skip, so this module offers two rules (``fit``). They agree for Gaussian inputs
(Stein's lemma: the least-squares map of ``f`` is ``E[J_f]``):

* ``"jacobian"`` (default): ``S = E[J_f]``, the least-squares fit of the *Jacobian* over
  the inputs. The Jacobian's Pythagorean equation ``E qm(J_f)^2 = qm(S)^2 +
  E qm(J_f - S)^2`` then holds exactly, so (*) needs only the lengths' cross term
  ``<S v, rho(v)>`` to average out. This fit fills the GSC fields. Its cost is one
  dense Jacobian per layer and sample.
* ``"lstsq"``: ``S = argmin Q||f(v) - S v||``, the least-squares fit of ``f`` to the
  recorded inputs and outputs (no intercept: a constant belongs to the remainder, unless
  the inputs share a direction that carries it, as on a collapsed domain). Here
  ``E <S v, rho(v)> = 0`` holds exactly. The in-sample residual underestimates
  ``Q||rho||^2`` by ``(N - p) / N`` (``N`` samples, ``p`` the rank of the inputs), so it is
  corrected: ``Q||rho||^2 = RSS / (N - p)``. The correction is exact for a remainder
  independent of the inputs and first-order otherwise. This rule needs ``N >= 2 p``.
  Its ``S`` is poorly determined in input directions of small variance. A width-16
  ResNet showed why that matters: ``qm(S)`` picked up that noise and over-predicted the
  first block's GSC about 5x (4.4 vs 0.90). So the GSC fields use the Jacobian fit only.

The two rules differ where the inputs are not Gaussian. On a collapsed domain (inputs
nearly parallel) the least-squares ``S`` also carries the layer's constant output along
the shared direction. So ``"lstsq"`` measures how linear the layer is *on its domain*, the
paper's pseudo-linearity.

Reported as the **linear share** ``Q||S v||^2 / (Q||S v||^2 + Q||rho||^2) = k^2 / (1 +
k^2)`` in ``[0, 1]``. This scale-free number is 1 for a linear layer and 0 for a layer
without a linear part. It is also the weight of the linear part in (*). ``k`` itself is
a property and is ``inf`` only where the share is exactly 1. The share is resolved to
about ``1e-6`` in float32: a linear layer reads ``1 - O(eps)``, with ``k`` of order
``1e3``.

**The add node** (:func:`add_node_split`): at a block ``y = s(h) + r(h)``, the
backpropagated gradient ``g_y`` reaches ``h`` as the sum of the skip part ``J_s^T g_y``
(``g_y`` itself for an identity skip) and the branch part ``J_r^T g_y``.

Indexing as everywhere (GSC paper): the unit whose output is ``f_l`` is unit ``l``,
``f_0`` = output, nearest the output first.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jacobian_lab.checks import check_key
from jacobian_lab.driver import (
    check_finite,
    check_values,
    finite_layers,
    log_norm,
    norm,
    output_sizes,
    over_trace,
    per_layer,
    prepare,
)
from jacobian_lab.gsc import qm_norm
from jacobian_lab.initializers import normal
from jacobian_lab.model import (
    Block,
    Layer,
    Model,
    Params,
    apply_unit,
    forward,
    units_of,
    walk,
)
from jacobian_lab.residual import require_blocks


class Dilution(NamedTuple):
    """The residual trick ``f(v) = S v + rho(v)`` of every layer or block.

    Per unit, GSC-paper order (``f_0`` = output first), ``L = net.num_layers`` units. The
    quadratic expectations are over the ``N`` samples (the rows of all batches for a
    batch-norm model).

    Fields:
        linear_share: ``(L,)``; ``Q||S v||^2 / (Q||S v||^2 + Q||rho||^2) = k^2 / (1 + k^2)``
            for the chosen ``fit``: 1 for a linear layer, 0 for one without a linear part.
        skip_share: ``(L,)``; blocks: ``Q||s||^2 / (Q||s||^2 + Q||r||^2)``, the share with
            the skip ``s`` as the linear part and the branch ``r`` as the remainder (the
            paper's dilution of a block, ``k = Q||s|| / Q||r||``); NaN for plain layers
            and for blocks with a post-activation.
        branch_share: ``(L,)``; blocks: the linear share of the branch ``r`` alone (the
            block without its skip, on the same inputs); NaN for plain layers.
        gsc: ``(N, L)`` (``fit="jacobian"``; else ``None``): the measured
            ``GSC(l+1, l) = qm(J_f) ||v|| / ||f||`` per sample.
        linear_gsc: ``(N, L)`` or ``None``; ``qm(S) ||v|| / ||S v||``.
        remainder_gsc: ``(N, L)`` or ``None``; ``qm(J_f - S) ||v|| / ||rho(v)||``;
            NaN where the remainder is rounding (``||rho(v)|| <= 64 eps ||S v||``, a
            linear layer), where it is 0/0.
        predicted_gsc: ``(N, L)`` or ``None``; formula (*) with the per-sample ``k``,
            i.e. squared qm norms and squared lengths add:
            ``||v|| sqrt((qm(S)^2 + qm(J_f - S)^2) / (||S v||^2 + ||rho||^2))``.
        samples: ``N``, the number of (input, output) pairs each fit used.
    """

    linear_share: jax.Array
    skip_share: jax.Array
    branch_share: jax.Array
    gsc: jax.Array | None
    linear_gsc: jax.Array | None
    remainder_gsc: jax.Array | None
    predicted_gsc: jax.Array | None
    samples: int

    @property
    def dilution(self) -> jax.Array:
        """``k = Q||S v|| / Q||rho||`` per unit (``inf`` where the share is exactly 1)."""
        return _k(self.linear_share)

    @property
    def skip_dilution(self) -> jax.Array:
        """The paper's block dilution ``Q||s|| / Q||r||`` (NaN for plain layers)."""
        return _k(self.skip_share)

    @property
    def branch_dilution(self) -> jax.Array:
        """``k`` of the branch alone (NaN for plain layers)."""
        return _k(self.branch_share)


def _k(share: jax.Array) -> jax.Array:
    return jnp.sqrt(share / (1 - share))


def _scale(a: jax.Array) -> jax.Array:
    """The largest entry of ``a``: values are divided by it so that the squares of a layer
    whose values left the float range of the squares (a deep unnormalized ResNet) neither
    overflow nor underflow; every quantity here is a ratio."""
    m = jnp.max(jnp.abs(a))
    return jnp.where(m > 0, m, 1)


def _share(lin_sq, rem_sq):
    total = lin_sq + rem_sq
    return jnp.where(total > 0, lin_sq / jnp.where(total > 0, total, 1), jnp.nan)


def _split_lstsq(V: jax.Array, F: jax.Array) -> jax.Array:
    """Linear share of ``F ~ V S^T`` (``V (N, d_in)``, ``F (N, d_out)``) with ``S`` the
    least-squares map and the remainder corrected for degrees of freedom."""
    V, F = V / _scale(V), F / _scale(F)
    coef, _, rank, _ = jnp.linalg.lstsq(V, F)
    n = V.shape[0]
    rem_sq = jnp.sum((F - V @ coef) ** 2) / jnp.maximum(n - rank, 1)
    return _share(jnp.maximum(jnp.sum(F**2) / n - rem_sq, 0), rem_sq)


def _split_jacobian(V: jax.Array, F: jax.Array, J: jax.Array):
    """Linear share with ``S = E[J]`` and, per sample, the measured GSC, the linear part's,
    the remainder's and the predicted one (``V (N, d_in)``, ``F (N, d_out)``, ``J (N,
    d_out, d_in)``)."""
    sv, sf = _scale(V), _scale(F)
    V, F, J = V / sv, F / sf, J * (sv / sf)
    S = jnp.mean(J, axis=0)
    lin = V @ S.T
    rem = F - lin
    share = _share(jnp.mean(jnp.sum(lin**2, -1)), jnp.mean(jnp.sum(rem**2, -1)))
    q_s, q_r, q_f = qm_norm(S), qm_norm(J - S), qm_norm(J)
    log_v = log_norm(V)
    g = jnp.exp(jnp.log(q_f) + log_v - log_norm(F))
    g_s = jnp.exp(jnp.log(q_s) + log_v - log_norm(lin))
    g_r = jnp.exp(jnp.log(q_r) + log_v - log_norm(rem))
    # a remainder at rounding level (a linear layer) has no GSC: 0/0, NaN rather than noise
    rounding = norm(rem) <= 64 * jnp.finfo(rem.dtype).eps * norm(lin)
    g_r = jnp.where(rounding, jnp.nan, g_r)
    pred = jnp.exp(log_v) * jnp.sqrt((q_s**2 + q_r**2) / (norm(lin) ** 2 + norm(rem) ** 2))
    return share, g, g_s, g_r, pred


def _rows(a: jax.Array, batch: int) -> jax.Array:
    """``(S, n, B * d)`` -> ``(S * B, n, d)``: a batch-coupled model's records per row."""
    S, n, d = a.shape
    return a.reshape(S, n, batch, d // batch).transpose(0, 2, 1, 3).reshape(S * batch, n, -1)


def _segments(tr):
    """Per segment: ``(inp, rec)`` with ``inp`` ``(S, n, d_in)`` the inputs of its layers
    (for a block: its recorded input; for layers: the output below)."""
    out, prev = [], tr.x
    for rec in tr.records:
        if rec.inp is not None:
            inp = rec.inp
        elif rec.out.shape[1] == 1:
            inp = prev[:, None]
        else:  # a scanned stage: every copy's input has its output's shape
            inp = jnp.concatenate([prev[:, None], rec.out[:, :-1]], axis=1)
        out.append((inp, rec))
        prev = rec.out[:, -1]
    return out


def _dilution(model: Model, params: Params, xs, *, batch: int, fit: str, post: bool):
    """Over the record with the blocks' parts (and the Jacobians for ``fit="jacobian"``),
    the one :func:`~jacobian_lab.block_gsc` and :func:`~jacobian_lab.path_gradients` read."""
    over = _over_jacobians if fit == "jacobian" else _over_outputs
    return over(model, params, xs, batch, fit, post)


def _dilution_of(model: Model, tr, batch: int, fit: str, post: bool):
    jac = fit == "jacobian"
    per_layer_axis = partial(jax.vmap, in_axes=1, out_axes=-1)  # over a segment's layers
    split = per_layer_axis(_split_jacobian if jac else _split_lstsq)
    fields, skip_share, branch_share = [], [], []
    for inp, rec in _segments(tr):  # the few segments; a scanned stage is one
        V, F = (inp, rec.out) if batch == 1 else (_rows(inp, batch), _rows(rec.out, batch))
        out = split(V, F, rec.jac) if jac else (split(V, F),)
        fields.append(out)
        nan = jnp.full_like(out[0], jnp.nan)
        if rec.branch is None:
            skip_share.append(nan)
            branch_share.append(nan)
            continue
        R, Sk = (
            (rec.branch, rec.skip)
            if batch == 1
            else (_rows(a, batch) for a in (rec.branch, rec.skip))
        )
        log_s, log_r = log_norm(Sk, axis=(0, 2)), log_norm(R, axis=(0, 2))
        skip_share.append(nan if post else 1 / (1 + jnp.exp(2 * (log_r - log_s))))
        branch_share.append((split(V, R, rec.branch_jac) if jac else (split(V, R),))[0])
    share = per_layer([f[0][None] for f in fields])[0]
    skip_share = per_layer([a[None] for a in skip_share])[0]
    branch_share = per_layer([a[None] for a in branch_share])[0]
    parts = [per_layer([f[i] for f in fields]) for i in range(1, 5)] if jac else None
    return (share, skip_share, branch_share), parts, finite_layers(tr)


_MEMORY = (
    "dilution keeps every layer's Jacobian and its linear split for every sample and",
    "pass fewer samples per call, or fit='lstsq' (no Jacobians)",
)
_over_jacobians = over_trace(jac=True, blocks=True, static_argnums=(2, 3, 4), memory=_MEMORY)(
    _dilution_of
)
_over_outputs = over_trace(jac=False, blocks=True, static_argnums=(2, 3, 4), memory=_MEMORY)(
    _dilution_of
)

FITS = ("jacobian", "lstsq")


def dilution(net: Model, params: Params, x, *, fit: str = "jacobian") -> Dilution:
    """The residual trick of every layer or block: its linear part, its dilution, and the
    GSC each part predicts (see the module docstring).

    Args:
        net: any model (built-in, conv, or a :func:`~jacobian_lab.chain`); each layer or
            residual block is one unit.
        params: its parameters.
        x: inputs ``(N, *example_shape)`` drawn from the input distribution (a chain: a
            pytree with a leading sample axis; batch norm: ``(S, B, ...)`` batches, whose
            ``N = S * B`` rows are the samples, each seen through its own batch).
        fit: how ``S`` is chosen over the ``N`` samples.
            ``"jacobian"``: ``S = E[J_f]``, the least-squares fit of the Jacobian
            (``argmin E||J_f - S||_F^2``); it equals the least-squares fit of ``f`` for
            Gaussian inputs (Stein's lemma). It makes the Jacobian's Pythagorean
            equation ``E qm(J_f)^2 = qm(S)^2 + E qm(J_f - S)^2`` exact and fills the GSC
            fields. Costs one dense Jacobian per layer and sample (no matrix-free
            path: memory ``N`` times the sum of the layers' Jacobian sizes); not for
            batch-norm models (their Jacobians are
            with respect to a whole batch).
            ``"lstsq"``: ``S = argmin Q||f(v) - S v||``, fitted to the recorded inputs and
            outputs (no Jacobians, any model, batch norm included). It needs
            ``N >= 2 d_in`` (better ``10 d_in``) and is corrected for degrees of freedom.
            It fills the shares only. Its ``S`` is poorly determined in the input
            directions of small variance, so its ``qm(S)`` (a Frobenius norm) is not used.

    Returns:
        :class:`Dilution`, units nearest the output first.

    Raises:
        ValueError: an unknown ``fit``; ``"jacobian"`` on a batch-norm model; too few
            samples for ``"lstsq"`` (naming the unit and how many are needed).
        FloatingPointError: a layer went non-finite.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "jacobian" and net.batch_coupled:
        raise ValueError(
            "fit='jacobian' needs per-example Jacobians, but this model normalizes with "
            "batch statistics (its Jacobians are with respect to a whole batch): use "
            "fit='lstsq'"
        )
    xs = prepare(net, params, x)
    leaves = jax.tree_util.tree_leaves(xs)
    batch = int(leaves[0].shape[1]) if net.batch_coupled else 1
    n = int(leaves[0].shape[0]) * batch
    if fit == "lstsq":
        sizes = [d_in // batch for d_in, _ in output_sizes(net, params, xs)]
        worst = max(range(len(sizes)), key=lambda i: sizes[i])
        if n < 2 * sizes[worst]:
            raise ValueError(
                f"fit='lstsq' fits a linear map to every unit and needs at least twice as "
                f"many samples as a unit has inputs: "
                f"{net.layer_label(net.num_layers - 1 - worst)} has {sizes[worst]} inputs, "
                f"x gives {n} samples. Pass x with at least {2 * sizes[worst]} samples "
                "(10x is better), or use fit='jacobian'."
            )
    elif n < 2:
        raise ValueError(f"fit='jacobian' averages Jacobians over samples: x gives {n}; pass >= 2")
    units = [u for s in net.stages for u in units_of(s)]
    post = any(isinstance(u, Block) and u.post is not None for u in units)
    shares, parts, ok = _dilution(net, params, xs, batch=batch, fit=fit, post=post)
    check_finite(ok, net)
    return Dilution(*shares, *(parts or [None] * 4), n)


# -- the add node ---------------------------------------------------------------------


class AddNodeSplit(NamedTuple):
    """The backpropagated gradient at every residual block, split at its add node.

    For a block ``y = post(s(h) + r(h))`` and the gradient ``g_y`` of ``<v, f_0>`` (``v``
    a random Gaussian direction at the output) with respect to its output, the add node
    receives ``g_z = J_post^T g_y`` (``g_y`` itself without a post-activation) and sends
    it to both summands; the gradient with respect to the block input is
    ``g_h = J_s^T g_z + J_r^T g_z``. Every field has shape ``(S, number of blocks)``,
    nearest the output first (``net.block_outputs``).

    Fields:
        arriving: ``||g_z||``, the gradient arriving at the add node.
        skip: ``||J_s^T g_z||``, the part through the skip (``= ||g_z||`` for an identity
            skip: the add node passes the gradient on unchanged).
        branch: ``||J_r^T g_z||``, the part through the branch.
        cosine: ``cos(J_s^T g_z, J_r^T g_z)`` (NaN where a part is exactly zero).
        total: ``||g_h||``, the gradient leaving the block towards the input.
    """

    arriving: jax.Array
    skip: jax.Array
    branch: jax.Array
    cosine: jax.Array
    total: jax.Array

    @property
    def branch_ratio(self) -> jax.Array:
        """``||branch part|| / ||skip part||``."""
        return self.branch / self.skip


def _flat(tree) -> jax.Array:
    return ravel_pytree(tree)[0]


def _split_tap(unit, p, h, g_y):
    """Walk tap: the block's output, and its add-node numbers given the cotangent
    ``g_y`` at its output (NaN for a plain layer)."""
    out = apply_unit(unit, p, h)
    dtype = jax.tree_util.tree_leaves(out)[0].dtype
    if isinstance(unit, Layer):
        return out, jnp.full((5,), jnp.nan, dtype)
    skip = (lambda u: u) if unit.skip is None else (lambda u: unit.skip(p, u))
    s, pull_s = jax.vjp(skip, h)
    r, pull_r = jax.vjp(lambda u: unit.branch(p, u), h)
    g_z = g_y
    if unit.post is not None:
        _, pull_post = jax.vjp(lambda z: unit.post(p, z), jax.tree_util.tree_map(jnp.add, s, r))
        (g_z,) = pull_post(g_y)
    a, b, c = _flat(g_z), _flat(pull_s(g_z)[0]), _flat(pull_r(g_z)[0])
    m = jnp.maximum(jnp.max(jnp.abs(b)), jnp.max(jnp.abs(c)))
    bs, cs = b / jnp.where(m > 0, m, 1), c / jnp.where(m > 0, m, 1)
    cos = jnp.sum(bs * cs) / (jnp.linalg.norm(bs) * jnp.linalg.norm(cs))
    return out, jnp.stack([norm(a), norm(b), norm(c), cos, norm(b + c)]).astype(dtype)


@partial(jax.jit, static_argnums=0)
def _add_node(model: Model, params: Params, xs, key):
    def one(x, k):
        outs = jax.eval_shape(lambda v: forward(model, params, v)[1], x)
        eps = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), outs)
        f0, pull = jax.vjp(lambda e: _flat(forward(model, params, x, e)[0]), eps)
        v = normal(k, f0.shape, f0.dtype)  # drawn in float32: the same in both precisions
        (g,) = pull(v)
        return walk(model, params, x, _split_tap, g)[1]

    keys = jax.random.split(key, jax.tree_util.tree_leaves(xs)[0].shape[0])
    recs = jax.vmap(one)(xs, keys)
    return per_layer(list(recs))


def add_node_split(net: Model, params: Params, x, key: jax.Array) -> AddNodeSplit:
    """Split the backpropagated gradient at every residual block's add node into its skip
    and branch parts (see :class:`AddNodeSplit`); matrix-free (three vector-Jacobian
    products per block), so it runs on conv and brought models of any size.

    Args:
        net: any model with residual blocks (:func:`~jacobian_lab.resmlp`,
            :func:`~jacobian_lab.resconvnet`, a chain with :class:`~jacobian_lab.Residual`
            layers); params: its parameters.
        x: inputs ``(S, *example_shape)`` (batch norm: one batch or ``(S, B, ...)``).
        key: PRNG key for the random output directions ``v`` (one per sample).

    Returns:
        :class:`AddNodeSplit`, fields ``(S, number of blocks)``, nearest the output first.
    """
    require_blocks(net)
    vals = _add_node(net, params, prepare(net, params, x), check_key(key))
    vals = vals[:, jnp.array(net.block_outputs)]
    check_values(vals[..., 0], "the gradient arriving at an add node (try float64)")
    return AddNodeSplit(*jnp.moveaxis(vals, -1, 0))
