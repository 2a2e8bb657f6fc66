"""The pipeline's stages, one module each, by name. Each declares its `STAGE` spec (tasks/stage.py)."""

from tasks import (benchmark, gate, ground_truth, judge, judge_shift, posttrain, propose, reconstruct, report, rollout,
                   select, suite)

STAGES = {m.STAGE.name: m for m in (suite, propose, rollout, judge, select, reconstruct, posttrain, benchmark,
                                    judge_shift, gate, report, ground_truth)}
