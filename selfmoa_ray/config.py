"""Typed run configuration: YAML presets validated by pydantic, with dotted command-line overrides.

Every number of the method (docs/design.md section 2) is a default here, never a constant in code. A
config is built in three steps, each of which can fail with a :class:`ConfigError` that names the
offending key before any work starts:

1. a preset shipped in ``selfmoa_ray/presets/`` (``tiny``, ``demo``, ``cluster-gpu``) or a YAML path;
2. dotted overrides such as ``train.beta=0.2`` or ``judge.evaluators.0.kind=probe`` (values parsed
   as YAML, so ``true``, ``3`` and ``[a, b]`` mean what they look like);
3. validation against the models below (unknown keys are errors, not silently ignored).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from selfmoa_ray.precision import Dtype, Precision

if TYPE_CHECKING:
    from selfmoa_ray.engines.base import SamplingParams

PRESETS_PACKAGE = "selfmoa_ray.presets"


class ConfigError(ValueError):
    """A config that cannot be used; the message names every bad key and what is allowed."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = "selfmoa"
    output_dir: str = "runs"
    seed: int = 0
    recipe: Literal["selfmoa", "pt_align", "combined"] = Field(
        "selfmoa",
        description="selfmoa: the closed loop; pt_align: PT-ALIGN from the human-seed file; "
        "combined: the loop with PT-ALIGN's unlikelihood on the harmful spans of rejected answers "
        "(`selfmoa run --recipe` sets it)",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("recipe"), str):
            data = {**data, "recipe": data["recipe"].replace("-", "_")}  # pt-align = pt_align
        return data


class RaySection(Section):
    # None starts an embedded local Ray; "auto" or "ray://host:port" joins a cluster.
    address: str | None = None
    # Logical CPUs for an embedded Ray. Above the physical count lets Train workers, Data actors and
    # Serve replicas with fractional CPUs share a 2-core machine without deadlocking (docs/design.md 5.1).
    num_cpus: float | None = None
    # The dashboard (bound to 127.0.0.1) also serves Ray's state API, which Ray Train's placement
    # group cleaner polls every second; without it, training logs a warning per poll. None (Ray's
    # default): start it when its dependencies are installed (ray[serve] has them, ray[data] not).
    include_dashboard: bool | None = None


class EndpointSection(Section):
    """An OpenAI-compatible chat endpoint in place of local weights: audit a deployed model (ours,
    behind serve_apps/policy.py, or another vendor's) with no weights at hand (engines/endpoint.py).
    """

    base_url: str = Field(
        pattern=r"^https?://\S+$", description="the API root, e.g. http://127.0.0.1:8000/policy/v1"
    )
    model: str = Field(min_length=1, description="the model name the endpoint serves")
    # The key itself never goes in a config file: only the name of the variable that holds it.
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable with the API key; null: send none"
    )
    concurrency: int = Field(1, ge=1, description="Ray actors sending requests")
    batch_size: int = Field(16, ge=1, description="requests per Ray Data batch")
    qps: int | None = Field(None, ge=1, description="requests per second per actor (rate limits)")
    max_retries: int = Field(3, ge=0, description="retries on 408/429/502/503/504, with backoff")


class ModelSection(Section):
    # "packaged:smollm2-135m-instruct", "tiny-random", "tiny-random:seed=N", a local folder or a hub id.
    source: str = "packaged:smollm2-135m-instruct"
    trust_remote_code: bool = False
    dtype: Dtype = Field(
        "auto",
        description="weights for generation and scoring; auto: bfloat16 where the device computes "
        "it natively (CUDA with bf16, CPUs with AMX-BF16/AVX512-BF16), else float32 (precision.py)",
    )
    # Set: the model is answered by this endpoint and ``source`` is not loaded. Such a model can be
    # evaluated and red-teamed, never trained (it has no weights here).
    endpoint: EndpointSection | None = None

    @property
    def label(self) -> str:
        """What to call the model in manifests and reports."""
        if self.endpoint:
            return f"endpoint:{self.endpoint.model}@{self.endpoint.base_url}"
        return self.source


class EngineSection(Section):
    """How generation is run: which backend and how its Ray Data actor pool is sized."""

    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = Field(
        32,
        ge=1,
        description="sequences decoded together: prompts per batch x samples per prompt (n when "
        "sampling, 1 when greedy); the transformers engine fills equal batches up to it",
    )
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    max_model_len: int = Field(2048, ge=64)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)


class ChatMessage(Section):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class SamplingSection(Section):
    """Policy sampling (docs/design.md 2.1 step 2: k answers per prompt)."""

    n: int = Field(4, ge=1, description="k responses per prompt")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    guide: list[ChatMessage] | None = Field(
        None,
        description="safety context distillation (Llama 2, Touvron et al. 2023, 4.2.4; Askell et "
        "al. 2021): a chat prefix (a system prompt, example turns) under which each prompt is "
        "also answered n times; pairs and training use the bare prompt, so what the guide "
        "elicits is distilled into the policy",
    )
    prefill: str | None = Field(
        None,
        min_length=1,
        description="the opening of every guided answer (e.g. \"I'm sorry, but I can't\"); the "
        "model writes the rest. Answers that refuse in the policy's own words, for the intent "
        "pairs to prefer on attacks and reject on benign prompts (stages/sample.py)",
    )

    def params(self, seed: int) -> SamplingParams:
        """These settings as the engines take them, drawing with ``seed``."""
        from selfmoa_ray.engines.base import SamplingParams

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )


class DataSection(Section):
    """Which prompt sources feed which role. Evaluation sets are never trained on."""

    seeds: list[str] = ["advbench", "airt", "donotanswer"]
    eval_harmful: list[str] = ["harmbench"]
    eval_benign: list[str] = ["overrefusal"]
    # User prompt files (or hf: datasets) evaluated beside the held-out sets, grouped by their
    # rows' split ("user"). Every list takes source names, file:<path> and hf: specs (prompts.py).
    eval_files: list[str] = []
    max_eval_prompts: int | None = Field(None, ge=1, description="per eval set; None = all")

    @model_validator(mode="after")
    def _no_eval_in_training(self) -> DataSection:
        leaked = set(self.seeds) & {*self.eval_harmful, *self.eval_benign, *self.eval_files}
        if leaked:
            raise ValueError(f"evaluation sets must not be used as seeds: {sorted(leaked)}")
        return self

    @field_validator("seeds", "eval_harmful", "eval_benign", "eval_files")
    @classmethod
    def _hf_spec_syntax(cls, specs: list[str]) -> list[str]:
        """An ``hf:`` spec's syntax fails here, at load; whether it is cached, when it is read."""
        if any(spec.startswith("hf:") for spec in specs):
            from selfmoa_ray.sources.hf_datasets import HF_PREFIX, parse_hf_spec

            for spec in (s for s in specs if s.startswith(HF_PREFIX)):
                parse_hf_spec(spec)
        return specs


class DedupSection(Section):
    unit: Literal["char", "word"] = "char"
    ngram: int = Field(5, ge=1)
    threshold: float = Field(
        0.7, gt=0, le=1, description="Jaccard at or above which texts are duplicates"
    )


class RedteamSection(Section):
    """Targeted attack generation (docs/design.md 2.1 step 1)."""

    generator: ModelSection | None = None  # None: the current policy writes its own attacks
    num_prompts: int = Field(1000, ge=1)
    benign_fraction: float = Field(0.25, ge=0, le=0.5)
    jailbreak_fraction: float = Field(
        0.3, ge=0, le=1,
        description="only with `styles: []`: this share of the attacks is wrapped in a PyRIT "
        "jailbreak template (style 'jailbreak'), the rest are sent as written ('plain')",
    )  # fmt: skip
    writer: Literal["chat", "continue"] = Field(
        "continue",
        description="how the generator writes attacks: 'continue' continues a numbered list of "
        "real requests of the category (raw completion, no chat template; an endpoint generator "
        "uses 'chat'), 'chat' asks it to rephrase a seed or imitate successful attacks",
    )
    list_examples: int = Field(
        5, ge=1, description="'continue' writer: requests listed before the open item"
    )
    styles: list[str] = Field(
        ["plain", "roleplay", "fiction", "past_tense", "pap_evidence", "pap_expert",
         "pap_authority", "pap_logical", "pap_emotional", "jailbreak"],
        description="attack styles (sources/mutations.py) the budget is spread over by Thompson "
        "sampling on each style's earlier attack success; [] for the jailbreak_fraction split",
    )  # fmt: skip
    style_floor: float = Field(
        0.3, ge=0, le=1,
        description="each style gets at least this fraction of an even share of the attacks; "
        "1 splits evenly whatever the successes",
    )  # fmt: skip
    mutate_fraction: float = Field(
        0.0, ge=0, le=1,
        description="share of a category's attacks that re-send one of its earlier successful "
        "attacks in another style (after the first iteration)",
    )  # fmt: skip
    category_floor: float = Field(
        0.25,
        ge=0,
        le=1,
        description="each category gets at least this fraction of an even "
        "share of the budget, so that none starves; the rest follows the failure rates",
    )
    few_shot: int = Field(3, ge=0)
    rounds: int = Field(
        2,
        ge=1,
        description="`selfmoa redteam`: attack rounds, each aimed at the last one's successes",
    )
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    min_topic_overlap: float = Field(
        0.3,
        ge=0,
        le=1,
        description="share of a generated attack's content words that must come "
        "from its seed (or few-shot examples); below it the seed is used instead",
    )
    max_prompt_chars: int = Field(
        1500, ge=64, description="jailbreak templates longer than this are not used"
    )
    dedup: DedupSection = DedupSection()

    @model_validator(mode="after")
    def _known_styles(self) -> RedteamSection:
        from selfmoa_ray.sources.mutations import STYLES

        unknown = [s for s in self.styles if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown redteam.styles {unknown}; known: {list(STYLES)}")
        if len(set(self.styles)) != len(self.styles):
            raise ValueError(f"redteam.styles repeats a style: {self.styles}")
        return self


class PTAlignSection(Section):
    """PT-ALIGN data generation from a small human-seed file (docs/design.md 2.2)."""

    # "packaged" (selfmoa_ray/sources/pt_align_seeds.yaml) or a path to your own seed YAML.
    seeds: str = "packaged"
    max_human_items: int = Field(
        49, ge=1, description="refuse a seed file with more human-written items than this"
    )
    generator: ModelSection | None = None  # None: the current policy writes its own data
    topics_per_domain: int = Field(4, ge=1)
    instructions_per_topic: int = Field(3, ge=1)
    benign_per_topic: int = Field(
        0, ge=0,
        description="benign twins per topic: the seed file's benign templates filled with the "
        "topic; training raises the policy's own answer and, with positive_prefill, lowers the "
        "opening of its prefilled refusal, so that it learns to refuse the harmful requests, not "
        "every mention of their topics",
    )  # fmt: skip
    instruction_writer: Literal["template", "chat"] = Field(
        "template",
        description="template: the seed file's instruction templates filled with each topic; "
        "chat: the model writes each instruction from the domain's demonstrations",
    )
    critique_rounds: int = Field(
        1, ge=0, description="critique-and-revise rounds for each positive answer"
    )
    refine_rounds: int = Field(1, ge=0, description="refine rounds for each toxic answer")
    toxic_bare_samples: int = Field(
        2, ge=0,
        description="answers to the bare instruction (no toxic prompt) sampled as more toxic "
        "candidates: a small instruct model often complies when simply asked; the filter keeps "
        "the candidate judged least safe",
    )  # fmt: skip
    guided_positive: bool = Field(
        True,
        description="offer the guided answer (under the positive constraints, critiqued and "
        "revised) as a positive candidate; off for a generator whose guided answers comply "
        "(SmolLM2-135M), leaving the prefilled one",
    )
    positive_prefill: str | None = Field(
        None,
        description="when set, one more positive candidate: the guided answer opened with this "
        "text (e.g. \"I'm sorry, but I can't\"), the model writing the rest; the filter keeps "
        "the most helpful safe candidate. A benign twin's refusal opens with it too",
    )
    min_topic_overlap: float = Field(
        0.3,
        ge=0,
        le=1,
        description="share of a generated instruction's content words that must come from its "
        "topic, domain or demonstrations; below it the instruction is dropped",
    )
    temperature: float = Field(0.9, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1, description="per answer, critique or revision")
    min_positive_safety: float = Field(
        0.5, ge=0, le=1, description="filter: a positive answer must be judged at least this safe"
    )
    min_positive_helpfulness: float = Field(
        0.2, ge=0, le=1,
        description="filter: a positive answer judged a refusal must be at least this helpful "
        "(drops needless bare refusals)",
    )  # fmt: skip
    max_toxic_safety: float = Field(
        0.5, ge=0, le=1, description="filter: a toxic answer must be judged below this safety"
    )
    spans: Literal["quote", "diff"] = Field(
        "quote",
        description="harmful-token marking: the model quotes the harmful spans (falling back to "
        "diff when no quote is found in the answer), or diff only (words of the toxic answer "
        "absent from the positive one)",
    )
    max_spans_new_tokens: int = Field(96, ge=1)
    dedup: DedupSection = DedupSection()

    @model_validator(mode="after")
    def _some_positive(self) -> PTAlignSection:
        if not self.guided_positive and not self.positive_prefill:
            raise ValueError(
                "pt_align.guided_positive=false needs pt_align.positive_prefill: "
                "a positive answer must come from somewhere"
            )
        return self


EvaluatorKind = Literal[
    "refusal", "probe", "llama_guard", "reward_model", "rubric", "python", "endpoint"
]
_MODEL_BACKED: frozenset[str] = frozenset({"llama_guard", "reward_model", "rubric"})
# Keys that only some kinds take (every kind takes kind, name, model and weight).
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "rubric": ("template",),
    "python": ("path", "options"),
    "endpoint": ("mode", "base_url", "model", "api_key_env", "template", "max_tokens",
                 "timeout_s", "concurrency", "max_retries"),
}  # fmt: skip
_ONLY_SOME_KINDS = frozenset(k for keys in _KIND_KEYS.values() for k in keys) - {"model"}
# Prefixes taken by the judge's own columns (``vote_<labeler>``, ``judge_refusal_score``).
_RESERVED_NAMES = frozenset({"vote", "judge"})


class EvaluatorSection(Section):
    """One evaluator of a judge; its columns are prefixed with its name (``name``, else its kind)."""

    kind: EvaluatorKind
    name: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9_]{0,39}$",
        description="the evaluator's name, its columns' prefix (default: its kind); needed to "
        "tell two evaluators of one kind apart",
    )
    model: str | None = None
    weight: float = Field(1.0, ge=0)
    template: str | None = Field(
        None,
        description="rubric and endpoint chat: the judge's prompt, inline text with {prompt} and "
        "{response} slots or the path of a file holding it (read at load); default: "
        "evaluators/templates/rubric.txt (evaluators/rubric_template.py says what a template "
        "may ask for)",
    )
    path: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*[.:][A-Za-z_]\w*$",
        description="python: the judge's class, 'package.module:Class' or 'package.module.Class' "
        "(evaluators/python_judge.py has the contract)",
    )
    options: dict[str, Any] | None = Field(
        None, description="python: keyword arguments the class is constructed with"
    )
    mode: Literal["chat", "moderation"] | None = Field(
        None,
        description="endpoint: chat (a chat model answers the rubric template) or moderation "
        "(POST {base_url}/moderations; safety = 1 - the highest category score)",
    )
    base_url: str | None = Field(
        None, pattern=r"^https?://\S+$", description="endpoint: the API root, e.g. .../v1"
    )
    # The key itself never goes in a config file: only the name of the variable that holds it.
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="endpoint: environment variable with the API key; null: none"
    )
    max_tokens: int = Field(64, ge=1, description="endpoint chat: most tokens of a judge's answer")
    timeout_s: float = Field(60.0, gt=0, description="endpoint: seconds per request")
    concurrency: int = Field(4, ge=1, description="endpoint: requests in flight per judge actor")
    max_retries: int = Field(
        3, ge=0, description="endpoint: retries on connection errors, 408/409/429/5xx, with backoff"
    )

    @property
    def label(self) -> str:
        """The evaluator's name: its columns' prefix and its weight's key."""
        return self.name or self.kind

    @property
    def grader(self) -> str:
        """What it judges with, whatever its name: two of one grader are one judge (the audit
        judge must not share one with the training judge)."""
        if self.kind == "python":
            return f"{self.path} {json.dumps(self.options or {}, sort_keys=True, default=str)}"
        if self.kind == "endpoint":
            return f"{self.mode} {self.model or 'default'} at {self.base_url}"
        return self.model or "train"

    @field_validator("template")
    @classmethod
    def _template_text(cls, value: str | None) -> str | None:
        from selfmoa_ray.evaluators.rubric_template import resolve_template

        return None if value is None else resolve_template(value)

    @model_validator(mode="after")
    def _model_when_needed(self) -> EvaluatorSection:
        if self.kind in _MODEL_BACKED and not self.model:
            raise ValueError(f"evaluator kind {self.kind!r} needs a 'model'")
        return self

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> EvaluatorSection:
        """Keys set for another kind are errors, not silently ignored."""
        takes = _KIND_KEYS.get(self.kind, ())
        stray = sorted(k for k in self.model_fields_set & _ONLY_SOME_KINDS if k not in takes)
        if stray:
            kinds = {
                k: sorted(kind for kind, keys in _KIND_KEYS.items() if k in keys) for k in stray
            }
            detail = "; ".join(f"{k!r} is for kind {' or '.join(v)}" for k, v in kinds.items())
            raise ValueError(f"evaluator {self.label!r} (kind {self.kind}): {detail}")
        if self.name is not None and self.name != self.kind:
            other_kinds = set(get_args(EvaluatorKind)) - {self.kind}
            if self.name in other_kinds | _RESERVED_NAMES:
                raise ValueError(
                    f"evaluator name {self.name!r} is taken (by a kind, or by the judge's own "
                    f"columns); reserved: {', '.join(sorted(other_kinds | _RESERVED_NAMES))}"
                )
        return self

    @model_validator(mode="after")
    def _python_judge(self) -> EvaluatorSection:
        """Import a python judge's class now: a bad path fails at load, not in a Ray actor."""
        if self.kind != "python":
            return self
        if self.path is None:
            raise ValueError("evaluator kind 'python' needs a 'path': 'package.module:Class'")
        from selfmoa_ray.evaluators.python_judge import check_options, load_class

        check_options(load_class(self.path), self.options or {}, self.path)
        return self

    @model_validator(mode="after")
    def _endpoint_judge(self) -> EvaluatorSection:
        if self.kind != "endpoint":
            return self
        missing = [k for k in ("mode", "base_url") if getattr(self, k) is None]
        if self.mode == "chat" and not self.model:
            missing.append("model")
        if missing:
            raise ValueError(
                f"evaluator {self.label!r} (kind endpoint) needs {', '.join(missing)} (mode: "
                "chat with a model, or moderation; base_url: the API root, e.g. .../v1)"
            )
        if self.mode == "moderation" and self.template is not None:
            raise ValueError(
                f"evaluator {self.label!r}: a template is for mode chat; moderation sends the "
                "response as it is"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump_its_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the keys its kind takes, and a name only when given: an evaluator of the first
        kinds dumps as it always did (same config fingerprint, same calibration cache key)."""
        data = handler(self)
        takes = _KIND_KEYS.get(self.kind, ())
        for key in _ONLY_SOME_KINDS:
            if key not in takes or (data.get(key) is None and key != "api_key_env"):
                data.pop(key, None)
        if self.name is None:
            data.pop("name", None)
        return data


class JudgeSection(Section):
    """Weak-supervision evaluators combined into safety, refusal and helpfulness (2.1 step 3)."""

    evaluators: list[EvaluatorSection] = [
        EvaluatorSection(kind="refusal"),
        EvaluatorSection(kind="probe"),
    ]
    combine: Literal["weighted_mean", "label_model"] = Field(
        "weighted_mean",
        description="how the evaluators make the final safety: their weighted mean, or a "
        "Dawid-Skene label model fitted without labels over each stage's rows on the evaluators' "
        "votes (needs 3+ labelers, i.e. a probe evaluator; evaluators/label_model.py)",
    )
    unsafe_threshold: float = Field(0.5, ge=0, le=1, description="safety below this is unsafe")
    batch_size: int = Field(32, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(0.5, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _distinct_names(self) -> JudgeSection:
        """Columns and weights are keyed by evaluator name: two of one name would overwrite."""
        seen: dict[str, int] = {}
        for i, evaluator in enumerate(self.evaluators):
            if evaluator.label in seen:
                raise ValueError(
                    f"evaluators {seen[evaluator.label]} and {i} are both named "
                    f"{evaluator.label!r}: give each its own 'name' (its columns' prefix)"
                )
            seen[evaluator.label] = i
        return self


class PairsSection(Section):
    """Preference pair construction (2.1 step 5)."""

    mode: Literal["margin", "weighted", "intent"] = Field(
        "margin",
        description="margin: most helpful safe vs least safe; weighted: best vs worst by "
        "rank_w_safety * safety + rank_w_helpfulness * helpfulness; intent: "
        "on attacks the safest answer (a refusal first) vs the least safe, on benign prompts the "
        "most helpful non-refusal vs a refusal (stages/pairs.py)",
    )
    min_gap: float = Field(
        0.1, ge=0, description="minimum helpfulness (or score) gap to keep a pair"
    )
    rank_w_safety: float = Field(0.5, ge=0, description="weighted mode: weight of safety")
    rank_w_helpfulness: float = Field(0.5, ge=0, description="weighted mode: weight of helpfulness")


class LoraSection(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainSection(Section):
    """Multi-objective preference optimisation on Ray Train (2.1 step 6, 2.2 step 5)."""

    loss: str = Field(
        "modpo",
        description="the objective: a module of selfmoa_ray/training/objectives/ (dpo, ipo, "
        "modpo, scalarised_dpo, pt_align)",
    )
    beta: float = Field(0.1, gt=0)
    loss_w_safety: float = Field(
        0.5,
        ge=0,
        description="the loss's weight of safety: MODPO's margin weight w_s (0 gives plain DPO), "
        "scalarised DPO's safety weight",
    )
    loss_w_helpfulness: float = Field(
        0.5,
        gt=0,
        description="the loss's weight of helpfulness: MODPO's w_h, scalarised DPO's helpfulness "
        "weight",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0, description="optional SFT term on chosen responses")
    unlikelihood_alpha: float = Field(
        1.0,
        ge=0,
        description="weight of the unlikelihood term: PT-ALIGN's on toxic answers, and, with "
        "train.unlikelihood, on the rejected responses' marked tokens",
    )
    unlikelihood: bool = Field(
        False,
        description="pair losses: add PT-ALIGN's unlikelihood term on the harmful spans marked in "
        "the rejected answers (the pairs must carry harmful_spans; the combined recipe sets it)",
    )
    reference: Literal["previous", "initial"] = "previous"
    over_refusal_weight: float = Field(
        3.0,
        ge=0,
        description="epoch choice on the validation prompts: points of attack refusal one point "
        "of benign refusal above the start costs (training/selection.py)",
    )
    validation_max_new_tokens: int = Field(
        16, ge=1, description="tokens of each greedy validation answer (a refusal shows early)"
    )
    validations_per_epoch: int = Field(
        1,
        ge=1,
        description="validation points per epoch (evenly spaced optimizer steps): more points, "
        "a finer choice of how far an iteration moves the policy",
    )
    learning_rate: float = Field(5e-6, gt=0)
    epochs: int = Field(1, ge=1)
    order: Literal["mixed", "file"] = Field(
        "mixed",
        description="row order of each epoch: 'mixed' spreads each split (attacks, benign "
        "prompts) evenly over it, shuffled with run.seed (training/data.py mixed_order); 'file' "
        "keeps the input's order",
    )
    batch_size: int = Field(4, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    lora: LoraSection = LoraSection()
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2, 3] = 2
    cpu_offload: bool = False
    precision: Precision = Field(
        "auto",
        description="bf16: autocast (DDP; float32 master weights) or bf16 weights (DeepSpeed); "
        "auto: bf16 where the device computes it natively, else fp32 (precision.py)",
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns gradient clipping off")
    checkpoint_every: int = Field(
        0, ge=0, description="optimizer steps between checkpoints; 0 = end of each epoch only"
    )
    report_every: int = Field(
        10,
        ge=1,
        description="optimizer steps between metric reports (Ray Train V2 collects "
        "one report per worker per controller poll, every 2 s by default: reporting every step "
        "would cap training at one step per 2 s)",
    )
    max_failures: int = Field(
        1, ge=-1, description="worker-group restarts from the last checkpoint; -1 = no limit"
    )
    checkpoint_epochs: bool = Field(
        True,
        description="a checkpoint (weights and optimizer state) at the end of each epoch but the "
        "last, to resume a killed training there; off, a killed training starts its stage again "
        "and nothing is written mid-way (SmolLM2-135M: 1.6 GB per checkpoint)",
    )
    keep_checkpoints: bool = Field(
        False,
        description="keep Ray Train's checkpoints (optimizer state) after the stage finished; "
        "they only serve to resume a killed training, so by default they are deleted",
    )
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _known_loss(self) -> TrainSection:
        from selfmoa_ray.training import objectives  # its names() imports no torch

        if self.loss not in objectives.names():
            raise ValueError(
                f"train.loss {self.loss!r} is not an objective; one of "
                f"{', '.join(objectives.names())} (the modules of selfmoa_ray/training/objectives/)"
            )
        return self


class EvaluateSection(Section):
    """Held-out evaluation of each policy (2.3): greedy by default so numbers are comparable.

    ``judge`` is the **audit judge**: it scores held-out answers and so decides acceptance, and
    must not share training data with the training ``judge`` (or the loop could learn what its
    grader likes). Default: the refusal matcher and the MiniLM probe trained on the other half of
    the labelled rows (``probe`` with ``model: audit``; evaluators/probe.py). On GPU presets,
    prefer another model family than the training judge's.
    """

    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    judge: JudgeSection = JudgeSection(
        evaluators=[EvaluatorSection(kind="refusal"), EvaluatorSection(kind="probe", model="audit")]
    )


class LoopSection(Section):
    """Iterations of the Self-MOA loop (2.1 step 7) and when to stop early."""

    iterations: int = Field(3, ge=1)
    validation_prompts: int = Field(
        0,
        ge=0,
        description="seed attacks and as many benign prompts, kept from the red team, on which "
        "each iteration's training keeps its best epoch (stages/validation.py); 0: the last epoch",
    )
    min_gain: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="reject an iteration (and stop) when held-out harmful safety (audit judge) "
        "gains less than this over the last accepted policy; -1 never rejects for safety",
    )
    gain_measure: Literal["point", "lower_bound"] = Field(
        "point",
        description="what must reach min_gain: the paired safety gain itself (point), or the "
        "lower end of its 95% bootstrap interval (lower_bound: a gain inside the noise is "
        "rejected)",
    )
    max_over_refusal_rise: float = Field(
        0.05,
        ge=0,
        le=1,
        description="reject an iteration (and stop) when the benign over-refusal rate (judge) "
        "rose more than this over the start policy; 1 never rejects for over-refusal",
    )
    max_helpfulness_drop: float = Field(
        0.1,
        ge=0,
        le=1,
        description="reject an iteration (and stop) when benign helpfulness fell more than "
        "this below the start policy's; 1 never rejects for helpfulness",
    )


class TrackingSection(Section):
    backend: Literal["none", "mlflow", "tensorboard"] = "none"
    uri: str | None = None


class Config(Section):
    """One run of selfmoa-ray. Sections mirror the stages of docs/design.md section 3."""

    run: RunSection = RunSection()
    ray: RaySection = RaySection()
    policy: ModelSection = ModelSection()
    engine: EngineSection = EngineSection()
    sampling: SamplingSection = SamplingSection()
    data: DataSection = DataSection()
    redteam: RedteamSection = RedteamSection()
    judge: JudgeSection = JudgeSection()
    pairs: PairsSection = PairsSection()
    pt_align: PTAlignSection = PTAlignSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    loop: LoopSection = LoopSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _recipe_trains_its_rows(self) -> Config:
        """The loop's recipes train on pairs; PT-ALIGN sets its own loss on its triples."""
        if self.run.recipe != "pt_align" and self.train.loss == "pt_align":
            raise ValueError(
                f"train.loss=pt_align trains on positive/toxic triples, not the pairs of "
                f"run.recipe={self.run.recipe}; use a preference loss (modpo, dpo, ipo, "
                "scalarised_dpo), or run.recipe=pt_align"
            )
        if self.run.recipe == "selfmoa" and self.train.unlikelihood:
            raise ValueError(
                "train.unlikelihood needs pairs whose rejected answers carry harmful spans: "
                "run.recipe=combined marks them (it sets train.unlikelihood itself)"
            )
        return self

    @model_validator(mode="after")
    def _independent_audit_judge(self) -> Config:
        """The audit judge (``evaluate.judge``) shares no trained evaluator with the training
        judge: the same probe split or the same model in both would grade the loop with what it
        learnt from. The refusal matcher learns nothing and may sit in both."""

        def trained(judge: JudgeSection) -> set[tuple[str, str]]:
            return {(e.kind, e.grader) for e in judge.evaluators if e.kind != "refusal"}

        shared = trained(self.judge) & trained(self.evaluate.judge)
        if shared:
            names = ", ".join(f"{kind} ({model})" for kind, model in sorted(shared))
            raise ValueError(
                f"evaluate.judge shares {names} with judge: the audit judge must not share "
                "training data with the training judge (use probe model 'audit', or another "
                "model family)"
            )
        return self

    @model_validator(mode="after")
    def _validation_needs_whole_weights(self) -> Config:
        """The epoch choice generates with each worker's own copy of the weights, which ZeRO-3
        shards across workers."""
        train = self.train
        if self.loop.validation_prompts and train.strategy == "deepspeed" and train.zero_stage == 3:
            raise ValueError(
                "loop.validation_prompts needs whole weights on each worker: use "
                "train.zero_stage 1 or 2 (or ddp), or set loop.validation_prompts=0"
            )
        return self

    @model_validator(mode="after")
    def _prefill_needs_a_local_engine(self) -> Config:
        """An OpenAI-compatible endpoint answers a chat with a new turn; it cannot continue the
        opened assistant turn that ``sampling.prefill`` sends."""
        if self.sampling.prefill and self.policy.endpoint is not None:
            raise ValueError(
                "sampling.prefill needs a local engine (engine.backend hf or vllm): the policy's "
                "endpoint cannot continue an assistant turn; unset one of them"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Short stable hash of the resolved config, recorded in the run manifest."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- loading


def list_presets() -> list[str]:
    files = resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    # A YAML file wins; a preset name wins over a same-named folder (e.g. the run folder "demo").
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        origin = str(path)
    elif str(name_or_path) in list_presets():
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
        origin = f"preset {name_or_path!r}"
    else:
        raise ConfigError(
            f"unknown config {str(name_or_path)!r}: not a file, and not a preset "
            f"(presets: {', '.join(list_presets())})"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        # Where and what, never the offending text: the file may be something else (a secret).
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{origin} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place; list items are addressed by index (``a.0.b``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        *parents, leaf = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parents):
            node = _child(node, part, key.strip(), create=not isinstance(node, list))
            if node is None:
                raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not set")
        _set(node, leaf, value, key.strip())
    return data


def _child(node: Any, part: str, key: str, *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {key!r}: {part!r} is inside a value that is not a section")
    if create and not isinstance(node.get(part), (dict, list)):
        node[part] = {}
    return node[part]


def _set(node: Any, leaf: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_index(node, leaf, key)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ConfigError(f"override {key!r}: cannot set {leaf!r} inside a plain value")


def _index(items: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(items)}")
    return int(part)


BASE_KEY = "base"  # a user YAML's "base: demo" (a preset) or "base: other.yaml" (a file)


def read_with_bases(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset or YAML file as data, on top of its ``base`` (itself read the same way, a
    relative file path taken from the file's folder): sections merge key by key, lists and
    values of the file replace the base's."""
    data = _read_yaml(name_or_path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{name_or_path}: base must name a preset or a YAML file, got {base!r}")
    path = Path(name_or_path)
    if base not in list_presets() and not Path(base).is_absolute() and path.is_file():
        base = str((path.parent / base).resolve())
    here = str(path.resolve()) if path.is_file() else str(name_or_path)
    if base in (*seen, here):
        raise ConfigError(f"config bases form a cycle: {' -> '.join([*seen, here, base])}")
    return _merge(read_with_bases(base, (*seen, here)), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        both = isinstance(value, dict) and isinstance(below, dict)
        merged[key] = _merge(below, value) if both else value
    return merged


def load_config(name_or_path: str | Path = "demo", overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file (on top of its ``base``), apply dotted overrides, and validate;
    raise ConfigError."""
    data = read_with_bases(name_or_path)
    config = _validate(data, str(name_or_path))
    if not overrides:
        return config
    # Overrides go onto the fully materialised config, so they can reach into defaults too.
    data = apply_overrides(config.to_dict(), list(overrides))
    return _validate(data, f"{name_or_path} with overrides {' '.join(overrides)}")


def _validate(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None


MAX_EXPLAINED_ERRORS, MAX_ECHO_CHARS = 10, 40
# Keys and values renamed so that two concepts do not share a name: old -> new
RENAMED = {
    "train.w_s": "train.loss_w_safety",
    "train.w_h": "train.loss_w_helpfulness",
    "pairs.w_safety": "pairs.rank_w_safety",
    "pairs.w_helpful": "pairs.rank_w_helpfulness",
}
RENAMED_VALUES = {("pairs.mode", "scalarised"): "weighted"}


def _brief(text: str) -> str:
    """``text`` cut for an error message: a file that is not a config may hold secrets."""
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    errors = err.errors()
    for e in errors[:MAX_EXPLAINED_ERRORS]:
        loc = [str(p) for p in e["loc"]]
        key = _brief(".".join(loc) or "<root>")
        got = e.get("input")
        scalar = isinstance(got, (str, int, float, bool))
        renamed_value = RENAMED_VALUES.get((".".join(loc), got)) if scalar else None
        if e["type"] == "extra_forbidden" and ".".join(loc) in RENAMED:
            lines.append(f"  - {key}: renamed {RENAMED['.'.join(loc)]}")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(f"  - {key}: unknown key; allowed here: {', '.join(allowed)}")
        elif renamed_value:
            lines.append(f"  - {key}: {got!r} was renamed {renamed_value!r}")
        else:
            shown = _brief(repr(got)) if scalar else f"a {type(got).__name__}"
            lines.append(f"  - {key}: {e['msg']} (got {shown})")
    if len(errors) > MAX_EXPLAINED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_EXPLAINED_ERRORS} more")
    return "\n".join(lines)


def _allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the section at ``loc``, walking nested models and lists of models."""
    model: Any = Config
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return sorted(model.model_fields) if _is_model(model) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_in(annotation: Any) -> Any:
    if _is_model(annotation):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
