"""The quadratic-mean norm and the gradient scale coefficient (GSC).

Definitions (Philipp, Song & Carbonell, "The exploding gradient problem demystified",
arXiv 1712.05577, Section 3):

* qm norm of a ``d_out x d_in`` matrix ``A``: the quadratic mean of its singular values
  taken over the input dimension, ``||A||_qm = sqrt(sum_i s_i^2 / d_in) = ||A||_F /
  sqrt(d_in)``. Equivalently ``||A||_qm^2 = E_u ||A u||^2`` for ``u`` uniform on the unit
  sphere of R^{d_in}, which is why the input dimension is the divisor.
* ``GSC(k, l) = ||J_k^l||_qm * ||f_k||_2 / ||f_l||_2`` with ``J_k^l = d f_l / d f_k`` and
  ``k >= l`` (layer ``k`` below layer ``l``; layer 0 is the output). It is the relative
  change of ``f_l`` per relative change of ``f_k`` under a small perturbation of ``f_k``
  in a random direction, so it does not depend on the widths or on rescaling a layer.
* Gradients *explode* with rate ``r > 1`` and intercept ``c`` when
  ``GSC(k, l) >= c * r^(k - l)``; :func:`growth_rate` fits ``r`` and ``c``.

The GSC is a per-input quantity; the functions here return it per sample (see
:mod:`jacobian_lab.layered` for what a sample is) and leave averaging to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jacobian_lab._checks import is_traced
from jacobian_lab.chain import Chain, chain_pass
from jacobian_lab.chain import forward as chain_forward
from jacobian_lab.layered import (
    _accumulate,
    _layer_jacobians,
    chain_finite,
    check_layers_finite,
    layer_finite,
    samples,
)
from jacobian_lab.matrix_free import Estimate, choose_method
from jacobian_lab.networks import Network, Params
from jacobian_lab.sharding import map_over_devices


def qm_norm(A: jax.Array) -> jax.Array:
    """Quadratic-mean norm ``||A||_F / sqrt(d_in)`` of ``A`` with shape ``(..., d_out, d_in)``.

    Returns an array of the batch shape ``(...)``.
    """
    if A.ndim < 2:
        raise ValueError(f"qm_norm needs a matrix (..., d_out, d_in), got shape {A.shape}")
    return jnp.sqrt(jnp.sum(A**2, axis=(-2, -1)) / A.shape[-1])


def gradient_scale(J: jax.Array, f_k: jax.Array, f_l: jax.Array) -> jax.Array:
    """GSC of one Jacobian: ``||J||_qm * ||f_k|| / ||f_l||``.

    Use it for any callable: with ``f_l = fn(f_k)`` and ``J = jacobian(fn, f_k)``
    (shape ``(d_l, d_k)``), this is GSC(k, l) of ``fn`` at ``f_k``. Batched over leading
    axes of ``J``; ``f_k`` and ``f_l`` are flattened over their trailing axes to match.
    """
    batch = J.shape[:-2]
    nk = jnp.linalg.norm(jnp.reshape(f_k, (*batch, -1)), axis=-1)
    nl = jnp.linalg.norm(jnp.reshape(f_l, (*batch, -1)), axis=-1)
    return qm_norm(J) * nk / nl


def _lengths(lj) -> jax.Array:
    """||f_l|| for l = 0..L: ``(S, L+1)``."""
    return jnp.concatenate(
        [jnp.linalg.norm(lj.outputs, axis=-1), jnp.linalg.norm(lj.inputs, axis=-1)[:, None]],
        axis=1,
    )


@partial(jax.jit, static_argnums=0)
def _gsc_to_output(net: Network, params: Params, xs: jax.Array):
    lj = _layer_jacobians(net, params, xs)

    def one(units, stem):
        d = stem.shape[0]

        def step(G, D):
            G = G @ D
            return G, jnp.sum(G**2)

        G, sq_hidden = jax.lax.scan(step, jnp.eye(d, dtype=stem.dtype), units)
        sq_in = jnp.sum((G @ stem) ** 2)
        d_k = jnp.array([d] * (units.shape[0] + 1) + [stem.shape[1]], stem.dtype)
        sq = jnp.concatenate([jnp.array([d], stem.dtype), sq_hidden, sq_in[None]])
        return sq / d_k

    qm_sq = jax.vmap(one)(lj.units, lj.stem)
    lengths = _lengths(lj)
    return jnp.sqrt(qm_sq) * lengths / lengths[:, :1], layer_finite(lj)


def gsc(
    net: Network | Chain,
    params: Params,
    x: jax.Array,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    memory_budget: int | None = None,
) -> jax.Array:
    """GSC from every layer to the output, per sample.

    Args:
        net, params: the network and its parameters, or a :class:`~jacobian_lab.Chain`
            and its params (layers of any sizes).
        x: inputs ``(B, in_dim)`` (batch-norm networks: one batch, or ``(S, B, in_dim)``;
            a chain: a pytree with a leading sample axis).
        method: ``"dense"`` (exact, from every layer's Jacobian), ``"matrix_free"``
            (:func:`gsc_estimate`, its point estimate), or ``"auto"``: dense when the
            per-layer Jacobians of all samples fit ``memory_budget`` bytes (default
            :data:`jacobian_lab.matrix_free.DEFAULT_MEMORY_BUDGET`, 1 GiB).
        key, num_probes: for the matrix-free method (default key ``PRNGKey(0)``); use
            :func:`gsc_estimate` for the standard errors.

    Returns:
        ``(S, L+1)`` array ``g`` with ``g[s, k] = GSC(k, 0)`` at sample ``s``, for
        ``k = 0`` (the output; always 1) up to ``k = L`` (the input), in the GSC paper's
        indexing. ``S = B`` for per-example networks, the number of batches for batch norm.

    Cost (dense): one forward pass with per-layer Jacobians plus ``L`` matrix products per
    sample, memory ``S * L * d^2`` numbers. Matrix-free: ``num_probes`` backward passes.
    """
    xs = samples(net, x)
    if choose_method(method, _dense_gsc_bytes(net, params, xs), memory_budget) != "dense":
        key = jax.random.PRNGKey(0) if key is None else key
        return gsc_estimate(net, params, x, key, num_probes).value
    impl = _chain_gsc_to_output if isinstance(net, Chain) else _gsc_to_output
    g, ok = impl(net, params, xs)
    check_layers_finite(ok, net)
    return g


def _layer_sizes(net: Network | Chain, params: Params, xs) -> list[int]:
    """Flat size of each layer output of one sample, from ``f_{L-1}`` (first layer) to
    ``f_0``, then the input ``f_L``."""
    one = jax.tree_util.tree_map(lambda v: v[0], xs)
    if isinstance(net, Chain):
        outs = jax.eval_shape(lambda v: _tapped_forward(net, params, v, None)[1], one)
        sizes = [sum(int(a.size) for a in jax.tree_util.tree_leaves(o)) for o in outs]
    else:
        sizes = [int(jax.eval_shape(lambda v: net.stem(params, v), one).size)] * net.num_layers
    return [*sizes, sum(int(a.size) for a in jax.tree_util.tree_leaves(one))]


def _gsc_sizes(net: Network | Chain, params: Params, xs) -> jax.Array:
    """``(L+1,)`` flat sizes of ``f_0 .. f_L`` (GSC order), the divisors of the qm norms."""
    sizes = _layer_sizes(net, params, xs)
    return jnp.array([*sizes[:-1][::-1], sizes[-1]])


def _dense_gsc_bytes(net: Network | Chain, params: Params, xs) -> int:
    """Memory of the dense GSC: every layer's Jacobian and the running product
    ``d f_0 / d f_k``, for all samples, twice over for the forward-mode intermediates."""
    sizes = _layer_sizes(net, params, xs)
    outs, x_size = sizes[:-1], sizes[-1]  # forward order, then the input
    ins = [x_size, *outs[:-1]]
    layer_jacobians = sum(o * i for o, i in zip(outs, ins, strict=True))
    running = outs[-1] * max(ins)
    leaf = jax.tree_util.tree_leaves(xs)[0]
    return 2 * leaf.shape[0] * jnp.dtype(leaf.dtype).itemsize * (layer_jacobians + running)


def _tapped_forward(net: Network | Chain, params: Params, x, eps):
    """Forward pass of one sample with ``eps[i]`` added to layer ``i``'s output (forward
    order; ``eps=None`` adds nothing). Returns the output and every layer's output in
    forward order, so ``d f_0 / d eps_i = d f_0 / d f_{L-1-i}``."""
    if isinstance(net, Chain):
        return chain_forward(net, params, x, eps)
    # Network.apply's stem-then-scan, with a tap on every layer's output
    h0 = net.stem(params, x)
    if eps is not None:
        h0 = h0 + eps[0]
    units_eps = jnp.zeros((net.num_units, *h0.shape), h0.dtype) if eps is None else eps[1]

    def step(h, inp):
        p, e = inp
        h = net.unit(p, h) + e
        return h, h

    h, hs = jax.lax.scan(step, h0, (params["units"], units_eps))
    return h, (h0, hs)


def _zeros_like_outputs(net, params, x):
    outs = jax.eval_shape(lambda v: _tapped_forward(net, params, v, None)[1], x)
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), outs)


def _flat_sq_norms(outs, net) -> jax.Array:
    """Squared norm of each layer's value in forward order: ``(L,)``."""
    if isinstance(net, Chain):
        return jnp.stack([jnp.sum(ravel_pytree(o)[0] ** 2) for o in outs])
    h0, hs = outs
    return jnp.concatenate([jnp.sum(h0**2)[None], jnp.sum(hs**2, axis=tuple(range(1, hs.ndim)))])


@partial(jax.jit, static_argnums=(0, 4))
def _gsc_estimate(net, params, xs, keys, num_probes: int):
    def one(x, key):
        eps0 = _zeros_like_outputs(net, params, x)
        (out, outs), vjp = jax.vjp(lambda v, e: _tapped_forward(net, params, v, e), x, eps0)
        leaves, treedef = jax.tree_util.tree_flatten(out)  # a chain's output may be a pytree
        probes = jax.tree_util.tree_unflatten(
            treedef,
            [
                jax.random.rademacher(k, (num_probes, *v.shape), v.dtype)
                for k, v in zip(jax.random.split(key, len(leaves)), leaves, strict=True)
            ],
        )
        zero_outs = jax.tree_util.tree_map(jnp.zeros_like, outs)
        g_x, g_eps = jax.vmap(lambda u: vjp((u, zero_outs)))(probes)
        # ||J_k^0 ^T u||^2 per probe and layer, forward order, then the input
        sq = jax.vmap(lambda g: _flat_sq_norms(g, net))(g_eps)
        sq_in = jax.vmap(lambda g: jnp.sum(ravel_pytree(g)[0] ** 2))(g_x)
        sq = jnp.concatenate([sq[:, ::-1], sq_in[:, None]], axis=1)  # GSC order (P, L+1)
        lengths = jnp.sqrt(
            jnp.concatenate(
                [_flat_sq_norms(outs, net)[::-1], jnp.sum(ravel_pytree(x)[0] ** 2)[None]]
            )
        )
        return sq.mean(0), sq.std(0) / jnp.sqrt(num_probes), lengths

    xs_keys = jax.random.split(keys, jax.tree_util.tree_leaves(xs)[0].shape[0])
    return jax.vmap(one)(xs, xs_keys)


def _estimate_finite(sq: jax.Array, lengths: jax.Array) -> jax.Array:
    """``(L,)`` per-layer finiteness (GSC order, as :func:`layer_finite`) for the
    matrix-free pass: a layer whose output went non-finite in the forward pass; else, the
    layer whose Jacobian first made the backward pass non-finite, counted from the output
    (everything below it inherits the NaN, so only the first counts)."""
    ok = jnp.all(jnp.isfinite(lengths[:, :-1]), axis=0)
    bad_back = ~jnp.all(jnp.isfinite(sq), axis=0)  # (L+1,): g_k = J^T g_{k-1}
    if is_traced(sq) or not bool(jnp.all(ok)) or not bool(jnp.any(bad_back)):
        return ok
    k = int(jnp.argmax(bad_back))  # g_{k-1} finite, g_k not: the layer making f_{k-1}
    return ok.at[k - 1].set(False)


def gsc_estimate(
    net: Network | Chain, params: Params, x: jax.Array, key: jax.Array, num_probes: int = 64
) -> Estimate:
    """Matrix-free GSC from every layer to the output, with standard errors.

    Hutchinson's estimator on the transposed Jacobians, all layers from one backward
    pass per probe: for a Rademacher ``u`` at the output, a backward pass gives
    ``J_k^0^T u`` at every layer ``k`` at once, and ``E ||J_k^0^T u||^2 = ||J_k^0||_F^2``.
    So ``num_probes`` backward passes estimate every ``||J_k^0||_qm^2``; then
    ``GSC(k, 0) = ||J_k^0||_qm ||f_k|| / ||f_0||``. (matfree's estimators take one operator
    at a time; here one probe serves all ``L`` operators, which is ``L`` times cheaper.)

    Args:
        net, params, x: as in :func:`gsc` (a network or a chain).
        key: PRNG key for the probes (each sample gets its own).
        num_probes: backward passes per sample.

    Returns:
        :class:`~jacobian_lab.matrix_free.Estimate` with fields ``(S, L+1)``: the GSC and its
        standard error (delta method from the probes' spread: ``se(GSC) = GSC se(Q) /
        (2 Q)`` with ``Q`` the squared Frobenius norm). ``GSC(0, 0) = 1`` with error 0.
        Memory: ``num_probes`` copies of every layer's output per sample, never a
        Jacobian.
    """
    xs = samples(net, x)
    sq, sq_se, lengths = _gsc_estimate(net, params, xs, key, num_probes)
    sizes = _gsc_sizes(net, params, xs).astype(sq.dtype)
    check_layers_finite(_estimate_finite(sq, lengths), net)
    value = jnp.sqrt(sq / sizes) * lengths / lengths[:, :1]
    error = value * sq_se / (2 * sq)
    return Estimate(value, error)


def _chain_lengths(cp) -> jax.Array:
    """||f_l|| for l = 0..L of a chain: ``(S, L+1)``."""
    flat = [*cp.outputs[::-1], cp.inputs]
    return jnp.stack([jnp.linalg.norm(f, axis=-1) for f in flat], axis=1)


@partial(jax.jit, static_argnums=0)
def _chain_gsc_to_output(chain: Chain, params, xs):
    # A Python loop over layers: a chain's layers may differ in size, so they can't be
    # scanned.
    cp = chain_pass(chain, params, xs)
    Ds = cp.units[::-1]  # Ds[l] = d f_l / d f_{l+1}
    S, d0 = Ds[0].shape[:2]
    G = None
    qm_sq = [jnp.ones((S,), Ds[0].dtype)]
    for D in Ds:
        G = D if G is None else jnp.einsum("sij,sjk->sik", G, D)
        qm_sq.append(jnp.sum(G**2, axis=(1, 2)) / D.shape[2])
    lengths = _chain_lengths(cp)
    return jnp.sqrt(jnp.stack(qm_sq, axis=1)) * lengths / lengths[:, :1], chain_finite(cp)


@partial(jax.jit, static_argnums=0)
def _gsc_matrix(net: Network, params: Params, xs: jax.Array):
    lj = _layer_jacobians(net, params, xs)

    def sq_norms(P, P_in):
        return jnp.concatenate([jnp.sum(P**2, axis=(1, 2)), jnp.sum(P_in**2)[None]])

    sq = jax.vmap(lambda one: _accumulate(one, sq_norms))(lj)[:, ::-1]  # (S, l, k)
    S, L, _ = sq.shape
    d, d_in = lj.stem.shape[1:]
    # Row l = L: the input layer seen as an output (only k = L, the identity).
    last = jnp.zeros((S, 1, L + 1), sq.dtype).at[:, 0, L].set(d_in)
    sq = jnp.concatenate([sq, last], axis=1)
    d_k = jnp.array([d] * L + [d_in], sq.dtype)
    lengths = _lengths(lj)
    g = jnp.sqrt(sq / d_k) * lengths[:, None, :] / lengths[:, :, None]  # (S, l, k)
    k_idx = jnp.arange(L + 1)
    g = jnp.where(k_idx[None, :] >= k_idx[:, None], g, jnp.nan)
    return jnp.swapaxes(g, 1, 2), layer_finite(lj)


def gsc_matrix(net: Network | Chain, params: Params, x: jax.Array) -> jax.Array:
    """GSC(k, l) for every pair of layers, per sample, from one pass.

    Row ``k`` is the layer perturbed, column ``l`` the layer observed. Column ``l`` is the
    GSC profile of the prefix network whose output is ``f_l``, so one call gives the GSC
    from every layer to the output for every depth of the network.

    Returns:
        ``(S, L+1, L+1)`` array ``G`` with ``G[s, k, l] = GSC(k, l)`` for ``k >= l``
        (1 on the diagonal) and NaN for ``k < l``; GSC-paper indexing (0 = output,
        ``L`` = input).

    Cost: ``O(L^2 d^3)`` per sample and ``O(L d^2)`` memory (only norms are kept).
    """
    impl = _chain_gsc_matrix if isinstance(net, Chain) else _gsc_matrix
    g, ok = impl(net, params, samples(net, x))
    check_layers_finite(ok, net)
    return g


@partial(jax.jit, static_argnums=0)
def _chain_gsc_matrix(chain: Chain, params, xs):
    cp = chain_pass(chain, params, xs)
    Ds = cp.units[::-1]  # Ds[l] = d f_l / d f_{l+1}
    L = len(Ds)
    S = Ds[0].shape[0]
    nan = jnp.full((S,), jnp.nan, Ds[0].dtype)
    one = jnp.ones((S,), Ds[0].dtype)
    rows = []  # rows[l][k] = ||J_k^l||_qm^2
    for l in range(L + 1):
        row, P = [nan] * l + [one], None
        for k in range(l + 1, L + 1):
            D = Ds[k - 1]
            P = D if P is None else jnp.einsum("sij,sjk->sik", P, D)
            row.append(jnp.sum(P**2, axis=(1, 2)) / D.shape[2])
        rows.append(jnp.stack(row, axis=1))
    qm_sq = jnp.stack(rows, axis=1)  # (S, l, k)
    lengths = _chain_lengths(cp)
    g = jnp.sqrt(qm_sq) * lengths[:, None, :] / lengths[:, :, None]
    return jnp.swapaxes(g, 1, 2), chain_finite(cp)


class GrowthRate(NamedTuple):
    """Exponential growth of the GSC with distance, ``GSC(k, 0) ~ c * r^k``.

    Fields (batch shape of the input):
        rate: r, fitted by least squares of ``log GSC(k, 0)`` on ``k``.
        intercept: c of that fit.
        endpoint_rate: ``GSC(L, 0)^(1/L)``, the geometric-mean ratio per layer from the
            input to the output.
    """

    rate: jax.Array
    intercept: jax.Array
    endpoint_rate: jax.Array


def growth_rate(g: jax.Array) -> GrowthRate:
    """Per-layer growth rate of a GSC profile ``g`` of shape ``(..., L+1)``, ``g[..., k] =
    GSC(k, 0)`` (as from :func:`gsc`; average over samples first if you want one number).

    Gradients explode (Definition in Section 3 of arXiv 1712.05577) when the rate is above 1.
    """
    L = g.shape[-1] - 1
    if L < 1:
        raise ValueError("growth_rate needs GSC values for at least two layers")
    k = jnp.arange(L + 1, dtype=g.dtype)
    y = jnp.log(g)
    k_c = k - k.mean()
    slope = jnp.sum(k_c * (y - y.mean(axis=-1, keepdims=True)), axis=-1) / jnp.sum(k_c**2)
    intercept = y.mean(axis=-1) - slope * k.mean()
    return GrowthRate(jnp.exp(slope), jnp.exp(intercept), g[..., -1] ** (1.0 / L))


def gsc_over_seeds(
    net: Network,
    keys: jax.Array,
    x: jax.Array,
    *,
    devices: Sequence[jax.Device] | None = None,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    memory_budget: int | None = None,
) -> jax.Array:
    """:func:`gsc` for one network initialized with each of several PRNG keys.

    Args:
        net: the network description.
        keys: ``(n_seeds, ...)`` PRNG keys, e.g. ``jax.random.split(key, n_seeds)``.
        x: inputs, shared by every seed (as in :func:`gsc`).
        devices: devices the seeds are sharded over (default: all local devices; see
            :func:`jacobian_lab.sharding.map_over_devices`).
        method, key, num_probes, memory_budget: as in :func:`gsc` (the budget is per
            seed; the matrix-free probes use ``key``, default ``PRNGKey(0)``).

    Returns:
        ``(n_seeds, S, L+1)``; ``[i, s, k] = GSC(k, 0)`` of seed ``i`` at sample ``s``.
        Seeds run in parallel under ``vmap``, split over the devices; a non-finite result
        is re-run alone to name the layer that went non-finite.
    """
    if not isinstance(net, Network):
        raise TypeError(
            "gsc_over_seeds draws each seed's parameters with net.init and needs a "
            "jacobian_lab Network; for a chain, call gsc once per set of params"
        )
    xs = samples(net, x)
    # Parameters are drawn outside the sharded program: compiling the draw into it made
    # XLA's compile of the looks-linear (batched QR) initializer hang on CPU.
    params = jax.vmap(net.init)(keys)
    params0 = jax.tree_util.tree_map(lambda a: a[0], params)
    if choose_method(method, _dense_gsc_bytes(net, params0, xs), memory_budget) == "dense":
        g = map_over_devices(lambda p: _gsc_to_output(net, p, xs)[0], params, devices=devices)
    else:
        sizes = _gsc_sizes(net, params0, xs)
        probe_key = jax.random.PRNGKey(0) if key is None else key

        def one(p):
            sq, _, lengths = _gsc_estimate(net, p, xs, probe_key, num_probes)
            return jnp.sqrt(sq / sizes.astype(sq.dtype)) * lengths / lengths[:, :1]

        g = map_over_devices(one, params, devices=devices)
    bad = ~jnp.all(jnp.isfinite(g), axis=(1, 2))
    if bool(jnp.any(bad)):
        i = int(jnp.argmax(bad))
        gsc(net, net.init(keys[i]), x)  # raises, naming the layer
        raise FloatingPointError(f"the GSC of seed {i} is not finite")
    return g
