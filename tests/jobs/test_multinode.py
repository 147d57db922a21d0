"""Several Ray nodes on one machine (tests/jobs/multinode_driver.py, in its own process): work
spreads over the worker nodes, and removing a worker node mid-run loses nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_work_spreads_and_a_removed_node_loses_nothing(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(HERE / "multinode_driver.py"), str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("FINDINGS "))
    findings = json.loads(line.removeprefix("FINDINGS "))

    removal = findings["removal"]
    # Two engine actors per pool, two worker nodes, nothing on the head: engines on both workers.
    assert removal["engine_nodes"] == findings["worker_nodes"]
    assert removal["removed_during"] is not None, "no stage ran with an engine on the victim"
    assert removal["driver_attempts"] <= 2  # Ray's retries, or at most one resume
    assert findings["alive_nodes"] == 2  # the head and the surviving worker

    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    assert manifest["loop"]["iterations_done"] == 1
    # Every row exactly once, though a node died under one of the stages.
    baseline = pq.read_table(out / "baseline/eval_responses.parquet").column("id").to_pylist()
    assert len(baseline) == len(set(baseline)) == 16  # 8 harmful + 8 benign held-out prompts
    prompts = pq.read_table(out / "iter_01/prompts.parquet").column("id").to_pylist()
    table = pq.read_table(out / "iter_01/responses.parquet", columns=["id", "sample_index"])
    keys = sorted(zip(*table.to_pydict().values(), strict=True))
    assert keys == sorted((p, k) for p in prompts for k in range(2))
    assert (out / "iter_01/policy/config.json").exists()
