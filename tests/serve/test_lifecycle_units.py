"""The start-up pieces of `supir-rt serve`, without Ray: CPU sizing, port claiming, the loading answer."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from serve_helpers import free_port

from supir_rt.serve.lifecycle import API_CPUS, LoadingResponder, PortTaken, claim_port, replica_cpus


def test_replica_cpus_leave_room_for_the_http_front():
    # 2 CPUs, 2 replicas: 0.95 each, so that 2 x 0.95 + 0.1 fits (before: 1 each, the front never ran)
    assert replica_cpus(None, replicas=2, cluster_cpus=2, gpus_per_replica=0) == 0.95
    assert 2 * 0.95 + API_CPUS <= 2
    assert replica_cpus(None, replicas=1, cluster_cpus=16, gpus_per_replica=0) == 1.0
    assert replica_cpus(None, replicas=4, cluster_cpus=None, gpus_per_replica=0) == 1.0  # not connected yet
    assert replica_cpus(None, replicas=8, cluster_cpus=2, gpus_per_replica=1) == 1.0  # GPU replicas: as asked
    assert replica_cpus(0.5, replicas=2, cluster_cpus=2, gpus_per_replica=0) == 0.5
    with pytest.raises(ValueError, match=r"--cpus-per-replica \(e.g. 0.95\)"):
        replica_cpus(1.0, replicas=2, cluster_cpus=2, gpus_per_replica=0)


def test_a_port_held_with_so_reuseport_is_refused():
    """Ray's proxy binds with SO_REUSEPORT, which would let a second server share the port silently; an
    exclusive bind (what claim_port tries) fails against it."""
    port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        with pytest.raises(PortTaken, match=f"port {port} on 127.0.0.1 is already in use.*--port"):
            claim_port("127.0.0.1", port, "--port")
    finally:
        holder.close()
    claim_port("127.0.0.1", port, "--port")  # free again


def test_loading_responder_answers_503_json_with_retry_after():
    port = free_port()
    responder = LoadingResponder("127.0.0.1", port, retry_after_s=2.5)
    try:
        for path, key in [("/v1/health", "status"), ("/v1/restore", "error")]:
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            err = caught.value
            assert err.code == 503 and err.headers["Retry-After"] == "3"
            assert err.headers["Content-Type"] == "application/json" and key in json.loads(err.read())
    finally:
        responder.close()
    responder.close()  # idempotent
