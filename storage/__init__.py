"""The artifact store: Parquet datasets with manifests and fingerprints, a PNG image codec, a checkpoint registry."""

from storage.checkpoints import CheckpointMeta, Registry, RegistryError
from storage.dataset import (BuildResult, CorruptPartError, Dataset, DatasetRef, Manifest, build, commit_parts,
                             fingerprint)
from storage.images import from_png, to_png
from storage.names import InvalidNameError, validate_name
from storage.runs import NodeRecord, RunRecord, RunRecordError, RunRecords
from storage.store import DEFAULT_STORE, Store

__all__ = ["BuildResult", "CheckpointMeta", "CorruptPartError", "DEFAULT_STORE", "Dataset", "DatasetRef",
           "InvalidNameError", "Manifest", "NodeRecord", "Registry", "RegistryError", "RunRecord", "RunRecordError", "RunRecords", "Store", "build", "commit_parts", "fingerprint",
           "from_png", "to_png", "validate_name"]
