"""Preflight: everything a run names is checked before its first stage writes anything.

The config checks itself when it loads (strict types, ranges, the judge, the gate's metrics, the seed file and its
categories, the backend's rubric and sampling). What needs the DAG or the store is checked here, by every command
and again by the runner (a run started from the Prefect UI): the DAG, each node's config overrides, the stages
`stages.scale` and `--refresh` name, and that `model.checkpoint` names a checkpoint that exists. Read only:
nothing is registered, promoted or written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from configs.loader import ConfigError, validate
from configs.schema import CycleConfig
from flows.dags import Dag, DagError
from model import registry
from storage import Registry, Store
from storage.checkpoints import WEIGHTS_FILES, weights_file
from tasks import STAGES


class PreflightError(ValueError):
    pass


def node_config(cfg: CycleConfig, section: str | tuple[str, ...] | None, overrides: dict[str, dict],
                node: str = "") -> Any:
    """The stage's config section(s), with the node's overrides applied and validated."""
    def one(name: str):
        sec = getattr(cfg, name)
        return validate(type(sec), {**sec.model_dump(), **overrides.get(name, {})},
                        f"node {node!r}, section {name!r}")

    if section is None:
        return None
    return one(section) if isinstance(section, str) else {s: one(s) for s in section}


def check_checkpoint(cfg: CycleConfig) -> None:
    """`model.checkpoint` is 'base', 'promoted' (a valid pointer, or none yet), a checkpoint directory with
    safetensors weights, or an id registered in the line."""
    section, store = cfg.model, cfg.run.store
    pointer = section.checkpoint
    if pointer == "base":
        check_base = registry.get(section.backend).check_base
        if check_base is not None:
            try:
                check_base(section)
            except ValueError as exc:
                raise PreflightError(str(exc)) from None
        return
    reg = Registry(store, section.registry_line)
    if pointer == "promoted":
        reg.promoted()  # a dangling or damaged pointer raises its own one-line error
        return
    if os.path.isdir(pointer):
        if weights_file(pointer) is None:
            raise PreflightError(f"model.checkpoint {pointer!r}: the directory has no {' or '.join(WEIGHTS_FILES)}")
        return
    if reg.meta(pointer) is None:
        known = [m.checkpoint_id for m in reg.list()]
        raise PreflightError(
            f"model.checkpoint {pointer!r}: not 'base', 'promoted', a directory, or a checkpoint id registered in "
            f"line {section.registry_line!r} of store {Store(store).root}"
            + (f" (registered: {', '.join(known[-5:])})" if known else " (the line has no checkpoints yet)"))


def preflight(dag: Dag, cfg: CycleConfig, refresh: Iterable[str] = (), nodes: Iterable[str] | None = None) -> None:
    """Raise one DagError / ConfigError / PreflightError / RegistryError naming what is wrong, or return."""
    dag.check()
    ids = [n.id for n in dag.nodes]
    sharded = {n.stage for n in dag.nodes if STAGES[n.stage].STAGE.sharded}
    unknown = sorted(set(cfg.stages.scale) - sharded)
    if unknown:
        raise DagError(f"stages.scale names {unknown}: not sharded stages of DAG {dag.name!r} (those are "
                       f"{', '.join(sorted(sharded))})")
    for name, items in (("--refresh", refresh), ("nodes", nodes or ())):
        bad = sorted(set(items) - set(ids))
        if bad:
            raise DagError(f"{name} names {bad}: not nodes of DAG {dag.name!r} (its nodes: {', '.join(ids)})")
    sections = {}
    for n in dag.nodes:
        try:
            sections[n.id] = node_config(cfg, STAGES[n.stage].STAGE.section, n.overrides, n.id)
        except ConfigError as exc:
            raise ConfigError(f"DAG {dag.name!r}: {exc}") from None
    for n in dag.nodes:  # the oracle measures; it never chooses training data
        src = dag.bindings(n).get("judgements", ("", ""))[0] if n.stage == "select" else ""
        if src and (nodes is None or n.id in nodes) and sections[src].judge == "oracle":
            raise PreflightError(f"judge.judge={sections[src].judge!r} measures only: select (node {n.id!r}) "
                                 "trains on the model's own judgements; score rollouts with it alone through "
                                 "`selfplay stage judge --only judge.judge=oracle`")
    check_checkpoint(cfg)
    check_vlm([sections[n.id] for n in dag.nodes if nodes is None or n.id in nodes])


def check_vlm(sections: Iterable[Any]) -> None:
    """Every external VLM the stages to run will call answers now, before any work: an HTTP endpoint serves the
    configured model; an in-process engine's environment exists (it starts on the worker that needs it)."""
    from model.vlm import make_vlm

    wanted = {}
    for sec in sections:
        for s in (sec.values() if isinstance(sec, dict) else [sec]):
            if getattr(s, "judge", None) == "vlm" or getattr(s, "evaluator", None) == "vlm":
                wanted[s.vlm.model_dump_json()] = s.vlm
    for vlm in wanted.values():
        make_vlm(vlm).check(start=False)
