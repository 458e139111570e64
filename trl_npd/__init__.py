"""trl_npd: Near-Policy Distillation for TRL, a drop-in replacement for `GKDTrainer`."""

import os

# GKDTrainer lives in trl.experimental; importing trl_npd is consent to use it, so keep its warning quiet.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .buffer import EmptyCompletionsError
from .config import NearPolicyDistillConfig
from .nonfinite import NonFiniteLossError
from .pipeline import GeneratorError
from .trainer import NearPolicyDistillTrainer

__all__ = [
    "EmptyCompletionsError",
    "GeneratorError",
    "NearPolicyDistillConfig",
    "NearPolicyDistillTrainer",
    "NonFiniteLossError",
]
__version__ = "0.1.0"
