import pytest

from selfmoa_ray.config import Config, ConfigError, apply_overrides, list_presets, load_config


def test_presets_are_shipped():
    assert set(list_presets()) >= {"tiny", "demo", "cluster-gpu"}


@pytest.mark.parametrize("preset", ["tiny", "demo", "cluster-gpu"])
def test_every_preset_validates(preset):
    config = load_config(preset)
    assert isinstance(config, Config)
    assert config.run.name == preset
    # Round trip: what we record in the manifest loads back into the same config.
    assert Config.model_validate(config.to_dict()).fingerprint() == config.fingerprint()


def test_presets_pick_the_intended_models_and_engines():
    assert load_config("tiny").policy.source == "tiny-random"
    assert load_config("demo").policy.source == "packaged:smollm2-135m-instruct"
    gpu = load_config("cluster-gpu")
    assert gpu.engine.backend == "vllm" and gpu.train.strategy == "deepspeed"
    kinds = {e.kind for e in gpu.judge.evaluators}
    assert {"llama_guard", "reward_model"} <= kinds


def test_dotted_overrides_parse_yaml_values():
    config = load_config(
        "tiny",
        ["train.beta=0.2", "train.lora.enabled=true", "data.eval_benign=[overrefusal]",
         "judge.evaluators.0.kind=probe", "redteam.generator.source=tiny-random:seed=3"],
    )  # fmt: skip
    assert config.train.beta == 0.2
    assert config.train.lora.enabled is True
    assert config.judge.evaluators[0].kind == "probe"
    assert config.redteam.generator is not None
    assert config.redteam.generator.source == "tiny-random:seed=3"


def test_unknown_key_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.bta=0.2"])
    message = str(err.value)
    assert "train.bta" in message and "unknown key" in message
    assert "beta" in message and "learning_rate" in message


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match=r"trian: unknown key; allowed here: .*train"):
        load_config("tiny", ["trian.beta=1"])


def test_wrong_value_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["engine.backend=tpu"])
    assert "engine.backend" in str(err.value) and "'hf' or 'vllm'" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.beta"):
        load_config("tiny", ["train.beta=-1"])
    with pytest.raises(ConfigError, match=r"sampling\.n"):
        load_config("tiny", ["sampling.n=zero"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="evaluation sets must not be used as seeds"):
        load_config("tiny", ["data.seeds=[advbench, harmbench]"])
    with pytest.raises(ConfigError, match="needs a 'model'"):
        load_config("tiny", ["judge.evaluators.0.kind=llama_guard"])


def test_bad_yaml_files_fail_before_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("policy:\n  sourc: tiny-random\n")
    with pytest.raises(ConfigError, match=r"policy\.sourc: unknown key; allowed here: .*source"):
        load_config(typo)
    with pytest.raises(ConfigError, match="presets: "):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.beta"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config("tiny", ["judge.evaluators.7.kind=probe"])


def test_user_yaml_file_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("run:\n  name: mine\npolicy:\n  source: tiny-random\ntrain:\n  beta: 0.3\n")
    config = load_config(path, ["loop.iterations=1"])
    assert (config.run.name, config.train.beta, config.loop.iterations) == ("mine", 0.3, 1)


def test_preset_name_is_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()  # e.g. the demo's own run folder
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").run.name == "demo"


def test_the_audit_judge_shares_no_trained_evaluator_with_the_training_judge():
    demo = load_config("demo")
    assert [(e.kind, e.model) for e in demo.evaluate.judge.evaluators] == [
        ("refusal", None),
        ("probe", "audit"),
    ]
    assert ("probe", None) in [(e.kind, e.model) for e in demo.judge.evaluators]
    gpu = load_config("cluster-gpu")  # Llama Guard trains the loop; the audit probe grades it
    assert not {e.kind for e in gpu.evaluate.judge.evaluators} & {"llama_guard", "reward_model"}
    with pytest.raises(ConfigError, match=r"evaluate.judge shares probe \(train\) with judge"):
        load_config("demo", ["evaluate.judge.evaluators.1.model=train"])
    with pytest.raises(ConfigError, match="evaluate.judge shares llama_guard"):
        guard = "[{kind: llama_guard, model: meta-llama/Llama-Guard-3-8B}]"
        load_config("cluster-gpu", [f"evaluate.judge.evaluators={guard}"])
    # the refusal matcher learns nothing: both judges may use it (tiny's do)
    tiny = load_config("tiny")
    assert [e.kind for e in tiny.evaluate.judge.evaluators] == ["refusal"]


def test_a_prefill_needs_a_local_engine_and_validation_whole_weights():
    endpoint = ["policy.endpoint.base_url=http://127.0.0.1:1/v1", "policy.endpoint.model=m"]
    with pytest.raises(ConfigError, match="sampling.prefill needs a local engine"):
        load_config("tiny", ["sampling.prefill=I can't", *endpoint])
    assert load_config("tiny", endpoint).policy.endpoint is not None
    zero3 = ["train.strategy=deepspeed", "train.zero_stage=3"]
    with pytest.raises(ConfigError, match="needs whole weights"):
        load_config("tiny", zero3)
    assert load_config("tiny", [*zero3, "loop.validation_prompts=0"]).train.zero_stage == 3


def test_config_errors_never_echo_a_file_that_is_not_a_config(tmp_path):
    """A wrong --config or --judge-config (a secret, say) is named and located, never quoted."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("token: [hunter2-do-not-print\nmore: hunter3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column \d+\)") as err:
        load_config(secret)
    assert "hunter" not in str(err.value)
    # A mapping of strange keys: the keys (cut short) help with typos; values are cut short too,
    # and a file of many bad lines gives a bounded message.
    lines = [f"key{i}_{'s' * 100}: value" for i in range(50)]
    secret.write_text("\n".join(lines) + "\nrun: {name: " + "v" * 200 + "}\ntrain: {beta: [1]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(secret)
    message = str(err.value)
    assert "s" * 50 not in message and "v" * 50 not in message and "... and" in message
    assert len(message.splitlines()) <= 12


def test_a_user_yaml_builds_on_a_preset_or_another_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\nrun:\n  name: mine\ntrain:\n  beta: 0.3\n")
    config, demo = load_config(mine), load_config("demo")
    assert (config.run.name, config.train.beta) == ("mine", 0.3)
    # everything else is the demo's: sections merge key by key
    assert config.run.seed == demo.run.seed and config.train.epochs == demo.train.epochs
    assert config.sampling == demo.sampling and config.policy == demo.policy
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../mine.yaml\nloop:\n  iterations: 1\n")  # relative to the file
    config = load_config(child, ["train.epochs=3"])
    assert (config.run.name, config.train.beta, config.loop.iterations) == ("mine", 0.3, 1)
    assert config.train.epochs == 3 and config.sampling == demo.sampling


def test_config_bases_fail_clearly(tmp_path):
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b.yaml\n")
    loop_b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop_a)
    missing = tmp_path / "m.yaml"
    missing.write_text("base: nope\n")
    with pytest.raises(ConfigError, match="unknown config '.*nope'.*presets"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [demo]\n")
    with pytest.raises(ConfigError, match="base must name a preset or a YAML file"):
        load_config(bad)


def test_renamed_keys_say_their_new_name():
    with pytest.raises(ConfigError, match=r"train\.w_s: renamed train\.loss_w_safety"):
        load_config("tiny", ["train.w_s=0"])
    with pytest.raises(ConfigError, match=r"pairs\.w_helpful: renamed pairs\.rank_w_helpfulness"):
        load_config("tiny", ["pairs.w_helpful=1"])
    with pytest.raises(ConfigError, match=r"pairs\.mode: 'scalarised' was renamed 'weighted'"):
        load_config("tiny", ["pairs.mode=scalarised"])


def test_the_recipe_is_a_config_field_and_checks_the_loss():
    assert load_config("tiny").run.recipe == "selfmoa"
    assert load_config("tiny", ["run.recipe=pt-align"]).run.recipe == "pt_align"
    assert load_config("tiny", ["run.recipe=pt_align", "train.loss=pt_align"]).train.loss
    with pytest.raises(ConfigError, match="trains on positive/toxic triples"):
        load_config("tiny", ["run.recipe=combined", "train.loss=pt_align"])
    with pytest.raises(ConfigError, match="train.unlikelihood needs pairs"):
        load_config("tiny", ["train.unlikelihood=true"])
    with pytest.raises(ConfigError, match=r"run\.recipe"):
        load_config("tiny", ["run.recipe=dpo"])


def test_the_loss_names_an_objective_module():
    from selfmoa_ray.training import objectives

    assert objectives.names() == ["dpo", "ipo", "modpo", "pt_align", "scalarised_dpo"]
    with pytest.raises(
        ConfigError, match=r"train\.loss 'dpoo' is not an objective; one of dpo, ipo"
    ):
        load_config("tiny", ["train.loss=dpoo"])
    for name in objectives.names():
        objective = objectives.get(name)
        assert objective.name == name and "prompt" in objective.columns
        assert objective.reference == (objective.rows == "pairs")
