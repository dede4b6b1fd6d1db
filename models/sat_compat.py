"""Every workaround for SwissArmyTransformer (SAT) 0.4.12 and the DeepSpeed it imports, in one place.

Each entry names what it patches and why. Import this module before the first `import sat`
(`models/__init__.py` does), because the first one acts at import time.
"""
import os

import torch

# DeepSpeed (imported by SAT) guesses its accelerator and prints a warning on stdout when it lands on
# the CPU; naming it up front keeps CLI output clean. Must run before the first `import sat`.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
