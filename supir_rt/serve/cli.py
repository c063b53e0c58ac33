"""``supir-rt serve``, ``supir-rt triton-repo`` and ``supir-rt triton``: parsers and run functions.

Registered in `supir_rt.cli.COMMANDS`. Ray and PyTriton are imported only
when their command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from supir_rt.runtime import BACKENDS, add_tile_worker_options, add_torch_options, tile_worker_fields
from supir_rt.serve.protocol import DEFAULT_PROCESSING_PIXELS, Limits

DEFAULT_PORT = 8000
REMOTE_WEIGHTS = "/weights"  # where --print-config and triton-repo put the weights unless told (mount them there)


def add_serving_parsers(subparsers: Any) -> None:
    add_serve_parser(subparsers)
    add_triton_repo_parser(subparsers)
    add_triton_parser(subparsers)


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("runtime (what every replica loads)")
    r.add_argument("--tiny-random", action="store_true",
                   help="the tiny configuration with random weights (no download; outputs are NOT restorations)")
    r.add_argument("--sdxl", type=Path, help="SDXL base checkpoint (a path every replica can read)")
    r.add_argument("--supir", type=Path, help="SUPIR checkpoint (a path every replica can read)")
    r.add_argument("--weights-dir", type=Path, help="folder holding both checkpoints")
    r.add_argument("--supir-variant", choices=("Q", "F", "q", "f"), default=None, help="SUPIR file to look for (Q)")
    r.add_argument("--engines-dir", type=Path, help="exported engines (onnxruntime/tensorrt backends)")
    r.add_argument("--backend", choices=BACKENDS, default="auto")
    r.add_argument("--device", default=None, help="cpu, cuda (default: cuda when the replica has a GPU)")
    r.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default fp16 on cuda, fp32 on cpu")
    r.add_argument("--captioner", choices=("none", "llava", "hf"), default="none", help="captioner for /v1/caption")
    r.add_argument("--llava-dir", type=Path, default=None, help="exported LLaVA folder for --captioner llava")
    r.add_argument("--caption-model", type=Path, default=None,
                   help="transformers image-text-to-text model folder for --captioner hf (e.g. SmolVLM)")
    add_torch_options(p)
    add_tile_worker_options(p.add_argument_group("tile workers: large images' tiles on Ray actors (docs/scale.md)"))


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    d = Limits()
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"largest request body in MiB (default {d.max_body_bytes / 2**20:g})")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest input image in pixels (default {d.max_image_pixels:,})")
    g.add_argument("--max-processing-pixels", type=int, default=d.max_processing_pixels,
                   help=f"largest processing size in pixels (default by device: {DEFAULT_PROCESSING_PIXELS['cuda']:,} "
                   f"on a GPU, {DEFAULT_PROCESSING_PIXELS['cpu']:,} on CPU)")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"most sampler steps per request ({d.max_steps})")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help=f"seconds before a request is answered 504 (default {d.request_timeout_s:g})")


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_body_bytes": int(args.max_body_mb * 2**20), "max_image_pixels": args.max_image_pixels,
            "max_processing_pixels": args.max_processing_pixels, "max_steps": args.max_steps,
            "request_timeout_s": args.request_timeout}


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    """The replicas' `RuntimeOptions` as a dict. Weights are looked up (and must exist) on this machine,
    except for --print-config, whose paths are those of the cluster's workers, taken as given."""
    sdxl, supir = args.sdxl, args.supir
    remote = getattr(args, "print_config", False) or getattr(args, "remote_paths", False)
    if not args.tiny_random and not args.engines_dir:
        if remote:  # the paths on the workers: as given, else placeholders under REMOTE_WEIGHTS to edit or mount
            from supir_rt.runtime import SDXL_FILE, SUPIR_FILES

            folder = args.weights_dir or Path(REMOTE_WEIGHTS)
            variant = (args.supir_variant or "Q").upper()
            sdxl = sdxl or folder / SDXL_FILE
            supir = supir or folder / SUPIR_FILES[variant]
        else:
            from supir_rt.runtime import find_weights, read_config_file

            found = find_weights(args, read_config_file(None))
            sdxl, supir = found.sdxl, found.supir

    def path(p: Any) -> str | None:  # absolute: replicas may start in another folder
        if not p:
            return None
        return str(p) if remote else str(Path(p).resolve())
    return {"tiny_random": args.tiny_random, "sdxl": path(sdxl), "supir": path(supir),
            "engines_dir": path(args.engines_dir), "backend": args.backend, "device": args.device,
            "dtype": args.dtype, "captioner": args.captioner, "llava_dir": path(args.llava_dir),
            "caption_model": path(args.caption_model), "vae_dtype": args.vae_dtype, "offload": args.offload,
            "compile": args.compile, "compile_mode": args.compile_mode, "cuda_graphs": args.cuda_graphs,
            "fp8_weights": args.fp8_weights, **tile_worker_fields(args)}


# --------------------------------------------------------------------------------------------------
# supir-rt serve
# --------------------------------------------------------------------------------------------------


def add_serve_parser(subparsers: Any) -> None:
    from supir_rt.serve.app_config import AppConfig

    d = AppConfig()
    p = subparsers.add_parser(
        "serve", help="serve the HTTP API with Ray Serve (local, Ray cluster, KubeRay)",
        description="Serve SUPIR over HTTP with Ray Serve: POST /v1/restore, POST /v1/caption, GET /v1/health, "
        "GET /v1/info. Without --address a local Ray instance is started. See docs/serving.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  supir-rt serve --tiny-random --replicas 2          try the API without weights (outputs are NOT restorations)\n"
        "  supir-rt serve --weights-dir ~/weights --host 0.0.0.0 --port 8000\n"
        "  supir-rt serve --address ray://HEAD:10001 --sdxl /w/sdxl.safetensors --supir /w/SUPIR-v0Q.ckpt --autoscale 1:8\n"
        "  supir-rt serve --autoscale 1:8 --print-config > supir.yaml   Ray Serve config (serve deploy / KubeRay)\n"
        "  curl -F image=@docs/images/sample.png http://127.0.0.1:8000/v1/restore -o out.png")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--address", default=None, help="join this Ray cluster (ray://HOST:10001 or auto) instead of a local one")
    p.add_argument("--print-config", action="store_true",
                   help="print a Ray Serve config file (YAML, for `serve deploy` / KubeRay RayService) and exit")
    s = p.add_argument_group("scaling and batching")
    s.add_argument("--replicas", type=int, default=d.replicas, help=f"model replicas (default {d.replicas})")
    s.add_argument("--autoscale", metavar="MIN:MAX", default=None, help="autoscale between MIN and MAX replicas")
    s.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (default 1 when the cluster has GPUs, else 0; fractions share a GPU)")
    s.add_argument("--cpus-per-replica", type=float, default=None,
                   help="CPUs reserved per replica (default 1, or less so that the replicas and the HTTP front fit "
                   "the CPUs Ray has)")
    s.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help=f"requests sharing one engine call, 1 = no batching (default {d.max_batch_size})")
    s.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_s * 1000,
                   help=f"how long a replica waits to fill a batch (default {d.batch_wait_s * 1000:g} ms)")
    s.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
                   help=f"requests inside one replica (default {d.max_ongoing_requests})")
    s.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help=f"requests waiting for a replica before 503 (default {d.max_queued_requests})")
    s.add_argument("--retry-after", type=float, default=d.retry_after_s,
                   help=f"Retry-After seconds on 503 (default {d.retry_after_s:g})")
    s.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM / Ctrl-C, seconds that requests in flight may take to finish (default 60)")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    s.add_argument("--object-store-mb", type=int, default=None, help="object store of the local Ray instance (MiB)")
    s.add_argument("--metrics-export-port", type=int, default=None,
                   help="port of the local Ray instance's Prometheus endpoint (GET /metrics; default: Ray picks one)")
    _add_runtime_flags(p)
    _add_limit_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_serve)


def serve_args(args: argparse.Namespace) -> dict[str, Any]:
    """The application builder's args for these flags (checked)."""
    from supir_rt.serve.app_config import AppConfig

    out: dict[str, Any] = {**_runtime(args), **_limits(args), "replicas": args.replicas,
                           "gpus_per_replica": args.gpus_per_replica, "cpus_per_replica": args.cpus_per_replica,
                           "max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait_ms / 1000,
                           "max_ongoing_requests": args.max_ongoing_requests,
                           "max_queued_requests": args.max_queued_requests, "retry_after_s": args.retry_after}
    if args.autoscale:
        try:
            low, high = (int(v) for v in args.autoscale.split(":"))
        except ValueError:
            raise ValueError(f"--autoscale {args.autoscale!r}: use MIN:MAX, e.g. 1:8") from None
        out.update(min_replicas=low, max_replicas=high)
    return AppConfig.from_args(out).as_args()


def serve_config_yaml(args: dict[str, Any], *, host: str, port: int) -> str:
    """A Ray Serve config file (``serve deploy`` / KubeRay ``serveConfigV2``) for the builder ``args``."""
    import yaml

    from supir_rt.serve.app_config import APP_NAME

    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "supir_rt.serve.ray_app:build_app",
            "args": args,
        }],
    }
    head = ("# Ray Serve config for supir-rt (generated by `supir-rt serve --print-config`).\n"
            "# Deploy: `serve deploy this.yaml`, or paste under spec.serveConfigV2 of a KubeRay RayService.\n"
            "# Every worker image needs supir-rt installed (pip install 'supir-rt[serve]') and the weights at\n"
            "# the sdxl/supir (or engines_dir) paths below (without --sdxl/--supir/--weights-dir: under\n"
            f"# {REMOTE_WEIGHTS}, mount them there or edit the paths). See docs/serving.md.\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def require_extra(extra: str, *modules: str) -> None:
    """Raise `SetupError` naming the extra to install and the import that failed (which may be a broken
    dependency of an installed package rather than a missing one)."""
    import importlib

    from supir_rt.errors import SetupError

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise SetupError(f"this command needs the {extra} extra: pip install 'supir-rt[{extra}]' "
                             f"(importing {module} failed: {err})") from None


def run_serve(args: argparse.Namespace) -> int:
    from supir_rt.errors import SetupError

    try:
        if not args.print_config:
            require_extra("serve", "ray.serve", "fastapi")
        if args.address and args.metrics_export_port is not None:
            raise ValueError("--metrics-export-port sets up a local Ray instance; a cluster joined with --address "
                             "exports its metrics on the port its `ray start --metrics-export-port` chose")
        app_args = serve_args(args)
        if args.print_config:
            if args.gpus_per_replica is None:
                app_args["gpus_per_replica"] = 1.0  # the config is for GPU workers unless told otherwise
            if not args.autoscale:
                app_args.update(min_replicas=1, max_replicas=max(args.replicas, 4))
            host = "0.0.0.0" if args.host == "127.0.0.1" else args.host
            sys.stdout.write(serve_config_yaml(app_args, host=host, port=args.port))
            return 0
    except (ValueError, SetupError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run_ray(args, app_args)


def _run_ray(args: argparse.Namespace, app_args: dict[str, Any]) -> int:
    """Claim the port (503 + Retry-After while loading), start or join Ray, deploy, serve until SIGINT or
    SIGTERM, then drain: no new requests, those in flight answered within --drain-timeout; stop Ray."""
    from supir_rt.serve.lifecycle import LoadingResponder, PortTaken, claim_port

    stop = threading.Event()

    def on_signal() -> None:  # set again after ray.init, which installs its own SIGTERM handler (sys.exit)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()
    loading = _NoLoadingAnswer()  # a joined cluster (--address) runs its proxies on its own nodes
    if not args.address:
        try:
            claim_port(args.host, args.port, "--port")
            if args.metrics_export_port is not None:
                claim_port(_metrics_host(args.host), args.metrics_export_port, "--metrics-export-port")
            loading = LoadingResponder(args.host, args.port, args.retry_after)
        except PortTaken as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    import ray
    from ray import serve

    from supir_rt.serve.ray_app import APP_NAME, build_app

    if args.tiny_random:
        print("note: --tiny-random serves the tiny configuration with RANDOM weights: outputs are NOT restorations",
              file=sys.stderr)
    try:
        if args.address:
            ray.init(address=args.address)
        else:
            store = args.object_store_mb * 2**20 if args.object_store_mb else None
            extra: dict[str, Any] = {} if args.metrics_export_port is None else {
                "_metrics_export_port": args.metrics_export_port}
            if _metrics_host(args.host) == "127.0.0.1":  # Ray's metrics endpoint binds the node address
                extra["_node_ip_address"] = "127.0.0.1"
            ray.init(num_cpus=args.num_cpus, object_store_memory=store, include_dashboard=False, **extra)
    except (ConnectionError, ValueError, RuntimeError) as err:
        loading.close()
        if args.debug:
            raise
        print(f"error: cannot start or join Ray ({err}); check --address", file=sys.stderr)
        return 2
    on_signal()
    code = 0
    try:
        app = build_app(app_args)
        # Ray's proxy joins the port here; it knows no route until the deployment below, so deploy at once.
        serve.start(http_options={"host": args.host, "port": args.port})
        serve._run(app, name=APP_NAME, route_prefix="/", _blocking=False)
        code = _wait_until_running(serve, APP_NAME, loading, stop)
        if code == 0 and not stop.is_set():
            print(f"supir-rt: serving on http://{args.host}:{args.port}/v1/restore (health: /v1/health); "
                  "Ctrl-C to stop", file=sys.stderr, flush=True)
            stop.wait()
        if code == 0:
            _drain(serve, APP_NAME, args.drain_timeout)
    except Exception as err:  # noqa: BLE001 - a deployment that fails to start (bad weights, no GPU, too few CPUs)
        if args.debug:
            raise
        print(f"error: the application did not start ({_last_line(err)})", file=sys.stderr)
        code = 2
    finally:
        loading.close()
        print("stopping", file=sys.stderr, flush=True)
        if args.address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()  # stops the local Ray instance this command started (raylet, GCS, agents)
    return code


class _NoLoadingAnswer:
    def close(self) -> None:
        pass


def _metrics_host(host: str) -> str:
    return "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"


def _last_line(err: BaseException | str) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _wait_until_running(serve: Any, app: str, loading: Any, stop: threading.Event) -> int:
    """Wait for the application: the loading answer stops once the HTTP front is up (it answers 503 itself
    until a model replica is ready); 0 when running, 2 (with one error line) when it failed."""
    while not stop.is_set():
        status = serve.status().applications.get(app)
        if status is not None:
            front = status.deployments.get("SupirAPI")
            if front is not None and front.status == "HEALTHY":  # str enums
                loading.close()
            if status.status == "RUNNING":
                loading.close()
                return 0
            if status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                messages = [d.message for d in status.deployments.values() if d.message] or [status.message]
                print(f"error: the application did not start ({_last_line(messages[0])})", file=sys.stderr)
                return 2
        stop.wait(0.5)
    return 0


def _drain(serve: Any, app: str, timeout_s: float) -> None:
    """SIGTERM/SIGINT: the front answers 503 + Retry-After to new requests; wait for those in flight."""
    try:
        front = serve.get_deployment_handle("SupirAPI", app_name=app)
        pending = front.drain.remote().result(timeout_s=10)
        deadline = time.monotonic() + timeout_s
        if pending:
            print(f"draining: {pending} request(s) in flight (up to {timeout_s:g} s)", file=sys.stderr, flush=True)
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            pending = front.pending.remote().result(timeout_s=10)
        if pending:
            print(f"drain timeout: {pending} request(s) still running are dropped", file=sys.stderr, flush=True)
    except Exception as err:  # noqa: BLE001 - nothing to drain when the front is gone
        print(f"drain skipped ({_last_line(err)})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# supir-rt triton-repo / supir-rt triton
# --------------------------------------------------------------------------------------------------


def add_triton_repo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "triton-repo", help="write a Triton Inference Server model repository (Python backend)",
        description="Write a Triton model repository for supir-rt: OUT_DIR/supir/config.pbtxt and "
        "OUT_DIR/supir/1/model.py (Python backend wrapping Restorer). Serve it with "
        "tritonserver --model-repository OUT_DIR. Weight paths are those of the Triton machine: without "
        f"--sdxl/--supir/--weights-dir, placeholders under {REMOTE_WEIGHTS}. See docs/serving.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  supir-rt triton-repo models/                       weights expected under /weights on the server\n"
        "  supir-rt triton-repo models/ --weights-dir /mnt/supir --gpus 0,1\n"
        "  supir-rt triton-repo models/ --tiny-random         the tiny random model (outputs are NOT restorations)\n"
        "  tritonserver --model-repository models/")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="repository folder (created; must be empty or new)")
    p.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids for instance groups, one instance per GPU (default: one CPU instance)")
    p.add_argument("--max-batch-size", type=int, default=4, help="Triton dynamic batching size (default 4)")
    p.add_argument("--max-queue-delay-us", type=int, default=50_000, help="dynamic batching wait (default 50000 µs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository's files")
    _add_runtime_flags(p)
    _add_limit_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_triton_repo, remote_paths=True)


def run_triton_repo(args: argparse.Namespace) -> int:
    from supir_rt.errors import SetupError
    from supir_rt.serve.triton import write_model_repository

    try:
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else []
        path = write_model_repository(args.out_dir, runtime=_runtime(args), limits=_limits(args), gpus=gpus,
                                      max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                                      overwrite=args.overwrite)
    except (ValueError, SetupError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}; serve it with: tritonserver --model-repository {args.out_dir}", file=sys.stderr)
    return 0


def add_triton_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "triton", help="serve the model through PyTriton (the Triton server bundled in nvidia-pytriton)",
        description="Serve supir-rt through PyTriton (Triton HTTP on --http-port, gRPC on --grpc-port): model "
        "'supir', inputs image (bytes) + settings (JSON bytes), output image (PNG bytes). See docs/serving.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  supir-rt triton --tiny-random                      try it without weights (outputs are NOT restorations)\n"
        "  supir-rt triton --weights-dir ~/weights --host 0.0.0.0 --http-port 8000")
    p.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port (default 8002)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--max-batch-size", type=int, default=4, help="dynamic batching size (default 4)")
    p.add_argument("--max-queue-delay-us", type=int, default=50_000, help="dynamic batching wait (default 50000 µs)")
    _add_runtime_flags(p)
    _add_limit_flags(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_triton)


def run_triton(args: argparse.Namespace) -> int:
    from supir_rt.errors import SetupError
    from supir_rt.serve.triton import serve_pytriton  # imports PyTriton only when serving

    try:
        require_extra("triton", "pytriton.triton", "tritonclient.http")
        return serve_pytriton(runtime=_runtime(args), limits=_limits(args), host=args.host, http_port=args.http_port,
                              grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                              max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us)
    except (ValueError, SetupError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = ["add_serving_parsers", "run_serve", "run_triton", "run_triton_repo", "serve_config_yaml"]
