"""The `specserve` command.

    specserve serve [--model DIR --draft-model DIR --num-speculative-tokens K ...]
    specserve generate "prompt" [--max-tokens N --temperature T ...]
    specserve info

Every engine option is a `serve` flag generated from the configuration
dataclasses (`specserve.config`): the flag is the field name with dashes, so the
command line, the Python API and the proto share one set of names. Likewise
every sampling parameter is a `generate` flag.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys
import time
import types
from dataclasses import MISSING, Field, fields
from typing import Any, Callable, NoReturn

from specserve import __version__
from specserve import config as config_module
from specserve.config import EngineConfig
from specserve.sampling_params import SamplingParams

DEFAULT_HOST = "127.0.0.1"  # the same as engine.server's, without importing grpc here
DEFAULT_PORT = 50051
DEFAULT_WAIT_READY = 60.0
DEFAULT_GRACE_PERIOD = 30.0
DEFAULT_REPLICA_RESTART_MAX = 5  # engine.replica.RestartPolicy's, without importing it here
DEFAULT_REPLICA_RESTART_BACKOFF = 1.0
DEFAULT_REPLICA_HEALTH_CHECK_INTERVAL = 10.0
DEFAULT_STATS_INTERVAL = 10.0  # engine.server's, without importing it here
EMBEDDED_MODEL_NAME = "specserve-default"  # engine.http_server's, without importing it here

# Help for each engine option, unless its dataclass field carries
# ``metadata={"help": ...}`` (which wins). tests/engine/test_cli.py checks that every
# field of EngineConfig has one.
ENGINE_OPTION_HELP = {
    # ModelConfig
    "model": "Hugging Face model directory of the target model (config.json + safetensors). "
             "Default: the embedded default pair under engine/default_models/.",
    "tokenizer": "Tokenizer directory; default: the target model's directory.",
    "dtype": "Weight and activation dtype; auto picks bfloat16 on CUDA and float32 on CPU.",
    "load_format": "How to load weights: safetensors, dummy (random weights of the real shape, "
                   "for benchmarks), or auto.",
    "max_model_len": "Context length: most tokens (prompt + output) per request; default: the "
                     "model's max_position_embeddings, capped by the KV cache size.",
    "seed": "Seed of the engine's random state (weights with load_format=dummy, unseeded "
            "requests).",
    # SpeculativeConfig
    "adaptive_speculation": "Choose k per step (up to --num-speculative-tokens, 0 included) "
                            "from the measured acceptance rate and the measured cost of steps "
                            "at the current batch size.",
    "draft_model": "Hugging Face model directory of the draft model; speculative decoding is "
                   "off without one.",
    "num_speculative_tokens": "Tokens the draft proposes per step (k), 0 to 16; 0 turns "
                              "speculation off. Requests may lower it.",
    # CacheConfig
    "block_size": "Tokens per KV cache block (a power of two up to 128).",
    "gpu_memory_utilization": "Fraction of GPU memory the engine may use (models + KV cache), "
                              "in (0, 1].",
    "kv_cache_memory": "Bytes of KV cache on CPU (suffixes K, M, G accepted, e.g. 1G).",
    "num_kv_blocks": "Fixed number of KV cache blocks; overrides both memory budgets.",
    # SchedulerConfig
    "max_num_seqs": "Most sequences computed in one step.",
    "max_num_batched_tokens": "Most tokens (prompt chunks + decode + speculative slots) "
                              "computed in one step.",
    "async_output": "Detokenize, check stop strings and stream a step's outputs while the "
                    "next step runs on the device (in-process executor); a request stopped "
                    "by a stop string then costs one discarded step",
    "kv_reserve": "Admission control, in [0, 1]: a waiting request starts only while the "
                  "free KV blocks, less its prompt's, cover this fraction of what the running "
                  "requests may still grow by (to their max_tokens); 0 admits while prompts "
                  "fit and preempts (recomputes) when the cache fills.",
    "max_queue": "Most requests waiting per replica beyond the running ones; more are refused "
                 "with RESOURCE_EXHAUSTED.",
    # ParallelConfig
    "executor": "Where the models run: local (in this process) or ray (Ray actors).",
    "device": "Device of the local executor: auto, cpu or cuda.",
    "data_parallel_size": "Engine replicas behind this server; each new request goes to the "
                          "replica with the fewest unfinished requests.",
    "ray_address": "Address of an existing Ray cluster to join (executor=ray); default: start "
                   "a local one.",
    "enforce_eager": "Never capture CUDA graphs (they are used on CUDA for decode, "
                     "verification and draft steps where the attention backend allows).",
    "batch_invariant": "Compute every token the same way whatever else is in its step (the "
                       "batch, its own query count, chunk boundaries), so that greedy and "
                       "seeded outputs are bit-identical alone and in any batch; slower.",
}

ENGINE_OPTION_CHOICES = {
    "dtype": config_module.DTYPES,
    "load_format": config_module.LOAD_FORMATS,
    "executor": config_module.EXECUTORS,
    "device": config_module.DEVICES,
}

SAMPLING_HELP = {
    "max_tokens": "Most tokens to generate.",
    "temperature": "Sampling temperature; 0 means greedy.",
    "top_k": "Keep the k most likely tokens (0: off).",
    "top_p": "Nucleus sampling threshold in (0, 1] (1: off).",
    "min_p": "Drop tokens less likely than min_p times the most likely one (0: off).",
    "seed": "Seed that makes sampling reproducible.",
    "stop": "Stop at this string (repeat the flag for several).",
    "stop_token_ids": "Stop after this token id (repeat the flag for several).",
    "ignore_eos": "Keep generating past the end-of-sequence token.",
    "repetition_penalty": "Values above 1 discourage repeating tokens.",
    "presence_penalty": "Penalty in [-2, 2] on tokens already generated.",
    "frequency_penalty": "Penalty in [-2, 2] per occurrence of a generated token.",
    "logprobs": "Return log-probabilities with this many top alternatives per token.",
    "min_tokens": "Sample no stop token (EOS included) and match no stop string before this "
                  "many tokens.",
    "include_stop_str_in_output": "Keep a matched stop string at the end of the text.",
    "skip_special_tokens": "Leave special tokens out of the text.",
    "prompt_logprobs": "Print each prompt token's log-probability with this many top "
                       "alternatives.",
}
# Sampling parameters `generate` has no flag for: gRPC serves one sample per request.
NOT_GENERATE_FLAGS = ("n",)


# -- flags from dataclass fields --------------------------------------------------------
def engine_fields() -> list[Field]:
    sections = [f.default_factory for f in fields(EngineConfig)]  # the section classes
    return [f for section in sections for f in fields(section)]


def _base_type(annotation: Any) -> str:
    """'int | None' -> 'int'; works on the string annotations of
    ``from __future__ import annotations`` and on real types."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
        return parts[0] if len(parts) == 1 else annotation
    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str(annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def parse_size(text: str) -> int:
    """'4096', '512K', '1G', '1.5GiB' -> bytes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    try:
        return int(float(s) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, dc_fields: list[Field],
                        helps: dict[str, str], choices: dict[str, tuple] | None = None) -> None:
    """One flag per field; flags not given are absent from the parsed namespace,
    so the dataclass's own default applies."""
    choices = choices or {}
    for f in dc_fields:
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help") or helps.get(f.name)
        if help_text is None:
            raise ValueError(f"option {f.name!r} has no help text: add it to cli.py")
        default = _default_of(f)
        if default not in (None, [], ""):
            help_text = f"{help_text} (default: {default})"
        kind = _base_type(f.type)
        kwargs: dict[str, Any] = dict(dest=f.name, help=help_text, default=argparse.SUPPRESS)
        if f.name in choices or "choices" in f.metadata:
            kwargs["choices"] = f.metadata.get("choices") or choices[f.name]
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list["):
            kwargs["action"] = "append"  # one value per flag, repeated for several
            kwargs["type"] = {"list[int]": int, "list[float]": float}.get(kind, str)
            kwargs["metavar"] = kind[5:-1].upper()
        elif f.name == "kv_cache_memory":
            kwargs["type"] = parse_size
            kwargs["metavar"] = "BYTES"
        else:
            kwargs["type"] = {"int": int, "float": float}.get(kind, str)
            if kind not in ("int", "float", "str"):
                raise ValueError(f"option {f.name!r} has a type the CLI cannot parse: {f.type}")
        parser.add_argument(flag, **kwargs)


def generate_fields() -> list[Field]:
    return [f for f in fields(SamplingParams) if f.name not in NOT_GENERATE_FLAGS]


def _given(args: argparse.Namespace, dc_fields: list[Field]) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dc_fields if hasattr(args, f.name)}


# -- parser -----------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that answers a bad command line with the one-line error and a
    pointer to --help, not the whole usage (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nTry '{self.prog} --help' for the "
                     "options.\n")


def json_object(text: str) -> dict:
    """An argparse type for a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def port_type(lowest: int) -> Callable[[str], int]:
    """An argparse type for a TCP port in [lowest, 65535]: a larger number would
    silently wrap to another port."""
    def port(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(
                f"a port must be an integer in [{lowest}, 65535], got {text!r}")
        return value

    return port


def count_type(text: str) -> int:
    """An argparse type for an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def interval_type(text: str) -> float:
    """An argparse type for a number of seconds >= 0 (0: off)."""
    return _seconds(text, zero_ok=True)


def seconds_type(text: str) -> float:
    """An argparse type for a positive number of seconds."""
    return _seconds(text, zero_ok=False)


def _seconds(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value if zero_ok else 0 < value) or not value < float("inf"):
        bound = ">= 0 (0 turns it off)" if zero_ok else "> 0"
        raise argparse.ArgumentTypeError(f"must be a number of seconds {bound}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="specserve",
        description="A batched LLM serving engine with lossless speculative decoding.")
    parser.add_argument("--version", action="version", version=f"specserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="run the gRPC server (and the OpenAI-compatible HTTP API)",
        description="Serve a target model (and a draft model for speculative decoding) over "
                    "gRPC, and with --http-port over an OpenAI-compatible HTTP API. With no "
                    "--model, the embedded default pair is served.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_address_flags(serve, lowest_port=0)
    serve.add_argument("--http-port", type=port_type(1), default=None,
                       help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                            "/v1/chat/completions, /v1/models, /health, /metrics) on this "
                            "port; default: off")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name of the HTTP API (requests' \"model\", "
                            "/v1/models); default: the target's directory name, or "
                            f"\"{EMBEDDED_MODEL_NAME}\" for the embedded pair")
    serve.add_argument("--metrics-port", type=port_type(0), default=0,
                       help="port of the Prometheus /metrics endpoint; 0 turns it off")
    serve.add_argument("--grace-period", type=float, default=DEFAULT_GRACE_PERIOD,
                       help="seconds streams in flight get to finish after SIGINT/SIGTERM "
                            "before they are aborted")
    serve.add_argument("--replica-restart-max", type=count_type,
                       default=DEFAULT_REPLICA_RESTART_MAX, metavar="N",
                       help="rebuild attempts in a row for an engine replica that failed (a "
                            "worker died, a device error) before it is left out of service; "
                            "0 never rebuilds")
    serve.add_argument("--replica-restart-backoff", type=seconds_type,
                       default=DEFAULT_REPLICA_RESTART_BACKOFF, metavar="SECONDS",
                       help="wait before the first rebuild of a failed replica, doubled after "
                            "each failed attempt (up to 30 s)")
    serve.add_argument("--replica-health-check-interval", type=interval_type,
                       default=DEFAULT_REPLICA_HEALTH_CHECK_INTERVAL, metavar="SECONDS",
                       help="an idle replica checks that its workers live after this many "
                            "seconds without work (a Ray actor that died between requests is "
                            "then rebuilt before a request reaches it); 0 turns it off")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"), help="logging level")
    _add_operating_flags(serve)
    _add_security_flags(serve)
    engine_group = serve.add_argument_group("engine options")
    add_dataclass_flags(engine_group, engine_fields(), ENGINE_OPTION_HELP, ENGINE_OPTION_CHOICES)
    engine_group.add_argument(
        "--speculative-config", type=json_object, default=None, metavar="JSON",
        help="vLLM's form of the draft flags, e.g. '{\"model\": DIR, "
             "\"num_speculative_tokens\": 4}' (keys: model, num_speculative_tokens, "
             "quantization, draft_tensor_parallel_size, adaptive_speculation, method "
             "\"draft_model\"); a flag also given must agree with it")
    serve.set_defaults(func=cmd_serve, parser=serve)

    gen = sub.add_parser(
        "generate", help="stream a completion from a running server",
        description="Send one prompt to a specserve server, stream the text to stdout and "
                    "print usage and the draft acceptance rate to stderr.")
    gen.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    _add_address_flags(gen, wait=True)
    _add_client_security_flags(gen)
    gen.add_argument("--num-speculative-tokens", type=int, default=None,
                     help="lower k for this request; 0 turns speculation off")
    gen.add_argument("--priority", type=int, default=0,
                     help="scheduling priority (lower is admitted first)")
    gen.add_argument("--request-id", default="", help="request id (default: server-made)")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    sampling = gen.add_argument_group("sampling parameters")
    add_dataclass_flags(sampling, generate_fields(), SAMPLING_HELP)
    gen.set_defaults(func=cmd_generate, parser=gen)

    info = sub.add_parser("info", help="show the models a running server serves")
    _add_address_flags(info, wait=True)
    _add_client_security_flags(info)
    info.set_defaults(func=cmd_info, parser=info)
    return parser


def _add_operating_flags(parser: argparse.ArgumentParser) -> None:
    """What the server logs while it serves (README: Operating the server)."""
    group = parser.add_argument_group("operating the server")
    group.add_argument("--stats-interval", type=interval_type, default=DEFAULT_STATS_INTERVAL,
                       metavar="SECONDS",
                       help="log a line of statistics (requests running and waiting, KV cache "
                            "usage, prompt and generation tokens/s, acceptance, prefix cache "
                            "hits) this often, when something happened; 0 never")
    group.add_argument("--log-requests", action="store_true",
                       help="log a line per finished request: its id, prompt, cached and "
                            "output tokens, finish reason, TTFT, end-to-end time and acceptance")


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    """Who may talk to the server (README: Security)."""
    group = parser.add_argument_group(
        "security", "TLS and API keys apply to the gRPC port and the HTTP API alike; "
                    "--metrics-port stays plain and open")
    group.add_argument("--tls-cert", metavar="PEM", default=None,
                       help="serve over TLS with this certificate (chain); needs --tls-key")
    group.add_argument("--tls-key", metavar="PEM", default=None,
                       help="the private key of --tls-cert")
    group.add_argument("--tls-client-ca", metavar="PEM", default=None,
                       help="mutual TLS: refuse clients without a certificate signed by this CA")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="require 'authorization: Bearer KEY' on every RPC but health "
                            "and on the HTTP API's /v1/* and /metrics (repeat for several "
                            "keys; also read from $SPECSERVE_API_KEY)")
    group.add_argument("--api-key-file", metavar="FILE", default=None,
                       help="accepted API keys, one a line")
    group.add_argument("--no-reflection", dest="reflection", action="store_false",
                       help="turn off gRPC server reflection (which lists the services)")


def _add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    """How a client reaches a secured server."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls-ca", metavar="PEM", default=None,
                       help="connect over TLS, trusting server certificates this CA signed")
    group.add_argument("--tls-cert", metavar="PEM", default=None,
                       help="client certificate, for a server with mutual TLS")
    group.add_argument("--tls-key", metavar="PEM", default=None,
                       help="the private key of --tls-cert")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help="send 'authorization: Bearer KEY' (default: $SPECSERVE_API_KEY)")


def security_from_args(args: argparse.Namespace) -> Any:
    """The server's `engine.security.Security` from the flags and
    $SPECSERVE_API_KEY; a bad file or key exits with one line naming it."""
    from specserve.engine.security import Security, load_api_keys  # noqa: PLC0415 (grpc)

    try:
        security = Security(tls_cert=args.tls_cert, tls_key=args.tls_key,
                            tls_client_ca=args.tls_client_ca,
                            api_keys=load_api_keys(args.api_key, args.api_key_file),
                            reflection=args.reflection)
        security.check()
    except ValueError as exc:
        raise SystemExit(f"specserve serve: {exc}") from None
    return security


def client_channel_from_args(args: argparse.Namespace, address: str) -> Any:
    """A channel to ``address`` with the client security flags."""
    from specserve.engine.security import API_KEY_ENV, client_channel  # noqa: PLC0415

    try:
        return client_channel(address, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                              tls_key=args.tls_key,
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    except ValueError as exc:
        raise SystemExit(f"specserve {args.command}: {exc}") from None


def _add_address_flags(parser: argparse.ArgumentParser, wait: bool = False,
                       lowest_port: int = 1) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="server host")
    parser.add_argument("--port", type=port_type(lowest_port), default=DEFAULT_PORT,
                        help="gRPC port" + ("; 0 takes a free one" if lowest_port == 0 else ""))
    if wait:
        parser.add_argument("--wait-ready", type=float, default=DEFAULT_WAIT_READY,
                            metavar="SECONDS",
                            help="wait up to this long for the server to report SERVING "
                                 "(it answers UNAVAILABLE while it loads); 0 does not wait "
                                 f"(default: {DEFAULT_WAIT_READY:g})")


def wait_until_serving(channel: Any, seconds: float, address: str) -> None:
    """Poll the server's health service until it reports SERVING; raises
    TimeoutError after ``seconds`` (a server still loading, or none there)."""
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + seconds
    told = False
    while True:
        left = deadline - time.monotonic()
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=max(0.1, min(left, 2)))
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if left <= 0:
            raise TimeoutError(f"no server ready at {address} after {seconds:g} s "
                               "(is `specserve serve` running there?)")
        if not told and seconds - left > 1:
            print(f"waiting for the server at {address} to be ready...", file=sys.stderr)
            told = True
        time.sleep(0.25)


# -- serve ------------------------------------------------------------------------------
def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags describe, with the embedded default pair when
    no --model is given. Raises SystemExit with a message when there is none."""
    from specserve.engine.llm_engine import resolve_default_models  # noqa: PLC0415 (torch)

    try:
        spec = getattr(args, "speculative_config", None)  # (a serve flag, not an engine field)
        config = EngineConfig.from_kwargs(**_given(args, engine_fields()), speculative_config=spec)
        resolve_default_models(config)
    except ValueError as exc:
        raise SystemExit(f"specserve serve: {exc}") from None
    if config.parallel_config.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise SystemExit("specserve serve: --executor ray needs Ray, which is not installed: "
                         "pip install 'specserve[ray]'")
    return config


def check_models_early(config: EngineConfig) -> None:
    """Refuse a missing or invalid model directory, or a --max-model-len beyond
    the model's, in one line before anything loads or listens."""
    from specserve.engine.llm_engine import check_models  # noqa: PLC0415 (torch)

    try:
        check_models(config)
    except ValueError as exc:
        raise SystemExit(f"specserve serve: {exc}") from None


def check_ports(args: argparse.Namespace) -> None:
    """The server's ports must differ (a port of 0 or off is never a clash)."""
    ports = [("--port", args.port), ("--http-port", args.http_port),
             ("--metrics-port", args.metrics_port)]
    seen: dict[int, str] = {}
    for flag, port in ports:
        if port and port in seen:
            raise SystemExit(f"specserve serve: {flag} {port} is also {seen[port]}; "
                             "give each its own port")
        if port:
            seen[port] = flag


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_ports(args)
    security = security_from_args(args)
    config = engine_config_from_args(args)
    check_models_early(config)
    from specserve.engine.replica import RestartPolicy  # noqa: PLC0415
    from specserve.engine.server import SpecServer, serve_until_signal  # noqa: PLC0415

    restart = RestartPolicy(max_attempts=args.replica_restart_max,
                            backoff=args.replica_restart_backoff,
                            max_backoff=max(30.0, args.replica_restart_backoff),
                            health_check_interval=args.replica_health_check_interval)
    server = SpecServer(config, host=args.host, port=args.port, metrics_port=args.metrics_port,
                        grace_period=args.grace_period, http_port=args.http_port,
                        served_model_name=args.served_model_name, replica_restart=restart,
                        stats_interval=args.stats_interval, log_requests=args.log_requests,
                        security=security)
    try:
        asyncio.run(serve_until_signal(server))
    except (ValueError, OSError) as exc:
        print(f"specserve serve: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        logging.getLogger("specserve").exception("the server failed")
        print(f"specserve serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


# -- client commands --------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    from specserve.engine.grpc_convert import pb, pb_grpc, sampling_params_to_proto  # noqa: PLC0415

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request = pb.GenerateRequest(
        request_id=args.request_id, text=prompt, priority=args.priority,
        sampling_params=sampling_params_to_proto(**_given(args, generate_fields())))
    if args.num_speculative_tokens is not None:
        request.num_speculative_tokens = args.num_speculative_tokens
    first = None
    last = None
    logprobs: list[Any] = []
    prompt_logprobs: list[Any] = []
    address = f"{args.host}:{args.port}"
    with client_channel_from_args(args, address) as channel:
        if args.wait_ready > 0:
            try:
                wait_until_serving(channel, args.wait_ready, address)
            except TimeoutError as exc:
                print(f"specserve generate: {exc}", file=sys.stderr)
                return 1
        start = time.perf_counter()
        call = pb_grpc.GenerationStub(channel).Generate(request, timeout=args.timeout)
        try:
            for resp in call:
                if first is None and resp.token_ids:
                    first = time.perf_counter()
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                logprobs.extend(resp.logprobs)
                prompt_logprobs.extend(resp.prompt_logprobs)
                last = resp
        except KeyboardInterrupt:
            call.cancel()
            print("\n[cancelled]", file=sys.stderr)
            return 130
        except grpc.RpcError as err:
            print(f"\nspecserve generate: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - start
        if logprobs or prompt_logprobs:
            target = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                  timeout=10).target
    sys.stdout.write("\n")
    for title, lps in (("prompt logprobs", prompt_logprobs), ("logprobs", logprobs)):
        if lps:
            ids = {i for lp in lps for i in (lp.token_id, *(t.token_id for t in lp.top_logprobs))}
            print(format_logprobs(lps, token_texts(target, ids), title), file=sys.stderr)
    if last is not None:
        print(format_usage(last, elapsed, None if first is None else first - start),
              file=sys.stderr)
    return 0


def token_texts(target_dir: str, token_ids: set[int]) -> dict[int, str]:
    """Each token's text, from the served target's tokenizer.json where this
    machine has that directory (a server on this machine); else empty."""
    path = os.path.join(target_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return {}
    try:
        from tokenizers import Tokenizer  # noqa: PLC0415

        tokenizer = Tokenizer.from_file(path)
    except Exception:  # an unreadable tokenizer only costs the texts
        return {}
    return {t: tokenizer.decode([t], skip_special_tokens=False) for t in token_ids}


def format_logprobs(logprobs: list[Any], texts: dict[int, str], title: str = "logprobs") -> str:
    """One line per token: the token, its logprob, and the top alternatives
    (a token's text where known, else #id)."""
    def name(token_id: int) -> str:
        return repr(texts[token_id]) if token_id in texts else f"#{token_id}"

    lines = [f"-- {title} (token, logprob | top alternatives)"]
    for lp in logprobs:
        line = f"{name(lp.token_id):>16} {lp.logprob:9.4f}"
        if lp.top_logprobs:
            line += "  | " + ", ".join(f"{name(t.token_id)} {t.logprob:.4f}"
                                       for t in lp.top_logprobs)
        lines.append(line)
    return "\n".join(lines)


def format_usage(last: Any, elapsed: float, ttft: float | None) -> str:
    from specserve.engine.grpc_convert import pb  # noqa: PLC0415

    u = last.usage
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    parts = [f"finish_reason={reason}", f"prompt_tokens={u.prompt_tokens}",
             f"completion_tokens={u.completion_tokens}"]
    if u.draft_tokens_proposed:
        rate = u.draft_tokens_accepted / u.draft_tokens_proposed
        parts.append(f"draft accepted {u.draft_tokens_accepted}/{u.draft_tokens_proposed} "
                     f"({rate:.1%})")
    else:
        parts.append("no speculation")
    timing = f"{elapsed:.2f}s"
    if elapsed > 0 and u.completion_tokens:
        timing += f", {u.completion_tokens / elapsed:.1f} tokens/s"
    if ttft is not None:
        timing += f", first token after {ttft * 1000:.0f} ms"
    parts.append(timing)
    return "-- " + "  ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    from specserve.engine.grpc_convert import pb, pb_grpc  # noqa: PLC0415

    address = f"{args.host}:{args.port}"
    with client_channel_from_args(args, address) as channel:
        try:
            if args.wait_ready > 0:
                wait_until_serving(channel, args.wait_ready, address)
            info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                               timeout=10)
        except TimeoutError as exc:
            print(f"specserve info: {exc}", file=sys.stderr)
            return 1
        except grpc.RpcError as err:
            print(f"specserve info: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    for f in info.DESCRIPTOR.fields:
        print(f"{f.name}: {getattr(info, f.name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # gRPC's core logs its own errors to stderr (a port in use, ...), which the
    # commands report in their own words; GRPC_VERBOSITY=ERROR brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # named by the subcommand, whose --help lists what it takes
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
