#!/bin/bash
# Run here, after the workplace GPU kit's prepare.sh (docs/quality_scale_analysis.md, "Running the cells on a GPU"):
# adds to .whl/ the wheels our tests need that the GPU image lacks or has in another major version, so step 1's
# install (every .whl/*.whl into /tmp/site, ahead of the image's packages) gives the suite the environment CI has.
#   rouge-score (ROUGE-L, hf_perfit.evaluation; published as a source archive only: built into a wheel here) and nltk
#   huggingface_hub as installed here, the version CI tests (the image has 1.33, with which the suite passed here too)
# Not carried: bitsandbytes (43 MB: with the kit's 55 MB, over the 64 MiB a device command may carry), so the 4-bit
# tests fail there for want of it, and flwr (its tests are left out: --ignore=tests/test_flower.py).
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
hub=$("$py" -c "import huggingface_hub; print(huggingface_hub.__version__)")
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "huggingface_hub==$hub" nltk 2>&1 | grep -v WARNING || true
"$py" -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2 2>&1 | grep -v WARNING || true
du -sh .whl
