"""The weight snapshot: a versioned copy of the student in shared memory, which a generator process can read.

The trainer publishes new weights into it under a lock and bumps the version; the generator copies it into its
private model, under the same lock, only between two generation batches. A batch is therefore sampled entirely by
one version (no torn weights), and the trainer never waits for a generation batch to finish before it can publish.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


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

    def load_into(
        self, target: nn.Module, loaded_version: int, waiting: Callable[[], None] = lambda: None
    ) -> tuple[int, int] | None:
        """Copy the snapshot into `target` if it is newer than `loaded_version`; returns its (version, step).
        `waiting` is called while a publish holds the lock (the generator's heartbeat; it may raise to give up)."""
        if self.version == loaded_version:
            return None
        pairs = _matching_tensors(target, self.model)
        with held_while_alive(self._lock, waiting), torch.no_grad():
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
