"""Typed run configs: every recipe's flags as one dataclass (schema.py and the feature modules beside it), parsed
from the command line and YAML (parse.py) and checked (validate.py) before anything loads.

    fields.py       how a field becomes a flag (help, choices, type)
    method.py       --method and LoPT's flags, their checks, `lopt_settings` (config.lopt)
    adapters.py     LoRA / QLoRA flags and checks
    validation.py   the validation flags and checks, `validates`, `eval_steps`
    optimizers.py   --optim's names          report_to.py   --report_to's trackers
    schema.py       RunConfig, SFTConfig, FLAG_GROUPS (the sections of --help)
    policy_rl.py    GRPO / RLOO flags and checks          preference.py   DPO / reward-model flags
    parse.py        build_parser, parse_config
    validate.py     validate: the checks that need only the flags
"""

from lopt.config.adapters import ADAPTER_FLAGS
from lopt.config.method import METHODS
from lopt.config.optimizers import OPTIMIZERS
from lopt.config.parse import build_parser, parse_config
from lopt.config.policy_rl import GRPOConfig, PolicyRLConfig, ReferenceGRPOConfig, RLOOConfig
from lopt.config.preference import DPOConfig, PreferenceConfig, RMConfig
from lopt.config.report_to import parse_report_to
from lopt.config.schema import DISTRIBUTED_HELP, FLAG_GROUPS, ReferenceSFTConfig, RunConfig, SFTConfig
from lopt.config.validate import validate
from lopt.config.validation import EVAL_OPTIONS, EVAL_SOURCES, eval_steps, validates

__all__ = [
    "ADAPTER_FLAGS", "DISTRIBUTED_HELP", "DPOConfig", "EVAL_OPTIONS", "EVAL_SOURCES", "FLAG_GROUPS", "GRPOConfig",
    "METHODS", "OPTIMIZERS", "PolicyRLConfig", "PreferenceConfig", "RLOOConfig", "RMConfig", "ReferenceGRPOConfig",
    "ReferenceSFTConfig", "RunConfig", "SFTConfig", "build_parser", "eval_steps", "parse_config", "parse_report_to",
    "validate", "validates",
]  # fmt: skip
