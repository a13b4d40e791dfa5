"""The `mutual` section: the peers of a mutual run, and what they must share with the
student (distill.mode: mutual)."""

from __future__ import annotations

from pydantic import Field

from orchestrator.config_base import Name, Strict, StudentConfig


class PeerConfig(StudentConfig):
    """Another student of a mutual run: its own DeepSpeed group, model and size."""

    name: Name


class MutualConfig(Strict):
    peers: list[PeerConfig] = Field(default_factory=list)
    peer_weight: float = Field(1.0, gt=0, description="weight of each peer's divergence")


def check(m: MutualConfig, student: StudentConfig, teachers: list[str]) -> None:
    """A mutual run's peers: at least one, named apart, as many ranks as the student."""
    if not m.peers:
        raise ValueError("mutual.peers: distill.mode 'mutual' needs at least one peer")
    names = ["student", *(p.name for p in m.peers), *teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"mutual.peers: names must be unique and not 'student': {names}")
    for i, p in enumerate(m.peers):
        if p.world_size != student.world_size:
            raise ValueError(
                f"mutual.peers.{i}.world_size: {p.world_size} differs from "
                f"student.world_size={student.world_size}; peers train on the same shards"
            )
