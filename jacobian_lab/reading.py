"""Read a whole model as its author wrote it: one trace of the model, cut into the stages
of :mod:`jacobian_lab.model`.

The front-ends (:mod:`jacobian_lab.frontends`) turn a Flax linen, Flax NNX, Equinox or
plain-JAX model into a pure function ``fn(params, x)`` of the model's own params in which
every submodule call marks its input and output (and every :func:`tap` its value) with an
identity marker (``jax.ad_checkpoint.checkpoint_name``, which compiles to nothing). Then:

1. **Trace.** ``jax.make_jaxpr`` traces ``fn`` once on example inputs. Calls that hold
   markers (``jax.jit``, ``jax.checkpoint``, ``custom_jvp`` functions) are inlined.
2. **Cut.** The chosen markers cut the program at the layer outputs: before each found
   block (its input) and after the last (its output). What runs before the first found
   block is the *stem*, after the last the *head*; code between two blocks (glue: a
   scale, an activation, a norm) joins the block before it, so that block's output is
   the value the next block reads. A value that depends only on the params (a causal
   mask, a positional-embedding slice, a tied embedding's transpose) is recomputed
   wherever it is read. A value that depends on the input and is read past a cut (a
   DenseNet or U-Net skip) is refused, naming where it is made and read: Jacobians
   between the found layer outputs would miss that path.
3. **Residual units.** Within a block's piece of program, an addition ``z = a + b``
   whose two terms both depend on the block's input, and which every path from the
   input to the output passes through (a *dominator* of the output), is a residual add.
   Each residual add makes one residual unit ``post(skip + branch)`` (a
   :class:`~jacobian_lab.model.Block`): its input is the nearest value that dominates
   the add, the skip is the term that *is* that input (an identity skip) or else the
   term computed with fewer matrix products (a projection shortcut), the branch is the
   sum of the other terms, and what runs after the add up to the next unit's input is
   the ``post`` (a Post-LN layer norm, a post-activation). So a transformer block's
   ``x + attn(ln(x))`` and ``x + mlp(ln(x))`` are two units, each a layer output. A
   piece without a residual add is one :class:`~jacobian_lab.model.Layer`.
4. **Stack.** Units that compute the same function of params of the same shapes (their
   programs print alike and their constants are equal) are stacked into
   :class:`~jacobian_lab.model.Repeat` stages, also in alternating groups (attention,
   MLP, attention, MLP, ...), so compile time does not grow with depth.
5. **Verify.** The units, run in turn, must reproduce the model's own output on the
   example inputs (see :func:`verify`).

Each unit's functions evaluate their piece of the program (``jax.core.eval_jaxpr``), so
every JAX transformation applies to them as to the model itself. A read model is
specialized to the example's sample shape (and batch size, for batch statistics).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jcore

from jacobian_lab.model import Block, Layer, Model, Repeat, forward

MARK = "jacobian_lab"
_TAP_IDS = itertools.count()


def tap(h, name: str | None = None):
    """Mark ``h`` as a layer output of a plain-JAX model read by
    :func:`~jacobian_lab.chain` (``jl.chain((apply, params), x)``).

    Call it inside ``apply`` on every value that is a layer output ``f_l``::

        def apply(params, x):
            for p in params:
                x = jl.tap(jnp.tanh(x @ p["W"] + p["b"]))
            return x

    Outside an analysis it is the identity: one marker per array
    (``jax.ad_checkpoint.checkpoint_name``) that every JAX transformation passes through
    and that compiles to nothing. ``h`` may be a pytree; ``name`` labels the layer
    (default ``"tap<i>"``, counted from the input).
    """
    return mark(h, "tap", next(_TAP_IDS), name or "")


def mark(value, kind: str, call: int, label: str = ""):
    """``value`` with every array leaf marked as ``kind`` (``"in"``, ``"out"``, ``"tap"``)
    of call ``call`` (the front-ends' markers; see the module docstring)."""
    leaves, treedef = jax.tree_util.tree_flatten(value)
    out = [
        checkpoint_name(v, f"{MARK}|{kind}|{call}|{j}|{label}") if _is_array(v) else v
        for j, v in enumerate(leaves)
    ]
    return treedef.unflatten(out)


def _is_array(v) -> bool:
    return isinstance(v, jax.Array | np.ndarray) and v.dtype != object


# -- 1. the flat program ----------------------------------------------------------------


class Marker(NamedTuple):
    """One marked value: ``kind`` (``"in"``, ``"out"``, ``"tap"``), the ``call`` it belongs
    to, the ``leaf`` of the marked pytree, a ``label``, the marked ``var`` and ``pos``, the
    number of equations before it."""

    kind: str
    call: int
    leaf: int
    label: str
    var: Any
    pos: int


class Program(NamedTuple):
    """A traced model as one flat list of equations (calls holding markers inlined,
    markers removed: each marked value is its input).

    Fields:
        eqns: the equations.
        param_vars, x_vars: the vars of the params' and the inputs' leaves.
        outvars: the outputs' atoms.
        consts: ``{constvar: value}``.
        markers: the markers, in program order.
        out_tree: the treedef of ``fn``'s output.
        scans: ``{index of a lax.scan equation: the Program of its body}`` for every
            scan whose body holds markers (a scanned stack of blocks); the body's
            ``param_vars`` are its constants and scanned-over inputs, its ``x_vars`` its
            carry.
    """

    eqns: list
    param_vars: list
    x_vars: list
    outvars: list
    consts: dict
    markers: list
    out_tree: Any = None
    scans: dict = {}


_INLINE = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
}


def _is_marker(eqn) -> bool:
    return eqn.primitive.name == "name" and str(eqn.params.get("name", "")).startswith(MARK + "|")


def _subjaxprs(params: dict) -> list:
    """``(jaxpr, consts)`` of every jaxpr in an equation's params."""
    out = []
    for v in params.values():
        for item in v if isinstance(v, tuple | list) else (v,):
            if isinstance(item, jcore.ClosedJaxpr):
                out.append((item.jaxpr, list(item.consts)))
            elif isinstance(item, jcore.Jaxpr):
                out.append((item, []))
    return out


def _has_marker(jaxpr, memo: dict) -> bool:
    key = id(jaxpr)
    if key not in memo:
        memo[key] = any(
            _is_marker(e) or any(_has_marker(j, memo) for j, _ in _subjaxprs(e.params))
            for e in jaxpr.eqns
        )
    return memo[key]


def trace_program(fn: Callable, params, x) -> Program:
    """Trace ``fn(params, x)`` and flatten it (see :class:`Program`)."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, x)
    n_params = len(jax.tree_util.tree_leaves(params))
    jaxpr = closed.jaxpr
    prog = _flatten(jaxpr, closed.consts, {}, {})
    return prog._replace(
        param_vars=list(jaxpr.invars[:n_params]),
        x_vars=list(jaxpr.invars[n_params:]),
        out_tree=jax.tree_util.tree_structure(out_shape),
    )


def _flatten(jaxpr, consts_in, env: dict, memo: dict) -> Program:
    """``jaxpr`` as a :class:`Program` (``param_vars`` and ``x_vars`` left empty): calls
    holding markers inlined with fresh vars, markers dropped and recorded, the bodies of
    scans holding markers flattened on their own."""
    eqns: list = []
    markers: list = []
    scans: dict = {}
    consts = dict(zip(jaxpr.constvars, consts_in, strict=True))

    def read(env, a):
        return a if isinstance(a, jcore.Literal) else env.get(a, a)

    def run(jx, env: dict, top: bool) -> list:
        for eqn in jx.eqns:
            ins = [read(env, a) for a in eqn.invars]
            if _is_marker(eqn):
                _, kind, call, leaf, label = eqn.params["name"].split("|", 4)
                markers.append(Marker(kind, int(call), int(leaf), label, ins[0], len(eqns)))
                env[eqn.outvars[0]] = ins[0]
                continue
            subs = _subjaxprs(eqn.params)
            marked = subs and any(_has_marker(j, memo) for j, _ in subs)
            if marked and eqn.primitive.name in _INLINE and len(subs) == 1:
                sub, sub_consts = subs[0]
                inner = {}
                for v, c in zip(sub.constvars, sub_consts, strict=True):
                    fresh = jcore.Var(v.aval)
                    consts[fresh] = c
                    inner[v] = fresh
                for v, a in zip(sub.invars, ins[-len(sub.invars) :], strict=True):
                    inner[v] = a
                outs = run(sub, inner, False)
                for o, a in zip(eqn.outvars, outs, strict=True):
                    env[o] = a
                continue
            if marked and eqn.primitive.name != "scan":
                raise ReadError(
                    f"a {eqn.primitive.name} (in {_scope(eqn)}) holds submodule calls that "
                    "could be layer outputs; jacobian_lab reads them through jax.jit, "
                    "jax.checkpoint, custom_jvp/custom_vjp functions and lax.scan (a scanned "
                    "stack of blocks), not through other control flow"
                )
            outvars = eqn.outvars
            if not top:  # an inlined jaxpr may be inlined twice: fresh vars each time
                outvars = [
                    o if isinstance(o, jcore.DropVar) else jcore.Var(o.aval) for o in outvars
                ]
                for o, n in zip(eqn.outvars, outvars, strict=True):
                    env[o] = n
            if marked:  # a scanned stack of blocks: its body is read on its own
                body = eqn.params["jaxpr"]
                nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
                bp = _flatten(body.jaxpr, body.consts, {}, memo)
                invars = list(body.jaxpr.invars)
                scans[len(eqns)] = bp._replace(
                    param_vars=invars[:nc] + invars[nc + nk :], x_vars=invars[nc : nc + nk]
                )
            eqns.append(eqn.replace(invars=ins, outvars=outvars))
        return [read(env, a) for a in jx.outvars]

    outvars = run(jaxpr, env, True)
    return Program(eqns, [], [], outvars, consts, markers, None, scans)


def _scope(eqn) -> str:
    """The submodule path an equation was traced in (its name stack), for messages."""
    stack = _CALL.sub("", str(eqn.source_info.name_stack)).replace("vmap()", "")
    return "/".join(p for p in stack.split("/") if p) or "the model's top level"


_CALL = re.compile(r"jlcall(\d+)")


def call_of(eqn) -> int | None:
    """The innermost recorded submodule call an equation was traced in (the front-ends
    open a ``jax.named_scope("jlcall<i>")`` around call ``i``), or ``None``."""
    found = _CALL.findall(str(eqn.source_info.name_stack))
    return int(found[-1]) if found else None


# -- 2. cutting the program at the layer outputs ----------------------------------------


class Piece(NamedTuple):
    """The program between two cuts.

    Fields:
        inputs: the vars it starts from (the previous cut; the inputs' leaves for the stem).
        outputs: the atoms it ends at (the next cut; the model's outputs for the head).
        eqns: indices into ``Program.eqns`` of its input-dependent equations (after dead
            code is dropped; the params-only equations it reads are added when its units
            are built).
        label: the submodule path of the block it holds, ``"stem"`` or ``"head"``.
        kind: ``"stem"``, ``"block"`` or ``"head"`` (a stem or head is one layer).
    """

    inputs: tuple
    outputs: tuple
    eqns: tuple
    label: str
    kind: str


class ReadError(ValueError):
    """A model cannot be read as asked (the message names where and what to change)."""


def depends_on_x(prog: Program) -> set:
    """The vars whose values depend on the inputs."""
    dep = set(prog.x_vars)
    for eqn in prog.eqns:
        if any(isinstance(v, jcore.Var) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return dep


def cut(prog: Program, cuts: Sequence[tuple], names: Sequence[str], kinds: Sequence[str]):
    """Cut ``prog`` at ``cuts`` (each a tuple of vars, in program order) into pieces
    ``s = 0 .. len(cuts)``, from ``([inputs, *cuts])[s]`` to ``([*cuts, outputs])[s]``,
    labelled ``names[s]`` and of kind ``kinds[s]``; an empty first or last piece (a
    cut at the inputs, or at the outputs) is left out. Raises :class:`ReadError` for a
    value read past a cut, cuts out of order, or outputs that bypass the last cut."""
    dep = depends_on_x(prog)
    index: dict = {}
    for j, c in enumerate(cuts, 1):
        for v in c:
            if v not in dep:
                raise ReadError(
                    f"the input of {names[j]!r} does not depend on the model's input, "
                    "so it cannot be a layer output: choose other layer outputs with at="
                )
            index.setdefault(v, j)
    seg = {v: index.get(v, 0) for v in prog.x_vars}
    owner: dict[int, int] = {}
    for i, eqn in enumerate(prog.eqns):
        got = {seg[v] for v in eqn.invars if isinstance(v, jcore.Var) and v in seg}
        if not got:
            continue
        if len(got) > 1:
            early, late = min(got), max(got)
            var = next(v for v in eqn.invars if isinstance(v, jcore.Var) and seg.get(v) == early)
            raise ReadError(
                f"a value computed in {names[early]!r} ({_made_in(prog, var)}) is read in "
                f"{names[late]!r} (by {eqn.primitive.name} in {_scope(eqn)}), past the layer "
                f"output{'s' if late - early > 1 else ''} in between: a skip that bypasses a "
                "layer output (DenseNet or U-Net style), so the Jacobians between layer "
                "outputs would miss that path. Choose coarser layer outputs with at= (a "
                "module class, a tuple of classes, or a predicate on the submodule path) "
                "so that no value crosses them."
            )
        s = got.pop()
        owner[i] = s
        for o in eqn.outvars:
            j = index.get(o)
            if j is not None and j != s + 1:
                raise ReadError(
                    f"the layer outputs are not in sequence: the input of {names[j]!r} is "
                    f"computed from {names[s]!r}, not from the layer output before it; choose "
                    "layer outputs that follow one another with at="
                )
            seg[o] = s if j is None else j
    m = len(cuts)
    for a in prog.outvars:
        if isinstance(a, jcore.Var) and a in seg and seg[a] != m:
            raise ReadError(
                f"the model's output is computed from {names[seg[a]]!r}, bypassing "
                f"{names[-1]!r}: the found layer outputs are not all on the path to the "
                "output; choose them with at="
            )
    ends = [*map(tuple, cuts), tuple(prog.outvars)]
    starts = [tuple(prog.x_vars), *map(tuple, cuts)]
    pieces = []
    for s in range(m + 1):
        kept = _live([i for i, t in owner.items() if t == s], prog, ends[s])
        if not kept and ends[s] == starts[s]:
            continue  # a cut at the inputs or at the outputs: nothing between
        pieces.append(Piece(starts[s], ends[s], tuple(kept), names[s], kinds[s]))
    return pieces


def _made_in(prog: Program, var) -> str:
    for eqn in prog.eqns:
        if var in eqn.outvars:
            return f"by {eqn.primitive.name} in {_scope(eqn)}"
    return "the input"


def _live(indices: list[int], prog: Program, outputs: Sequence) -> list[int]:
    """The equations among ``indices`` that the ``outputs`` need (dead code dropped)."""
    need = {a for a in outputs if isinstance(a, jcore.Var)}
    kept = []
    for i in sorted(indices, reverse=True):
        eqn = prog.eqns[i]
        if any(o in need for o in eqn.outvars) or eqn.effects:
            kept.append(i)
            need.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    return kept[::-1]


# -- 3. residual units ------------------------------------------------------------------


class Sub(NamedTuple):
    """A piece of program as a function: ``jaxpr`` with invars ``[*params, *inputs]``
    and ``consts``; ``params`` are the leaf indices of the model's params it reads, in
    invar order; ``text`` describes the function apart from its params (equal texts:
    the same function of params of the same shapes)."""

    jaxpr: Any
    consts: list
    params: tuple
    text: str


class Unit(NamedTuple):
    """One layer output found in the program.

    Fields:
        kind: ``"layer"`` or ``"block"``.
        subs: ``{"apply": Sub}`` for a layer; ``{"branch", "skip", "post"}`` (skip and
            post may be ``None``) for a block. A block's branch sums its ``Sub``'s outputs.
        inputs, outputs: the vars it maps (one each for a block).
        label: the submodule path it is named by.
    """

    kind: str
    subs: dict
    inputs: tuple
    outputs: tuple
    label: str

    @property
    def leaves(self) -> tuple:
        """The params leaves it reads, in first-use order over its functions."""
        seen: dict = {}
        for s in self.subs.values():
            if s is not None:
                seen.update(dict.fromkeys(s.params))
        return tuple(seen)

    @property
    def ident(self) -> tuple:
        """What the unit computes apart from its params (see :class:`Sub`)."""
        return (self.kind, *(None if s is None else s.text for s in self.subs.values()))


_LINEAR = {"dot_general", "conv_general_dilated"}
# elementwise primitives: each output entry is a function of the same entry of the inputs
_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp",
    "exp2", "log", "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "erf_inv",
    "integer_pow", "pow", "sqrt", "rsqrt", "cbrt", "square", "sin", "cos", "atan",
    "select_n", "convert_element_type", "copy", "copy_p", "clamp", "stop_gradient",
}  # fmt: skip
# ... and of those, the ones that are linear in an operand when the other is a constant
_AFFINE = {"add", "add_any", "sub", "mul", "div", "neg", "convert_element_type", "copy"}


def _elementwise(eqn, memo: dict) -> bool:
    """Whether ``eqn`` is elementwise: a primitive of :data:`_ELEMENTWISE`, or a
    ``jit``/``custom_jvp``/``custom_vjp`` call whose body is (``jax.nn.relu``, ``silu``)."""
    name = eqn.primitive.name
    if name in _ELEMENTWISE:
        return True
    subs = _subjaxprs(eqn.params)
    if name not in _INLINE or len(subs) != 1:
        return False
    key = id(subs[0][0])
    if key not in memo:
        memo[key] = all(_elementwise(e, memo) for e in subs[0][0].eqns)
    return memo[key]


def _nonlinear(eqn, dep) -> bool:
    """Whether an elementwise ``eqn`` is nonlinear in its input-dependent operands."""
    moving = [a for a in eqn.invars if isinstance(a, jcore.Var) and a in dep]
    if eqn.primitive.name in _AFFINE:
        return eqn.primitive.name in ("mul", "div") and len(moving) > 1  # x * sigmoid(x)
    return True


_ADD = {"add", "add_any"}


def _dominators(eqns: Sequence, start, dep) -> tuple[dict, dict]:
    """Immediate dominators (and depths) of the input-dependent values of ``eqns`` (in
    program order) from ``start``: ``idom[v]`` is the nearest value every path from
    ``start`` to ``v`` passes through (``start`` itself has ``None``)."""
    idom, depth = {start: None}, {start: 0}

    def lca(u, v):
        while u is not v:
            if depth[u] >= depth[v]:
                u = idom[u]
            else:
                v = idom[v]
        return u

    for e in eqns:
        ins = [v for v in e.invars if isinstance(v, jcore.Var) and v in idom]
        if not ins:
            continue
        d = functools.reduce(lca, ins)
        for o in e.outvars:
            idom[o], depth[o] = d, depth[d] + 1
    return idom, depth


class _Graph:
    """Producers, uses and input dependence of a program, for building units."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.producer = {o: i for i, e in enumerate(prog.eqns) for o in e.outvars}
        self.param_index = {v: i for i, v in enumerate(prog.param_vars)}
        self.dep = depends_on_x(prog)

    def sub(self, targets: Sequence, starts: Sequence) -> Sub:
        """The function ``starts -> targets`` (with every params-only value it reads)."""
        starts = tuple(starts)
        stop = set(starts)
        picked: set[int] = set()
        consts: dict = {}
        todo = [a for a in targets if isinstance(a, jcore.Var)]
        seen = set()
        while todo:
            v = todo.pop()
            if v in seen or v in stop:
                continue
            seen.add(v)
            if v in self.param_index:
                continue
            if v in self.prog.consts:
                consts[v] = self.prog.consts[v]
                continue
            i = self.producer.get(v)
            if i is None:
                raise ReadError(
                    "internal: a unit reads the model's input directly; please report this"
                )
            picked.add(i)
            todo.extend(a for a in self.prog.eqns[i].invars if isinstance(a, jcore.Var))
        eqns = [self.prog.eqns[i] for i in sorted(picked)]
        order: dict = {}
        for e in eqns:
            for a in e.invars:
                if isinstance(a, jcore.Var) and a in self.param_index and a in seen:
                    order.setdefault(a, None)
        for a in targets:
            if isinstance(a, jcore.Var) and a in self.param_index:
                order.setdefault(a, None)
        pvars = list(order)
        cvars = [v for e in eqns for v in e.invars if isinstance(v, jcore.Var) and v in consts]
        cvars = list(dict.fromkeys(cvars))
        effects = frozenset().union(*(e.effects for e in eqns)) if eqns else frozenset()
        invars = [*pvars, *starts]
        info = jcore.DebugInfo(
            "jacobian_lab.chain",
            "a piece of the read model",
            tuple(f"p{i}" for i in range(len(pvars))) + tuple(f"h{i}" for i in range(len(starts))),
            tuple(f"out{i}" for i in range(len(targets))),
        )
        jaxpr = jcore.Jaxpr(cvars, invars, list(targets), eqns, effects, info)
        values = [consts[v] for v in cvars]
        text = str(jaxpr) + "".join(_digest(c) for c in values)
        return Sub(jaxpr, values, tuple(self.param_index[v] for v in pvars), text)

    def preactivation(self, targets: Sequence, starts: Sequence, last_only: bool):
        """The pre-activation on the path ``starts -> targets`` (one start): the value
        ``z`` such that the target (``last_only``), or else the last value in the branch
        that feeds something other than an elementwise operation, is an elementwise
        nonlinear function of ``z`` alone (``relu(z)``, the tanh form of ``gelu(z)``,
        ``z * sigmoid(z)``), ``z`` the nearest such value; ``None`` if there is none. In a
        branch the value must feed a matrix product (a neuron's activation feeding the
        next layer), so a softmax's exponential does not count."""
        if len(starts) != 1:
            return None
        eqns = [e for e in self.sub(targets, starts).jaxpr.eqns]
        eqns = [e for e in eqns if any(o in self.dep for o in e.outvars)]
        memo: dict = {}
        idom, _ = _dominators(eqns, starts[0], self.dep)

        def pre_of(w):
            d = idom.get(w)
            while d is not None:
                cone = [
                    e
                    for e in self.sub([w], [d]).jaxpr.eqns
                    if any(o in self.dep for o in e.outvars)
                ]
                if not all(_elementwise(e, memo) for e in cone):
                    return None
                if any(_nonlinear(e, self.dep) for e in cone):
                    return d
                d = idom.get(d)
            return None

        if last_only:
            return pre_of(targets[0])
        # a neuron's activation feeds a linear map (the next layer's matrix product)
        feeds = {
            v
            for e in eqns
            if e.primitive.name in _LINEAR
            for v in e.invars
            if isinstance(v, jcore.Var)
        }
        ends = [o for e in eqns if _elementwise(e, memo) for o in e.outvars]
        ends = [v for v in ends if v in feeds or v in targets][::-1]
        for w in ends[:8]:  # the last few: the branch's last nonlinearity is near its end
            z = pre_of(w)
            if z is not None:
                return z
        return None

    def softmax(self, targets: Sequence, starts: Sequence):
        """The first softmax on the path ``starts -> targets`` whose result has at least
        three axes (heads, queries, keys): an exponential divided by its sum over the last
        axis, as ``jax.nn.softmax`` and the attention layers of Flax, Equinox and
        ``jax.nn.dot_product_attention`` compute it; ``None`` if there is none."""
        eqns = self.sub(targets, starts).jaxpr.eqns
        made = {o: e for e in eqns for o in e.outvars}
        for e in eqns:
            if e.primitive.name != "div" or len(e.outvars[0].aval.shape) < 3:
                continue
            num, den = e.invars
            top = made.get(num) if isinstance(num, jcore.Var) else None
            if top is not None and top.primitive.name == "exp" and den.aval.shape[-1] == 1:
                return e.outvars[0]
        return None

    def matmuls(self, target, start) -> tuple[int, int]:
        """(matrix products, equations) on the input-dependent path ``start -> target``."""
        eqns = self.sub([target], [start]).jaxpr.eqns
        dep = [e for e in eqns if any(o in self.dep for o in e.outvars)]
        return sum(e.primitive.name in _LINEAR for e in dep), len(dep)


def _digest(c) -> str:
    a = np.asarray(c)
    return f"|{a.shape}{a.dtype}{hashlib.sha1(a.tobytes()).hexdigest()}"


class ScanStage(NamedTuple):
    """A scanned stack of blocks in the model (``lax.scan`` over stacked params, as
    ``nn.scan`` or an Equinox stack of blocks run under ``lax.scan`` make): one
    :class:`Repeat` stage.

    Fields:
        units: the units of one copy (their ``Sub.params`` index ``params``' outputs).
        n: the number of copies (the scan's length).
        params: the model's params -> the body's constants, then its scanned-over inputs.
        num_consts: how many of those are constants (shared by every copy).
        reverse: the scan runs its copies last to first.
        label: the scanned block's submodule path.
    """

    units: tuple
    n: int
    params: Sub
    num_consts: int
    reverse: bool
    label: str

    @property
    def ident(self) -> tuple:
        return ("scan", self.n, self.num_consts, self.reverse, self.params.text) + tuple(
            u.ident for u in self.units
        )


def scan_stage(graph: _Graph, piece: Piece, calls) -> ScanStage:
    """The :class:`ScanStage` of a piece that is one marked ``lax.scan``."""
    prog = graph.prog
    (i,) = [j for j in piece.eqns if j in prog.scans]
    eqn, body = prog.eqns[i], prog.scans[i]
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    carried = [a for a in eqn.invars[nc : nc + nk] if isinstance(a, jcore.Var) and a in graph.dep]
    if nk != 1 or len(carried) != 1 or len(piece.eqns) != 1:
        raise ReadError(
            f"the scanned blocks in {piece.label!r} carry {nk} values; jacobian_lab reads a "
            "scanned stack of blocks whose scan carries the one value the blocks transform"
        )
    shared = eqn.invars[:nc] + eqn.invars[nc + nk :]
    if any(isinstance(a, jcore.Var) and a in graph.dep for a in shared):
        raise ReadError(
            f"the scan in {piece.label!r} reads the model's input through its constants or "
            "scanned-over arrays, not only through its carry: its copies are not blocks "
            "applied one after another"
        )
    bgraph = _Graph(body)
    end = body.outvars[0]
    moving = [j for j, e in enumerate(body.eqns) if any(o in bgraph.dep for o in e.outvars)]
    live = _live(moving, body, [end])
    inner = Piece(tuple(body.x_vars), (end,), tuple(live), piece.label, "block")
    return ScanStage(
        tuple(units(bgraph, inner, calls)),
        int(eqn.params["length"]),
        graph.sub(shared, []),
        nc,
        bool(eqn.params["reverse"]),
        piece.label,
    )


def units(graph: _Graph, piece: Piece, calls: Sequence | None) -> list:
    """The residual units of a piece (module docstring, step 3), one layer, or for a
    scanned stack of blocks its :class:`ScanStage`."""
    prog = graph.prog
    if piece.kind == "scan":
        return [scan_stage(graph, piece, calls)]
    if len(piece.inputs) != 1 or len(piece.outputs) != 1 or piece.kind != "block":
        return [_layer(graph, piece)]
    (b,), (e,) = piece.inputs, piece.outputs
    mine = set(piece.eqns)
    inside = {b} | {o for i in piece.eqns for o in prog.eqns[i].outvars}
    idom, _ = _dominators([prog.eqns[i] for i in piece.eqns], b, inside)
    uses: dict = {}
    for i in piece.eqns:
        for v in prog.eqns[i].invars:
            if isinstance(v, jcore.Var) and v in inside:
                uses[v] = uses.get(v, 0) + 1
    if not isinstance(e, jcore.Var) or e not in idom:
        return [_layer(graph, piece)]
    chain, v = [], e
    while v is not None:
        chain.append(v)
        v = idom[v]
    chain.reverse()  # b ... e: the values every path from b to e passes through
    on_chain = set(chain)

    def is_sum(v) -> bool:
        i = graph.producer.get(v)
        if i is None or i not in mine:
            return False
        eqn = prog.eqns[i]
        ins = eqn.invars
        return (
            eqn.primitive.name in _ADD
            and len(ins) == 2
            and all(isinstance(a, jcore.Var) and a in inside for a in ins)
            and all(a.aval.shape == v.aval.shape for a in ins)
        )

    def terms(v) -> list:
        out = []
        for a in prog.eqns[graph.producer[v]].invars:
            if is_sum(a) and uses.get(a, 0) == 1 and a not in on_chain:
                out += terms(a)
            else:
                out.append(a)
        return out

    adds = [v for v in chain[1:] if is_sum(v)]
    if not adds:
        return [_layer(graph, piece)]
    out = []
    for n, z in enumerate(adds):
        h = idom[z]
        start = b if n == 0 else h
        end = e if n == len(adds) - 1 else idom[adds[n + 1]]
        ts = terms(z)
        if h in ts:
            skip = h
        else:
            skip = min(ts, key=lambda t, h=h: graph.matmuls(t, h))
        branch = list(ts)
        branch.remove(skip)
        pre = graph.preactivation(branch, [start], last_only=False)
        att = graph.softmax(branch, [start])
        subs = {
            "branch": graph.sub(branch, [start]),
            "skip": None if skip is start else graph.sub([skip], [start]),
            "post": None if z is end else graph.sub([end], [z]),
            "pre": None if pre is None else graph.sub([pre], [start]),
            "attention": None if att is None else graph.sub([att], [start]),
        }
        label = piece.label
        if len(adds) > 1:
            label = _unit_label(subs["branch"].jaxpr.eqns, branch, prog, piece.label, calls, n)
        out.append(Unit("block", subs, (start,), (end,), label))
    return out


def _layer(graph: _Graph, piece: Piece) -> Unit:
    """A piece as one layer; with its pre-activation when its output is made by an
    elementwise nonlinearity (``{"apply", "pre"}``: the output and that value)."""
    pre = None
    if len(piece.outputs) == 1 and isinstance(piece.outputs[0], jcore.Var):
        pre = graph.preactivation(piece.outputs, piece.inputs, last_only=True)
    att = graph.softmax(piece.outputs, piece.inputs) if len(piece.inputs) == 1 else None
    subs = {
        "apply": graph.sub(piece.outputs, piece.inputs),
        "pre": None if pre is None else graph.sub([*piece.outputs, pre], piece.inputs),
        "attention": None if att is None else graph.sub([att], piece.inputs),
    }
    return Unit("layer", subs, piece.inputs, piece.outputs, piece.label)


def _unit_label(eqns, terms, prog: Program, prefix: str, calls, n: int) -> str:
    """A residual unit's label when a piece holds several: the submodule call holding its
    branch's matrix products (``blocks.3.attn``), several of them side by side
    (``blocks.3.[fc,proj]``), the piece's own call when its output is the branch; none
    found: ``<piece>#<n>``."""
    holders = {call_of(e) for e in eqns if e.primitive.name in _LINEAR} - {None}
    if not calls or not holders:
        return f"{prefix}#{n}"

    def ancestors(c):  # c, its parent, ..., the model's own call
        out = []
        while c >= 0:
            out.append(c)
            c = calls[c].parent
        return out

    common = set(ancestors(next(iter(holders))))
    for c in holders:
        common &= set(ancestors(c))
    lca = max(common, key=lambda c: calls[c].depth)
    own = [i for i, c in enumerate(calls) if c.path == prefix]
    if own and lca == own[0]:
        outs = {m.var for m in prog.markers if m.kind == "out" and m.call == lca}
        if outs & set(terms):
            return prefix
    elif not own or lca not in ancestors(own[0]):
        return calls[lca].path
    below = []
    for c in holders:  # the children of lca that hold them
        chain = ancestors(c)
        below.append(chain[chain.index(lca) - 1] if chain.index(lca) > 0 else lca)
    below = list(dict.fromkeys(sorted(below)))
    if len(below) == 1:
        return calls[below[0]].path
    base = calls[lca].path
    names = [calls[c].path[len(base) + 1 :] if base else calls[c].path for c in below]
    return f"{base}.[{','.join(names)}]" if base else f"[{','.join(names)}]"


# -- 4. stages ---------------------------------------------------------------------------


def _runner(
    sub: Sub,
    leading: bool,
    total: bool = False,
    out_tree=None,
    pair: bool = False,
    heads: bool = False,
):
    """``(p, h) -> value`` evaluating ``sub`` on the unit's params tuple ``p`` (indexed by
    the positions of ``sub.params`` in the unit's leaves, bound at :func:`stages`) and
    ``h`` (a pytree whose leaves are the sub's inputs); ``leading``: the program was
    traced with a leading batch axis of 1 that ``h`` lacks."""
    jaxpr, consts = sub.jaxpr, sub.consts

    def run(ps, h):
        hs = jax.tree_util.tree_leaves(h)
        if leading:
            hs = [a[None] for a in hs]
        outs = jax.core.eval_jaxpr(jaxpr, consts, *ps, *hs)
        if leading:
            outs = [o[0] for o in outs]
        if total:
            return functools.reduce(jnp.add, outs)
        if pair:  # (output, pre-activation)
            return outs[0], outs[1]
        if heads:  # attention weights (..., T_q, T_k) -> (heads, T_q, T_k)
            return outs[0].reshape(-1, *outs[0].shape[-2:])
        return out_tree.unflatten(outs) if out_tree is not None else outs[0]

    return run


def unit_stage(u: Unit, leading: bool, out_tree=None) -> Layer | Block:
    """The :class:`Layer` or :class:`Block` of a unit; its params are the tuple of the
    leaves ``u.leaves`` of the model's params."""
    pos = {leaf: k for k, leaf in enumerate(u.leaves)}

    def bind(sub: Sub | None, **kw):
        if sub is None:
            return None
        run = _runner(sub, leading, **kw)
        idx = tuple(pos[i] for i in sub.params)
        return lambda p, h: run([p[k] for k in idx], h)

    subs = u.subs
    attention = bind(subs.get("attention"), heads=True)
    if u.kind == "layer":
        pre = None if out_tree is not None else bind(subs.get("pre"), pair=True)
        return Layer(bind(subs["apply"], out_tree=out_tree), pre, attention)
    return Block(
        bind(subs["branch"], total=True),
        bind(subs["skip"]),
        bind(subs["post"]),
        bind(subs.get("pre")),
        attention,
    )


def group(idents: Sequence, max_period: int = 4) -> list[tuple[int, int, int]]:
    """Runs of repeated idents: ``(start, k, n)`` = ``n`` copies of the ``k`` units from
    ``start`` (``n = 1``: not repeated). Prefers the most units covered, then the
    shortest group."""
    out, i, N = [], 0, len(idents)
    while i < N:
        best_k, best_n = 1, 1
        for k in range(1, max_period + 1):
            n = 1
            while i + (n + 1) * k <= N and list(idents[i + n * k : i + (n + 1) * k]) == list(
                idents[i : i + k]
            ):
                n += 1
            if n >= 2 and n * k > best_n * best_k:
                best_k, best_n = k, n
        out.append((i, best_k, best_n))
        i += best_k * best_n
    return out


class Read(NamedTuple):
    """A read model: its stages and how their params come from the model's params.

    Fields:
        stages, names: as :class:`~jacobian_lab.model.Model`'s.
        layout: per stage, the leaf indices of the model's params it reads: a tuple for a
            single unit; for a :class:`Repeat` of ``k`` units, ``k`` tuples of ``n``
            tuples (copy by copy).
        idents: per stage, what it computes apart from its params.
        report: one line per automatic choice (what was stacked, and what not and why).
    """

    stages: tuple
    names: tuple
    layout: tuple
    idents: tuple
    report: tuple

    @property
    def key(self) -> tuple:
        """A hashable description of what the stages compute apart from the params and
        which leaves they read (equal keys: equal models)."""
        layout = tuple(
            ("scan", lay[1].text, *lay[2:]) if lay and lay[0] == "scan" else lay
            for lay in self.layout
        )
        return self.idents, layout


def stages(found: Sequence, leading: bool, out_tree, stack: bool = True) -> Read:
    """Stack the units (module docstring, step 4) into stages; a :class:`ScanStage` is a
    stage of its own."""
    idents = [u.ident for u in found]
    runs = group(idents) if stack else [(i, 1, 1) for i in range(len(found))]
    st, names, layout, ids, report, single = [], [], [], [], [], []
    last = len(found) - 1
    for start, k, n in runs:
        if isinstance(found[start], ScanStage):
            for c in range(n):  # (equal scans side by side stay separate stages)
                sc = found[start + c]
                made = [unit_stage(u, leading) for u in sc.units]
                st.append(Repeat(made[0] if len(made) == 1 else tuple(made), sc.n))
                layout.append(
                    ("scan", sc.params, sc.num_consts, sc.reverse, sc.n)
                    + tuple(u.leaves for u in sc.units)
                )
                names += [_copy_label(u.label, sc.label, j) for j in range(sc.n) for u in sc.units]
                ids.append(sc.ident)
                report.append(f"{sc.label}: a scanned stack of {sc.n} blocks, kept one stage")
            continue
        copies = [found[start + c * k : start + (c + 1) * k] for c in range(n)]
        names += [u.label for copy in copies for u in copy]
        made = [
            unit_stage(u, leading, out_tree if start + j == last else None)
            for j, u in enumerate(copies[0])
        ]
        if n == 1:
            st.append(made[0])
            layout.append(copies[0][0].leaves)
            if copies[0][0].label not in ("stem", "head"):
                single.append(copies[0][0].label)
        else:
            st.append(Repeat(made[0] if k == 1 else tuple(made), n))
            per_unit = tuple(tuple(copy[j].leaves for copy in copies) for j in range(k))
            layout.append(per_unit[0] if k == 1 else per_unit)
            what = copies[0][0].label if k == 1 else ", ".join(u.label for u in copies[0])
            report.append(f"stacked {n} copies of ({what}) into one scanned stage")
        ids.append((k, n, tuple(u.ident for u in copies[0])))
    if stack and single:
        report.append(
            f"not stacked, each unlike its neighbours (another function or param shapes): "
            f"{', '.join(single)}"
        )
    return Read(tuple(st), tuple(names), tuple(layout), tuple(ids), tuple(report))


def _copy_label(label: str, block: str, c: int) -> str:
    """The label of copy ``c`` of a unit of a scanned block: the copy's index after the
    block's path (``blocks.3``, ``blocks.3.attn``)."""
    rest = label[len(block) :] if label.startswith(block) else f".{label}"
    return f"{block}.{c}{rest}"


def stage_params(read_layout: tuple, stages_: tuple, params) -> tuple:
    """The params of each stage from the model's own params (stacking repeated copies)."""
    leaves = jax.tree_util.tree_leaves(params)
    out = []
    for stage, lay in zip(stages_, read_layout, strict=True):
        if lay and lay[0] == "scan":
            _, sub, nc, reverse, n, *per_unit = lay
            vals = jax.core.eval_jaxpr(sub.jaxpr, sub.consts, *(leaves[i] for i in sub.params))
            vals = [jnp.broadcast_to(v, (n, *jnp.shape(v))) for v in vals[:nc]] + [
                v[::-1] if reverse else v for v in vals[nc:]
            ]
            made = tuple(tuple(vals[i] for i in pick) for pick in per_unit)
            out.append(made[0] if isinstance(stage.stage, Layer | Block) else made)
            continue
        if not isinstance(stage, Repeat):
            out.append(tuple(leaves[i] for i in lay))
            continue
        grouped = not isinstance(stage.stage, Layer | Block)
        per_unit = lay if grouped else (lay,)
        stacked = tuple(
            tuple(jnp.stack([leaves[copy[m]] for copy in unit]) for m in range(len(unit[0])))
            for unit in per_unit
        )
        out.append(stacked if grouped else stacked[0])
    return tuple(out)


# -- 5. the whole read -------------------------------------------------------------------


_RANDOM = {"random_bits", "threefry2x32", "random_seed"}


class Reading(NamedTuple):
    """What :func:`read_model` found.

    Fields:
        read: the stages (:class:`Read`).
        embed: for token-id inputs, ``(params, ids) -> f_L`` for one sample (the stem up
            to the first block's input), else ``None``.
        sample: one sample of the analysed input ``f_L`` (a pytree of
            ``jax.ShapeDtypeStruct``), without the sample axis.
        ids: one sample of the token ids when the model was read from them, else ``None``.
        batch_coupled: whether one sample is a whole batch.
        report: one line per automatic choice.
    """

    read: Read
    embed: Callable | None
    sample: Any
    ids: Any
    batch_coupled: bool
    report: tuple


def _integer(tree) -> bool:
    return any(
        jnp.issubdtype(jnp.result_type(v), jnp.integer) for v in jax.tree_util.tree_leaves(tree)
    )


def _spec(tree, drop: int):
    return jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(tuple(jnp.shape(v))[drop:], jnp.result_type(v)), tree
    )


def read_model(mf, x, *, at=None, batch_coupled: bool | None = None, stack: bool = True):
    """Read the model of the front-end function ``mf`` (:class:`~jacobian_lab.frontends.
    ModelFunction`) on example inputs ``x`` (module docstring). Returns :class:`Reading`."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or any(jnp.ndim(v) == 0 for v in leaves):
        raise ValueError(
            "x must be example inputs with a leading sample axis (shape (S, *sample_shape); "
            "one batch for a model with batch statistics)"
        )
    x = jax.tree_util.tree_map(jnp.asarray, x)
    first = jax.tree_util.tree_map(lambda v: v[:1] if mf.batched else v[0], x)
    try:
        prog = trace_program(mf.fn, mf.params, first)
    except ReadError:
        raise
    except Exception as e:
        shapes = [tuple(jnp.shape(v)) for v in jax.tree_util.tree_leaves(first)]
        how = (
            "one input with a batch axis of 1 (batched=True; pass batched=False for a model "
            "written for one input)"
            if mf.batched
            else "one input without a batch axis (batched=False; pass batched=True for a "
            "model written for a batch)"
        )
        raise ReadError(
            f"the model failed when called on {how}, of shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}: {type(e).__name__}: {e}"
        ) from e
    found = mf.info.get("coupled", False) if mf.coupled is None else mf.coupled
    if batch_coupled is None:
        batch_coupled = bool(found)
    elif not batch_coupled and found:
        raise ValueError(
            "batch_coupled=False, but the model normalizes with the statistics of the batch "
            "it is given (a BatchNorm in training mode); leave batch_coupled unset, or switch "
            "the BatchNorm to its running averages (e.g. kwargs={'train': False})"
        )
    report = []
    if batch_coupled:
        fn = mf.fn if mf.batched else (mf.per_sample_batch or jax.vmap(mf.fn, (None, 0)))
        if jax.tree_util.tree_leaves(x)[0].shape[0] < 2:
            raise ValueError("a model with batch statistics needs a batch of at least 2 inputs")
        prog = trace_program(fn, mf.params, x)
        leading = False
        report.append("batch statistics: one sample is the whole batch")
    else:
        leading = mf.batched
    for eqn in prog.eqns:
        if eqn.primitive.name in _RANDOM:
            raise ReadError(
                f"the model draws random numbers in its forward pass ({eqn.primitive.name} in "
                f"{_scope(eqn)}): jacobian_lab analyses a deterministic function. Pass the "
                "call argument that turns dropout off (e.g. kwargs={'train': False} or "
                "{'deterministic': True}), or use eqx.nn.inference_mode for Equinox"
            )
    calls = mf.info.get("calls", [])
    graph = _Graph(prog)
    errors = []
    for cuts, names, kinds in _select(prog, graph, calls, at):
        try:
            pieces = cut(prog, cuts, names, kinds)
            break
        except ReadError as e:
            errors.append(e)
    else:
        raise errors[0]
    ids = _integer(x)
    # a stem or head without params joins the block next to it (as an activation joins
    # the layer before it); a token-id stem stays: it is the embedding
    if (
        pieces[0].kind == "stem"
        and not ids
        and not graph.sub(pieces[0].outputs, pieces[0].inputs).params
    ):
        cuts, names, kinds = cuts[1:], [names[1], *names[2:]], ["block", *kinds[2:]]
        pieces = cut(prog, cuts, names, kinds)
        report.append(f"the stem has no params: it joins {names[0]!r}")
    last = pieces[-1]
    if (
        last.kind == "head"
        and len(last.outputs) == 1
        and len(pieces) > 1
        and not graph.sub(last.outputs, last.inputs).params
        and calls
    ):
        cuts, names, kinds = cuts[:-1], names[:-1], kinds[:-1]
        pieces = cut(prog, cuts, names, kinds)
        report.append(f"the head has no params: it joins {names[-1]!r}")
    found_units = [u for p in pieces for u in units(graph, p, calls)]
    count = sum(u.n * len(u.units) if isinstance(u, ScanStage) else 1 for u in found_units)
    if count - (1 if ids else 0) < 2:
        raise ReadError(
            f"found {count} layer output(s) ({', '.join(u.label for u in found_units)}"
            "); an analysis needs at least two. Choose finer layer outputs with at= (a module "
            "class, a tuple of classes, a predicate on the submodule path such as "
            "lambda path: path.startswith('blocks.'), or 'all' for every submodule call)"
            + ("" if calls else ", or mark them with jl.tap(h) inside apply")
        )
    embed = None
    sample = _spec(x, 1)
    if ids:
        stem = found_units[0]
        if not isinstance(stem, Unit) or stem.kind != "layer" or stem.label != "stem":
            raise ReadError(
                "x holds integers (token ids), so the analysis starts at the embedding's output: "
                "the model needs a stem (the embedding) before its first found block"
            )
        run = unit_stage(stem, leading).apply
        pick = stem.leaves

        def embed(params, xi):
            p = jax.tree_util.tree_leaves(params)
            return run(tuple(p[i] for i in pick), xi)

        one = jax.tree_util.tree_map(lambda v: v[0], x)
        sample = jax.eval_shape(lambda xi: embed(mf.params, xi), one)
        found_units = found_units[1:]
        report.append("token ids: the analysis starts at the embedding's output (the stem)")
    read = stages(found_units, leading, prog.out_tree, stack)
    verify(read, mf, x, batch_coupled, embed)
    return Reading(
        read,
        embed,
        sample,
        _spec(x, 1) if ids else None,
        bool(batch_coupled),
        (*report, *read.report),
    )


def _select(prog: Program, graph: _Graph, calls, at):
    """The cuts, piece names and kinds for ``at`` (see :func:`read_model`)."""
    by: dict = {}
    for m in prog.markers:
        if m.var in graph.dep:
            by.setdefault((m.kind, m.call), []).append(m)
    if not calls:
        taps = sorted({c for k, c in by if k == "tap"}, key=lambda c: by[("tap", c)][0].pos)
        labels = {c: by[("tap", c)][0].label or f"tap{i}" for i, c in enumerate(taps)}
        if at is not None:
            if not callable(at):
                raise TypeError("at= for a plain-JAX model is a predicate on the tap names")
            taps = [c for c in taps if at(labels[c])]
        if not taps:
            raise ReadError(
                "found no layer outputs: mark them inside apply with jl.tap(h) (an identity "
                "outside an analysis), e.g. `h = jl.tap(jnp.tanh(h @ W + b))`"
            )
        cuts = [tuple(m.var for m in sorted(by[("tap", c)], key=lambda m: m.leaf)) for c in taps]
        names = [labels[c] for c in taps] + ["head"]
        return [(cuts, names, ["block"] * len(taps) + ["head"])]
    usable = [i for i in range(len(calls)) if ("in", i) in by and ("out", i) in by]

    def sequential(a: int, b: int) -> bool:
        reach = {m.var for m in by[("out", a)]}
        start, stop = by[("out", a)][0].pos, by[("in", b)][0].pos
        for eqn in prog.eqns[start:stop]:
            if any(isinstance(v, jcore.Var) and v in reach for v in eqn.invars):
                reach.update(eqn.outvars)
        return any(m.var in reach for m in by[("in", b)])

    if at is None:  # the repeated blocks: a scanned stack of blocks, or else ...
        chosen = [] if prog.scans else None
        depths = sorted({calls[i].depth for i in usable if calls[i].depth > 0})
        for d in [] if prog.scans else depths:
            groups: dict = {}
            for i in usable:
                if calls[i].depth == d:
                    groups.setdefault((calls[i].parent, calls[i].cls), []).append(i)
            viable = [
                g
                for g in groups.values()
                if len(g) >= 2 and all(sequential(a, b) for a, b in itertools.pairwise(g))
            ]
            if viable:
                chosen = max(viable, key=lambda g: (len(g), -g[0]))
                break
        if not chosen and not prog.scans:
            kinds = sorted({c.cls.__name__ for c in calls[1:]})
            raise ReadError(
                "found no repeated blocks (submodules of one class called in sequence, one "
                "after another's output): choose the layer outputs with at= (a module class, "
                f"a tuple of classes, a predicate on the path, or 'all'); the model calls "
                f"{', '.join(kinds) or 'no submodules'}"
            )
        selected = chosen
    else:
        if at == "all":
            parents = {c.parent for c in calls}
            match = [i for i in usable if calls[i].depth > 0 and i not in parents]
        elif isinstance(at, type) or (
            isinstance(at, tuple) and at and all(isinstance(a, type) for a in at)
        ):
            match = [i for i in usable if calls[i].depth > 0 and issubclass(calls[i].cls, at)]
        elif callable(at):
            match = [i for i in usable if calls[i].depth > 0 and at(calls[i].path)]
        else:
            raise TypeError(
                f"at= must be a module class, a tuple of classes, a predicate on the submodule "
                f"path, or 'all'; got {at!r}"
            )
        chosen_set = set(match)

        def outermost(i):
            p = calls[i].parent
            while p >= 0:
                if p in chosen_set:
                    return False
                p = calls[p].parent
            return True

        selected = [i for i in match if outermost(i)]
        if not selected:
            paths = ", ".join(f"{c.path} ({c.cls.__name__})" for c in calls[1:][:12])
            raise ReadError(f"at={at!r} matched no submodule call; the model calls {paths}, ...")
        for a, b in itertools.pairwise(selected):
            if not sequential(a, b):
                raise ReadError(
                    f"{calls[b].path!r} does not take the output of {calls[a].path!r} (they run "
                    "side by side, or the second reads an earlier value): layer outputs must "
                    "follow one another; choose them with at="
                )
    events = sorted(
        [(by[("in", i)][0].pos, "call", i) for i in selected] + [(j, "scan", j) for j in prog.scans]
    )
    cuts, names, kinds = [], ["stem"], ["stem"]
    for _, what, i in events:
        if what == "call":
            cuts.append(tuple(m.var for m in by[("in", i)]))
            names.append(calls[i].path)
            kinds.append("block")
            continue
        eqn, body = prog.eqns[i], prog.scans[i]
        nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
        inside = [calls[m.call] for m in body.markers if m.kind == "in" and m.call < len(calls)]
        label = min(inside, key=lambda c: c.depth).path if inside else f"scan{i}"
        cuts.append(tuple(a for a in eqn.invars[nc : nc + nk] if a in graph.dep))
        cuts.append(tuple(eqn.outvars[:nk]))
        names += [label, f"after {label}"]
        kinds += ["scan", "block"]
    ends = [None]
    if events[-1][1] == "call":
        ends = _last_block_ends(prog, graph, calls, usable, selected, by, sequential)
    else:
        names[-1], kinds[-1] = "head", "head"
    options = []
    for end in ends:
        c, n, k = list(cuts), list(names), list(kinds)
        if end is not None:
            c.append(end)
            n.append("head")
            k.append("head")
        options.append(_dedupe(c, n, k))
    return options


def _last_block_ends(prog, graph, calls, usable, selected, by, sequential) -> list:
    """Where the last found block may end, best first (the first that cuts cleanly is
    used): the first value at or after its output (after the calls that follow every
    other block too, such as a norm after each Dense) that every path to the model's
    output passes through (its output, or the residual add its parent makes with it);
    the input of the next call that reads it; the model's output (``None``)."""
    last = selected[-1]
    siblings = [i for i in usable if calls[i].parent == calls[last].parent]
    after = [i for i in siblings if i > last and not _inside(calls, i, last)]
    end_call = last
    if len(selected) > 1:
        gap = [calls[i].cls for i in siblings if selected[0] < i < selected[1]]
        if gap and [calls[i].cls for i in after[: len(gap)]] == gap:
            end_call = after[len(gap) - 1]
    ends = []
    outs = by[("out", end_call)]
    if len(outs) == 1:
        d = _first_dominator(prog, graph, by[("in", last)], outs[0].var, outs[0].pos)
        if d is not None:
            ends.append((d,))
    ends.append(tuple(m.var for m in by[("out", last)]))
    nxt = [i for i in usable if i > end_call and not _inside(calls, i, last)]
    nxt = [i for i in nxt if sequential(last, i)]
    if nxt:
        ends.append(tuple(m.var for m in by[("in", nxt[0])]))
    ends.append(None)
    return list(dict.fromkeys(ends))


def _first_dominator(prog, graph, starts, after, pos: int):
    """The first var, ``after`` or one made after position ``pos``, through which every
    path from the ``starts`` markers' vars to the model's outputs passes; or ``None``."""
    source = {m.var for m in starts}
    first = min(m.pos for m in starts)
    outputs = {a for a in prog.outvars if isinstance(a, jcore.Var) and a in graph.dep}
    candidates = [after] + [
        e.outvars[0] for e in prog.eqns[pos:] if len(e.outvars) == 1 and e.outvars[0] in graph.dep
    ]
    for v in candidates[:64]:  # the head is short; bound the search
        reach = set(source) - {v}
        for e in prog.eqns[first:]:
            if any(isinstance(a, jcore.Var) and a in reach for a in e.invars):
                reach.update(o for o in e.outvars if o is not v)
        if not reach & outputs and v not in source:
            return v
    return None


def _inside(calls, i: int, ancestor: int) -> bool:
    p = calls[i].parent
    while p >= 0:
        if p == ancestor:
            return True
        p = calls[p].parent
    return False


def _dedupe(cuts, names, kinds):
    """Two equal cuts (a block taking a scan's output as it is) leave an empty piece
    between them: the piece starting at the later one takes its place."""
    out_c, out_n, out_k = [], [names[0]], [kinds[0]]
    for j, c in enumerate(cuts):
        if out_c and c == out_c[-1]:
            out_n[-1], out_k[-1] = names[j + 1], kinds[j + 1]
            continue
        out_c.append(c)
        out_n.append(names[j + 1])
        out_k.append(kinds[j + 1])
    return out_c, out_n, out_k


class _Stages(Model):
    """The stages of a :class:`Read` as a model, for :func:`verify`."""

    def __init__(self, read: Read):
        self.stages, self.names, self.batch_coupled = read.stages, read.names, False
        self._layout = read.layout

    def stage_params(self, params) -> tuple:
        return stage_params(self._layout, self.stages, params)


def verify(read: Read, mf, x, coupled: bool, embed) -> None:
    """Raise :class:`ReadError` unless the stages, run in turn, reproduce the model's own
    output on ``x``: to ``1e-10`` of the output's largest entry in float64 and ``1e-4``
    in float32 (the stages run the model's own operations, but on one sample rather than
    a batch, where XLA may order sums differently, and a residual branch of several terms
    is summed in another order)."""
    model = _Stages(read)

    def run(params, xi):
        h = xi if embed is None else embed(params, xi)
        return forward(model, params, h)[0]

    # two compiled programs: eager execution would compile every primitive on its own
    if coupled:
        fn = mf.fn if mf.batched else (mf.per_sample_batch or jax.vmap(mf.fn, (None, 0)))
        ours = run
    elif mf.batched:
        fn, ours = mf.fn, jax.vmap(run, (None, 0))
    else:
        fn, ours = jax.vmap(mf.fn, (None, 0)), jax.vmap(run, (None, 0))
    want, got = jax.jit(fn)(mf.params, x), jax.jit(ours)(mf.params, x)
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True):
        w, g = np.asarray(w), np.asarray(g)
        if w.shape != g.shape:
            raise ReadError(
                f"the layers found give an output of shape {g.shape}, the model {w.shape}; "
                "please report this model"
            )
        if not np.issubdtype(w.dtype, np.floating):
            continue
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        tol = (1e-10 if w.dtype == np.float64 else 1e-4) * max(scale, np.finfo(w.dtype).tiny)
        err = float(np.max(np.abs(w - g))) if w.size else 0.0
        if not err <= tol:
            raise ReadError(
                f"the layers found, run in turn, do not reproduce the model's output on x (the "
                f"largest difference is {err:.3g}, against {scale:.3g} for the output itself). "
                "Causes: the model mixes the inputs of a batch (batch statistics: pass "
                "batch_coupled=True), it is written for one input at a time (pass batched="
                "False), or it draws random numbers."
            )
