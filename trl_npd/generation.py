"""The generation stage: a versioned snapshot of the student, the engine that samples from it, and the loop.

The snapshot lives in shared memory so a generator process can read it. The trainer publishes new weights into it
under a lock and bumps the version; the generator copies it into its private model, under the same lock, only
between two generation batches. A batch is therefore sampled entirely by one version (no torn weights), and the
trainer never waits for a generation batch to finish before it can publish.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from .buffer import GeneratedBatch, Sample, SampleBuffer
from .prompts import PromptStream
from .scoring import SampleScorer
from .selection import DeltaIFDFilter


class PolicySnapshot:
    """Shared-memory copy of the student's weights with the policy version and step they belong to.

    Args:
        model: the student, as the trainer holds it (unwrapped). It is copied to CPU shared memory.
        ctx: a `multiprocessing` context; its lock and values also work between threads.
        version, step: the version this first copy carries and the optimizer step its weights come from.
    """

    def __init__(self, model: nn.Module, ctx: Any, version: int = 0, step: int = 0) -> None:
        self.model = inference_copy(model)
        self.model.share_memory()
        self._lock = ctx.Lock()
        self._version = ctx.Value("q", version, lock=False)
        self._step = ctx.Value("q", step, lock=False)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pairs_source: tuple[int, tuple[bool, ...]] | None = None
        self._frozen_versions: dict[int, int] = {}  # version counters of frozen source parameters at the last publish
        self.last_publish_bytes = 0
        self._changed_since_last_publish(model)  # the copy above is the first publish: note what it holds

    @property
    def version(self) -> int:
        return int(self._version.value)

    @property
    def step(self) -> int:
        return int(self._step.value)

    def publish(self, source: nn.Module, step: int, check_alive: Callable[[], None] = lambda: None) -> int:
        """Copy `source`'s weights in, tag them with `step`, and return the new version.

        `check_alive` is called while waiting for the lock and must raise if the generator died: a generator killed
        while loading the snapshot never releases the lock.
        """
        with torch.no_grad():
            copies = self._changed_since_last_publish(source)
        with held_while_alive(self._lock, check_alive), torch.no_grad():
            for dst, src in copies:
                dst.copy_(src.detach())
            self.last_publish_bytes = sum(src.numel() * src.element_size() for _, src in copies)
            self._version.value += 1
            self._step.value = step
            return int(self._version.value)

    def _changed_since_last_publish(self, source: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (snapshot, source) tensor pairs this publish must copy.

        Trainable parameters and buffers, always. A frozen parameter only when it changed in place since the last
        publish (its version counter moved: an in-place update, `load_state_dict`, a balancing bias updated outside
        the optimizer). So a LoRA student's frozen base travels once, with the first snapshot. When the set of
        trainable parameters changes (a layer frozen or unfrozen), everything is copied once: a layer that trained
        and was then frozen must not keep its last updates from the generator.
        """
        signature = (id(source), tuple(p.requires_grad for p in source.parameters()))
        if self._pairs_source != signature:
            self._pairs = _matching_tensors(self.model, source)
            self._pairs_source = signature
            self._frozen_versions = {}
            copy_all = True
        else:
            copy_all = False
        copies = []
        for dst, src in self._pairs:
            if isinstance(src, nn.Parameter) and not src.requires_grad:
                seen = self._frozen_versions.get(id(src))
                self._frozen_versions[id(src)] = src._version
                if not copy_all and seen == src._version:
                    continue
            copies.append((dst, src))
        return copies

    def load_into(self, target: nn.Module, loaded_version: int) -> tuple[int, int] | None:
        """Copy the snapshot into `target` if it is newer than `loaded_version`; returns its (version, step)."""
        if self.version == loaded_version:
            return None
        pairs = _matching_tensors(target, self.model)
        with self._lock, torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)
            return int(self._version.value), int(self._step.value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pairs"], state["_pairs_source"], state["_frozen_versions"] = [], None, {}  # per-process caches
        return state


@contextlib.contextmanager
def held_while_alive(lock: Any, check_alive: Callable[[], None]) -> Iterator[None]:
    """Hold `lock`, calling `check_alive` while waiting for it: a generator that died holding the lock never
    releases it, and `check_alive` raises instead of waiting forever."""
    while not lock.acquire(timeout=0.1):
        check_alive()
    try:
        yield
    finally:
        lock.release()


def inference_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` for sampling only.

    Training-time hooks are removed: they have no role in sampling, and some (transformers'
    `enable_input_require_grads`, used with gradient checkpointing) are local functions a process cannot receive.
    """
    # Copy straight to CPU: tensors go in the deepcopy memo as CPU clones, so a model on a GPU is never
    # duplicated there first.
    memo: dict[int, torch.Tensor] = {id(b): b.detach().to("cpu", copy=True) for b in model.buffers()}
    memo |= {id(p): nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=False) for p in model.parameters()}
    snapshot = copy.deepcopy(model, memo).eval()
    snapshot.requires_grad_(False)
    for module in snapshot.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            hooks.clear()
    return snapshot


def _matching_tensors(dst: nn.Module, src: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs (dst tensor, src tensor) by state-dict name; tied weights appear once. Source parameters stay
    `Parameter`s, whose `requires_grad` and version counter the snapshot reads."""
    dst_state, src_state = dst.state_dict(keep_vars=True), src.state_dict(keep_vars=True)
    if dst_state.keys() != src_state.keys():
        missing = sorted(set(dst_state) ^ set(src_state))[:5]
        raise ValueError(f"The student's weights no longer match its snapshot (differing names, e.g. {missing}).")
    pairs, seen = [], set()
    for name, tensor in dst_state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        pairs.append((tensor.data, src_state[name]))
    return pairs


class _BehaviourPolicy(LogitsProcessor):
    """Applies the sampling temperature and records the log-prob of each sampled token.

    It is the last processor `generate` runs (generate is called with temperature 1, top-k and top-p off, and a
    neutral model config, so no warper follows it), so what it returns is exactly the distribution tokens are
    sampled from: the behaviour policy. The sampled token of step t is only
    known at step t + 1, so each step gathers the previous step's log-probs; `finish` gathers the last one.
    """

    def __init__(self, temperature: float, record_t1: bool = False) -> None:
        self.temperature = temperature
        self.record_t1 = record_t1
        self.logprobs: list[torch.Tensor] = []
        self.logprobs_t1: list[torch.Tensor] = []  # at temperature 1, for Δ-IFD
        self._previous: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._gather(input_ids[:, -1])
        raw = torch.log_softmax(scores.float(), dim=-1) if self.record_t1 and self.temperature != 1.0 else None
        scores = scores / self.temperature
        tempered = torch.log_softmax(scores.float(), dim=-1)
        self._previous = (tempered, tempered if raw is None and self.record_t1 else raw)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        tempered, raw = self._previous
        self.logprobs.append(tempered.gather(1, tokens[:, None]).squeeze(1))
        if raw is not None:
            self.logprobs_t1.append(raw.gather(1, tokens[:, None]).squeeze(1))
        self._previous = None

    def finish(self, sequences: torch.Tensor, num_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if num_new_tokens > len(self.logprobs) and self._previous is not None:
            self._gather(sequences[:, -1])
        t1 = torch.stack(self.logprobs_t1, dim=1) if self.logprobs_t1 else None
        return torch.stack(self.logprobs, dim=1), t1


class _StopWhen(StoppingCriteria):
    """Ends a generation early when the pipeline shuts down, so shutdown never waits on a long batch."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


@dataclass
class EngineConfig:
    max_new_tokens: int
    temperature: float
    pad_token_id: int
    eos_token_id: int | list[int] | None
    device: str = "cpu"


@dataclass
class Completion:
    ids: list[int]
    logprobs: list[float]
    logprobs_t1: list[float] | None = None


class TransformersEngine:
    """Samples completions with the model's own `generate` and records the behaviour log-probs."""

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        should_stop: Callable[[], bool] = lambda: False,
        record_t1: bool = False,
    ) -> None:
        self.model = model
        self.record_t1 = record_t1
        self.config = config
        self.should_stop = should_stop
        # the module whose generation_config `generate` reads (inside a PEFT wrapper, the wrapped model)
        self._generating = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers fills every field we leave unset from the model's own generation_config (a checkpoint's
        # repetition_penalty, min_p, ...), which would sample from something other than the recorded policy.
        # While sampling, the model sees a neutral config instead.
        self._neutral_model_config = GenerationConfig(
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        eos = config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            temperature=1.0,  # applied by _BehaviourPolicy, so the recorded log-probs are the sampled ones
            top_k=0,
            top_p=1.0,
            use_cache=True,
            pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[Completion] | None:
        """One completion per prompt, cut after its first EOS. None if asked to stop midway."""
        device = torch.device(self.config.device)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        policy = _BehaviourPolicy(self.config.temperature, record_t1=self.record_t1)
        was_training, model_config = self.model.training, self._generating.generation_config
        self.model.eval()
        self._generating.generation_config = self._neutral_model_config
        try:
            sequences = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=self._generation_config,
                logits_processor=LogitsProcessorList([policy]),
                stopping_criteria=[_StopWhen(self.should_stop)],
            )
        finally:
            self.model.train(was_training)
            self._generating.generation_config = model_config
        if self.should_stop():
            return None
        completions = sequences[:, width:].cpu()
        logprobs, logprobs_t1 = policy.finish(sequences, completions.shape[1])
        rows = logprobs_t1.cpu().tolist() if logprobs_t1 is not None else [None] * len(prompts)
        return [
            self._cut(ids.tolist(), lps.tolist(), t1)
            for ids, lps, t1 in zip(completions, logprobs.cpu(), rows, strict=True)
        ]

    def _cut(self, ids: list[int], logprobs: list[float], logprobs_t1: list[float] | None) -> Completion:
        end = next((i + 1 for i, token in enumerate(ids) if token in self._eos), len(ids))
        return Completion(ids[:end], logprobs[:end], None if logprobs_t1 is None else logprobs_t1[:end])


class RemoteEngine(Protocol):
    """An engine that holds its own copy of the weights (vLLM): the trainer pushes weights into it."""

    def generate(self, prompts: list[list[int]]) -> list[Completion] | None: ...

    def sync_weights(self) -> None: ...


def generate_batch(
    engine: TransformersEngine | RemoteEngine,
    prompts: PromptStream,
    batch_size: int,
    version: int,
    step: int,
    scorer: SampleScorer | None = None,
    selector: DeltaIFDFilter | None = None,
) -> GeneratedBatch | None:
    """Sample one generation batch with the engine's current weights, tagged with their version and step; score
    it (teacher top-k, Δ-IFD) and keep the samples in the Δ-IFD band, when a scorer and a selector are given."""
    start = time.perf_counter()
    batch_prompts = prompts.take(batch_size)
    dropped: dict[str, int] = {}
    usable = [p for p in batch_prompts if p.ids]
    if len(usable) < len(batch_prompts):  # nothing to condition on; generate() cannot start from zero tokens
        dropped["empty_prompt"] = len(batch_prompts) - len(usable)
    completions = engine.generate([p.ids for p in usable]) if usable else []
    if completions is None:
        return None
    samples = [
        Sample(
            prompt_ids=p.ids,
            completion_ids=c.ids,
            behaviour_logprobs=c.logprobs,
            policy_version=version,
            policy_step=step,
            prompt_index=p.index,
            stream_position=p.position,
            prompt_truncated=p.truncated,
            behaviour_logprobs_t1=c.logprobs_t1,
        )
        for p, c in zip(usable, completions, strict=True)
    ]
    if scorer is not None:
        scorer.score(samples)
    deltas, warnings = [], []
    if selector is not None:
        deltas = [s.ifd_delta for s in samples]
        selected = selector.select(deltas)
        samples = [samples[i] for i in selected.kept]
        dropped.update(selected.dropped)
        warnings = selected.warnings
    return GeneratedBatch(
        samples=samples,
        busy_s=time.perf_counter() - start,
        completion_tokens=sum(len(s.completion_ids) for s in samples),
        dropped=dropped,
        truncated_prompts=sum(p.truncated for p in usable),
        ifd_deltas=deltas,
        warnings=warnings,
    )


@dataclass
class IFDSettings:
    """The Δ-IFD filter's settings (see `selection.DeltaIFDFilter`)."""

    band: str
    low: float
    high: float
    quantiles: tuple[float, float]
    window: int
    max_rejected_in_a_row: int


def scoring_stage(
    teacher: nn.Module | None,
    student: nn.Module,
    top_k: int | None,
    ifd: IFDSettings | None,
    bos_token_id: int | None,
    engine: EngineConfig,
) -> tuple[SampleScorer | None, DeltaIFDFilter | None]:
    """The scorer and selector a generator needs, or None for each it does not."""
    if teacher is None or (top_k is None and ifd is None):
        return None, None
    scorer = SampleScorer(
        teacher, top_k=top_k, student=student, ifd=ifd is not None, bos_token_id=bos_token_id, device=engine.device
    )
    selector = None
    if ifd is not None:
        selector = DeltaIFDFilter(ifd.band, ifd.low, ifd.high, ifd.quantiles, ifd.window, ifd.max_rejected_in_a_row)
    return scorer, selector


@dataclass
class GeneratorSpec:
    """Everything the background generator needs; picklable so a spawned process can receive it."""

    snapshot: PolicySnapshot
    prompts: PromptStream
    engine: EngineConfig
    generation_batch_size: int
    seed: int
    num_threads: int | None = None
    teacher: nn.Module | None = None  # an inference copy, for the scoring stage
    teacher_top_k: int | None = None
    ifd: IFDSettings | None = None
    bos_token_id: int | None = None


def run_generator(spec: GeneratorSpec, buffer: SampleBuffer, stop: Any, errors: Any, seed_rng: bool) -> None:
    """The generator loop: refresh weights if a newer version exists, sample a batch, hand it to the buffer.

    Runs until `stop` is set. Any exception is sent, with its traceback, through `errors` for the trainer to raise.
    """
    try:
        should_stop = stop.is_set
        if seed_rng:  # only in a process of its own: a thread would reseed the trainer's RNG
            torch.manual_seed(spec.seed)
            should_stop = _or_orphaned(stop.is_set)
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        model = copy.deepcopy(spec.snapshot.model).to(spec.engine.device)
        engine = TransformersEngine(model, spec.engine, should_stop=should_stop, record_t1=spec.ifd is not None)
        teacher = None if spec.teacher is None else copy.deepcopy(spec.teacher).to(spec.engine.device)
        scorer, selector = scoring_stage(teacher, model, spec.teacher_top_k, spec.ifd, spec.bos_token_id, spec.engine)
        version, step = -1, 0
        while not should_stop():
            loaded = spec.snapshot.load_into(model, version)
            if loaded is not None:
                version, step = loaded
            batch = generate_batch(engine, spec.prompts, spec.generation_batch_size, version, step, scorer, selector)
            if batch is None or not buffer.put(batch, should_stop):
                break
    except BaseException:
        errors.put(traceback.format_exc())


def _or_orphaned(stop_is_set: Callable[[], bool]) -> Callable[[], bool]:
    """`stop_is_set`, or the trainer process is gone.

    A trainer killed by a signal (a launcher stopping every rank after one failed, an out-of-memory kill) runs no
    cleanup, so it never sets `stop`; without this check its generator would outlive it.
    """
    parent = mp.parent_process()
    if parent is None:
        return stop_is_set
    return lambda: stop_is_set() or not parent.is_alive()


def run_remote_generator(
    engine: RemoteEngine,
    policy_lock: Any,
    policy: Callable[[], tuple[int, int]],
    prompts: PromptStream,
    generation_batch_size: int,
    scorer: SampleScorer | None,
    buffer: SampleBuffer,
    stop: Any,
    errors: Any,
) -> None:
    """The generator loop for an engine that holds its own weights: sample a batch, tag it with the version the
    engine holds (`policy()` gives it, with its step), hand it to the buffer. The policy lock is held for the whole
    batch, so a weight sync waits for the batch in flight and no batch mixes two versions."""
    try:
        while not stop.is_set():
            with policy_lock:
                version, step = policy()
                batch = generate_batch(engine, prompts, generation_batch_size, version, step, scorer)
            if batch is None or not buffer.put(batch, stop.is_set):
                break
    except BaseException:
        errors.put(traceback.format_exc())
