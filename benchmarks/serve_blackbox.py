"""Black-box run of the served apps, as an attacker with a key and a careless operator would try them.

Starts ``selfmoa serve`` with the shipped ``serve_apps/serve_config.yaml`` (two replicas of each
app, ``--policy tiny-random --judge-config tiny``) on 127.0.0.1 with a fresh API key, then acts
only from outside, through HTTP and process signals:

1. **Replica kill under load.** ``--clients`` clients loop short chat requests; after 10 s one
   policy replica's process gets SIGKILL. Reported: the answers that failed, the seconds from the
   kill to the last failure, and when the replacement replica's process appeared.
2. **Worst requests.** The reproduction of issue 19's stall (a 1,000,000-character ``stop``,
   streamed, ``max_tokens`` 8) timed on its own; then the largest requests the limits allow (64
   messages of 16,000 characters; 4 choices of 512 tokens with 4 stops of 256 characters; one such
   choice streamed; 64 evaluation items of 2 x 8,000 characters), for ``--worst-s`` seconds one at
   a time, then for as long with two clients per kind (every replica busy), while both apps'
   ``/healthz`` are polled every 50 ms. Reported: status counts and health-check latencies.
3. **Burst.** ``--burst`` chat and evaluation requests sent at once: status counts, whether every
   shed request carried ``Retry-After``, and how long until the apps answer normally again.
4. **Fuzzing** (with ``--schemathesis PATH``, the ``st`` command of a schemathesis install of your
   own; it is not a project dependency): ``st run`` against each app's OpenAPI document for
   ``--fuzz-s`` seconds with all checks (``benchmarks/schemathesis.toml`` counts our 413s as
   rejections); the status counts come from its HAR report, failures from its output.

    .venv/bin/python benchmarks/serve_blackbox.py                       # phases 1-3, ~3 min
    .venv/bin/python benchmarks/serve_blackbox.py --schemathesis /tmp/st-venv/bin/st --fuzz-s 300

The figures print as JSON as each phase ends, and all of them go to ``--out``. Latencies are the client's, on the same
machine as the server: on a 2-core machine the load generator competes with the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import httpx

REPO = Path(__file__).resolve().parents[1]
POLICY_REPLICA = "ServeReplica:policy:PolicyDeployment"
HEALTH_PERIOD_S = 0.05


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, key: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "serve_apps.launch", "--policy", "tiny-random",
               "--judge-config", "tiny", "--port", str(port), "--timeout", "600"]  # fmt: skip
    env = {**os.environ, "SELFMOA_API_KEYS": key}
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, root: str, log: Path, timeout_s: float = 600) -> None:
    """Until Serve reports both apps running (the launcher prints its URLs then)."""
    deadline = time.monotonic() + timeout_s
    while "Ctrl-C" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"selfmoa serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    for path in ("/policy/healthz", "/evaluator/healthz"):
        httpx.get(root + path, timeout=30).raise_for_status()


def replica_pids(name: str) -> set[int]:
    """Processes whose title names the replica (Ray sets ``ray::<actor>`` as the title)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if name in line}


# --------------------------------------------------------------------------- requests


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi"}], **extra}


LARGEST_PROMPT = chat_body(messages=[{"role": "user", "content": "a " * 8000}] * 64, max_tokens=8)
LARGEST_GENERATION = chat_body(n=4, max_tokens=512, stop=["x" * 256] * 4)
LARGEST_STREAM = chat_body(max_tokens=512, stop=["x" * 256] * 4, stream=True)  # n=1 when streamed
LARGEST_EVALUATION = {"items": [{"prompt": "p" * 8000, "response": "r" * 8000}] * 64}
ISSUE_STOP = chat_body(stop="s" * 1_000_000, max_tokens=8, stream=True)


class Answer(NamedTuple):
    status: int  # 0 for a connection error
    seconds: float  # until the (streamed) body was read to its end
    retry_after: str | None


async def send(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Answer:
    t0 = time.monotonic()
    try:
        async with client.stream("POST", path, json=body) as r:
            await r.aread()
            return Answer(r.status_code, time.monotonic() - t0, r.headers.get("retry-after"))
    except httpx.HTTPError:
        return Answer(0, time.monotonic() - t0, None)


async def probe_health(root: str, path: str, stop: asyncio.Event) -> list[float]:
    """Latencies of ``GET path`` every 50 ms until ``stop``; a failed probe counts as +inf."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=root, timeout=30) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                ok = (await client.get(path)).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.monotonic() - t0 if ok else float("inf"))
            await asyncio.sleep(HEALTH_PERIOD_S)
    return latencies


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    return {"probes": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1)}  # fmt: skip


# --------------------------------------------------------------------------- phases


CHAT = "/policy/v1/chat/completions"
WORST = [(CHAT, LARGEST_PROMPT, "largest prompt"), (CHAT, LARGEST_GENERATION, "largest generation"),
         (CHAT, LARGEST_STREAM, "largest stream"),
         ("/evaluator/v1/evaluate", LARGEST_EVALUATION, "largest evaluation")]  # fmt: skip


async def under_worst(
    root: str, client: httpx.AsyncClient, seconds: float, copies: int
) -> dict[str, Any]:
    """``copies`` clients per kind of worst request for ``seconds``, both healthz probed."""
    stop = asyncio.Event()
    probes = [asyncio.create_task(probe_health(root, f"/{app}/healthz", stop))
              for app in ("policy", "evaluator")]  # fmt: skip
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def loop(kinds: list[tuple[str, dict[str, Any], str]]) -> None:
        while time.monotonic() < deadline:
            for path, body, label in kinds:
                statuses[f"{label} {(await send(client, path, body)).status}"] += 1

    # copies=0: one client sending the worst requests one after another.
    await asyncio.gather(*([loop(WORST)] if copies == 0 else
                           [loop([kind]) for kind in WORST for _ in range(copies)]))  # fmt: skip
    stop.set()
    policy_health, evaluator_health = await asyncio.gather(*probes)
    return {"statuses": dict(sorted(statuses.items())),
            "policy_healthz": latency_summary(policy_health),
            "evaluator_healthz": latency_summary(evaluator_health)}  # fmt: skip


async def worst_requests(root: str, headers: dict[str, str], seconds: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=120) as client:
        issue = await send(client, CHAT, ISSUE_STOP)
        return {
            "issue_reproduction": {"status": issue.status, "seconds": round(issue.seconds, 3)},
            "one_at_a_time": await under_worst(root, client, seconds, copies=0),
            # Two clients per kind: every replica is busy with worst requests at all times.
            "saturated": await under_worst(root, client, seconds, copies=2),
        }


async def burst(root: str, headers: dict[str, str], n: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2 * n)
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=120, limits=limits) as c:
        t0 = time.monotonic()
        answers = await asyncio.gather(
            *[send(c, CHAT, chat_body(max_tokens=16)) for _ in range(n)],
            *[send(c, "/evaluator/v1/evaluate", {"items": [{"prompt": "p", "response": "r"}]})
              for _ in range(n)],
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        t1 = time.monotonic()
        while (await send(c, CHAT, chat_body(max_tokens=4))).status != 200:
            await asyncio.sleep(0.1)
        shed = [a.retry_after for a in answers if a.status == 503]
    return {"requests": 2 * n, "statuses": dict(Counter(a.status for a in answers)),
            "seconds": round(elapsed, 1), "shed_with_retry_after": sum(a is not None for a in shed),
            "retry_after_values": sorted({a for a in shed if a}),
            "first_normal_answer_after_s": round(time.monotonic() - t1, 2)}  # fmt: skip


async def replica_kill(root: str, headers: dict[str, str], clients: int) -> dict[str, Any]:
    before = replica_pids(POLICY_REPLICA)
    if len(before) != 2:
        raise SystemExit(f"expected two policy replicas, found processes {sorted(before)}")
    victim = min(before)
    events: list[tuple[float, int]] = []  # (seconds since the kill, status)
    killed_at = time.monotonic() + 10
    deadline = killed_at + 50
    replacement: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=120) as client:

        async def loop() -> None:
            while time.monotonic() < deadline:
                answer = await send(client, CHAT, chat_body(max_tokens=16))
                events.append((time.monotonic() - killed_at, answer.status))

        async def kill_and_watch() -> None:
            await asyncio.sleep(max(0.0, killed_at - time.monotonic()))
            os.kill(victim, signal.SIGKILL)
            while not replacement and time.monotonic() < deadline:
                if new := replica_pids(POLICY_REPLICA) - before:
                    replacement.update(pid=min(new), after_s=round(time.monotonic() - killed_at, 2))
                await asyncio.sleep(0.1)

        await asyncio.gather(kill_and_watch(), *[loop() for _ in range(clients)])
    after = [(t, s) for t, s in events if t >= 0]
    failures = [(t, s) for t, s in after if s != 200]
    return {"clients": clients, "requests_before_kill": len(events) - len(after),
            "failed_before_kill": sum(s != 200 for t, s in events if t < 0),
            "requests_after_kill": len(after),
            "failed_after_kill": dict(Counter(s for _, s in failures)),
            "last_failure_after_kill_s": round(max((t for t, _ in failures), default=0.0), 2),
            "replicas_before": sorted(before), "killed": victim,
            "replacement_process": replacement or None}  # fmt: skip


def fuzz(st: str, root: str, key: str, seconds: float, workdir: Path) -> dict[str, Any]:
    """``st run`` against each app's OpenAPI document; statuses counted from its HAR report."""
    results: dict[str, Any] = {}
    for app in ("policy", "evaluator"):
        report = workdir / f"st-{app}"
        command = [st, "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
                   f"{root}/{app}/openapi.json", "--url", f"{root}/{app}",
                   "-H", f"Authorization: Bearer {key}", "--checks", "all",
                   "--max-time", str(int(seconds)), "--report", "har", "--report-dir", str(report),
                   "--suppress-health-check", "all", "--workers", "2",
                   # Above the apps' own timeouts (a 504 is an answer; its default 10 s is not).
                   "--request-timeout", "90"]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
        (workdir / f"st-{app}.log").write_text(proc.stdout + proc.stderr)
        statuses: Counter[int] = Counter()
        for har in report.glob("*.json"):
            for entry in json.loads(har.read_text())["log"]["entries"]:
                statuses[entry["response"]["status"]] += 1
        lines = proc.stdout.splitlines()
        # Each failure's check line ("- ST103 Undocumented status code") and the run's tally.
        failures = [line.strip() for line in lines if line.startswith("- ST")]
        tally = [line.strip() for line in lines if " generated" in line]
        results[app] = {"exit_code": proc.returncode, "requests": sum(statuses.values()),
                        "statuses": dict(sorted(statuses.items())), "failures": failures,
                        "tally": tally, "log": str(workdir / f"st-{app}.log")}  # fmt: skip
    return results


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worst-s", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=300, help="requests per app, sent at once")
    parser.add_argument("--clients", type=int, default=4, help="clients looping during the kill")
    parser.add_argument("--schemathesis", help="path of a schemathesis `st` command (phase 4)")
    parser.add_argument("--fuzz-s", type=float, default=120.0, help="seconds of fuzzing per app")
    parser.add_argument("--out", type=Path, default=Path("serve_blackbox.json"))
    args = parser.parse_args()

    key = secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {key}"}
    port = _free_port()
    root = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="serve-blackbox-"))
    log = workdir / "serve.log"
    proc = start_server(port, key, log)
    results: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        wait_ready(proc, root, log)
        results["start_s"] = round(time.monotonic() - t0, 1)
        print(f"serving on {root} after {results['start_s']} s (log: {log})", flush=True)
        # The kill first: the later phases' load makes the autoscaler add a third replica.
        results["replica_kill"] = asyncio.run(replica_kill(root, headers, args.clients))
        print(json.dumps(results["replica_kill"], indent=1), flush=True)
        results["worst_requests"] = asyncio.run(worst_requests(root, headers, args.worst_s))
        print(json.dumps(results["worst_requests"], indent=1), flush=True)
        results["burst"] = asyncio.run(burst(root, headers, args.burst))
        print(json.dumps(results["burst"], indent=1), flush=True)
        if args.schemathesis:
            results["fuzz"] = fuzz(args.schemathesis, root, key, args.fuzz_s, workdir)
            print(json.dumps(results["fuzz"], indent=1), flush=True)
        results["key_in_log"] = key in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"key in the server's output: {results.get('key_in_log')}; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
