"""The Self-MOA loop, today's code and preset against the new ones, side by side in one run.

Each side is a whole source tree run through the CLI in a subprocess, one demo iteration each
(``selfmoa run --config demo``: a baseline evaluation, then redteam, sample, judge, failures, pairs,
reference, train, evaluate, report), one after the other on this machine:

* **old**: ``git archive <--baseline-rev>`` (default ``2037443``, the last landed commit before the
  speed work) with *its* ``demo`` preset;
* **new**: a snapshot of this working tree (tracked files and untracked ones git does not ignore,
  copied when the benchmark starts, so that edits made while it runs do not leak into a round)
  with its own ``demo`` preset.

Both run with this venv's Python, ``python -m selfmoa_ray.cli`` from inside their tree with
``PYTHONPATH`` set to it, so that the tree wins over the venv's editable install; the benchmark
checks that the driver *and* a Ray worker of each side import ``selfmoa_ray`` from that tree. The
environment is the same for both (``HF_HUB_OFFLINE=1``, this process's environment otherwise), as
is the shared cache of converted models and trained probes (``$HF_HOME/selfmoa``): the header says
what it held, and a run that had to fill it is flagged.

    .venv/bin/python benchmarks/loop.py                       # demo, old then new, ~17-20 min
    .venv/bin/python benchmarks/loop.py --rounds 2 --json loop.json   # old new new old, ~35-40 min
    .venv/bin/python benchmarks/loop.py --quick               # smoke: tiny preset, 6-12 min
    .venv/bin/python benchmarks/loop.py --config demo run.seed=1      # overrides go to both sides

(Times on a 2-core machine; ``--quick`` took 12 min at a load average of 25-40.) The figures come from the run folder each side
writes (``manifest.json``: every stage's ``seconds`` and ``summary``; the Parquet files for token
counts; ``metrics.json`` for the held-out figures):

* sampling tokens/s: generated tokens (``response_tokens``) over the sample stage's seconds;
* reference pairs/s: pairs over the reference stage's seconds;
* training pairs/s: pairs trained (full batches of ``train.batch_size`` per worker, times
  ``train.epochs``) over the train stage's seconds (worker start, model load, checkpoints and the
  export included); "in loop" is the trainer's own ``samples_per_s`` where a version reports it;
* one iteration: the wall time of the whole subprocess (Ray start, baseline evaluation, the
  iteration, the report), and the sum of the iteration's stage seconds;
* bytes: the run folder's size on disk at the end (allocated blocks, symlinks not followed); the
  bytes its processes wrote (``write_bytes`` of ``/proc/<pid>/io`` over the subprocess's process
  tree, polled: counted when a page is dirtied, so files deleted later count too; a lower bound,
  the last moments of a process that exits are missed); and the bytes written to the machine's
  disks during the run (``/proc/diskstats``, after a ``sync`` on both ends): machine-wide, so
  other processes' writes count too, and files deleted before the kernel flushed them do not;
* lines: what the subprocess printed, stdout and stderr, counted as newlines (not a terminal:
  progress bars that redraw themselves on a terminal are lines here);
* held-out: judge safety, string refusal, over-refusal (judge and string) and helpfulness of the
  start policy and the iteration's policy, to show that speed did not cost quality.

**Share of the hardware limit** (an estimate): the limit is the best rate of a large float32 matrix
product (``--gemm-size``, bfloat16 too where the CPU multiplies it natively) on all cores, timed
with torch in this process before and after the runs. The work is counted from the run's own
files, as the FLOPs the stage needs, not what the code happened to do: a forward pass costs 2 x the
parameters it multiplies per token (the vocabulary projection only where logits are needed: the
last prompt position and each generated token when sampling, the response positions when scoring);
generation prefills each prompt once and decodes each answer's tokens; the reference pass is one
forward of both sides of each pair; training is 3 forwards' worth per trained pair (2 with LoRA:
frozen weights need no gradient). Sequences are tokenised here as the trainer does (chat template,
``train.max_length``). The estimate ignores attention (small next to the matrix products at these
lengths), padding and repeated prefills (work a version does but does not need), memory bandwidth
(batched decoding of a 135M model is bandwidth-bound, so its real ceiling is lower than the FLOP
limit), and everything else the stage does (Ray, tokenising, I/O).

With ``--rounds 2`` the order is old, new, new, old, so that drift on a shared machine hits both
sides alike; rates are sums over sums, other figures means. Run folders (0.5-2.6 GB each) are
deleted after their figures are read, unless ``--keep``; ``--json OUT`` keeps every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "2037443"
SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's sector size
QUICK_OVERRIDES = ("loop.iterations=1",)
TARGETS = {  # the acceptance figures, for --config demo
    "sampling_ratio": 3.0,
    "training_ratio": 2.0,
    "iteration_s": 300.0,
    "written_bytes": 600e6,
    "lines": 40,
}
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


# --------------------------------------------------------------------------- the two trees


@dataclass(frozen=True)
class Side:
    name: str  # "old" or "new"
    tree: Path
    label: str  # where it came from, for the header

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        return env | ENV | {"PYTHONPATH": str(self.tree)}


def export_revision(rev: str, dest: Path) -> str:
    """``git archive rev`` unpacked into ``dest``; returns the full commit id."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    return commit


def snapshot_worktree(dest: Path) -> str:
    """Copy the working tree's tracked and unignored untracked files to ``dest``; describe it."""
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    digest = hashlib.sha256()
    copied = 0
    for name in sorted(f for f in files if f):
        src = REPO / name
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
        digest.update(name.encode() + b"\0" + src.read_bytes())
        copied += 1
    head = git("rev-parse", "--short", "HEAD").strip()
    changed = len([x for x in git("status", "--porcelain").splitlines() if x.strip()])
    return (f"working tree on {head}, {changed} changed file(s), {copied} files copied, "
            f"content sha256 {digest.hexdigest()[:12]}")  # fmt: skip


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


WHERE = """
import ray, selfmoa_ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote(num_cpus=0)
def where():
    import selfmoa_ray
    return selfmoa_ray.__file__
print(selfmoa_ray.__file__)
print(ray.get(where.remote()))
ray.shutdown()
"""


def check_imports(side: Side, ray_worker: bool) -> None:
    """Fail unless the side's driver (and a Ray worker) import ``selfmoa_ray`` from its tree."""
    code = WHERE if ray_worker else "import selfmoa_ray; print(selfmoa_ray.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=side.tree, env=side.env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    paths = [Path(line) for line in out.stdout.split()]
    wanted = 2 if ray_worker else 1
    tree = side.tree.resolve()
    if (
        out.returncode
        or len(paths) != wanted
        or not all(p.resolve().is_relative_to(tree) for p in paths)
    ):
        raise SystemExit(f"{side.name}: selfmoa_ray does not come from {side.tree}: "
                         f"{out.stdout.strip()} {out.stderr.strip()[-2000:]}")  # fmt: skip


# --------------------------------------------------------------------------- the machine


def whole_disks(sys_block: Path = Path("/sys/block")) -> set[str]:
    """Physical disks: not partitions, nor loop, zram or device-mapper devices (virtual ones,
    whose writes land on a physical disk too and would count twice)."""
    if not sys_block.is_dir():
        return set()
    return {p.name for p in sys_block.iterdir() if "/virtual/" not in str(p.resolve())}


def sectors_written(diskstats: str, disks: Iterable[str]) -> int:
    """Sectors written, summed over ``disks``, from the text of ``/proc/diskstats``."""
    wanted, total = set(disks), 0
    for line in diskstats.splitlines():
        parts = line.split()
        if len(parts) >= 10 and parts[2] in wanted:
            total += int(parts[9])  # major minor name, then the 7th field: sectors written
    return total


def disk_written_bytes() -> int | None:
    """Bytes written to this machine's disks since boot, after flushing dirty pages."""
    os.sync()
    try:
        return SECTOR * sectors_written(Path("/proc/diskstats").read_text(), whole_disks())
    except OSError:
        return None


class TreeWrites(threading.Thread):
    """Bytes the process tree under ``pid`` wrote: every ``interval`` s, each live descendant's
    ``write_bytes`` from ``/proc/<pid>/io`` (counted when a page is dirtied, so before the kernel
    flushes it, and also for files deleted later); a process's last reading counts. A lower
    bound: a process's writes after its last reading, before it exits, are missed."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.seen: dict[tuple[int, str], tuple[int, int]] = {}  # (pid, start) -> written, cancelled
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(self.interval)

    def poll(self) -> None:
        for pid, start in descendants(self.pid):
            counters = io_counters(pid)
            if counters is not None:
                self.seen[(pid, start)] = counters

    def stop(self) -> tuple[int, int]:
        """(written, cancelled) bytes, summed over every process seen."""
        self.done.set()
        self.join()
        return (sum(w for w, _ in self.seen.values()), sum(c for _, c in self.seen.values()))


def descendants(root: int, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, start time) of ``root`` and every live process below it (``/proc/<pid>/stat``; the
    start time tells a reused pid apart)."""
    parent, start = {}, {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
        pid = int(entry.name)
        parent[pid], start[pid] = int(fields[1]), fields[19]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root] if root in parent else []
    while todo:
        pid = todo.pop()
        found.append((pid, start[pid]))
        todo.extend(children.get(pid, []))
    return found


def io_counters(pid: int, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(write_bytes, cancelled_write_bytes) of a process, None once it is gone."""
    try:
        text = (proc / str(pid) / "io").read_text()
    except OSError:
        return None
    values = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    return int(values["write_bytes"]), int(values["cancelled_write_bytes"])


def size_on_disk(root: Path) -> int:
    """Allocated bytes under ``root`` (``du``-style): symlinks not followed, hard links once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def gemm_peak(dtype: str = "float32", threads: int | None = None, n: int = 2048,
              seconds: float = 1.5) -> float:  # fmt: skip
    """Best FLOP/s of one ``n x n`` matrix product over ``seconds`` on ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        a = torch.randn(n, n).to(getattr(torch, dtype))
        b = torch.randn(n, n).to(getattr(torch, dtype))
        for _ in range(2):
            a @ b
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


def native_bf16() -> bool:
    try:
        from selfmoa_ray.precision import cpu_has_native_bf16
    except ImportError:  # a tree from before precision.py
        return False
    return cpu_has_native_bf16()


def measure_peaks(n: int) -> dict[str, float]:
    peaks = {"float32": gemm_peak("float32", n=n), "float32_1_thread": gemm_peak("float32", 1, n)}
    if native_bf16():
        peaks["bfloat16"] = gemm_peak("bfloat16", n=n)
    return peaks


def cache_entries() -> set[str]:
    """The shared cache's models and evaluators (converted weights, trained probes)."""
    from selfmoa_ray.paths import cache_root

    root = cache_root()
    folders = [root / kind for kind in ("models", "evaluators") if (root / kind).is_dir()]
    return {f"{f.name}/{p.name}" for f in folders for p in f.iterdir()
            if p.is_dir() and not p.name.startswith(".")}  # fmt: skip


def load() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- one run


def run_side(side: Side, config: str, overrides: list[str], workdir: Path, tag: str) -> dict:
    """One ``selfmoa run`` of ``side`` in a subprocess; the machine's view of it, and its folder."""
    out, log = workdir / f"run-{tag}", workdir / f"{tag}.log"
    cmd = [sys.executable, "-m", "selfmoa_ray.cli", "run", "--config", config,
           "--output-dir", str(out), *overrides]  # fmt: skip
    cache_before, load_before = cache_entries(), load()
    written_before = disk_written_bytes()
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=side.tree, env=side.env(), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        watch = TreeWrites(proc.pid)
        watch.start()
        try:
            returncode = proc.wait()
        except BaseException:
            stop(proc)
            raise
        finally:
            tree_written, tree_cancelled = watch.stop()
    wall = time.perf_counter() - t0
    written_after = disk_written_bytes()
    text = log.read_bytes()
    return {
        "side": side.name,
        "tag": tag,
        "command": " ".join(cmd),
        "returncode": returncode,
        "wall_s": wall,
        "lines": text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0),
        "written_bytes": None if written_before is None else written_after - written_before,
        "tree_written_bytes": tree_written,
        "tree_cancelled_bytes": tree_cancelled,  # dirtied, then truncated or deleted unflushed
        "load_before": load_before,
        "load_after": load(),
        "cache_filled": sorted(cache_entries() - cache_before),
        "run_dir": str(out),
        "log": str(log),
    }


def stop(proc: subprocess.Popen) -> None:
    """End the run's process group (the CLI and the Ray it started): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- reading a run folder


def last_iteration(stages: dict) -> str | None:
    names = sorted({k.split("/", 1)[0] for k in stages if k.startswith("iter_")})
    return names[-1] if names else None


def stage_of(manifest: dict, iteration: str | None, name: str) -> dict:
    return manifest["stages"].get(f"{iteration}/{name}", {}) if iteration else {}


def pairs_trained(pairs: int, train: dict) -> int:
    """Pairs the trainer steps on: full batches per worker (Ray Train splits the rows equally,
    the loop drops the last partial batch), times the epochs."""
    world, batch = int(train.get("num_workers", 1)), int(train.get("batch_size", 1))
    return pairs // (world * batch) * world * batch * int(train.get("epochs", 1))


def quality(folder: Path, manifest: dict, iteration: str | None) -> dict[str, dict]:
    """Held-out figures of the start policy and the iteration's, from metrics.json (else the
    evaluate stages' summaries)."""
    keys = {"safety": ("harmful", "safety_rate"),
            "string_refusal": ("harmful", "string_refusal_rate"),
            "over_refusal": ("benign", "over_refusal"),
            "string_over_refusal": ("benign", "string_over_refusal"),
            "helpfulness": ("benign", "helpfulness")}  # fmt: skip
    path = folder / "metrics.json"
    policies = json.loads(path.read_text()).get("policies", []) if path.is_file() else []
    by_name = {p.get("name"): p for p in policies}
    out = {}
    for label, name in (("baseline", "baseline"), ("iteration", iteration)):
        p = by_name.get(name)
        if p is not None:
            out[label] = {k: p.get(split, {}).get(key) for k, (split, key) in keys.items()}
            continue
        splits = manifest["stages"].get(f"{name}/evaluate", {}).get("summary", {}).get("splits", {})
        harm, benign = splits.get("eval_harmful", {}), splits.get("eval_benign", {})
        out[label] = {
            "safety": harm.get("safety_rate"), "string_refusal": harm.get("string_refusal_rate"),
            "over_refusal": benign.get("refusal_rate"),
            "string_over_refusal": benign.get("string_refusal_rate"),
            "helpfulness": benign.get("helpfulness"),
        }  # fmt: skip
    return out


def read_run(folder: Path) -> dict:
    """The loop's figures from a run folder, for the manifests of both versions."""
    manifest = json.loads((folder / "manifest.json").read_text())
    it = last_iteration(manifest["stages"])
    redteam, sample = stage_of(manifest, it, "redteam"), stage_of(manifest, it, "sample")
    reference, train = stage_of(manifest, it, "reference"), stage_of(manifest, it, "train")
    config = manifest.get("config", {})
    ref_pairs = reference.get("summary", {}).get("pairs")
    trained = pairs_trained(ref_pairs, config.get("train", {})) if ref_pairs is not None else None
    stage_s = {k: v.get("seconds") for k, v in manifest["stages"].items()}
    in_loop = next((train.get("summary", {}).get(k) for k in ("samples_per_s", "pairs_per_s")
                    if k in train.get("summary", {})), None)  # fmt: skip
    return {
        "iteration": it,
        "git": manifest.get("git"),
        "prompts": redteam.get("summary", {}).get("prompts"),
        "responses": sample.get("summary", {}).get("responses"),
        "guided_responses": sample.get("summary", {}).get("guided_responses"),
        "response_tokens": sample.get("summary", {}).get("response_tokens"),
        "sample_s": sample.get("seconds"),
        "ref_pairs": ref_pairs,
        "reference_s": reference.get("seconds"),
        "train_pairs": trained,
        "train_s": train.get("seconds"),
        "train_steps": train.get("summary", {}).get("steps"),
        "train_in_loop_pairs_per_s": in_loop,
        "iteration_s": sum(s or 0 for k, s in stage_s.items() if it and k.startswith(f"{it}/")),
        "baseline_eval_s": stage_s.get("baseline/evaluate"),
        "stages_s": stage_s,
        "loop": manifest.get("loop", {}),
        "quality": quality(folder, manifest, it),
        "policy": config.get("policy", {}),
        "train_config": config.get("train", {}),
        "config_name": config.get("run", {}).get("name"),
    }


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Shape:
    """Parameter counts of a causal LM, as a forward pass multiplies them."""

    params: int  # every parameter once (a tied embedding/lm_head counts once)
    body: int  # what every token is multiplied by: params minus embedding and vocabulary head
    head: int  # the vocabulary projection (vocab x hidden), only where logits are needed

    def forward(self, tokens: float, logits: float) -> float:
        return 2.0 * (self.body * tokens + self.head * logits)


def model_shape(path: str) -> Shape:
    """Count parameters from the folder's config.json, on the meta device (no weights read)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embed
    return Shape(params, params - embed.numel() - (0 if tied else head.numel()), head.numel())


def generation_flops(shape: Shape, prompt_tokens: list[int], response_tokens: list[int]) -> float:
    """Prefill each distinct prompt once (logits at its last position: the first token), then one
    forward per further generated token of every answer."""
    decode = sum(max(r - 1, 0) for r in response_tokens)
    return shape.forward(sum(prompt_tokens), len(prompt_tokens)) + shape.forward(decode, decode)


def scoring_flops(shape: Shape, sequences: list[tuple[int, int]]) -> float:
    """One forward over each (length, response tokens) sequence, logits on the response only."""
    return shape.forward(sum(n for n, _ in sequences), sum(r for _, r in sequences))


def encoded_lengths(
    tokenizer, prompt: list[dict], response: str, max_length: int
) -> tuple[int, int]:
    """(sequence length, response tokens) as the trainer encodes a pair's side: chat template with
    the generation prompt, the response and an end-of-turn token, cut to ``max_length`` (a long
    prompt keeps its last half)."""
    p = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                          return_dict=False))  # fmt: skip
    r = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
    if p > max_length // 2 and p + r > max_length:
        p = max_length // 2
    r = min(r, max_length - p)
    return p + r, r


def text_of(value) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[-1].get("content", "")
    return str(value)


def messages_of(value) -> list[dict]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def work_flops(folder: Path, figures: dict) -> dict[str, float | None]:
    """The FLOPs the sample, reference and train stages of the run's last iteration needed."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from selfmoa_ray.sources.models import resolve_model

    it, train = figures["iteration"], figures["train_config"]
    path = resolve_model(figures["policy"].get("source")).path
    shape = model_shape(path)
    out: dict[str, float | None] = {"params": shape.params, "sample": None, "reference": None,
                                    "train": None}  # fmt: skip
    responses = folder / it / "responses.parquet"
    if responses.exists():
        table = pq.read_table(responses).to_pylist()
        if table and "prompt_tokens" in table[0]:
            prompts = {(r["id"], bool(r.get("guided"))): r["prompt_tokens"] for r in table}
            out["sample"] = generation_flops(shape, list(prompts.values()),
                                             [r["response_tokens"] for r in table])  # fmt: skip
    pairs = folder / it / "pairs.parquet"
    if pairs.exists() and figures["ref_pairs"]:
        tokenizer = AutoTokenizer.from_pretrained(path)
        max_length = int(train.get("max_length", 512))
        rows = pq.read_table(pairs, columns=["prompt", "chosen", "rejected"]).to_pylist()
        sequences = [encoded_lengths(tokenizer, messages_of(r["prompt"]), text_of(r[side]),
                                     max_length)
                     for r in rows for side in ("chosen", "rejected")]  # fmt: skip
        one_pass = scoring_flops(shape, sequences)
        out["reference"] = one_pass
        lora = bool(train.get("lora", {}).get("enabled"))
        share = (figures["train_pairs"] or 0) / len(rows) if rows else 0.0
        out["train"] = (2 if lora else 3) * one_pass * share
    return out


def stage_dtypes(figures: dict) -> dict[str, str]:
    """The dtype each stage computes in (``auto`` resolved for this CPU), for its FLOP limit."""
    bf16 = native_bf16()
    dtype = figures["policy"].get("dtype", "float32")
    if dtype == "auto":
        dtype = "bfloat16" if bf16 else "float32"
    precision = figures["train_config"].get("precision", "fp32")
    if precision == "auto":
        precision = "bf16" if bf16 else "fp32"
    train = "bfloat16" if precision == "bf16" else dtype
    return {"sample": dtype, "reference": dtype, "train": train}


# --------------------------------------------------------------------------- summary and table


def summarise(runs: list[dict]) -> dict:
    """One side over its rounds: rates as sums over sums, other figures as means."""

    def total(key: str) -> float | None:
        values = [r[key] for r in runs]
        return None if any(v is None for v in values) else sum(values)

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.mean(values) if values else None

    def rate(work: str, seconds: str) -> float | None:
        w, s = total(work), total(seconds)
        return w / s if w is not None and s else None

    s = {key: mean(key) for key in ("wall_s", "iteration_s", "baseline_eval_s", "run_bytes",
                                    "written_bytes", "tree_written_bytes", "lines", "prompts",
                                    "responses", "response_tokens", "ref_pairs", "train_pairs",
                                    "train_steps", "train_in_loop_pairs_per_s")}  # fmt: skip
    s["sample_tokens_per_s"] = rate("response_tokens", "sample_s")
    s["reference_pairs_per_s"] = rate("ref_pairs", "reference_s")
    s["train_pairs_per_s"] = rate("train_pairs", "train_s")
    for stage, seconds in (("sample", "sample_s"), ("reference", "reference_s"),
                           ("train", "train_s")):  # fmt: skip
        s[f"{stage}_s"] = mean(seconds)
        flops = [r["flops"][stage] for r in runs]
        secs = total(seconds)
        s[f"{stage}_flops_per_s"] = sum(flops) / secs if None not in flops and secs else None
        peak = runs[0]["peaks"].get(runs[0]["dtypes"][stage])
        achieved = s[f"{stage}_flops_per_s"]
        s[f"{stage}_share"] = achieved / peak if achieved is not None and peak else None
    for policy in ("baseline", "iteration"):
        for key in runs[0]["quality"].get(policy, {}):
            values = [r["quality"].get(policy, {}).get(key) for r in runs]
            values = [v for v in values if v is not None]
            s[f"{policy}_{key}"] = statistics.mean(values) if values else None
    s["per_round_sample_tokens_per_s"] = [r["response_tokens"] / r["sample_s"] for r in runs
                                          if r["response_tokens"] and r["sample_s"]]  # fmt: skip
    s["per_round_train_pairs_per_s"] = [r["train_pairs"] / r["train_s"] for r in runs
                                        if r["train_pairs"] and r["train_s"]]  # fmt: skip
    return s


ROWS = [  # (label, key, format, whether the ratio says something)
    ("red-team prompts", "prompts", "{:.0f}", False),
    ("answers (bare + guided)", "responses", "{:.0f}", False),
    ("sampling: generated tokens", "response_tokens", "{:.0f}", False),
    ("sampling: stage s", "sample_s", "{:.1f}", True),
    ("sampling: tokens/s", "sample_tokens_per_s", "{:.1f}", True),
    ("reference: pairs", "ref_pairs", "{:.0f}", False),
    ("reference: stage s", "reference_s", "{:.1f}", True),
    ("reference: pairs/s", "reference_pairs_per_s", "{:.2f}", True),
    ("training: pairs trained (x epochs)", "train_pairs", "{:.0f}", False),
    ("training: optimizer steps", "train_steps", "{:.0f}", False),
    ("training: stage s", "train_s", "{:.1f}", True),
    ("training: pairs/s (stage)", "train_pairs_per_s", "{:.2f}", True),
    ("training: pairs/s (in loop)", "train_in_loop_pairs_per_s", "{:.2f}", True),
    ("iteration: sum of its stages s", "iteration_s", "{:.1f}", True),
    ("baseline evaluation s", "baseline_eval_s", "{:.1f}", True),
    ("whole run wall s (subprocess)", "wall_s", "{:.1f}", True),
    ("run folder on disk MB", "run_bytes", "MB", True),
    ("written MB (its processes)", "tree_written_bytes", "MB", True),
    ("written to disk MB (machine-wide)", "written_bytes", "MB", True),
    ("lines printed", "lines", "{:.0f}", True),
    ("sampling: GFLOP/s needed work", "sample_flops_per_s", "GF", True),
    ("sampling: share of the limit", "sample_share", "%2", True),
    ("reference: GFLOP/s", "reference_flops_per_s", "GF", True),
    ("reference: share of the limit", "reference_share", "%2", True),
    ("training: GFLOP/s", "train_flops_per_s", "GF", True),
    ("training: share of the limit", "train_share", "%2", True),
    ("start: safety (judge)", "baseline_safety", "%", False),
    ("start: refusal (string)", "baseline_string_refusal", "%", False),
    ("start: over-refusal (judge)", "baseline_over_refusal", "%", False),
    ("start: over-refusal (string)", "baseline_string_over_refusal", "%", False),
    ("start: helpfulness", "baseline_helpfulness", "{:.3f}", False),
    ("after: safety (judge)", "iteration_safety", "%", False),
    ("after: refusal (string)", "iteration_string_refusal", "%", False),
    ("after: over-refusal (judge)", "iteration_over_refusal", "%", False),
    ("after: over-refusal (string)", "iteration_string_over_refusal", "%", False),
    ("after: helpfulness", "iteration_helpfulness", "{:.3f}", False),
]


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "MB":
        return f"{value / 1e6:.0f}"
    if spec == "GF":
        return f"{value / 1e9:.2f}"
    if spec == "%":
        return f"{100 * value:.1f}%"
    if spec == "%2":
        return f"{100 * value:.2f}%"
    return spec.format(value)


def print_header(args, overrides: list[str], sides: dict[str, Side], peaks: dict,
                 workdir: Path) -> None:  # fmt: skip
    checked = "the driver" if args.no_worker_check else "the driver and a Ray worker"
    bf16 = f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s" if "bfloat16" in peaks else "not native"
    print(
        f"loop benchmark: --config {args.config} {' '.join(overrides)}, {args.rounds} round(s), "
        f"{os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"  old: {sides['old'].label}\n  new: {sides['new'].label}")
    print(f"  checked: on each side, {checked} import selfmoa_ray from that side's tree")
    print(
        f"  shared cache ({os.environ.get('SELFMOA_CACHE') or '$HF_HOME/selfmoa'}) holds: "
        f"{', '.join(sorted(cache_entries())) or 'nothing'}"
    )
    print(
        f"  limit: float32 matmul {peaks['float32'] / 1e9:.1f} GFLOP/s on all cores "
        f"({peaks['float32_1_thread'] / 1e9:.1f} on one), bfloat16 {bf16}"
    )
    print(f"  work dir: {workdir}", flush=True)


def print_table(old: dict, new: dict) -> dict[str, float]:
    ratios = {}
    print(f"\n{'':<36} {'old':>10} {'new':>10} {'new/old':>8}")
    for label, key, spec, with_ratio in ROWS:
        a, b = old.get(key), new.get(key)
        ratio = b / a if with_ratio and a and b is not None else None
        if ratio is not None:
            ratios[key] = ratio
        shown = f"{ratio:.2f}x" if ratio is not None else ""
        print(f"{label:<36} {fmt(a, spec):>10} {fmt(b, spec):>10} {shown:>8}")
    return ratios


def print_targets(new: dict, ratios: dict[str, float], config: str) -> None:
    """The issue's acceptance figures against this run (they are set for ``--config demo``)."""
    t = TARGETS
    checks = [
        ("sampling tokens/s, new/old", ratios.get("sample_tokens_per_s"), ">=",
         t["sampling_ratio"], "{:.2f}x"),
        ("training pairs/s, new/old", ratios.get("train_pairs_per_s"), ">=",
         t["training_ratio"], "{:.2f}x"),
        ("new: whole run s", new["wall_s"], "<=", t["iteration_s"], "{:.0f}"),
        ("new: the iteration's stages s", new["iteration_s"], "<=", t["iteration_s"], "{:.0f}"),
        ("new: written MB, its processes", new["tree_written_bytes"], "<=", t["written_bytes"],
         "MB"),
        ("new: written MB, machine-wide", new["written_bytes"], "<=", t["written_bytes"], "MB"),
        ("new: lines printed", new["lines"], "<=", t["lines"], "{:.0f}"),
    ]  # fmt: skip
    note = "" if config == "demo" else f" (set for --config demo; this run: {config})"
    print(f"\ntargets{note}:")
    for label, value, op, limit, spec in checks:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        verdict = "-" if ok is None else ("met" if ok else "NOT met")
        shown_limit = fmt(limit, spec) if spec == "MB" else f"{limit:g}"
        print(f"  {verdict:<8} {label:<32} {fmt(value, spec):>8} {op} {shown_limit}")


def print_run(run: dict) -> None:
    q = run["quality"].get("iteration", {})
    filled = f", FILLED THE CACHE: {', '.join(run['cache_filled'])}" if run["cache_filled"] else ""
    print(f"{run['tag']:<8} rc {run['returncode']}, wall {run['wall_s']:.1f} s, "
          f"{run['lines']} lines, folder {fmt(run['run_bytes'], 'MB')} MB, written "
          f"{fmt(run['written_bytes'], 'MB')} MB machine-wide "
          f"({fmt(run['tree_written_bytes'], 'MB')} MB by its processes), sample "
          f"{fmt(run['sample_s'], '{:.1f}')} s, reference {fmt(run['reference_s'], '{:.1f}')} s, "
          f"train {fmt(run['train_s'], '{:.1f}')} s, safety after "
          f"{fmt(q.get('safety'), '%')}, load {run['load_before']:.2f} -> "
          f"{run['load_after']:.2f}{filled}", flush=True)  # fmt: skip


# --------------------------------------------------------------------------- main


def measure(side: Side, args, overrides: list[str], workdir: Path, tag: str) -> dict:
    run = run_side(side, args.config, overrides, workdir, tag)
    folder = Path(run["run_dir"])
    if run["returncode"] != 0 or not (folder / "manifest.json").is_file():
        tail = Path(run["log"]).read_text(errors="replace").splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{tag} failed (rc {run['returncode']}); its log: {run['log']}")
    run["run_bytes"] = size_on_disk(folder)
    run.update(read_run(folder))
    run["flops"] = work_flops(folder, run)
    run["dtypes"] = stage_dtypes(run)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="passed to both sides")
    parser.add_argument("--config", default="demo", help="preset or file, resolved in each tree")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: --config tiny loop.iterations=1")  # fmt: skip
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="the old side's commit")
    parser.add_argument("--rounds", type=int, default=1, help="1: old new; 2: old new new old")
    parser.add_argument("--workdir", type=Path, help="parent of the trees and run folders")
    parser.add_argument("--keep", action="store_true", help="keep the run folders, trees and logs")
    parser.add_argument("--gemm-size", type=int, default=2048, help="matrix size for the peak")
    parser.add_argument("--no-worker-check", action="store_true",
                        help="check the driver's import only, not a Ray worker's (saves ~30 s)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.quick:
        args.config = "tiny"
        overrides = [*QUICK_OVERRIDES, *overrides]
    os.environ.update(ENV)

    workdir = Path(tempfile.mkdtemp(prefix="selfmoa-loop-", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally below
    failed = True
    try:
        commit = export_revision(args.baseline_rev, workdir / "old")
        snapshot = snapshot_worktree(workdir / "new")
        sides = {"old": Side("old", workdir / "old", f"git archive {commit[:10]}"),
                 "new": Side("new", workdir / "new", snapshot)}  # fmt: skip
        for side in sides.values():
            check_imports(side, ray_worker=not args.no_worker_check)
        peaks = measure_peaks(args.gemm_size)
        print_header(args, overrides, sides, peaks, workdir)
        runs: list[dict] = []
        for rnd in range(args.rounds):
            for name in ("old", "new") if rnd % 2 == 0 else ("new", "old"):
                run = measure(sides[name], args, overrides, workdir, f"{name}-{rnd + 1}")
                run["peaks"] = peaks
                runs.append(run)
                print_run(run)
                if args.json:
                    save(args, runs)
        after = measure_peaks(args.gemm_size)
        peaks = {k: max(v, after.get(k, 0.0)) for k, v in peaks.items()}
        for run in runs:
            run["peaks"] = peaks
        summary = {name: summarise([r for r in runs if r["side"] == name]) for name in sides}
        print(f"\nlimit (best of before/after): float32 {peaks['float32'] / 1e9:.1f} GFLOP/s"
              f"; stages compute in: old {runs_dtypes(runs, 'old')}, new {runs_dtypes(runs, 'new')}")  # fmt: skip
        ratios = print_table(summary["old"], summary["new"])
        for key in ("per_round_sample_tokens_per_s", "per_round_train_pairs_per_s"):
            print(f"{key.removeprefix('per_round_')} per round: old "
                  f"{', '.join(f'{x:.2f}' for x in summary['old'][key])}; new "
                  f"{', '.join(f'{x:.2f}' for x in summary['new'][key])}")  # fmt: skip
        print_targets(summary["new"], ratios, args.config)
        print("share of the limit = FLOPs the stage's work needs / its seconds / the matmul peak:"
              " an estimate that ignores attention, padding, repeated prefills and memory "
              "bandwidth (benchmarks/loop.py says more)")  # fmt: skip
        if args.json:
            save(args, runs, peaks=peaks, summary=summary, ratios=ratios)
        failed = False
    finally:
        if failed:
            print(f"kept for a look: {workdir}", file=sys.stderr)
        elif not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def runs_dtypes(runs: list[dict], side: str) -> str:
    dtypes = next((r["dtypes"] for r in runs if r["side"] == side), {})
    return "/".join(f"{k} {v}" for k, v in dtypes.items())


def save(args, runs: list[dict], **extra) -> None:
    data = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, **extra}
    args.json.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main()
