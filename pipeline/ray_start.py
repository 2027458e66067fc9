"""Ray start-up: connect to a cluster, or start a local instance on loopback only, with one clear error for an
address that does not answer.

Without an address, the local instance is always a new one, bound to 127.0.0.1 (no dashboard, token
authentication, Ray's single-machine mode), shut down afterwards; a Ray head already running on the machine is
never joined. With an address (``auto``, ``host:port``, ``ray://host:10001``), that cluster, with token
authentication (Ray's auth mode set to ``token``, the token from the environment as Ray reads it); a cluster that
does not answer within the connect timeout is one clear error.

Only :mod:`segpipe.pipeline.session` imports this module, and only when a session uses Ray (importing Ray takes
about 0.5 s, which runs in this process skip).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants, services
from ray.exceptions import AuthenticationError

from segpipe.core.errors import ConfigError

log = logging.getLogger(__name__)

#: Ray's switch for its single-machine mode; "0" makes a local instance use loopback for every server.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make the local Ray instance started in this block bind its servers to 127.0.0.1 only.

    On Linux, Ray replaces a node address of 127.0.0.1 by the machine's routable address and binds GCS, raylet,
    workers and agents there or on all interfaces (seen with Ray 2.60). In single-machine mode (Ray's default on
    macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) it uses loopback for everything. The started
    processes inherit the variable; this process reads Ray's constant, which is set here and restored after, so
    a later connection to a real cluster is unaffected. A user who sets the variable keeps their choice.
    """
    saved_env, saved_flag = os.environ.get(RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ.setdefault(RAY_CLUSTER_ENV, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[RAY_CLUSTER_ENV].lower() in ("1", "true")
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)


def _probe(address: str, timeout: float) -> None:
    """Fail fast when ``host:port`` (or ``ray://host:port``) refuses connections or does not resolve."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout, 5.0)):
            return
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check --ray-address and that the "
            "cluster is running"
        ) from None


#: Run in a child process to see whether a Ray cluster answers at an address (Ray's client blocks, uninterruptibly,
#: for a minute on an address that accepts connections but is not a Ray cluster, and retries a refused token for
#: half a minute): exit status 0 when it answers, :data:`TOKEN_REFUSED` when it refused this process's token.
#: ``host:port`` is asked through the GCS client, ``ray://`` with the Ray Client server's ping.
CLUSTER_PROBE = """
import sys
address, timeout = sys.argv[1], float(sys.argv[2])
try:
    if address.startswith("ray://"):
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import ray_client_pb2 as pb, ray_client_pb2_grpc as rpc
        ping = pb.ClusterInfoRequest(type=pb.ClusterInfoType.PING)
        try:
            rpc.RayletDriverStub(init_grpc_channel(address[6:])).ClusterInfo(ping, timeout=timeout)
        except grpc.RpcError as exc:
            sys.exit(3 if exc.code() == grpc.StatusCode.UNAUTHENTICATED else 1)
    else:
        import ray._raylet as r
        r.GcsClient(address=address).internal_kv_get(b"segpipe-probe", None, timeout=timeout)
except Exception as exc:
    sys.exit(3 if type(exc).__name__ == "AuthenticationError" else 1)
"""
#: :data:`CLUSTER_PROBE`'s exit status for a refused token.
TOKEN_REFUSED = 3
#: Where the cluster's token goes, as Ray reads it (the first that is set).
TOKEN_SOURCES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH (a file) or ~/.ray/auth_token"


def _token_missing() -> bool:
    """Whether token authentication is on (``RAY_AUTH_MODE=token``) and none of Ray's token sources holds one."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return False
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return not path.read_text().strip()
    except OSError:
        return True


def _probe_cluster(address: str, timeout: float) -> None:
    """Fail with one line when nothing that speaks Ray's protocol answers at ``address`` (``host:port`` or
    ``ray://host:port``) within ``timeout`` seconds, or when it refuses this process's authentication token."""
    if _token_missing():
        raise ConfigError(
            f"no Ray authentication token to connect to the cluster at {address}; put the cluster's token "
            f"(`ray get-auth-token` on its head) in {TOKEN_SOURCES}, or set RAY_AUTH_MODE=disabled for a cluster "
            "started without authentication"
        )
    try:
        done = subprocess.run(
            [sys.executable, "-c", CLUSTER_PROBE, address, str(timeout)],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
    except subprocess.TimeoutExpired:
        done = None
    if done is not None and done.returncode == TOKEN_REFUSED:
        raise ConfigError(
            f"the Ray cluster at {address} refused this process's authentication token; use the cluster's token "
            f"(`ray get-auth-token` on its head) in {TOKEN_SOURCES}"
        )
    if done is None or done.returncode != 0:
        raise ConfigError(
            f"the Ray cluster at {address} did not answer within {timeout:g} s; check --ray-address, the cluster and "
            "its authentication token (--ray-connect-timeout waits longer)"
        )


def _connect(address: str, timeout: float, quiet: int) -> None:
    """``ray.init(address)`` that gives up after about ``timeout`` seconds with one clear error: the address (for
    ``auto``, the one Ray finds on this machine) must accept connections, answer as a Ray cluster and accept this
    process's token before Ray's own client is started."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    target = _auto_address() if address == "auto" else address
    _probe(target, timeout)
    _probe_cluster(target, timeout)
    try:
        ray.init(address=target, log_to_driver=False, logging_level=quiet)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot connect to the Ray cluster at {target} ({first[:300]})") from None


def _auto_address() -> str:
    """The address ``--ray-address auto`` means, as Ray finds it (``RAY_ADDRESS``, the cluster ``ray start`` last
    started here, or a GCS running on this machine), resolved here so that it is probed like any other.

    Raises:
        ConfigError: Ray finds none.
    """
    try:
        found = services.canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        found, why = None, first
    else:
        why = "Ray found none on this machine"
    if not found:
        raise ConfigError(
            f"--ray-address auto found no running Ray cluster ({why}); start one (ray start --head) or give its address"
        )
    return str(found)


def _short_temp_dir() -> str | None:
    """Ray's temporary folder when the default (``$TMPDIR/ray``) is too long for its sockets (a Unix socket path
    holds at most 107 bytes, and Ray's add about 70): ``/tmp/ray``; None keeps Ray's default."""
    if len(tempfile.gettempdir()) <= 32 or os.environ.get("RAY_TMPDIR") or not os.path.isdir("/tmp"):
        return None
    return "/tmp/ray"


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int, *, connect_timeout: float = 30.0) -> Iterator[Any]:
    """Connect to Ray at ``address``, or start a local instance on loopback that is shut down afterwards.

    Without ``address`` the local instance is always a new one (``address="local"``): ``ray.init()`` alone would
    join any Ray already running on the machine (found through ``/tmp/ray``) and then refuse ``num_cpus``, so a
    user's own ``ray start --head`` would break every run. Set ``--ray-address`` to use such a cluster on purpose.
    """
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR
    with _signal_handlers_kept():
        _start(address, num_cpus, connect_timeout, quiet)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Restore this process's SIGTERM and SIGINT handlers after Ray has started: ``ray.init`` installs its own (and
    a crash handler that aborts on SIGTERM), which would skip the run's clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _start(address: str | None, num_cpus: int, connect_timeout: float, quiet: int) -> None:
    if address:
        _connect(address, connect_timeout, quiet)
    else:
        with _loopback_only():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=quiet,
                _node_ip_address="127.0.0.1",
                _temp_dir=_short_temp_dir(),
            )
