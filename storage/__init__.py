"""The artifact store: Parquet datasets with manifests and fingerprints, a PNG image codec, a checkpoint registry."""

from storage.checkpoints import (CHECKSUMS, CheckpointMeta, Registry, RegistryError, checksums, differences,
                                 read_checksums, write_checksums)
from storage.dataset import (BuildResult, CorruptPartError, Dataset, DatasetRef, Manifest, build, commit_parts,
                             fingerprint)
from storage.images import from_png, to_png
from storage.names import InvalidNameError, validate_name
from storage.runs import NodeRecord, RunRecord, RunRecordError, RunRecords
from storage.store import DEFAULT_STORE, Store

__all__ = ["BuildResult", "CHECKSUMS", "CheckpointMeta", "CorruptPartError", "DEFAULT_STORE", "Dataset", "DatasetRef",
           "InvalidNameError", "Manifest", "NodeRecord", "Registry", "RegistryError", "RunRecord", "RunRecordError", "RunRecords", "Store", "build", "checksums", "commit_parts",
           "differences", "fingerprint", "from_png", "read_checksums", "to_png", "validate_name", "write_checksums"]
