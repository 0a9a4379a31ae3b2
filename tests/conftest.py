import os
import sys
import tempfile
from pathlib import Path

# tiny_models.py is a helper module of the tests, imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# Trackio reads TRACKIO_DIR once, when it is first imported, and TRL's GRPO trainer imports it: set it for the
# whole test session, before any test module loads, so no test run writes into the user's Trackio database
# and each session starts with an empty one.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="lopt-tests-trackio-")
