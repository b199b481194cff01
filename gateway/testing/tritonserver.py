"""A real, standalone ``tritonserver`` (from the nvidia-pytriton wheel) for tests.

The wheel bundles Triton 2.x with the python backend only. We run its binary directly, without
PyTriton's Python API, so tests talk to Triton exactly as the gateway talks to a remote host:
HTTP/gRPC on loopback, models pushed with the repository API (``--model-control-mode explicit``).

Each ``start()`` gets a fresh scratch directory (copied server tree, empty model repository, log
file); copying the ~30 MB tree takes well under 0.1 s here, so there is no cross-run cache.

Why one module of this size: a test harness (start, readiness, logs, restart, kill, CPU
accounting of one process) kept whole so tests and benches drive Triton one way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from gateway.testing.gateway_process import free_port, listens_on

__all__ = [
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "free_port",
    "process_cpu_s",
    "process_running",
    "tritonserver_unavailable_reason",
]

_LOG_TAIL_CHARS = 4000
_BIND_ATTEMPTS = 3
_BIND_RETRY_DELAY_S = 1.0


class TritonServerError(RuntimeError):
    """The test server could not be started (the message carries the log tail)."""


def _pytriton_tree() -> Path | None:
    """The ``tritonserver`` directory inside the installed pytriton package, if any."""
    try:
        import pytriton  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(pytriton.__file__).parent / "tritonserver"


def find_tritonserver() -> Path | None:
    """Path of the bundled ``tritonserver`` binary, or None when the wheel is not installed."""
    tree = _pytriton_tree()
    if tree is None:
        return None
    binary = tree / "bin" / "tritonserver"
    return binary if binary.is_file() else None


def _stub_path(tree: Path) -> Path:
    """The python-backend stub built for the running interpreter's minor version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return tree / "python_backend_stubs" / version / "triton_python_backend_stub"


def _libs_path() -> str:
    from pytriton.utils.distribution import get_libs_path  # type: ignore[import-untyped]

    return str(get_libs_path())


def server_env() -> dict[str, str]:
    """Environment for the server, so its python-backend stub runs as *this* interpreter.

    - LD_LIBRARY_PATH: our libpython first, else the stub loads the system libpython against
      our stdlib and model loads fail (``'_thread.RLock' object has no attribute
      '_recursion_count'``). An inherited value is dropped: stray libs there break loads.
    - PATH: our interpreter's bin first. The stub's embedded Python ignores PYTHONPATH
      (isolated init) and finds its prefix by looking ``python3`` up on PATH; finding our venv's
      ``python3`` (next to ``pyvenv.cfg``) gives models this venv's onnxruntime and numpy.
    - PYTHONPATH: the venv's site-packages, for stubs that do honour it.
    """
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, _libs_path()) if p)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    paths = sysconfig.get_paths()
    site_dirs = dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if p)
    env["PYTHONPATH"] = os.pathsep.join(site_dirs)
    env.pop("PYTHONHOME", None)
    return env


@functools.cache
def tritonserver_unavailable_reason() -> str | None:
    """Why the bundled tritonserver cannot run here (None when it can); for ``pytest.skip``."""
    if not sys.platform.startswith("linux"):
        return f"the nvidia-pytriton tritonserver runs on Linux only, not {sys.platform}"
    binary = find_tritonserver()
    if binary is None:
        return "nvidia-pytriton is not installed (it bundles the tritonserver binary)"
    stub = _stub_path(binary.parent.parent)
    if not stub.is_file():
        return f"no python-backend stub for Python {sys.version_info[:2]} at {stub}"
    try:
        proc = subprocess.run(
            [str(binary), "--help"],
            env=server_env(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{binary} cannot run: {exc}"
    text = proc.stdout + proc.stderr
    if b"--model-control-mode" not in text:
        tail = text.decode(errors="replace")[-500:]
        return f"{binary} --help failed (rc={proc.returncode}): {tail}"
    return None


class TritonServer:
    """One tritonserver process on free loopback ports with an empty, explicit-mode repository.

    ``stop()`` is graceful (SIGTERM, then SIGKILL) and removes the scratch directory; ``kill()``
    is abrupt and keeps it so the log can be read; ``restart()`` comes back on the same ports.

    On SIGTERM Triton waits up to ``exit_timeout_s`` for in-flight requests *and* for open
    HTTP keep-alive connections, so a client pool left open makes ``stop()`` take exactly that
    long; hence the short default (Triton's own is 30 s).
    """

    def __init__(
        self,
        *,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
        exit_timeout_s: int = 3,
        extra_args: tuple[str, ...] = (),
        keep_files: bool = False,
    ) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = extra_args
        self.keep_files = keep_files
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.scratch_dir: Path | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.shm_prefix: str | None = None  # its python-backend stubs' shared-memory regions

    # -- addresses -------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._port(self.http_port)}"

    @property
    def http_address(self) -> str:
        """``host:port``: ``tritonclient.http`` rejects a URL with a scheme."""
        return f"127.0.0.1:{self._port(self.http_port)}"

    @property
    def grpc_url(self) -> str:
        """``host:port``, the form ``tritonclient.grpc`` expects (no scheme)."""
        return f"127.0.0.1:{self._port(self.grpc_port)}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._port(self.metrics_port)}/metrics"

    @property
    def pid(self) -> int | None:
        """None once the process has exited: a stale pid could name someone else's process."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def repo_dir(self) -> Path:
        return self._scratch() / "models"

    @property
    def log_path(self) -> Path:
        return self._scratch() / "tritonserver.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server and its live python-backend stubs (benches)."""
        pid = self.pid
        if pid is None:
            return 0.0
        return process_cpu_s(pid) + sum(process_cpu_s(child) for child in _child_pids(pid))

    def log_text(self) -> str:
        """Server log plus its stdout/stderr, for assertions and failure messages."""
        parts = []
        for path in (self._scratch() / "stdout.txt", self.log_path):
            if path.is_file():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start on new free ports (or the ports of a previous run, see ``restart``)."""
        if self.running:
            raise TritonServerError(f"tritonserver already running (pid {self.pid})")
        reason = tritonserver_unavailable_reason()
        if reason is not None:
            raise TritonServerError(reason)
        fixed_ports = self.http_port is not None
        for attempt in range(_BIND_ATTEMPTS):
            if not fixed_ports:
                self.http_port, self.grpc_port, self.metrics_port = _three_free_ports()
            try:
                self._launch()
                return self
            except TritonServerError as exc:
                # Free ports are racy and a restart may find ours briefly taken: retry that only.
                if "already in use" not in str(exc) or attempt == _BIND_ATTEMPTS - 1:
                    self._remove_scratch()
                    raise
                time.sleep(_BIND_RETRY_DELAY_S if fixed_ports else 0.0)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM our own process, SIGKILL after ``stop_timeout_s``; then drop the scratch dir."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            stubs = _stubs(proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc, stubs)
            _remove_dirs(_model_dirs(stubs))
        self._remove_shm()
        self._proc = None
        self._remove_scratch()

    def kill(self) -> None:
        """SIGKILL the server and its python-backend stubs, like a host crash (a stub that is busy
        when its server dies can outlive it); keeps the scratch dir so the log can be read."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            stubs = _stubs(proc.pid)
            _kill(proc, stubs)
            _remove_dirs(_model_dirs(stubs))
            self._remove_shm()

    def restart(self) -> Self:
        """Stop (if needed) and start again on the same ports with an empty repository."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _launch(self) -> None:
        self._remove_scratch()
        scratch = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        self.scratch_dir = scratch
        server_dir = _copy_server_tree(scratch / "server")
        self.repo_dir.mkdir()
        # Named after the scratch dir: the regions a killed server or stub leaves in /dev/shm
        # (1 MiB and more each, never freed otherwise) are found and removed by ``_remove_shm``.
        self.shm_prefix = f"gateway_test_{scratch.name}_"
        args = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repo_dir}",
            f"--backend-directory={server_dir / 'backends'}",
            "--model-control-mode=explicit",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-file={self.log_path}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]
        started = time.monotonic()
        with open(scratch / "stdout.txt", "wb") as out:
            self._proc = subprocess.Popen(
                args,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=scratch,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self.startup_s = time.monotonic() - started

    def _remove_shm(self) -> None:
        """Unlink what is left of this server's python-backend shared memory (the server and
        its stubs gone): Triton unlinks its regions on a clean exit, not when killed."""
        if self.shm_prefix is not None:
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while True:
            assert self._proc is not None
            rc = self._proc.poll()
            if rc is not None:
                raise TritonServerError(f"tritonserver exited with {rc}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    # A 200 from another process's listener (the free port was taken first)
                    # is not ours: Triton then fails to bind and exits "already in use".
                    assert self.http_port is not None
                    if response.status == 200 and (
                        listens_on(self._proc.pid, self.http_port) is not False
                    ):
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _log_tail(self) -> str:
        return self.log_text()[-_LOG_TAIL_CHARS:]

    def _remove_scratch(self) -> None:
        if self.scratch_dir is not None and not self.keep_files:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
            self.scratch_dir = None

    def _scratch(self) -> Path:
        if self.scratch_dir is None:
            raise TritonServerError("tritonserver has not been started")
        return self.scratch_dir

    @staticmethod
    def _port(port: int | None) -> int:
        if port is None:
            raise TritonServerError("tritonserver has not been started")
        return port


def _three_free_ports() -> tuple[int, int, int]:
    """Three distinct free ports (the OS could hand out one twice across separate binds)."""
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports[0], ports[1], ports[2]


def _copy_server_tree(dest: Path) -> Path:
    """Copy the bundled server and put this Python's stub where the python backend looks.

    The wheel's tree is read-only in spirit (site-packages), hence the copy; stubs for other
    Python versions are skipped.
    """
    tree = _pytriton_tree()
    assert tree is not None
    shutil.copytree(
        tree, dest, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__")
    )
    shutil.copy2(_stub_path(tree), dest / "backends" / "python" / "triton_python_backend_stub")
    return dest


def _pushed_model_dirs(server_pid: int) -> list[Path]:
    """Triton's copies of files pushed with ``load_model`` that our server's stubs run from.

    Triton writes them to ``/tmp/folderXXXXXX`` (hard-coded, TMPDIR is ignored) and deletes them
    on unload, but not when it is killed or its exit timeout expires. Each python-backend stub
    is a child of the server whose first argument is ``<that dir>/<version>/model.py``, so this
    finds exactly our server's directories and nobody else's.
    """
    return _model_dirs(_stubs(server_pid))


def _kill(proc: subprocess.Popen[bytes], stubs: list[tuple[int, Path]]) -> None:
    """SIGKILL the server's stubs while they are still its children (a stub left behind exits
    only once it notices, and a busy one may never), then the server."""
    children = set(_child_pids(proc.pid))
    killed = []
    for pid, _ in stubs:
        if pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A SIGKILLed process dies when it next runs, which on a busy machine is not at once; the
    # stubs are Triton's children, not ours, so wait for their exit by watching /proc.
    deadline = time.monotonic() + 10.0
    while any(process_running(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.01)


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: [0] is the state (field 3 of stat(5));
    empty when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_running(pid: int) -> bool:
    """Not gone and not a zombie (dead, waiting to be reaped)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def _stubs(server_pid: int) -> list[tuple[int, Path]]:
    """The server's python-backend stub processes: (pid, the ``model.py`` each runs)."""
    found = []
    for child in _child_pids(server_pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and argv[0].endswith(b"triton_python_backend_stub"):
            found.append((child, Path(os.fsdecode(argv[1]))))
    return found


def _model_dirs(stubs: list[tuple[int, Path]]) -> list[Path]:
    tmp = Path("/tmp")  # Triton hard-codes it
    found: list[Path] = []
    for _, model_py in stubs:
        for parent in model_py.parents:
            if parent.parent == tmp and parent.name.startswith("folder") and parent not in found:
                found.append(parent)
    return found


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one live process (its threads included), from /proc."""
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may contain spaces, so split after the ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _remove_dirs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
