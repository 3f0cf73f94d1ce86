"""How the primitives are split over a device mesh.

One plan decides, from how x is sharded, which mesh axes split the batch and
which split the channels; everything else follows from it:

* batch (N of x, offset, mask, y): always shard-local.
* channels (C of x, C*M of weight, bias and y): only when the shard count
  divides C and either G = 1 (every shard then needs all offsets, which stay
  replicated over those axes) or the shard count divides G (each shard holds
  whole offset groups, so the offsets' channel axis is split with C).
* spatial axes and kernel taps: always replicated (a tap may read any pixel).

The plan is used twice: in abstract evaluation, where mesh axes of type
Explicit put shardings into the types, and in the custom partitioning rule
that tells XLA (Shardy, or GSPMD when Shardy is off) how to run the kernel per
shard.

Reductions that cross shards (grad_weight over batch shards, grad_offset and
grad_mask over channel shards when G = 1) are not done inside the partitioned
call: the backward returns them as partial sums along a leading axis, one per
shard, sharded over the mesh axes being reduced, and the caller adds them up
with an ordinary jnp.sum, for which XLA's own partitioner emits the
all-reduce. The per-shard program is then the kernel alone. (A collective traced
inside a partitioning callback is lowered under whatever mesh is current
there; under `jax.set_mesh` with Explicit axes jax wraps the all-reduce's
reducer in sharding ops, which XLA:GPU rejects.) The number of partial sums is
a shape, so it is fixed at trace time, from the types: with Auto axes, where
XLA picks the split only later, there is one, and the callback then sums
across shards itself with a psum, which is safe there because no mesh with
Explicit axes is current.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_deform._params import ConvParams, Layout, layout_of


@dataclasses.dataclass(frozen=True)
class Plan:
    """Mesh axes over the batch and over the channels (empty tuple: none)."""

    batch: tuple[str, ...] = ()
    channel: tuple[str, ...] = ()
    split_groups: bool = False  # offsets/mask channel axis split along with C

    @staticmethod
    def _entry(axes: tuple[str, ...]):
        return None if not axes else axes[0] if len(axes) == 1 else axes

    @property
    def _b(self):
        return self._entry(self.batch)

    @property
    def _c(self):
        return self._entry(self.channel)

    def x(self) -> P:
        return P(self._b, None, None, self._c)

    y = grad_x = x

    def offset(self, present: bool = True) -> P:
        if not present:
            return P(None)
        return P(self._b, None, None, self._c if self.split_groups else None)

    mask = offset

    def weight(self) -> P:
        return P(None, None, None, self._c)

    def bias(self, present: bool = True) -> P:
        return P(self._c if present else None)

    def offset_reduction_axes(self) -> tuple[str, ...]:
        """grad_offset/grad_mask are partial sums over channel shards when G = 1."""
        return () if self.split_groups else self.channel


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def plan(x_spec, axis_sizes: dict[str, int], layout: Layout) -> Plan:
    """The plan for an x sharded as `x_spec` on a mesh with `axis_sizes`."""
    spec = tuple(x_spec) + (None,) * (4 - len(tuple(x_spec)))
    batch = tuple(a for a in _axes(spec[0]) if a in axis_sizes)
    channel = tuple(a for a in _axes(spec[3]) if a in axis_sizes)
    if len(batch) != len(_axes(spec[0])) or layout.n % _count(batch, axis_sizes):
        batch = ()
    shards = _count(channel, axis_sizes)
    if len(channel) != len(_axes(spec[3])) or layout.c % shards:
        channel = ()
    elif layout.groups > 1 and layout.groups % shards:
        channel = ()  # a channel shard would hold part of a group: keep C whole
    split_groups = bool(channel) and layout.groups > 1
    return Plan(batch=batch, channel=channel, split_groups=split_groups)


def _count(axes, axis_sizes) -> int:
    return math.prod(axis_sizes[a] for a in axes)


# ------------------------------------------------- abstract eval (Explicit axes)


def _typed_plan(x_aval, layout: Layout) -> Plan:
    # Only Explicit axes appear in the types; Auto axes are XLA's business.
    sharding = x_aval.sharding
    return plan(sharding.spec, dict(sharding.mesh.shape), layout)


def _typed(x_aval, spec: P):
    return x_aval.sharding.update(spec=spec)


def forward_output_sharding(x, offset, weight):
    """Sharding of y in the types: like x over batch and channels."""
    return _typed(x, _typed_plan(x, layout_of(x, offset, weight)).y())


class Partials(NamedTuple):
    """How many partial sums the backward returns along a leading axis: of
    grad_offset and grad_mask (one per channel shard when G = 1) and of
    grad_weight (one per batch shard). Their sum is the gradient."""

    offset: int = 1
    weight: int = 1

    def result_shapes(self, x, offset, mask, weight):
        """Shapes of (grad_x, grad_offset, grad_mask, grad_weight) given the
        operands' shapes; an absent mask's gradient stays empty."""
        has_mask = math.prod(mask) > 0
        return (tuple(x), (self.offset, *offset),
                (self.offset, *mask) if has_mask else tuple(mask), (self.weight, *weight))


def _spec_axes(spec) -> set[str]:
    return {a for entry in spec for a in _axes(entry)}


def _typed_reductions(x, offset, mask, weight) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The Explicit mesh axes over which grad_offset/grad_mask and grad_weight
    are summed across shards, by the types. An axis that already shards the
    gradient itself cannot also index its partial sums (never the case for
    the plan's own shardings): those are left to the partitioner."""
    p = _typed_plan(x, layout_of(x, offset, weight))

    def free(axes, *avals):
        used = set().union(*(_spec_axes(a.sharding.spec) for a in avals))
        other_mesh = any(not a.sharding.mesh.empty and a.sharding.mesh != x.sharding.mesh
                         for a in avals)
        return () if used & set(axes) or other_mesh else axes

    return free(p.offset_reduction_axes(), offset, mask), free(p.batch, weight)


def typed_partials(x, offset, mask, weight) -> Partials:
    """The partial-sum counts for operands of these types."""
    axes_o, axes_w = _typed_reductions(x, offset, mask, weight)
    sizes = dict(x.sharding.mesh.shape)
    return Partials(offset=_count(axes_o, sizes), weight=_count(axes_w, sizes))


def _leading(axes: tuple[str, ...], spec) -> P:
    return P(Plan._entry(axes), *spec)


def backward_output_shardings(x, offset, mask, weight, partials: Partials):
    """Shardings of (grad_x, grad_offset, grad_mask, grad_weight) in the types.
    Summed over their leading axis they are exactly those of the operands
    (the tangent's transpose must return those); the leading axis is split
    over the mesh axes the partial sums come from, when the types say which."""
    axes_o, axes_w = _typed_reductions(x, offset, mask, weight)
    sizes = dict(x.sharding.mesh.shape)

    def lead(aval, axes, count):
        if aval.size == 0:  # absent mask
            return aval.sharding
        spec = tuple(aval.sharding.spec) + (None,) * (aval.ndim - len(aval.sharding.spec))
        if count == 1 or _count(axes, sizes) != count:
            return _typed(aval, _leading((), spec))
        # The axes are x's; an operand without a mesh in its type is replicated.
        return _typed(aval if aval.sharding.mesh == x.sharding.mesh else x, _leading(axes, spec))

    return (x.sharding, lead(offset, axes_o, partials.offset), lead(mask, axes_o, partials.offset),
            lead(weight, axes_w, partials.weight))


def sum_partials(grad, count: int):
    """The gradient from its partial sums (a leading axis of `count`): XLA
    turns the sum over a sharded axis into an all-reduce."""
    if count == 1:
        return jax.lax.squeeze(grad, (0,))  # bitwise the kernel's result
    return jnp.sum(grad, axis=0)


# -------------------------------------------------- custom partitioning rules


def _mesh_plan(mesh, arg_shapes, layout: Layout) -> Plan:
    sharding = arg_shapes[0].sharding
    if not isinstance(sharding, NamedSharding):  # no named mesh: run replicated
        return Plan()
    return plan(sharding.spec, dict(mesh.shape), layout)


def _named(mesh, specs):
    return tuple(NamedSharding(mesh, s) for s in specs)


def _factors(*named_sizes: tuple[str, int]) -> list[tuple[str, int]]:
    """The factors of one dimension, leaving out size-1 ones (never split)."""
    kept = [f for f in named_sizes if f[1] != 1]
    return kept or [named_sizes[-1]]


class _Rule:
    """Builds a Shardy rule string; factor sizes are given where needed."""

    def __init__(self):
        self.whole: set[str] = set()
        self.sizes: dict[str, int] = {}

    def dim(self, *named_sizes: tuple[str, int]) -> str:
        factors = _factors(*named_sizes)
        if len(factors) == 1:
            self.whole.add(factors[0][0])
            return factors[0][0]
        self.sizes.update(factors)
        return "(" + " ".join(name for name, _ in factors) + ")"

    def array(self, *dims: str) -> str:
        return " ".join(dims)

    def factor_sizes(self) -> dict[str, int]:
        return {k: v for k, v in self.sizes.items() if k not in self.whole}


#: Factors that are never split: spatial axes, taps, offset channels that are
#: not tied to x's channels, and the empty placeholders of absent operands.
_REPLICATED = ("h", "w", "ho", "wo", "kh", "kw", "one", "taps2", "taps", "offsets", "masks",
               "nomask", "nobias", "osum", "wsum")


def _channel_dims(rule: _Rule, layout: Layout, mesh, partials: int = 1):
    """x's C, C*M, and the offsets' and mask's channel axes, as rule dims.

    With G > 1 the offset group is a factor shared by x's channels and the
    offsets' channels, so a channel split carries over to the offsets. That
    is only offered when every mesh axis divides G: otherwise Shardy may split
    one mesh axis over group and channel-in-group (sub-axes), which the
    partitioning callbacks cannot express; the offsets' channels are then
    kept whole and each channel shard slices its groups locally.

    With `partials` > 1 (G = 1, channels split in the types) the channels'
    major factor "rc" is the channel shard that each partial sum of the
    offsets' gradient comes from.
    """
    g, cg, m, k = layout.groups, layout.c // layout.groups, layout.multiplier, layout.taps
    if partials > 1:
        c = (("rc", partials), ("c", layout.c // partials))
        return rule.dim(*c), rule.dim(*c, ("m", m)), "offsets", "masks"
    if g > 1 and all(g % size == 0 for size in dict(mesh.shape).values()):
        # Channel c*M + j of y reads channel c of x, which is in group c // cg.
        c_dim = rule.dim(("g", g), ("cg", cg))
        cm_dim = rule.dim(("g", g), ("cg", cg), ("m", m))
        off_dim = rule.dim(("g", g), ("taps2", 2 * k))
        mask_dim = rule.dim(("g", g), ("taps", k))
    else:
        c_dim = rule.dim(("c", layout.c))
        cm_dim = rule.dim(("c", layout.c), ("m", m))
        off_dim = rule.dim(("offsets", 2 * g * k))
        mask_dim = rule.dim(("masks", g * k))
    return c_dim, cm_dim, off_dim, mask_dim


def _operand_dims(r: _Rule, layout: Layout, has_mask: bool, has_bias: bool,
                  mesh) -> tuple[dict[str, str], str]:
    """The rule dims of each forward operand, by role, and of y."""
    c, cm, off, msk = _channel_dims(r, layout, mesh)
    dims = dict(
        x=r.array("n", "h", "w", c),
        offset=r.array("n", "ho", "wo", off),
        mask=r.array("n", "ho", "wo", msk) if has_mask else "nomask",
        weight=r.array("kh", "kw", "one", cm),
        bias=cm if has_bias else "nobias",
    )
    return dims, r.array("n", "ho", "wo", cm)


def _like_forward_rule(roles: tuple[str, ...]) -> Callable:
    """The Shardy rule of a call whose operands have these forward roles and
    whose result is sharded as y (see _like_forward)."""

    def rule(options, layout, has_mask, has_bias, mesh, operand_types, result_types):
        del options, operand_types, result_types
        r = _Rule()
        dims, y = _operand_dims(r, layout, has_mask, has_bias, mesh)
        text = " , ".join(dims[role] for role in roles) + " -> " + y
        return text, _rule_kwargs(text, r)

    return rule


def _backward_rule(params, deterministic, layout, has_mask, partials, mesh, operand_types,
                   result_types):
    del params, deterministic, operand_types, result_types
    r = _Rule()
    c, cm, off, msk = _channel_dims(r, layout, mesh, partials.offset)
    # The batch's major factor "rb" is the batch shard each partial sum of
    # grad_weight comes from; likewise "rc" for the offsets' gradient.
    n = r.dim(("rb", partials.weight), ("n", layout.n // partials.weight))
    lead_o = r.dim(("rc", partials.offset)) if partials.offset > 1 else "osum"
    lead_w = r.dim(("rb", partials.weight)) if partials.weight > 1 else "wsum"
    x, offset = r.array(n, "h", "w", c), r.array(n, "ho", "wo", off)
    mask = r.array(n, "ho", "wo", msk) if has_mask else "nomask"
    weight, grad_y = r.array("kh", "kw", "one", cm), r.array(n, "ho", "wo", cm)
    grad_mask = r.array(lead_o, mask) if has_mask else "nomask"
    rule = (f"{x} , {offset} , {mask} , {weight} , {grad_y} -> "
            f"{x} , {lead_o} {offset} , {grad_mask} , {lead_w} {weight}")
    return rule, _rule_kwargs(rule, r)


def _rule_kwargs(rule: str, r: _Rule) -> dict:
    tokens = rule.replace("(", " ").replace(")", " ").replace(",", " ").replace("->", " ").split()
    # Shardy numbers factors by first use and wants special factors in that order.
    in_order = list(dict.fromkeys(t for t in tokens if t in _REPLICATED))
    return dict(
        need_replication_factors=tuple(in_order),
        **{k: v for k, v in r.factor_sizes().items() if k in tokens},
    )


#: The forward's operands by role, and the tangent's: the forward's operands,
#: then their tangents, each sharded as its primal (no bias: its tangent is
#: added outside).
_FORWARD_ROLES = ("x", "offset", "mask", "weight", "bias")
_TANGENT_ROLES = ("x", "offset", "mask", "weight") * 2


def _operand_specs(p: Plan, has_mask: bool, has_bias: bool) -> dict[str, P]:
    return dict(x=p.x(), offset=p.offset(), mask=p.mask(has_mask), weight=p.weight(),
                bias=p.bias(has_bias))


def _like_forward(kernel: Callable, roles: tuple[str, ...]) -> Callable:
    """Wraps `kernel(*operands, **options) -> y` (options: static keywords),
    whose operands have the given forward roles, so that XLA runs it per
    shard, split as the forward is. Returns f(*operands, **options)."""
    arity = len(roles)

    def call(*args):
        *operands, options, _layout, _has_mask, _has_bias = args
        return kernel(*operands, **dict(options))

    def shardings(layout, has_mask, has_bias, mesh, arg_shapes):
        p = _mesh_plan(mesh, arg_shapes, layout)
        specs = _operand_specs(p, has_mask, has_bias)
        return _named(mesh, [specs[role] for role in roles]), NamedSharding(mesh, p.y())

    def infer(options, layout, has_mask, has_bias, mesh, arg_shapes, result_shape):
        del options, result_shape
        return shardings(layout, has_mask, has_bias, mesh, arg_shapes)[1]

    def partition(options, layout, has_mask, has_bias, mesh, arg_shapes, result_shape):
        del result_shape
        args, out = shardings(layout, has_mask, has_bias, mesh, arg_shapes)

        def local(*operands):
            return kernel(*operands, **dict(options))

        return mesh, local, out, args

    wrapped = custom_partitioning(call, static_argnums=tuple(range(arity, arity + 4)))
    wrapped.def_partition(partition, infer_sharding_from_operands=infer,
                          sharding_rule=_like_forward_rule(roles))

    def partitioned(*operands, **options):
        x, offset, mask, weight = operands[:4]  # the roles start with these
        has_bias = "bias" in roles and operands[roles.index("bias")].size > 0
        return wrapped(*operands, tuple(sorted(options.items())), layout_of(x, offset, weight),
                       mask.size > 0, has_bias)

    return partitioned


def partitioned_forward(kernel: Callable) -> Callable:
    """Wraps `kernel(x, offset, mask, weight, bias, params=...)` so that XLA
    runs it per shard. Returns f(x, offset, mask, weight, bias, params)."""
    partitioned = _like_forward(kernel, _FORWARD_ROLES)

    def forward(x, offset, mask, weight, bias, params: ConvParams):
        return partitioned(x, offset, mask, weight, bias, params=params)

    return forward


def partitioned_tangent(kernel: Callable) -> Callable:
    """Wraps `kernel(x, offset, mask, weight, x_dot, offset_dot, mask_dot,
    weight_dot, params=..., deterministic=...)` so that XLA runs it per shard:
    y_dot is split as y, each tangent as its operand. Returns a function of
    the same arguments."""
    return _like_forward(kernel, _TANGENT_ROLES)


def _explicit_axes_current() -> bool:
    """Whether the mesh current where the partitioning callback runs has
    Explicit axes (jax >= 0.11 runs it under the caller's `jax.set_mesh`)."""
    return AxisType.Explicit in tuple(jax.sharding.get_abstract_mesh().axis_types)


@dataclasses.dataclass(frozen=True)
class _Split:
    """How one partitioned backward runs: the plan, the mesh axes along which
    the partial sums of grad_offset/grad_mask and of grad_weight are split (one
    per shard), and the axes summed inside the call instead (Auto axes only)."""

    plan: Plan
    lead_offset: tuple[str, ...] = ()
    lead_weight: tuple[str, ...] = ()
    psum_offset: tuple[str, ...] = ()
    psum_weight: tuple[str, ...] = ()

    @staticmethod
    def of(p: Plan, partials: Partials, mesh) -> _Split:
        sizes = dict(mesh.shape)

        def settle(axes, count):
            """(lead, psum), or None when these axes cannot be split here."""
            if _count(axes, sizes) == count:
                return axes, ()
            if count == 1 and not _explicit_axes_current():
                return (), axes  # Auto axes: the split was not in the types
            return None

        weight = settle(p.batch, partials.weight)
        if weight is None:  # gather the batch rather than emit a bad collective
            p, weight = dataclasses.replace(p, batch=()), ((), ())
        offset = settle(p.offset_reduction_axes(), partials.offset)
        if offset is None:  # likewise, keep the channels whole
            p, offset = dataclasses.replace(p, channel=(), split_groups=False), ((), ())
        return _Split(p, offset[0], weight[0], offset[1], weight[1])

    def shardings(self, mesh, has_mask):
        p = self.plan
        args = (p.x(), p.offset(), p.mask(has_mask), p.weight(), p.y())
        outs = (p.grad_x(), _leading(self.lead_offset, p.offset()),
                _leading(self.lead_offset, p.mask()) if has_mask else p.mask(False),
                _leading(self.lead_weight, p.weight()))
        return _named(mesh, args), _named(mesh, outs)

    def local_partials(self, partials: Partials, mesh) -> Partials:
        sizes = dict(mesh.shape)
        return Partials(offset=partials.offset // _count(self.lead_offset, sizes),
                        weight=partials.weight // _count(self.lead_weight, sizes))


def partitioned_backward(kernel: Callable) -> Callable:
    """Wraps `kernel(x, offset, mask, weight, grad_y, params=..., deterministic=...,
    partials=...)` (returning grad_x and the partial sums of grad_offset,
    grad_mask and grad_weight) so that XLA runs it per shard; the returned
    function adds the partial sums up. Returns f(x, offset, mask, weight,
    grad_y, params, deterministic) -> [grad_x, grad_offset, grad_mask, grad_weight]."""

    def call(x, offset, mask, weight, grad_y, params, deterministic, layout, has_mask, partials):
        del layout, has_mask
        return tuple(kernel(x, offset, mask, weight, grad_y, params=params,
                            deterministic=deterministic, partials=partials))

    def split(layout, partials, mesh, arg_shapes) -> _Split:
        return _Split.of(_mesh_plan(mesh, arg_shapes, layout), partials, mesh)

    def infer(params, deterministic, layout, has_mask, partials, mesh, arg_shapes, result_shape):
        del params, deterministic, result_shape
        return split(layout, partials, mesh, arg_shapes).shardings(mesh, has_mask)[1]

    def partition(params, deterministic, layout, has_mask, partials, mesh, arg_shapes,
                  result_shape):
        del result_shape
        s = split(layout, partials, mesh, arg_shapes)
        args, outs = s.shardings(mesh, has_mask)
        local_partials = s.local_partials(partials, mesh)

        def local(x, offset, mask, weight, grad_y):
            gx, goff, gmask, gw = kernel(x, offset, mask, weight, grad_y, params=params,
                                         deterministic=deterministic, partials=local_partials)
            # Only with Auto axes (see _Split.of): sums across shards in here.
            if s.psum_weight:
                gw = jax.lax.psum(gw, s.psum_weight)
            if s.psum_offset:
                goff, gmask = jax.lax.psum((goff, gmask), s.psum_offset)
            return gx, goff, gmask, gw

        return mesh, local, outs, args

    wrapped = custom_partitioning(call, static_argnums=(5, 6, 7, 8, 9))
    wrapped.def_partition(partition, infer_sharding_from_operands=infer,
                          sharding_rule=_backward_rule)

    def backward(x, offset, mask, weight, grad_y, params: ConvParams, deterministic: bool):
        layout = layout_of(x, offset, weight)
        partials = typed_partials(*(jax.typeof(a) for a in (x, offset, mask, weight)))
        gx, goff, gmask, gw = wrapped(x, offset, mask, weight, grad_y, params,
                                      bool(deterministic), layout, mask.size > 0, partials)
        if mask.size > 0:
            gmask = sum_partials(gmask, partials.offset)
        return [gx, sum_partials(goff, partials.offset), gmask,
                sum_partials(gw, partials.weight)]

    return backward
