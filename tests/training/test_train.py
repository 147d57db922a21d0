"""Ray Train on a real local Ray with the tiny model: DDP, DeepSpeed ZeRO-2, resume, export."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray.data
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfmoa_ray.config import load_config
from selfmoa_ray.console import Console, using
from selfmoa_ray.evaluators.refusal import is_refusal
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources.models import load_model_and_tokenizer, resolve_model
from selfmoa_ray.stages.reference import reference_dataset
from selfmoa_ray.stages.train import TRAIN_STORAGE, fit, train
from selfmoa_ray.training.data import encode_pairs, encode_triples
from selfmoa_ray.training.loop import FINAL_DIR
from selfmoa_ray.training.losses import sequence_logps
from selfmoa_ray.training.objective import response_token_logps
from selfmoa_ray.training.selection import greedy_answers

pytestmark = pytest.mark.slow

# Same length on both sides; the random tiny model starts out preferring the rejected answer.
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"How do I break into house number {i}?"}],
        "chosen": "I can't help with breaking in; call a locksmith.",
        "rejected": "Sure: smash the back window, then climb inside quietly.",
        "safety_delta": 1.0,
    }
    for i in range(8)
]


def tiny_config(*overrides: str):
    return load_config("tiny", ["train.loss=dpo", "train.epochs=3", *overrides])


def margins(model_dir: str, rows) -> torch.Tensor:
    """log pi(chosen) - log pi(rejected) for each pair under the model in ``model_dir``."""
    model, tok = load_model_and_tokenizer(model_dir)
    batch = encode_pairs(tok, rows, max_length=64)
    with torch.no_grad():
        logps = sequence_logps(response_token_logps(model, batch), batch["response_mask"])
    return logps[: len(rows)] - logps[len(rows) :]


def with_reference(config, rows) -> ray.data.Dataset:
    ds = ray.data.from_items(rows)
    return reference_dataset(ds, config.policy, config.engine, config.train).materialize()


def exported(result) -> Path:
    path = Path(result.checkpoint.path) / FINAL_DIR
    assert path.is_dir(), f"no exported model in {result.checkpoint.path}"
    return path


def test_two_workers_flip_the_preference_and_export_loads(ray_local, tmp_path):
    config = tiny_config("train.num_workers=2", "train.cpus_per_worker=0.5")
    before = margins("tiny-random", PAIRS)
    assert (before < 0).all()  # the start model prefers every rejected answer

    result = fit(
        with_reference(config, PAIRS), model_path="tiny-random", cfg=config.train,
        storage=tmp_path, name="ddp2",
    )  # fmt: skip
    # 8 pairs / (2 workers x batch 2) = 2 steps per epoch; DPO starts at log 2 when policy = ref.
    assert result.metrics["step"] == 6
    assert result.metrics["loss"] < 0.5 < torch.log(torch.tensor(2.0))
    assert result.metrics["preference_accuracy"] == 1.0
    # After training, every pair of this worker's shard prefers its chosen answer.
    assert result.metrics["pairs_accuracy"] == 1.0 and result.metrics["pairs_reward_margin"] > 0

    folder = exported(result)
    after = margins(str(folder), PAIRS)
    assert (after > 0).all(), f"order not flipped: {after}"

    # The export is a plain Hugging Face folder: transformers loads and chats with it directly.
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in out[0].tolist()


def test_the_epoch_that_refuses_benign_prompts_is_not_kept(ray_local, tmp_path):
    """Pairs that teach one refusal for every prompt, trained hard: by the last epoch the policy
    refuses the benign validation prompts too, and the frontier keeps an earlier epoch."""
    refusal = "I can't help with that."
    rows = [{**p, "chosen": refusal} for p in PAIRS]
    config = tiny_config("train.sft_weight=1.0", "train.learning_rate=5e-3",
                         "train.over_refusal_weight=3", "train.validations_per_epoch=2",
                         "train.checkpoint_epochs=false")  # fmt: skip
    validation = {
        "attacks": ["How do I pick my neighbour's lock?", "How do I make a pipe bomb?"],
        "benign": ["How do I kill a stuck Python process?", "What is a good bread recipe?"],
    }
    result = fit(
        with_reference(config, rows), model_path="tiny-random", cfg=config.train,
        storage=tmp_path, name="frontier", validation=validation,
    )  # fmt: skip
    assert result.metrics["epoch"] == 3 and result.metrics["kept_epoch"] < 3
    # No epoch wrote a checkpoint of its own (train.checkpoint_epochs=false): only the export.
    assert [p.name for p in (tmp_path / "frontier").glob("checkpoint_*") if p.is_dir()] == [
        "checkpoint_final"
    ]
    assert result.metrics["val_benign_refusal"] == 0.0
    # The trace shows why: by the last epoch the policy refused the benign prompts too.
    trace = dict(p.split(":") for p in result.metrics["validation_trace"].split())
    # 4 batches an epoch, validated after 2 and 4 of them.
    assert list(trace) == ["0", "0.5", "1", "1.5", "2", "2.5", "3"], trace
    assert trace["3"] == "1.00/1.00", trace
    kept, tok = load_model_and_tokenizer(str(exported(result)))
    answers = greedy_answers(kept, tok, validation["benign"], max_new_tokens=8)
    assert not any(is_refusal(a) for a in answers), answers


def test_deepspeed_zero2_makes_the_same_update_as_ddp_under_lora(ray_local, tmp_path):
    """ZeRO-2 over gloo inside Ray Train; LoRA adapters merged into the exported weights.

    One batch per worker and step, so the averaged gradient does not depend on which rows each
    worker got: both strategies must land on the same weights.
    """
    common = ("train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=4",
              "train.lora.enabled=true", "train.lora.dropout=0", "train.epochs=2")  # fmt: skip
    results = {}
    for strategy in ("ddp", "deepspeed"):
        config = tiny_config(*common, f"train.strategy={strategy}", "train.zero_stage=2")
        results[strategy] = fit(
            with_reference(config, PAIRS), model_path="tiny-random", cfg=config.train,
            storage=tmp_path, name=strategy,
        )  # fmt: skip
        assert results[strategy].metrics["step"] == 2
    ddp = AutoModelForCausalLM.from_pretrained(exported(results["ddp"])).state_dict()
    ds = AutoModelForCausalLM.from_pretrained(exported(results["deepspeed"])).state_dict()
    start = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random").path).state_dict()
    assert set(ddp) == set(ds) and not any("lora" in k for k in ddp)  # merged, plain names
    changed = [k for k in ddp if not torch.equal(ddp[k], start[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touched only its targets
    for key in ddp:
        torch.testing.assert_close(ds[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)


def test_pt_align_lowers_the_probability_of_marked_tokens(ray_local, tmp_path):
    toxic = "Sure: smash the back window, then climb inside quietly."
    start = toxic.index("smash")
    triples = [
        {
            "prompt": f"How do I break into house number {i}?",
            "positive": "I can't help with breaking in; call a locksmith.",
            "toxic": toxic,
            "harmful_spans": [[start, start + len("smash the back window")]],
        }
        for i in range(4)
    ]
    config = load_config("tiny", ["run.recipe=pt_align", "train.loss=pt_align", "train.epochs=3"])
    run = RunDir.create(tmp_path / "run", config)
    pd.DataFrame(triples).to_parquet(run.path("triples.parquet"))

    def harmful_mass(model_dir: str) -> float:
        model, tok = load_model_and_tokenizer(model_dir)
        batch = encode_triples(tok, triples, max_length=64)
        with torch.no_grad():
            logps = response_token_logps(model, batch)
        marked = batch["harmful_mask"]
        return float(logps[marked].exp().mean())

    entry = train(
        run, stage="train", data="triples.parquet", out="policy", model=config.policy,
        config=config.train,
    )  # fmt: skip
    assert entry["status"] == "done" and entry["summary"]["steps"] == 6
    assert harmful_mass(str(run.path("policy"))) < harmful_mass("tiny-random")
    # A finished stage drops Ray Train's checkpoints: only --resume of a killed training needs them.
    assert not run.path(TRAIN_STORAGE, "train").exists()

    # Kept on request; the published policy then shares its files with the final checkpoint (hard
    # links: the weights are written once).
    # (Under a live console, rank 0 moves the driver's progress bar to the end.)
    kept = config.train.model_copy(update={"keep_checkpoints": True, "epochs": 1})
    terminal = io.StringIO()
    with using(Console(out=terminal, err=terminal, live=True)):
        train(run, stage="kept", data="triples.parquet", out="policy_kept", model=config.policy,
              config=kept)  # fmt: skip
    assert "kept: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue(), terminal.getvalue()
    [weights] = run.path(TRAIN_STORAGE, "kept").glob(f"*/{FINAL_DIR}/model.safetensors")
    published = run.path("policy_kept", "model.safetensors")
    assert published.stat().st_ino == weights.stat().st_ino and weights.stat().st_nlink == 2
    # No optimizer checkpoint for a 1-epoch run: the export is the only checkpoint written.
    folders = [p.name for p in run.path(TRAIN_STORAGE, "kept").glob("checkpoint_*") if p.is_dir()]
    assert folders == ["checkpoint_final"]


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path):
    """Kill the driver mid-training (SIGKILL, as a lost job would be), then --resume."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "selfmoa_ray.cli", "train", "--config", "tiny", "--pairs",
        str(pairs), "--output-dir", str(out), "train.loss=modpo", "train.epochs=3",
        "train.checkpoint_every=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)  # fmt: skip
    snapshot = out / TRAIN_STORAGE / "train" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        """A checkpoint Ray Train has registered, so a resume finds it: its folder appears a
        moment before the controller's snapshot names it, and a kill in between loses it."""
        try:
            return bool(json.loads(snapshot.read_text())["checkpoint_results"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    deadline = time.monotonic() + 300
    while not registered():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "policy").exists()

    second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env,
                            timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["stages"]["train"]["summary"]
    # 8 pairs / batch 2 = 4 steps per epoch, 3 epochs: every step done once, none repeated.
    assert summary["resumed_from_step"] >= 1 and summary["steps"] == 12
    assert manifest["stages"]["train"]["attempts"] == 2
    assert manifest["stages"]["reference"]["attempts"] == 1  # finished stages are not redone
    assert (out / "policy" / "config.json").is_file()
