"""Start a real ``tritonserver`` on a repository: the binary and Python backend shipped in the
``nvidia-pytriton`` wheel (Triton 2.51 for x86-64 glibc >= 2.35; CPU-only works, CUDA is optional).

    with TritonServer("repo/") as server:       # free ports, waits for /v2/health/ready, stops on exit
        server.http_url                         # "localhost:PORT" for runtime/triton_backend.py
    python -m export.triton.server repo/ --http-port 8000 --grpc-port 8001     # foreground

A full Triton install (NVIDIA's container: /opt/tritonserver with the onnxruntime, tensorrt and
tensorrtllm backends, which the gpu repository needs) is used instead when ``home`` or
$FAVOR_TRITON_HOME names it; its own Python backend and environment are then used as they are.

What the wheel needs that pytriton's own launcher normally arranges (found by trying it here):
- the Python backend directory must hold the stub built for this interpreter's version
  (``python_backend_stubs/3.X/triton_python_backend_stub``): assembled under the cache dir with links;
- the stub embeds libpython3.X and ignores PYTHONPATH; it finds its packages from the ``python3`` on
  PATH (a virtual environment's ``bin`` first), so a small environment is put first on PATH;
- the stub's NumPy bridge is compiled against NumPy 1.x: with NumPy 2 every tensor it reads or
  writes has a zero element size (inputs arrive as their first element repeated, outputs empty).
  That environment therefore holds ``numpy<2`` and then this interpreter's site-packages (torch,
  onnxruntime and favor-rt run on NumPy 1.26). The project itself keeps NumPy 2, which is also why
  nvidia-pytriton is installed with ``--no-deps`` (its metadata pins numpy<2).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

HOME_ENV = "FAVOR_TRITON_HOME"  # a full Triton install (bin/tritonserver, backends/)
STUB_NUMPY = "numpy>=1.26,<2"  # the Python backend stub's NumPy ABI (see the module docstring)
READY_TIMEOUT_S = 180.0  # model loading: each Python model starts a stub that imports torch (seconds each)
STOP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 5  # tritonserver's own wait for in-flight requests on SIGTERM
POLL_S = 0.25
LOG_TAIL_CHARS = 3000


def distribution() -> Path:
    """The wheel's ``tritonserver`` directory (bin/, backends/, python_backend_stubs/)."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported (its import needs numpy<2)
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" if spec else None
    if root is None or not (root / "bin" / "tritonserver").is_file():
        raise ValueError("tritonserver not found: pip install --no-deps nvidia-pytriton==0.7.0 "
                         "(its wheel ships the binary and the Python backend)")
    return root


def cache_dir() -> Path:
    """Where the backend directory and the stub's environment live: inside this environment (removed
    with it) when writable, else ~/.cache/favor/triton."""
    for d in (Path(sys.prefix) / "favor-triton", Path.home() / ".cache" / "favor" / "triton"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise ValueError(f"no writable directory for the Triton backend files ({sys.prefix}/favor-triton, ~/.cache)")


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def backend_dir(dist: Path, cache: Path) -> Path:
    """backends/python with the stub for this Python (links into the wheel)."""
    stub = dist / "python_backend_stubs" / python_version() / "triton_python_backend_stub"
    if not stub.is_file():
        raise ValueError(f"{stub}: nvidia-pytriton ships no Python backend stub for Python {python_version()}")
    out = cache / f"backends-py{python_version()}"
    python = out / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [*(dist / "backends" / "python").iterdir(), stub]:
        link = python / src.name
        if not link.exists():
            link.symlink_to(src)
    return out


def _site_dirs() -> list[str]:
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def stub_environment(cache: Path) -> Path:
    """A virtual environment whose site-packages holds numpy<2 first, then this interpreter's packages."""
    env = cache / f"stub-env-py{python_version()}"
    packages = env / "lib" / f"python{python_version()}" / "site-packages"
    if not (env / "bin" / "python3").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)], check=True,
                       capture_output=True)
    if not (packages / "numpy").is_dir():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                               str(packages), STUB_NUMPY], capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"could not install {STUB_NUMPY} for the Triton Python stub into {packages}: "
                             f"{done.stderr.strip()[-500:]}")
    # added after numpy<2 (a .pth line runs at start-up): torch, onnxruntime, favor-rt (editable finders too)
    lines = [f"import site; site.addsitedir({d!r})" for d in _site_dirs()]
    (packages / "zz_favor_parent_env.pth").write_text("\n".join(lines) + "\n")
    return env


def server_env(env: Path) -> dict[str, str]:
    """PATH with the stub environment first; LD_LIBRARY_PATH with this interpreter's libpython."""
    out = dict(os.environ)
    out["PATH"] = f"{env / 'bin'}{os.pathsep}{out.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, f"libpython{python_version()}.so.1.0").exists():
        out["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, out.get("LD_LIBRARY_PATH")) if p)
    out.pop("PYTHONPATH", None)  # ignored by the stub; kept out so the parent's cannot confuse the env
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` process on ``repository`` (CPU here), bounded in start and stop time."""

    def __init__(self, repository: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, ready_timeout: float = READY_TIMEOUT_S, verbose: bool = False,
                 home: str | Path | None = None):
        self.home = Path(home) if home else (Path(os.environ[HOME_ENV]) if os.environ.get(HOME_ENV) else None)
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise ValueError(f"{repository}: no such model repository")
        self.ports = {"http": http_port or free_port(), "grpc": grpc_port or free_port(),
                      "metrics": metrics_port or free_port()}
        self.ready_timeout, self.verbose = ready_timeout, verbose
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://localhost:{self.ports['grpc']}"

    def command(self, dist: Path, backends: Path) -> list[str]:
        return [str(dist / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                "--backend-directory", str(backends), "--http-port", str(self.ports["http"]),
                "--grpc-port", str(self.ports["grpc"]), "--metrics-port", str(self.ports["metrics"]),
                "--disable-auto-complete-config", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                f"--log-verbose={1 if self.verbose else 0}"]

    def _layout(self) -> tuple[Path, Path, dict[str, str]]:
        """(install dir with bin/tritonserver, backend directory, environment)."""
        if self.home is not None:
            if not (self.home / "bin" / "tritonserver").is_file():
                raise ValueError(f"{self.home}: no bin/tritonserver (${HOME_ENV} must name a Triton install)")
            return self.home, self.home / "backends", dict(os.environ)
        dist, cache = distribution(), cache_dir()
        return dist, backend_dir(dist, cache), server_env(stub_environment(cache))

    def start(self) -> TritonServer:
        dist, backends, env = self._layout()
        fd, log = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "w") as out:
            self.process = subprocess.Popen(self.command(dist, backends), stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, cwd=self.repository)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        return text[-LOG_TAIL_CHARS:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ValueError(f"tritonserver exited ({self.process.returncode}) while loading "
                                 f"{self.repository}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own loopback server
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(POLL_S)
        raise ValueError(f"tritonserver not ready after {self.ready_timeout:.0f} s on {self.repository}:\n"
                         f"{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server, which stops its Python stubs itself (a stub whose server vanished
        first spins); after it exits or a bound, SIGKILL to whatever is left of its process group."""
        p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
        except ProcessLookupError:
            pass
        p.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.log_path and not self.verbose:
            self.log_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Serve a repository in the foreground until Ctrl-C (``python -m export.triton.server REPO``)."""
    import argparse

    parser = argparse.ArgumentParser(description="Run tritonserver (nvidia-pytriton's) on a FAVOR repository.")
    parser.add_argument("repository")
    for name, default in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        parser.add_argument(f"--{name}-port", type=int, default=default)
    a = parser.parse_args(argv)
    try:
        server = TritonServer(a.repository, a.http_port, a.grpc_port, a.metrics_port, verbose=True).start()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving {a.repository}: http {server.http_url}, grpc {server.grpc_url} (log {server.log_path})")

    def _terminate(signum, frame):  # SIGTERM ends the server too (it runs in its own session)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while server.process and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

