"""`NPDDistillationConfig`: TRL's `DistillationConfig`, field for field, translated onto `NearPolicyDistillConfig`.

A script written for TRL's `DistillationTrainer` runs unchanged after swapping the import. Every `DistillationConfig`
field exists here with TRL's default and meaning; each is either translated into the near-policy field that does the
same (`max_completion_length` -> `max_new_tokens`, `use_vllm` -> `generation_backend`, ...) or, where NPD has no
equivalent, refused when the config is built, with an error that names the field and what to do. Nothing is
accepted and silently ignored. The mapping and its reasons are in docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config import NearPolicyDistillConfig

# The sampling knobs of TRL's DistillationConfig, at the values that leave the distribution alone. NPD's generator
# samples from softmax(logits / temperature) over the whole vocabulary and records that distribution's log-prob of
# every sampled token: the behaviour policy its staleness bound and drift measure (`npd/policy_kl`) read. Any other
# value would sample from a distribution other than the one recorded.
NEUTRAL_SAMPLING = {"top_p": (1.0,), "top_k": (0, None), "min_p": (None, 0.0), "repetition_penalty": (1.0,)}
# `generation_kwargs` keys accepted when they restate what NPD's generator already does; any other key is refused.
NEUTRAL_GENERATION_KWARGS = {
    "do_sample": (True,),
    "top_p": (1.0,),
    "top_k": (0, None),
    "min_p": (None, 0.0),
    "repetition_penalty": (1.0,),
    "num_beams": (1,),
    "use_cache": (True,),
}
# vLLM fields NPD's vLLM backend runs only at TRL's defaults, and why.
VLLM_FIXED = {
    "vllm_model_impl": (
        "vllm",
        "NPD's vLLM backend builds the engine with vLLM's own model implementation",
    ),
    "vllm_enable_sleep_mode": (
        False,
        "NPD's generation thread keeps sampling while the optimizer steps, so the engine never sleeps",
    ),
    "vllm_structured_outputs_regex": (
        None,
        "structured outputs mask the logits, so the log-probs NPD records would not be those of the student it "
        "distils",
    ),
    "vllm_tensor_parallel_size": (
        1,
        "each rank's generation thread drives a whole engine of its own, and the threads of different ranks are not "
        "synchronized, which tensor parallelism needs",
    ),
}


@dataclass
class NPDDistillationConfig(NearPolicyDistillConfig):
    r"""
    Configuration for [`NPDDistillationTrainer`]: TRL's [`~trl.DistillationConfig`], run by the near-policy core.

    Every `DistillationConfig` field keeps its name, default and meaning; the fields below are the ones
    `DistillationConfig` has and `NearPolicyDistillConfig` does not, or has with another default. Every
    [`NearPolicyDistillConfig`] field (the generator, staleness, Δ-IFD, packing and the fused loss) is available
    too, with its own default. A field NPD cannot honour is refused when the config is built, with an error that
    names it. Training is always fully on-policy, as `DistillationTrainer`'s is: `lmbda` stays `1.0` and `seq_kd`
    `False` (use `NearPolicyDistillConfig` for GKD's mix of dataset and student samples).

    > Parameters that control the model and the teacher model

    learning_rate (`float`, *optional*, defaults to `1e-06`):
        Initial learning rate of AdamW; `DistillationConfig`'s default.
    teacher_model_revision (`str` or `None`, *optional*, defaults to `None`):
        Revision (branch, tag or commit) of the teacher when the trainer loads it by name; added to
        `teacher_model_init_kwargs` unless that sets a `revision` itself.
    disable_dropout (`bool`, *optional*, defaults to `False`):
        Whether to disable dropout in the student. `DistillationConfig`'s default (GKD's is `True`).

    > Parameters that control the data preprocessing

    remove_unused_columns (`bool` or `None`, *optional*, defaults to `False`):
        Kept for `DistillationConfig`'s sake: the trainer reads only the `prompt` column either way.
    max_completion_length (`int` or `None`, *optional*, defaults to `512`):
        Most tokens the student generates per completion (NPD's `max_new_tokens`, which it sets). `None` is refused:
        the generator needs a bound.
    max_new_tokens (`int` or `None`, *optional*, defaults to `None`):
        GKD's name for `max_completion_length`, set from it. Leave it unset; a value other than
        `max_completion_length` is refused.
    max_length (`int` or `None`, *optional*, defaults to `None`):
        Longest prompt plus completion, in tokens; longer prompts are cut from the left and counted in
        `npd/truncated_prompts`. `None`, the default, cuts nothing, as `DistillationTrainer` does not (a model with
        a learned position table still has `max_length` lowered to its table's size). With a colocated vLLM
        engine, `vllm_max_model_length` sets it.
    ds3_gather_for_generation (`bool`, *optional*, defaults to `True`):
        Under DeepSpeed ZeRO-3, NPD always gathers the student's full weights to copy them into the generator, so
        only `True` is accepted.
    shuffle_dataset (`bool` or `None`, *optional*, defaults to `True`):
        The generator walks the prompts in a fresh seeded permutation every pass; `False` is refused.
    pad_to_multiple_of (`int` or `str` or `None`, *optional*, defaults to `'auto'`):
        `"auto"` (no padding off Neuron) and `None` are accepted. NPD packs training sequences without padding, so
        a multiple is refused.

    > Parameters that control generation

    temperature (`float`, *optional*, defaults to `1.0`):
        Temperature of the student's sampling and of the divergence, as in `DistillationTrainer`: both models'
        logits are divided by it before the generalized JSD. (GKD, and `NearPolicyDistillConfig`, use it for
        sampling only.)
    top_p (`float`, *optional*, defaults to `1.0`):
        Only `1.0`. NPD's generator records the log-prob of every sampled token under the distribution it sampled
        from, softmax(logits / temperature) over the whole vocabulary; nucleus sampling would sample from another.
    top_k (`int`, *optional*, defaults to `0`):
        Only `0` (or `None`): off, for the reason given under `top_p`.
    min_p (`float` or `None`, *optional*, defaults to `None`):
        Only `None` (or `0.0`): off, for the reason given under `top_p`.
    repetition_penalty (`float`, *optional*, defaults to `1.0`):
        Only `1.0`: off, for the reason given under `top_p`.
    generation_kwargs (`dict` or `str` or `None`, *optional*, defaults to `None`):
        Only keys that restate what the generator already does (`do_sample=True`, `top_p=1.0`, `top_k=0`,
        `min_p=0.0`, `repetition_penalty=1.0`, `num_beams=1`, `use_cache=True`); any other key is refused by name.
    chat_template_kwargs (`dict` or `str` or `None`, *optional*, defaults to `None`):
        Keyword arguments for `apply_chat_template` when conversational prompts are rendered, e.g.
        `{"enable_thinking": False}`.
    cache_implementation (`str` or `None`, *optional*, defaults to `None`):
        Only `None`: the generator chooses its own KV cache.

    > Parameters that control generation acceleration powered by vLLM

    use_vllm (`bool`, *optional*, defaults to `False`):
        Sample with vLLM: sets `generation_backend="vllm"` (`pip install "trl_npd[vllm]"`; see docs/scale.md).
    vllm_mode (`str`, *optional*, defaults to `'colocate'`):
        `"colocate"` (a vLLM engine on every rank) or `"server"` (a running `trl vllm-serve`).
        `DistillationConfig`'s default; `NearPolicyDistillConfig`'s is `"server"`.
    vllm_model_impl (`str`, *optional*, defaults to `'vllm'`):
        Only `"vllm"`.
    vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
        Only `False`: the generation thread samples while the optimizer steps.
    vllm_structured_outputs_regex (`str` or `None`, *optional*, defaults to `None`):
        Only `None`: structured outputs would sample from another distribution than the student's.
    vllm_max_model_length (`int` or `None`, *optional*, defaults to `None`):
        Context of the colocated engine; with `use_vllm` and `vllm_mode="colocate"` it sets `max_length` (prompts
        are cut to fit it instead of failing in vLLM). Without vLLM, or with a server (whose context is its own), it
        does nothing, as in `DistillationTrainer`.
    vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
        Only `1`: each rank drives a whole engine.

    > Parameters that control the training

    beta (`float`, *optional*, defaults to `1.0`):
        Generalized JSD coefficient, as in `DistillationTrainer` and GKD: `0.0` forward KL(teacher ‖ student),
        `1.0` reverse KL(student ‖ teacher). `DistillationConfig`'s default (GKD's is `0.5`).
    lmbda (`float`, *optional*, defaults to `1.0`):
        Fully on-policy, as `DistillationTrainer` trains; any other value is refused.
    max_tool_calling_iterations (`int` or `None`, *optional*, defaults to `None`):
        Only `None`: the generator samples single-turn completions, and the trainer refuses `tools`.

    > Parameters that control the logging

    num_completions_to_print (`int` or `None`, *optional*, defaults to `None`):
        Rows of the `log_completions` table. `None`: one optimizer step's samples on this rank
        (`per_device_train_batch_size * gradient_accumulation_steps`), as `DistillationTrainer` shows its last
        generation batch.
    log_unique_prompts (`bool`, *optional*, defaults to `False`):
        Only `False`: the table shows the most recent trained samples as they came.
    """

    # fields TrainingArguments parses from a JSON string (the command line passes dicts so)
    _VALID_DICT_FIELDS: ClassVar[list[str]] = [
        *NearPolicyDistillConfig._VALID_DICT_FIELDS,
        "generation_kwargs",
        "chat_template_kwargs",
    ]

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "Revision of the teacher when it is loaded by name."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Whether to disable dropout in the student."})

    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Kept for DistillationConfig: only the 'prompt' column is read."}
    )
    max_completion_length: int | None = field(
        default=512, metadata={"help": "Maximum number of tokens to generate per completion."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "GKD's name for max_completion_length, set from it. Leave unset."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt plus completion; longer prompts are cut from the left. None: no cut."},
    )
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "ZeRO-3: NPD always gathers the student's weights; only True."}
    )
    shuffle_dataset: bool | None = field(
        default=True, metadata={"help": "The generator shuffles prompts every pass; only True."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Only 'auto' or None: NPD packs sequences without padding."}
    )

    temperature: float = field(
        default=1.0, metadata={"help": "Temperature for sampling and for the divergence, as in DistillationTrainer."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Only 1.0: the generator samples the full distribution."})
    top_k: int = field(default=0, metadata={"help": "Only 0: the generator samples the full distribution."})
    min_p: float | None = field(
        default=None, metadata={"help": "Only None: the generator samples the full distribution."}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Only 1.0: the generator samples the full distribution."}
    )
    generation_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Only keys that restate the generator's own sampling."}
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for apply_chat_template on conversational prompts."}
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "Only None: the generator chooses its own cache."}
    )

    use_vllm: bool = field(default=False, metadata={"help": "Sample with vLLM (generation_backend='vllm')."})
    vllm_mode: str = field(
        default="colocate",
        metadata={"help": "vLLM backend: 'colocate' or 'server'.", "choices": ["colocate", "server"]},
    )
    vllm_model_impl: str = field(default="vllm", metadata={"help": "Only 'vllm'."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Only False."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "Only None."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Context of the colocated vLLM engine; with use_vllm it sets max_length."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Only 1."})

    beta: float = field(
        default=1.0, metadata={"help": "Generalized JSD coefficient: 0.0 forward KL, 1.0 reverse KL (the default)."}
    )
    lmbda: float = field(default=1.0, metadata={"help": "Fully on-policy: only 1.0."})
    max_tool_calling_iterations: int | None = field(default=None, metadata={"help": "Only None: no tool calling."})

    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows of the log_completions table. None: one optimizer step's samples."}
    )
    log_unique_prompts: bool = field(default=False, metadata={"help": "Only False."})

    def __post_init__(self) -> None:
        # Fields as the caller set them are refused or translated onto NPD's fields before NearPolicyDistillConfig's
        # own checks see them. What TrainingArguments parses or resolves first (JSON-string dicts, `report_to`,
        # `pad_to_multiple_of`, which depends on the device) is checked after.
        self._refuse_off_policy()
        self._refuse_sampling_knobs()
        self._refuse_vllm_settings()
        self._refuse_other_settings()
        self._refuse_topk_temperature()
        self._translate_backend()  # first: the lengths read which backend samples
        self._translate_lengths()
        super().__post_init__()
        self._refuse_generation_kwargs()
        self._check_logging_backends()
        self._refuse_padding_multiple()
        self._refuse_sequence_parallelism()

    def _refuse_off_policy(self) -> None:
        if self.lmbda != 1.0:
            raise ValueError(
                f"lmbda={self.lmbda}: NPDDistillationConfig trains fully on-policy, as TRL's DistillationTrainer "
                "does. Leave lmbda unset, or use NearPolicyDistillConfig and NearPolicyDistillTrainer (the GKD "
                "drop-in) to mix dataset completions in."
            )
        if self.seq_kd:
            raise ValueError(
                "seq_kd=True: NPDDistillationConfig trains on the student's own samples only, as TRL's "
                "DistillationTrainer does. Leave seq_kd unset, or use NearPolicyDistillConfig (the GKD drop-in)."
            )

    def _refuse_sampling_knobs(self) -> None:
        for name, neutral in NEUTRAL_SAMPLING.items():
            value = getattr(self, name)
            if value not in neutral:
                raise ValueError(
                    f"{name}={value!r} is not supported: NPD's generator samples from softmax(logits / temperature) "
                    "over the whole vocabulary and records that distribution's log-prob of every sampled token, "
                    "which its staleness bound and drift measure (npd/policy_kl) read; "
                    f"{name} would sample from another distribution than the one recorded. Leave {name} unset "
                    f"({neutral[0]!r}); temperature is supported."
                )
        if self.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={self.cache_implementation!r} is not supported: NPD's generator runs "
                "`generate` with its own dynamic KV cache. Leave cache_implementation unset."
            )

    def _refuse_generation_kwargs(self) -> None:
        kwargs = self.generation_kwargs or {}
        # keys that restate the config's own values change nothing either
        neutral = {
            **NEUTRAL_GENERATION_KWARGS,
            "max_new_tokens": (self.max_completion_length,),
            "temperature": (self.temperature,),
        }
        refused = {k: v for k, v in kwargs.items() if v not in neutral.get(k, ())}
        if refused:
            raise ValueError(
                f"generation_kwargs {refused!r} is not supported: NPD's generator samples from softmax(logits / "
                "temperature) over the whole vocabulary, once per prompt, and records that distribution's "
                "log-probs; these keys would change how it samples. Remove them (keys that restate its own sampling, "
                f"{sorted(neutral)} at their neutral values or the config's own, are accepted), and set the "
                "completion length with max_completion_length and the temperature with temperature."
            )

    def _refuse_vllm_settings(self) -> None:
        for name, (supported, reason) in VLLM_FIXED.items():
            value = getattr(self, name)
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported: {reason}. Leave {name} unset ({supported!r}).")

    def _refuse_other_settings(self) -> None:
        if not self.ds3_gather_for_generation:
            raise ValueError(
                "ds3_gather_for_generation=False is not supported: NPD's generator samples from its own full copy of "
                "the student, which under DeepSpeed ZeRO-3 is made by gathering the weights at every weight sync. "
                "Leave ds3_gather_for_generation unset (True)."
            )
        if not self.shuffle_dataset:  # None too: TRL's sampler takes it as "do not shuffle"
            raise ValueError(
                f"shuffle_dataset={self.shuffle_dataset} is not supported: NPD's generator walks the train prompts "
                "in a fresh seeded permutation every pass (set seed to change it). Leave shuffle_dataset unset (True)."
            )
        if self.max_tool_calling_iterations is not None:
            raise ValueError(
                f"max_tool_calling_iterations={self.max_tool_calling_iterations} is not supported: NPD's generator "
                "samples single-turn completions and runs no tools. Leave it unset."
            )
        if self.log_unique_prompts:
            raise ValueError(
                "log_unique_prompts=True is not supported: the log_completions table shows the most recent trained "
                "samples as they came. Leave log_unique_prompts unset (False)."
            )

    def _refuse_topk_temperature(self) -> None:
        if self.teacher_top_k is not None and self.temperature != 1.0:
            raise ValueError(
                f"teacher_top_k={self.teacher_top_k} with temperature={self.temperature}: the top-k objective is "
                "taken at temperature 1 (the teacher's recorded top-k log-probs are at 1), while "
                "DistillationTrainer takes the divergence at `temperature`. Set temperature=1.0, or "
                "teacher_top_k=None for the full-vocabulary divergence at this temperature."
            )

    def _translate_lengths(self) -> None:
        """`max_completion_length` is NPD's `max_new_tokens`; with vLLM, `vllm_max_model_length` is `max_length`."""
        if self.max_completion_length is None:
            raise ValueError(
                "max_completion_length=None is not supported: NPD's generator needs a bound on the tokens it samples "
                "per completion. Set max_completion_length (DistillationConfig's default is 512)."
            )
        if self.max_new_tokens is not None and self.max_new_tokens != self.max_completion_length:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} and max_completion_length={self.max_completion_length} name "
                "the same limit (max_new_tokens is GKD's name). Set max_completion_length only."
            )
        self.max_new_tokens = self.max_completion_length
        # TRL reads vllm_max_model_length for a colocated engine only; a server has its own context
        if self.use_vllm and self.vllm_mode == "colocate" and self.vllm_max_model_length is not None:
            if self.max_length is not None and self.max_length != self.vllm_max_model_length:
                raise ValueError(
                    f"max_length={self.max_length} and vllm_max_model_length={self.vllm_max_model_length}: with "
                    "vLLM, the engine's context is max_length. Set one of them."
                )
            if self.vllm_max_model_length <= self.max_completion_length:
                raise ValueError(
                    f"vllm_max_model_length={self.vllm_max_model_length} leaves no room for a prompt next to "
                    f"max_completion_length={self.max_completion_length}. Raise vllm_max_model_length or lower "
                    "max_completion_length."
                )
            self.max_length = self.vllm_max_model_length

    def _translate_backend(self) -> None:
        """`use_vllm` is NPD's `generation_backend="vllm"`; `num_completions_to_print=None` a step's samples."""
        if self.use_vllm:
            self.generation_backend = "vllm"
        self.use_vllm = self.generation_backend == "vllm"
        if self.num_completions_to_print is None:  # DistillationTrainer shows its last generation batch
            self.num_completions_to_print = self.per_device_train_batch_size * self.gradient_accumulation_steps

    def _check_logging_backends(self) -> None:
        if self.log_completions and "trackio" in _as_list(self.report_to):
            raise ValueError(
                "log_completions=True with report_to including 'trackio' is not supported: NPD prints the table "
                "and logs it to wandb only. Report to wandb, or set log_completions=False."
            )

    def _refuse_padding_multiple(self) -> None:
        # resolved by SFTConfig.__post_init__: "auto" is None except on Neuron, where it is 128
        if self.pad_to_multiple_of is not None:
            raise ValueError(
                f"pad_to_multiple_of={self.pad_to_multiple_of!r} is not supported: NPD packs training sequences into "
                "rows without padding (padding_free=True) or pads them to the longest, never to a multiple. Leave "
                "pad_to_multiple_of unset ('auto', which pads only on Neuron, where NPD is not supported) or None."
            )

    def _refuse_sequence_parallelism(self) -> None:
        parallelism = self.parallelism_config
        if parallelism is not None and (parallelism.cp_enabled or parallelism.sp_enabled):
            raise ValueError(
                "Sequence-dim parallelism (parallelism_config with cp_size > 1 or sp_size > 1) is not supported, as "
                "in TRL's DistillationTrainer: training batches are built after generation, inside the trainer. Set "
                "cp_size=1 and sp_size=1, or leave parallelism_config unset."
            )


def _as_list(report_to: Any) -> list[str]:
    if report_to is None:
        return []
    return [report_to] if isinstance(report_to, str) else list(report_to)
