import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No hub here: stay offline, and keep TRL's telemetry thread from starting so thread checks see only our own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.dirname(__file__))  # `helpers` must import in the spawned generator too

import pytest

from trl_npd import NearPolicyDistillConfig
from trl_npd.toy import arithmetic_dataset, build_model, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def student(tokenizer):
    return build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)


@pytest.fixture
def teacher(tokenizer):
    return build_model(tokenizer, hidden_size=64, num_layers=2, seed=2)


@pytest.fixture(scope="session")
def dataset():
    return arithmetic_dataset(64, seed=0)


@pytest.fixture
def make_config(tmp_path):
    def make(**overrides):
        values = dict(
            output_dir=str(tmp_path / "out"),
            max_steps=6,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            lmbda=1.0,
            max_new_tokens=8,
            max_length=96,
            logging_steps=2,
            report_to="none",
            save_strategy="no",
            bf16=False,
            seed=0,
            disable_tqdm=True,  # tqdm's monitor thread is not ours; keep it out of the thread checks
            # Δ-IFD has its own tests; elsewhere exact sample counts must not depend on random models' Δ
            ifd_filter=False,
            # exact weight-sync schedules: refreshes on drift have tests of their own
            max_policy_kl=None,
            # the tests of the generator process test the process: no inline sampling while it starts (it has
            # tests of its own)
            generator_bootstrap=False,
            generator_mode="process",  # the default, pinned: these tests test the process whatever the default is
        )
        if overrides.get("generation_backend") == "vllm":
            values["generator_mode"] = "thread"  # vLLM's generator is a thread waiting on the engine, never a process
        values.update(overrides)
        return NearPolicyDistillConfig(**values)

    return make
