"""The synth service over real mutual TLS on port 0: Generate and Pretrain end to end, the
documented statuses of requests it cannot honour (refused before any work, nothing stored),
roles, cancellation, regeneration from a stored manifest, and the process entry point."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from gptfl.errors import EXIT_CONFIG, UnavailableError
from gptfl.local_cluster import LocalCluster
from gptfl.models import ModelSpec, build_model
from gptfl.pki import participant_files
from gptfl.proto.v1 import synth_pb2, synth_pb2_grpc
from gptfl.rpc import open_channel
from gptfl.synth_client import DatasetInfo, EpochInfo, SynthClient, SynthProgress
from gptfl.synth_spec import GeneratorSettings, PretrainSettings, SynthesisRequest
from gptfl.tls_config import TlsConfig
from gptfl.training import evaluate
from gptfl.weights import specs_of
from synth_service.artifacts import manifest_sha256, read_artifact, read_manifest, synthesize
from synth_service.config import SynthConfig
from synth_service.generators.base import ImageSpec, ProgressCallback, StepCheck
from synth_service.main import main as synth_main
from synth_service.pretrain import stratified_split
from synth_service.prompts import Seq2SeqExpander, build_prompts
from synth_service.server import SynthService, start_synth_service
from tests.waiting import wait_until

DIGITS = [str(d) for d in range(10)]
SPEC = ModelSpec(arch="cnn-small", num_classes=4, in_channels=1, image_size=8)

StartSynth = Callable[..., SynthService]


@pytest.fixture
def start(pki_dir: Path, tmp_path: Path) -> Iterator[StartSynth]:
    """Starts in-process synth services (CPU, mTLS, port 0); all stop at the end of the test."""
    started: list[SynthService] = []

    def _start(**overrides: Any) -> SynthService:
        files = participant_files(pki_dir, "synth")
        settings: dict[str, Any] = {
            "address": "127.0.0.1:0",
            "tls": TlsConfig(ca=files.ca, cert=files.cert, key=files.key),
            "models_dir": tmp_path / "models",
            "data_dir": tmp_path / "data",
            "device": "cpu",
            "shutdown_grace_s": 1.0,
            **overrides,
        }
        Path(settings["models_dir"]).mkdir(parents=True, exist_ok=True)
        service = start_synth_service(SynthConfig(**settings))
        started.append(service)
        return service

    yield _start
    for service in started:
        service.stop(grace_s=1)


def _client(pki_dir: Path, service: SynthService, role: str = "coordinator") -> SynthClient:
    name = "silo-a" if role == "silo" else None
    return SynthClient(service.address, tls=participant_files(pki_dir, role, name))


def _stored(service: SynthService) -> list[str]:
    return sorted(p.name for p in service.engine.store.root.iterdir())


def _digits_request(**changes: Any) -> SynthesisRequest:
    fields: dict[str, Any] = {
        "labels": ["0", "1", "seven"],
        "images_per_label": 3,
        "in_channels": 1,
        "image_size": 8,
        "resize_mode": "ink-box",
        "guidance_min": 1.0,
        "guidance_max": 1.0,
        **changes,
    }
    return SynthesisRequest(**fields)


# ---- Generate ---------------------------------------------------------------------------------


def test_text_to_image_pipeline_from_disk_generates_end_to_end_and_regenerates(
    start: StartSynth, pki_dir: Path, tmp_path: Path, tiny_text_to_image_dir: Path
) -> None:
    service = start()
    shutil.copytree(tiny_text_to_image_dir, service.config.models_dir / "tiny-sd")
    request = SynthesisRequest(
        labels=["cat", "dog"],
        images_per_label=3,
        in_channels=3,
        image_size=8,
        seed=5,
        prompts_per_label=2,
        guidance_min=1.0,
        guidance_max=3.0,
    )
    progress: list[SynthProgress] = []
    with _client(pki_dir, service) as client:
        client.wait_ready(10)
        info = client.generate(
            backend="text-to-image",
            generator="tiny-sd",
            request=request,
            generator_settings=GeneratorSettings(num_inference_steps=2),
            on_progress=progress.append,
        )
    assert info.images == 6
    assert info.counts == {"cat": 3, "dog": 3}
    assert info.generator_id == "tiny-sd"
    assert info.device == "cpu"
    assert [p.stage for p in progress][0] == "load"
    assert progress[-1].stage == "store"
    generated = [p for p in progress if p.stage == "generate"]
    assert generated[-1].done == generated[-1].total == 6

    folder = service.engine.store.root / info.dataset_id
    dataset = read_artifact(folder)  # every shard's sha256 verified
    assert dataset.data.x.shape == (6, 3, 8, 8)
    assert dataset.data.y.tolist() == [0, 0, 0, 1, 1, 1]
    manifest = dataset.manifest
    assert manifest_sha256(manifest) == info.manifest_sha256
    assert manifest.generator_hash == info.generator_hash
    assert manifest.generator_settings["num_inference_steps"] == 2
    assert len(set(manifest.prompts["cat"])) == 2
    assert all("cat" in prompt for prompt in manifest.prompts["cat"])

    # The manifest and the generator reproduce the data bit for bit.
    out = tmp_path / "regenerated"
    code = synth_main(
        [
            "regenerate",
            "--manifest",
            str(folder / "manifest.json"),
            "--generator",
            str(tiny_text_to_image_dir),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert read_manifest(out) == manifest
    for shard in manifest.shards:
        assert hashlib.sha256((out / shard.file).read_bytes()).hexdigest() == shard.sha256


def test_a_text_to_text_prompt_expander_on_the_service_writes_the_prompts(
    start: StartSynth, pki_dir: Path, tiny_text_to_image_dir: Path, tiny_t5_dir: Path
) -> None:
    service = start()
    shutil.copytree(tiny_text_to_image_dir, service.config.models_dir / "tiny-sd")
    shutil.copytree(tiny_t5_dir, service.config.models_dir / "tiny-t5")
    fields: dict[str, Any] = {
        "labels": ["cat", "dog"],
        "images_per_label": 2,
        "in_channels": 3,
        "image_size": 8,
        "seed": 3,
        "prompts_per_label": 2,
        "guidance_min": 1.0,
        "guidance_max": 1.0,
    }
    settings = GeneratorSettings(num_inference_steps=2)
    with _client(pki_dir, service) as client:
        client.wait_ready(10)
        info = client.generate(
            backend="text-to-image",
            generator="tiny-sd",
            request=SynthesisRequest(**fields, prompt_expander="tiny-t5"),
            generator_settings=settings,
        )
        with pytest.raises(grpc.RpcError) as missing:
            client.generate(
                backend="text-to-image",
                generator="tiny-sd",
                request=SynthesisRequest(**fields, prompt_expander="t5-large"),
                generator_settings=settings,
            )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no prompt expander 't5-large'" in (missing.value.details() or "")
    manifest = read_artifact(service.engine.store.root / info.dataset_id).manifest
    assert manifest.request.prompt_expander == "tiny-t5"
    # exactly the prompts the expander writes for this seed, not the templates'
    expander = Seq2SeqExpander.from_directory(tiny_t5_dir)
    expected = build_prompts(["cat", "dog"], per_label=2, seed=3, expander=expander)
    assert manifest.prompts == expected
    assert manifest.prompts != build_prompts(["cat", "dog"], per_label=2, seed=3)


def test_regenerate_fails_on_a_mismatch(
    start: StartSynth, pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = start()
    with _client(pki_dir, service) as client:
        info = client.generate(
            backend="class-conditional",
            generator="digits",
            request=_digits_request(images_per_label=1),
            generator_settings=GeneratorSettings(num_inference_steps=2),
        )
    folder = service.engine.store.root / info.dataset_id
    manifest = read_manifest(folder)
    # Same generator, other seeds: a plan that no longer matches the recorded shards.
    tampered = manifest.model_copy(update={"image_seeds": [s + 1 for s in manifest.image_seeds]})
    (tmp_path / "manifest.json").write_text(tampered.model_dump_json())
    generator = Path(__file__).resolve().parents[2] / "synth_service/assets/digits-generator"
    code = synth_main(["regenerate", "--manifest", str(tmp_path), "--generator", str(generator)])
    assert code == 1
    assert "MISMATCH" in capsys.readouterr().err


def test_class_conditional_generator_yields_the_count_per_label_at_the_target_shape(
    start: StartSynth, pki_dir: Path
) -> None:
    service = start(class_conditional_batch_size=4)
    progress: list[SynthProgress] = []
    with _client(pki_dir, service, role="admin") as client:
        info = client.generate(
            backend="class-conditional",
            generator="digits",
            request=_digits_request(images_per_label=5, in_channels=3, image_size=12),
            generator_settings=GeneratorSettings(num_inference_steps=2),
            on_progress=progress.append,
        )
    assert info.counts == {"0": 5, "1": 5, "seven": 5}
    assert list(info.counts) == ["0", "1", "seven"]  # label order, whatever the wire's
    assert info.images == 15
    assert info.generator_id == "digits-generator"
    dataset = read_artifact(service.engine.store.root / info.dataset_id)
    assert dataset.data.x.shape == (15, 3, 12, 12)
    assert np.bincount(dataset.data.y).tolist() == [5, 5, 5]
    # Progress arrives per batch while the model runs, not only at the end.
    assert [p.done for p in progress if p.stage == "generate"] == [0, 4, 8, 12, 15]
    # The same request again is the same dataset, stored once.
    with _client(pki_dir, service) as client:
        again = client.generate(
            backend="class-conditional",
            generator="digits",
            request=_digits_request(images_per_label=5, in_channels=3, image_size=12),
            generator_settings=GeneratorSettings(num_inference_steps=2),
        )
    assert again.dataset_id == info.dataset_id
    assert again.manifest_sha256 == info.manifest_sha256
    assert _stored(service) == [info.dataset_id]


# ---- Pretrain ---------------------------------------------------------------------------------


class _QuadrantGenerator:
    """A stand-in generator whose classes are learnable at once: a bright block in one of four
    quadrants, plus seeded noise. It makes Pretrain's test independent of a model's quality."""

    backend = "class-conditional"
    generator_id = "quadrants"
    content_hash = "0" * 64
    label_names = ("a", "b", "c", "d")
    image_shape = (1, 8, 8)

    def settings(self) -> dict[str, Any]:
        return {}

    def check_labels(self, labels: Sequence[str]) -> None:
        assert set(labels) <= set(self.label_names)

    def generate(
        self,
        specs: Sequence[ImageSpec],
        *,
        batch_size: int = 16,
        progress: ProgressCallback | None = None,
        step_check: StepCheck | None = None,
    ) -> np.ndarray:
        out = np.empty((len(specs), 1, 8, 8), dtype=np.float32)
        for i, spec in enumerate(specs):
            if step_check is not None:
                step_check()  # one "step" per image
            rng = np.random.default_rng(spec.seed)
            image = rng.uniform(0.0, 0.3, size=(8, 8)).astype(np.float32)
            row, col = divmod(self.label_names.index(spec.label), 2)
            image[row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 0.7
            out[i, 0] = image
        if progress is not None:
            progress(len(specs), len(specs))
        return out


def _store_quadrants(service: SynthService, per_label: int = 40) -> str:
    request = SynthesisRequest(
        labels=list(_QuadrantGenerator.label_names),
        images_per_label=per_label,
        in_channels=1,
        image_size=8,
        guidance_min=1.0,
        guidance_max=1.0,
    )
    dataset = synthesize(_QuadrantGenerator(), request)
    service.engine.store.save(dataset)
    return dataset.manifest.dataset_sha256


def test_pretrain_returns_verified_weights_that_beat_random_init(
    start: StartSynth, pki_dir: Path
) -> None:
    service = start()
    dataset_id = _store_quadrants(service)
    epochs: list[EpochInfo] = []
    settings = PretrainSettings(epochs=4, batch_size=16, learning_rate=0.05, val_fraction=0.25)
    expected = specs_of(build_model(SPEC).state_dict())
    with _client(pki_dir, service) as client:
        outcome = client.pretrain(
            dataset_id=dataset_id,
            model=SPEC,
            settings=settings,
            expected=expected,
            on_epoch=epochs.append,
        )
    assert [e.epoch for e in epochs] == [1, 2, 3, 4]
    assert all(e.epochs == 4 for e in epochs)
    assert outcome.epochs == epochs
    assert outcome.dataset_id == dataset_id
    assert outcome.device == "cpu"
    assert outcome.final_val_accuracy == epochs[-1].val_accuracy
    assert outcome.final_val_accuracy >= outcome.initial_val_accuracy + 0.4
    assert set(specs_of(outcome.weights)) == set(expected)

    # The received weights are the trained model: they score the same held-out split.
    model = build_model(SPEC)
    model.load_state_dict({k: v.clone() for k, v in outcome.weights.items()})
    data = service.engine.store.load(dataset_id).data
    _, val = stratified_split(data, fraction=settings.val_fraction, seed=settings.seed)
    assert evaluate(model, val, device=torch.device("cpu")).accuracy == pytest.approx(
        outcome.final_val_accuracy
    )
    assert service.engine.metrics.pretrain_epoch._value.get() == 4


def test_pretrain_of_a_corrupt_artifact_is_data_loss(start: StartSynth, pki_dir: Path) -> None:
    service = start()
    dataset_id = _store_quadrants(service, per_label=4)
    shard = service.engine.store.root / dataset_id / "shard-00000.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-1] ^= 0x01
    shard.write_bytes(bytes(payload))
    with _client(pki_dir, service) as client, pytest.raises(grpc.RpcError) as failure:
        client.pretrain(dataset_id=dataset_id, model=SPEC, settings=PretrainSettings(epochs=1))
    assert failure.value.code() == grpc.StatusCode.DATA_LOSS
    assert "corrupt" in (failure.value.details() or "")


# ---- refused requests -------------------------------------------------------------------------


GENERATE_REFUSALS: list[tuple[str, dict[str, Any], grpc.StatusCode, str]] = [
    ("unknown backend", {"backend": "gan"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown backend"),
    (
        "unknown generator",
        {"generator": "sd-99"},
        grpc.StatusCode.NOT_FOUND,
        "no generator 'sd-99'",
    ),
    (
        "a path for a generator",
        {"generator": "../etc"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "folder name",
    ),
    (
        "a label the generator does not know",
        {"request": {"labels": ["3", "cat"]}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not know label(s) 'cat'",
    ),
    (
        "a class-conditional folder as text-to-image",
        {"backend": "text-to-image"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a text-to-image pipeline",
    ),
    (
        "a prompt expander for a class-conditional generator",
        {"request": {"prompt_expander": "tiny-t5"}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt_expander applies to text-to-image pipelines only",
    ),
    (
        "a safety checker for a class-conditional generator",
        {"settings": {"enable_safety_checker": True}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "text-to-image pipelines only",
    ),
    (
        "an invalid request",
        {"request_json": '{"labels": ["3"], "images_per_label": 0}'},
        grpc.StatusCode.INVALID_ARGUMENT,
        "images_per_label",
    ),
    (
        "unknown settings",
        {"generator_json": '{"steps": 3}'},
        grpc.StatusCode.INVALID_ARGUMENT,
        "generator_json: steps: unknown key",
    ),
    (
        "a target larger than allowed",
        {"request": {"image_size": 2048}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_image_size",
    ),
    (
        "too many images",
        {"request": {"images_per_label": 500}},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 1000 per request",
    ),
]


def _raw_generate(pki_dir: Path, service: SynthService, changes: dict[str, Any]) -> None:
    """Generate with raw JSON fields (the typed client cannot send invalid ones)."""
    request = _digits_request(images_per_label=2).model_dump()
    request.update(changes.get("request", {}))
    settings = {"num_inference_steps": 2, **changes.get("settings", {})}
    pb = synth_pb2.GenerateRequest(
        backend=changes.get("backend", "class-conditional"),
        generator=changes.get("generator", "digits"),
        request_json=changes.get("request_json", SynthesisRequest(**request).model_dump_json()),
        generator_json=changes.get(
            "generator_json", GeneratorSettings(**settings).model_dump_json()
        ),
    )
    tls = participant_files(pki_dir, "coordinator")
    with open_channel(service.address, tls=tls) as channel:
        list(synth_pb2_grpc.SynthStub(channel).Generate(pb, timeout=30))


@pytest.mark.parametrize(
    ("case", "changes", "code", "message"), GENERATE_REFUSALS, ids=[c[0] for c in GENERATE_REFUSALS]
)
def test_generate_refuses_at_once_with_the_documented_status(
    start: StartSynth,
    pki_dir: Path,
    case: str,
    changes: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
) -> None:
    service = start(max_images_per_request=1000)
    with pytest.raises(grpc.RpcError) as failure:
        _raw_generate(pki_dir, service, changes)
    assert failure.value.code() == code, failure.value.details()
    assert message in (failure.value.details() or ""), failure.value.details()
    assert _stored(service) == []
    assert service.engine.metrics.images_generated._value.get() == 0


def test_generate_without_enough_disk_is_refused(start: StartSynth, pki_dir: Path) -> None:
    service = start(min_free_bytes=1 << 60)
    with _client(pki_dir, service) as client, pytest.raises(grpc.RpcError) as failure:
        client.generate(backend="class-conditional", generator="digits", request=_digits_request())
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "not enough disk space" in (failure.value.details() or "")
    assert _stored(service) == []


def test_a_second_call_while_one_runs_is_refused_as_busy(start: StartSynth, pki_dir: Path) -> None:
    service = start()
    service.engine.acquire("Generate (held by the test)")
    try:
        with _client(pki_dir, service) as client, pytest.raises(grpc.RpcError) as failure:
            client.generate(
                backend="class-conditional", generator="digits", request=_digits_request()
            )
    finally:
        service.engine.release()
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "busy: Generate (held by the test) is running" in (failure.value.details() or "")


PRETRAIN_REFUSALS: list[tuple[str, dict[str, Any], grpc.StatusCode, str]] = [
    ("unknown dataset", {"dataset_id": "ab" * 32}, grpc.StatusCode.NOT_FOUND, "no synthetic"),
    ("malformed id", {"dataset_id": "../x"}, grpc.StatusCode.INVALID_ARGUMENT, "64 lowercase"),
    (
        "shape mismatch",
        {"model": ModelSpec(arch="cnn-small", num_classes=4, in_channels=1, image_size=16)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape mismatch",
    ),
    (
        "class count mismatch",
        {"model": ModelSpec(arch="cnn-small", num_classes=10, in_channels=1, image_size=8)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "has 4 labels, the model has 10 classes",
    ),
    (
        "unknown architecture",
        {"model": ModelSpec(arch="vit-huge", num_classes=4, in_channels=1, image_size=8)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown model architecture",
    ),
]


@pytest.mark.parametrize(
    ("case", "changes", "code", "message"), PRETRAIN_REFUSALS, ids=[c[0] for c in PRETRAIN_REFUSALS]
)
def test_pretrain_refuses_at_once_with_the_documented_status(
    start: StartSynth,
    pki_dir: Path,
    case: str,
    changes: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
) -> None:
    service = start()
    dataset_id = _store_quadrants(service, per_label=2)
    with _client(pki_dir, service) as client, pytest.raises(grpc.RpcError) as failure:
        client.pretrain(
            dataset_id=changes.get("dataset_id", dataset_id),
            model=changes.get("model", SPEC),
            settings=PretrainSettings(epochs=1),
        )
    assert failure.value.code() == code, failure.value.details()
    assert message in (failure.value.details() or ""), failure.value.details()
    assert service.engine.metrics.pretrain_epoch._value.get() == 0


def test_a_silo_certificate_is_refused(start: StartSynth, pki_dir: Path) -> None:
    service = start()
    with _client(pki_dir, service, role="silo") as client, pytest.raises(grpc.RpcError) as failure:
        client.generate(backend="class-conditional", generator="digits", request=_digits_request())
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs 'coordinator' or 'admin'" in (failure.value.details() or "")
    with _client(pki_dir, service, role="silo") as client, pytest.raises(grpc.RpcError) as failure:
        client.pretrain(dataset_id="ab" * 32, model=SPEC, settings=PretrainSettings())
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _stored(service) == []


# ---- cancellation, health, the process ------------------------------------------------------


def test_a_caller_that_stops_listening_cancels_the_work(start: StartSynth, pki_dir: Path) -> None:
    service = start(class_conditional_batch_size=1)

    class Enough(Exception):
        pass

    def stop_after_first_batch(progress: SynthProgress) -> None:
        if progress.stage == "generate" and progress.done >= 1:
            raise Enough

    with _client(pki_dir, service) as client, pytest.raises(Enough):
        client.generate(
            backend="class-conditional",
            generator="digits",
            request=_digits_request(images_per_label=20),
            generator_settings=GeneratorSettings(num_inference_steps=2),
            on_progress=stop_after_first_batch,
        )
    # The work stops at its next batch and frees the slot; nothing is stored.
    wait_until(
        lambda: service.engine.wait_idle(0.1),
        timeout_s=20,
        interval_s=0,
        what="the cancelled work to stop",
    )
    assert _stored(service) == []
    assert service.engine.metrics.images_generated._value.get() <= 30  # well before all 60
    with _client(pki_dir, service) as client:
        info = client.generate(
            backend="class-conditional",
            generator="digits",
            request=_digits_request(images_per_label=1),
            generator_settings=GeneratorSettings(num_inference_steps=2),
        )
    assert info.images == 3


@pytest.mark.timeout(60)  # bounds a wait_ready that never gives up; no time is asserted
def test_wait_ready_gives_up_with_unavailable(pki_dir: Path) -> None:
    tls = participant_files(pki_dir, "coordinator")
    with (
        SynthClient("127.0.0.1:1", tls=tls) as client,
        pytest.raises(UnavailableError, match="not serving after 0.5s") as info,
    ):
        client.wait_ready(0.5)
    assert "UNAVAILABLE" in str(info.value)  # the last health check's failure is named


def test_entry_point_rejects_a_bad_config_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "synth.yaml"
    config.write_text("insecure: true\nmodel_dir: /models\n")
    assert synth_main(["--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err == "gptfl-synth: synth.yaml: model_dir: unknown key"


@pytest.mark.slow
def test_local_cluster_runs_the_service_as_a_process(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "work", silos=[], metrics=True)
    cluster.provision()
    try:
        address = cluster.start_synth(timeout_s=60)
        assert cluster.synth_address == address and address.startswith("127.0.0.1:")
        assert isinstance(cluster.synth_metrics_port, int)
        tls = participant_files(cluster.pki_dir, "coordinator")
        with SynthClient(address, tls=tls) as client:
            client.wait_ready(30)
            info: DatasetInfo = client.generate(
                backend="class-conditional",
                generator="digits",
                request=_digits_request(labels=DIGITS, images_per_label=1),
                generator_settings=GeneratorSettings(num_inference_steps=2),
            )
        assert info.images == 10
    finally:
        codes = cluster.stop(timeout_s=30)
    assert codes == {"synth": 0}, cluster.log_tail("synth")
    assert "synth service stopped" in cluster.log_tail("synth")
