"""Rewards computed by code (``--reward_fn module:function``), alone or weighted with a reward model.

A reward function is any importable callable ``fn(prompts, responses, **columns) -> list[float]``:
``prompts`` are the rendered prompt texts, ``responses`` the decoded responses, and ``columns`` the
other columns of each prompt's dataset row (for example a reference ``answer``), as lists aligned
with ``prompts``. Only the columns the function names are passed, or all of them if it takes
``**kwargs`` (TRL's convention). ``rlhf.demo_rule:rule_reward`` is a ready example.

Problems a user can fix stop the run with one line: an import that fails or names no callable
(exit 2, before any model is loaded); a call that raises, returns the wrong number of scores or
something that is not a finite-or-NaN float (exit 3, naming the function and the step).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhf.errors import TrainingDiverged, UserError


class RewardFunctionFailed(TrainingDiverged):
    """A reward function misbehaved during training (exit 3)."""


def import_reward_fn(spec: str) -> Callable:
    """``module:function`` (a module importable from the working directory, or a ``path/to/file.py:function``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"--reward_fn {spec!r}: write it as module:function, e.g. rlhf.demo_rule:rule_reward")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--reward_fn {spec}: no such file {path}; check the path")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")  # the working directory, as `python -m` would
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any import-time failure of the user's module is reported in one line
        raise UserError(f"--reward_fn {spec}: importing {module_name} failed ({type(error).__name__}: {error}); "
                        "fix the module or the name") from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"--reward_fn {spec}: {module_name} has no callable {attribute}; check the name")
    return function


def _accepted_columns(function: Callable, columns: Sequence[str]) -> list[str] | None:
    """The column names to pass: those the signature names, or all with ``**kwargs`` (None: all)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    names = {p.name for p in parameters}
    return [c for c in columns if c in names]


class CombinedReward:
    """Scores responses with a reward model and/or reward functions, summed with weights.

    Called as ``reward(prompts, responses, columns=None, step=None)``; returns float32 scores (batch,).
    ``step`` only names the step in an error message.
    """

    def __init__(self, reward_model=None, functions: Sequence[tuple[str, Callable]] = (),
                 weights: Sequence[float] | None = None):
        self.sources: list[tuple[str, Callable]] = ([("reward model", reward_model)] if reward_model else [])
        self.sources += list(functions)
        if not self.sources:
            raise UserError("no reward: pass --reward_model_name, --reward_fn, or both")
        weights = list(weights) if weights else [1.0] * len(self.sources)
        if len(weights) != len(self.sources):
            raise UserError(f"--reward_weights has {len(weights)} values for {len(self.sources)} rewards "
                            f"({', '.join(name for name, _ in self.sources)}); give one weight per reward")
        self.weights = weights

    def __call__(self, prompts: list[str], responses: list[str], columns: dict[str, list] | None = None,
                 step: int | None = None) -> torch.Tensor:
        total = torch.zeros(len(responses))
        for (name, source), weight in zip(self.sources, self.weights):
            if name == "reward model":
                scores = source(prompts, responses)
            else:
                scores = self._call_function(name, source, prompts, responses, columns or {}, step)
            total += weight * torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()
        return total

    @staticmethod
    def _call_function(name, function, prompts, responses, columns, step) -> torch.Tensor:
        where = f"at step {step}" if step is not None else "during evaluation"
        accepted = _accepted_columns(function, list(columns))
        kwargs = columns if accepted is None else {c: columns[c] for c in accepted}
        try:
            result = function(list(prompts), list(responses), **kwargs)
        except Exception as error:  # noqa: BLE001 - the user's function: one line naming it and the step
            raise RewardFunctionFailed(f"--reward_fn {name} raised {type(error).__name__}: {error} {where}; "
                                       "fix the function (the last checkpoint is intact)") from error
        try:
            values = [float(v) for v in result]
        except (TypeError, ValueError) as error:
            raise RewardFunctionFailed(f"--reward_fn {name} returned {type(result).__name__} {str(result)[:80]!r} "
                                       f"{where}; it must return one float per response") from error
        if len(values) != len(responses):
            raise RewardFunctionFailed(f"--reward_fn {name} returned {len(values)} scores for {len(responses)} "
                                       f"responses {where}; return one float per response")
        if any(math.isinf(v) for v in values):
            raise RewardFunctionFailed(f"--reward_fn {name} returned an infinite score {where}; return finite floats")
        return torch.tensor(values, dtype=torch.float32)
