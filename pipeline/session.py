"""Sessions: where a run's work happens, kept warm across scenes.

A :class:`Session` is either *in-process* (segmenters and stage tasks run in this process) or a *Ray* session (one
connection to a local Ray instance or to a cluster). Either way it keeps its segmenters (one model each) between
scenes: a data set, or a nightly deployment, loads each model once per worker, not once per scene. A scene with
another model gets segmenters for that model; those of the previous model are let go when the cluster lacks the
resources for both.

On a cluster (``--ray-address``), the stages' region tasks (ingest, stitch) and the export of outputs on object
storage run as Ray tasks on the workers, which open the scene, the work store and the outputs from their URLs:
only URLs, tile indices and small stats cross the driver (:attr:`Session.driver_bytes` counts what does).

Ray is started on demand:

- without an address, a new local instance on loopback only (no dashboard, token authentication, Ray's
  single-machine mode), shut down with the session; a Ray head already running on the machine is never joined;
- with an address (``auto``, ``host:port``, ``ray://host:10001``), that cluster, with token authentication
  (Ray's auth mode set to ``token``, the token from the environment as Ray reads it); a cluster that does not
  answer within ``connect_timeout`` seconds is one clear error.

Segmenters on GPUs claim one GPU each (``num_gpus=1``), on every node; on CPUs, ``actors x threads = cores``. A
segmenter that dies (its process or its node) is dropped and its work unit goes to the others; when none is left,
a new one is started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.core.errors import ConfigError, SegpipeError
from segpipe.core.runtime import available_cores, resolve_device

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
    from ray._private import ray_constants

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
    import subprocess
    import sys

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
    """``ray.init(address)`` that gives up after about ``timeout`` seconds with one clear error: the address must
    accept connections, answer as a Ray cluster and accept this process's token before Ray's own client is
    started."""
    import ray
    from ray.exceptions import AuthenticationError

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if address != "auto":
        _probe(address, timeout)
        _probe_cluster(address, timeout)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=quiet)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if address == "auto":
            raise ConfigError(
                f"--ray-address auto found no running Ray cluster ({first}); start one (ray start --head) or give "
                "its address"
            ) from None
        raise ConfigError(f"cannot connect to the Ray cluster at {address} ({first[:300]})") from None


def _short_temp_dir() -> str | None:
    """Ray's temporary folder when the default (``$TMPDIR/ray``) is too long for its sockets (a Unix socket path
    holds at most 107 bytes, and Ray's add about 70): ``/tmp/ray``; None keeps Ray's default."""
    import tempfile

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
    import ray

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
    import signal
    import threading

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
    import ray

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


@dataclass(frozen=True)
class ModelSpec:
    """What one segmenter holds: a model (packaged name, local path or object URL) with the checksum the run
    planned with and its metadata file when named explicitly, on a device, with a number of torch threads."""

    model: str
    checksum: str | None
    device: str
    threads: int
    metadata: str | None = None


@dataclass
class Pool:
    """The segmenters of one :class:`ModelSpec` in a session."""

    spec: ModelSpec
    actors: list[Any]
    resources: dict[str, float] = field(default_factory=dict)


class Session:
    """Where work runs; see the module docstring.

    Args:
        address: A Ray cluster's address; None for a local Ray instance (when ``ray`` is true).
        ray: Use Ray; False runs everything in this process.
        connect_timeout: Seconds to wait for a cluster at ``address``.
        num_cpus: CPUs of a local Ray instance (default: this process's cores).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        ray: bool = True,
        connect_timeout: float = 30.0,
        num_cpus: int | None = None,
    ) -> None:
        self.address = address
        self.uses_ray = ray or bool(address)
        self.pools: dict[ModelSpec, Pool] = {}
        self.local_segmenters: dict[ModelSpec, Any] = {}
        #: Held while the in-process segmenter works: one model, all cores, one scene at a time (scenes run at once
        #: overlap their ingest and export, not their inference).
        self.local_lock = threading.Lock()
        #: Held while segmenter pools are started or let go (scenes may run on threads).
        self.pools_lock = threading.Lock()
        #: Bytes of results and store data that crossed this process (the driver) for the session's work.
        self.driver_bytes = 0
        self._stack = contextlib.ExitStack()
        self.ray: Any = None
        if self.uses_ray:
            self.ray = self._stack.enter_context(
                ray_session(address, num_cpus or available_cores(), connect_timeout=connect_timeout)
            )

    # --- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        for pool in self.pools.values():
            self._kill(pool.actors)
        self.pools.clear()
        self.local_segmenters.clear()
        self._stack.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def driver_ip(self) -> str:
        """The address of this process's Ray node."""
        return str(self.ray.util.get_node_ip_address()) if self.uses_ray else "127.0.0.1"

    @property
    def on_cluster(self) -> bool:
        """Whether work runs on a cluster given by address (stage tasks then run there, not in the driver)."""
        return self.uses_ray and bool(self.address)

    # --- resources -----------------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """Alive Ray nodes (``[]`` in-process)."""
        if not self.uses_ray:
            return []
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def device(self, choice: str) -> str:
        """``auto``/``cpu``/``cuda`` resolved where the work runs."""
        if not self.uses_ray:
            return resolve_device(choice)
        return resolve_device(choice, gpus=int(self.ray.cluster_resources().get("GPU", 0)))

    def plan_pool(self, device: str, workers: int | None) -> tuple[int, int, dict[str, float]]:
        """(segmenters, torch threads each, Ray resources each) for ``device`` on this session's machines."""
        if not self.uses_ray:
            return 1, available_cores(), {}
        resources = self.ray.cluster_resources()
        if device == "cuda":
            gpus = int(resources.get("GPU", 0))
            n = workers or gpus
            cpus = max(1, int(resources.get("CPU", 1)))
            return n, max(1, cpus // max(1, n) - 1), {"num_gpus": 1, "num_cpus": 1}
        nodes = [n for n in self.nodes() if n.get("Resources", {}).get("CPU", 0) >= 1]
        per_node = min((int(n["Resources"]["CPU"]) for n in nodes), default=available_cores())
        if workers is None:
            # one segmenter per machine, using its cores (torch scales within a machine, Ray across them)
            return max(1, len(nodes)), max(1, per_node), {"num_cpus": max(1, per_node)}
        threads = max(1, int(resources.get("CPU", available_cores())) // workers)
        threads = min(threads, max(1, per_node))
        return workers, threads, {"num_cpus": threads}

    # --- segmenters ----------------------------------------------------------------------------------------

    def segmenters(self, spec: ModelSpec, workers: int, resources: dict[str, float]) -> Pool:
        """The segmenters of ``spec`` (started once per session; reused by every later scene)."""
        with self.pools_lock:
            return self._segmenters(spec, workers, resources)

    def _segmenters(self, spec: ModelSpec, workers: int, resources: dict[str, float]) -> Pool:
        if spec in self.pools:
            return self.pools[spec]
        ray = self.ray
        need = {"CPU": resources.get("num_cpus", 0) * workers, "GPU": resources.get("num_gpus", 0) * workers}
        total = ray.cluster_resources()
        short = [f"{v:g} {k}" for k, v in need.items() if v and total.get(k, 0.0) < v]
        if short:
            raise ConfigError(
                f"{workers} segmenter(s) need {' and '.join(short)} but the Ray cluster has "
                f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; use fewer --workers"
            )
        free = ray.available_resources()
        if any(free.get(k, 0.0) < v for k, v in need.items() if v):
            for other in list(self.pools):  # make room: the previous model's segmenters go
                self._kill(self.pools.pop(other).actors)
        started = time.perf_counter()
        actors = self._start_segmenters(spec, workers, resources)
        log.info("%d segmenter(s) ready in %.1f s", len(actors), time.perf_counter() - started)
        pool = Pool(spec, actors, dict(resources))
        self.pools[spec] = pool
        return pool

    def _start_segmenters(self, spec: ModelSpec, workers: int, resources: dict[str, float]) -> list[Any]:
        """Start ``workers`` segmenters and wait until each has loaded its model.

        A segmenter whose process dies while it starts (killed, out of memory, its node lost) is replaced after a
        backoff, on any node (Ray's SPREAD), up to :data:`START_TRIES` times per segmenter; then the start fails
        with one line naming the last cause. A model that cannot be loaded (its error, raised by ``ping``) is not
        retried: that error is raised as it was raised there.
        """
        from ray.exceptions import RayActorError, RayTaskError

        from segpipe.pipeline.infer import TileSegmenter

        remote = self.ray.remote(max_restarts=0, max_task_retries=0, **resources)(TileSegmenter)
        pending: dict[Any, tuple[int, Any]] = {}

        def launch(attempt: int) -> None:
            actor = remote.options(scheduling_strategy="SPREAD").remote(spec) if attempt else remote.remote(spec)
            pending[actor.ping.remote()] = (attempt, actor)

        for _ in range(workers):
            launch(0)
        ready: list[Any] = []
        try:
            while pending:
                done, _ = self.ray.wait(list(pending), num_returns=1, timeout=START_CHECK_S)
                if not done:
                    self._check_room(resources)
                    continue
                attempt, actor = pending.pop(done[0])
                try:
                    self.ray.get(done[0])
                except RayTaskError as exc:
                    raise raised_there(exc) from None
                except RayActorError as exc:
                    self._kill([actor])
                    cause = start_failure(exc)
                    if attempt + 1 >= START_TRIES:
                        raise RuntimeError(
                            f"a segmenter died while starting, {START_TRIES} times; last: {cause}"
                        ) from None
                    log.warning("a segmenter died while starting (%s); starting another", cause)
                    time.sleep(START_BACKOFF_S * 2**attempt)
                    self._check_room(resources, cause)
                    launch(attempt + 1)
                    continue
                ready.append(actor)
        except BaseException:
            self._kill(ready + [actor for _, actor in pending.values()])
            raise
        return ready

    def _check_room(self, resources: dict[str, float], cause: str = "") -> None:
        """Raise when no live Ray node is big enough for one segmenter (``resources``: Ray's ``num_cpus`` and
        ``num_gpus``), so that a start waits for nothing that cannot come: the only node lost, say."""
        need = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0)}
        for node in self.ray.nodes():
            have = node.get("Resources", {})
            if node.get("Alive") and all(have.get(k, 0.0) >= v for k, v in need.items() if v):
                return
        why = f" ({cause})" if cause else ""
        raise RuntimeError(f"no live Ray node can start a segmenter{why}; check the cluster, then re-run to resume")

    def local_segmenter(self, spec: ModelSpec) -> Any:
        """The in-process segmenter of ``spec`` (loaded once per session)."""
        if spec not in self.local_segmenters:
            from segpipe.pipeline.infer import TileSegmenter

            self.local_segmenters.clear()  # one model in memory at a time
            self.local_segmenters[spec] = TileSegmenter(spec)
        return self.local_segmenters[spec]

    def _kill(self, actors: Sequence[Any]) -> None:
        for actor in actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)

    def run_units(
        self, pool: Pool, call: Callable[[Any, Any], Any], units: Sequence[Any], progress: Callable[[Any], Any]
    ) -> list[Any]:
        """Run every unit on the pool's segmenters (``call(actor, unit)`` returns an object ref); returns the results.

        A segmenter that dies is dropped and its unit handed to another; when none is left a new one is started.
        An error raised by the work itself (bad input found late) is raised here, as it was raised there.
        """
        from ray.exceptions import RayActorError, RayTaskError

        ray = self.ray
        queue = deque(units)
        idle = list(pool.actors)
        pending: dict[Any, tuple[Any, Any]] = {}
        results = []
        while queue or pending:
            while queue and idle:
                actor = idle.pop()
                unit = queue.popleft()
                pending[call(actor, unit)] = (actor, unit)
            if not pending:
                raise SegpipeError("no segmenter is left to run the remaining tiles")
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, unit = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as exc:
                log.warning("a segmenter died (%s); its tiles go to the others", str(exc).splitlines()[0][:200])
                pool.actors.remove(actor)
                self._kill([actor])
                queue.appendleft(unit)
                if not pool.actors:
                    replacement = self._start_segmenters(pool.spec, 1, pool.resources)[0]
                    pool.actors.append(replacement)
                    idle.append(replacement)
                continue
            except RayTaskError as exc:
                raise raised_there(exc) from None
            self.driver_bytes += len(pickle.dumps(result))
            results.append(result)
            idle.append(actor)
            progress(result)
        return results

    # --- stage tasks ---------------------------------------------------------------------------------------

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple[Any, ...]],
        *,
        workers: int,
        progress: Callable[[Any], Any] | None = None,
    ) -> list[Any]:
        """``[fn(*item) for item in items]``, in parallel: Ray tasks on the cluster's workers (retried on another
        node when one is lost), or ``workers`` threads in this process. Results in item order."""
        if not self.on_cluster:
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="stage") as threads:
                found = []
                for result in threads.map(lambda item: fn(*item), items):
                    found.append(result)
                    if progress:
                        progress(result)
                return found
        from ray.exceptions import RayTaskError

        ray = self.ray
        # No CPU claim: the session's segmenters hold the cores while they live (kept warm between scenes), and stage
        # tasks run between inference passes; at most one task per core of the cluster is in flight, spread over
        # the nodes. A task lost with its node is retried on another.
        task = ray.remote(num_cpus=0, max_retries=3, scheduling_strategy="SPREAD")(fn)
        limit = max(1, int(ray.cluster_resources().get("CPU", 1)))
        out: list[Any] = [None] * len(items)
        waiting = deque(enumerate(items))
        running: dict[Any, int] = {}
        while waiting or running:
            while waiting and len(running) < limit:
                k, item = waiting.popleft()
                running[task.remote(*item)] = k
            ready, _ = ray.wait(list(running), num_returns=1)
            k = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as exc:
                raise raised_there(exc) from None
            self.driver_bytes += len(pickle.dumps(result))
            out[k] = result
            if progress:
                progress(result)
        return out


#: Tries to start each segmenter whose process dies while it starts, and the first backoff between them (doubled
#: after each try).
START_TRIES = 3
START_BACKOFF_S = 1.0
#: Seconds between checks, while segmenters start, that a live node can still hold one.
START_CHECK_S = 5.0


def raised_there(error: Any) -> BaseException:
    """The error that a Ray task or actor method raised (``error``, Ray's ``RayTaskError``), to raise here: a
    segpipe error as it was raised there, with its own one-line message (Ray's wrapper puts the worker's traceback
    in front of it); any other error as Ray wraps it (an instance of both, its traceback kept)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, SegpipeError) else error.as_instanceof_cause()


def start_failure(error: Exception) -> str:
    """One line for why a segmenter's process died: out of memory, its node lost, or Ray's first line."""
    text = str(error)
    lowered = text.lower()
    if "out of memory" in lowered or "oom" in lowered.split() or "memory monitor" in lowered:
        return "out of memory"
    if "node" in lowered and ("died" in lowered or "dead" in lowered or "lost" in lowered):
        return "its node was lost"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return first[:200]


def cluster_paths_problem(
    settings: Any, nodes: Sequence[dict[str, Any]], driver_ip: str, *, slide: bool = False
) -> str | None:
    """What of ``settings`` (a :class:`~segpipe.pipeline.settings.RunSettings`) only this machine sees, when the
    cluster has nodes on other machines; None when all is reachable from every node.

    The scene, the work store and the model must be URLs (or a packaged model name) on such a cluster; the outputs
    may stay local, since the driver writes local outputs itself. A whole-slide image (``slide``) is the exception:
    OpenSlide reads local files only, so its INPUT is a path that must be on shared storage mounted at the same
    path on every node (a worker that does not see it fails with that message; a slide at a URL is refused when
    it is opened, :func:`segpipe.pipeline.read.open_source`).
    """
    from segpipe.core.objects import is_object_url
    from segpipe.core.raster import is_remote

    if all(n.get("NodeManagerAddress") == driver_ip for n in nodes):
        return None
    local = []
    if not slide and not (is_remote(settings.input) or is_object_url(settings.input)):
        local.append("INPUT")
    if not settings.work_dir or not is_object_url(settings.work_dir):
        local.append("--work-dir")
    if not is_object_url(settings.model) and ("/" in settings.model or "." in Path(settings.model).name):
        local.append("--model")
    metadata = getattr(settings, "model_metadata", None)
    if metadata and not is_object_url(metadata):
        local.append("--model-metadata")
    if not local:
        return None
    return (
        f"on a Ray cluster of several machines, {', '.join(local)} must be on object storage (s3://, gs://, az://) "
        "that every node reads; the other machines cannot see this machine's files (see docs/cluster.md)"
        + (
            "; the whole-slide INPUT stays a path, on shared storage mounted at the same path on every node "
            "(OpenSlide reads local files only)"
            if slide
            else ""
        )
    )


def auto_uses_ray(*, address: str | None, executor: str, device: str, workers: int | None, tiles: int) -> bool:
    """Whether a run should use Ray: always on a cluster or when asked (``executor="ray"``); never with
    ``executor="local"``; on ``auto``, only where Ray buys something: several workers or GPUs, or a scene large
    enough (more than :data:`IN_PROCESS_TILES` tiles) that isolating the model in an actor that survives a crash
    is worth Ray's start-up (a few seconds)."""
    if address or executor == "ray":
        return True
    if executor == "local":
        return False
    if (workers or 1) > 1:
        return True
    from segpipe.core.runtime import local_gpus

    if device != "cpu" and local_gpus() > 1:
        return True
    return tiles > IN_PROCESS_TILES


#: Scenes of at most this many tiles run in-process on the embedded defaults (no Ray start-up).
IN_PROCESS_TILES = 8
