"""Where SFT records come from: a named preset, any hub dataset, or a local file.

All sources return the same thing, a list of plain dicts (records); ``formats.py`` decides their
shape. Hub presets go through the real ``datasets.load_dataset``; the offline preset
``gsm-symbolic`` is generated locally by reasoning-gym and needs no network.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from lopt.answers import extract_final_answer
from lopt.errors import LoptError

logger = logging.getLogger(__name__)

# The answer format the GSM-style tasks train on and are scored by: evaluation and GRPO append the
# same sentence to their questions, so what the model learns here is what they parse later.
GSM_ANSWER_INSTRUCTION = (
    "Solve the problem step by step, then write the final answer as a number on the last line "
    "in the form: #### <answer>"
)
DEFAULT_GSM_SAMPLES = 2000
SUPPORTED_FILE_TYPES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Preset:
    description: str
    hub_id: str | None = None  # None: generated offline

    @property
    def source(self) -> str:
        return f"hub: {self.hub_id}" if self.hub_id else "offline: reasoning-gym gsm_symbolic"


PRESETS: dict[str, Preset] = {
    "gsm-symbolic": Preset("grade-school math word problems with worked solutions (generated, offline)"),
    "alpaca": Preset("52k general instructions (Alpaca)", "tatsu-lab/alpaca"),
    "metamathqa": Preset("395k augmented math questions with solutions (MetaMathQA)", "meta-math/MetaMathQA"),
    "tulu3": Preset("939k mixed chat conversations (Tulu 3 SFT mixture)", "allenai/tulu-3-sft-mixture"),
}


def load_records(
    *,
    preset: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | Path | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Load SFT records from one source.

    Precedence when several are given: ``train_file`` > ``dataset_name`` > ``preset`` (the others
    are ignored with a warning). The caller supplies the default preset when none is chosen.
    ``max_samples`` keeps the first N records (no shuffling, so runs are reproducible). ``seed``
    only matters for the generated ``gsm-symbolic`` preset; ``split`` and ``dataset_config`` only
    for hub datasets.
    """
    if max_samples is not None and max_samples < 0:
        raise LoptError(f"--max_samples must be 0 or more (got {max_samples}); leave it out to keep every record")
    if train_file is not None:
        _warn_ignored("--train_file", {"--dataset_name": dataset_name, "--dataset_preset": preset})
        records, source = _read_file(Path(train_file)), f"--train_file {train_file}"
        records = records[:max_samples] if max_samples is not None else records
    elif dataset_name is not None:
        _warn_ignored("--dataset_name", {"--dataset_preset": preset})
        records = _load_hub(dataset_name, dataset_config, split, max_samples)
        source = f"--dataset_name {dataset_name} (split {split!r})"
    elif preset is not None:
        records, source = _load_preset(preset, split, max_samples, seed), f"--dataset_preset {preset}"
    else:
        raise LoptError("no data source given: pass --dataset_preset, --dataset_name or --train_file")
    if not records and max_samples is not None:
        raise LoptError(f"{source} gave no records after --max_samples {max_samples}; raise it or leave it out")
    if not records:
        raise LoptError(f"{source} gave no records; check that it holds data")
    return records


def with_answer_instruction(question: str, style: str = "hash") -> str:
    """A question followed by the instruction on how to write the final answer (`####` or `\\boxed{}`)."""
    return f"{question}\n{_ANSWER_INSTRUCTIONS[style]}"


def gsm_symbolic_records(size: int, seed: int) -> list[dict]:
    """``size`` generated GSM problems as ``{"question", "answer"}`` records.

    ``answer`` is reasoning-gym's worked solution whose last line is ``#### <answer>``, with
    ``<answer>`` exactly the task's canonical answer string (reasoning-gym writes some as
    ``8.0`` in the solution but ``8`` as the answer; scoring compares against the latter).
    """
    if size == 0:
        return []  # reasoning-gym rejects size 0; the caller reports the empty source
    import reasoning_gym  # imported here: it takes a second and only this preset needs it

    records = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed):
        steps = item["metadata"]["answer_cot"].rstrip().splitlines()
        if steps and steps[-1].startswith("####"):
            steps = steps[:-1]
        steps.append(f"#### {item['answer']}")
        records.append({"question": with_answer_instruction(item["question"]), "answer": "\n".join(steps)})
    return records


def _load_preset(name: str, split: str, max_samples: int | None, seed: int) -> list[dict]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = "\n".join(f"  {n}: {p.description} [{p.source}]" for n, p in PRESETS.items())
        raise LoptError(f"unknown --dataset_preset {name!r}.{hint} Available presets:\n{listing}")
    hub_id = PRESETS[name].hub_id
    if hub_id is None:
        return gsm_symbolic_records(DEFAULT_GSM_SAMPLES if max_samples is None else max_samples, seed)
    return _load_hub(hub_id, None, split, max_samples)


def _load_hub(name: str, config: str | None, split: str, max_samples: int | None) -> list[dict]:
    import datasets  # imported here so `lopt --help` and offline runs stay fast

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    # Any failure here (no network, unknown name or split, auth) is reported the same way; the
    # original message is kept because it says which of those it was.
    except Exception as error:
        raise LoptError(
            f"dataset {name!r} could not be loaded from the Hugging Face hub "
            f"({type(error).__name__}: {error}).\n"
            "Offline? Use --dataset_preset gsm-symbolic (generated locally) or --train_file PATH "
            "(.json, .jsonl or .parquet)."
        ) from error
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset.to_list()


def _read_file(path: Path) -> list[dict]:
    if not path.exists():
        raise LoptError(f"--train_file {path}: no such file")
    if path.is_dir():
        raise LoptError(f"--train_file {path}: is a directory; pass a .json, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_FILE_TYPES:
        raise LoptError(
            f"--train_file {path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_FILE_TYPES)}"
        )
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise LoptError(f"--train_file {path}: permission denied; make the file readable") from None
    except UnicodeDecodeError as error:
        raise LoptError(f"--train_file {path}: not UTF-8 text ({error})") from None
    return _parse_json(text, path) if suffix == ".json" else _parse_jsonl(text, path)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise LoptError(f"--train_file {path}: not a readable parquet file ({error})") from None


def _parse_json(text: str, path: Path) -> list[dict]:
    """A top-level list of records, ``{"data": [...]}``, or JSON Lines content (as `datasets` allows)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # meant as one JSON document: report where it broke
            raise LoptError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        return _parse_jsonl(text, path)  # e.g. one object per line saved with a .json name
    if isinstance(value, dict) and list(value) == ["data"] and isinstance(value["data"], list):
        value = value["data"]
    if isinstance(value, dict):
        value = [value]  # a single record: JSON Lines with one line
    if not isinstance(value, list):
        raise LoptError(f"{path}: expected a list of records (JSON objects), got {type(value).__name__}")
    for i, record in enumerate(value):
        if not isinstance(record, dict):
            raise LoptError(f"{path}: record {i} is {type(record).__name__}; each record must be a JSON object")
    return value


def _parse_jsonl(text: str, path: Path) -> list[dict]:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LoptError(f"{path}:{line_number}: invalid JSON ({error})") from None
        if not isinstance(record, dict):
            raise LoptError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _warn_ignored(chosen: str, others: dict[str, str | None]) -> None:
    for flag, value in others.items():
        if value is not None:
            logger.warning("%s takes precedence; ignoring %s %s", chosen, flag, value)


# ---- GRPO: prompts with a verifiable final answer ---------------------------------------------------

BOXED_ANSWER_INSTRUCTION = "Solve the problem step by step, then write the final answer in \\boxed{}."
_ANSWER_INSTRUCTIONS = {"hash": GSM_ANSWER_INSTRUCTION, "boxed": BOXED_ANSWER_INSTRUCTION}


@dataclass(frozen=True)
class GRPOTask:
    description: str
    style: str  # where the final answer is written: "hash" (#### <answer>) or "boxed" (\boxed{<answer>})
    hub_id: str | None = None  # None: generated offline
    hub_config: str | None = None


GRPO_TASKS: dict[str, GRPOTask] = {
    "gsm-symbolic": GRPOTask("grade-school math word problems (reasoning-gym gsm_symbolic, offline)", "hash"),
    "gsm8k": GRPOTask("GSM8K grade-school math (hub)", "hash", "openai/gsm8k", "main"),
    "numinamath": GRPOTask("NuminaMath-CoT competition math (hub)", "boxed", "AI-MO/NuminaMath-CoT"),
}
# Column pairs a GRPO record may have: the question, and a text whose final answer is the gold one.
_QUESTION_ANSWER_COLUMNS = (("question", "answer"), ("problem", "solution"), ("prompt", "answer"))


def grpo_records(
    task: str,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | Path | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """GRPO prompts as ``{"prompt": [user message], "answer": gold final answer}`` records.

    The records come from the task's own source (reasoning-gym, or the task's hub dataset), or from
    ``dataset_name`` / ``train_file`` (question/answer or problem/solution columns); the task decides
    the answer format the prompt asks for and how the gold answer is read from the reference
    solution. Records whose solution holds no final answer are skipped.
    """
    if task not in GRPO_TASKS:
        close = difflib.get_close_matches(task, list(GRPO_TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = "\n".join(f"  {name}: {t.description}" for name, t in GRPO_TASKS.items())
        raise LoptError(f"unknown --task {task!r}.{hint} Available tasks:\n{listing}")
    spec = GRPO_TASKS[task]
    if train_file is not None or dataset_name is not None:
        raw = load_records(
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            train_file=train_file,
            split=split,
            max_samples=max_samples,
            seed=seed,
        )
    elif spec.hub_id is not None:
        raw = _load_hub(spec.hub_id, spec.hub_config, split, max_samples)
    else:  # generated questions already carry the answer instruction
        raw = [
            {"prompt": r["question"], "answer": r["answer"]}
            for r in gsm_symbolic_records(DEFAULT_GSM_SAMPLES if max_samples is None else max_samples, seed)
        ]
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


# ---- DPO: preference pairs ---------------------------------------------------------------------------

DPO_PRESETS = {
    "gsm-symbolic-pairs": (
        "synthetic pairs: a correct gsm_symbolic solution vs. the same one with a wrong final answer (offline)"
    ),
}


def dpo_records(
    preset: str | None = "gsm-symbolic-pairs",
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | Path | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Preference records with ``chosen`` and ``rejected`` (strings or conversations) and usually ``prompt``.

    ``train_file`` > ``dataset_name`` > ``preset``, as for SFT. TRL's DPOTrainer reads both the
    prompt/chosen/rejected shape and chat-format pairs whose chosen/rejected hold the whole conversation.
    """
    if train_file is not None or dataset_name is not None:
        records = load_records(
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            train_file=train_file,
            split=split,
            max_samples=max_samples,
            seed=seed,
        )
        missing = {"chosen", "rejected"} - set(records[0])
        if missing:
            raise LoptError(
                f"DPO data has columns {sorted(records[0])}, missing {sorted(missing)}; expected "
                "prompt/chosen/rejected records or chat-format chosen/rejected conversations."
            )
        return records
    if preset not in DPO_PRESETS:
        close = difflib.get_close_matches(str(preset), list(DPO_PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = "\n".join(f"  {name}: {text}" for name, text in DPO_PRESETS.items())
        raise LoptError(f"unknown DPO --dataset_preset {preset!r}.{hint} Available presets:\n{listing}")
    return gsm_symbolic_pairs(DEFAULT_GSM_SAMPLES if max_samples is None else max_samples, seed)


def gsm_symbolic_pairs(size: int, seed: int) -> list[dict]:
    """Synthetic preference pairs: chosen = the correct worked solution; rejected = the same solution
    whose final ``#### <answer>`` line is changed to a wrong number (the answer plus a non-zero offset)."""
    rng = random.Random(seed)
    pairs = []
    for record in gsm_symbolic_records(size, seed):
        steps, final = record["answer"].rsplit("\n", 1) if "\n" in record["answer"] else ("", record["answer"])
        gold = final.removeprefix("####").strip()
        wrong = _wrong_number(gold, rng)
        rejected = f"{steps}\n#### {wrong}" if steps else f"#### {wrong}"
        pairs.append(
            {
                "prompt": [{"role": "user", "content": record["question"]}],
                "chosen": [{"role": "assistant", "content": record["answer"]}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return pairs


def _wrong_number(gold: str, rng: random.Random) -> str:
    offset = rng.choice([-1, 1]) * rng.randint(1, 10)
    try:
        return str(Decimal(gold.replace(",", "")) + offset)
    except InvalidOperation:  # not a number: any other text is wrong
        return f"{gold}{offset}"
