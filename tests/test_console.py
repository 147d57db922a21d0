"""What reaches the terminal: our lines and bars there, Ray's output in <run>/logs/run.log.

Real file descriptors, a real pseudo-terminal, a real local Ray and the tiny random model.
"""

from __future__ import annotations

import io
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray import console
from selfmoa_ray.config import load_config
from selfmoa_ray.recipes.steps import stage_done
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources.models import prepare_model
from selfmoa_ray.stage_io import write_dataset

REPO = Path(__file__).resolve().parents[1]


def test_fd_output_goes_to_the_log_and_our_lines_to_the_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with console.session(tmp_path) as shown:
        os.write(2, b"core_worker.cc: straight to fd 2\n")  # what Ray's C++ core does
        os.write(1, b"a worker's forwarded line\n")  # (pytest's sys.stdout is not fd 1)
        shown.line("[iter_01/sample] done in 1.0s")
    os.write(1, b"after the run\n")
    out, err = capfd.readouterr()
    assert out.splitlines() == [
        f"log: {tmp_path / console.LOG_FILE} (Ray's output; --verbose shows it here)",
        "[iter_01/sample] done in 1.0s",
        "after the run",
    ]
    assert err == ""
    log = (tmp_path / console.LOG_FILE).read_text()
    for text in ("straight to fd 2", "a worker's forwarded line", "[iter_01/sample] done"):
        assert text in log


def test_verbose_keeps_everything_on_the_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.session(tmp_path) as shown:
        os.write(2, b"straight to fd 2\n")
        shown.line("[baseline] done in 1.0s")
    out, err = capfd.readouterr()
    assert "straight to fd 2" in err and out.splitlines() == ["[baseline] done in 1.0s"]
    assert "[baseline] done" in (tmp_path / console.LOG_FILE).read_text()


@pytest.mark.parametrize(
    ("fail", "error"),
    [('raise RuntimeError("the stage broke")', "RuntimeError: the stage broke"),
     ("os.kill(os.getpid(), signal.SIGINT); time.sleep(30)", "KeyboardInterrupt")],
)  # fmt: skip
def test_an_error_is_logged_and_reaches_the_terminal_in_full(tmp_path, fail, error):
    script = textwrap.dedent(f"""
        import os, signal, time
        from selfmoa_ray import console
        with console.session({str(tmp_path)!r}):
            os.write(2, b"ray chatter\\n")
            print("a worker's forwarded line")
            {fail}
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, console.VERBOSE_ENV: "0"})  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" in done.stderr and error in done.stderr
    assert "chatter" not in done.stderr and "forwarded" not in done.stdout
    log = (tmp_path / console.LOG_FILE).read_text()
    assert "ray chatter" in log and "forwarded line" in log and error in log


def test_the_bar_is_live_on_a_terminal_and_silent_in_a_pipe(tmp_path):
    script = textwrap.dedent(f"""
        import time
        import pyarrow as pa
        from selfmoa_ray import console
        with console.session({str(tmp_path)!r}) as shown:
            with console.row_progress("iter_01/sample", 6, tokens=True) as advance:
                for _ in range(3):
                    advance(pa.table({{"response_tokens": [8, 8]}}))
                    time.sleep(0.6)
            shown.line("[iter_01/sample] done")
    """)
    env = {**os.environ, console.VERBOSE_ENV: "0"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=follower, stdout=follower,
                            stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    screen = _read_all(leader, proc)
    assert proc.returncode == 0, screen
    assert "iter_01/sample" in screen and "6/6" in screen and "tok/s" in screen
    piped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == ""
    assert piped.stdout.splitlines()[1:] == ["[iter_01/sample] done"]


def _read_all(fd: int, proc: subprocess.Popen) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_a_stage_line_fits_a_line():
    summary = {f"key_{i}": i * 1.2345678 for i in range(30)} | {"by_category": {"a": 1}}
    text = io.StringIO()
    with console.using(console.Console(out=text, err=io.StringIO())):
        stage_done(None, {"status": "done", "seconds": 3.21, "summary": summary}, "iter_01/x")
    line = text.getvalue().rstrip("\n")
    assert line.startswith("[iter_01/x] done in 3.2s key_0=0 key_1=1.235 ")
    assert len(line) == console.MAX_LINE and line.endswith("…") and "by_category" not in line


def test_a_ray_task_advances_the_driver_bar(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def work(channel: console.ProgressChannel, steps: int) -> int:
        for step in range(1, steps + 1):
            channel.report(step, steps, loss=1.0 / step)
        return steps

    screen = io.StringIO()
    live = console.Console(out=io.StringIO(), err=screen, live=True)
    with console.using(live), console.remote_progress("iter_01/train") as channel:
        assert channel is not None
        assert ray.get(work.remote(channel, 4)) == 4
    assert "iter_01/train" in screen.getvalue() and "4/4" in screen.getvalue()
    assert "loss=0.25" in screen.getvalue()
    # No live console (a pipe, --verbose): no bar, no queue actor, and workers skip reporting.
    quiet = console.Console(out=io.StringIO(), err=io.StringIO())
    with console.using(quiet), console.remote_progress("iter_01/train", 4) as channel:
        assert channel is None


def test_write_dataset_streams_blocks_into_a_parquet_folder(tmp_path, ray_local):
    ray = ray_local
    run = RunDir.create(tmp_path / "run", load_config("tiny"))
    blocks = [
        pa.table({"id": ["a", "b"], "note": pa.array([None, None], pa.null())}),
        pa.table({"id": ["c"], "note": ["kept"]}),
    ]
    screen = io.StringIO()
    live = console.Console(out=io.StringIO(), err=screen, live=True)
    with console.using(live):
        write_dataset(ray.data.from_arrow(blocks), run, "out.parquet", total=3, label="stage")
    assert "stage" in screen.getvalue() and "3/3" in screen.getvalue()
    table = pq.read_table(run.path("out.parquet")).sort_by("id")
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("note").to_pylist() == [None, None, "kept"]
    assert sorted(r["id"] for r in ray.data.read_parquet(str(run.path("out.parquet"))).take_all())
    assert not [p for p in run.root.rglob(".*tmp-*")]
    write_dataset(ray.data.from_arrow(blocks).filter(lambda r: False), run, "empty.parquet")
    assert pq.read_table(run.path("empty.parquet")).num_rows == 0


def _selfmoa(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [str(Path(sys.executable).parent / "selfmoa"), *args], cwd=cwd, capture_output=True,
        text=True, timeout=900, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_a_failing_run_says_why_on_the_terminal(tmp_path):
    """Bad weights that only loading finds (the pre-flight checks files by name): the run fails
    inside Ray, the terminal says why and where the log is, Ray's own lines stay in that log."""
    model = tmp_path / "model"
    shutil.copytree(prepare_model("tiny-random"), model)
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    done = _selfmoa("evaluate", "--config", "tiny", "--output-dir", str(tmp_path / "run"),
                    f"policy.source={model}", cwd=tmp_path)  # fmt: skip
    assert done.returncode != 0
    log = tmp_path / "run" / console.LOG_FILE
    assert f"the run's full output: {log}" in done.stderr
    assert "Error while deserializing header" in done.stderr.strip().splitlines()[-1]
    assert "INFO" not in done.stdout + done.stderr  # Ray's lines stayed in the log
    assert "Started a local Ray instance" in log.read_text()


def test_a_bad_prompt_file_fails_before_the_run(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    done = _selfmoa("evaluate", "--config", "tiny", "--output-dir", str(tmp_path / "run"),
                    "--prompts", str(bad), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"selfmoa: error: data.eval_files: {bad}, line 2: invalid JSON (Expecting value)"
    )
    assert not (tmp_path / "run").exists()
