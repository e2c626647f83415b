"""GPU scale-to-zero logic against a fake DeploymentScaleApi (no cluster needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes.client.exceptions import ApiException

from coordinator.synth_scaler import (
    SCALE_DOWN_ATTEMPTS,
    DeploymentScaleApi,
    KubernetesDeploymentScaleApi,
    KubernetesSynthScaler,
    NoopSynthScaler,
    SynthScaleError,
    scaler_from_config,
    synth_scaled_up,
)
from gptfl.errors import ConfigError, GptflError

NS, NAME = "gptfl", "gptfl-synth-service"


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class FakeDeployment:
    """A Deployment whose pod turns ready ``ready_after_s`` (fake) seconds after scale-up."""

    def __init__(self, clock: FakeClock, *, ready_after_s: float | None = 5.0) -> None:
        self.clock = clock
        self.ready_after_s = ready_after_s
        self.replicas = 0
        self.scaled_up_at: float | None = None
        self.calls: list[tuple[str, int | None]] = []
        #: errors to raise, in order, from the next read / set calls
        self.read_errors: list[SynthScaleError] = []
        self.set_errors: list[SynthScaleError] = []

    def read_replicas_ready(self, namespace: str, name: str) -> int:
        assert (namespace, name) == (NS, NAME)
        self.calls.append(("read", None))
        if self.read_errors:
            raise self.read_errors.pop(0)
        if self.replicas == 0 or self.scaled_up_at is None or self.ready_after_s is None:
            return 0
        return 1 if self.clock() - self.scaled_up_at >= self.ready_after_s else 0

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        assert (namespace, name) == (NS, NAME)
        self.calls.append(("set", replicas))
        if self.set_errors:
            raise self.set_errors.pop(0)
        if replicas and not self.replicas:
            self.scaled_up_at = self.clock()
        self.replicas = replicas


def make(
    *, ready_after_s: float | None = 5.0, poll: float = 2.0
) -> tuple[KubernetesSynthScaler, FakeDeployment, FakeClock]:
    clock = FakeClock()
    api = FakeDeployment(clock, ready_after_s=ready_after_s)
    scaler = KubernetesSynthScaler(
        api, namespace=NS, deployment=NAME, poll_interval_s=poll, clock=clock, sleep=clock.sleep
    )
    return scaler, api, clock


def test_fake_implements_the_protocol() -> None:
    api: DeploymentScaleApi = FakeDeployment(FakeClock())
    assert api.read_replicas_ready(NS, NAME) == 0


def test_scale_up_sets_one_replica_and_waits_until_ready() -> None:
    scaler, api, clock = make(ready_after_s=5.0, poll=2.0)
    scaler.scale_up(timeout_s=60)
    assert api.replicas == 1
    assert api.calls[0] == ("set", 1)
    # ready at t+5: polls at 0, 2, 4 (not ready) and 6 (ready)
    assert clock.sleeps == [2.0, 2.0, 2.0]
    assert [c for c in api.calls if c[0] == "read"] == [("read", None)] * 4


def test_scale_up_returns_at_once_when_already_ready() -> None:
    scaler, api, clock = make(ready_after_s=0.0)
    scaler.scale_up(timeout_s=10)
    assert clock.sleeps == []
    assert api.calls == [("set", 1), ("read", None)]


def test_scale_up_times_out_with_an_unavailable_error() -> None:
    scaler, api, clock = make(ready_after_s=None, poll=2.0)
    with pytest.raises(SynthScaleError) as err:
        scaler.scale_up(timeout_s=7)
    assert isinstance(err.value, GptflError)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"{NS}/{NAME} not ready after 7 s" in str(err.value)
    # never sleeps past the deadline: 2 + 2 + 2 + 1
    assert clock.sleeps == [2.0, 2.0, 2.0, 1.0]
    assert clock.now == pytest.approx(107.0)


def test_scale_up_polls_through_transient_errors() -> None:
    scaler, api, _ = make(ready_after_s=0.0)
    api.read_errors = [SynthScaleError("503", transient=True)] * 2
    scaler.scale_up(timeout_s=30)
    assert api.calls.count(("read", None)) == 3


def test_scale_up_reports_the_last_transient_error_on_timeout() -> None:
    scaler, api, _ = make(ready_after_s=None)
    api.read_errors = [SynthScaleError("HTTP 503 unavailable", transient=True)] * 100
    with pytest.raises(SynthScaleError, match="last error: HTTP 503 unavailable"):
        scaler.scale_up(timeout_s=5)


def test_scale_up_retries_a_transient_scale_failure_within_the_deadline() -> None:
    scaler, api, clock = make(ready_after_s=0.0, poll=2.0)
    api.set_errors = [SynthScaleError("HTTP 503", transient=True)]
    scaler.scale_up(timeout_s=30)
    assert [c for c in api.calls if c[0] == "set"] == [("set", 1), ("set", 1)]
    assert api.replicas == 1 and clock.sleeps == [2.0]

    scaler, api, _ = make(ready_after_s=0.0, poll=2.0)
    api.set_errors = [SynthScaleError("HTTP 503", transient=True)] * 100
    with pytest.raises(SynthScaleError, match="503"):
        scaler.scale_up(timeout_s=5)
    assert api.calls.count(("set", 1)) == 4  # at 0, 2, 4 and 5 s


def test_scale_up_stops_at_a_permanent_error() -> None:
    scaler, api, clock = make()
    api.read_errors = [SynthScaleError("HTTP 403 Forbidden")]
    with pytest.raises(SynthScaleError, match="403"):
        scaler.scale_up(timeout_s=600)
    assert clock.sleeps == []


def test_scale_up_rejects_a_non_positive_timeout() -> None:
    scaler, api, _ = make()
    with pytest.raises(ValueError):
        scaler.scale_up(timeout_s=0)
    assert api.calls == []


def test_scale_down_retries_transient_errors_then_gives_up() -> None:
    scaler, api, clock = make(poll=1.0)
    api.replicas = 1
    api.set_errors = [SynthScaleError("429", transient=True)] * 2
    scaler.scale_down()
    assert api.replicas == 0
    assert clock.sleeps == [1.0, 2.0]

    api.replicas = 1
    api.set_errors = [SynthScaleError("503", transient=True)] * SCALE_DOWN_ATTEMPTS
    with pytest.raises(SynthScaleError, match="503"):
        scaler.scale_down()
    assert api.replicas == 1


def test_scale_down_does_not_retry_permanent_errors() -> None:
    scaler, api, clock = make()
    api.set_errors = [SynthScaleError("404")]
    with pytest.raises(SynthScaleError):
        scaler.scale_down()
    assert api.calls == [("set", 0)]


def test_context_scales_up_for_the_body_and_down_after() -> None:
    scaler, api, _ = make(ready_after_s=0.0)
    with synth_scaled_up(scaler, timeout_s=30):
        assert api.replicas == 1
    assert api.replicas == 0
    assert [c for c in api.calls if c[0] == "set"] == [("set", 1), ("set", 0)]


def test_context_scales_down_when_the_phase_fails() -> None:
    scaler, api, _ = make(ready_after_s=0.0)
    with pytest.raises(RuntimeError, match="pretrain diverged"), synth_scaled_up(scaler, 30):
        assert api.replicas == 1
        raise RuntimeError("pretrain diverged")
    assert api.replicas == 0


def test_context_scales_down_when_readiness_times_out() -> None:
    scaler, api, _ = make(ready_after_s=None)
    body_ran = False
    with pytest.raises(SynthScaleError, match="not ready"), synth_scaled_up(scaler, 5):
        body_ran = True
    assert not body_ran
    assert api.replicas == 0


def test_context_keeps_the_phase_error_when_scale_down_also_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scaler, api, _ = make(ready_after_s=0.0)
    with pytest.raises(RuntimeError, match="phase failed"), synth_scaled_up(scaler, 30):
        api.set_errors = [SynthScaleError("HTTP 403 Forbidden")]
        raise RuntimeError("phase failed")
    assert "could not scale the synth service back to 0" in caplog.text


def test_context_raises_a_scale_down_failure_after_a_good_phase() -> None:
    scaler, api, _ = make(ready_after_s=0.0)
    with pytest.raises(SynthScaleError, match="403"), synth_scaled_up(scaler, 30):
        api.set_errors = [SynthScaleError("HTTP 403 Forbidden")]


def test_noop_scaler_does_nothing() -> None:
    scaler = NoopSynthScaler()
    with synth_scaled_up(scaler, timeout_s=1):
        pass


IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def unused_factory() -> DeploymentScaleApi:
    raise AssertionError("no Kubernetes API outside a cluster")


def test_from_config_is_noop_when_off_or_outside_a_cluster() -> None:
    off = scaler_from_config(
        scale_synth=False,
        namespace=NS,
        deployment=NAME,
        environ=IN_CLUSTER,
        api_factory=unused_factory,
    )
    outside = scaler_from_config(
        scale_synth=True, namespace=NS, deployment=NAME, environ={}, api_factory=unused_factory
    )
    assert isinstance(off, NoopSynthScaler)
    assert isinstance(outside, NoopSynthScaler)


def test_from_config_in_a_cluster_scales_the_named_deployment() -> None:
    clock = FakeClock()
    api = FakeDeployment(clock, ready_after_s=0.0)
    scaler = scaler_from_config(
        scale_synth=True, namespace=NS, deployment=NAME, environ=IN_CLUSTER, api_factory=lambda: api
    )
    assert isinstance(scaler, KubernetesSynthScaler)
    assert scaler.target == f"{NS}/{NAME}"
    with synth_scaled_up(scaler, timeout_s=5):
        assert api.replicas == 1
    assert api.replicas == 0


def test_from_config_reads_the_pod_namespace_when_unset(tmp_path: Path) -> None:
    ns_file = tmp_path / "namespace"
    ns_file.write_text(NS + "\n")
    scaler = scaler_from_config(
        scale_synth=True,
        namespace="",
        deployment=NAME,
        environ=IN_CLUSTER,
        namespace_file=ns_file,
        api_factory=lambda: FakeDeployment(FakeClock()),
    )
    assert isinstance(scaler, KubernetesSynthScaler)
    assert scaler.target == f"{NS}/{NAME}"

    with pytest.raises(ConfigError, match="namespace"):
        scaler_from_config(
            scale_synth=True,
            namespace="",
            deployment=NAME,
            environ=IN_CLUSTER,
            namespace_file=tmp_path / "missing",
            api_factory=unused_factory,
        )


def test_from_config_requires_the_deployment_name_in_a_cluster() -> None:
    with pytest.raises(ConfigError, match="kubernetes.deployment"):
        scaler_from_config(
            scale_synth=True,
            namespace=NS,
            deployment="",
            environ=IN_CLUSTER,
            api_factory=unused_factory,
        )


class FakeAppsV1:
    """Records calls the adapter makes on the kubernetes client's AppsV1Api."""

    def __init__(self, *, ready: int | None = 1, error: BaseException | None = None) -> None:
        self.ready = ready
        self.error = error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def read_namespaced_deployment(self, **kwargs: Any) -> Any:
        self.calls.append(("read_namespaced_deployment", kwargs))
        if self.error:
            raise self.error

        class Status:
            ready_replicas = self.ready

        class Deployment:
            status = Status()

        return Deployment()

    def patch_namespaced_deployment_scale(self, **kwargs: Any) -> None:
        self.calls.append(("patch_namespaced_deployment_scale", kwargs))
        if self.error:
            raise self.error


def test_adapter_reads_the_deployment_and_patches_its_scale() -> None:
    apps = FakeAppsV1(ready=None)
    api = KubernetesDeploymentScaleApi(apps)
    assert api.read_replicas_ready(NS, NAME) == 0  # status.readyReplicas is omitted at 0
    apps.ready = 1
    assert api.read_replicas_ready(NS, NAME) == 1
    api.set_replicas(NS, NAME, 1)
    name, kwargs = apps.calls[-1]
    assert name == "patch_namespaced_deployment_scale"
    assert kwargs["name"] == NAME and kwargs["namespace"] == NS
    assert kwargs["body"] == {"spec": {"replicas": 1}}
    # every call carries a deadline
    assert all(call[1]["_request_timeout"] > 0 for call in apps.calls)
    # the Role grants `get` on deployments, not deployments/status: only these two calls
    assert {c[0] for c in apps.calls} == {
        "read_namespaced_deployment",
        "patch_namespaced_deployment_scale",
    }


@pytest.mark.parametrize(
    ("status", "transient", "hint"),
    [(403, False, "Role"), (404, False, "kubernetes.deployment"), (503, True, ""), (429, True, "")],
)
def test_adapter_maps_api_errors(status: int, transient: bool, hint: str) -> None:
    api = KubernetesDeploymentScaleApi(FakeAppsV1(error=ApiException(status=status, reason="x")))
    with pytest.raises(SynthScaleError) as err:
        api.set_replicas(NS, NAME, 0)
    assert err.value.transient is transient
    assert f"HTTP {status}" in str(err.value)
    assert hint in str(err.value)


def test_adapter_treats_connection_errors_as_transient() -> None:
    api = KubernetesDeploymentScaleApi(FakeAppsV1(error=ConnectionRefusedError("refused")))
    with pytest.raises(SynthScaleError) as err:
        api.read_replicas_ready(NS, NAME)
    assert err.value.transient
