"""Run records: what each stage of a cycle ran on, so a one-stage rerun replays exactly that.

`<store>/<run>/_records/cycle-<N>.json` holds the cycle's DAG (as data), its resolved config (the model's
checkpoint as an id, never a pointer such as 'promoted'), what the previous cycle carried in, and per node the
stage, its resolved input refs, its output refs, the checkpoint id it ran and its config. It is rewritten
atomically after every node, so an interrupted cycle is recorded up to where it got. A rerun with overrides
writes its own record beside it (`cycle-<N>.<variant>.json`); the cycle's record stays as it ran.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field

from storage.dataset import DatasetRef
from storage.names import validate_name
from storage.store import Store


class NodeRecord(BaseModel):
    stage: str
    inputs: dict[str, DatasetRef] = Field(default_factory=dict)
    outputs: dict[str, DatasetRef] = Field(default_factory=dict)
    checkpoint_id: str | None = None
    config: Any = None


class RunRecord(BaseModel):
    run: str
    cycle: int
    dag: dict[str, Any]
    config: dict[str, Any]
    checkpoint_id: str  # the cycle's parent
    carried: dict[str, DatasetRef] = Field(default_factory=dict)
    nodes: dict[str, NodeRecord] = Field(default_factory=dict)
    variant: str = ""

    def outputs(self, node_id: str) -> dict[str, DatasetRef]:
        return self.nodes[node_id].outputs


class RunRecordError(FileNotFoundError):
    pass


class RunRecords:
    def __init__(self, store: str | Store, run: str):
        self.store = store if isinstance(store, Store) else Store(store)
        self.run = validate_name(run, "run name")
        self.root = self.store.path(self.run, "_records")

    def path(self, cycle: int, variant: str = "") -> str:
        name = f"cycle-{cycle}" + (f".{validate_name(variant, 'record variant')}" if variant else "")
        return f"{self.root}/{name}.json"

    def save(self, record: RunRecord) -> None:
        self.store.atomic_write(self.path(record.cycle, record.variant), record.model_dump_json(indent=1).encode())

    def cycles(self) -> list[int]:
        if not self.store.exists(self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.store.fs.ls(self.root, detail=False)]
        return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"cycle-(\d+)\.json", n)))

    def load(self, cycle: int | None = None) -> RunRecord:
        """The record of `cycle` (default: the run's latest cycle)."""
        have = self.cycles()
        where = f"store {self.store.root}"
        if not have:
            raise RunRecordError(f"no recorded run {self.run!r} in {where}")
        if cycle is None:
            cycle = have[-1]
        if cycle not in have:
            raise RunRecordError(f"run {self.run!r} has no recorded cycle {cycle} (recorded: "
                                 f"{', '.join(map(str, have))})")
        return RunRecord.model_validate_json(self.store.read_bytes(self.path(cycle)))

    def find(self, cycle: int) -> RunRecord | None:
        return self.load(cycle) if cycle in self.cycles() else None
