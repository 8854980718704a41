"""Engine configuration: one set of dataclasses, validated at construction.

Field names are the CLI flag names (``--max-num-seqs`` is ``max_num_seqs``)
and the proto field names, so a value means the same thing everywhere. A leaf
module: it imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
EXECUTORS = ("local", "ray")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"invalid engine configuration: {msg}")


@dataclass
class ModelConfig:
    """The target model; ``model`` is a Hugging Face model directory."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str | None = field(default=None, metadata={"choices": QUANTIZATIONS, "help": (
        "Quantize the target's projections at load: fp8 (E4M3 weights with a scale per output "
        "row, activations scaled per token; needs an Ada or Hopper GPU, or the CPU). An FP8 "
        "checkpoint is served in FP8 without it.")})
    max_logprobs: int = field(default=20, metadata={"help": (
        "Most top alternatives a request may ask for per token (logprobs, prompt_logprobs); "
        "more is refused with INVALID_ARGUMENT (HTTP 400).")})

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.load_format in LOAD_FORMATS,
               f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        _check(self.max_model_len is None or self.max_model_len > 0,
               f"max_model_len must be > 0, got {self.max_model_len}")
        _check(self.quantization in (None, *QUANTIZATIONS),
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _check(self.max_logprobs >= 0, f"max_logprobs must be >= 0, got {self.max_logprobs}")


@dataclass
class SpeculativeConfig:
    """The draft model and how many tokens it proposes per step (k)."""

    draft_model: str | None = None
    num_speculative_tokens: int = 4
    adaptive_speculation: bool = False
    draft_quantization: str | None = field(default=None, metadata={
        "choices": QUANTIZATIONS,
        "help": "Quantize the draft's projections at load (as --quantization, for the draft)."})

    def __post_init__(self) -> None:
        _check(0 <= self.num_speculative_tokens <= 16,
               f"num_speculative_tokens must be in [0, 16], got {self.num_speculative_tokens}")
        _check(self.draft_quantization in (None, *QUANTIZATIONS),
               f"draft_quantization must be one of {QUANTIZATIONS}, got "
               f"{self.draft_quantization!r}")

    @property
    def enabled(self) -> bool:
        return self.draft_model is not None and self.num_speculative_tokens > 0


@dataclass
class CacheConfig:
    """Paged KV cache sizing. One block id addresses a token's slots in both
    the target's and the draft's cache, so the budget pays for both."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    kv_cache_memory: int = 1 << 30  # bytes, used on CPU
    num_kv_blocks: int | None = None  # fixed count, overrides both budgets
    kv_cache_dtype: str = field(default="auto", metadata={"choices": KV_CACHE_DTYPES, "help": (
        "Element type of the paged KV cache (target and draft): auto (the model's dtype) or "
        "fp8 (E4M3 with a scale per layer: twice the tokens in the same memory; needs an Ada "
        "or Hopper GPU, or the CPU).")})
    enable_prefix_caching: bool = field(default=True, metadata={"help": (
        "Reuse the KV blocks of earlier requests' identical prefixes (a shared system prompt, "
        "the previous turns of a chat) for both the target and the draft: full blocks are "
        "cached by a hash of their tokens and evicted least recently used.")})

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
               f"block_size must be a power of two <= 128, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.kv_cache_memory > 0, f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
        _check(self.num_kv_blocks is None or self.num_kv_blocks > 0,
               f"num_kv_blocks must be > 0, got {self.num_kv_blocks}")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")


@dataclass
class SchedulerConfig:
    """Per-step budgets of the continuous-batching scheduler."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    max_queue: int = 1024
    async_output: bool = True
    kv_reserve: float = 0.5

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        _check(0.0 <= self.kv_reserve <= 1.0,
               f"kv_reserve must be in [0, 1], got {self.kv_reserve}")


@dataclass
class ParallelConfig:
    """Where model execution runs: in-process or in Ray actors."""

    executor: str = "local"
    device: str = "auto"
    data_parallel_size: int = 1
    tensor_parallel_size: int = field(default=1, metadata={"help": (
        "GPUs (Ray actors) one replica's target is split over, Megatron-style: heads, MLP and "
        "vocabulary sharded, one all-reduce per row-parallel projection (NCCL on CUDA, gloo on "
        "CPU). Needs --executor ray.")})
    draft_tensor_parallel_size: int = field(default=1, metadata={"help": (
        "Ranks the draft is split over, 1 <= M <= --tensor-parallel-size and dividing it. 1 "
        "(default): every rank keeps a whole draft of its own and proposes the same tokens, "
        "so proposals never cross between ranks.")})
    ray_address: str | None = None
    enforce_eager: bool = False
    batch_invariant: bool = False
    cpu_threads: int | None = field(default=None, metadata={"help": (
        "torch threads (intra- and inter-op) of the engine process (in-process executor) and "
        "of each Ray worker. Default: on the CPU, half the cores this process may use, at "
        "most 8 (1 on a machine of 2 or 3 cores: benchmarks/RESULTS.md); on CUDA, torch's "
        "own default (the threads only run host-side work there).")})

    def __post_init__(self) -> None:
        _check(self.executor in EXECUTORS, f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        _check(self.cpu_threads is None or self.cpu_threads >= 1,
               f"cpu_threads must be >= 1, got {self.cpu_threads}")
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(self.data_parallel_size >= 1,
               f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        tp, draft_tp = self.tensor_parallel_size, self.draft_tensor_parallel_size
        _check(tp >= 1, f"tensor_parallel_size must be >= 1, got {tp}")
        _check(1 <= draft_tp <= tp and tp % draft_tp == 0,
               f"draft_tensor_parallel_size must be in [1, tensor_parallel_size={tp}] and "
               f"divide it, got {draft_tp}")
        _check(tp == 1 or self.executor == "ray",
               f"tensor_parallel_size={tp} needs executor 'ray' (one actor per rank), "
               f"got {self.executor!r}")


@dataclass
class RequestLimits:
    """What one request may carry. Both front ends (gRPC and HTTP) check these
    before a request is queued and answer INVALID_ARGUMENT (HTTP 400) naming
    the limit: a request's size must not cost the server more than it can
    refuse cheaply."""

    max_stop_strings: int = field(default=16, metadata={"help": (
        "Most stop strings a request may give; more is refused with INVALID_ARGUMENT (each "
        "is matched against every step's text).")})
    max_stop_string_length: int = field(default=256, metadata={"help": (
        "Most characters in one stop string; a longer one is refused with INVALID_ARGUMENT.")})
    max_request_id_length: int = field(default=256, metadata={"help": (
        "Most characters in a client's request id (every response echoes it); a longer one "
        "is refused with INVALID_ARGUMENT.")})
    max_prompt_bytes: int | None = field(default=None, metadata={"help": (
        "Most UTF-8 bytes in a text prompt, refused with INVALID_ARGUMENT before it is "
        "tokenized. Default: 32 bytes per token of the served context (a token is rarely "
        "more than 8 bytes of text).")})
    max_priority: int = field(default=0, metadata={"help": (
        "Requests' priority must lie in [-N, N] (lower is admitted first); 0 refuses any "
        "non-zero priority, so no client can jump the queue unless this is raised.")})
    max_stream_buffer_tokens: int = field(default=4096, metadata={"help": (
        "Most output tokens a stream may hold that its client has not read yet; a reader "
        "that falls further behind has its request aborted (its KV blocks freed) with "
        "RESOURCE_EXHAUSTED.")})

    def __post_init__(self) -> None:
        for name in ("max_stop_strings", "max_stop_string_length", "max_request_id_length",
                     "max_priority"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.max_prompt_bytes is None or self.max_prompt_bytes >= 1,
               f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")
        _check(self.max_stream_buffer_tokens >= 1,
               f"max_stream_buffer_tokens must be >= 1, got {self.max_stream_buffer_tokens}")

    def prompt_bytes_limit(self, context: int) -> int:
        """``max_prompt_bytes``, or its default for a context of ``context`` tokens."""
        return self.max_prompt_bytes or 32 * max(context, 1)


@dataclass
class ConnectionLimits:
    """How long connections live and how much one may ask of the server."""

    keepalive_time: float = field(default=60.0, metadata={"help": (
        "Seconds between the gRPC server's keepalive pings on an idle connection (a dead "
        "peer is found and its streams aborted).")})
    keepalive_timeout: float = field(default=20.0, metadata={"help": (
        "Seconds a keepalive ping may go unanswered before the connection is closed.")})
    max_connection_idle: float = field(default=300.0, metadata={"help": (
        "Seconds a gRPC connection with no stream open is kept; 0 keeps it forever. Clients "
        "reconnect transparently.")})
    max_connection_age: float = field(default=0.0, metadata={"help": (
        "Seconds after which a gRPC connection is asked to go away (GOAWAY; its streams "
        "finish within --max-connection-age-grace); 0: never.")})
    max_connection_age_grace: float = field(default=300.0, metadata={"help": (
        "Seconds a connection's streams get to finish once it is past --max-connection-age.")})
    max_concurrent_streams: int = field(default=1024, metadata={"help": (
        "Most streams open at once on one gRPC connection (HTTP/2 SETTINGS); the client "
        "queues the rest.")})
    max_receive_message_bytes: int | None = field(default=None, metadata={"help": (
        "Largest request accepted, in bytes: a larger gRPC message is refused with "
        "RESOURCE_EXHAUSTED before it is parsed, a larger HTTP body with 413 before it is "
        "read. Default: --max-prompt-bytes plus 1 MiB (at least 4 MiB).")})
    http_keep_alive_timeout: float = field(default=5.0, metadata={"help": (
        "Seconds the HTTP API keeps an idle keep-alive connection open.")})
    http_limit_concurrency: int | None = field(default=None, metadata={"help": (
        "Most HTTP connections and requests at once; more are answered 503. Default: no "
        "limit beyond --max-queue.")})

    def __post_init__(self) -> None:
        for name in ("keepalive_time", "keepalive_timeout", "http_keep_alive_timeout"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_connection_idle", "max_connection_age", "max_connection_age_grace"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.max_concurrent_streams >= 1,
               f"max_concurrent_streams must be >= 1, got {self.max_concurrent_streams}")
        for name in ("max_receive_message_bytes", "http_limit_concurrency"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1, got {value}")


_SECTIONS = {
    "model_config": ModelConfig,
    "speculative_config": SpeculativeConfig,
    "cache_config": CacheConfig,
    "scheduler_config": SchedulerConfig,
    "parallel_config": ParallelConfig,
    "request_limits": RequestLimits,
    "connection_limits": ConnectionLimits,
}


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    speculative_config: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword arguments named like the CLI flags, and
        vLLM's ``speculative_config`` dict (`speculative_fields`)."""
        spec = kwargs.pop("speculative_config", None)
        if spec is not None:
            kwargs = _merge_speculative(kwargs, speculative_fields(spec))
        parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in kwargs.items():
            section = _section_of(key)
            parts[section][key] = value
        return cls(**{name: _SECTIONS[name](**vals) for name, vals in parts.items()})

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for sec in _SECTIONS.values() for f in fields(sec)]


# vLLM's speculative_config keys -> our flat fields.
SPECULATIVE_CONFIG_KEYS = {
    "model": "draft_model",
    "num_speculative_tokens": "num_speculative_tokens",
    "quantization": "draft_quantization",
    "draft_tensor_parallel_size": "draft_tensor_parallel_size",
    "adaptive_speculation": "adaptive_speculation",
}


def speculative_fields(spec: Any) -> dict[str, Any]:
    """vLLM's ``speculative_config`` ({"model": DRAFT, "num_speculative_tokens":
    K, ...}) as our flat fields; ``method`` may only be "draft_model" (a
    separate draft model is what the engine runs)."""
    _check(isinstance(spec, dict), f"speculative_config must be a dict, got {spec!r}")
    spec = dict(spec)
    method = spec.pop("method", "draft_model")
    _check(method in ("draft_model", None),
           f"speculative_config method {method!r} is not supported: only a draft model "
           "(\"draft_model\") proposes tokens here")
    unknown = sorted(set(spec) - set(SPECULATIVE_CONFIG_KEYS))
    _check(not unknown, f"unknown speculative_config keys {unknown}; known: "
                        f"{sorted(SPECULATIVE_CONFIG_KEYS)} and method")
    return {SPECULATIVE_CONFIG_KEYS[k]: v for k, v in spec.items()}


def _merge_speculative(flat: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The flat options with speculative_config's; a field both give with
    different values is an error."""
    merged = dict(flat)
    for name, value in spec.items():
        given = flat.get(name)
        _check(given is None or given == value,
               f"speculative_config gives {name}={value!r} but {name}={given!r} is given too")
        merged[name] = value
    return merged


def _section_of(key: str) -> str:
    for name, section in _SECTIONS.items():
        if any(f.name == key for f in fields(section)):
            return name
    raise ValueError(f"invalid engine configuration: unknown option {key!r}")
