import sys
from pathlib import Path

# tiny_models.py is a helper module of the tests, imported by name.
sys.path.insert(0, str(Path(__file__).parent))
