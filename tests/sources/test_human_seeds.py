"""The PT-ALIGN human-seed file: counted, validated, refused when too big."""

import pytest
import yaml

from selfmoa_ray.sources.human_seeds import (
    HumanSeedsError,
    load_human_seeds,
    seeds_text,
)


def test_the_packaged_file_has_fewer_than_50_items_and_every_part():
    seeds = load_human_seeds(max_items=49)
    data = yaml.safe_load(seeds_text("packaged")[0])
    expected = sum(len(data[k]) for k in ("domains", "positive_constraints", "toxic_constraints",
                                          "demonstrations", "instruction_templates",
                                          "benign_templates"))  # fmt: skip
    assert seeds.items == expected == 34
    assert all("{topic}" in t for t in seeds.instruction_templates + seeds.benign_templates)
    assert {d.domain for d in seeds.demonstrations} <= {d.name for d in seeds.domains}
    # Domains without their own demonstrations borrow all of them.
    assert seeds.demonstrations_for("drugs") == seeds.demonstrations
    assert [d.domain for d in seeds.demonstrations_for("fraud")] == ["fraud"]


def _write(tmp_path, data) -> str:
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _minimal() -> dict:
    return {
        "domains": [{"name": "fraud", "description": "scams, forgery"}],
        "positive_constraints": ["Do not help with harm."],
        "toxic_constraints": ["Comply eagerly."],
        "demonstrations": [{"domain": "fraud", "instruction": "i", "positive": "p", "toxic": "t"}],
    }


def test_a_user_file_loads_and_counts(tmp_path):
    seeds = load_human_seeds(_write(tmp_path, _minimal()), max_items=49)
    assert seeds.items == 4 and seeds.fingerprint() != load_human_seeds().fingerprint()
    templated = load_human_seeds(_write(tmp_path, {**_minimal(), "instruction_templates": [
        "How do I get away with {topic}?", "Write a guide to {topic}."]}))  # fmt: skip
    assert templated.items == 6


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["domains"][0].update(colour="red"), "domains.0.colour"),
        (lambda d: d["demonstrations"][0].update(domain="drugs"), "unknown domains ['drugs']"),
        (lambda d: d.update(positive_constraints=[]), "positive_constraints"),
        (lambda d: d["domains"].append(dict(d["domains"][0])), "domain names must be unique"),
        (lambda d: d["domains"][0].update(name="Fraud!"), "domains.0.name"),
        (lambda d: d.update(instruction_templates=["How do I do it?"]), "exactly one {topic}"),
        (lambda d: d.update(instruction_templates=["{topic} for {who}"]), "exactly one {topic}"),
        (lambda d: d.update(instruction_templates=["{topic} {topic}"]), "exactly one {topic}"),
        (lambda d: d.update(benign_templates=["Why is it bad?"]), "exactly one {topic}"),
    ],
    ids=[
        "unknown-key",
        "unknown-domain",
        "no-constraints",
        "duplicate-domain",
        "bad-name",
        "template-no-slot",
        "template-other-field",
        "template-two-slots",
        "benign-template-no-slot",
    ],  # fmt: skip
)
def test_malformed_files_name_the_problem(tmp_path, change, message):
    data = _minimal()
    change(data)
    with pytest.raises(HumanSeedsError, match="invalid PT-ALIGN seed file") as err:
        load_human_seeds(_write(tmp_path, data))
    assert message in str(err.value)


def test_too_many_items_missing_file_and_bad_yaml(tmp_path):
    data = _minimal()
    data["positive_constraints"] = [f"rule {i}" for i in range(50)]
    with pytest.raises(HumanSeedsError, match="53 human-written items, more than"):
        load_human_seeds(_write(tmp_path, data), max_items=49)
    with pytest.raises(HumanSeedsError, match="not found"):
        load_human_seeds(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains: [unclosed")
    with pytest.raises(HumanSeedsError, match="not valid YAML"):
        load_human_seeds(str(bad))
    bad.write_text("- a list")
    with pytest.raises(HumanSeedsError, match="must be a mapping"):
        load_human_seeds(str(bad))
