"""trl_npd: Near-Policy Distillation for TRL, a drop-in replacement for `GKDTrainer`."""

import os

# GKDTrainer lives in trl.experimental; importing trl_npd is consent to use it, so keep its warning quiet.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .config import NearPolicyDistillConfig
from .pipeline import GeneratorError
from .trainer import NearPolicyDistillTrainer

__all__ = ["GeneratorError", "NearPolicyDistillConfig", "NearPolicyDistillTrainer"]
__version__ = "0.1.0"
