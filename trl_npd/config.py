"""`NearPolicyDistillConfig`: GKD's config plus the knobs of near-policy distillation."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl.experimental.gkd import GKDConfig

from .selection import BANDS as IFD_BANDS

logger = logging.getLogger(__name__)

GENERATOR_MODES = ("process", "thread", "inline")
# Old names of generator modes, still accepted with a FutureWarning: "sync" generated inline, and "sync" now names
# only weight syncs.
DEPRECATED_GENERATOR_MODES = {"sync": "inline"}
GENERATION_BACKENDS = ("transformers", "vllm")
VLLM_MODES = ("server", "colocate")
TOPK_OBJECTIVES = ("npd", "jsd")
# Fields that only Δ-IFD selection reads: without `ifd_filter=True` a value set on them does nothing.
IFD_ONLY_FIELDS = (
    "ifd_band",
    "ifd_tail_width",
    "ifd_max_drop_frac",
    "ifd_delta_min",
    "ifd_delta_max",
    "ifd_quantiles",
    "ifd_window",
    "ifd_max_rejected_in_a_row",
)


@dataclass
class NearPolicyDistillConfig(GKDConfig):
    r"""
    Configuration for [`NearPolicyDistillTrainer`].

    Every [`~trl.experimental.gkd.GKDConfig`] field keeps its meaning (`lmbda`, `beta`, `seq_kd`, `temperature`,
    `max_new_tokens`, `teacher_model_init_kwargs`, `disable_dropout`, ...). The fields below are new.

    > Parameters that control precision

    bf16 (`bool` or `None`, *optional*, defaults to `None`):
        Train in bf16 mixed precision. `None` chooses from the hardware, and logs the choice at info level: `True`
        where transformers can train in bf16 (a GPU of the Ampere generation or newer, XPU, NPU, TPU...), `False`
        (float32) elsewhere, e.g. on a CPU-only machine; `False` also when `fp16=True`. TRL's configs turn `None`
        into `True`, which fails on a CPU. An explicit `True` on a machine that cannot train in bf16 is an error
        (with `use_cpu=True` it means CPU bf16 autocast).

    > Parameters that control the background generator

    generation_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Number of prompts the generator samples completions for at a time. `None` sizes it when training starts:
        the largest batch whose samples can all be trained on within `max_staleness`, i.e. `(max_staleness -
        weight_sync_steps + 2) / 3` optimizer steps' worth of on-policy samples, rounded down (at least one step's
        worth, and one micro-batch), counting every rank's micro-batches when one generator feeds them all
        (`shared_generator`). A larger batch costs less per sample but waits longer in the buffer (`docs/design.md`
        §23; the cost per batch size is in `docs/benchmarks.md`). With `lmbda < 1` the on-policy draws are random,
        so the bound then holds on average.
    generator_mode (`str` or `None`, *optional*, defaults to `None`):
        Where the generator runs. `"process"`: a spawned process that generates while the optimizer trains (the
        only mode with real overlap on CPU, `docs/design.md` §1). `"thread"`: a thread in the trainer process, for
        debugging or for models that cannot be pickled. `"inline"`: no background work; the trainer generates with
        its live weights when it needs samples, a generation batch at a time (`"sync"`, its old name, still works
        and warns that it is deprecated). `None` chooses, and logs the choice: `"thread"` with
        `generation_backend="vllm"`, whose client lives in the trainer process, where a thread waits on it while the
        optimizer trains; `"process"` otherwise, on a CPU-only machine too: in the real-model arena
        (`benchmarks/arena_real.py`, 3 seeds) it ended at a lower KL to the teacher than inline generation on every
        seed, in as much wall-clock or less, though on 2 cores it only splits the same cores with the trainer
        (`docs/design.md` §30). Inline generation needs no copy of the student and no process: choose it when
        memory is short, or to debug. An explicit
        `"process"` with vLLM becomes `"thread"` for the same reason, with a warning.
    generator_device (`str` or `None`, *optional*, defaults to `None`):
        Device of the background generator's copy of the student, e.g. `"cpu"` or `"cuda:1"`. `None` uses the
        trainer's device. A background generator (`"process"` or `"thread"`, with `generation_backend="transformers"`)
        samples from a copy of the student of its own on this device, and also holds a copy of the teacher there when
        it scores samples (`teacher_top_k` or `ifd_filter`); weight syncs go through one more copy of each in CPU
        shared memory. So on one GPU the generator's copies take that GPU's memory beside training; a second GPU
        (`"cuda:1"`) keeps them off it. `"inline"` makes no copy: it samples with the trainer's own models.
    generator_num_threads (`int` or `None`, *optional*, defaults to `None`):
        CPU threads of the generator process when it runs on CPU. `None` gives it half of the cores and leaves the
        trainer the rest for the duration of `train()`, so the two do not oversubscribe the machine.
    generation_backend (`str`, *optional*, defaults to `"transformers"`):
        Engine that samples completions. `"transformers"` uses the model's own `generate` on a snapshot of the
        student. `"vllm"` uses TRL's vLLM integration (`pip install "trl_npd[vllm]"`; see the vLLM parameters
        below and `docs/scale.md`): a thread of the trainer process drives vLLM while the optimizer trains, and
        weight syncs go through TRL's weight-transfer client. Δ-IFD selection is off with it (see `ifd_filter`).
    shared_generator (`bool`, *optional*, defaults to `False`):
        With several processes (`accelerate launch`): `False` gives every rank its own generator, which samples
        from that rank's shard of the prompts. `True` runs one generator on the main process, for all ranks; each
        on-policy micro-batch is taken from its buffer and scattered to the ranks. Per-rank is the default; the
        measurement and the reasons are in `docs/scale.md`. The shared generator suits a dedicated generation
        device (`generator_device`), and vLLM's server mode always uses it, since one client holds the
        weight-transfer group.
    generator_bootstrap (`bool`, *optional*, defaults to `True`):
        With `generator_mode="process"`: until the generator process hands over its first batch (it takes seconds
        to start: a fresh interpreter imports torch and transformers and copies the models), the trainer samples
        its own on-policy micro-batches with its live weights, as GKD does, instead of waiting. Reported as
        `npd/bootstrap_samples` and `npd/bootstrap_s`. Off under DeepSpeed ZeRO-3 and FSDP, where sampling with the
        live weights is a collective.
    generator_timeout_s (`float`, *optional*, defaults to `300.0`):
        Seconds the background generator may go without showing progress before training stops with a
        `GeneratorError` that says what it was last doing; a hung generator process is then killed. The embedded
        engine shows progress after every layer of every forward (sampling, and the teacher's scoring) and while it
        waits (for room in the buffer, for the weight snapshot), so on a CPU this bounds one layer's forward over a
        generation batch (plus the LM head and the scorer's log-probs over it, which run after the last layer), a
        weight load, and the generator's start-up (process start, copying the models); on a GPU the beats come as
        each layer's kernels are launched, so a stuck kernel shows from the next synchronization on; with
        vLLM, one whole generation batch (vLLM's own start-up comes before the generator's and is not counted). The
        default, 300 s, is the heartbeat timeout of TRL's `AsyncDistillationTrainer`: a hang surfaces within five
        minutes, and nothing the embedded engine does goes that long without a beat (`docs/design.md` §22). Raise it
        when one vLLM generation batch of long completions takes longer; lower it (20 s surfaces a hang in 20 s) to
        fail fast in a test.

    > Parameters that control the vLLM backend (`generation_backend="vllm"`)

    vllm_mode (`str`, *optional*, defaults to `"server"`):
        `"server"`: generate through a running `vllm serve` (started as TRL's vLLM guide says, see
        `docs/scale.md`), from the main process, for all ranks. `"colocate"`: every rank runs its own vLLM engine
        on its own GPU, beside training.
    vllm_server_base_url (`str` or `None`, *optional*, defaults to `None`):
        Base URL of the server, e.g. `"http://localhost:8000"`. When set, host and port are ignored.
    vllm_server_host (`str`, *optional*, defaults to `"0.0.0.0"`):
        Host of the server. Ignored when `vllm_server_base_url` is set.
    vllm_server_port (`int`, *optional*, defaults to `8000`):
        Port of the server. Ignored when `vllm_server_base_url` is set.
    vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
        Seconds to wait for the server to come up before failing.
    vllm_group_port (`int`, *optional*, defaults to `51216`):
        Port of the NCCL group that carries weight syncs to the server.
    vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
        Share of each GPU the colocated engine may take (weights and KV cache). With vLLM's CPU build, the share of
        host memory it may reserve.

    > Parameters that control weight sync and staleness

    weight_sync_steps (`int`, *optional*, defaults to `4`):
        Optimizer steps between two refreshes of the generator's snapshot of the student. Each refresh increments
        the policy version.
    max_staleness (`int`, *optional*, defaults to `8`):
        A sample whose generating weights are more than this many optimizer steps old is never trained on; it is
        dropped and counted in `npd/dropped_stale`. Must be at least `weight_sync_steps - 1`, otherwise samples of
        the newest snapshot go stale before the next refresh and training starves.
    buffer_size (`int` or `None`, *optional*, defaults to `None`):
        Most samples queued between the generator and the trainer, on top of the batch the generator is holding. A
        full buffer pauses the generator. `None` means one generation batch (or one training micro-batch, if that is
        larger), which with the default batch size keeps every sample within `max_staleness` however far the
        generator runs ahead. Must hold at least one generation batch and one training micro-batch.
    max_policy_kl (`float` or `None`, *optional*, defaults to `None`):
        Per-token KL between the behaviour policy (the snapshot that sampled) and the current student, estimated
        with k3 on the trained tokens of each optimizer step, in nats, above which the snapshot is refreshed at once
        instead of waiting for `weight_sync_steps`. Samples already generated are still trained on (within
        `max_staleness`). `None`, the default, only measures the drift (`npd/policy_kl`, and per sample
        `npd/policy_kl_sample_max`) and keeps weight syncs sparse: on the real-model arena
        (`benchmarks/arena_real.py`: SmolLM2-135M-Instruct distilled into a 10-layer pruned copy of itself, 120
        steps, seed 1, commit eafed7d, generator process) a bound of 0.01 forced a sync at 64 of the 120 steps and
        did not change the result (`docs/design.md` §31); each sync is a full weight transfer with vLLM.

    > Parameters that control batching and the loss

    padding_free (`bool`, *optional*, defaults to `True`):
        Pack each training micro-batch's sequences into rows (first-fit-decreasing), with `position_ids`
        restarting at every sequence and no padding inside rows. The whole micro-batch is one row when both models
        use a per-sample attention (flash-attention, flex attention: transformers unpacks a single row only), and
        rows hold at most the batch's longest sequence under dense attention (SDPA, eager), where a long row would
        cost a quadratic attention. This is
        trl_npd's own packing stage; SFTTrainer's padding-free collator does not apply to GKD's batches. `False`
        right-pads each sequence to the longest.
    use_fused_loss (`bool`, *optional*, defaults to `True`):
        Compute the generalized JSD with Liger's fused-linear kernel on the trained positions' hidden states, so
        the `(tokens x vocab)` logits are never materialized. `False` uses the plain reference path.
    fused_loss_compile (`bool` or `None`, *optional*, defaults to `None`):
        `torch.compile` the fused kernel's chunk loop. `None` compiles on CUDA only: on CPU the first call costs
        seconds of compilation.
    teacher_top_k (`int` or `None`, *optional*, defaults to `None`):
        `None` trains on GKD's generalized JSD over the full vocabulary. An integer k selects the NPD paper's
        objective instead: `ce_weight * CE + (1 - ce_weight) * KL(teacher || student)` over the teacher's top-k
        tokens plus one tail bucket (the paper uses k=10). The generator scores each sample with the teacher when
        it is made, so on-policy training steps run no teacher forward; `beta` is not used.
    ce_weight (`float`, *optional*, defaults to `0.1`):
        Weight of the cross-entropy on the trained tokens in the top-k objective; the paper's 1 - lambda with
        lambda = 0.9. Ignored without `teacher_top_k`, and by `topk_objective="jsd"`.
    topk_objective (`str`, *optional*, defaults to `"npd"`):
        What `teacher_top_k` trains on. `"npd"`: the paper's objective above. `"jsd"`: GKD's generalized JSD(`beta`)
        over the k + 1 buckets, so the fast path keeps GKD's objective. It is exact when the teacher's mass
        outside its top-k is spread as the student's is, and otherwise never above the full-vocabulary JSD; its
        error grows with that mass (`benchmarks/topk_jsd.py`, commit f409a6e: on a small trained pair with a
        512-token vocabulary, 13% in the loss and 30% in the gradient at k=10, 3% and 8% at k=50). Use a k that
        leaves the teacher little mass outside it.

    > Parameters that control Δ-IFD selection

    ifd_filter (`bool`, *optional*, defaults to `False`):
        Score every generated sample's Δ-IFD = IFD_teacher - IFD_student (IFD = NLL with the prompt / NLL without)
        in the generator, and train only on samples inside the band. Scoring runs three forwards per generated
        batch: the teacher over prompt + completion, and the teacher and the generating student over the
        completion alone (the student's NLL with the prompt comes from the sampler). With `teacher_top_k` set, the
        first is the teacher forward that scores the top-k anyway, so Δ-IFD adds two. They run in the generator,
        off the training critical path, but on CPU they make the generator the bottleneck (`benchmarks/ifd_cost.py`,
        commit 1728f88, toy Qwen3-shaped models, a teacher of about 8x the student's compute: 2.0x the generator's
        time per sample). `True` is refused with
        `generation_backend="vllm"`, which cannot score it: the generating weights live in the vLLM engine. `None`,
        the old way to leave it unset, is read as `False` and warns that it is deprecated. Off by default because
        on the toy arithmetic arena (`benchmarks/arena.py`, 5 seeds, commit 388af0b) its effect on final accuracy
        was within noise (−0.9 points [−6.4, +4.5] against NPD without it) while it took the runs from 51.7 s of
        training to 92.5 s. The other `ifd_*` fields have no effect while it is off: setting one then warns.
    ifd_band (`str`, *optional*, defaults to `"tails"`):
        `"tails"`: drop only the extreme outliers of the last `ifd_window` scored samples, those more than
        `ifd_tail_width` robust standard deviations from their median, and never more than `ifd_max_drop_frac` of
        them. `"absolute"`: keep `ifd_delta_min <= Δ <= ifd_delta_max`. `"quantile"`: keep Δ between the
        `ifd_quantiles` of the last `ifd_window` scored samples.
    ifd_tail_width (`float`, *optional*, defaults to `3.5`):
        Half-width of the tails band, in robust standard deviations (1.4826 × the median absolute deviation).
    ifd_max_drop_frac (`float`, *optional*, defaults to `0.05`):
        Most the tails band drops: it widens to the window's outer quantiles when it would cut deeper.
    ifd_delta_min (`float`, *optional*, defaults to `0.0`), ifd_delta_max (`float`, *optional*, defaults to `0.8`):
        The absolute band. It is not the NPD paper's: the paper does not publish one.
    ifd_quantiles (`tuple[float, float]`, *optional*, defaults to `(0.1, 0.9)`):
        The quantile band: keep Δ between these quantiles of the last `ifd_window` values. The absolute band falls
        back to it when it starves (see `ifd_max_rejected_in_a_row`).
    ifd_window (`int`, *optional*, defaults to `1024`):
        How many of the most recent Δ values (samples whose Δ is undefined are not counted) the tails and quantile
        bands are computed over, the current batch's included; the absolute band does not use it. The tails band
        drops nothing until the window holds 64 values, so below 64 it keeps every sample.
    ifd_max_rejected_in_a_row (`int`, *optional*, defaults to `256`):
        Consecutive rejections after which the absolute band gives way to the quantile band, with a warning that
        names the band and the observed Δ distribution, so training never starves silently.

    > Parameters that control logging

    log_completions (`bool`, *optional*, defaults to `False`):
        At every logging step, print a table of a few recently trained (prompt, completion, Δ-IFD, staleness)
        rows, as TRL's online trainers do, and log it as a table to wandb when `report_to` includes it.
    num_completions_to_print (`int`, *optional*, defaults to `4`):
        Rows in that table: the most recent samples trained on.
    log_samples (`bool`, *optional*, defaults to `False`):
        Write the fate of every generated sample to `<output_dir>/npd_samples.jsonl` (one file per rank with
        several processes), one JSON line each: its prompt index and stream position, policy version and step,
        Δ-IFD, and either the optimizer step it was trained on with its staleness then, or the reason it was
        dropped (`stale`, `ifd_low`, `ifd_high`, `empty_prompt`, `empty_completion`).
    """

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Train in bf16 mixed precision. Not set: chosen from the hardware (True on a bf16-capable GPU, "
            "False in float32 on a CPU), and logged."
        },
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts sampled per generator batch. None: the largest batch that keeps every sample within "
            "max_staleness ((max_staleness - weight_sync_steps + 2) / 3 optimizer steps' worth)."
        },
    )
    generator_mode: str | None = field(
        default=None,
        metadata={
            "help": "Where the generator runs. None: 'thread' with vLLM, else 'process'. ('sync' is the deprecated "
            "name of 'inline'.)",
            "choices": [*GENERATOR_MODES, *DEPRECATED_GENERATOR_MODES, None],
        },
    )
    generator_device: str | None = field(
        default=None, metadata={"help": "Device of the generator's snapshot. None: the trainer's device."}
    )
    generator_num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of the generator process. None: half of the cores."}
    )
    generation_backend: str = field(
        default="transformers",
        metadata={"help": "Engine that samples completions.", "choices": list(GENERATION_BACKENDS)},
    )
    shared_generator: bool = field(
        default=False,
        metadata={"help": "One generator on the main process for all ranks, instead of one per rank."},
    )
    generator_bootstrap: bool = field(
        default=True,
        metadata={"help": "Sample inline with the live student until the generator process delivers its first batch."},
    )
    generator_timeout_s: float = field(
        default=300.0,
        metadata={"help": "Seconds without progress after which the generator counts as hung and training stops."},
    )
    vllm_mode: str = field(
        default="server", metadata={"help": "vLLM backend: 'server' or 'colocate'.", "choices": list(VLLM_MODES)}
    )
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Base URL of the vLLM server."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Port of the vLLM server."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the vLLM server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Port of the weight-sync NCCL group."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU share of a colocated vLLM engine."})
    weight_sync_steps: int = field(
        default=4, metadata={"help": "Optimizer steps between two refreshes of the generator's snapshot."}
    )
    max_staleness: int = field(
        default=8, metadata={"help": "Samples older than this many optimizer steps are dropped and counted."}
    )
    buffer_size: int | None = field(
        default=None,
        metadata={
            "help": "Most samples queued between generator and trainer. None: one generation batch (at least one "
            "training micro-batch)."
        },
    )
    max_policy_kl: float | None = field(
        default=None,
        metadata={
            "help": "Per-token k3 KL (behaviour vs current) above which the snapshot is refreshed early. None: off."
        },
    )

    padding_free: bool = field(
        default=True, metadata={"help": "Pack training sequences into rows without padding (trl_npd's own stage)."}
    )
    use_fused_loss: bool = field(
        default=True, metadata={"help": "Liger fused-linear JSD: never materialize the (tokens x vocab) logits."}
    )
    fused_loss_compile: bool | None = field(
        default=None, metadata={"help": "torch.compile the fused loss. None: only on CUDA."}
    )

    teacher_top_k: int | None = field(
        default=None, metadata={"help": "None: full-vocabulary JSD. k: NPD's CE + top-k forward KL objective."}
    )
    ce_weight: float = field(default=0.1, metadata={"help": "CE weight of the top-k objective (1 - lambda)."})
    topk_objective: str = field(
        default="npd",
        metadata={
            "help": "teacher_top_k's objective: 'npd' (CE + forward KL) or 'jsd' (GKD's JSD over buckets).",
            "choices": list(TOPK_OBJECTIVES),
        },
    )
    ifd_filter: bool = field(default=False, metadata={"help": "Train only on samples in the Δ-IFD band."})
    ifd_band: str = field(default="tails", metadata={"help": "Δ-IFD band.", "choices": list(IFD_BANDS)})
    ifd_tail_width: float = field(
        default=3.5, metadata={"help": "Tails band half-width, in robust standard deviations of recent Δ."}
    )
    ifd_max_drop_frac: float = field(default=0.05, metadata={"help": "Most of recent samples the tails band drops."})
    ifd_delta_min: float = field(default=0.0, metadata={"help": "Lower edge of the absolute Δ-IFD band."})
    ifd_delta_max: float = field(default=0.8, metadata={"help": "Upper edge of the absolute Δ-IFD band."})
    ifd_quantiles: tuple[float, float] = field(
        default=(0.1, 0.9), metadata={"help": "Quantiles of recent Δ-IFD bounding the quantile band."}
    )
    ifd_window: int = field(
        default=1024, metadata={"help": "Recent Δ values the tails and quantile bands are computed over."}
    )
    ifd_max_rejected_in_a_row: int = field(
        default=256, metadata={"help": "Rejections in a row before the absolute band falls back to the quantile one."}
    )

    log_completions: bool = field(
        default=False, metadata={"help": "Print a few recent (prompt, completion, Δ-IFD, staleness) rows at each log."}
    )
    num_completions_to_print: int = field(default=4, metadata={"help": "Rows printed when log_completions is on."})
    log_samples: bool = field(
        default=False, metadata={"help": "Write every generated sample's fate to <output_dir>/npd_samples.jsonl."}
    )

    def __post_init__(self) -> None:
        # One check per section of the docstring. Checks that warn are called from here directly: their stacklevel
        # (the check, this method, the dataclass __init__, then the caller) points at the code that built the config.
        self._resolve_mixed_precision()
        super().__post_init__()
        self._resolve_generator_mode()
        self._check_backends()
        self._check_ifd_filter()
        self._check_staleness()
        self._check_lengths()
        self._check_objective()
        self._check_ifd_band()
        self._check_logging()
        self._check_generator()
        self._warn_about_unused_ifd_settings()

    def _resolve_generator_mode(self) -> None:
        """The mode the generator will run in. Left unset, it is chosen from the backend and logged; a mode that
        was asked for is never changed silently: an old name, or a mode the backend runs otherwise, warns."""
        if self.generator_mode is None:
            self.generator_mode = self._default_generator_mode()
        elif self.generator_mode in DEPRECATED_GENERATOR_MODES:
            new = DEPRECATED_GENERATOR_MODES[self.generator_mode]
            warnings.warn(
                f"generator_mode={self.generator_mode!r} is deprecated: use generator_mode={new!r}, which does the "
                "same (the trainer generates with its live weights when it needs samples). 'sync' now names only "
                "weight syncs.",
                FutureWarning,
                stacklevel=4,
            )
            self.generator_mode = new
        if self.generator_mode not in GENERATOR_MODES:
            raise ValueError(f"generator_mode must be one of {GENERATOR_MODES}, got {self.generator_mode!r}.")
        if self.generator_mode == "process" and self.generation_backend == "vllm":
            warnings.warn(
                "generator_mode='process' runs as generator_mode='thread' with generation_backend='vllm': the vLLM "
                "client lives in the trainer process, where a thread only waits on it while the optimizer trains, "
                "and a generator process would have nothing to run. Set generator_mode='thread' (or leave it unset) "
                "to stop this warning.",
                UserWarning,
                stacklevel=4,
            )
            self.generator_mode = "thread"

    def _check_backends(self) -> None:
        """The generation backend, and vLLM's mode."""
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ValueError(
                f"generation_backend must be one of {GENERATION_BACKENDS}, got {self.generation_backend!r}."
            )
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}.")

    def _check_ifd_filter(self) -> None:
        """Δ-IFD on or off: `None`, once the way to leave it unset, is off; vLLM cannot score it."""
        if self.ifd_filter is None:
            warnings.warn(
                "ifd_filter=None is deprecated: it has always meant off, which is now the default, False. Leave "
                "ifd_filter unset or set it to False (True turns Δ-IFD selection on).",
                FutureWarning,
                stacklevel=4,
            )
            self.ifd_filter = False
        if self.generation_backend == "vllm" and self.ifd_filter:
            raise ValueError(
                "generation_backend='vllm' cannot run Δ-IFD selection: it needs the generating weights' NLL of each "
                "completion with and without its prompt, and those weights live in the vLLM engine. Set "
                "ifd_filter=False (or leave it unset, which means off with vLLM)."
            )

    def _check_staleness(self) -> None:
        """Weight sync and staleness."""
        if self.weight_sync_steps < 1:
            raise ValueError(f"weight_sync_steps must be >= 1, got {self.weight_sync_steps}.")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}.")
        if self.max_staleness < self.weight_sync_steps - 1:
            raise ValueError(
                f"max_staleness={self.max_staleness} is below weight_sync_steps - 1 = {self.weight_sync_steps - 1}: "
                "samples of the newest snapshot would go stale before the next weight sync and training would "
                "starve. Raise max_staleness or lower weight_sync_steps."
            )
        if self.max_policy_kl is not None and self.max_policy_kl <= 0:
            raise ValueError(f"max_policy_kl must be > 0 or None, got {self.max_policy_kl}.")

    def _check_lengths(self) -> None:
        """GKD's `max_new_tokens` and `max_length`, which the generator's prompts must fit beside."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.max_length is not None and self.max_length - self.max_new_tokens < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a prompt next to max_new_tokens="
                f"{self.max_new_tokens}. Raise max_length or lower max_new_tokens."
            )

    def _check_objective(self) -> None:
        """The top-k objective's fields."""
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be >= 1 or None, got {self.teacher_top_k}.")
        if self.topk_objective not in TOPK_OBJECTIVES:
            raise ValueError(f"topk_objective must be one of {TOPK_OBJECTIVES}, got {self.topk_objective!r}.")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}.")

    def _check_ifd_band(self) -> None:
        """The Δ-IFD band's fields, checked whether or not Δ-IFD is on."""
        if self.ifd_band not in IFD_BANDS:
            raise ValueError(f"ifd_band must be one of {IFD_BANDS}, got {self.ifd_band!r}.")
        if self.ifd_tail_width <= 0:
            raise ValueError(f"ifd_tail_width must be > 0, got {self.ifd_tail_width}.")
        if not 0.0 <= self.ifd_max_drop_frac < 1.0:
            raise ValueError(f"ifd_max_drop_frac must be in [0, 1), got {self.ifd_max_drop_frac}.")
        if self.ifd_delta_min > self.ifd_delta_max:
            raise ValueError(f"ifd_delta_min={self.ifd_delta_min} is above ifd_delta_max={self.ifd_delta_max}.")
        lo, hi = self.ifd_quantiles
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"ifd_quantiles must satisfy 0 <= lo < hi <= 1, got {self.ifd_quantiles}.")
        if self.ifd_window < 1 or self.ifd_max_rejected_in_a_row < 1:
            raise ValueError("ifd_window and ifd_max_rejected_in_a_row must be >= 1.")

    def _check_logging(self) -> None:
        if self.num_completions_to_print < 1:
            raise ValueError(f"num_completions_to_print must be >= 1, got {self.num_completions_to_print}.")

    def _check_generator(self) -> None:
        """The background generator's threads, timeout and sizes; an explicit buffer too small for a batch fails
        here, not at train()."""
        if self.generator_num_threads is not None and self.generator_num_threads < 1:
            raise ValueError(f"generator_num_threads must be >= 1 or None, got {self.generator_num_threads}.")
        if not self.generator_timeout_s > 0:
            raise ValueError(
                f"generator_timeout_s must be > 0, got {self.generator_timeout_s}: it is how long the generator may "
                "go without progress before training stops. Keep the default (300) unless a hang must surface "
                "sooner, or one vLLM generation batch takes longer."
            )
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {self.generation_batch_size}.")
        if self.buffer_size is not None:
            self.generation_sizes(world_size=1)

    def _warn_about_unused_ifd_settings(self) -> None:
        """A Δ-IFD setting changed from its default while Δ-IFD is off does nothing: say so instead of ignoring it
        (e.g. `--ifd_band quantile` without `--ifd_filter true`)."""
        if self.ifd_filter:
            return
        changed = []
        for name in IFD_ONLY_FIELDS:
            value, default = getattr(self, name), self.__dataclass_fields__[name].default
            if (tuple(value) != tuple(default)) if name == "ifd_quantiles" else value != default:
                changed.append(f"{name}={value!r}")
        if not changed:
            return
        fix = (
            "generation_backend='vllm' cannot run Δ-IFD selection, so leave them unset"
            if self.generation_backend == "vllm"
            else "Set ifd_filter=True to select samples with them, or leave them unset"
        )
        warnings.warn(
            f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect without ifd_filter=True: "
            f"Δ-IFD selection is off, so no generated sample is scored or dropped by it. {fix}.",
            UserWarning,
            stacklevel=4,  # this method, __post_init__, the dataclass __init__, then the caller
        )

    def generation_sizes(self, world_size: int) -> tuple[int, int]:
        """The (generation_batch_size, buffer_size) a generator uses, in samples; `None` fields are sized here.

        A generation batch is sampled by one policy version. When the generator runs ahead, three batches are in
        flight: the one the trainer is using, one in the buffer, and one the generator holds while it waits. The
        generator starts the next batch, with the newest weights (at most `weight_sync_steps - 1` steps old), when
        the trainer starts on the buffered one, so that batch's last sample is trained on
        `weight_sync_steps + 3 * batch / per_step - 2` optimizer steps after its weights were taken (`per_step`:
        on-policy samples an optimizer step takes). The default batch is the largest that keeps this within
        `max_staleness`: the cheapest per sample that loses nothing to staleness. `world_size` is the number of
        ranks a shared generator samples for (1 for a per-rank generator).
        """
        micro_batch = self.per_device_train_batch_size * world_size
        per_step = max(1, round(micro_batch * self.gradient_accumulation_steps * self.lmbda))
        batch = self.generation_batch_size
        if batch is None:  # and never less than one micro-batch, which an on-policy draw takes at once
            steps_worth = max(1, (self.max_staleness - self.weight_sync_steps + 2) // 3)
            batch = max(micro_batch, per_step * steps_worth)
        buffer = max(batch, micro_batch) if self.buffer_size is None else self.buffer_size
        if buffer < max(batch, micro_batch):
            raise ValueError(
                f"buffer_size={buffer} is smaller than one batch: it must hold at least one generation batch "
                f"(generation_batch_size={batch}) and one training micro-batch ({micro_batch})."
            )
        return batch, buffer

    def _resolve_mixed_precision(self) -> None:
        """`bf16` left unset is chosen from the hardware, as transformers would accept it.

        TRL's configs turn an unset `bf16` into `True`, which transformers then refuses on a machine without a
        bf16-capable accelerator: the first command on a laptop failed. Unset, it is `True` where transformers
        supports bf16 training (a recent GPU, XPU, NPU, TPU...) and `False` (float32) elsewhere, including with
        `use_cpu`, where bf16 autocast stays opt-in. An explicit `bf16=True` the machine cannot run is an error.
        """
        accelerator_has_bf16 = not self.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available())
        if self.bf16 is None:
            self.bf16 = not self.fp16 and accelerator_has_bf16
            logger.info(
                "bf16 was not set: training in %s (%s). Set bf16 or fp16 to choose.",
                "bf16 mixed precision" if self.bf16 else ("fp16 mixed precision" if self.fp16 else "float32"),
                "fp16 was set"
                if self.fp16
                else ("bf16-capable accelerator found" if accelerator_has_bf16 else "no bf16-capable accelerator"),
            )
        elif self.bf16 and not accelerator_has_bf16 and not self.use_cpu:
            raise ValueError(
                "bf16=True, but this machine has no accelerator that trains in bf16 (a GPU of the Ampere generation "
                "or newer, or an XPU, NPU, TPU...). Leave bf16 unset to have it chosen from the hardware, set "
                "bf16=False to train in float32, or set use_cpu=True to use bf16 autocast on the CPU."
            )

    def _default_generator_mode(self) -> str:
        """`"thread"` with vLLM, `"process"` otherwise.

        The process is the default on a CPU-only machine too: inline generation was as fast or faster in
        `throughput.py`'s short runs on 2 cores, but in the real-model arena, 120 steps of a pretrained pair, the
        process ended at a lower KL to the teacher on all three seeds in as much wall-clock or less, and it matched
        inline generation's quality in the toy arena (docs/design.md §30).
        """
        if self.generation_backend == "vllm":
            mode, reason = "thread", "the vLLM client lives in the trainer process, where a thread only waits on it"
        else:
            mode, reason = "process", "a generator process samples while the optimizer trains"
        logger.info("generator_mode was not set: %r (%s). Set generator_mode to choose.", mode, reason)
        return mode

    @property
    def max_prompt_tokens(self) -> int | None:
        """The tokens a prompt may keep (cut from the left) so that its completion fits within `max_length`."""
        return None if self.max_length is None else self.max_length - self.max_new_tokens

    @property
    def uses_shared_generator(self) -> bool:
        """Whether one generator on the main process samples for every rank (vLLM's server mode always does)."""
        return self.shared_generator or (self.generation_backend == "vllm" and self.vllm_mode == "server")

    def resolved_fused_loss_compile(self) -> bool:
        """Whether the fused loss is compiled: as set, or, left unset, on CUDA only (on CPU the first call costs
        seconds of compilation). The trainer resolves it once, when it is built."""
        if self.fused_loss_compile is not None:
            return self.fused_loss_compile
        return self.device.type == "cuda"

    def resolved_generator_num_threads(self) -> int:
        """Threads the CPU generator process gets: the configured number, or half of the cores."""
        if self.generator_num_threads is not None:
            return self.generator_num_threads
        return max(1, (os.cpu_count() or 2) // 2)
