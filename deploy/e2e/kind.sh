#!/usr/bin/env bash
# End-to-end check of the three Helm charts on a throwaway kind cluster, for users with Docker
# and kind. NOT run in CI here (no Docker engine on the development machines); `make test`
# renders and validates the same charts offline (scripts/check_charts.py).
#
#   deploy/e2e/kind.sh            # build, install, run a short job, tear down
#   KEEP=1 deploy/e2e/kind.sh     # leave the cluster up afterwards
#
# What it does:
#   1. builds the CPU image (deploy/docker/Dockerfile) and loads it into a kind cluster;
#   2. creates a development PKI (`gptfl pki init`) and one Secret per participant;
#   3. installs synth-service (CPU, replicas 0), the coordinator (with synth scale-to-zero
#      RBAC) and two silo agents (sklearn digits, two Dirichlet parts);
#   4. checks the synth Deployment is at 0 replicas and the coordinator's Role allows exactly
#      get deployments + patch deployments/scale (kubectl auth can-i);
#   5. submits a short job through the admin API (port-forward) and waits for it; while it
#      runs, prints the synth Deployment's replica count whenever it changes (a job with a
#      pretrain section scales it 0 -> 1 -> 0);
#   6. scrapes the coordinator's /metrics once.
#
# Needs: docker, kind, the repo's .venv (for `gptfl`); helm and kubectl come from
# scripts/get_helm.sh. kind's default CNI does not enforce NetworkPolicies: the silo policy is
# accepted by the API server but not exercised here.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cluster=${CLUSTER:-gptfl-e2e}
namespace=${NAMESPACE:-gptfl}
image=${IMAGE:-gptfl:e2e}
work=$(mktemp -d)
helm=$("$root/scripts/get_helm.sh" helm)
kubectl=$("$root/scripts/get_helm.sh" kubectl)
gptfl=${GPTFL:-$root/.venv/bin/gptfl}
k() { "$kubectl" --context "kind-$cluster" -n "$namespace" "$@"; }
h() { "$helm" --kube-context "kind-$cluster" -n "$namespace" "$@"; }

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
  if [ -z "${KEEP:-}" ]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  else
    echo "cluster kind-$cluster kept (KEEP=1); delete with: kind delete cluster --name $cluster"
  fi
}
trap cleanup EXIT

for tool in docker kind; do
  command -v "$tool" >/dev/null || { echo "kind.sh: $tool is required" >&2; exit 1; }
done

echo "==> building $image"
docker build -f "$root/deploy/docker/Dockerfile" -t "$image" "$root"

echo "==> creating kind cluster $cluster"
kind create cluster --name "$cluster" --wait 120s
kind load docker-image "$image" --name "$cluster"
"$kubectl" --context "kind-$cluster" create namespace "$namespace"

echo "==> PKI and Secrets"
coordinator_host=gptfl-coordinator.$namespace.svc.cluster.local
synth_host=gptfl-synth.$namespace.svc.cluster.local
"$gptfl" pki init --out "$work/pki" --silos hospital-a,hospital-b --admin admin \
  --coordinator-host gptfl-coordinator --coordinator-host "$coordinator_host" \
  --synth-host gptfl-synth --synth-host "$synth_host" --days 2
secret() {
  k create secret generic "$1" --from-file=ca.pem="$2/ca.pem" \
    --from-file=cert.pem="$2/cert.pem" --from-file=key.pem="$2/key.pem"
}
secret gptfl-coordinator-tls "$work/pki/coordinator"
secret gptfl-synth-tls "$work/pki/synth"
secret hospital-a-tls "$work/pki/silos/hospital-a"
secret hospital-b-tls "$work/pki/silos/hospital-b"

repo=${image%%:*}
tag=${image#*:}
echo "==> installing synth-service (replicas 0, CPU)"
h install synth "$root/deploy/helm/synth-service" \
  -f "$root/deploy/helm/synth-service/ci/cpu-values.yaml" \
  --set fullnameOverride=gptfl-synth --set image.repository="$repo" --set image.tag="$tag" \
  --set image.pullPolicy=Never --set models.size=1Gi --set shmSizeLimit=256Mi \
  --set resources.requests.cpu=100m

echo "==> installing the coordinator (synth scale-to-zero on)"
h install coordinator "$root/deploy/helm/coordinator" \
  --set fullnameOverride=gptfl-coordinator --set image.repository="$repo" \
  --set image.tag="$tag" --set image.pullPolicy=Never \
  --set config.synth.address=gptfl-synth:50061 \
  --set config.kubernetes.scale_synth=true --set config.kubernetes.deployment=gptfl-synth \
  --set config.kubernetes.ready_timeout_s=300 --set persistence.size=1Gi \
  --set resources.requests.cpu=100m --set resources.requests.memory=256Mi
k rollout status statefulset/gptfl-coordinator --timeout=300s

echo "==> installing two silo agents"
for i in 0 1; do
  silo=hospital-$([ "$i" = 0 ] && echo a || echo b)
  h install "$silo" "$root/deploy/helm/silo-agent" \
    --set fullnameOverride="$silo" --set image.repository="$repo" --set image.tag="$tag" \
    --set image.pullPolicy=Never --set tls.existingSecret="$silo-tls" \
    --set coordinator.address=gptfl-coordinator:50051 \
    --set data.train.kind=sklearn-digits --set data.train.partition.index="$i" \
    --set data.train.partition.count=2 \
    --set-json 'networkPolicy.coordinator.peers=[{"podSelector":{"matchLabels":{"app.kubernetes.io/name":"coordinator"}}}]' \
    --set state.persistence.size=100Mi \
    --set resources.requests.cpu=100m --set resources.requests.memory=256Mi
done
k rollout status deployment/hospital-a --timeout=300s
k rollout status deployment/hospital-b --timeout=300s

echo "==> checking synth scale-to-zero and the coordinator's RBAC"
replicas=$(k get deployment gptfl-synth -o jsonpath='{.spec.replicas}')
[ "$replicas" = 0 ] || { echo "synth replicas $replicas, expected 0" >&2; exit 1; }
sa=system:serviceaccount:$namespace:gptfl-coordinator
can() { k auth can-i "$@" --as "$sa"; }
[ "$(can get deployments/gptfl-synth)" = yes ]
[ "$(can patch deployments/gptfl-synth --subresource=scale)" = yes ]
[ "$(can patch deployments/gptfl-synth)" = no ]
[ "$(can get deployments/other)" = no ]
[ "$(can get secrets)" = no ]
echo "RBAC ok: get deployment, patch its scale, nothing else"

# Print the synth Deployment's replicas whenever they change, while the job runs.
(
  last=""
  while sleep 2; do
    now=$(k get deployment gptfl-synth -o jsonpath='{.spec.replicas}/{.status.readyReplicas}' 2>/dev/null || true)
    if [ "$now" != "$last" ]; then echo "    synth replicas (desired/ready): $now"; last=$now; fi
  done
) &
pids+=($!)

echo "==> submitting a job"
k port-forward service/gptfl-coordinator 50052:50052 9400:9400 >/dev/null 2>&1 &
pids+=($!)
sleep 3
spec=${JOB_SPEC:-$work/job.yaml}
if [ -z "${JOB_SPEC:-}" ]; then
  cat >"$spec" <<'YAML'
name: kind-e2e
model: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}
rounds: 3
min_silos: 2
round_deadline_s: 300
local: {epochs: 1, batch_size: 32}
YAML
fi
"$gptfl" admin --coordinator 127.0.0.1:50052 --certs "$work/pki/admin" \
  --server-name gptfl-coordinator submit --wait "$spec"

echo "==> coordinator metrics"
curl -fsS http://127.0.0.1:9400/metrics | grep -E '^gptfl_(rounds_completed_total|current_round|silos_connected|updates_accepted_total) '

replicas=$(k get deployment gptfl-synth -o jsonpath='{.spec.replicas}')
[ "$replicas" = 0 ] || { echo "synth left at $replicas replicas after the job" >&2; exit 1; }
echo "==> kind e2e passed"
