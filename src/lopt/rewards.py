"""Verifiable rewards for GRPO, each a plain function with TRL's reward signature.

``f(completions, **kwargs) -> list[float]``: TRL passes the sampled completions (strings, or
conversations ``[{"role": "assistant", "content": ...}]`` when the prompts were conversations) and
every other dataset column as a keyword argument; the GRPO data carries the gold final answer in
the column ``answer``. Answers are parsed and compared by ``lopt.answers``, the same code that
evaluation uses.

``--reward_funcs`` adds a user's own functions of that signature, loaded and checked here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from lopt.answers import ANSWER_STYLES, answers_match, extract_final_answer, normalize_number
from lopt.errors import LoptError, did_you_mean

RewardFunc = Callable[..., list[float]]


def completion_text(completion) -> str:
    """The text of one completion: a string as is, a conversation's last message's content."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def _final_answer_accuracy(style: str, name: str, doc: str) -> RewardFunc:
    """A correctness reward: 1.0 when the final answer written in `style` equals the gold answer (answers.py)."""

    def reward(completions, answer, **kwargs) -> list[float]:
        return [
            float(answers_match(extract_final_answer(completion_text(c), style), gold))
            for c, gold in zip(completions, answer, strict=True)
        ]

    reward.__name__, reward.__doc__ = name, doc  # TRL names the reward's metrics after the function
    return reward


gsm8k_accuracy = _final_answer_accuracy(
    "hash", "gsm8k_accuracy", "1.0 when the number after the last ``####`` (else the last number) equals the gold."
)
boxed_accuracy = _final_answer_accuracy(
    "boxed", "boxed_accuracy", "1.0 when the last ``\\boxed{...}`` equals the gold answer (numerically, or as text)."
)
number_accuracy = _final_answer_accuracy(
    "number", "number_accuracy", "1.0 when the completion's last number equals the gold answer (short-answer tasks)."
)


@functools.cache
def _gsm_symbolic_scorer():
    import reasoning_gym  # a second to import; only this reward needs it

    # score_answer reads only the entry it is given, so any instance of the task scores any entry.
    return reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=0)


def gsm_symbolic_score(completions, answer, **kwargs) -> list[float]:
    """reasoning-gym's own score for gsm_symbolic: 1.0 correct, 0.01 a wrong number, 0.0 no number.

    The model's final answer is located as for GSM8K and normalized first (``1,000`` -> ``1000``),
    because the scorer reads the first number of the string it is given. Its pattern
    (``\\b-?\\d+...``) drops a leading minus sign, so it would score a correct negative answer 0.01;
    gsm_symbolic's answers are non-negative quantities (none of 2,000 generated problems has a
    negative one), so the score is left as reasoning-gym defines it.
    """
    scorer = _gsm_symbolic_scorer()
    scores = []
    for c, gold in zip(completions, answer, strict=True):
        predicted = extract_final_answer(completion_text(c), "hash")
        scores.append(float(scorer.score_answer(normalize_number(predicted) or predicted, {"answer": gold})))
    return scores


# The last line of the completion is "#### <number>" and nothing follows it.
_HASH_LAST_LINE = re.compile(r"####[ \t]*\$?[ \t]*[-\u2212]?[\d,]*\.?\d+\.?\Z")
# The whole completion is one number (the "number" style's answer and nothing else).
_BARE_NUMBER = re.compile(r"\A[-\u2212]?[\d,]*\.?\d+\.?\Z")


def _well_formatted(text: str, style: str) -> bool:
    if style == "boxed":
        return extract_final_answer(text, "boxed") is not None  # a closed \boxed{...}
    if style == "number":
        return bool(_BARE_NUMBER.search(text.strip()))
    return bool(_HASH_LAST_LINE.search(text.strip()))


def format_reward(style: str) -> RewardFunc:
    """A reward of 1.0 for completions that give their answer in the format of `style` (answers.ANSWER_STYLES)."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; choose one of: {', '.join(ANSWER_STYLES)}")

    def reward(completions, **kwargs) -> list[float]:
        return [float(_well_formatted(completion_text(c), style)) for c in completions]

    reward.__name__ = f"format_{style}"  # TRL names the reward's metrics after the function
    return reward


# --reward_funcs: the user's own reward functions, named `module:function` or `path/to/file.py:function`.

# The keyword arguments TRL passes every reward function besides the dataset's columns
# (GRPOTrainer._calculate_rewards); a custom function must accept them, in practice through **kwargs.
TRL_REWARD_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def reward_name(func) -> str:
    """The name TRL gives a reward function's scores (its metrics `rewards/<name>/...`, and completions.jsonl's keys):
    the function's `__name__` (a partial's underlying function's), a callable object's class name, or a reward
    model's folder name."""
    if hasattr(func, "config") and hasattr(func.config, "_name_or_path"):  # a reward model
        return reward_model_name(func.config._name_or_path)
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def reward_model_name(name_or_path: str) -> str:
    """The name TRL gives a reward model's scores: the last part of its folder or hub id."""
    return name_or_path.rstrip("/").split("/")[-1]


def split_list(value: str | None) -> list[str]:
    """The items of a comma-separated flag value; a YAML list arrives as its str() (config/parse.py reads str fields
    as strings), so brackets and quotes around the items are dropped too."""
    if not value:
        return []
    items = (item.strip().strip("'\"") for item in value.strip().removeprefix("[").removesuffix("]").split(","))
    return [item for item in items if item]


def _module_from_file(path: Path):
    # one module name per file, so that loading it again (validation, then the trainer) reuses the module
    name = f"lopt_reward_funcs_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as `import` does: dataclasses and pickle look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_reward_module(spec: str, where: str):
    """The module that `where`, the part of --reward_funcs entry `spec` before the colon, names: a file (*.py) or an
    importable module."""
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise LoptError(f"--reward_funcs {spec}: no such file {where}. Pass the path of a Python file.")
        load = functools.partial(_module_from_file, path)
    elif "/" in where or "\\" in where:
        raise LoptError(f"--reward_funcs {spec}: {where} looks like a path; a file's path must end in .py.")
    else:
        load = functools.partial(importlib.import_module, where)
    try:
        return load()
    except ModuleNotFoundError as error:
        if error.name is not None and where != error.name and not where.startswith(f"{error.name}."):
            raise LoptError(
                f"--reward_funcs {spec}: {where} imports {error.name!r}, which is not installed here. Install it."
            ) from error
        local = Path(*where.split(".")).with_suffix(".py")
        here = (
            f" ./{local} is here: pass --reward_funcs ./{local}:{spec.rpartition(':')[2]}." if local.is_file() else ""
        )
        raise LoptError(
            f"--reward_funcs {spec}: no module named {where!r}. A module must be importable: installed, or its "
            f"folder on PYTHONPATH (PYTHONPATH=path/to/dir lopt grpo ...); or name the file instead, as in "
            f"--reward_funcs ./my_rewards.py:my_reward.{here}"
        ) from error
    except Exception as error:  # the user's module failed while it ran: say where, its traceback is theirs to see
        # a SyntaxError's own position is in the user's file; its traceback's last frame is importlib's
        at = error if isinstance(error, SyntaxError) else traceback.extract_tb(error.__traceback__)[-1]
        raise LoptError(
            f"--reward_funcs {spec}: importing {where} raised {type(error).__name__}: {error} "
            f"(at {at.filename}:{at.lineno}). Fix the module and run again."
        ) from error


def load_reward_func(spec: str) -> RewardFunc:
    """The function that one --reward_funcs entry names: `module:function` or `path/to/file.py:function`."""
    where, colon, attribute = spec.rpartition(":")  # rpartition: a Windows path (C:\...) has a colon of its own
    if not colon or not where or not attribute:
        raise LoptError(
            f"--reward_funcs {spec}: expected MODULE:FUNCTION or PATH.py:FUNCTION, "
            "e.g. my_package.rewards:length_penalty or ./my_rewards.py:length_penalty."
        )
    module = _import_reward_module(spec, where)
    if not hasattr(module, attribute):
        callables = sorted(
            name
            for name, value in vars(module).items()
            if callable(value) and not inspect.isclass(value) and not name.startswith("_")
            and getattr(value, "__module__", None) == module.__name__
        )  # fmt: skip
        listing = f"Its functions: {', '.join(callables)}." if callables else "It defines no functions."
        raise LoptError(
            f"--reward_funcs {spec}: {where} has no {attribute!r}.{did_you_mean(attribute, callables)} {listing}"
        )
    func = getattr(module, attribute)
    if not callable(func) or inspect.isclass(func):
        raise LoptError(
            f"--reward_funcs {spec}: {attribute} is a {type(func).__name__}, not a function. Name a function "
            "def f(prompts, completions, **kwargs) -> list[float]."
        )
    return func


def check_reward_arguments(funcs: dict[str, RewardFunc], columns: list[str]) -> None:
    """Each of `funcs` (by the flag that adds it, e.g. "--reward_funcs my_rewards:f") can be called as TRL calls it:
    with TRL's keyword arguments and the data's `columns` (GRPOTrainer._calculate_rewards)."""
    given = dict.fromkeys([*TRL_REWARD_KWARGS, *columns])
    for source, func in funcs.items():
        try:
            inspect.signature(func).bind(**given)
        except TypeError as error:
            raise LoptError(
                f"{source} cannot be called as TRL calls reward functions ({error}): TRL passes "
                f"{', '.join(TRL_REWARD_KWARGS)} and the data's columns ({', '.join(columns)}) as keyword arguments. "
                "Write it as def f(prompts, completions, **kwargs) -> list[float], reading the columns it "
                "needs from kwargs (e.g. kwargs['answer'])."
            ) from error
        except ValueError:  # no signature to read (some builtins): TRL will tell at the first step
            continue
