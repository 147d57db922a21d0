"""The trained policy as a plain Hugging Face folder that transformers, vLLM and Ray Serve load.

LoRA adapters are merged into the base weights (no peft needed to load the result); the tokenizer
and its chat template are saved beside the weights, so chat prompts render exactly as in training.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The model with LoRA adapters folded in (a no-op for full fine-tuning)."""
    if hasattr(model, "merge_and_unload"):  # a peft PeftModel
        return model.merge_and_unload()
    return model


def gathered(model: torch.nn.Module, zero_stage: int | None) -> contextlib.AbstractContextManager:
    """Under ZeRO-3 each rank holds a slice of every weight: gather them (on all ranks) to save."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def export_hf(model: torch.nn.Module, tokenizer: Any, directory: Path) -> Path:
    """Save merged weights (safetensors), config, generation config and tokenizer to ``directory``."""
    model = merged(model)
    model.config.use_cache = True
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
