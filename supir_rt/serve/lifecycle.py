"""Start-up and shutdown of ``supir-rt serve`` around Ray: port checks, a 503 answer while loading, CPU sizing.

* `claim_port` refuses a port another process listens on, including one held with SO_REUSEPORT (Ray's
  HTTP proxy binds that way, so two servers would otherwise share a port silently and split its traffic).
* `LoadingResponder` answers every request with 503 + Retry-After (JSON) from the first second, while Ray
  starts and the replicas load; it shares the port with Ray's proxy (SO_REUSEPORT, same user) until the
  HTTP front is up, then closes.
* `replica_cpus` sizes the CPUs each model replica asks Ray for from what the cluster has, so that the
  HTTP front (`API_CPUS`) is always scheduled: on a 2-CPU machine two replicas get 0.95 CPU each.

No Ray import here.
"""

from __future__ import annotations

import errno
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_CPUS = 0.1  # what the HTTP front (SupirAPI) reserves


class PortTaken(OSError):
    """The port is in use; the message names the flag that changes it."""


def claim_port(host: str, port: int, flag: str) -> None:
    """Raise `PortTaken` when ``host:port`` cannot be bound exclusively (no SO_REUSEPORT: a socket another
    process holds with SO_REUSEPORT blocks this bind too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortTaken(f"port {port} on {host} is already in use (another supir-rt serve, or another "
                                f"server); stop it or choose another {flag}") from None
            raise PortTaken(f"cannot listen on {host}:{port} ({err.strerror}); check --host and {flag}") from None


class LoadingResponder:
    """A small HTTP server answering 503 + Retry-After to everything (``/v1/health``: ``{"status": "loading"}``)."""

    def __init__(self, host: str, port: int, retry_after_s: float) -> None:
        retry = str(max(1, math.ceil(retry_after_s)))

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                if self.path.split("?", 1)[0] == "/v1/health":
                    body = {"status": "loading"}
                else:
                    body = {"error": {"kind": "loading", "field": "server", "message": "the server is starting "
                                      "(loading the model); retry after the Retry-After delay"}}
                data = json.dumps(body).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", retry)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, *args: object) -> None:  # quiet
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def server_bind(self) -> None:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if hasattr(socket, "SO_REUSEPORT"):  # Ray's proxy joins this port when it starts
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                super().server_bind()

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="supir-loading", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop answering (idempotent)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()


def replica_cpus(asked: float | None, *, replicas: int, cluster_cpus: float | None, gpus_per_replica: float) -> float:
    """CPUs per model replica: ``asked`` (``--cpus-per-replica``) when it fits, else a clear error; by
    default 1, or less when ``replicas`` of 1 plus the HTTP front do not fit ``cluster_cpus``."""
    replicas = max(1, replicas)
    room = None if cluster_cpus is None else cluster_cpus - API_CPUS
    if asked is not None:
        if asked < 0:
            raise ValueError(f"--cpus-per-replica {asked:g}: use a number >= 0")
        if room is not None and gpus_per_replica == 0 and replicas * asked > room + 1e-9:
            fit = math.floor(room / replicas * 100) / 100
            raise ValueError(f"{replicas} replicas x --cpus-per-replica {asked:g} and {API_CPUS:g} CPU for the HTTP "
                             f"front need {replicas * asked + API_CPUS:g} CPUs; Ray has {cluster_cpus:g}: lower "
                             f"--cpus-per-replica (e.g. {fit:g}), --replicas, or raise --num-cpus")
        return asked
    if room is None or gpus_per_replica > 0:
        return 1.0
    if room <= 0:
        raise ValueError(f"Ray has {cluster_cpus:g} CPUs: too few to serve; raise --num-cpus")
    return min(1.0, math.floor(room / replicas * 100) / 100)


__all__ = ["API_CPUS", "LoadingResponder", "PortTaken", "claim_port", "replica_cpus"]
