"""The pipelines as data: DAGs of stage nodes, checked before they run, executed by flows/runner.py.

A node names a stage, binds each of the stage's inputs to an earlier node's output (`"node.output"`; by default
the latest earlier node that outputs a dataset of the input's name, else what the previous cycle carries), says
which checkpoint it runs (`parent`, or the id of a posttrain node whose child it runs) and may override config
sections (an ablation arm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks import STAGES

# what one cycle hands the next: select's discard pool (curriculum) and seed library
CARRIED = ("discard_pool", "seed_library")


class DagError(ValueError):
    pass


@dataclass(frozen=True)
class Node:
    id: str
    stage: str
    inputs: dict[str, str] = field(default_factory=dict)  # input -> "node.output"
    model: str = "parent"  # "parent", or a posttrain node's id: the checkpoint it trained
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # config section -> field updates


@dataclass(frozen=True)
class Dag:
    name: str
    nodes: tuple[Node, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Dag":
        """A DAG as a run record keeps it (dataclasses.asdict)."""
        return cls(data["name"], tuple(Node(**n) for n in data["nodes"])).check()

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise DagError(f"DAG {self.name!r} has no node {node_id!r} (nodes: {', '.join(n.id for n in self.nodes)})")

    def bindings(self, node: Node) -> dict[str, tuple[str, str]]:
        """input name -> (producer node id, output name); '' as producer means carried from the last cycle."""
        spec = STAGES[node.stage].STAGE
        before = self.nodes[: self.nodes.index(node)]
        out: dict[str, tuple[str, str]] = {}
        for name in (*spec.inputs, *spec.optional):
            if name in node.inputs:
                src, _, output = node.inputs[name].partition(".")
                out[name] = (src, output)
                continue
            producers = [n.id for n in before if name in STAGES[n.stage].STAGE.outputs]
            if producers:
                out[name] = (producers[-1], name)
            elif name in CARRIED:
                out[name] = ("", name)
        return out

    def downstream(self, node_ids: set[str]) -> list[str]:
        """These nodes and every node that depends on them, in DAG order."""
        hit = set(node_ids)
        for n in self.nodes:
            deps = {src for src, _ in self.bindings(n).values() if src} | ({n.model} - {"parent"})
            if deps & hit:
                hit.add(n.id)
        return [n.id for n in self.nodes if n.id in hit]

    def check(self) -> "Dag":
        """Every stage exists, ids are unique, every required input and model binding names an earlier output."""
        seen: dict[str, Node] = {}
        for n in self.nodes:
            if n.stage not in STAGES:
                raise DagError(f"DAG {self.name!r}, node {n.id!r}: unknown stage {n.stage!r} "
                               f"(stages: {', '.join(STAGES)})")
            if n.id in seen:
                raise DagError(f"DAG {self.name!r}: node id {n.id!r} is used twice")
            spec = STAGES[n.stage].STAGE
            binds = self.bindings(n)
            for name in spec.inputs:
                if name not in binds:
                    raise DagError(f"DAG {self.name!r}, node {n.id!r}: no earlier node outputs {name!r}, "
                                   f"which stage {n.stage!r} needs")
            for name, (src, output) in binds.items():
                if src and (src not in seen or output not in STAGES[seen[src].stage].STAGE.outputs):
                    raise DagError(f"DAG {self.name!r}, node {n.id!r}: input {name!r} is bound to {src}.{output}, "
                                   "which no earlier node outputs")
            if n.model != "parent" and (n.model not in seen or "checkpoint" not in
                                        STAGES[seen[n.model].stage].STAGE.outputs):
                raise DagError(f"DAG {self.name!r}, node {n.id!r}: model {n.model!r} is no earlier posttrain node")
            seen[n.id] = n
        return self


GENERATE = Dag("generate", (Node("suite", "suite"), Node("propose", "propose"), Node("rollout", "rollout"),
                            Node("judge", "judge"), Node("select", "select"))).check()


def training_side(suffix: str = "", overrides: dict[str, dict[str, Any]] | None = None,
                  parent_bench: str = "benchmark_parent", examples: str = "reconstruct") -> tuple[Node, ...]:
    """reconstruct (or another stage that writes training examples) -> posttrain -> the child's benchmark, its
    judge on the parent's images -> gate."""
    o = overrides or {}
    src, post, bench = f"{examples}{suffix}", f"posttrain{suffix}", f"benchmark_child{suffix}"
    return (Node(src, examples, overrides=o),
            Node(post, "posttrain", inputs={name: f"{src}.{name}" for name in ("cpr", "dpo_pairs", "groups")},
                 overrides=o),
            Node(bench, "benchmark", model=post),
            Node(f"judge_shift{suffix}", "judge_shift", model=post,
                 inputs={"benchmark_items": f"{parent_bench}.benchmark_items"}),
            Node(f"gate{suffix}", "gate", overrides=o, inputs={
                "parent_items": f"{parent_bench}.benchmark_items", "child_items": f"{bench}.benchmark_items",
                "parent_benchmark": f"{parent_bench}.benchmark", "child_benchmark": f"{bench}.benchmark",
                "judge_on_images": f"judge_shift{suffix}.judge_on_images", "checkpoint": f"{post}.checkpoint"}))


_TRAIN = training_side()
CYCLE = Dag("cycle", (*GENERATE.nodes, *_TRAIN[:2], Node("benchmark_parent", "benchmark"), *_TRAIN[2:],
                      Node("report", "report", inputs={"parent_benchmark": "benchmark_parent.benchmark",
                                                       "child_benchmark": "benchmark_child.benchmark"}))).check()

# generation-only SFT vs UniCorn's CPR mixture vs DPO, each trained on the same generation side
ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "gen_only": {"reconstruct": {"mixture": {"generation": 1, "caption": 0, "judgement": 0, "reflection": 0}},
                 "posttrain": {"objective": "sft"}},
    "cpr": {"reconstruct": {"mixture": {"generation": 5, "caption": 5, "judgement": 3, "reflection": 1}},
            "posttrain": {"objective": "sft"}},
    # DPO at UniCorn's lr: at the SFT recipe's 5e-5 it overfit the ~200 pairs (16 passes) and lost 17 points
    "dpo": {"reconstruct": {"mixture": {"generation": 5, "caption": 5, "judgement": 3, "reflection": 1}},
            "posttrain": {"objective": "dpo", "lr": 1e-5, "min_lr": 1e-6}},
    # every scored rollout, group-relative (its reconstruct node is the cpr arm's: the same datasets)
    "grpo": {"reconstruct": {"mixture": {"generation": 5, "caption": 5, "judgement": 3, "reflection": 1}},
             "posttrain": {"objective": "grpo"}},
    # the ceiling (not self-play): generation-only SFT on true renders of the same accepted prompts
    "ceiling": {"reconstruct": {"mixture": {"generation": 1, "caption": 0, "judgement": 0, "reflection": 0}},
                "posttrain": {"objective": "sft"}},
}


# reference arms whose examples another stage writes: not self-play, a line to measure self-play against
ARM_EXAMPLES = {"ceiling": "ground_truth"}
# the arms `selfplay ablate` runs unless told otherwise
DEFAULT_ARMS = ("gen_only", "cpr", "dpo", "grpo")


def ablation(arms: dict[str, dict[str, dict[str, Any]]]) -> Dag:
    """One generation side and the parent's benchmark, then each arm's training side; no arm moves the pointer."""
    nodes = [*GENERATE.nodes, Node("benchmark_parent", "benchmark")]
    for name, over in arms.items():
        nodes += training_side(f"_{name}", {**over, "gate": {"promote": False}},
                               examples=ARM_EXAMPLES.get(name, "reconstruct"))
    return Dag("ablation", tuple(nodes)).check()


DAGS = {d.name: d for d in (GENERATE, CYCLE)}

