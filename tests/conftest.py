"""What every test module shares: the helper modules on the import path, a private Trackio folder, and fixtures
for the tiny models and data that the tests build again and again (tiny_models.py, tiny_data.py build them)."""

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# The helper modules of the tests (tiny_models.py, tiny_data.py, launch.py, ...) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# Trackio reads TRACKIO_DIR once, when it is first imported, and TRL's GRPO trainer imports it: set it for the
# whole test session, before any test module loads, so no test run writes into the user's Trackio database
# and each session starts with an empty one.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="lopt-tests-trackio-")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model_dirs(family="llama", layers=4)`: a saved tiny random model of that family with the ChatML
    tokenizer (tiny_models.tiny_model_dir), built once per session for each family and depth. Tests only read it."""
    from tiny_models import tiny_model_dir  # imported here, below the path and TRACKIO_DIR set above

    saved: dict[tuple[str, int], Path] = {}

    def saved_model(family: str = "llama", layers: int = 4) -> Path:
        if (family, layers) not in saved:
            folder = tmp_path_factory.mktemp(f"tiny-{family}-{layers}") / "model"
            saved[family, layers] = tiny_model_dir(folder, family, layers)
        return saved[family, layers]

    return saved_model


@pytest.fixture(scope="session")
def model_dir(tiny_model_dirs) -> Path:
    """The tiny llama (4 layers), saved: the --model_name_or_path of a tiny run. A module whose runs need
    another model overrides this fixture, e.g. with `tiny_model_dirs(layers=6)`."""
    return tiny_model_dirs()


@pytest.fixture()
def train_file(tmp_path) -> Path:
    """The tiny SFT data (tiny_data.SFT_RECORDS) as this test's train.jsonl."""
    from tiny_data import SFT_RECORDS, write_jsonl

    return write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)
