"""Offline data generated locally by reasoning-gym: worked problems, and preference pairs built from them.

No network: this is what the default presets, the `gsm-symbolic` task and the embedded-model demo
train and evaluate on. Generation is deterministic in (size, seed), and a set is a prefix of any
larger one from the same seed (reasoning-gym draws each problem from its own seed and index).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation

from lopt.answers import with_answer_instruction

DEFAULT_GSM_SAMPLES = 2000


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


def reasoning_gym_records(dataset: str, size: int, seed: int, style: str | None = None, **options) -> list[dict]:
    """``size`` problems of the reasoning-gym dataset ``dataset`` (made with its config ``options``) as
    ``{"question", "answer"}`` records, the answer exactly reasoning-gym's (short: no worked steps).

    ``style`` appends that answer style's instruction to each question (answers.py); None asks the question as
    reasoning-gym states it (chain_sum's own prompt already says how to answer).
    """
    if size == 0:
        return []
    import reasoning_gym

    return [
        {
            "question": with_answer_instruction(item["question"].strip(), style) if style else item["question"].strip(),
            "answer": str(item["answer"]),
        }
        for item in reasoning_gym.create_dataset(dataset, size=size, seed=seed, **options)
    ]


def gsm_symbolic_pairs(size: int, seed: int) -> list[dict]:
    """Synthetic preference pairs: chosen = the correct worked solution; rejected = the same solution
    whose final ``#### <answer>`` line is changed to a wrong number (the answer plus a non-zero offset)."""
    return answer_pairs(gsm_symbolic_records(size, seed), seed)


def answer_pairs(records: list[dict], seed: int) -> list[dict]:
    """`gsm_symbolic_pairs` of the given question/answer `records` (held-out ones, for evaluation)."""
    rng = random.Random(seed)
    pairs = []
    for record in records:
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


# A worked step's result: the number right after an "=" (a currency sign or spaces between allowed).
_STEP_RESULT = re.compile(r"=\s*[£$€]?\s*(-?\d[\d,]*(?:\.\d+)?)")


def gsm_symbolic_reasoning_pairs(size: int, seed: int) -> list[dict]:
    """Synthetic preference pairs for reward models, which differ in whether the reasoning is right.

    chosen = the correct worked solution. rejected = the same solution with one mistake, half of the pairs each way:
    - a wrong step: one intermediate result (a number right after "=" in a line before the answer line, picked at
      random) is changed by a small offset, and nothing else, so the rejected solution computes wrongly but ends
      on the *same* ``#### <answer>`` line as the chosen one: only reading the steps tells them apart;
    - a wrong answer: the ``#### <answer>`` line names a wrong number (as in the DPO pairs).
    A solution without a worked step gets a wrong answer. A reward model that reads only the last line scores
    at most 75% on these pairs (every wrong answer, half of the wrong steps by chance).
    """
    return reasoning_pairs(gsm_symbolic_records(size, seed), seed)


def reasoning_pairs(records: list[dict], seed: int) -> list[dict]:
    """`gsm_symbolic_reasoning_pairs` of the given question/answer `records` (held-out ones, for evaluation)."""
    rng = random.Random(seed)
    pairs = []
    for record in records:
        steps, final = record["answer"].rsplit("\n", 1) if "\n" in record["answer"] else ("", record["answer"])
        results = list(_STEP_RESULT.finditer(steps))
        if results and rng.random() < 0.5:
            step = rng.choice(results)
            start, end = step.span(1)
            rejected = f"{steps[:start]}{_wrong_number(step.group(1), rng)}{steps[end:]}\n{final}"
        else:
            wrong = f"#### {_wrong_number(final.removeprefix('####').strip(), rng)}"
            rejected = f"{steps}\n{wrong}" if steps else wrong
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
        wrong = Decimal(gold.replace(",", "")) + offset
    except InvalidOperation:  # not a number: any other text is wrong
        return f"{gold}{offset}"
    return f"{wrong:,}" if "," in gold else str(wrong)  # written as the right one was: no tell in the format
