"""How an engine's weights are split over processes: the manifest's "parallel" section.

    "parallel": {"tp": 2, "pp": 1, "rank_files": ["rank0.safetensors", "rank1.safetensors"]}

Global rank r (ParallelState.rank = pp_rank * tp + tp_rank) loads rank_files[r]. Engines
written before "rank_files" existed are tp 1, pp 1 and keep their one rank0.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.parallel.state import ParallelState


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True)
class EngineLayout:
    tp: int = 1
    pp: int = 1
    # One weights file per global rank, in rank order.
    rank_files: tuple[str, ...] = (rank_file_name(0),)

    @classmethod
    def for_sizes(cls, tp: int, pp: int) -> "EngineLayout":
        return cls(tp, pp, tuple(rank_file_name(r) for r in range(tp * pp)))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def matches(self, parallel: ParallelState) -> bool:
        return (self.tp, self.pp) == (parallel.tp_size, parallel.pp_size)

    def to_manifest(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "rank_files": list(self.rank_files)}

    @classmethod
    def from_manifest(cls, section: object, file_names: set[str]) -> "EngineLayout":
        """The "parallel" section checked as untrusted input: sizes are ints >= 1, and one
        rank file per rank, each among the engine's `file_names`. Raises ValueError naming
        the field."""
        if not isinstance(section, dict):
            raise ValueError(f"expected an object with 'tp' and 'pp', got {section!r}")
        sizes = {}
        for name in ("tp", "pp"):
            value = section.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"'{name}' must be an int >= 1, got {value!r}")
            sizes[name] = value
        tp, pp = sizes["tp"], sizes["pp"]
        unknown = sorted(set(section) - {"tp", "pp", "rank_files"})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; fields: tp, pp, rank_files")
        rank_files = section.get("rank_files")
        if rank_files is None:
            if tp * pp != 1:
                raise ValueError(f"'rank_files' is missing; tp {tp} × pp {pp} needs {tp * pp}")
            return cls()  # an engine from before rank_files: its one rank0.safetensors
        if not isinstance(rank_files, list) or not all(isinstance(f, str) for f in rank_files):
            raise ValueError(f"'rank_files' must be a list of file names, got {rank_files!r}")
        if len(rank_files) != tp * pp:
            raise ValueError(
                f"'rank_files' lists {len(rank_files)} files; tp {tp} × pp {pp} needs {tp * pp}"
            )
        if len(set(rank_files)) != len(rank_files):
            raise ValueError(f"'rank_files' lists a file twice: {rank_files}")
        for name in rank_files:
            if name not in file_names:
                raise ValueError(f"rank file {name!r} is not among the engine's files")
        return cls(tp, pp, tuple(rank_files))
