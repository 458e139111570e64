"""trl_npd: Near-Policy Distillation for TRL, a drop-in replacement for `GKDTrainer` and `DistillationTrainer`."""

import importlib
import os
from typing import TYPE_CHECKING, Any

# GKDTrainer lives in trl.experimental; importing trl_npd is consent to use it, so keep its warning quiet.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

if TYPE_CHECKING:
    from .buffer import EmptyCompletionsError
    from .config import NearPolicyDistillConfig
    from .distillation_config import NPDDistillationConfig
    from .distillation_trainer import NPDDistillationTrainer
    from .nonfinite import NonFiniteLossError
    from .pipeline import GeneratorError
    from .trainer import NearPolicyDistillTrainer

# Imported on first use: the generator process imports trl_npd's generation modules, and loading TRL's trainer
# stack (trl, peft, liger) there would add seconds to every generator's start.
_EXPORTS = {
    "EmptyCompletionsError": ".buffer",
    "GeneratorError": ".pipeline",
    "NearPolicyDistillConfig": ".config",
    "NearPolicyDistillTrainer": ".trainer",
    "NonFiniteLossError": ".nonfinite",
    "NPDDistillationConfig": ".distillation_config",
    "NPDDistillationTrainer": ".distillation_trainer",
}

__all__ = [
    "EmptyCompletionsError",
    "GeneratorError",
    "NPDDistillationConfig",
    "NPDDistillationTrainer",
    "NearPolicyDistillConfig",
    "NearPolicyDistillTrainer",
    "NonFiniteLossError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trl_npd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
