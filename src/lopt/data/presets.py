"""Named training data per recipe: SFT presets, GRPO prompts of a task, preference pairs (DPO, reward models).

Each recipe asks here for its records; the answer is the same shape whatever the source: a list of
plain dicts. The precedence is always `--train_file` > `--dataset_name` > the preset or task's own
data. Files and the hub are read by sources.py, offline data is made by generated.py, and what a
task is (its source, answer style, reward) is in data/tasks.py.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lopt.answers import extract_final_answer, with_answer_instruction
from lopt.data.generated import (
    DEFAULT_GSM_SAMPLES,
    gsm_symbolic_pairs,
    gsm_symbolic_reasoning_pairs,
)
from lopt.data.sources import load_hub, read_file, select_records
from lopt.data.tasks import get_task
from lopt.errors import LoptError, unknown_choice

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    description: str
    hub_id: str | None = None  # None: the problems of the offline task of the same name (data/tasks.py)

    @property
    def source(self) -> str:
        return f"hub: {self.hub_id}" if self.hub_id else "offline: reasoning-gym"


PRESETS: dict[str, Preset] = {
    "gsm-symbolic": Preset("grade-school math word problems with worked solutions (generated, offline)"),
    "aiw": Preset("'Alice has N sisters...' counting problems with one-number answers (generated, offline)"),
    "chain-sum": Preset("one-digit sums and differences with their results (generated, offline)"),
    "alpaca": Preset("52k general instructions (Alpaca)", "tatsu-lab/alpaca"),
    "metamathqa": Preset("395k augmented math questions with solutions (MetaMathQA)", "meta-math/MetaMathQA"),
    "tulu3": Preset("939k mixed chat conversations (Tulu 3 SFT mixture)", "allenai/tulu-3-sft-mixture"),
}


def source_options(config) -> dict:
    """A run config's data flags, as keyword arguments of `load_records`, `grpo_records` and `preference_records`."""
    return {
        "dataset_name": config.dataset_name, "dataset_config": config.dataset_config, "train_file": config.train_file,
        "split": config.split, "max_samples": config.max_samples, "seed": config.seed,
        "select_samples": config.select_samples,
    }  # fmt: skip


def load_records(
    *,
    preset: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | Path | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
    select_samples: str = "first",
    file_flag: str = "--train_file",
    split_flag: str = "--split",
) -> list[dict]:
    """Load SFT records from one source.

    Precedence when several are given: ``train_file`` > ``dataset_name`` > ``preset`` (the others
    are ignored with a warning). The caller supplies the default preset when none is chosen.
    ``max_samples`` keeps N records: the first N (``select_samples="first"``) or N drawn after a
    shuffle seeded by ``seed`` (``"random"``); either way runs are reproducible. The generated
    ``gsm-symbolic`` preset makes exactly N random problems from ``seed`` whatever ``select_samples``
    says. ``split`` picks the split of a hub dataset or of a saved DatasetDict folder; ``dataset_config`` only
    matters for hub datasets. ``file_flag`` and ``split_flag`` name the flags that gave ``train_file`` and ``split``
    in messages (--eval_file, --eval_split for the validation records).
    """
    if max_samples is not None and max_samples < 0:
        raise LoptError(f"--max_samples must be 0 or more (got {max_samples}); leave it out to keep every record")
    if train_file is not None:
        _warn_ignored(file_flag, {"--dataset_name": dataset_name, "--dataset_preset": preset})
        records, source = read_file(Path(train_file), split, file_flag, split_flag), f"{file_flag} {train_file}"
        records = select_records(records, max_samples, select_samples, seed)
    elif dataset_name is not None:
        _warn_ignored("--dataset_name", {"--dataset_preset": preset})
        records = load_hub(dataset_name, dataset_config, split, max_samples, select_samples, seed)
        source = f"--dataset_name {dataset_name} (split {split!r})"
    elif preset is not None:
        records = _load_preset(preset, split, max_samples, seed, select_samples)
        source = f"--dataset_preset {preset}"
    else:
        raise LoptError("no data source given: pass --dataset_preset, --dataset_name or --train_file")
    if not records and max_samples is not None:
        raise LoptError(f"{source} gave no records after --max_samples {max_samples}; raise it or leave it out")
    if not records:
        raise LoptError(f"{source} gave no records; check that it holds data")
    return records


def _load_preset(name: str, split: str, max_samples: int | None, seed: int, select_samples: str) -> list[dict]:
    if name not in PRESETS:
        raise unknown_choice("--dataset_preset", name, {n: f"{p.description} [{p.source}]" for n, p in PRESETS.items()})
    hub_id = PRESETS[name].hub_id
    if hub_id is None:
        return get_task(name).generate(DEFAULT_GSM_SAMPLES if max_samples is None else max_samples, seed)
    return load_hub(hub_id, None, split, max_samples, select_samples, seed)


def _warn_ignored(chosen: str, others: dict[str, str | None]) -> None:
    for flag, value in others.items():
        if value is not None:
            logger.warning("%s takes precedence; ignoring %s %s", chosen, flag, value)


# ---- GRPO: prompts with a verifiable final answer ---------------------------------------------------

# Column pairs a GRPO record may have: the question, and a text whose final answer is the gold one.
_QUESTION_ANSWER_COLUMNS = (("question", "answer"), ("problem", "solution"), ("prompt", "answer"))


def sft_records(config, **overrides) -> list[dict]:
    """The records `lopt sft` trains on, from an SFT config's data flags (also what `lopt data preview` shows);
    `overrides` replace arguments of `load_records` (`with_validation` reads the validation records so)."""
    # The default preset yields to a file or hub dataset silently; an explicit one is reported as ignored. The
    # validation file is read alone: the preset still gives the training records.
    explicit_source = config.train_file or config.dataset_name
    explicit_preset = "dataset_preset" in config.explicit and "train_file" not in overrides
    preset = config.dataset_preset if explicit_preset or not explicit_source else None
    return load_records(**{"preset": preset, **source_options(config), **overrides})


def sft_data_is_generated(config) -> bool:
    """Whether `lopt sft` trains on data generated offline (which has no splits to validate on)."""
    preset = PRESETS.get(config.dataset_preset)
    return not (config.train_file or config.dataset_name) and preset is not None and preset.hub_id is None


# ---- validation records (--eval_file, --eval_split, --eval_ratio) -----------------------------------


def hold_out(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, validation) records: ceil(ratio x N) of them (as datasets' train_test_split counts), drawn after a
    shuffle seeded by `seed`, are held out; each record is in exactly one of the two, the training ones in order."""
    count = math.ceil(ratio * len(records))
    if count >= len(records):
        raise LoptError(
            f"--eval_ratio {ratio} holds out {count} of the {len(records)} training records and leaves none to train "
            "on; lower it, add records (--max_samples), or validate on --eval_file."
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def with_validation(config, load: Callable[..., list[dict]], generated: bool) -> tuple[list[dict], list[dict] | None]:
    """(training records, validation records, None without --eval_file / --eval_split / --eval_ratio) of a run.

    `load(**overrides)` reads the run's records with some of `load_records`' arguments replaced; `generated` says
    that they are generated offline, where there is no other split to read. Validation files and splits are read
    whole: --max_samples picks training records only (--eval_ratio holds out a fraction of those).
    """
    records = load()
    if config.eval_ratio is not None:
        return hold_out(records, config.eval_ratio, config.seed)
    if config.eval_file is not None:
        whole_file = {"train_file": config.eval_file, "dataset_name": None, "max_samples": None}
        return records, load(**whole_file, file_flag="--eval_file")
    if config.eval_split is not None:
        if config.train_file is not None and not (Path(config.train_file) / "dataset_dict.json").is_file():
            raise LoptError(
                f"--eval_split {config.eval_split}: --train_file {config.train_file} holds one set of records, without "
                "splits (a folder saved from a DatasetDict has them). Validate on --eval_file FILE or --eval_ratio R."
            )
        if generated:
            raise LoptError(
                f"--eval_split {config.eval_split}: the training data is generated offline and has no splits (another "
                "split would be the same records). Validate on --eval_ratio R (held-out training records) or "
                "--eval_file FILE, or train on --dataset_name / --train_file data that has this split."
            )
        return records, load(split=config.eval_split, max_samples=None, split_flag="--eval_split")
    return records, None


def grpo_records(
    task: str,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | Path | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
    select_samples: str = "first",
    file_flag: str = "--train_file",
    split_flag: str = "--split",
) -> list[dict]:
    """GRPO prompts as ``{"prompt": [user message], "answer": gold final answer}`` records.

    The records come from the task's own source (reasoning-gym, or the task's hub dataset), or from
    ``dataset_name`` / ``train_file`` (question/answer or problem/solution columns); the task decides
    the answer format the prompt asks for and how the gold answer is read from the reference
    solution. Records whose solution holds no final answer are skipped. ``max_samples`` and
    ``select_samples`` pick the records as for SFT (before the ones without an answer are skipped).
    """
    spec = get_task(task)
    if train_file is not None or dataset_name is not None:
        raw = load_records(
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            train_file=train_file,
            split=split,
            max_samples=max_samples,
            seed=seed,
            select_samples=select_samples,
            file_flag=file_flag,
            split_flag=split_flag,
        )
    else:
        raw = spec.records(split, max_samples, seed, select_samples)
    if not raw:
        raise LoptError(f"--task {task} gave no records; check the data source and --max_samples")
    question_column, answer_column = _grpo_columns(raw[0])
    records = []
    for record in raw:
        gold = extract_final_answer(str(record[answer_column]), spec.style)
        if gold is None:
            continue
        question = str(record[question_column])
        if question_column != "prompt":
            question = with_answer_instruction(question, spec.style)
        records.append({"prompt": [{"role": "user", "content": question}], "answer": gold})
    if not records:
        raise LoptError(
            f"--task {task}: none of the {len(raw)} records has a final answer in its {answer_column!r} column "
            f"({'#### <answer>' if spec.style == 'hash' else chr(92) + 'boxed{...}'}); pass data in this task's format."
        )
    if len(records) < len(raw):
        logger.warning(
            "--task %s: skipped %d of %d records without a final answer", task, len(raw) - len(records), len(raw)
        )
    return records


def _grpo_columns(record: dict) -> tuple[str, str]:
    for question, answer in _QUESTION_ANSWER_COLUMNS:
        if question in record and answer in record:
            return question, answer
    shapes = ", ".join(f"{q}/{a}" for q, a in _QUESTION_ANSWER_COLUMNS)
    raise LoptError(f"GRPO data has columns {sorted(record)}; expected one of the column pairs: {shapes}")


# ---- DPO and reward models: preference pairs ------------------------------------------------------------

PREFERENCE_PRESETS = {
    "gsm-symbolic-pairs": (
        "synthetic pairs: a correct gsm_symbolic solution vs. the same one with a wrong final answer (offline)"
    ),
    "gsm-symbolic-reasoning-pairs": (
        "synthetic pairs: a correct gsm_symbolic solution vs. the same one with a wrong step (and the right final "
        "line) or a wrong final answer, half each (offline)"
    ),
    "hh-rlhf": "Anthropic's helpful/harmless human preferences (the InstructGPT-style path's) [hub: Anthropic/hh-rlhf]",
    "ultrafeedback": "UltraFeedback, binarized chat pairs [hub: trl-lib/ultrafeedback_binarized]",
}
PREFERENCE_HUB = {"hh-rlhf": "Anthropic/hh-rlhf", "ultrafeedback": "trl-lib/ultrafeedback_binarized"}
_PREFERENCE_GENERATED = {
    "gsm-symbolic-pairs": gsm_symbolic_pairs,
    "gsm-symbolic-reasoning-pairs": gsm_symbolic_reasoning_pairs,
}


def preference_data_is_generated(config) -> bool:
    """Whether a DPO or reward-model run's pairs are generated offline (no other split to validate on)."""
    return not (config.train_file or config.dataset_name) and config.dataset_preset in _PREFERENCE_GENERATED


def require_chat_template(records: list[dict], tokenizer, model_name: str) -> None:
    """Preference pairs in chat format need the model's chat template to be rendered (TRL applies it)."""
    chosen = records[0]["chosen"]
    if isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and not tokenizer.chat_template:
        raise LoptError(
            f"the preference data is in chat format but the tokenizer of {model_name} has no chat template; "
            "use a chat model or text prompt/chosen/rejected records (--train_file)."
        )


def preference_records(
    preset: str | None = "gsm-symbolic-pairs",
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | Path | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
    select_samples: str = "first",
    file_flag: str = "--train_file",
    split_flag: str = "--split",
) -> list[dict]:
    """Preference records with ``chosen`` and ``rejected`` (strings or conversations) and usually ``prompt``.

    ``train_file`` > ``dataset_name`` > ``preset``, and ``max_samples`` / ``select_samples``, as for
    SFT. TRL's DPOTrainer and RewardTrainer read both the prompt/chosen/rejected shape and chat-format pairs whose
    chosen/rejected hold the whole conversation. A pair whose chosen and rejected are the same is refused.
    """
    if preset in PREFERENCE_HUB and train_file is None and dataset_name is None:
        dataset_name = PREFERENCE_HUB[preset]
    if train_file is not None or dataset_name is not None:
        records = load_records(
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            train_file=train_file,
            split=split,
            max_samples=max_samples,
            seed=seed,
            select_samples=select_samples,
            file_flag=file_flag,
            split_flag=split_flag,
        )
        missing = {"chosen", "rejected"} - set(records[0])
        if missing:
            raise LoptError(
                f"DPO data has columns {sorted(records[0])}, missing {sorted(missing)}; expected "
                "prompt/chosen/rejected records or chat-format chosen/rejected conversations."
            )
        same = next((i for i, r in enumerate(records) if r["chosen"] == r["rejected"]), None)
        if same is not None:
            where = f"{file_flag} {train_file}" if train_file is not None else f"--dataset_name {dataset_name}"
            raise LoptError(
                f"record {same + 1} of {where} has the same chosen and rejected answer: a pair that prefers nothing "
                "teaches nothing (its loss gradient is constant). Remove such pairs from the data."
            )
        return records
    if preset not in _PREFERENCE_GENERATED:
        raise unknown_choice("--dataset_preset", preset, PREFERENCE_PRESETS)
    return _PREFERENCE_GENERATED[preset](DEFAULT_GSM_SAMPLES if max_samples is None else max_samples, seed)
