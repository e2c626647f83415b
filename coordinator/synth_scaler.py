"""GPU scale-to-zero: the synth Deployment runs only for the generate/pretrain phase.

Inside a Kubernetes cluster (and only when ``kubernetes.scale_synth`` is on) the coordinator
scales the synth service's Deployment to 1 replica before it asks for synthetic data, waits
until the pod is ready, and scales it back to 0 when the phase ends, whether the phase
succeeded or failed. Everywhere else (the embedded default, a laptop, CI) scaling is a no-op
and the synth service is expected to be running already.

The logic (:class:`KubernetesSynthScaler`, :func:`synth_scaled_up`) talks to the cluster only
through :class:`DeploymentScaleApi`, a two-method interface this module owns, so it is tested
against a fake; :class:`KubernetesDeploymentScaleApi` adapts the ``kubernetes`` client to it.
The RBAC this needs (namespace-scoped: ``get`` on ``deployments`` and ``patch`` on
``deployments/scale``, for the one Deployment) is rendered by the coordinator Helm chart.

Typical use in the job runner::

    scaler = scaler_from_config(
        scale_synth=cfg.kubernetes.scale_synth,
        namespace=cfg.kubernetes.namespace,
        deployment=cfg.kubernetes.deployment,
    )
    with synth_scaled_up(scaler, timeout_s=cfg.kubernetes.ready_timeout_s):
        run_generate_and_pretrain()
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from gptfl.errors import ConfigError, UnavailableError

logger = logging.getLogger(__name__)

#: where Kubernetes mounts the pod's namespace (used when the config leaves it empty)
SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: deadline of each Kubernetes API call, in seconds
API_CALL_TIMEOUT_S = 10.0
#: HTTP statuses worth retrying (throttling, API server restarts)
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: attempts at scaling back to 0: a replica left running holds a GPU until someone notices
SCALE_DOWN_ATTEMPTS = 5


class SynthScaleError(UnavailableError):
    """The synth Deployment could not be scaled, or did not become ready in time.

    Attributes:
        transient: True when retrying the same call may succeed (a timeout, throttling,
            an API server restart); False for e.g. a missing Deployment or missing RBAC.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class SynthScaler(Protocol):
    """Brings the synth service up for a phase and takes it down afterwards."""

    def scale_up(self, timeout_s: float) -> None:
        """Starts the synth service and returns once it is ready.

        Raises:
            SynthScaleError: it could not be started or was not ready within ``timeout_s``.
        """
        ...

    def scale_down(self) -> None:
        """Stops the synth service (releasing its GPU)."""
        ...


class NoopSynthScaler:
    """Outside a cluster: the synth service is managed by whoever started it."""

    def scale_up(self, timeout_s: float) -> None:
        del timeout_s

    def scale_down(self) -> None:
        pass


class DeploymentScaleApi(Protocol):
    """The two Kubernetes calls the scaler needs; errors are :class:`SynthScaleError`."""

    def read_replicas_ready(self, namespace: str, name: str) -> int:
        """Ready replicas of Deployment ``namespace/name``."""
        ...

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        """Sets the desired replicas of Deployment ``namespace/name`` (its scale)."""
        ...


class KubernetesSynthScaler:
    """Scales one Deployment between 0 and 1 replicas through a :class:`DeploymentScaleApi`.

    Args:
        api: the Kubernetes calls (the real adapter or a fake).
        namespace: namespace of the synth Deployment.
        deployment: its name.
        poll_interval_s: seconds between readiness checks (and between scale-down retries).
        clock: monotonic clock, injectable for tests.
        sleep: sleep function, injectable for tests.
    """

    def __init__(
        self,
        api: DeploymentScaleApi,
        *,
        namespace: str,
        deployment: str,
        poll_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not namespace or not deployment:
            raise ConfigError("kubernetes.namespace and kubernetes.deployment must be set")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self._api = api
        self._namespace = namespace
        self._deployment = deployment
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep

    @property
    def target(self) -> str:
        """``namespace/deployment``, for messages."""
        return f"{self._namespace}/{self._deployment}"

    def scale_up(self, timeout_s: float) -> None:
        """Scales to 1 and polls until a replica is ready or ``timeout_s`` has passed."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        start = self._clock()
        deadline = start + timeout_s
        logger.info("scaling synth deployment %s to 1 replica", self.target)
        while True:
            try:
                self._api.set_replicas(self._namespace, self._deployment, 1)
                break
            except SynthScaleError as exc:
                remaining = deadline - self._clock()
                if not exc.transient or remaining <= 0:
                    raise
                logger.warning("scaling synth deployment %s failed, retrying: %s", self.target, exc)
                self._sleep(min(self._poll_interval_s, remaining))
        last_error: SynthScaleError | None = None
        while True:
            try:
                ready = self._api.read_replicas_ready(self._namespace, self._deployment)
                last_error = None
            except SynthScaleError as exc:
                if not exc.transient:
                    raise
                # The API server may restart or throttle while we wait; keep polling.
                logger.warning("reading synth deployment %s failed, retrying: %s", self.target, exc)
                last_error, ready = exc, 0
            if ready >= 1:
                logger.info(
                    "synth deployment %s ready after %.1f s", self.target, self._clock() - start
                )
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                detail = f"last error: {last_error}" if last_error else "0 of 1 replicas ready"
                raise SynthScaleError(
                    f"synth deployment {self.target} not ready after {timeout_s:g} s ({detail}); "
                    "check its pod events (GPU capacity, image pull, model volume)"
                )
            self._sleep(min(self._poll_interval_s, remaining))

    def scale_down(self) -> None:
        """Scales to 0, retrying transient API errors a few times."""
        logger.info("scaling synth deployment %s to 0 replicas", self.target)
        for attempt in range(1, SCALE_DOWN_ATTEMPTS + 1):
            try:
                self._api.set_replicas(self._namespace, self._deployment, 0)
                return
            except SynthScaleError as exc:
                if not exc.transient or attempt == SCALE_DOWN_ATTEMPTS:
                    raise
                logger.warning(
                    "scaling synth deployment %s to 0 failed (attempt %d of %d), retrying: %s",
                    self.target,
                    attempt,
                    SCALE_DOWN_ATTEMPTS,
                    exc,
                )
                self._sleep(self._poll_interval_s * attempt)


@contextmanager
def synth_scaled_up(scaler: SynthScaler, timeout_s: float) -> Iterator[None]:
    """Runs the body with the synth service up, and always scales it back down.

    The scale-down also runs when scaling up fails or times out (the replica asked for may
    still start and hold a GPU) and when the body raises. If the scale-down itself fails
    while another error is on its way out, that error wins and the scale-down failure is
    logged, so the phase's real cause is what the job reports.
    """
    try:
        scaler.scale_up(timeout_s)
        yield
    except BaseException:
        try:
            scaler.scale_down()
        except Exception:
            logger.exception("could not scale the synth service back to 0 after a failed phase")
        raise
    scaler.scale_down()


class KubernetesDeploymentScaleApi:
    """:class:`DeploymentScaleApi` over the ``kubernetes`` client's ``AppsV1Api``.

    Reads the Deployment itself (``get deployments``) rather than its ``/status``
    subresource, so the Role needs no ``deployments/status`` rule.
    """

    def __init__(self, apps_v1: Any) -> None:
        self._apps = apps_v1

    @classmethod
    def in_cluster(cls) -> KubernetesDeploymentScaleApi:
        """Uses the pod's service account (in-cluster config)."""
        from kubernetes import client, config  # imported lazily: only needed in a cluster

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException as exc:
            raise SynthScaleError(f"no in-cluster Kubernetes credentials: {exc}") from exc
        return cls(client.AppsV1Api())

    def read_replicas_ready(self, namespace: str, name: str) -> int:
        deployment = self._call(
            "read",
            namespace,
            name,
            lambda: self._apps.read_namespaced_deployment(
                name=name, namespace=namespace, _request_timeout=API_CALL_TIMEOUT_S
            ),
        )
        status = getattr(deployment, "status", None)
        return int(getattr(status, "ready_replicas", None) or 0)

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        self._call(
            "scale",
            namespace,
            name,
            lambda: self._apps.patch_namespaced_deployment_scale(
                name=name,
                namespace=namespace,
                body={"spec": {"replicas": replicas}},
                _request_timeout=API_CALL_TIMEOUT_S,
            ),
        )

    @staticmethod
    def _call(what: str, namespace: str, name: str, fn: Callable[[], Any]) -> Any:
        """Runs one API call, turning client errors into :class:`SynthScaleError`."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except ApiException as exc:
            status = int(exc.status or 0)
            hint = {
                403: " (is the coordinator's Role bound and scale_synth on in the chart?)",
                404: " (does kubernetes.deployment name the synth Deployment?)",
            }.get(status, "")
            raise SynthScaleError(
                f"cannot {what} deployment {namespace}/{name}: HTTP {status} {exc.reason}{hint}",
                transient=status in TRANSIENT_HTTP_STATUSES,
            ) from exc
        except (HTTPError, OSError) as exc:
            raise SynthScaleError(
                f"cannot {what} deployment {namespace}/{name}: {exc}", transient=True
            ) from exc


def in_cluster(environ: Mapping[str, str]) -> bool:
    """Whether this process runs in a Kubernetes pod (the API server's address is injected)."""
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


def scaler_from_config(
    *,
    scale_synth: bool,
    namespace: str,
    deployment: str,
    environ: Mapping[str, str] | None = None,
    namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE_FILE,
    api_factory: Callable[[], DeploymentScaleApi] = KubernetesDeploymentScaleApi.in_cluster,
    poll_interval_s: float = 2.0,
) -> SynthScaler:
    """The scaler for this process: Kubernetes in a cluster with ``scale_synth``, else a no-op.

    Args:
        scale_synth: ``kubernetes.scale_synth`` of coordinator.yaml.
        namespace: ``kubernetes.namespace``; empty means the pod's own namespace.
        deployment: ``kubernetes.deployment``, the synth Deployment's name.
        environ: the environment (default: ``os.environ``).
        namespace_file: where the pod's namespace is mounted.
        api_factory: builds the API adapter (default: in-cluster ``kubernetes`` client).
        poll_interval_s: seconds between readiness checks.

    Raises:
        ConfigError: ``scale_synth`` is on in a cluster but the Deployment is not named, or
            the namespace is neither set nor mounted.
    """
    env = os.environ if environ is None else environ
    if not scale_synth:
        return NoopSynthScaler()
    if not in_cluster(env):
        logger.warning(
            "kubernetes.scale_synth is on but this process is not in a Kubernetes pod "
            "(KUBERNETES_SERVICE_HOST unset); the synth service is not scaled"
        )
        return NoopSynthScaler()
    if not deployment:
        raise ConfigError("kubernetes.deployment is required when kubernetes.scale_synth is on")
    if not namespace:
        try:
            namespace = namespace_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"kubernetes.namespace is empty and {namespace_file} is unreadable: {exc}"
            ) from exc
    return KubernetesSynthScaler(
        api_factory(), namespace=namespace, deployment=deployment, poll_interval_s=poll_interval_s
    )
