"""JudgeActor: an LLM (or a Python function) that judges a student's responses, for RLAIF.

A model judge reads the judgment off the NEXT-TOKEN distribution after the rendered rubric,
never off parsed text:

- `score`: the expected rating sum_i p_i * v_i / sum_i p_i over the rating tokens ("1".."9"
  by default, each exactly one token, v_i = float(token)); None where the rating tokens hold
  less than `min_mass` of the probability (the judge did not answer with a rating).
- `pairwise`: the probability that the judge prefers A over B, asked in both orders (A shown
  first, then B shown first) and averaged, so position bias cancels.
- `critique`: the judge rewrites the response (greedy), for critique-and-revise data.
- `likelihood`: the judge's mean log-probability per token of the response after the prompt
  (chat template applied), its end-of-turn token included, so an answer cut short is not
  likely, and divided by the share of distinct word trigrams, so a repeated sentence is
  not either. A judgment a small model gives reliably: no rubric to follow.

A function judge ("module:function", `fn(sample, prompt) -> float`) loads no model and only
scores; a sample whose function raises or returns no finite number gets None.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

from actors.chat import (
    ChatEncodingError,
    adds_bos,
    encode_chat,
    render_prompt,
    render_prompt_ids,
    split_finish,
    stop_token_ids,
)
from actors.judge_reading import (
    answer_probs,
    distinct_share,
    hf_greedy,
    mean_logprobs,
    vllm_answer_probs,
    vllm_greedy,
    vllm_mean_logprobs,
)
from actors.model_store import local_model
from actors.models import load_causal_lm, model_hash, pick_device, pick_dtype
from actors.process import reusable

log = logging.getLogger(__name__)

# the concurrency group of a teacher's judge calls: a thread of their own beside scoring, so
# a judgment never queues behind the scoring sent steps ahead (one copy of the weights)
JUDGE_GROUP = "judge"
DEFAULT_RATING_TOKENS = ["1", "2", "3", "4", "5", "6", "7", "8", "9"]
PAIR_TOKENS = ["A", "B"]  # the answer tokens of a pairwise judgment: option A, option B

DEFAULT_RUBRIC = (
    "You are a strict, fair judge. Rate how well the response answers the request, from "
    "{low} (useless or wrong) to {high} (correct, complete, clear and concise).\n\n"
    "Request:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Answer with the rating digit only."
)
DEFAULT_PAIRWISE_RUBRIC = (
    "You are a strict, fair judge. Two responses answer the same request. Decide which one "
    "is better: more correct, complete, clear and concise.\n\n"
    "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Answer with the letter A or B only."
)
DEFAULT_CRITIQUE_RUBRIC = (
    "Rewrite the response so it is better: correct, complete, clear and concise. Keep what "
    "is right and fix what is wrong.\n\n"
    "Request:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Answer with the improved response only."
)


def single_token_ids(
    tokenizer: Any, tokens: Sequence[str], context: str | None = None
) -> list[int]:
    """The id of each token, which must encode to exactly one id on its own and, where a
    `context` is given (the rendered generation prompt), be that one id appended to the
    context's ids: the judge reads exactly that id's probability after the prompt."""
    if not tokens:
        raise ValueError("no answer tokens given")
    ids: list[int] = []
    for t in tokens:
        alone = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(alone) != 1:
            raise ValueError(
                f"answer token {t!r} is {len(alone)} tokens of the judge's tokenizer, not one"
            )
        if context is not None:
            base = tokenizer(context, add_special_tokens=False)["input_ids"]
            joined = tokenizer(context + t, add_special_tokens=False)["input_ids"]
            if joined != [*base, alone[0]]:
                raise ValueError(
                    f"answer token {t!r} does not encode as one token after the judge's prompt"
                )
        ids.append(int(alone[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer tokens {list(tokens)!r} do not have distinct ids")
    return ids


def rating_token_ids(tokenizer: Any, tokens: list[str], context: str | None = None) -> list[int]:
    """Ids of the rating tokens: each a finite number (its value is float(token)) that is
    exactly one token of the judge's tokenizer. Raises ValueError naming the first bad one."""
    rating_values(tokens)
    return single_token_ids(tokenizer, tokens, context)


def rating_values(tokens: Sequence[str]) -> list[float]:
    values = []
    for t in tokens:
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"rating token {t!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"rating token {t!r} is not a finite number")
        values.append(v)
    return values


def judge_kwargs(
    kind: str, rubric: str | None, rating_tokens: list[str], min_mass: float
) -> dict[str, Any]:
    """The JudgeActor arguments of a judge of `kind` with its rubric (None: the default)."""
    key = {
        "score": "rubric",
        "pairwise": "pairwise_rubric",
        "critique": "critique_rubric",
        "likelihood": None,  # reads the response itself, no rubric
        "verifier": None,  # a function
    }[kind]
    out: dict[str, Any] = {"rating_tokens": list(rating_tokens), "min_mass": min_mass}
    if key is not None:
        out[key] = rubric
    return out


def load_function(spec: str) -> Callable[..., Any]:
    """The callable named by "module:function" (dots allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge function {spec!r} is not of the form 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"judge function {spec!r} cannot be loaded: {err}") from err
    if not callable(obj):
        raise ValueError(f"judge function {spec!r} is not callable")
    return obj


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """A judgment's wall time becomes the actor's `last_busy_s` (the driver's judge metrics)."""

    @functools.wraps(method)
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.last_busy_s = time.perf_counter() - start

    return timed


class JudgeActor:
    def __init__(
        self,
        name: str,
        model: str,
        *,
        rubric: str | None = None,
        pairwise_rubric: str | None = None,
        critique_rubric: str | None = None,
        rating_tokens: list[str] | None = None,
        min_mass: float = 0.5,
        dtype: str = "auto",
        threads: int = 1,
        function: str | None = None,
        batch_size: int = 16,
        host: Any = None,
        backend: str = "hf",
    ) -> None:
        """`host`: a TeacherActor whose loaded model and tokenizer this judge uses (one copy
        of the weights serves both roles); `model` is then unused. `backend` vllm: a vLLM
        engine reads the judgments (prompt log-probs, exact over the full vocab)."""
        if host is None:
            torch.set_num_threads(threads)
        self.name = name
        self.rating_tokens = list(DEFAULT_RATING_TOKENS if rating_tokens is None else rating_tokens)
        self.values = rating_values(self.rating_tokens)
        self.min_mass = float(min_mass)
        self.batch_size = max(1, int(batch_size))
        self.rubric = DEFAULT_RUBRIC if rubric is None else rubric
        self.pairwise_rubric = (
            DEFAULT_PAIRWISE_RUBRIC if pairwise_rubric is None else pairwise_rubric
        )
        self.critique_rubric = (
            DEFAULT_CRITIQUE_RUBRIC if critique_rubric is None else critique_rubric
        )
        self.last_busy_s, self.failures = 0.0, 0  # failures: samples a function could not score
        self.function_spec = function
        self.fn: Callable[..., Any] | None = None
        self.model: Any = None
        self.vllm: Any = None
        self.tokenizer: Any = None
        if function is not None:
            self.fn = load_function(function)
            self._hash = function
            return
        self._load(name, model, dtype, host, backend)
        generation = self.model.generation_config
        self._hash = host.info()["model_hash"] if host is not None else model_hash(self.model)
        if backend == "vllm":
            self._serve_with_vllm(model, dtype)
        tok = self.tokenizer
        context = render_prompt(tok, "x")  # answers come right after the generation prompt
        self.rating_ids = rating_token_ids(tok, self.rating_tokens, context)
        self.pair_ids: list[int] | None
        try:
            self.pair_ids = single_token_ids(tok, PAIR_TOKENS, context)
        except ValueError:
            self.pair_ids = None  # pairwise() says why when it is asked for
        self.stops = stop_token_ids(generation.eos_token_id, tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (self.stops or [0])[0]
        self.add_bos = adds_bos(tok)

    def _serve_with_vllm(self, model: str, dtype: str) -> None:
        """Hand the weights to a vLLM engine (hashed already); the HF copy goes."""
        from actors.vllm_backend import VLLMEngine

        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        torch_dtype = self.model.dtype
        self.model = None
        self.vllm = VLLMEngine(local_model(model), dtype=torch_dtype, max_model_len=limit)

    def _load(self, name: str, model: str | None, dtype: str, host: Any, backend: str) -> None:
        """The model and tokenizer: the host teacher's, or loaded here (vllm: on the CPU)."""
        if host is not None:
            self.device, self.model, self.tokenizer = host.device, host.model, host.tokenizer
            if self.tokenizer is None:
                raise ValueError(
                    f"judge {name}: teacher {host.name} has no tokenizer, it cannot judge"
                )
        else:
            self.device = pick_device(want_gpu=True)
            model = local_model(model)  # a known name: this node's copy, fetched if missing
            dtype_ = pick_dtype(dtype, self.device)
            where = torch.device("cpu") if backend == "vllm" else self.device
            self.model = load_causal_lm(model, dtype_, where).eval()
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"judge {name}: {model} has no tokenizer, it cannot judge"
                ) from err

    def park(self) -> bool:
        """Kept for another run of the same driver: its per-run counts start again. False
        when Ray restarted it."""
        self.last_busy_s, self.failures = 0.0, 0
        return reusable()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "function" if self.fn is not None else "model",
            "model_hash": self._hash,
            "rating_tokens": list(self.rating_tokens),
        }

    # -- judgments --------------------------------------------------------------------------

    @_timed
    def score(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        """One rating per (prompt, response): the expected rating under the judge's next-token
        distribution (model) or the function's value; None where it is unusable."""
        return [value for value, _ in self.scored(prompts, responses)]

    @_timed
    def scored(self, prompts: list[str], responses: list[str]) -> list[tuple[float | None, float]]:
        """(rating, the probability mass on the rating tokens) per row; a function's mass
        is 1 where it gave a number."""
        _same_length(prompts, responses)
        if self.fn is not None:
            values = [self._call_function(p, r) for p, r in zip(prompts, responses, strict=True)]
            return [(v, float(v is not None)) for v in values]
        texts = [self._rubric_text(p, r) for p, r in zip(prompts, responses, strict=True)]
        probs = self._answer_probs(texts, self.rating_ids)
        values = torch.tensor(self.values, dtype=torch.float64)
        out: list[tuple[float | None, float]] = []
        for row in probs:
            mass = float(row.sum())
            usable = math.isfinite(mass) and mass > 0 and mass >= self.min_mass
            out.append((float((row * values).sum() / mass) if usable else None, mass))
        return out

    @_timed
    def pairwise(self, prompts: list[str], a: list[str], b: list[str]) -> list[float | None]:
        """P(the judge prefers a over b) per row, the mean of both presentation orders; None
        where either order puts less than `min_mass` on the answer tokens A/B."""
        orders = self.pairwise_orders(prompts, a, b)
        return [None if o is None else (o[0] + o[1]) / 2 for o in orders]

    @_timed
    def pairwise_orders(
        self, prompts: list[str], a: list[str], b: list[str]
    ) -> list[tuple[float, float] | None]:
        """(P(a preferred | a shown first), P(a preferred | a shown second)) per row: apart,
        they show the judge's position bias."""
        _same_length(prompts, a, b)
        if self.fn is not None:
            raise ValueError(f"judge {self.name} is a function judge: it only scores")
        if self.pair_ids is None:
            single_token_ids(self.tokenizer, PAIR_TOKENS, render_prompt(self.tokenizer, "x"))
            raise ValueError(f"judge {self.name}: answer tokens {PAIR_TOKENS} are not usable")
        texts: list[str] = []
        for p, x, y in zip(prompts, a, b, strict=True):
            texts.extend(self._pairwise_prompts(p, x, y))
        probs = self._answer_probs(texts, self.pair_ids)  # rows: [a first, b first] * n
        out: list[tuple[float, float] | None] = []
        for i in range(len(prompts)):
            first, swapped = probs[2 * i], probs[2 * i + 1]
            m1, m2 = float(first.sum()), float(swapped.sum())
            usable = all(math.isfinite(m) and m > 0 and m >= self.min_mass for m in (m1, m2))
            # "A" while a is option A; "B" while a is option B
            out.append((float(first[0]) / m1, float(swapped[1]) / m2) if usable else None)
        return out

    @_timed
    @torch.inference_mode()
    def critique(
        self, prompts: list[str], responses: list[str], max_new_tokens: int = 64
    ) -> list[str | None]:
        """The judge's improved response per row (greedy, at most max_new_tokens tokens, cut
        at the first end-of-turn id); None where it wrote nothing."""
        _same_length(prompts, responses)
        if self.fn is not None:
            raise ValueError(f"judge {self.name} is a function judge: it only scores")
        out: list[str | None] = [None] * len(prompts)
        texts = [
            self.critique_rubric.format(prompt=p, response=r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        tok = self.tokenizer
        rows = [render_prompt_ids(tok, t, self.add_bos) for t in texts]
        n = int(max_new_tokens)
        if self.vllm is not None:
            written = vllm_greedy(self.vllm, rows, self.stops, n)
        else:
            written = hf_greedy(self.model, rows, self.pad, self.stops, n, self.batch_size)
        for i, row in enumerate(written):
            kept, _ = split_finish(row, self.stops)
            out[i] = tok.decode(kept, skip_special_tokens=True).strip() or None
        return out

    @_timed
    @torch.inference_mode()
    def likelihood(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        """Mean log p(token | everything before it) over each response's tokens and its
        end-of-turn token, the prompt rendered with the chat template, divided by the share
        of the response's word trigrams that are distinct: a repeated sentence is easy to
        predict, so without that guard repetition would look likely. None where the
        response cannot be encoded as a turn."""
        _same_length(prompts, responses)
        if self.fn is not None:
            raise ValueError(f"judge {self.name} is a function judge: it only scores")
        turns: dict[int, tuple[list[int], int]] = {}
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                turns[i] = encode_chat(self.tokenizer, p, r, True, self.add_bos)
            except ChatEncodingError:
                continue
        if self.vllm is not None:
            means = vllm_mean_logprobs(self.vllm, turns)
        else:
            means = mean_logprobs(self.model, turns, self.pad, self.batch_size, self.device)
        return [
            None if i not in means else means[i] / distinct_share(responses[i])
            for i in range(len(prompts))
        ]

    # -- helpers ----------------------------------------------------------------------------

    def _rubric_text(self, prompt: str, response: str) -> str:
        return self.rubric.format(
            prompt=prompt, response=response, low=self.rating_tokens[0], high=self.rating_tokens[-1]
        )

    def _pairwise_prompts(self, prompt: str, a: str, b: str) -> tuple[str, str]:
        """The two rubric texts of one comparison: a shown as option A, then b as option A."""
        return (
            self.pairwise_rubric.format(prompt=prompt, a=a, b=b),
            self.pairwise_rubric.format(prompt=prompt, a=b, b=a),
        )

    def _call_function(self, prompt: str, response: str) -> float | None:
        assert self.fn is not None
        try:
            value = self.fn(response, prompt)
        except Exception as err:  # one bad sample must not sink the batch
            self.failures += 1
            log.warning("judge %s: %s failed on a sample: %r", self.name, self.function_spec, err)
            return None
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            self.failures += 1
            log.warning("judge %s: %s returned %r", self.name, self.function_spec, value)
            return None
        return float(value)

    def _answer_probs(self, texts: list[str], answer_ids: list[int]) -> torch.Tensor:
        rows = [render_prompt_ids(self.tokenizer, t, self.add_bos) for t in texts]
        if self.vllm is not None:
            return vllm_answer_probs(self.vllm, rows, answer_ids)
        return answer_probs(self.model, rows, answer_ids, self.pad, self.batch_size, self.device)


def _same_length(*lists: Sequence[Any]) -> None:
    if len({len(x) for x in lists}) > 1:
        raise ValueError(f"judge inputs differ in length: {[len(x) for x in lists]}")
