#!/usr/bin/env bash
# Runs tests against the jax_deform installed in the current python (a wheel
# or sdist install), from outside the checkout:
#   bash tools/test_installed.sh SOURCE_TREE [pytest args...]
# Copies SOURCE_TREE/tests and pyproject.toml (pytest's settings: markers,
# testpaths) to a temporary folder and runs pytest there, so that no
# jax_deform/ folder of the checkout is on sys.path: a file missing from the
# wheel or sdist then fails, where a run inside the checkout would hide it.
set -euo pipefail
src=$(cd "$1" && pwd); shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$src/tests" "$tmp/tests"
cp "$src/pyproject.toml" "$tmp/"
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
cd "$tmp"
where=$(python -c "import os, jax_deform; print(os.path.dirname(os.path.realpath(jax_deform.__file__)))")
echo "jax_deform imported from $where (tests run in $tmp)"
case "$where/" in
  "$src"/*) echo "error: jax_deform is imported from the checkout $src, not an installed copy" >&2
            exit 1 ;;
esac
python -c "import jax_deform; jax_deform.show_config()"
# test_install.py::test_package_is_the_installed_one checks the same from inside.
JAX_DEFORM_SOURCE_TREE="$src" python -m pytest -p no:cacheprovider "$@"
