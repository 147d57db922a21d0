"""benchmarks/loop.py's pure parts, on small real files: run folders of both code versions (the
manifest and metrics of a real ``demo`` run of commit 2037443, and ``tiny`` runs of the old and the
new code), SmolLM2's config, /proc. The benchmark itself (two whole loops, ~5 min even with
``--quick``) is not run here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfmoa_ray.sources.models import resolve_model

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"

spec = importlib.util.spec_from_file_location("loop_benchmark", REPO / "benchmarks" / "loop.py")
loop = importlib.util.module_from_spec(spec)
sys.modules["loop_benchmark"] = loop
spec.loader.exec_module(loop)


def test_reads_the_old_demo_run():
    run = loop.read_run(DATA / "old-demo")
    assert run["iteration"] == "iter_01"
    assert (run["prompts"], run["responses"], run["guided_responses"]) == (48, 288, 144)
    assert run["response_tokens"] == 12198
    assert run["sample_s"] == pytest.approx(282.766)
    assert run["ref_pairs"] == 45
    assert run["train_pairs"] == 44  # 11 full batches of 4, one epoch
    assert run["train_steps"] == 11
    assert run["train_in_loop_pairs_per_s"] is None  # 2037443 does not report it
    assert run["baseline_eval_s"] == pytest.approx(67.486)
    stages = [s for k, s in run["stages_s"].items() if k.startswith("iter_01/")]
    assert run["iteration_s"] == pytest.approx(sum(stages))
    assert run["quality"]["baseline"] == {
        "safety": 0.6, "string_refusal": 0.025, "over_refusal": 0.0,
        "string_over_refusal": 0.0, "helpfulness": 0.7569,
    }  # fmt: skip
    assert run["quality"]["iteration"]["safety"] == 0.675
    assert run["quality"]["iteration"]["string_refusal"] == 0.175


def test_reads_both_versions_alike(tmp_path):
    old, new = loop.read_run(DATA / "old-tiny"), loop.read_run(DATA / "new-tiny")
    for run in (old, new):
        assert (run["prompts"], run["responses"], run["ref_pairs"], run["train_pairs"]) == (
            16, 32, 16, 16,
        )  # fmt: skip
    assert old["train_in_loop_pairs_per_s"] is None
    assert new["train_in_loop_pairs_per_s"] == pytest.approx(0.5772, abs=1e-4)
    # Without metrics.json the held-out figures come from the evaluate stages' summaries.
    (tmp_path / "manifest.json").write_bytes((DATA / "old-demo" / "manifest.json").read_bytes())
    fallback = loop.read_run(tmp_path)["quality"]
    assert fallback == loop.read_run(DATA / "old-demo")["quality"]


def test_pairs_trained_counts_full_batches_per_worker():
    assert loop.pairs_trained(45, {"batch_size": 4, "num_workers": 1, "epochs": 1}) == 44
    assert loop.pairs_trained(45, {"batch_size": 4, "num_workers": 2, "epochs": 3}) == 120
    assert loop.pairs_trained(3, {"batch_size": 4}) == 0


def test_smollm2_shape_and_flops():
    shape = loop.model_shape(str(DATA / "smollm2-config"))
    assert shape.params == 134_515_008  # ~134.5M, the embedding tied to the lm_head
    assert shape.head == 49152 * 576
    assert shape.body == shape.params - shape.head
    # one prompt of 10 tokens, two answers of 3 tokens: prefill once (logits at its end), then
    # 2 more tokens per answer, each a full forward with logits
    flops = loop.generation_flops(shape, [10], [3, 3])
    assert flops == 2 * (shape.body * 10 + shape.head) + 2 * shape.params * 4
    assert loop.scoring_flops(shape, [(12, 5)]) == 2 * (shape.body * 12 + shape.head * 5)


def test_work_flops_of_a_real_run():
    figures = loop.read_run(DATA / "old-tiny")
    flops = loop.work_flops(DATA / "old-tiny", figures)
    shape = loop.model_shape(resolve_model("tiny-random").path)  # built on first use
    assert flops["params"] == shape.params
    generated = 256  # the sample stage's response_tokens
    assert 2 * shape.body * generated < flops["sample"]
    assert flops["train"] == pytest.approx(3 * flops["reference"])  # full fine-tune, all 16 pairs
    assert loop.stage_dtypes(figures) == {"sample": "float32", "reference": "float32",
                                          "train": "float32"}  # fmt: skip


def test_encoded_lengths_truncate_like_the_trainer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-random").path)
    prompt = [{"role": "user", "content": "Tell me a story."}]
    n, r = loop.encoded_lengths(tokenizer, prompt, "Once upon a time.", max_length=512)
    assert 0 < r < n < 100
    long = " ".join(["word"] * 300)
    assert loop.encoded_lengths(tokenizer, prompt, long, max_length=64)[0] == 64
    n, r = loop.encoded_lengths(tokenizer, [{"role": "user", "content": long}], "Hi.", 64)
    assert n == 32 + r  # a long prompt keeps its last half


DISKSTATS = """\
   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 99087 29169 6319954 44596 12447 101763 14455104 65523 0 31488 110940 8568 10 2416840 807 379 14
 254       1 vda1 9087 169 319954 4596 2447 1763 455104 6523 0 3148 11094 0 0 0 0 0 0
 253       0 zram0 0 0 0 0 0 0 0 77 0 0 0 0 0 0 0 0 0
"""


def test_diskstats_counts_whole_disks_only(tmp_path):
    assert loop.sectors_written(DISKSTATS, {"vda"}) == 14455104
    assert loop.sectors_written(DISKSTATS, set()) == 0
    devices = tmp_path / "devices"
    for target in ("pci0000:00/virtio1/block/vda", "virtual/block/loop0", "virtual/block/zram0"):
        (devices / target).mkdir(parents=True)
    block = tmp_path / "block"
    block.mkdir()
    for name, target in (("vda", "pci0000:00/virtio1/block/vda"), ("loop0", "virtual/block/loop0"),
                         ("zram0", "virtual/block/zram0")):  # fmt: skip
        (block / name).symlink_to(devices / target)
    assert loop.whole_disks(block) == {"vda"}
    assert loop.whole_disks(tmp_path / "missing") == set()


def test_size_on_disk_follows_nothing_and_counts_hard_links_once(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 2**20)
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "a.bin").write_bytes(b"y" * 2**16)
    os.link(run / "sub" / "a.bin", run / "b.bin")
    (run / "link").symlink_to(outside)
    size = loop.size_on_disk(run)
    assert 2**16 <= size < 2**20


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="no per-process I/O accounting")
def test_tree_writes_sees_a_grandchild(tmp_path):
    target = tmp_path / "out.bin"
    script = f"sh -c 'head -c 1048576 /dev/zero > {target}; sleep 1'"
    proc = subprocess.Popen(["sh", "-c", script])
    watch = loop.TreeWrites(proc.pid, interval=0.05)
    watch.start()
    time.sleep(0.2)
    assert proc.pid in [pid for pid, _ in loop.descendants(os.getpid())]
    proc.wait()
    written, _ = watch.stop()
    assert written >= 2**20


def test_the_old_tree_wins_over_the_editable_install(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{loop.BASELINE_REV}^{{commit}}"],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip(f"{loop.BASELINE_REV} is not in this clone (shallow?)")
    loop.export_revision(loop.BASELINE_REV, tmp_path / "old")
    side = loop.Side("old", tmp_path / "old", "test")
    loop.check_imports(side, ray_worker=False)  # raises SystemExit otherwise
    assert side.env()["PYTHONPATH"] == str(tmp_path / "old")
    assert side.env()["HF_HUB_OFFLINE"] == "1"
