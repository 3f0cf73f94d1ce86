"""The benchmark cannot be fooled by XLA merging identical calls: every timed
program must hold one forward (and one backward) custom call per timed call."""

import jax
import jax.numpy as jnp
import pytest

from jax_deform import bench
from jax_deform._ffi import BACKWARD_TARGET, FORWARD_TARGET

CALLS = 3
CASES = [bench.Case(2, 9, 11, 16), bench.Case(1, 12, 12, 8, kernel=5, stride=2)]


@pytest.fixture(params=CASES, ids=lambda c: c.describe())
def case(request):
    return request.param


def _sets(case, count):
    return bench.make_inputs(jax.random.PRNGKey(1), case, jnp.float32, count)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_one_kernel_call_per_timed_call(case, backward):
    fn = bench.ours(case)
    fn = bench.with_backward(fn) if backward else fn
    compiled = bench.compile_distinct(fn, _sets(case, CALLS))
    ops = bench.heavy_ops(compiled.as_text())
    assert ops[FORWARD_TARGET] == CALLS
    assert ops[BACKWARD_TARGET] == (CALLS if backward else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_plain_conv_peer_is_not_merged_either(case, backward):
    fn = bench.xla_depthwise(case)
    fn = bench.with_backward(fn) if backward else fn
    ops = bench.heavy_ops(bench.compile_distinct(fn, _sets(case, CALLS)).as_text())
    assert ops["convolution"] >= CALLS * (3 if backward else 1)


def test_identical_calls_are_merged_and_refused(case):
    """The control: calls on the same inputs compile to one call (what the old
    bench fell for), and the bench refuses to time such a program."""
    sets = _sets(case, CALLS)
    reuse = jax.jit(lambda sets: [bench.ours(case)(**sets[0]) for _ in range(CALLS)])
    assert bench.heavy_ops(reuse.lower(sets).compile().as_text())[FORWARD_TARGET] == 1

    def ignores_its_inputs(**unused):
        return bench.ours(case)(**sets[0])

    with pytest.raises(bench.MergedCallsError):
        bench.compile_distinct(ignores_its_inputs, sets)


def test_reported_time_is_per_distinct_call():
    case = CASES[0]
    timing = bench.time_program(bench.ours(case), _sets(case, CALLS), repeats=2, profile=False)
    assert timing["s"] > 0 and timing["kernel_s"] is None  # no GPU streams on CPU


def test_kernel_time_reads_gpu_stream_rows_only():
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}},
    ]}
    assert bench._device_streams(trace) == {(1, 7)}


def test_floor_counts_each_tensor_once():
    case = bench.Case(1, 4, 4, 8)
    x = y = 4 * 4 * 8 * 4
    side = 4 * 4 * 27 * 4
    assert bench.floor_bytes(case, 4, False) == x + y + side
