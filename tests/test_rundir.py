import json
import multiprocessing as mp
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.rundir import RunDir, RunDirError, atomic_path, atomic_write, write_parquet


def _write_forever(path: str, started) -> None:
    with atomic_write(path) as fh:
        fh.write("partial ")
        fh.flush()
        started.set()
        time.sleep(60)


def test_killed_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.txt"
    started = mp.get_context("fork").Event()
    proc = mp.get_context("fork").Process(target=_write_forever, args=(str(target), started))
    proc.start()
    assert started.wait(10)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not target.exists()


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "data.json"
    target.write_text('{"old": true}')
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write('{"new": ')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_atomic_folder_replaces_whole(tmp_path):
    target = tmp_path / "policy"
    for version in ("v1", "v2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights.txt").write_text(version)
    assert (target / "weights.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_parquet_round_trip(tmp_path):
    write_parquet(tmp_path / "t.parquet", pa.table({"id": ["a", "b"], "x": [1, 2]}))
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == [
        {"id": "a", "x": 1},
        {"id": "b", "x": 2},
    ]


def test_manifest_records_provenance(tmp_path):
    config = load_config("tiny")
    run = RunDir.create(tmp_path / "run", config)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"] == config.to_dict()
    assert manifest["config_fingerprint"] == config.fingerprint()
    assert {"python", "torch", "ray", "transformers"} <= set(manifest["versions"])
    assert manifest["seeds"] == {"run": 0}
    assert "revision" in manifest["git"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert run.config().fingerprint() == config.fingerprint()


def test_stage_status_survives_a_restart(tmp_path):
    config = load_config("tiny")
    root = tmp_path / "run"
    run = RunDir.create(root, config)
    calls = []

    def stage_a():
        calls.append("a")
        write_parquet(run.path("a.parquet"), pa.table({"x": [1]}))
        return {"rows": 1}

    def stage_b():
        calls.append("b")
        raise RuntimeError("killed")

    run.run_stage("a", ["a.parquet"], stage_a)
    with pytest.raises(RuntimeError):
        run.run_stage("b", ["b.parquet"], stage_b)

    # A new process opens the same folder: a is done and skipped, b failed and runs again.
    again = RunDir.create(root, config, resume=True)
    assert again.stage_status("a") == "done" and again.is_done("a")
    assert again.stage_status("b") == "failed" and not again.is_done("b")
    assert "killed" in again.manifest["stages"]["b"]["error"]
    again.run_stage("a", ["a.parquet"], stage_a)
    assert calls == ["a", "b"]
    assert again.manifest["stages"]["a"]["summary"] == {"rows": 1}
    assert again.manifest["stages"]["a"]["seconds"] >= 0
    assert len(again.manifest["resumed"]) == 1


def test_resume_sweeps_what_a_killed_writer_left_half_written(tmp_path):
    root = tmp_path / "run"
    config = load_config("tiny")
    RunDir.create(root, config)
    half_file = root / ".manifest.json.tmp-0123abcd"
    half_folder = root / "iter_01" / ".responses.parquet.tmp-89abcdef"
    ray_owned = root / "ray_train" / "iter_01" / ".state.tmp-0123abcd"
    keep = root / "iter_01" / ".notes.tmp-not-ours"
    for folder in (half_folder, ray_owned.parent):
        folder.mkdir(parents=True)
    (half_folder / "part-0.parquet").write_text("partial")
    for path in (half_file, ray_owned, keep):
        path.write_text("x")

    RunDir.create(root, config, resume=True)
    assert not half_file.exists() and not half_folder.exists()
    assert ray_owned.exists() and keep.exists()


def test_stage_reruns_when_its_output_vanished(tmp_path):
    run = RunDir.create(tmp_path / "run", load_config("tiny"))
    calls = []

    def stage():
        calls.append(1)
        run.path("o.txt").write_text("x")

    run.run_stage("s", ["o.txt"], stage)
    run.path("o.txt").unlink()
    run.run_stage("s", ["o.txt"], stage)
    assert len(calls) == 2


def test_stage_must_write_its_outputs(tmp_path):
    run = RunDir.create(tmp_path / "run", load_config("tiny"))
    with pytest.raises(RunDirError, match="without writing"):
        run.run_stage("s", ["never.parquet"], lambda: None)
    assert run.stage_status("s") == "failed"


def test_existing_run_needs_resume_and_same_config(tmp_path):
    root = tmp_path / "run"
    RunDir.create(root, load_config("tiny"))
    with pytest.raises(RunDirError, match="--resume"):
        RunDir.create(root, load_config("tiny"))
    with pytest.raises(RunDirError, match="config .* differs"):
        RunDir.create(root, load_config("tiny", ["train.beta=0.3"]), resume=True)
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir.open(tmp_path)
