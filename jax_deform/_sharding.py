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
shard, including the reductions that cross shards (grad_weight over batch
shards, grad_offset/grad_mask over channel shards when G = 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
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


def backward_output_shardings(x, offset, mask, weight):
    """Shardings of (grad_x, grad_offset, grad_mask, grad_weight) in the types:
    exactly those of the operands (custom_vjp insists on it), so grad_weight
    is replicated over the batch, summed inside the partitioned call."""
    return tuple(a.sharding for a in (x, offset, mask, weight))


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
               "nomask", "nobias")


def _channel_dims(rule: _Rule, layout: Layout, mesh):
    """x's C, C*M, and the offsets' and mask's channel axes, as rule dims.

    With G > 1 the offset group is a factor shared by x's channels and the
    offsets' channels, so a channel split carries over to the offsets. That
    is only offered when every mesh axis divides G: otherwise Shardy may split
    one mesh axis over group and channel-in-group (sub-axes), which the
    partitioning callbacks cannot express; the offsets' channels are then
    kept whole and each channel shard slices its groups locally.
    """
    g, cg, m, k = layout.groups, layout.c // layout.groups, layout.multiplier, layout.taps
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


def _forward_rule(params, layout, has_mask, has_bias, mesh, operand_types, result_types):
    del params, operand_types, result_types
    r = _Rule()
    c, cm, off, msk = _channel_dims(r, layout, mesh)
    rule = "{} , {} , {} , {} , {} -> {}".format(
        r.array("n", "h", "w", c),
        r.array("n", "ho", "wo", off),
        r.array("n", "ho", "wo", msk) if has_mask else "nomask",
        r.array("kh", "kw", "one", cm),
        cm if has_bias else "nobias",
        r.array("n", "ho", "wo", cm),
    )
    return rule, _rule_kwargs(rule, r)


def _backward_rule(params, deterministic, layout, has_mask, mesh, operand_types, result_types):
    del params, deterministic, operand_types, result_types
    r = _Rule()
    c, cm, off, msk = _channel_dims(r, layout, mesh)
    x, offset = r.array("n", "h", "w", c), r.array("n", "ho", "wo", off)
    mask = r.array("n", "ho", "wo", msk) if has_mask else "nomask"
    weight, grad_y = r.array("kh", "kw", "one", cm), r.array("n", "ho", "wo", cm)
    rule = f"{x} , {offset} , {mask} , {weight} , {grad_y} -> {x} , {offset} , {mask} , {weight}"
    return rule, _rule_kwargs(rule, r)


def _rule_kwargs(rule: str, r: _Rule) -> dict:
    tokens = rule.replace("(", " ").replace(")", " ").replace(",", " ").replace("->", " ").split()
    # Shardy numbers factors by first use and wants special factors in that order.
    in_order = list(dict.fromkeys(t for t in tokens if t in _REPLICATED))
    return dict(
        need_replication_factors=tuple(in_order),
        **{k: v for k, v in r.factor_sizes().items() if k in tokens},
    )


def partitioned_forward(kernel: Callable) -> Callable:
    """Wraps `kernel(x, offset, mask, weight, bias, params=...)` so that XLA
    runs it per shard. Returns f(x, offset, mask, weight, bias, params)."""

    def call(x, offset, mask, weight, bias, params, layout, has_mask, has_bias):
        del layout, has_mask, has_bias
        return kernel(x, offset, mask, weight, bias, params=params)

    def shardings(p: Plan, mesh, has_mask, has_bias):
        args = (p.x(), p.offset(), p.mask(has_mask), p.weight(), p.bias(has_bias))
        return _named(mesh, args), NamedSharding(mesh, p.y())

    def infer(params, layout, has_mask, has_bias, mesh, arg_shapes, result_shape):
        del params, result_shape
        return shardings(_mesh_plan(mesh, arg_shapes, layout), mesh, has_mask, has_bias)[1]

    def partition(params, layout, has_mask, has_bias, mesh, arg_shapes, result_shape):
        del result_shape
        args, out = shardings(_mesh_plan(mesh, arg_shapes, layout), mesh, has_mask, has_bias)

        def local(x, offset, mask, weight, bias):
            return kernel(x, offset, mask, weight, bias, params=params)

        return mesh, local, out, args

    wrapped = custom_partitioning(call, static_argnums=(5, 6, 7, 8))
    wrapped.def_partition(partition, infer_sharding_from_operands=infer,
                          sharding_rule=_forward_rule)

    def forward(x, offset, mask, weight, bias, params: ConvParams):
        layout = layout_of(x, offset, weight)
        return wrapped(x, offset, mask, weight, bias, params, layout,
                       mask.size > 0, bias.size > 0)

    return forward


def partitioned_backward(kernel: Callable) -> Callable:
    """Wraps `kernel(x, offset, mask, weight, grad_y, params=..., deterministic=...)`
    (returning grad_x, grad_offset, grad_mask, grad_weight) so that XLA runs it
    per shard and sums the partial gradients across shards."""

    def call(x, offset, mask, weight, grad_y, params, deterministic, layout, has_mask):
        del layout, has_mask
        return tuple(kernel(x, offset, mask, weight, grad_y, params=params,
                            deterministic=deterministic))

    def shardings(p: Plan, mesh, has_mask):
        args = (p.x(), p.offset(), p.mask(has_mask), p.weight(), p.y())
        outs = (p.grad_x(), p.offset(), p.mask(has_mask), p.weight())
        return _named(mesh, args), _named(mesh, outs)

    def infer(params, deterministic, layout, has_mask, mesh, arg_shapes, result_shape):
        del params, deterministic, result_shape
        return shardings(_mesh_plan(mesh, arg_shapes, layout), mesh, has_mask)[1]

    def partition(params, deterministic, layout, has_mask, mesh, arg_shapes, result_shape):
        del result_shape
        p = _mesh_plan(mesh, arg_shapes, layout)
        args, outs = shardings(p, mesh, has_mask)

        def local(x, offset, mask, weight, grad_y):
            gx, goff, gmask, gw = kernel(x, offset, mask, weight, grad_y, params=params,
                                         deterministic=deterministic)
            # Each shard saw part of the batch: grad_weight is a partial sum.
            if p.batch:
                gw = jax.lax.psum(gw, p.batch)
            # With G = 1 each channel shard adds its channels' share of the
            # offsets' gradient.
            if p.offset_reduction_axes():
                goff, gmask = jax.lax.psum((goff, gmask), p.offset_reduction_axes())
            return gx, goff, gmask, gw

        return mesh, local, outs, args

    wrapped = custom_partitioning(call, static_argnums=(5, 6, 7, 8))
    wrapped.def_partition(partition, infer_sharding_from_operands=infer,
                          sharding_rule=_backward_rule)

    def backward(x, offset, mask, weight, grad_y, params: ConvParams, deterministic: bool):
        layout = layout_of(x, offset, weight)
        return list(wrapped(x, offset, mask, weight, grad_y, params, bool(deterministic),
                            layout, mask.size > 0))

    return backward
