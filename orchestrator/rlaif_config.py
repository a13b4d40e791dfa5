"""The `judges` and `rlaif` sections: who judges the student's samples and how the RL term
is formed (distill.mode: rlaif), with the rules between them and the rollouts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from actors.rl_losses import KL_ESTIMATORS
from actors.rl_objective import ALGORITHMS
from orchestrator.config_base import Name, Placed, Strict, registered


class JudgeConfig(Placed):
    """One judge of the student's samples (distill.mode: rlaif): a model with a rubric, or a
    Python function `module:function` (sample, prompt) -> float run in the judge actors."""

    name: Name
    kind: Literal["score", "pairwise", "critique", "likelihood", "verifier"] = Field(
        "score",
        description="score: a rating 1..9 read off the next token (or a function's number); "
        "pairwise: a preference between two samples, asked in both orders; critique: a "
        "rewrite trained on with CE; likelihood: the model's mean log-probability per token "
        "of the sample (end of turn included); verifier: a function checking the sample "
        "against its prompt (checked on labelled fixtures, not by the judge check)",
    )
    role: Literal["reward", "evaluator"] = Field(
        "reward",
        description="reward: its judgments train the policy; evaluator: it only counts the "
        "win rate against the starting student (so wins are counted by a judge the policy "
        "was not trained to please)",
    )
    min_agreement: float = Field(
        0.7,
        ge=0,
        le=1,
        description="the judge check's agreement below which the judge is refused (at the "
        "start of a run and by `raydistill judge check`); lower it to use a judge anyway",
    )
    relative: bool = Field(
        False,
        description="likelihood: minus the student's own mean log-probability of the sample "
        "at the sampling temperature (a sequence-level reverse-KL reward)",
    )
    model: str | None = Field(None, description="a model folder, known name or hub name")
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="a judge with its own `model`: vllm reads its judgments from a vLLM "
        "engine's prompt log-probs (extra `raydistill[vllm]`)",
    )
    teacher: str | None = Field(
        None,
        description="served by this teacher's own replicas: one copy of the weights gives "
        "logit targets and judgments (its replicas, CPUs and threads, not this judge's)",
    )
    function: str | None = Field(None, description="module:function (sample, prompt) -> float")
    rubric: str | None = Field(None, description="format string with {prompt} and {response}")
    rating_tokens: list[str] = Field(default_factory=lambda: [str(i) for i in range(1, 10)])
    min_mass: float = Field(0.5, ge=0, le=1, description="below it a rating is unusable")
    weight: float = Field(1.0, gt=0)
    replicas: int = Field(1, ge=1)
    timeout_s: float = Field(120.0, gt=0, description="a call longer than this is retried once")

    @model_validator(mode="after")
    def _one_source(self) -> JudgeConfig:
        given = [k for k in ("model", "teacher", "function") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"judge {self.name!r}: give exactly one of model, teacher, function")
        if self.function and self.kind not in ("score", "verifier"):
            raise ValueError(f"judge {self.name!r}: a function judge gives scores only")
        if self.kind == "verifier" and not self.function:
            raise ValueError(f"judge {self.name!r}: a verifier is a `function`")
        if self.role == "evaluator" and (self.kind in ("critique", "verifier") or self.relative):
            raise ValueError(
                f"judge {self.name!r}: an evaluator compares two samples: kind score, "
                f"pairwise or likelihood (not relative)"
            )
        if self.relative and self.kind != "likelihood":
            raise ValueError(f"judge {self.name!r}: relative is for a likelihood judge")
        if self.backend == "vllm" and not self.model:
            raise ValueError(
                f"judge {self.name!r}: backend vllm is for a judge with its own `model` (one "
                f"served by a teacher uses the teacher's replicas)"
            )
        if self.rubric and self.kind == "likelihood":
            raise ValueError(f"judge {self.name!r}: a likelihood judge reads no rubric")
        return self


class RlaifConfig(Strict):
    algorithm: Annotated[str, registered(ALGORITHMS)] = "grpo"
    rl_weight: float = Field(1.0, ge=0, description="weight of the RL term; 0: on-policy KD")
    kd_weight: float = Field(0.0, ge=0, description="weight of logit KD on the samples")
    kl_coef: float = Field(0.05, ge=0, description="KL(student || reference) in the loss")
    kl_estimator: Annotated[str, registered(KL_ESTIMATORS)] = "k3"
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip of the importance ratio")
    scale_std: bool = Field(True, description="GRPO: divide advantages by the group's std")
    dpo_beta: float = Field(0.1, gt=0)
    sft_weight: float = Field(1.0, ge=0, description="CE on critique judges' rewrites")
    win_rate_every: int = Field(0, ge=0, description="steps between win-rate checks; 0: end")
    win_rate_prompts: int = Field(16, ge=1)
    win_rate_by: Literal["evaluator", "training_judge"] = Field(
        "evaluator",
        description="who counts the win rate: the judge with role evaluator (none: no win "
        "rate), or the first model judge that trains the policy (which rewards hacking it)",
    )


def check(
    cfg: RlaifConfig,
    judges: list[JudgeConfig],
    served_by: dict[str, str],
    samples_per_prompt: int,
    top_p: float,
    micro_batch_size: int,
) -> None:
    """Judges that can be served, groups the algorithm can compare, and sampling whose
    log-probs the RL term can use. `served_by`: each teacher's name -> what serves it
    (`hf`, `vllm` or `its cache`); `samples_per_prompt` and `top_p`: the rollouts'."""
    if not any(j.role == "reward" for j in judges):
        raise ValueError("judges: distill.mode 'rlaif' needs at least one judge with role reward")
    evaluators = [j.name for j in judges if j.role == "evaluator"]
    if len(evaluators) > 1:
        raise ValueError(f"judges: one judge with role evaluator counts the win rate: {evaluators}")
    if evaluators and cfg.win_rate_by == "training_judge":
        raise ValueError(
            f"rlaif.win_rate_by: 'training_judge' while judge {evaluators[0]!r} is the "
            f"evaluator; choose one"
        )
    names = list(served_by)
    for i, j in enumerate(judges):
        if j.teacher and j.teacher not in names:
            raise ValueError(f"judges.{i}.teacher: no teacher named {j.teacher!r} in {names}")
        if j.teacher and served_by[j.teacher] != "hf":
            raise ValueError(
                f"judges.{i}.teacher: teacher {j.teacher!r} is served by "
                f"{served_by[j.teacher]}; a judge is served by live hf replicas (or give the "
                f"judge its own `model`)"
            )
    k = samples_per_prompt
    need = ALGORITHMS[cfg.algorithm].min_group
    if k < need and cfg.rl_weight:
        raise ValueError(
            f"rollout.samples_per_prompt: {cfg.algorithm} compares a prompt's "
            f"samples with each other, it needs at least {need} (got {k})"
        )
    if micro_batch_size % k:
        raise ValueError(
            f"train.micro_batch_size: {micro_batch_size} splits a prompt's {k} samples over "
            f"micro-batches"
        )
    if cfg.kd_weight and not served_by:
        raise ValueError("rlaif.kd_weight: logit KD needs a teacher in `teachers`")
    if top_p < 1 and (cfg.rl_weight or cfg.kl_coef):
        raise ValueError(
            f"rollout.top_p: {top_p} < 1 is refused for RL (rlaif.rl_weight "
            f"or rlaif.kl_coef > 0): the ratio and the KL need the log-probs of the "
            f"distribution sampled from, which top-p truncates; use top_p: 1"
        )
