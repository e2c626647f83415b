"""Where the service keeps its synthetic datasets: ``data_dir/datasets/<dataset_id>/``.

A dataset's id is its ``dataset_sha256`` (over its shards' hashes), so a directory's name
says what it holds and the same data is never stored twice. A new artifact is written into a
hidden staging folder and renamed into place, so ``datasets/`` only ever holds complete
artifacts, even after a crash.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from pathlib import Path

from gptfl.errors import NotFoundError, ValidationError
from synth_service.artifacts import (
    MANIFEST_NAME,
    Manifest,
    SyntheticDataset,
    manifest_sha256,
    read_artifact,
    read_manifest,
    shards_intact,
    write_artifact,
)

logger = logging.getLogger(__name__)

_DATASET_ID = re.compile(r"^[0-9a-f]{64}$")


class DatasetStore:
    """Artifacts by dataset id under one folder."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "datasets"
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-write

    def path_of(self, dataset_id: str) -> Path:
        """The artifact folder of ``dataset_id`` (which need not exist).

        Raises:
            ValidationError: not a 64-digit lowercase hex id.
        """
        if not _DATASET_ID.match(dataset_id):
            raise ValidationError(
                f"dataset_id must be 64 lowercase hex digits (a DatasetInfo.dataset_id), got "
                f"{dataset_id[:80]!r}"
            )
        return self.root / dataset_id

    def manifest(self, dataset_id: str) -> Manifest:
        """The stored manifest of ``dataset_id`` (shards are not read).

        Raises:
            ValidationError: a malformed id or manifest.
            NotFoundError: no such dataset here.
        """
        path = self.path_of(dataset_id)
        if not (path / MANIFEST_NAME).is_file():
            raise NotFoundError(f"no synthetic dataset {dataset_id[:16]}... on this service")
        return read_manifest(path)

    def load(self, dataset_id: str) -> SyntheticDataset:
        """Reads the artifact, verifying every shard.

        Raises:
            NotFoundError, ValidationError, ChecksumError.
        """
        self.manifest(dataset_id)
        return read_artifact(self.path_of(dataset_id))

    def save(self, dataset: SyntheticDataset) -> Path:
        """Stores ``dataset`` under its id; returns its folder.

        When the folder already holds the same data with the same manifest it is kept; with
        another manifest (the same images made from another request) it is replaced, so the
        stored manifest is always the one just reported.
        """
        dataset_id = dataset.manifest.dataset_sha256
        target = self.path_of(dataset_id)
        if (target / MANIFEST_NAME).is_file():
            try:
                stored = read_manifest(target)
                same = manifest_sha256(stored) == manifest_sha256(dataset.manifest)
            except ValidationError:
                same = False
            if same and shards_intact(target, stored):
                logger.info("dataset %s is already stored", dataset_id[:12])
                return target
            if same:
                logger.warning("dataset %s was stored damaged; writing it again", dataset_id[:12])
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        try:
            write_artifact(dataset, staging)
            if target.exists():
                retired = self.root / f".staging-old-{uuid.uuid4().hex}"
                target.rename(retired)
                shutil.rmtree(retired, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
