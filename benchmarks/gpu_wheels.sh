#!/bin/bash
# Run here, after the workplace GPU kit's prepare.sh (docs/quality_scale_analysis.md, "Running the cells on a GPU"):
# adds to .whl/ the wheels our tests need that the GPU image lacks or has in another major version, so step 1's
# install (every .whl/*.whl into /tmp/site, ahead of the image's packages) gives the suite the environment CI has.
#   rouge-score (ROUGE-L, hf_perfit.evaluation; published as a source archive only: built into a wheel here) and nltk
#   huggingface_hub as installed here, the version CI tests (the image has 1.33), with the three of its dependencies
#   the image lacks: httpx2, httpcore2, truststore (2026-11-30 on the H200: without httpx2, hub 2.x fails to import
#   and takes transformers with it; tests/test_hub.py imports httpx2 itself)
#   bitsandbytes as installed here, slimmed to its CPU library and the one CUDA library the image's torch loads
#   (CUDA=130 for its torch 2.11.0+cu130): the full wheel, 43 MB of libraries for every CUDA/ROCm/XPU version, does
#   not fit beside the kit's 55 MB in the 64 MiB a device command may carry; slimmed it is ~3.6 MB.
# Not carried: flwr (its tests are left out there: --ignore=tests/test_flower.py).
set -euo pipefail
py=${PYTHON:-.venv/bin/python}; cuda=${CUDA:-130}
# the versions installed here (CI's)
pin() { "$py" -c "import importlib.metadata as m, sys; print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" "$@"; }
dl() {  # DEST PACKAGE...: wheels for the GPU image's Python 3.12 on x86-64 Linux
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@" 2>&1 | grep -v WARNING || true
}
mkdir -p .whl
dl .whl $(pin huggingface_hub httpx2 httpcore2 truststore nltk)
"$py" -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2 2>&1 | grep -v WARNING || true
tmp=$(mktemp -d)
dl "$tmp" $(pin bitsandbytes)
# drop the other libraries' files and their RECORD lines (pip installs the files RECORD lists)
"$py" - "$tmp"/bitsandbytes-*.whl .whl "$cuda" <<'EOF'
import sys
import zipfile
from pathlib import Path

src, dest, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
lib = "bitsandbytes/libbitsandbytes_"
keep = {f"{lib}cpu.so", f"{lib}cuda{cuda}.so"}


def drop(name: str) -> bool:
    return name.startswith(lib) and name not in keep


with zipfile.ZipFile(src) as zin:
    if f"{lib}cuda{cuda}.so" not in zin.namelist():
        sys.exit(f"{src.name} has no {lib}cuda{cuda}.so: set CUDA= to the CUDA version of the image's torch")
    with zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if drop(info.filename):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines(keepends=True)
                data = "".join(r for r in rows if not drop(r.split(",")[0])).encode()
            zout.writestr(info, data)
EOF
rm -rf "$tmp"
du -sh .whl
