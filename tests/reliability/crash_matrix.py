"""The crash-point matrix: ``segpipe`` SIGKILLed at each stage boundary and inside each stage, for one scene and for a
data set, then run again. Used by ``tests/reliability/test_crash_matrix.py`` and ``benchmarks/crash_matrix.py``.

One case is one :class:`Point` for one :class:`Command`:

1. the command runs under ``_crash_at.py``, which SIGKILLs the process at the point (and says so in a mark file);
   meanwhile a watcher thread polls the output folder every 10 ms and opens every visible (not hidden) file as a
   user would: a ``.tif`` opens and reads with rasterio, a ``.json`` parses, a ``.gpkg`` opens and reads with pyogrio;
   and it notes every descendant process of the run;
2. at once after the kill, the run's locks are taken (its outputs' and its work store's, as a second run would take
   them): none may be held;
3. every process the run started must be gone within :data:`REAP_SECONDS` (the reaper's grace included);
4. the same command runs again (same ``--work-dir``) and must succeed, leave no temporary folder and give the
   files of a clean run of the command: the same names in the output folder (hidden ones included), COGs byte for
   byte, the GeoPackage byte for byte but for its ``last_change`` time stamp, JSON equal but for time fields (and
   for the counters of what a resumed run reused), paths compared relative to the case's folder.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from segpipe.core.errors import OutputError
from segpipe.core.locks import exclusive_lock
from segpipe.pipeline import store as ws
from tests.reliability.helpers import subprocess_env

HERE = Path(__file__).resolve().parent
SCENE = HERE.parent / "data" / "RGB.byte.tif"
#: ``python CRASH_AT segpipe-args...`` with ``$SEGPIPE_TEST_CRASH_AT``: the CLI killed at a point.
CRASH_AT = HERE / "_crash_at.py"
#: Seconds every process a killed run started has to be gone (the reaper notes them every 0.5 s and gives SIGTERM
#: 3 s before SIGKILL).
REAP_SECONDS = 15.0
#: Seconds one command may take (a loaded 2-core machine).
COMMAND_TIMEOUT = 300
POLL_SECONDS = 0.01

KINDS = ("single", "dataset")


@dataclass(frozen=True)
class Point:
    """Where a run is killed: ``stage`` at ``when`` (``before``: at the entry of the stage's function; ``inside``:
    after its first region, batch, block or write; ``between``: export's first output in place, the next complete
    under its hidden name).

    Attributes:
        what: What has happened when the kill comes, for the table.
        kinds: The commands it applies to (STAC is the data set's).
        ray: Run the command on a local Ray instance (``--executor ray --workers 1``): the session then starts one.
    """

    stage: str
    when: str
    what: str
    kinds: tuple[str, ...] = KINDS
    ray: bool = False

    @property
    def name(self) -> str:
        return f"{self.stage}:{self.when}"


POINTS: tuple[Point, ...] = (
    Point("validate", "before", "nothing yet"),
    Point("validate", "inside", "outputs checked, scene described, model not yet fitted"),
    Point("session", "before", "locks held, temporary folder made"),
    Point("session", "inside", "a local Ray instance just started", ray=True),
    Point("ingest", "before", "session up, work store not opened"),
    Point("ingest", "inside", "the first region copied into the work store"),
    Point("infer", "before", "scene in the work store"),
    Point("infer", "inside", "the first batch of tiles written and flagged done"),
    Point("stitch", "before", "every tile done"),
    Point("stitch", "inside", "the first block of tiles blended into the mask"),
    Point("export", "before", "mask and probabilities in the work store"),
    Point("export", "inside", "mask COG complete under its hidden name"),
    Point("export", "between", "mask in place, probabilities COG complete under its hidden name"),
    Point("polygons", "before", "both COGs in place"),
    Point("polygons", "inside", "the first batch of polygons in the GeoPackage under its hidden name"),
    Point("summary", "before", "every output in place, no summary"),
    Point("summary", "inside", "summary complete under its hidden name"),
    Point("item", "before", "scene's outputs and summary in place", kinds=("dataset",)),
    Point("item", "inside", "STAC Item complete under its hidden name", kinds=("dataset",)),
    Point("collection", "before", "every scene done, no collection", kinds=("dataset",)),
    Point("collection", "inside", "STAC Collection complete under its hidden name", kinds=("dataset",)),
)

#: The points the default test run covers (a representative subset; the rest are ``slow``).
DEFAULT_CASES: tuple[tuple[str, str], ...] = (
    ("infer:inside", "single"),
    ("polygons:inside", "single"),
    ("summary:before", "single"),
    ("collection:before", "dataset"),
)


def point(name: str) -> Point:
    return next(p for p in POINTS if p.name == name)


def cases() -> list[tuple[Point, str]]:
    """Every (point, kind) of the matrix."""
    return [(p, kind) for p in POINTS for kind in p.kinds]


@dataclass(frozen=True)
class Command:
    """One ``segpipe`` command of the matrix, in a folder of its own: ``single`` is ``segpipe run`` of
    ``RGB.byte.tif`` with probabilities and polygons, ``dataset`` is ``segpipe dataset`` of a folder holding it (one
    scene, through the Prefect flow); both blend with cosine (a stitch stage) and keep a ``--work-dir``."""

    kind: str
    ray: bool = False

    @property
    def label(self) -> str:
        return self.kind + ("-ray" if self.ray else "")

    def args(self, root: Path, model: Path, inputs: Path) -> list[str]:
        out, work = root / "out", root / "work"
        common = ["--model", str(model), "--blend", "cosine", "--tile-size", "64", "--halo", "16",
                  "--work-dir", str(work)]  # fmt: skip
        common += ["--executor", "ray", "--workers", "1"] if self.ray else ["--executor", "local"]
        if self.kind == "single":
            return ["run", str(SCENE), str(out / "m.tif"), "--probabilities", str(out / "m.prob.tif"),
                    "--vector", str(out / "m.gpkg"), *common, "--no-prefect"]  # fmt: skip
        return ["dataset", str(inputs), str(out), "--probabilities", "--vector-format", "gpkg", *common]

    def locks(self, root: Path, inputs: Path) -> list[tuple[str, str]]:
        """What the run locks: (path, what) of its outputs and its work store."""
        out, work = root / "out", root / "work"
        if self.kind == "single":
            names, store = ["m.tif", "m.prob.tif", "m.gpkg"], ws.store_url(work.resolve(), str(SCENE))
        else:
            names = ["a.mask.tif", "a.probabilities.tif", "a.polygons.gpkg"]
            store = ws.store_url((work / "a").resolve(), str(inputs / "a.tif"))
        return [*((str(out / n), "output") for n in names), (store, "work store")]


@dataclass
class CaseResult:
    """What one case showed (see the module docstring); :meth:`problems` is empty when all is as it must be."""

    point: str
    kind: str
    command: list[str]
    killed: bool = False
    exit_code: int | None = None
    mark: str = ""
    half_written: list[str] = field(default_factory=list)
    visible_after_kill: list[str] = field(default_factory=list)
    hidden_after_kill: list[str] = field(default_factory=list)
    files_checked: int = 0
    processes_seen: int = 0
    processes_left: list[str] = field(default_factory=list)
    reaped_seconds: float = 0.0
    locks_left: list[str] = field(default_factory=list)
    rerun_exit_code: int | None = None
    rerun_error: str = ""
    identical: bool = False
    differences: list[str] = field(default_factory=list)
    temporary_left: list[str] = field(default_factory=list)
    killed_run_seconds: float = 0.0
    rerun_seconds: float = 0.0

    def problems(self) -> list[str]:
        found = []
        if not self.killed:
            found.append(f"not killed at the point (exit {self.exit_code}, mark {self.mark!r})")
        found += [f"half-written: {h}" for h in self.half_written]
        found += [f"process left: {p}" for p in self.processes_left]
        found += [f"lock left: {lock}" for lock in self.locks_left]
        if self.rerun_exit_code != 0:
            found.append(f"re-run failed (exit {self.rerun_exit_code}): {self.rerun_error}")
        found += [f"re-run differs: {d}" for d in self.differences]
        found += [f"temporary folder left: {t}" for t in self.temporary_left]
        return found

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems()}


# --- what a user would see: every visible file complete ---------------------------------------------------------


def incomplete(path: Path) -> str | None:
    """Why the file at ``path`` is not a complete output (None: it is): a COG rasterio cannot open or read (every
    band, and every overview), JSON that does not parse, a GeoPackage pyogrio cannot open or read."""
    suffix = path.suffix.lower()
    try:
        with warnings.catch_warnings():  # GDAL's warnings on a broken file come with its error
            warnings.simplefilter("ignore")
            _read(path, suffix)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return None


def _read(path: Path, suffix: str) -> None:
    if suffix in (".tif", ".tiff"):
        import rasterio

        with rasterio.open(path) as src:
            src.read()
            for factor in src.overviews(1):
                src.read(out_shape=(src.count, -(-src.height // factor), -(-src.width // factor)))
    elif suffix == ".json":
        json.loads(path.read_bytes())
    elif suffix == ".gpkg":
        import pyogrio
        import pyogrio.raw

        pyogrio.read_info(path)
        pyogrio.raw.read(path)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return str(process.pid)


class Watcher(threading.Thread):
    """Polls a running command: every visible file of ``folder`` is checked once per version (name, inode, size,
    modification time) with :func:`incomplete`, and the command's descendants are noted."""

    def __init__(self, pid: int, folder: Path) -> None:
        super().__init__(name="crash-matrix-watcher", daemon=True)
        self.root = psutil.Process(pid)
        self.folder = folder
        self.stop = threading.Event()
        self.processes: dict[tuple[int, float], psutil.Process] = {}
        self.checked: set[tuple[str, int, int, int]] = set()
        self.half_written: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for k in itertools.count():
                if self.stop.is_set():
                    break
                self.poll(processes=k % 10 == 0)  # processes every 100 ms or so; :func:`tagged` finds the rest
                time.sleep(POLL_SECONDS)
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def poll(self, *, processes: bool = True) -> None:
        if processes:
            with contextlib.suppress(psutil.Error):
                for child in self.root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.processes.setdefault((child.pid, child.create_time()), child)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                key = (entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns)
                if key in self.checked:
                    continue
                self.checked.add(key)
                why = incomplete(Path(entry.path))
                if why is not None:
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(entry.path).st_ino != stat.st_ino:
                            continue  # replaced while it was read: the old version is gone, the new one is checked
                    self.half_written.append(f"{entry.name} ({stat.st_size} bytes): {why}")


#: An environment variable set for the killed command: every process it starts inherits it (Ray's and Prefect's
#: too), so one started and orphaned between two polls of the watcher is still found.
TAG = "SEGPIPE_TEST_CRASH_CASE"


def tagged(value: str) -> list[psutil.Process]:
    """The live processes whose environment has :data:`TAG` set to ``value``."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get(TAG) == value and _alive(process):
                found.append(process)
    return found


def busy_locks(targets: list[tuple[str, str]]) -> list[str]:
    """The locks of ``targets`` that another process holds (a second run could not take them now)."""
    busy = []
    for path, what in targets:
        try:
            with exclusive_lock(path, what):
                pass
        except OutputError:
            busy.append(f"{what} {path}")
    return busy


# --- comparing with a clean run --------------------------------------------------------------------------------

#: Fields of the run summary that time the run, or count what a resumed run reused instead of computing.
SUMMARY_VOLATILE = ("seconds", "megapixels_per_second", "segmenter_seconds", "driver_bytes", "nodes", "ingest_reused")
TILES_VOLATILE = ("reused", "computed", "damaged")
#: A GeoPackage's time stamps (``gpkg_contents.last_change``), as GDAL writes them.
GPKG_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")


def _relative(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


def comparable_json(path: Path, root: Path) -> Any:
    """The JSON at ``path`` without what differs between two correct runs: paths made relative to ``root``; a run
    summary's times and resume counters; a STAC Item's ``created`` and ``datetime`` (the time of the run for a
    scene without a source item) and the GeoPackage's checksum (of a file that holds its write time); a STAC
    Collection's temporal extent (from the items' times)."""
    data = _relative(json.loads(path.read_bytes()), str(root))
    if path.name.endswith(".summary.json"):
        for key in SUMMARY_VOLATILE:
            data.pop(key, None)
        for key in TILES_VOLATILE:
            data["tiles"].pop(key, None)
    elif path.name.endswith(".item.json"):
        data["properties"].pop("created", None)
        data["properties"].pop("datetime", None)
        data.get("assets", {}).get("polygons", {}).pop("file:checksum", None)
    elif path.name == "collection.json":
        data["extent"].pop("temporal", None)
    return data


def differences(clean: Path, clean_root: Path, other: Path, other_root: Path) -> list[str]:
    """How the output folder ``other`` differs from the clean run's ``clean`` (empty: it does not)."""
    names, others = sorted(p.name for p in clean.iterdir()), sorted(p.name for p in other.iterdir())
    found = [] if names == others else [f"files {others} instead of {names}"]
    for name in sorted(set(names) & set(others)):
        a, b = clean / name, other / name
        if name.endswith(".json"):
            same = comparable_json(a, clean_root) == comparable_json(b, other_root)
        elif name.endswith(".gpkg"):
            same = GPKG_TIME.sub(b"T", a.read_bytes()) == GPKG_TIME.sub(b"T", b.read_bytes())
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            found.append(f"{name} differs")
    return found


# --- running the matrix ----------------------------------------------------------------------------------------


@dataclass
class Matrix:
    """Runs cases under ``root`` with the checkpoint ``model``; a clean run of each command is made once."""

    root: Path
    model: Path
    clean_runs: dict[Command, Path] = field(default_factory=dict)
    clean_seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs = self.root / "in"
        if not self.inputs.is_dir():
            self.inputs.mkdir(parents=True)
            shutil.copy(SCENE, self.inputs / "a.tif")

    @property
    def lock_dir(self) -> Path:
        """Where the commands lock (``$SEGPIPE_LOCK_DIR`` of this process, else a folder of the matrix): this
        process takes their locks there too."""
        return Path(os.environ.get("SEGPIPE_LOCK_DIR") or self.root / "locks")

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        """A command's environment: its own temporary folder, the matrix's lock folder, never another command's
        Prefect server."""
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        env = subprocess_env(TMPDIR=str(root / "tmp"), SEGPIPE_LOCK_DIR=str(self.lock_dir), **extra)
        env.pop("PREFECT_API_URL", None)
        return env

    def run(self, command: Command, root: Path, *, log: str) -> tuple[int, str, float]:
        """Run ``command`` in ``root`` to its end: (exit code, stderr, seconds); stderr is kept in ``root/log``."""
        (root / "out").mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(root / log, "w") as errors:
            done = subprocess.run(
                [sys.executable, "-m", "segpipe.cli", *command.args(root, self.model, self.inputs)],
                cwd=root, env=self.env(root), stdout=subprocess.DEVNULL, stderr=errors, timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
        return done.returncode, (root / log).read_text(), time.perf_counter() - started

    def clean(self, command: Command) -> Path:
        """The output folder of a clean run of ``command`` (made on first use)."""
        if command not in self.clean_runs:
            root = self.root / f"clean-{command.label}"
            code, stderr, seconds = self.run(command, root, log="clean.log")
            if code != 0:
                raise AssertionError(f"the clean run of {command.label} failed ({code}): {stderr[-2000:]}")
            self.clean_runs[command] = root
            self.clean_seconds[command.label] = round(seconds, 2)
        return self.clean_runs[command]

    def case(self, at: Point, kind: str) -> CaseResult:
        """Kill ``kind``'s command at ``at``, check what is left, run it again and compare with a clean run."""
        command = Command(kind, ray=at.ray)
        clean = self.clean(command)
        root = self.root / f"{command.label}-{at.stage}-{at.when}"
        shutil.rmtree(root, ignore_errors=True)
        (root / "out").mkdir(parents=True)
        result = CaseResult(at.name, kind, ["segpipe", *command.args(root, self.model, self.inputs)])
        watcher = self._kill(command, at, root, result)
        self._reap(watcher, root, result)
        code, stderr, seconds = self.run(command, root, log="rerun.log")
        result.rerun_exit_code, result.rerun_seconds = code, round(seconds, 2)
        if code != 0:
            result.rerun_error = (stderr.strip().splitlines() or [""])[-1][:500]
        else:
            result.differences = differences(clean / "out", clean, root / "out", root)
            result.identical = not result.differences
        result.temporary_left = sorted(p.name for p in (root / "tmp").iterdir() if p.name.startswith("segpipe-"))
        return result

    def _kill(self, command: Command, at: Point, root: Path, result: CaseResult) -> Watcher:
        """Run ``command`` until the harness kills it at ``at``, watched; then take its locks at once."""
        out = root / "out"
        env = self.env(root, SEGPIPE_TEST_CRASH_AT=at.name, SEGPIPE_TEST_CRASH_MARK=str(root / "mark"))
        env[TAG] = str(root)
        started = time.perf_counter()
        with open(root / "killed.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(CRASH_AT), *command.args(root, self.model, self.inputs)],
                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
            watcher = Watcher(process.pid, out)
            watcher.start()
            try:
                result.exit_code = process.wait(timeout=COMMAND_TIMEOUT)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                watcher.stop.set()
                watcher.join(timeout=60)
        with lock_folder(self.lock_dir):  # at once, as a second run would take them
            result.locks_left = busy_locks(command.locks(root, self.inputs))
        result.killed_run_seconds = round(time.perf_counter() - started, 2)
        if watcher.error is not None:
            raise watcher.error
        watcher.poll(processes=False)  # what is left for a user to find
        mark = root / "mark"
        result.mark = mark.read_text().strip() if mark.exists() else ""
        result.killed = result.exit_code == -9 and result.mark.startswith(at.name)
        result.half_written = watcher.half_written
        result.files_checked = len(watcher.checked)
        names = sorted(p.name for p in out.iterdir())
        result.visible_after_kill = [n for n in names if not n.startswith(".")]
        result.hidden_after_kill = [n for n in names if n.startswith(".")]
        return watcher

    def _reap(self, watcher: Watcher, root: Path, result: CaseResult) -> None:
        """Give the killed run's processes :data:`REAP_SECONDS` to be gone; end those that are not."""
        started = time.perf_counter()
        for found in tagged(str(root)):  # started, and perhaps orphaned, between two polls: found by their tag
            with contextlib.suppress(psutil.Error):
                watcher.processes.setdefault((found.pid, found.create_time()), found)
        result.processes_seen = len(watcher.processes)
        deadline = time.monotonic() + REAP_SECONDS
        while any(_alive(p) for p in watcher.processes.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        result.reaped_seconds = round(time.perf_counter() - started, 2)
        result.processes_left = [_describe(p) for p in watcher.processes.values() if _alive(p)]
        for left in watcher.processes.values():  # never left to the next case
            if _alive(left):
                with contextlib.suppress(psutil.Error):
                    left.kill()


@contextlib.contextmanager
def lock_folder(folder: Path) -> Iterator[None]:
    """``SEGPIPE_LOCK_DIR`` set to ``folder`` for the block (the benchmark's runs lock there, not in /tmp)."""
    saved = os.environ.get("SEGPIPE_LOCK_DIR")
    os.environ["SEGPIPE_LOCK_DIR"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SEGPIPE_LOCK_DIR", None)
        else:
            os.environ["SEGPIPE_LOCK_DIR"] = saved
