#!/usr/bin/env bash
# Creates (or completes) a virtual environment with everything GPT-FL needs.
# Used by the Makefile and by the Dockerfiles, so the same steps are exercised everywhere.
#
#   scripts/install.sh VENV_DIR [runtime|dev]
#
# torch is pinned and installed first, on its own: any other spec pulls a multi-GB CUDA
# build. Everything else goes through requirements/constraints.txt, which repeats the pin.
set -euo pipefail
venv=${1:?usage: install.sh VENV_DIR [runtime|dev]}
profile=${2:-dev}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
echo "==> installing torch (pinned)"
"${pip[@]}" "torch==2.13.0"
reqs=(-r "$here/requirements/runtime.txt")
if [ "$profile" = dev ]; then
  reqs+=(-r "$here/requirements/dev.txt")
fi
echo "==> installing $profile dependencies"
"${pip[@]}" -c "$here/requirements/constraints.txt" "${reqs[@]}"
echo "==> installing gpt-fl itself"
"${pip[@]}" -c "$here/requirements/constraints.txt" --no-deps -e "$here"
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch "$venv/.installed-$profile"
echo "==> $venv ready ($profile)"
