"""Start and stop a vLLM OpenAI-compatible server that lives in vLLM's own environment (`.venv-vllm`).

Imported by the main environment, which has no vllm: stdlib only. The server is a subprocess of that environment's
Python, bound to 127.0.0.1, started with the settings that bring it up fastest on one machine (eager mode, one
process for the executor, a 1 GiB KV cache on CPU) and with the guidance backend for structured outputs, which keeps
a random-weight model's JSON valid (REFERENCE.md, "vLLM on a CPU machine like ours").
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("SELFPLAY_VLLM_PYTHON") or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")

# Shared by the server and the in-process engine (model/vlm/engine.py); each is a default, the caller's env wins.
# - multiprocessing off, with the flags below: the fastest start measured on 2 CPU cores (REFERENCE.md); the
#   in-process engine then runs in one process;
# - 1 GiB of KV cache: plenty for judge prompts; without it vLLM on CPU reserves a share of all RAM and refuses to
#   start when other processes hold too much;
# - one unpinned OpenMP thread: vLLM otherwise pins a spinning thread to every core, and on a 2-core machine with
#   anything else running a request took 0.8-5 s instead of 0.13 s (measured). The tiny CPU model needs no more;
#   the VLLM_CPU_* settings mean nothing to a GPU build;
# - no usage reports, no Hub calls: no internet here, and the model is a local directory.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# With random weights a free-whitespace grammar lets the model pad JSON forever: guidance with whitespace off ends it.
STRUCTURED_OUTPUTS_CONFIG = {"backend": "guidance", "disable_any_whitespace": True}
# Eager (no graph capture or compile), one process: ~14 s to healthy on 2 CPU cores instead of 28-58 s.
FAST_START_ARGS = ("--enforce-eager", "--distributed-executor-backend", "uni")


def vllm_python(python: str | os.PathLike | None = None) -> str:
    """The interpreter of vLLM's environment: the argument, else $SELFPLAY_VLLM_PYTHON, else the repo's .venv-vllm."""
    return str(python or os.environ.get("SELFPLAY_VLLM_PYTHON") or VLLM_PYTHON)


def vllm_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a vLLM subprocess: `base` (default os.environ) with ENGINE_ENV's settings where unset."""
    env = dict(os.environ if base is None else base)
    for key, value in ENGINE_ENV.items():
        env.setdefault(key, value)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` (the CPU build has no `vllm serve`: its distribution is named
    `vllm-cpu`, and the CLI looks up `vllm`) in its own process group, so stop() also ends the engine core child."""

    def __init__(self, model_dir: str | os.PathLike, served_name: str, host: str = "127.0.0.1",
                 port: int | None = None, python: str | os.PathLike | None = None, extra_args: Sequence[str] = (),
                 log_path: str | os.PathLike | None = None, fast_start: bool = True):
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the server binds only the loopback interface, not {host!r}")
        self.model_dir = Path(model_dir).resolve()
        self.served_name = served_name
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.python = vllm_python(python)
        self.extra_args = tuple(extra_args)
        self.fast_start = fast_start
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_name,
            "--host", self.host,
            "--port", str(self.port),
            "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS_CONFIG),
            # judge prompts carry one image; no video means no video dummy inputs when vLLM profiles memory
            "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
            *(FAST_START_ARGS if self.fast_start else ()),
            *self.extra_args,
        ]

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except (urllib.error.URLError, OSError):
            return 0, b""

    def start(self, timeout_s: float = 180) -> float:
        """Launch the server and wait until it is healthy and serves `served_name`; return the seconds that took."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"server already running (pid {self._proc.pid})")
        if not Path(self.python).exists():
            raise RuntimeError(f"no vLLM interpreter at {self.python}: run `make vllm` (or set SELFPLAY_VLLM_PYTHON)")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{self.served_name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
        atexit.register(self.stop)
        deadline = t0 + timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"vLLM server exited with code {code} before it was healthy; "
                                   f"log {self.log_path}:\n{_tail(self.log_path)}")
            status, _ = self._get("/health", timeout=1.0)
            if status == 200:
                # /health of someone else's server on a reused port would also answer: check it serves our model
                status, body = self._get("/v1/models")
                try:
                    names = [m.get("id") for m in json.loads(body).get("data", [])] if status == 200 else []
                except (ValueError, AttributeError):
                    names = []
                if self.served_name in names:
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM server not healthy after {timeout_s:.0f} s; "
                                   f"log {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.25)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after grace_s. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group is ours alone: start_new_session=True
                proc.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what is left: the leader past its grace, or its engine core
            except ProcessLookupError:
                pass
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VLLMServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_tiny_model(out_dir: str | os.PathLike, python: str | os.PathLike | None = None) -> Path:
    """Build the tiny random Qwen2-VL (model/vlm/tiny.py) into out_dir with vLLM's interpreter, unless it is there."""
    # stdlib-only at import time: the build itself runs in vLLM's environment
    from model.vlm.tiny import is_complete

    out = Path(out_dir).resolve()
    if is_complete(out):
        return out
    py = vllm_python(python)
    if not Path(py).exists():
        raise RuntimeError(f"no vLLM interpreter at {py}: run `make vllm` (or set SELFPLAY_VLLM_PYTHON)")
    proc = subprocess.run([py, "-m", "model.vlm.tiny", str(out)], cwd=REPO_ROOT, env=vllm_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0 or not is_complete(out):
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
        raise RuntimeError(f"building the tiny Qwen2-VL into {out} failed (code {proc.returncode}):\n{tail}")
    return out
