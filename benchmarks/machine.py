"""What the benchmarks share: readings of this process's memory and of how busy the other processes are, a
step clock, and the worker processes they time methods in.

Shared by the scripts in this folder (each runs as ``python benchmarks/NAME.py``, so this module is importable
beside them). The /proc readings are Linux only; elsewhere they are None / 0 and the waits return at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self


def proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class CpuMeter:
    """Wall time of a region, and the share of the machine's CPU that *other* processes used meanwhile."""

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    _NCPU = os.cpu_count() or 1

    @classmethod
    def _busy_s(cls) -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / cls._TICK  # user nice system idle iowait irq softirq steal

    def __enter__(self) -> Self:
        t = os.times()
        self._own, self._busy, self.start = t.user + t.system, self._busy_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.start
        t = os.times()
        busy = self._busy_s()
        if busy is None or self._busy is None or self.wall <= 0:
            self.foreign = 0.0
        else:
            other = (busy - self._busy) - (t.user + t.system - self._own)
            self.foreign = max(0.0, other / (self.wall * self._NCPU))


def wait_quiet(threshold: float, max_wait: float, window: float = 2.0) -> float:
    """Sleep until other processes use at most ``threshold`` of the machine's CPU over ``window`` seconds,
    or ``max_wait`` seconds have passed; returns the seconds waited. Call it while this process (and any
    worker it drives) is idle."""
    waited = 0.0
    while waited < max_wait:
        with CpuMeter() as meter:
            time.sleep(window)
        if meter.foreign <= threshold:
            break
        waited += meter.wall
    return waited


def sync_for(device: str) -> Callable[[], None]:
    """What to call before reading a clock: CUDA runs asynchronously, the CPU does not."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


class Clock:
    """A streamer that only timestamps: generate calls put() once with the prompt, then once per step."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.times = sync, []

    def put(self, value: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def worker_channel() -> Callable[[dict[str, Any]], None]:
    """The worker's side of :class:`WorkerProcess`: from now on whatever this process prints goes to stderr (the
    log), and the returned function writes one JSON answer per line to the real stdout (the protocol)."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    return reply


class WorkerProcess:
    """A benchmark worker in its own process (own heap, own peak RSS), driven one JSON line at a time:
    ``ask`` sends a command (a string, or a dict as JSON) and returns the worker's next JSON line."""

    def __init__(self, cmd: list[str], name: str, log_path: Path, threads: int) -> None:
        env = dict(os.environ)
        if threads > 0:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.name, self.log_path = name, log_path
        self._log = log_path.open("w")
        # its own process group: close() ends what it started too (vLLM's engine core and model worker, which
        # outlive a killed parent, idle but holding their memory)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )

    def ask(self, command: str | dict[str, Any] | None) -> dict[str, Any]:
        if command is not None:
            self.proc.stdin.write((command if isinstance(command, str) else json.dumps(command)) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._log.flush()
            raise RuntimeError(
                f"worker {self.name} died (exit {self.proc.returncode}):\n{self.log_path.read_text()[-4000:]}"
            )
        return json.loads(line)

    def finish(self, command: str | dict[str, Any], timeout: float = 120.0) -> None:
        """Send the last command and give the worker ``timeout`` seconds to exit on its own (a clean shutdown)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((command if isinstance(command, str) else json.dumps(command)) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it started and left behind
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
