"""What `meshyard plan --simulate` reports (launcher/simulate.py): per simulated rank group a line,
then every problem with the ranks, stage and module; as text, or as a dict for `--json`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """What a launch would hit on `ranks`: an error, or a step the simulation could not run."""

    ranks: tuple[int, ...]
    phase: str  # build | forward | backward | optimizer step
    stage: int | None  # pipeline stage (None: outside a stage, or no pipeline)
    module: str | None  # whole-model path of the module, when known
    detail: str
    simulated: bool = True  # False: fake tensors cannot run this (the model reads values), not a plan error

    def describe(self) -> str:
        where = [self.phase] + ([f"stage {self.stage}"] if self.stage is not None else [])
        where += [self.module] if self.module else []
        label = "error" if self.simulated else "not simulated"
        return f"{label}: ranks {rank_list(self.ranks)}: {', '.join(where)}: {self.detail}"


@dataclass(frozen=True)
class GroupResult:
    """One simulated rank and the ranks it stands for (its data-parallel replicas)."""

    ranks: tuple[int, ...]
    coordinates: dict[str, int]  # pp, dp_shard, tp
    stages: tuple[int, ...]
    local_params: int  # parameter elements this rank holds (its shards)
    problems: tuple[Problem, ...]

    def describe(self) -> str:
        verdict = "ok" if not self.problems else f"{len(self.problems)} problem(s)"
        if not self.coordinates:
            return f"ranks {rank_list(self.ranks)} (the whole model): {self.local_params:,} params held: {verdict}"
        where = ", ".join(f"{axis} {index}" for axis, index in self.coordinates.items())
        if self.stages:
            where += f"; stage {', '.join(map(str, self.stages))}"
        return (f"rank {self.ranks[0]:<4} ({where}) for ranks {rank_list(self.ranks)}: {self.local_params:,} params"
                f" held: {verdict}")


@dataclass(frozen=True)
class Simulation:
    world_size: int
    groups: tuple[GroupResult, ...]
    seconds: float
    how: str  # what was simulated, one line

    @property
    def problems(self) -> list[Problem]:
        """Problems of every group, the same problem on several groups merged into one (all their ranks)."""
        merged: dict[tuple[Any, ...], set[int]] = {}
        for group in self.groups:
            for p in group.problems:
                merged.setdefault((p.phase, p.stage, p.module, p.detail, p.simulated), set()).update(p.ranks)
        return [Problem(tuple(sorted(ranks)), *key) for key, ranks in merged.items()]

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [f"simulation       {self.how}", *(group.describe() for group in self.groups)]
        lines += [problem.describe() for problem in self.problems]
        verdict = "ok" if self.ok else "FAILED"
        lines.append(f"simulated        {verdict}: {len(self.groups)} rank group(s) of {self.world_size} ranks in"
                     f" {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "world_size": self.world_size, "seconds": round(self.seconds, 3), "how": self.how,
                "groups": [asdict(group) for group in self.groups],
                "problems": [asdict(problem) for problem in self.problems]}


def rank_list(ranks: tuple[int, ...]) -> str:
    """0-3, 8, 12-15."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs)
