"""The vLLM engine: TRL's own vLLM integration behind the generation stage's engine seam.

Imported only when `generation_backend="vllm"`, so the core package never imports vLLM. TRL's `VLLMGeneration`
owns the connection: in server mode a `VLLMClient` on the main process and its NCCL weight-transfer group; in
colocate mode a vLLM engine on every rank. It also owns the weight sync, which gathers DeepSpeed ZeRO-3 and FSDP
weights and merges LoRA adapters. This module only samples through it, with the settings NPD needs (the recorded
log-probs are the sampling distribution's), and turns its outputs into the generation stage's `Completion`s; a
colocated engine on CPU takes its weights through vLLM's own reload (`_VLLMGeneration`).
"""

from __future__ import annotations

from typing import Any

from trl.generation.vllm_generation import VLLMGeneration

from .engine import Completion, EngineConfig


class _VLLMGeneration(VLLMGeneration):
    """TRL's `VLLMGeneration`, except that a colocated engine on CPU takes new weights through vLLM's own reload.

    vLLM's CPU backend repacks every linear layer's weight into its GEMM kernel's layout once the checkpoint is
    loaded, and drops the parameter (`dispatch_cpu_unquantized_gemm`), so TRL's per-tensor `load_weights` finds no
    weight loader and fails. The worker's `reload_weights` puts the layers back, loads the tensors TRL gathers and
    names, and repacks them. GPU engines keep TRL's path.
    """

    def sync_weights(self) -> None:
        if self.mode != "colocate" or not _vllm_runs_on_cpu():
            super().sync_weights()
            return
        # in-process ("external_launcher"), so the worker consumes TRL's iterator directly
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
        self.llm.reset_prefix_cache()


def _vllm_runs_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def connect_vllm(model: Any, accelerator: Any, tokenizer: Any, args: Any) -> VLLMGeneration:
    """TRL's vLLM connection for this run (a collective: every rank calls it)."""
    student = accelerator.unwrap_model(model)
    if args.vllm_mode == "colocate" and not student.name_or_path:
        raise ValueError(
            "The colocated vLLM engine builds the student from its checkpoint (`model.name_or_path`), and this "
            "student has none: it was made in memory. Save it with `save_pretrained(path)` and load it with "
            "`from_pretrained(path)` (or pass the path to the trainer), or use a vLLM server (vllm_mode='server')."
        )
    vllm = _VLLMGeneration(
        model=student,
        accelerator=accelerator,
        processing_class=tokenizer,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        group_port=args.vllm_group_port,
        # Colocated tensor parallelism needs every rank of a group to generate the same prompts at the same time;
        # the generation threads of different ranks are not synchronized, so each rank's engine is whole.
        tensor_parallel_size=1,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.max_length,
        temperature=args.temperature,
        max_completion_length=args.max_new_tokens,
        logprobs=0,
    )
    if args.vllm_mode == "server" and accelerator.is_main_process:
        _check_server_logprobs(vllm.vllm_client)
    return vllm


def _check_server_logprobs(client: Any) -> None:
    """The behaviour log-probs must be those of the distribution tokens were sampled from (after temperature)."""
    config = client.get_server_info()
    mode = (config.get("model_config") or {}).get("logprobs_mode")
    if mode is not None and mode != "processed_logprobs":
        raise ValueError(
            f"The vLLM server returns {mode!r}, but NPD needs the log-probs of the distribution it sampled from, "
            "after temperature. Restart it with `--logprobs-mode processed_logprobs` (see docs/scale.md)."
        )


class VLLMEngine:
    """Samples completions with vLLM and records the behaviour log-probs; pushes the student's weights into it.

    Args:
        vllm: TRL's `VLLMGeneration` for this run.
        config: the sampling settings shared with the embedded engine (temperature, new tokens, EOS).
    """

    def __init__(self, vllm: VLLMGeneration, config: EngineConfig) -> None:
        self.vllm = vllm
        self.config = config
        eos = config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def generate(self, prompts: list[list[int]]) -> list[Completion]:
        """One completion per prompt, sampled at the configured temperature with no truncation of the vocabulary."""
        sampling = {
            "n": 1,
            "temperature": self.config.temperature,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "max_tokens": self.config.max_new_tokens,
            "logprobs": 0,  # the sampled token's log-prob only
        }
        if self.vllm.mode == "server":
            output = self.vllm.vllm_client.generate(prompts=prompts, **sampling)
            ids, logprobs = output["completion_ids"], output["logprobs"]
        else:
            from trl.generation.vllm_generation import extract_logprobs
            from vllm import SamplingParams

            outputs = self.vllm.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], sampling_params=SamplingParams(**sampling), use_tqdm=False
            )
            ids = [list(o.outputs[0].token_ids) for o in outputs]
            logprobs, _ = extract_logprobs(outputs)
        if logprobs is None or len(ids) != len(prompts):
            raise RuntimeError(
                f"vLLM returned {len(ids)} completions for {len(prompts)} prompts, "
                f"{'without' if logprobs is None else 'with'} log-probs; NPD needs one completion per prompt with "
                "the log-prob of every sampled token."
            )
        return [
            self._completion(list(c), [position[0] for position in lps]) for c, lps in zip(ids, logprobs, strict=True)
        ]

    def _completion(self, ids: list[int], logprobs: list[float | None]) -> Completion:
        if len(logprobs) != len(ids) or any(lp is None for lp in logprobs):
            raise RuntimeError("vLLM returned a completion whose log-probs do not cover every sampled token.")
        end = next((i + 1 for i, token in enumerate(ids) if token in self._eos), len(ids))
        return Completion(ids[:end], logprobs[:end])

    def sync_weights(self) -> None:
        """Push the student's current weights into vLLM (TRL's sync: gathers sharded weights, merges LoRA)."""
        self.vllm.sync_weights()
