"""benchmarks/RESULTS.md's current tables are what benchmarks/tables.py makes
of the raw bench JSON they cite: no figure on main is retyped by hand."""

import importlib.util
import os
import pathlib

import pytest

# The checkout; tools/test_installed.sh runs the tests from a copy of tests/
# and names the checkout here.
ROOT = pathlib.Path(os.environ.get("JAX_DEFORM_SOURCE_TREE",
                                   pathlib.Path(__file__).resolve().parents[1]))
BENCHMARKS = ROOT / "benchmarks"
# (raw rows, table kind) of the "Current kernels" sections.
CURRENT = [("h200_speed_10f0215.json", "speed"), ("h200_models_52e0722.json", "models")]


def _tables():
    spec = importlib.util.spec_from_file_location("tables", BENCHMARKS / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("raw,kind", CURRENT)
def test_current_tables_are_made_from_their_raw_rows(raw, kind, capsys):
    results = (BENCHMARKS / "RESULTS.md").read_text()
    assert raw in results, f"RESULTS.md does not cite {raw}"
    assert _tables().main([str(BENCHMARKS / raw), kind]) == 0
    table = capsys.readouterr().out.strip()
    assert table.count("\n") >= 4
    assert table in results, f"RESULTS.md's {kind} table differs from tables.py {raw} {kind}"
