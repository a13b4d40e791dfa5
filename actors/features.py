"""Feature (hidden-state) distillation: student layers pulled toward teacher layers.

The teacher ships float16 hidden states of the chosen layers at the loss positions (in the
same signal as its top-k); the student maps each chosen layer through a learned linear
projection when the widths differ (trained with the student, never exported: it lives
beside the HF model, not in it) and pays a per-position loss. Layers are numbered as HF's
`hidden_states`: 0 the embeddings, i the output of the first i blocks, L the final
normalised output. Like the objective, the term is a token SUM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actors.registry import Registry
from actors.signal import TeacherSignal

FeatureLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ([P, H], [P, H]) -> [P]
FEATURE_LOSSES: Registry[FeatureLoss] = Registry("feature loss")
EPS = 1e-6


@FEATURE_LOSSES.register("cosine")
def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos per position: the direction only, blind to the few huge channels."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=EPS)


@FEATURE_LOSSES.register("mse")
def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error per position with every channel divided by the teacher's spread
    of that channel over these positions (raw MSE is ruled by a few huge channels)."""
    spread = teacher.std(dim=0, unbiased=False) if teacher.shape[0] > 1 else teacher.abs()[0]
    scale = spread.detach().clamp_min(EPS)
    return (((student - teacher) / scale) ** 2).mean(dim=-1)


@dataclass(frozen=True)
class FeatureSpec:
    """What a rank needs: (student layer, teacher layer) pairs, the loss, its weight, which
    signal carries the teacher's states and how wide the teacher is."""

    pairs: tuple[tuple[int, int], ...]
    loss: str
    weight: float
    teacher: str
    teacher_width: int

    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t for _, t in self.pairs}))


def uniform_pairs(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """Student output i (1..L_s) against the teacher's at the same depth fraction; the final
    normalised outputs meet."""
    return tuple(
        (i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)
    )


class FeatureTransfer(torch.nn.Module):
    """The projections (identity where the widths agree) and the loss over the pairs."""

    def __init__(self, spec: FeatureSpec, student_width: int) -> None:
        super().__init__()
        self.spec = spec
        self.loss = FEATURE_LOSSES[spec.loss]
        width = spec.teacher_width
        self.proj = torch.nn.ModuleDict(
            {
                str(s): torch.nn.Linear(student_width, width, bias=False)
                for s, _ in spec.pairs
                if student_width != width
            }
        )

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        proj = self.proj[str(layer)] if str(layer) in self.proj else None
        return proj(hidden.to(proj.weight.dtype)) if proj is not None else hidden

    def forward(
        self, student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """Sum over positions of the mean over pairs of the loss (unweighted); `student`:
        {layer: [P, H_s]}, `teacher`: {layer: [P, H_t]} at the same loss positions."""
        total = None
        for s, t in self.spec.pairs:
            mine = self.project(s, student[s]).float()
            per_position = self.loss(mine, teacher[t].to(mine.device, torch.float32))
            total = per_position.sum() if total is None else total + per_position.sum()
        assert total is not None, "no feature pairs"
        return total / len(self.spec.pairs)


def teacher_states(
    signals: list[TeacherSignal], spec: FeatureSpec | None, device: torch.device
) -> dict[int, torch.Tensor] | None:
    """The feature teacher's states of a micro-batch's signals, on the device; None when
    there is no feature term."""
    if spec is None:
        return None
    for sig in signals:
        if sig.teacher == spec.teacher:
            missing = set(spec.teacher_layers()) - set(sig.hidden.layers)
            if missing:
                raise ValueError(
                    f"teacher {sig.teacher} sent hidden layers {sorted(sig.hidden.layers)}, "
                    f"the feature loss needs {sorted(missing)} too"
                )
            return {
                t: torch.from_numpy(sig.hidden.layers[t]).to(device) for t in spec.teacher_layers()
            }
    raise ValueError(f"no signal from teacher {spec.teacher!r}, the feature loss reads its states")
