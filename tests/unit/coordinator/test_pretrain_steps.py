"""The pretrain phase against a fake synth client: requests, progress, provenance, failures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch

from coordinator.job_runner import JobFailed, JobInterrupted
from coordinator.pretrain_phase import SynthAccess, SynthCalls, run_pretrain_phase
from coordinator.synth_scaler import SynthScaleError
from gptfl.errors import ChecksumError, ConfigError
from gptfl.job_spec import JobSpec
from gptfl.models import ModelSpec, build_model
from gptfl.pki import TlsFiles
from gptfl.synth_client import DatasetInfo, EpochInfo, PretrainOutcome, SynthProgress
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.weights import TensorSpec, WeightMap, specs_of
from tests.rpc_fakes import FakeRpcError

MODEL = {"arch": "cnn-small", "num_classes": 3, "in_channels": 1, "image_size": 8}


def _spec(**pretrain: Any) -> JobSpec:
    section: dict[str, Any] = {
        "generator": "digits",
        "labels": ["0", "1", "2"],
        "images_per_label": 4,
        "training": {"epochs": 2},
    }
    section.update(pretrain)
    return JobSpec.model_validate(
        {"name": "unit", "model": MODEL, "rounds": 1, "seed": 5, "pretrain": section}
    )


def _trained() -> WeightMap:
    model = build_model(ModelSpec.model_validate(MODEL), seed=99)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class FakeHost:
    spec: JobSpec
    job_id: str = "job-1"
    stop_after: int | None = None  # stop once this many status lines were reported
    messages: list[str] = field(default_factory=list)

    @property
    def stop_requested(self) -> bool:
        return self.stop_after is not None and len(self.messages) >= self.stop_after

    def report_pretrain(self, message: str) -> None:
        self.messages.append(message)


@dataclass
class FakeClient:
    address: str
    tls: TlsFiles | None
    server_name: str | None
    fail_generate: Exception | None = None
    weights: WeightMap = field(default_factory=_trained)
    calls: list[str] = field(default_factory=list)
    request: SynthesisRequest | None = None
    settings: PretrainSettings | None = None
    expected: Sequence[TensorSpec] | None = None
    closed: bool = False

    def wait_ready(self, timeout_s: float) -> None:
        self.calls.append(f"wait_ready {timeout_s:g}")

    def generate(
        self,
        *,
        backend: str,
        generator: str,
        request: SynthesisRequest,
        generator_settings: GeneratorSettings | None = None,
        on_progress: Callable[[SynthProgress], None] | None = None,
        timeout_s: float = 0.0,
    ) -> DatasetInfo:
        self.calls.append(f"generate {backend} {generator}")
        self.request = request
        total = request.images_per_label * len(request.labels)
        assert on_progress is not None
        on_progress(SynthProgress("load", 0, 0, "loading generator 'digits'"))
        for done in (total // 2, total):
            on_progress(SynthProgress("generate", done, total, ""))
        if self.fail_generate is not None:
            raise self.fail_generate
        return DatasetInfo(
            dataset_id="d" * 64,
            manifest_sha256="m" * 64,
            generator_id="digits-generator",
            generator_hash="h" * 64,
            images=total,
            counts=dict.fromkeys(request.labels, request.images_per_label),
            seconds=1.5,
            device="cpu",
        )

    def pretrain(
        self,
        *,
        dataset_id: str,
        model: ModelSpec,
        settings: PretrainSettings,
        expected: Sequence[TensorSpec] | None = None,
        on_epoch: Callable[[EpochInfo], None] | None = None,
        timeout_s: float = 0.0,
    ) -> PretrainOutcome:
        self.calls.append(f"pretrain {dataset_id[:4]} {model.arch}")
        self.settings, self.expected = settings, expected
        assert on_epoch is not None
        history = [
            EpochInfo(e, settings.epochs, 1.0 / e, 1.1 / e, 0.4 * e, 0.1)
            for e in range(1, settings.epochs + 1)
        ]
        for info in history:
            on_epoch(info)
        return PretrainOutcome(
            weights=self.weights,
            epochs=history,
            dataset_id=dataset_id,
            initial_val_accuracy=0.3,
            final_val_accuracy=history[-1].val_accuracy,
            seconds=0.2,
            device="cpu",
        )

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeScaler:
    events: list[str] = field(default_factory=list)
    fail_up: bool = False

    def scale_up(self, timeout_s: float) -> None:
        self.events.append("up")
        if self.fail_up:
            raise SynthScaleError("synth deployment ns/synth not ready after 5 s")

    def scale_down(self) -> None:
        self.events.append("down")


@dataclass
class Rig:
    scaler: FakeScaler = field(default_factory=FakeScaler)
    clients: list[FakeClient] = field(default_factory=list)
    client_options: dict[str, Any] = field(default_factory=dict)

    def access(self, address: str | None = "synth:50070") -> SynthAccess:
        def factory(addr: str, tls: TlsFiles | None, server_name: str | None) -> SynthCalls:
            client = FakeClient(addr, tls, server_name, **self.client_options)
            self.clients.append(client)
            return client

        return SynthAccess(
            address=address,
            server_name="synth.internal",
            tls=None,
            scaler=lambda: self.scaler,
            scale_timeout_s=5.0,
            client_factory=factory,
        )


def test_generate_then_pretrain_returns_the_weights_and_provenance() -> None:
    rig = Rig()
    host = FakeHost(_spec(generation={"resize_mode": "ink-box", "guidance_max": 1.0}))
    weights, provenance = run_pretrain_phase(host, rig.access())

    (client,) = rig.clients
    assert client.calls == [
        "wait_ready 600",
        "generate class-conditional digits",
        "pretrain dddd cnn-small",
    ]
    assert (client.address, client.server_name, client.closed) == (
        "synth:50070",
        "synth.internal",
        True,
    )
    assert rig.scaler.events == ["up", "down"]
    # The request carries the model's shape and the job's seed; weights are checked against
    # the architecture's tensors.
    assert client.request is not None and client.settings is not None
    assert (client.request.in_channels, client.request.image_size, client.request.seed) == (1, 8, 5)
    assert client.request.resize_mode == "ink-box" and client.request.labels == ["0", "1", "2"]
    assert client.settings.seed == 5 and client.settings.epochs == 2
    assert client.expected == specs_of(build_model(host.spec.model).state_dict())
    assert all(torch.equal(weights[k], client.weights[k]) for k in weights)

    assert provenance["kind"] == "pretrain"
    assert provenance["generator_hash"] == "h" * 64
    assert provenance["dataset_id"] == "d" * 64
    assert provenance["manifest_sha256"] == "m" * 64
    assert provenance["images"] == 12
    assert provenance["request"]["resize_mode"] == "ink-box"
    assert [e["epoch"] for e in provenance["pretrain"]["epochs"]] == [1, 2]
    assert provenance["pretrain"]["final_val_accuracy"] == pytest.approx(0.8)
    assert len(provenance["blake3"]) == 64
    # Status lines a watcher sees, in order.
    assert "loading generator 'digits'" in host.messages[2]
    assert any(m.startswith("generating synthetic images: 12/12") for m in host.messages)
    assert any(m.endswith("epoch 2/2, synthetic val acc 80.0%") for m in host.messages)
    assert host.messages[-1].startswith("pretrained on 12 synthetic images")


def test_the_job_can_name_its_own_synth_service() -> None:
    rig = Rig()
    run_pretrain_phase(FakeHost(_spec(synth="other:1234")), rig.access(address=None))
    assert (rig.clients[0].address, rig.clients[0].server_name) == ("other:1234", None)


def test_no_synth_service_anywhere_fails_with_the_reason() -> None:
    rig = Rig()
    with pytest.raises(JobFailed, match="no synth: section"):
        run_pretrain_phase(FakeHost(_spec()), rig.access(address=None))
    with pytest.raises(ConfigError):
        rig.access(address=None).target(_spec().pretrain)  # type: ignore[arg-type]


def test_a_refused_generate_fails_the_job_naming_step_and_status() -> None:
    rig = Rig(
        client_options={
            "fail_generate": FakeRpcError(
                grpc.StatusCode.NOT_FOUND, "no generator 'nope' in /models"
            )
        }
    )
    with pytest.raises(JobFailed) as failed:
        run_pretrain_phase(FakeHost(_spec()), rig.access())
    assert str(failed.value) == (
        "pretrain phase failed: Generate at synth:50070: NOT_FOUND: no generator 'nope' in /models"
    )
    assert rig.scaler.events == ["up", "down"] and rig.clients[0].closed


def test_weights_that_do_not_verify_fail_the_job() -> None:
    rig = Rig(client_options={"fail_generate": ChecksumError("chunk 3: crc32 mismatch")})
    with pytest.raises(JobFailed, match="Generate at synth:50070: chunk 3: crc32 mismatch"):
        run_pretrain_phase(FakeHost(_spec()), rig.access())


def test_weights_of_another_architecture_are_refused() -> None:
    wrong = _trained()
    wrong.pop("classifier.3.bias")
    rig = Rig(client_options={"weights": wrong})
    with pytest.raises(JobFailed, match="do not fit cnn-small"):
        run_pretrain_phase(FakeHost(_spec()), rig.access())


def test_a_failed_scale_up_fails_the_job_and_still_scales_down() -> None:
    rig = Rig(scaler=FakeScaler(fail_up=True))
    with pytest.raises(JobFailed, match="scaling up the synth service at synth:50070: .*not ready"):
        run_pretrain_phase(FakeHost(_spec()), rig.access())
    assert rig.scaler.events == ["up", "down"]
    assert rig.clients == []


def test_on_failure_random_falls_back_and_says_so() -> None:
    rig = Rig(client_options={"fail_generate": FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")})
    host = FakeHost(_spec(on_failure="random"))
    weights, provenance = run_pretrain_phase(host, rig.access())
    assert provenance["kind"] == "random" and provenance["seed"] == 5
    assert provenance["fallback"] == {
        "from": "pretrain",
        "reason": "Generate at synth:50070: UNAVAILABLE: down",
    }
    expected = build_model(host.spec.model, seed=5).state_dict()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert "starting from a random initialisation (on_failure: random)" in host.messages[-1]


def test_a_stop_during_generate_cancels_the_phase() -> None:
    rig = Rig()
    host = FakeHost(_spec(on_failure="random"), stop_after=3)
    with pytest.raises(JobInterrupted):
        run_pretrain_phase(host, rig.access())
    assert rig.scaler.events == ["up", "down"] and rig.clients[0].closed
    assert rig.clients[0].calls == ["wait_ready 600", "generate class-conditional digits"]
