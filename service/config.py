"""Service settings (pydantic-settings), read from ``BANDIT_ROUTER_*`` environment variables.

Nothing here is created at import time: :func:`service.app.create_app` takes a
:class:`Settings` instance, and the command line builds one per invocation.

Examples
--------
>>> s = Settings(data_dir="/tmp/router")
>>> s.resolved_database_url()
'sqlite:////tmp/router/router.db'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bandit.pricing import DEFAULT_OUTPUT_TOKENS
from streams.config import StreamsConfig

__all__ = ["Settings", "default_dim", "MINILM_DIM"]

#: The pipeline's defaults are StreamsConfig's, written once there.
_STREAMS = StreamsConfig(bootstrap="")


#: all-MiniLM-L6-v2's embedding size (bandit.featurize.MINILM_DIM; not imported from
#: there, so that reading the settings never imports the featurizers' module).
MINILM_DIM = 384
#: The policy ``serve`` gives a new tenant and ``replay`` runs: the one switch for the
#: routing default (``select`` earned more than ``linucb`` on every replay data set of
#: issue 13: docs/results.md, "Context admitted only where it pays").
DEFAULT_POLICY = "select"
_DEFAULT_DIM = {"hashing": 64, "minilm": MINILM_DIM}


def default_dim(featurizer: str) -> int:
    """The default context dimension of a featurizer: 64 for hashing, 384 for minilm.

    >>> default_dim("hashing"), default_dim("minilm")
    (64, 384)
    """
    return _DEFAULT_DIM.get(featurizer, 64)


class Settings(BaseSettings):
    """Everything the service can be configured with (immutable once built).

    Every field can be set by an environment variable of the same name in upper case with
    the prefix ``BANDIT_ROUTER_`` (``BANDIT_ROUTER_DATABASE_URL``, ``BANDIT_ROUTER_DIM``...).
    """

    model_config = SettingsConfigDict(env_prefix="BANDIT_ROUTER_", frozen=True,
                                      extra="ignore")

    data_dir: Path = Field(Path("./data"), description="Directory of the embedded SQLite "
                           "database (created if missing).")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite "
                                     "file in data_dir. PostgreSQL: postgresql+psycopg://...")
    dim: int = Field(64, ge=1, le=4096, description="Featurizer output dimension = "
                     "length of query.embedding; also the policies' context dimension "
                     "unless prototype_map is set (then the map's dim). Default: 64 with "
                     "hashing, 384 with minilm (its embedding, not projected; at most "
                     "384).")
    featurizer: Literal["hashing", "minilm"] = "hashing"
    featurizer_seed: int = 0
    hashing_version: int | None = Field(
        None, ge=1, le=4, description="Version of the hashing featurizer's vectors "
        "(bandit.featurize.HashingFeaturizer): 2 is ~2x faster than 1, with other "
        "vectors; 3 (opt-in) ~1.6x faster than 2, with other vectors again (its routing "
        "value measured ~0.015 below 2's on one of three data sets); 4 (opt-in) ~1.45x "
        "faster than 2 at 64 dims (slower from a few thousand dims), with nearly 2's "
        "vectors (3's counting, 2's projection; its routing value measured 0.003 below "
        "2's on one of three data sets). Unset: "
        "the version the newest checkpoint was learned with (an existing deployment keeps "
        "1, or 3 or 4 once it has learned with it), 2 for a first start; in distributed mode "
        "(KAFKA_BOOTSTRAP) 1; the learners' statistics record it and every process "
        "refuses another: set 2 on every replica and learner together with a fresh "
        "LEARNER_GROUP.")
    tag_block: bool = Field(
        False, description="Request tags in their own block of 16 coordinates after "
        "the text's (bandit.featurize.append_tag_block), with their own ridge "
        "(tag_ridge 1 against the text's 100), instead of hashed into the text's "
        "coordinates: the policies' dimension grows by 16. Opt-in: statistics learned "
        "without it have another dimension and featurizer spec (FEATURIZER_CHANGE); "
        "set it on every replica and learner at once, with a fresh LEARNER_GROUP.")
    featurizer_change: Literal["refuse", "start-fresh"] = Field(
        "refuse", description="When the stored statistics were learned with another "
        "featurizer (FEATURIZER, DIM, FEATURIZER_SEED or PROTOTYPE_MAP changed): refuse "
        "to start, naming the settings, or start from the models' priors (the stored "
        "statistics and feedback stay in the database, unused).")
    prototype_map: Path | None = Field(None, description="Prototype map file (bandit-router "
                                       "fit-prototypes): contexts become the soft "
                                       "assignment of the featurizer's vector (or the "
                                       "query's embedding, dim long) to its prototypes, "
                                       "and the policies' dimension the map's. Same file "
                                       "on every API replica and learner.")
    default_policy: Literal["linucb", "thompson", "select"] = Field(
        DEFAULT_POLICY, description="Policy of a new tenant: linucb, thompson or select "
        "(SelectiveThompson: each model's context admitted only where it has predicted "
        "its quality, docs/policies.md).")
    policy_seed: int | None = Field(None, description="Seed of the policies' random "
                                    "generators; None draws one from the OS.")
    epsilon: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of uniform exploration (every logged "
        "propensity >= epsilon / K, for off-policy evaluation). Unset: each policy's own "
        "default (linucb 0.01; thompson and select 0, whose sampled propensities are "
        "positive anyway: a uniform share cost select 0.02-0.15 of routing value, "
        "docs/results.md).")

    cold_start_by: Literal["added-on-tags", "arm", "tags", "new-on-tags", "context"] | None = (
        Field(None, description="Where a model's cold start is counted (PolicyConfig."
              "cold_start_by, docs/policies.md): unset, each policy's default "
              "(added-on-tags: per tag value for a model added after learning started); "
              "arm: by the model's total only, as before added-on-tags."))

    def policy_settings(self, kind_class: type) -> dict:
        """The settings every policy of ``kind_class`` takes from this process, built,
        restored or imported alike (a state's own are not kept): exploration (unset: the
        class's default), forgetting, and the cold start (unset: the class's default; a
        checkpoint written before ``cold_start_by="added-on-tags"`` stores ``"arm"``,
        which would keep an upgraded deployment off the new default)."""
        config = kind_class.Config
        return {"epsilon": config.epsilon if self.epsilon is None else self.epsilon,
                "half_life_hours": self.half_life_hours,
                "cold_start_by": (config.cold_start_by if self.cold_start_by is None
                                  else self.cold_start_by)}

    half_life_hours: float | None = Field(None, gt=0.0, description="Forgetting: an "
                                          "observation's weight halves every this many "
                                          "hours (docs/policies.md); unset keeps "
                                          "everything. Distributed mode: the same value on "
                                          "every API replica and learner.")
    checkpoint_interval_s: float = Field(60.0, gt=0.0)
    checkpoints_kept: int = Field(3, ge=1)
    # How often models and tenants changed through another replica are picked up.
    registry_refresh_s: float = Field(5.0, gt=0.0)
    decision_queue_size: int = Field(10_000, ge=1)
    decision_batch_size: int = Field(500, ge=1)
    # The writer gathers rows this long before a transaction (unless feedback waits).
    decision_flush_interval_s: float = Field(0.02, ge=0.0)
    # Decisions kept on local disk while the database is unreachable (docs/reliability.md).
    decision_buffer_size: int = Field(100_000, ge=0, description="Decisions kept (on "
                                      "disk, in feedback_buffer_dir) while the database "
                                      "is unreachable; a decide is answered once its row "
                                      "is there, and the rows are written when the "
                                      "database is back. 0 = none (kept in memory only).")
    outage_retry_s: float = Field(0.5, gt=0.0, le=60.0, description="While the "
                                  "database is unreachable it is retried (backoff) at "
                                  "least this often by the decision spool, the feedback "
                                  "buffer and the reload after a degraded start; /readyz "
                                  "also triggers a retry when it reaches the database. "
                                  "/readyz says ready about this long after the database "
                                  "is back, plus the time to write what was kept.")
    decision_durability: Literal["batched", "write-through"] = Field(
        "batched", description="batched: a decide is answered once its row is queued "
        "for the writer (a kill -9 loses at most the rows queued, normally the last "
        "flush interval's; during an outage rows are spooled before the answer). "
        "write-through: answered only after the row is committed to the database or "
        "the spool.")
    # How long a decide waits for room in a full decision queue before answering 503.
    decision_enqueue_timeout_s: float = Field(0.1, ge=0.0)
    # Request limits (service/limits.py). The schema caps candidates at 1,000 items (this
    # can lower the cap); query.text has no cap but max_text_chars (and the body size).
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body "
                                "(413 beyond).")
    max_text_chars: int = Field(1_000_000, ge=1, description="Longest query.text accepted "
                                "(422 beyond); raise max_body_bytes too for texts near "
                                "or above its size.")
    featurize_chars: int = Field(8192, ge=2, description="A longer query.text is "
                                 "featurized from its first and last featurize_chars / "
                                 "2 characters (head and tail, joined by a newline): the "
                                 "work per decide stays bounded, and the start and the "
                                 "end of a long prompt usually say what it asks.")
    max_candidates: int = Field(1000, ge=1, le=1000)
    rate_limit_per_s: float = Field(0.0, ge=0.0, description="Requests per second per "
                                    "tenant (token bucket per replica); 0 = no limit.")
    rate_limit_burst: int = Field(0, ge=0, description="Bucket size; 0 = one second's "
                                  "worth of rate_limit_per_s.")
    max_concurrent_requests: int = Field(0, ge=0, description="Requests in flight per "
                                         "process before 503; 0 = no limit.")
    admin_key: SecretStr | None = Field(None, description="Admin key; while set, the only "
                                        "one (stored admin keys are refused). When unset, "
                                        "the stored keys are the admin keys, and a first "
                                        "start generates one, stored hashed and printed "
                                        "once.")
    # /metrics labels spend and reward by tenant: not public unless asked for.
    metrics_token: SecretStr | None = Field(None, description="Bearer token that may read "
                                            "/metrics (besides the admin key); for the "
                                            "Prometheus scraper.")
    metrics_public: bool = Field(False, description="Serve /metrics without a key (only "
                                 "on a network where every client may see every tenant's "
                                 "spend).")
    # Tokens a request is assumed to use when turning a model's price into a cost: the
    # arm's prior, and each decide's per-request price estimate (input: the prompt's
    # ceil(len(text)/4) when the query has text, else prior_input_tokens; output: always
    # prior_output_tokens, corrected by what feedback reports).
    prior_input_tokens: int = Field(500, ge=0, description="Prompt tokens assumed when a "
                                    "decide sends an embedding, not text.")
    prior_output_tokens: int = Field(DEFAULT_OUTPUT_TOKENS, ge=0, description="Output "
                                     "tokens expected per request when pricing it before "
                                     "the call.")
    run_migrations: bool = Field(True, description="Apply migrations on start.")
    # Distributed mode (docs/streams.md): set kafka_bootstrap and a PostgreSQL
    # database_url; feedback then goes through Kafka to the learners (bandit-router learn).
    kafka_bootstrap: str | None = Field(None, description="Kafka bootstrap servers "
                                        "host:port[,host:port]; unset = embedded mode.")
    feedback_topic: str = _STREAMS.feedback_topic
    decisions_topic: str = _STREAMS.decisions_topic
    dead_letter_topic: str = _STREAMS.dead_letter_topic
    topic_partitions: int = Field(_STREAMS.partitions, ge=1, description="Partitions of "
                                  "topics created by the learner.")
    learner_group: str = _STREAMS.group_id
    learner_metrics_port: int = Field(9464, ge=0, le=65535)
    learner_max_poll_records: int = Field(_STREAMS.max_poll_records, ge=1)
    learner_feedback_rows: bool = Field(_STREAMS.feedback_rows, description="The learners "
                                        "write every applied event into the feedback table "
                                        "(shown by GET /v1/decisions/{id}, as in embedded "
                                        "mode).")
    # Feedback that arrives before its decision is written is retried this long.
    feedback_pending_timeout_s: float = Field(_STREAMS.pending_timeout_s, ge=0.0)
    # Feedback accepted while the database is unreachable (docs/reliability.md).
    feedback_buffer_size: int = Field(10_000, ge=0, description="Feedback events kept "
                                      "(on disk, in feedback_buffer_dir) while the database "
                                      "is unreachable, answered 202 'buffered' and stored "
                                      "when it is back; beyond that 503 + Retry-After. 0 = "
                                      "no buffer (503 at once).")
    feedback_buffer_dir: Path | None = Field(None, description="Directory of the feedback "
                                             "buffer's file; default data_dir.")
    feedback_retention_hours: float = Field(_STREAMS.retention_hours, gt=0.0)
    # A decide reserves its predicted cost against the tenant's budget until feedback
    # reports the real one (service/README.md, "Reservations").
    reservation_stale_hours: float = Field(24.0, gt=0.0, le=24.0 * 365 * 100,
                                           description="A reservation (a "
                                           "decision whose feedback never reported a "
                                           "cost) older than this is listed by GET "
                                           "/v1/admin/reservations and released by POST "
                                           "/v1/admin/reservations/release.")
    budget_leases: bool | None = Field(None, description="Budgets hold across replicas "
                                       "by leasing slices of each tenant's remaining "
                                       "budget from PostgreSQL (service/budget_lease.py). "
                                       "Unset = on in distributed mode, off in embedded "
                                       "mode; needs PostgreSQL.")
    budget_lease_horizon_s: float = Field(3.0, gt=0.0, description="A leased slice is "
                                          "about this many seconds of the replica's spend.")
    # Deciders re-check the learners' version this often even without a NOTIFY.
    snapshot_poll_interval_s: float = Field(1.0, gt=0.0)
    # POST /v1/chat/completions (service/gateway): one pooled HTTP client for every
    # upstream. The read timeout bounds the wait for each byte (a stream's next chunk),
    # not the whole answer: a long generation that keeps streaming is not cut.
    upstream_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Seconds an "
                                      "upstream may stay silent (no byte) before the "
                                      "request fails with 504 upstream_timeout.")
    upstream_connect_timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="Seconds "
                                              "to connect to an upstream.")
    upstream_max_connections: int = Field(1000, ge=1, description="Connections the "
                                          "gateway's pooled client keeps open at most "
                                          "(all upstreams together).")

    @model_validator(mode="before")
    @classmethod
    def _dim_of_featurizer(cls, data: Any) -> Any:
        # One default per featurizer (default_dim), for the service and the commands.
        if isinstance(data, dict) and data.get("dim") in (None, ""):
            return {**data, "dim": default_dim(str(data.get("featurizer") or "hashing"))}
        return data

    @model_validator(mode="after")
    def _minilm_dim(self) -> Settings:
        if self.featurizer == "minilm" and self.dim > MINILM_DIM:
            raise ValueError(f"BANDIT_ROUTER_DIM must be <= {MINILM_DIM} with "
                             f"BANDIT_ROUTER_FEATURIZER=minilm (its embedding has {MINILM_DIM} "
                             f"dimensions; a smaller DIM projects it), got {self.dim}")
        return self

    @field_validator("database_url", "kafka_bootstrap", "prototype_map", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return value or None

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to ``<data_dir>/router.db`` (SQLite)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir.expanduser().absolute() / 'router.db'}"
