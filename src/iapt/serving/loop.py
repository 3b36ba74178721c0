"""The background loop both engines serve from (the built-in ``Engine`` and ``iapt.vllm``'s ``VLLMEngine``).

One place for the lifecycle, so the two cannot drift apart: ``start`` runs the loop in a daemon thread that owns
the model, ``pause`` / ``resume`` hold it between steps, ``stop`` ends it and cancels what is left. A subclass
says what a step is, when there is work, and how to cancel everything.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)


class EngineLoop:
    """A scheduler's thread: calls ``step`` while ``_has_work``; ``_between_steps`` runs first on every turn."""

    thread_name = "iapt-engine"
    idle_wait = 0.1  # seconds an idle loop sleeps unless woken (a submit notifies ``_wake``)
    stop_timeout = 10.0  # how long ``stop`` waits for a step in progress

    def _init_loop(self, lock: threading.Lock | threading.RLock) -> None:
        self._lock = lock
        self._wake = threading.Condition(lock)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()

    # ------------------------------------------------------------------ what a subclass defines
    def step(self) -> None:
        raise NotImplementedError

    def _has_work(self) -> bool:
        """Called under the lock: is anything queued or running?"""
        raise NotImplementedError

    def _cancel_all(self) -> None:
        """After the thread has ended: end every queued and running request ('cancelled')."""
        raise NotImplementedError

    def _between_steps(self) -> None:
        """In the loop's thread, before each turn (e.g. adapter changes that must not overlap a step)."""

    # ------------------------------------------------------------------ the lifecycle
    def start(self) -> None:
        """Run the loop in a daemon thread that owns the model (a no-op if it runs)."""
        if self.is_running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; requests still queued or running end with finish_reason 'cancelled'."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(self.stop_timeout if timeout is None else timeout)
            self._thread = None
        self._cancel_all()

    def pause(self) -> None:
        """Hold the loop between steps (requests queue up); ``resume()`` continues."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._between_steps()
            with self._wake:
                if self._paused.is_set() or not self._has_work():
                    self._wake.wait(timeout=self.idle_wait)
                    continue
            try:
                self.step()
            except Exception:  # step isolates request errors; this is a last resort that keeps serving
                logger.exception("engine step failed")
