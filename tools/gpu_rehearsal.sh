#!/usr/bin/env bash
# The GPU machine rehearsed on this one, before a run there (docs/gpu.md): `make gpu-rehearsal`.
#
# 1. fetches the default wheel set into wheels/ (Python 3.12, the GPU machine's platform, less what its
#    image has), as for the device run;
# 2. builds, once, a venv like the GPU image: Python 3.12, torch 2.11.0, torchvision 0.26.0 and the
#    image's projects that the check and the wheels rely on (wheels/image-needs.txt, which step 1
#    writes); later runs reuse it and install only when that list changed;
# 3. runs `tools/gpu_check.py --device cpu --quick` with that venv's Python, which installs the wheels
#    the way the device run does (pip --no-index --no-deps --target), with no pip configuration (no
#    index, no find-links, no constraints): the GPU machine has none.
# It fails when a stage fails or when a wheel did not install with pip.
#
# Settings (environment): PYTHON312, a Python 3.12 (default: python3.12 on PATH, else pyenv's newest
# 3.12); GPU_REHEARSAL_VENV (default ~/.cache/amodal/gpu-rehearsal-venv); GPU_REHEARSAL_OUT, the report
# and scratch folder (default $TMPDIR/amodal-gpu-rehearsal). Needs the package registry for steps 1-2.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${GPU_REHEARSAL_VENV:-$HOME/.cache/amodal/gpu-rehearsal-venv}
out=${GPU_REHEARSAL_OUT:-${TMPDIR:-/tmp}/amodal-gpu-rehearsal}
python312=
# PYTHON312 if set; else python3.12 (a pyenv shim may exist and fail); else pyenv's newest 3.12
for candidate in ${PYTHON312:-python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python 2>/dev/null | sort -rV)}; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        python312=$candidate
        break
    fi
done
if [ -z "$python312" ]; then
    echo "gpu_rehearsal: no working Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
    exit 2
fi

python3 tools/gpu_check.py --fetch-wheels

if [ ! -x "$venv/bin/python" ]; then
    echo "+ $python312 -m venv $venv"
    "$python312" -m venv "$venv"
fi
if ! cmp -s wheels/image-needs.txt "$venv/image-needs.txt"; then
    printf 'torch==2.11.0\ntorchvision==0.26.0\n' > "$venv/gpu-image-torch.txt"
    echo "+ $venv/bin/pip install -c $venv/gpu-image-torch.txt -r wheels/image-needs.txt"
    "$venv/bin/pip" install --quiet -c "$venv/gpu-image-torch.txt" -r wheels/image-needs.txt
    cp wheels/image-needs.txt "$venv/image-needs.txt"
fi

rm -rf "$out"
echo "+ $venv/bin/python tools/gpu_check.py --device cpu --quick -o $out/report --work $out/work"
env -u PYTHONPATH PIP_CONFIG_FILE=/dev/null "$venv/bin/python" tools/gpu_check.py --device cpu --quick \
    -o "$out/report" --work "$out/work"
if grep -E '\.whl \| (unpacked|failed)' "$out/report/cpu-quick.md"; then
    echo "gpu_rehearsal: a wheel did not install with pip (above); the device run would fall back the same way" >&2
    exit 1
fi
echo "gpu_rehearsal: passed; report $out/report/cpu-quick.md"
