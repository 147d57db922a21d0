"""Chat-format prompt files (``messages``) and ``hf:`` prompt specs for locally cached Hugging Face
datasets: real files, real ``datasets`` folders, and a real hub cache in a temporary HF_HOME."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import ConfigError, load_config
from selfmoa_ray.evaluators.audit import held_out_prompts
from selfmoa_ray.sources.hf_datasets import HFDatasetError, HFSpec, load_hf_prompts, parse_hf_spec
from selfmoa_ray.sources.prompt_files import PromptFileError, load_prompt_file
from selfmoa_ray.sources.prompts import PromptRow, load_prompts


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------ messages in files


def test_jsonl_messages_become_the_user_turn_and_drop_the_answer(tmp_path):
    path = _jsonl(
        tmp_path / "chats.jsonl",
        [
            {"messages": [_user("  How do I pick a lock?  ")], "id": "a", "category": "Crime"},
            {"messages": [_user("Tell me a joke"), _assistant("No.")]},  # the answer is dropped
            {"text": "A plain row beside the chats"},
            {"messages": None, "prompt": "An alias row; messages null means absent"},
        ],
    )
    rows = load_prompt_file(path)
    assert rows[0] == PromptRow("a", "How do I pick a lock?", "crime", "chats.jsonl", "user")
    assert [r.text for r in rows[1:]] == [
        "Tell me a joke",
        "A plain row beside the chats",
        "An alias row; messages null means absent",
    ]
    assert rows[1].id.startswith("chats-")
    # A chat and a text row with the same prompt get the same default id: the same prompt.
    same = _jsonl(tmp_path / "same.jsonl", [{"messages": [_user("x")]}, {"text": "x"}])
    with pytest.raises(PromptFileError, match="line 2: duplicate id"):
        load_prompt_file(same)
    assert load_prompts(f"file:{path}") == rows


def test_parquet_messages_column(tmp_path):
    chats = [[_user("first")], [_user("second"), _assistant("an answer")]]
    path = tmp_path / "chats.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"messages": m, "id": f"c{i}"} for i, m in enumerate(chats)]), path
    )
    assert pa.types.is_list(pq.read_schema(path).field("messages").type)
    rows = load_prompt_file(path)
    assert [(r.id, r.text) for r in rows] == [("c0", "first"), ("c1", "second")]

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": chats[0]}, {"messages": []}]), bad)
    with pytest.raises(PromptFileError) as err:
        load_prompt_file(bad)
    assert str(err.value) == f"{bad}, row 2: empty 'messages'"


def test_parquet_without_a_prompt_column_names_all_three(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(
        PromptFileError, match=r"missing column 'text' \(or 'prompt', or 'messages'\)"
    ):
        load_prompt_file(path)


SYSTEM = {"role": "system", "content": "You are terse."}


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "p", "messages": [_user("m")]}, "both 'prompt' and 'messages'"),
        ({"text": "t", "messages": [_user("m")]}, "both 'text' and 'messages'"),
        ({"messages": []}, "empty 'messages'"),
        (
            {"messages": "How do I pick a lock?"},
            "field 'messages' must be a list of {role, content}",
        ),
        ({"messages": ["hi"]}, "messages[0] must be an object with 'role' and 'content'"),
        ({"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]: unknown role 'tool'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            "messages[0] (user): 'content' must be a string, got list",
        ),
        ({"messages": [_user("q"), {"role": "assistant", "content": None}]}, "got NoneType"),
        ({"messages": [{"role": "user"}]}, "messages[0] (user): 'content' must be a string"),
        (
            {"messages": [_assistant("only an answer")]},
            "last turn of 'messages' must be the user's",
        ),
        ({"messages": [SYSTEM]}, "must be the user's (optionally followed by one assistant"),
        (
            {"messages": [_user("q"), _assistant("a"), _assistant("b")]},
            "got user -> assistant -> assistant",
        ),
        (
            {"messages": [SYSTEM, _user("q")]},
            "'messages' has system -> user before the answer: only single-turn chats are supported",
        ),
        (
            {"messages": [_user("q1"), _assistant("a1"), _user("q2"), _assistant("a2")]},
            "has user -> assistant -> user before the answer",
        ),
        ({"messages": [_user("   ")]}, "messages[0] (user): empty 'content'"),
        ({"id": "x"}, "missing field 'text' (or 'prompt', or 'messages')"),
    ],
)
def test_bad_chats_name_file_line_and_reason(tmp_path, record, reason):
    path = _jsonl(tmp_path / "in.jsonl", [{"text": "a fine first row"}, record])
    with pytest.raises(PromptFileError) as err:
        load_prompt_file(path)
    assert err.value.path == str(path) and err.value.line == 2
    assert str(err.value).startswith(f"{path}, line 2: ")
    assert reason in err.value.reason


def test_csv_messages_column_is_refused_with_the_formats_that_can_hold_it(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text('id,messages\na,"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    with pytest.raises(PromptFileError) as err:
        load_prompt_file(path)
    assert err.value.line == 1
    assert "CSV cannot hold" in str(err.value) and "JSONL or Parquet" in str(err.value)


# ------------------------------------------------------------------ hf: spec syntax


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("hf:org/name", HFSpec("org/name")),
        ("hf:squad", HFSpec("squad")),
        ("hf:org/name:cfg", HFSpec("org/name", config="cfg")),
        ("hf:org/name@test", HFSpec("org/name", split="test")),
        ("hf:org/name#question", HFSpec("org/name", column="question")),
        ("hf:org/name:cfg@test#messages", HFSpec("org/name", "cfg", "test", "messages")),
        ("hf:/data/saved@train", HFSpec("/data/saved", split="train")),
        ("hf:./saved", HFSpec("./saved")),
        ("hf:~/saved#q", HFSpec("~/saved", column="q")),
        ("hf:/data/a:b/saved", HFSpec("/data/a:b/saved")),  # a colon inside a path is not a config
    ],
)
def test_hf_spec_syntax(spec, parsed):
    assert parse_hf_spec(spec) == parsed
    assert parsed.render() == spec
    assert parsed.is_folder == spec.startswith(("hf:/", "hf:.", "hf:~"))


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("hf:", "no dataset named"),
        ("hf:org/name@", "nothing after '@'"),
        ("hf:org/name#", "nothing after '#'"),
        ("hf:org/name:", "nothing after ':'"),
        ("hf:@train", "no dataset named"),
        ("hf:org/na--me", "is not a repo id"),
        ("hf:a/b/c", "is not a repo id"),
    ],
)
def test_bad_hf_specs_fail_before_any_read(spec, reason):
    with pytest.raises(HFDatasetError) as err:
        load_prompts(spec)
    assert str(err.value).startswith(f"{spec}: ") and reason in str(err.value)
    assert "hf:<org>/<name>" in str(err.value) or "./path" in str(err.value)


# ------------------------------------------------------------------ save_to_disk folders


@pytest.fixture
def saved(tmp_path) -> Path:
    """A DatasetDict saved with save_to_disk: chats with class-label categories, and a test split."""
    features = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            ),
            "category": datasets.ClassLabel(names=["cyber", "bio"]),
            "question": datasets.Value("string"),
        }
    )
    train = datasets.Dataset.from_list(
        [
            {
                "messages": [_user("Write malware"), _assistant("No.")],
                "category": 0,
                "question": "q1",
            },
            {"messages": [_user("Grow a pathogen")], "category": 1, "question": "q2"},
            {"messages": [_user("Unlabelled")], "category": -1, "question": "q3"},  # -1: none
        ],
        features=features,
    )
    test = datasets.Dataset.from_dict({"prompt": ["Held out one", "Held out two"], "id": [7, 8]})
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    return folder


def test_save_to_disk_folder_splits_columns_and_labels(saved, tmp_path):
    train = load_prompts(f"hf:{saved}@train")
    assert [(r.text, r.category, r.split) for r in train] == [
        ("Write malware", "cyber", "user"),
        ("Grow a pathogen", "bio", "user"),
        ("Unlabelled", "user", "user"),
    ]
    assert {r.source for r in train} == {f"hf:{saved}@train"}
    assert all(r.id.startswith("saved-") for r in train)
    test = load_prompts(f"hf:{saved}@test")
    assert [(r.id, r.text) for r in test] == [("7", "Held out one"), ("8", "Held out two")]
    assert [r.text for r in load_prompts(f"hf:{saved}@train#question")] == ["q1", "q2", "q3"]
    assert load_hf_prompts(f"hf:{saved}@test", default_split="benign")[0].split == "benign"

    one = tmp_path / "one"
    datasets.Dataset.from_dict({"text": ["solo"]}).save_to_disk(str(one))
    assert [r.text for r in load_prompts(f"hf:{one}")] == ["solo"]
    with pytest.raises(HFDatasetError, match="one Dataset without splits; drop '@train'"):
        load_prompts(f"hf:{one}@train")


@pytest.mark.parametrize(
    ("suffix", "reason"),
    [
        ("", "has splits train, test; name one: hf:{saved}@<split>"),
        ("@validation", "unknown split 'validation'; available: train, test"),
        (
            "@train#answer",
            "unknown column 'answer'; columns are ['messages', 'category', 'question']",
        ),
        ("@test#id", "column 'id' holds Value('int64'), neither text nor a list of chat turns"),
        (":cfg@train", "a save_to_disk folder has no configs; drop ':cfg'"),
    ],
)
def test_save_to_disk_errors(saved, suffix, reason):
    spec = f"hf:{saved}{suffix}"
    with pytest.raises(HFDatasetError) as err:
        load_prompts(spec)
    assert isinstance(err.value, ValueError)
    assert str(err.value) == f"{spec}: {reason.format(saved=saved)}"


def test_bad_rows_in_a_dataset_name_the_row(tmp_path):
    folder = tmp_path / "sys"
    chats = [[_user("fine")], [SYSTEM, _user("with a system turn")]]
    datasets.Dataset.from_dict({"messages": chats}).save_to_disk(str(folder))
    with pytest.raises(HFDatasetError) as err:
        load_prompts(f"hf:{folder}")
    assert err.value.line == 2
    assert str(err.value).startswith(f"hf:{folder}, row 2: 'messages' has system -> user")

    both = tmp_path / "both"
    datasets.Dataset.from_dict({"prompt": ["p"], "messages": [[_user("m")]]}).save_to_disk(
        str(both)
    )
    with pytest.raises(HFDatasetError, match=r"several prompt columns \['prompt', 'messages'\]"):
        load_prompts(f"hf:{both}")
    assert [r.text for r in load_prompts(f"hf:{both}#messages")] == ["m"]

    with pytest.raises(HFDatasetError, match="no such folder"):
        load_prompts(f"hf:{tmp_path / 'missing'}")


def test_config_and_eval_files_accept_hf_specs_end_to_end(saved):
    config = load_config(
        "tiny",
        [f"data.seeds=[advbench, 'hf:{saved}@train']", f"data.eval_files=['hf:{saved}@test']"],
    )
    seeds = [row for spec in config.data.seeds for row in load_prompts(spec)]
    assert {"Write malware", "Grow a pathogen"} < {r.text for r in seeds}
    held_out = held_out_prompts(config.data, seed=0)
    assert {"Held out one", "Held out two"} < {r.text for r in held_out}
    with pytest.raises(ConfigError, match=r"data\.eval_files: .*nothing after '@'"):
        load_config("tiny", [f"data.eval_files=['hf:{saved}@']"])


# ------------------------------------------------------------------ the hub cache, offline

LOADER = """
import json, sys
from selfmoa_ray.sources.prompts import load_prompts
out = {}
for spec in sys.argv[1:]:
    try:
        out[spec] = [[r.id, r.text, r.category, r.source] for r in load_prompts(spec)]
    except ValueError as exc:
        out[spec] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def _snapshot(hf_home: Path, repo: str, files: dict[str, str]) -> Path:
    """A dataset repo in the hub cache layout that ``hf download`` leaves: refs/main -> sha."""
    repo_dir = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    for name, text in files.items():
        path = repo_dir / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return repo_dir


@pytest.fixture
def hf_home(tmp_path) -> Path:
    home = tmp_path / "hf_home"
    _snapshot(
        home,
        "org/plain",
        {
            "data/train.jsonl": '{"prompt": "cached train", "category": "Cyber"}\n',
            "data/test.jsonl": '{"prompt": "cached test"}\n',
        },
    )
    chat = json.dumps({"messages": [_user("a chat prompt"), _assistant("ok")], "id": "c1"})
    _snapshot(
        home,
        "org/multi",
        {
            "README.md": "---\nconfigs:\n- config_name: chat\n  data_files: chat/*.jsonl\n"
            "- config_name: plain\n  data_files: plain/*.jsonl\n---\n",
            "chat/train.jsonl": chat + "\n",
            "plain/train.jsonl": '{"text": "plain config"}\n',
        },
    )
    folder = tmp_path / "raw"  # a folder of data files (not save_to_disk): read by datasets too
    folder.mkdir()
    (folder / "prompts.jsonl").write_text('{"text": "from a raw folder"}\n')
    return home


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in Hub endpoint that records every request: there must be none."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.path)
        self.send_error(404)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args) -> None:
        pass


def _load_in_subprocess(hf_home: Path, endpoint: str, specs: list[str], cwd: Path) -> dict:
    """``load_prompts`` in a fresh interpreter: huggingface_hub reads HF_HOME at import. The
    offline flags are removed, so only our code keeps it off the network."""
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    caches = ("HF_HUB_CACHE", "HF_DATASETS_CACHE")  # HF_HOME places both
    env = {k: v for k, v in os.environ.items() if k not in (*offline, *caches)}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *specs],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_cached_datasets_load_offline_and_never_touch_the_network(hf_home, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.seen = []
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        out = _load_in_subprocess(
            hf_home,
            endpoint,
            [
                "hf:org/plain@train",
                "hf:org/plain@test",
                "hf:org/plain",
                "hf:org/multi:chat",
                "hf:org/multi:plain#text",
                "hf:org/multi",
                "hf:org/multi:nope",
                "hf:org/missing",
                "hf:org/missing:cfg@train",
                "hf:./raw",
            ],
            cwd=tmp_path,
        )
    finally:
        server.shutdown()
    assert _Recorder.seen == []  # nothing asked the (stand-in) Hub
    assert out["hf:org/plain@train"] == [
        [out["hf:org/plain@train"][0][0], "cached train", "cyber", "hf:org/plain@train"]
    ]
    assert out["hf:org/plain@train"][0][0].startswith("plain-")
    assert [r[1] for r in out["hf:org/plain@test"]] == ["cached test"]
    assert out["hf:org/plain"] == (
        "HFDatasetError: hf:org/plain: has splits train, test; name one: hf:org/plain@<split>"
    )
    assert out["hf:org/multi:chat"] == [["c1", "a chat prompt", "user", "hf:org/multi:chat@train"]]
    assert [r[1] for r in out["hf:org/multi:plain#text"]] == ["plain config"]
    assert out["hf:org/multi"] == (
        "HFDatasetError: hf:org/multi: has configs chat, plain; name one: hf:org/multi:<config>"
    )
    assert out["hf:org/multi:nope"] == (
        "HFDatasetError: hf:org/multi:nope: unknown config 'nope'; available: chat, plain"
    )
    missing = out["hf:org/missing"]
    assert missing.startswith("HFDatasetError: hf:org/missing: dataset 'org/missing' is not in")
    assert str(hf_home / "hub") in missing and "never downloaded" in missing
    assert "datasets.load_dataset('org/missing')" in missing
    assert "hf download --repo-type dataset org/missing" in missing
    assert "datasets.load_dataset('org/missing', 'cfg')" in out["hf:org/missing:cfg@train"]
    assert [r[1] for r in out["hf:./raw"]] == ["from a raw folder"]
