# Source on the GPU device machine, from the repo root, after carrying .carry/a and .carry/b
# (benchmarks/make_carry.sh): installs the carried wheels and the project (editable, so that
# migrations/ is tgfr_search.migrations) and points the project at the rest.
python3 -m pip install -q --no-deps --no-index .carry/a/whl/*.whl .carry/b/whl/*.whl
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e .
export PYTHONPATH=$PWD/.carry/a/py:$PWD/.carry/b/py
export TGFR_LFW=$PWD/.carry/b/lfw TGFR_CACHE_DIR=/tmp/tgfr-cache
