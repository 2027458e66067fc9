"""A Ray cluster of machines that share no disk, no /tmp and no loopback, built on one Linux machine.

Every node is a network namespace with its own address on one private network segment, and a private mount
namespace with its own tmpfs on ``/tmp`` (its "disk": Ray's temp folder, ``HOME``, the model cache, scratch files)
and on ``/dev/shm`` (Ray's object store). The segment is a bridge in a namespace of its own (the "switch"); each
node, the S3-compatible server (moto, in a namespace of its own) and this machine (the "operator", outside the
cluster) have one veth port on it. Nothing routes off the segment: no namespace has a default route, so nothing
leaves the machine. What the nodes share is what machines installed from one image share: the code (this
repository and its virtual environment, at the same paths) and read-only data outside ``/tmp``.

The nodes run Ray as an operator would on two machines, with token authentication::

    ray start --head --node-ip-address 10.251.K.1 --port 6379 ...          # in the head's namespaces
    ray start --address 10.251.K.1:6379 --node-ip-address 10.251.K.2 ...   # in a worker's

A driver runs on a node (it joins the node's namespaces with ``nsenter``, :meth:`NetnsCluster.popen`) and gives
``--ray-address 10.251.K.1:6379``, or outside the cluster with ``ray://10.251.K.1:10001`` (Ray Client).

Clean-up: every process on a node lives in the node's network namespace, so ``ip netns pids`` finds each of them
(Ray daemonises its servers); :meth:`NetnsCluster.stop` kills them by pid and deletes the namespaces (the veths and
the mounts go with them). A state file per cluster in :data:`STATE_DIR` names its owner (pid and start time) and
its namespaces: a cluster whose owner died (a killed test run) is removed by the next :meth:`NetnsCluster.start`.
SIGTERM and interpreter exit stop the clusters of this process too.

Run ``python -m tests.cluster.netns up`` to get a cluster to try by hand (it prints how to reach it and stops it
on Ctrl-C), ``python -m tests.cluster.netns clean`` to remove what killed runs left.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: Every namespace and link the harness makes is named ``<PREFIX>-<tag>...``.
PREFIX = "segpn"
#: One JSON file per live cluster: its owner and what it made (``/run`` is a tmpfs: gone after a reboot).
STATE_DIR = Path("/run/segpipe-netns")
#: The segment's first three octets are ``10.251.K``, with K the first not used by this machine's addresses.
NETWORK = "10.251"
S3_HOST, OPERATOR_HOST = 253, 254
S3_PORT, GCS_PORT, CLIENT_PORT, DASHBOARD_PORT = 5000, 6379, 10001, 8265
#: Size limits of each node's tmpfs mounts (memory is only used as files are written).
DISK_SIZE, SHM_SIZE = "4g", "1g"
#: Bytes of Ray's object store per node (Ray's minimum is 75 MB; segpipe moves indices and stats only).
OBJECT_STORE_BYTES = 100_000_000
#: Credentials for the S3 server (moto accepts any).
S3_ENV = {"AWS_ACCESS_KEY_ID": "segpipe", "AWS_SECRET_ACCESS_KEY": "segpipe-test", "AWS_REGION": "us-east-1"}

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something other than None or False; that value. AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
    return done


def namespaces_problem() -> str | None:
    """Why network and mount namespaces cannot be made here (one line), or None when they can: the harness needs
    root, ``ip``, ``unshare`` and ``nsenter``, and is tried once (a namespace added and deleted, a tmpfs mounted
    in a private mount namespace)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network and mount namespaces need root (CI runs the cluster tests as root)"
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (iproute2, util-linux)"
    probe = f"{PREFIX}-probe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        private_tmp = "unshare -m --propagation private -- mount -t tmpfs -o size=1m probe /tmp"
        _run("ip", "netns", "exec", probe, *private_tmp.split())
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network and mount namespace here: {str(exc).splitlines()[0][:200]}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


# --- state files and leftovers --------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def _netns_names() -> list[str]:
    done = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """Every process whose network namespace is ``name`` (what ``ip netns pids`` lists)."""
    done = _run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def kill_pids(pids: Sequence[int], *, timeout: float = 30) -> None:
    """SIGKILL each pid, then wait until none of them exists (a zombie counts as gone)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                return False
        return True

    wait_until(gone, timeout=timeout, what=f"processes {list(pids)[:10]} to end", interval=0.05)


def remove_namespaces(names: Sequence[str], link: str | None = None) -> None:
    """Kill every process in the network namespaces ``names``, by pid, then delete them and ``link`` (the
    operator's veth; its peer, and every other veth, goes with its namespace)."""
    for name in names:
        kill_pids(netns_pids(name))
    if link:
        _run("ip", "link", "del", link, check=False)
    for name in names:
        _run("ip", "netns", "del", name, check=False)
    if link:
        wait_until(
            lambda: _run("ip", "link", "show", link, check=False).returncode != 0, timeout=30, what=f"link {link} to go"
        )


def _live_probe(name: str) -> bool:
    """Whether ``name`` is the namespace of a :func:`namespaces_problem` whose process still runs."""
    pid = name.removeprefix(f"{PREFIX}-probe")
    return pid != name and pid.isdigit() and _start_time(int(pid)) is not None


def clean_leftovers() -> list[str]:
    """Remove what clusters of dead owners left (their namespaces, processes and links); returns the namespaces
    removed. A namespace with the harness's prefix that no live owner's state file names is a leftover too."""
    removed: list[str] = []
    live: set[str] = set()
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _start_time(int(state["owner"])) == state["owner_start"]:
            live.update(state["netns"])
            continue
        remove_namespaces(state["netns"], state.get("link"))
        removed += state["netns"]
        shutil.rmtree(path.with_suffix(".logs"), ignore_errors=True)
        path.unlink(missing_ok=True)
    strays = [n for n in _netns_names() if n.startswith(f"{PREFIX}-") and n not in live and not _live_probe(n)]
    if strays:
        remove_namespaces(strays)
        removed += strays
    return removed


# --- the cluster ----------------------------------------------------------------------------------------------


@dataclass
class Node:
    """One machine of the cluster: its namespace, address and Ray resources.

    Attributes:
        name: ``head``, ``worker1``, ... (the namespace is ``<prefix>-<tag>-<name>``).
        netns: The network namespace's name.
        ip: The node's address on the segment.
        cpus: CPUs Ray is told the node has.
        gpus: GPUs Ray is told the node has (declared; none is real here).
        head: Whether the node runs Ray's head (GCS, dashboard, Ray Client server).
        anchor: The process that holds the node's mount namespace (``sleep``); every command on the node joins
            its namespaces.
    """

    name: str
    netns: str
    ip: str
    cpus: int = 1
    gpus: int = 0
    head: bool = False
    anchor: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def enter(self) -> list[str]:
        """The argv prefix that runs a command on this node (its network and mount namespaces)."""
        assert self.anchor is not None, f"node {self.name} is not started"
        return ["nsenter", "-t", str(self.anchor.pid), "-n", "-m", f"--wd={REPO}", "--"]

    def pids(self) -> list[int]:
        return netns_pids(self.netns)

    def processes(self, name: str) -> list[int]:
        """Pids of the node's processes whose command name (``/proc/PID/comm``) is ``name``."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    found.append(pid)
        return found


_LIVE: set[NetnsCluster] = set()
_HANDLERS_SET = False


def _stop_all() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.stop()


def _on_sigterm(signum: int, frame: Any) -> None:
    """Stop this process's clusters, then end as SIGTERM would have."""
    _stop_all()
    signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM)
    if callable(_PREVIOUS_SIGTERM):
        _PREVIOUS_SIGTERM(signum, frame)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


_PREVIOUS_SIGTERM: Any = signal.SIG_DFL


def _install_handlers() -> None:
    global _HANDLERS_SET, _PREVIOUS_SIGTERM
    if _HANDLERS_SET:
        return
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        _PREVIOUS_SIGTERM = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    _HANDLERS_SET = True


class NetnsCluster:
    """A segment, an S3 server and Ray nodes in namespaces of their own; see the module docstring.

    Use :meth:`start`, then :meth:`add_node` for the head and each worker, :meth:`wait_for_nodes`; or
    :func:`netns_cluster` for all of it. :meth:`stop` removes everything, whatever state it is in.

    Args:
        tag: Names the cluster's namespaces (``<prefix>-<tag>-...``); default: random.
        ray_temp: Not used by nodes (each node's Ray temp folder is ``/tmp/ray`` on its own tmpfs); kept None.
    """

    def __init__(self, *, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(2)
        self.token = secrets.token_hex(32)  # as `ray get-auth-token --generate` makes one
        self.nodes: dict[str, Node] = {}
        self.netns: list[str] = []
        self.link = f"{PREFIX}-{self.tag}"
        self.switch = f"{PREFIX}-{self.tag}-switch"
        self.subnet = ""
        self.s3_process: subprocess.Popen[bytes] | None = None
        #: Output of ``ray start`` and the S3 server (quoted in the errors when they fail); removed by :meth:`stop`.
        self.logs = STATE_DIR / f"{self.tag}.logs"
        self._state = STATE_DIR / f"{self.tag}.json"

    # --- addresses ---------------------------------------------------------------------------------------------

    @property
    def head(self) -> Node:
        return next(n for n in self.nodes.values() if n.head)

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.head]

    @property
    def s3_url(self) -> str:
        """The S3 endpoint, as every node and this machine reach it."""
        return f"http://{self.subnet}.{S3_HOST}:{S3_PORT}"

    @property
    def gcs_address(self) -> str:
        """``host:port`` of the head's GCS (``--ray-address`` on a node)."""
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def client_address(self) -> str:
        """``ray://`` address of the head's Ray Client server (``--ray-address`` from outside the cluster)."""
        return f"ray://{self.head.ip}:{CLIENT_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def base_env(self) -> dict[str, str]:
        """What every process of the cluster and its drivers gets: the S3 endpoint and credentials, Ray's token."""
        return {
            **S3_ENV,
            "AWS_ENDPOINT_URL": self.s3_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def node_env(self, **extra: str) -> dict[str, str]:
        """A clean environment for a process on a node (nothing inherited from this process): the venv on PATH,
        HOME on the node's own disk, :meth:`base_env`, then ``extra``."""
        return {
            "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp/home",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            **self.base_env(),
            **extra,
        }

    def outside_env(self, **extra: str) -> dict[str, str]:
        """This process's environment with :meth:`base_env` and ``extra`` (a driver outside the cluster)."""
        return {**os.environ, **self.base_env(), **extra}

    # --- life cycle --------------------------------------------------------------------------------------------

    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "owner": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "netns": self.netns,
            "link": self.link,
            "subnet": self.subnet,
        }
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state)

    def _new_netns(self, name: str) -> str:
        full = f"{PREFIX}-{self.tag}-{name}"
        self.netns.append(full)
        self._save_state()  # recorded before it exists: a killed run's namespaces are always found
        _run("ip", "netns", "add", full)
        _run("ip", "netns", "exec", full, "ip", "link", "set", "lo", "up")
        return full

    def _plug(self, netns: str | None, port: str, host: int) -> str:
        """A veth from ``netns`` (None: this machine's namespace) to the switch's bridge, with address
        ``<subnet>.<host>/24`` on the node's end (``eth0``; the operator's end is named :attr:`link`)."""
        ip = f"{self.subnet}.{host}"
        if netns is None:
            _run("ip", "link", "add", self.link, "type", "veth", "peer", "name", port, "netns", self.switch)
            dev, prefix = self.link, []
        else:
            _run(
                "ip", "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port, "netns", self.switch
            )
            dev, prefix = "eth0", ["ip", "netns", "exec", netns]
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", port, "master", "br0", "up")
        _run(*prefix, "ip", "addr", "add", f"{ip}/24", "dev", dev)
        _run(*prefix, "ip", "link", "set", dev, "up")
        return ip

    def _pick_subnet(self) -> str:
        used = _run("ip", "-4", "-o", "addr").stdout
        for k in range(256):
            if f" {NETWORK}.{k}." not in used:
                return f"{NETWORK}.{k}"
        raise RuntimeError(f"no free {NETWORK}.K.0/24 segment on this machine")

    def start(self) -> NetnsCluster:
        """Make the segment (the switch, this machine's port) and start the S3 server; removes leftovers of killed
        runs first."""
        _install_handlers()
        _LIVE.add(self)
        clean_leftovers()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        import fcntl

        with open(STATE_DIR / ".lock", "w") as lock:  # two runs at once pick different segments
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = self._pick_subnet()
            self._new_netns("switch")
            _run("ip", "netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
            _run("ip", "netns", "exec", self.switch, "ip", "link", "set", "br0", "up")
            self._plug(None, "operator", OPERATOR_HOST)
        s3 = self._new_netns("s3")
        self._plug(s3, "s3", S3_HOST)
        with (self.logs / "s3.log").open("wb") as log:
            address = ["-H", f"{self.subnet}.{S3_HOST}", "-p", str(S3_PORT)]
            self.s3_process = subprocess.Popen(
                ["ip", "netns", "exec", s3, str(BIN / "moto_server"), *address], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._s3_answers, timeout=60, what=f"the S3 server at {self.s3_url}")
        return self

    def _s3_answers(self) -> bool:
        assert self.s3_process is not None
        if self.s3_process.poll() is not None:
            raise RuntimeError(f"the S3 server exited: {(self.logs / 's3.log').read_text()[-500:]}")
        try:
            urllib.request.urlopen(f"{self.s3_url}/", timeout=2).close()
            return True
        except OSError:
            return False

    def bucket(self, name: str) -> str:
        """Create a bucket on the S3 server; ``s3://name``."""
        request = urllib.request.Request(f"{self.s3_url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return f"s3://{name}"

    def add_node(self, name: str, *, cpus: int = 1, gpus: int = 0, head: bool = False) -> Node:
        """A new machine on the segment (its namespaces, its own /tmp and /dev/shm) running a Ray node: the head
        (GCS, dashboard, Ray Client server) or a worker that joins the head."""
        taken = {n.ip for n in self.nodes.values()}
        number = next(k for k in range(1, S3_HOST) if f"{self.subnet}.{k}" not in taken)
        node = Node(name, self._new_netns(name), "", cpus=cpus, gpus=gpus, head=head)
        node.ip = self._plug(node.netns, name, number)
        self.nodes[name] = node
        mounts = (
            f"mount -t tmpfs -o size={DISK_SIZE},mode=1777 {PREFIX}-disk /tmp && "
            f"mount -t tmpfs -o size={SHM_SIZE},mode=1777 {PREFIX}-shm /dev/shm && "
            "mkdir -p /tmp/home && echo ready && exec sleep infinity"
        )
        node.anchor = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, "unshare", "-m", "--propagation", "private", "--", "sh", "-c", mounts],
            stdout=subprocess.PIPE,
        )
        assert node.anchor.stdout is not None
        if node.anchor.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"node {name}: could not mount its private /tmp and /dev/shm")
        self.start_ray(node)
        return node

    def ray_start_argv(self, node: Node) -> list[str]:
        """``ray start`` as an operator runs it on ``node``'s machine."""
        argv = [str(BIN / "ray"), "start", "--node-ip-address", node.ip, "--num-cpus", str(node.cpus), "--num-gpus",
                str(node.gpus), "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]  # fmt: skip
        if node.head:
            ports = ["--port", str(GCS_PORT), "--ray-client-server-port", str(CLIENT_PORT), "--dashboard-port",
                     str(DASHBOARD_PORT)]  # fmt: skip
            return [*argv, "--head", *ports, "--dashboard-host", node.ip]
        return [*argv, "--address", self.gcs_address]

    def start_ray(self, node: Node) -> None:
        """Run ``ray start`` on ``node`` (it returns once the node's servers run in the background)."""
        log = self.logs / f"ray-start-{node.name}.log"
        # Ray Client starts a server process per client on the head and gives it 30 s to answer: not always enough
        # on a 2-core machine that runs the whole cluster (seen under load as "Initialization failure from server")
        slow_machine = {"RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"} if node.head else {}
        with log.open("ab") as sink:
            done = subprocess.run(
                [*node.enter(), *self.ray_start_argv(node)],
                env=self.node_env(**slow_machine),
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=180,
            )
        if done.returncode != 0:
            raise RuntimeError(f"ray start on {node.name} failed: {log.read_text()[-1500:]}")

    def state(self, resource: str, **params: str | int) -> list[dict[str, Any]]:
        """Rows of Ray's state API on the head's dashboard (``nodes``, ``tasks``, ``actors``; ``params`` as its
        query string takes them), read over HTTP with the cluster's token, as ``curl`` would."""
        query = urllib.parse.urlencode({"limit": 10000, "timeout": 30, **params})
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/{resource}?{query}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            return list(json.loads(answer.read())["data"]["result"]["result"])

    def alive_nodes(self) -> dict[str, str]:
        """Alive Ray nodes, node id -> address, as the head's dashboard reports them ({} while it does not
        answer)."""
        try:
            nodes = self.state("nodes")
        except (OSError, ValueError, KeyError):  # the dashboard is not up yet
            return {}
        return {n["node_id"]: n["node_ip"] for n in nodes if n["state"] == "ALIVE"}

    def wait_for_nodes(self, timeout: float = 180) -> dict[str, str]:
        """Wait until exactly the started nodes are alive in the cluster; node id -> address."""
        want = sorted(n.ip for n in self.nodes.values())

        def ready() -> dict[str, str] | None:
            alive = self.alive_nodes()
            return alive if sorted(alive.values()) == want else None

        return wait_until(ready, timeout=timeout, what=f"Ray nodes {want} to be alive", interval=0.5)

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> node name, for the alive nodes."""
        by_ip = {n.ip: n.name for n in self.nodes.values()}
        return {node_id: by_ip[ip] for node_id, ip in self.alive_nodes().items() if ip in by_ip}

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet (the machine is lost to the cluster); its pid."""
        (pid,) = node.processes("raylet")
        kill_pids([pid])
        return pid

    def restart(self, node: Node) -> None:
        """Kill every process of ``node`` but its anchor and start Ray on it again (a machine rebooted with its
        disk)."""
        assert node.anchor is not None
        kill_pids([p for p in node.pids() if p != node.anchor.pid])
        self.start_ray(node)

    def remove_node(self, node: Node) -> None:
        """Take ``node`` away: its processes killed by pid, its namespaces deleted."""
        remove_namespaces([node.netns])
        self.netns.remove(node.netns)
        del self.nodes[node.name]
        if node.anchor is not None:
            node.anchor.wait(timeout=30)
        self._save_state()

    def stop(self) -> None:
        """Kill every process of the cluster by pid and delete its namespaces and link; safe to call twice."""
        if self.netns:
            remove_namespaces(self.netns, self.link)
        for node in self.nodes.values():
            if node.anchor is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.anchor.wait(timeout=30)
        if self.s3_process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.s3_process.wait(timeout=30)
        self.netns = []
        shutil.rmtree(self.logs, ignore_errors=True)
        self._state.unlink(missing_ok=True)
        _LIVE.discard(self)

    # --- running things on nodes -------------------------------------------------------------------------------

    def popen(self, node: Node, argv: Sequence[str], *, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
        """Start ``argv`` on ``node`` (in its namespaces, with :meth:`node_env` plus ``env``); a Popen."""
        return subprocess.Popen([*node.enter(), *argv], env=self.node_env(**(env or {})), cwd=REPO, **kwargs)

    def run(
        self, node: Node, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``node`` to its end (output captured as text); killed by pid after ``timeout`` s."""
        process = self.popen(node, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def put(self, node: Node, source: Path, target: str) -> None:
        """Copy this machine's file ``source`` to ``target`` on ``node``'s own disk (its parent folders made)."""
        process = self.popen(
            node, ["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "put", target], stdin=subprocess.PIPE
        )
        process.communicate(source.read_bytes(), timeout=60)
        if process.returncode != 0:
            raise RuntimeError(f"could not write {target} on {node.name}")

    def files(self, node: Node, pattern: str) -> list[str]:
        """Paths on ``node``'s own disk that match the glob ``pattern`` (read in its mount namespace)."""
        done = self.run(
            node,
            [
                sys.executable,
                "-c",
                "import glob, sys; print('\\n'.join(sorted(glob.glob(sys.argv[1], recursive=True))))",
                pattern,
            ],
            timeout=60,
        )
        return [line for line in done.stdout.splitlines() if line]


@contextlib.contextmanager
def netns_cluster(
    nodes: Sequence[tuple[str, int, int]] = (("head", 1, 0), ("worker1", 1, 0)),
) -> Iterator[NetnsCluster]:
    """A started cluster: the first of ``nodes`` (name, CPUs, GPUs) is the head; stopped when the block ends, however
    it ends."""
    cluster = NetnsCluster()
    try:
        cluster.start()
        for k, (name, cpus, gpus) in enumerate(nodes):
            cluster.add_node(name, cpus=cpus, gpus=gpus, head=k == 0)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.cluster.netns", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "clean"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs each worker declares")
    args = parser.parse_args(argv)
    problem = namespaces_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.action == "clean":
        print("\n".join(clean_leftovers()) or "nothing left behind")
        return 0
    nodes = [("head", 1, 0), *((f"worker{k}", 1, args.gpus) for k in range(1, args.workers + 1))]
    with netns_cluster(nodes) as cluster:
        for node in cluster.nodes.values():
            print(f"{node.name:<8} {node.ip:<14} sudo nsenter -t {node.enter()[2]} -n -m -- bash")
        print(f"S3 {cluster.s3_url}; --ray-address {cluster.gcs_address} (on a node), {cluster.client_address}")
        print(f"environment: {' '.join(f'{k}={v}' for k, v in cluster.base_env().items())}")
        print("Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
