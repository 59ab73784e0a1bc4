"""Environments of multi-turn episodes: a protocol, a registry, and the registered ones.

An environment is made fresh for each episode (`make(name, **options)`) and driven by
`rl.episodes.run`:

    text = env.reset(prompt, ref)   # the prompt as the model sees it (an env may add to it)
    result = env.step(turn)         # after each model turn that asks for something (ends with </tool_call>)

`turn` is the decoded text of the model's turn (special tokens written out). `step` returns a
`StepResult`: the observation text (shown to the model inside <tool_response>...</tool_response>,
encoded without special tokens; "" = none), a per-turn reward (added to the episode's reward),
`done` (end the episode now) and `info` counters ("tool_calls", "tool_errors") that the run sums
into its metrics. A turn that ends with the end-of-sequence token ends the episode without a step:
the episode's reward is then the run's reward function on the whole transcript.

`step` may block (a tool call); the runner calls the steps of a turn's episodes concurrently. An
exception out of `step` is a bug of the environment: the runner ends that episode, counts it
(`env_errors`) and logs it; its reward is NaN, which the advantages count as invalid.

Adding an environment: a class with `reset` / `step`, and `@register("name")` on a factory taking
keyword options (`rl.env` config fields: tools, workers, ...) and the shared `ToolPool`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from rl import tools as tool_lib


@dataclasses.dataclass(frozen=True)
class StepResult:
    observation: str = ""
    reward: float = 0.0
    done: bool = False
    info: Mapping[str, int] = dataclasses.field(default_factory=dict)


class Env(Protocol):
    def reset(self, prompt: str, ref: Mapping[str, Any]) -> str: ...

    def step(self, turn: str) -> StepResult: ...


EnvFactory = Callable[..., Env]
_REGISTRY: dict[str, EnvFactory] = {}


def register(name: str) -> Callable[[EnvFactory], EnvFactory]:
    def add(factory: EnvFactory) -> EnvFactory:
        if name in _REGISTRY:
            raise ValueError(f"environment {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make(name: str, **options) -> Env:
    if name not in _REGISTRY:
        raise KeyError(f"unknown environment {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](**options)


class ToolEnv:
    """Tool use: each turn that ends with a call runs it (`rl.tools` format) on the shared pool and
    shows its output; a turn without a call (ending with end-of-sequence) is the final answer.
    Malformed calls, unknown tools, timeouts and crashes are error observations."""

    def __init__(self, pool: tool_lib.ToolPool):
        self.pool = pool

    def reset(self, prompt: str, ref: Mapping[str, Any]) -> str:
        return prompt

    def step(self, turn: str) -> StepResult:
        call = tool_lib.parse_call(turn)
        if call is None:  # not a call (the runner only steps turns that end with </tool_call>)
            return StepResult(done=True)
        (result,) = self.pool.run([call])
        return StepResult(result.text, info={"tool_calls": 1, "tool_errors": int(result.error is not None)})


@register("tools")
def _tools(pool: tool_lib.ToolPool, **_) -> ToolEnv:
    return ToolEnv(pool)
