"""Processing, chat, grounding and conversion utilities for CogVLM."""
import os as _os

import torch as _torch

# DeepSpeed (imported by SAT) guesses its accelerator and prints a warning on stdout when it lands on
# the CPU; naming it up front keeps CLI output clean. Must run before the first `import sat`.
if "DS_ACCELERATOR" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["DS_ACCELERATOR"] = "cpu"
