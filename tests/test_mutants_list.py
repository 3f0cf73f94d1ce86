"""The mutant list of tests/mutants.py stays runnable: every mutant's search
string occurs exactly once in the file it mutates (a second copy of a line,
as a new kernel can bring, would make the mutant ambiguous), and the
mutation changes that text."""

import os
import pathlib

import pytest

from tests import mutants

# The checkout; tools/test_installed.sh runs the tests from a copy of tests/
# and names the checkout here.
ROOT = pathlib.Path(os.environ.get("JAX_DEFORM_SOURCE_TREE",
                                   pathlib.Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_search_string_occurs_once(mutant):
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.old) == 1, f"{mutant.path}: found {text.count(mutant.old)} times"
    assert mutant.new != mutant.old
