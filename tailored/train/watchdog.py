"""A rank that dies becomes a prompt error naming it, on every rank, instead of a hang.

When one process of a multi-process run dies (a crash, the out-of-memory killer, a lost node), the others block in
their next collective: with NCCL until the process group's timeout (``trainer.strategy.timeout``, 30 minutes by
default), with gloo they fail on a closed connection that names an address, not a rank. Lightning's launcher
notices a dead child on its own node (within 5 s), but not a dead rank 0 nor a rank on another node.

Every rank runs a :class:`Heartbeat` thread that counts up its own key in the run's rendezvous store (the TCP store
at ``MASTER_ADDR:MASTER_PORT``, which every launcher sets up) and watches the next rank's key::

    rank r, every interval:   beat/r += 1
                              "dead" set?                           ─► exit 1 naming the rank it names
                              beat/(r+1 mod N) still for timeout s? ─► set "dead", exit 1 naming rank r+1

so a dead rank is named by its watcher and every other rank stops within one interval of it. After a collective
fails (a ``RuntimeError``: gloo's closed connection), :class:`RankWatchdog` checks every rank's key at once and
raises :class:`RankFailure` naming the ranks that stopped, without waiting for ``timeout``. The store lives in
rank 0 (Lightning's launcher) or in node 0's ``torchrun`` agent; when it cannot be reached, its host is reported.
A rank that finishes (``done/r``) or stops on an error of its own, which it prints (``failed/r``), says so first:
the others do not report it as dead. A rank that hangs with its process alive keeps beating and is left to the
process group's timeout.

Measured on two CPU ranks (gloo, ``tests/test_multinode.py``): without the watchdog a killed rank 1 ended rank 0 on
"Connection reset by peer [127.0.0.1]:<port>" and a killed rank 0 ended rank 1 on "Connection closed by peer",
naming no rank; with it, both name the dead rank, and a stopped (SIGSTOP) rank 1 is named after ``timeout``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from datetime import timedelta

import lightning as L
import torch.distributed as dist

DEAD_KEY = "dead"
"""Store key holding the message of the first rank found dead."""


class RankFailure(RuntimeError):
    """A rank of a multi-process run died or its node was lost."""


class RankWatchdog(L.Callback):
    """Run a :class:`Heartbeat` on every rank of a multi-process run (nothing on one process).

    Args:
        timeout: seconds without a heartbeat after which a rank counts as dead (or the store as lost).
        interval: seconds between heartbeats.
        enabled: set false to run without the watchdog.
    """

    def __init__(self, timeout: float = 60.0, interval: float = 1.0, enabled: bool = True) -> None:
        if interval <= 0 or timeout <= interval:
            raise ValueError(f"watchdog: need 0 < interval < timeout, got interval {interval}, timeout {timeout}")
        self.timeout, self.interval, self.enabled = timeout, interval, enabled
        self.heartbeat: Heartbeat | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.enabled and trainer.world_size > 1 and self.heartbeat is None:
            self.heartbeat = Heartbeat(trainer.global_rank, trainer.world_size, self.interval, self.timeout)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        """After a ``RuntimeError`` (what a failed collective raises; not a settings error, not Ctrl+C): if other
        ranks stopped, raise :class:`RankFailure` naming them."""
        if self.heartbeat is None:
            return
        heartbeat, self.heartbeat = self.heartbeat, None
        heartbeat.report_failure()
        collective = isinstance(exception, RuntimeError) and not isinstance(exception, RankFailure)
        problem = heartbeat.stopped_ranks() if collective else None
        heartbeat.stop(finished=False)  # this rank's run is over either way
        if problem:
            raise RankFailure(problem) from exception


class Heartbeat(threading.Thread):
    """This rank's heartbeat in the rendezvous store, and its watch over the next rank's (module docstring)."""

    def __init__(self, rank: int, world_size: int, interval: float, timeout: float) -> None:
        super().__init__(daemon=True, name="tailored-heartbeat")
        self.rank, self.world_size, self.interval, self.timeout = rank, world_size, interval, timeout
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.store, self.checker = self.connect(), self.connect()  # the thread's, and the main thread's
        for key in (f"done/{rank}", f"failed/{rank}"):
            self.store.delete_key(key)
        self.stopped = threading.Event()
        self.start()

    def connect(self) -> dist.Store:
        """A client of the rendezvous store, in this watchdog's namespace (a connection made later could not be made
        once the store's host is gone)."""
        host, port = self.address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=self.timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store across restarts
        return dist.PrefixStore(f"tailored/watchdog/{attempt}/", store)

    def run(self) -> None:
        watched = (self.rank + 1) % self.world_size
        last_count, last_change, store_lost = -1, time.monotonic(), None
        while not self.stopped.wait(self.interval):
            now = time.monotonic()
            if store_lost is not None:  # a finishing run closes the store too: wait before calling it lost
                if now - store_lost > self.timeout:
                    self.exit(self.store_lost())
                continue
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.check([DEAD_KEY]):
                    self.exit(self.store.get(DEAD_KEY).decode())
                count = self.store.add(f"beat/{watched}", 0)
                finished = self.store.check([f"done/{watched}"])
            except dist.DistError:
                store_lost = now
                continue
            if count != last_count or finished:
                last_count, last_change = count, now
            elif now - last_change > self.timeout:
                cause = "stopped on its own error" if self.failed(self.store, watched) else "died or its node was lost"
                message = f"rank {watched} sent no heartbeat for {self.timeout:g} s: it {cause}"
                self.store.set(DEAD_KEY, message)
                self.exit(message)

    def stopped_ranks(self) -> str | None:
        """The ranks whose heartbeats do not move for three intervals, as an error message (also written to the
        store, so that the other ranks stop); None when every rank still beats, finished, or stopped on an error of
        its own (which it reports)."""
        store = self.checker
        try:
            before = self.counts(store)
            time.sleep(3 * self.interval)
            after = self.counts(store)
            stopped = [
                rank
                for rank in range(self.world_size)
                if before[rank] == after[rank]
                and rank != self.rank
                and not store.check([f"done/{rank}"])
                and not self.failed(store, rank)
            ]
            if not stopped:
                return None
            ranks = ", ".join(str(rank) for rank in stopped)
            message = f"rank {ranks} stopped sending heartbeats: died or its node was lost"
            store.set(DEAD_KEY, message)
            return message
        except dist.DistError:
            return self.store_lost()

    def report_failure(self) -> None:
        """Tell the other ranks that this one stops on an error of its own (it is not to be reported as dead)."""
        with contextlib.suppress(dist.DistError):
            self.checker.set(f"failed/{self.rank}", "1")

    @staticmethod
    def failed(store: dist.Store, rank: int) -> bool:
        return store.check([f"failed/{rank}"])

    def counts(self, store: dist.Store) -> list[int]:
        """Every rank's heartbeat count."""
        return [store.add(f"beat/{rank}", 0) for rank in range(self.world_size)]

    def store_lost(self) -> str:
        return (
            f"the rendezvous store at {self.address} cannot be reached: rank 0 (or the launcher that hosts the store) "
            "died or its node was lost"
        )

    def exit(self, problem: str) -> None:
        """Report ``problem`` and end this process now: its main thread may be blocked in a collective for good."""
        print(f"tailored: error: {problem}; stopping rank {self.rank}", file=sys.stderr, flush=True)
        os._exit(1)

    def stop(self, finished: bool = True) -> None:
        """Stop beating; when ``finished``, tell the watcher that this rank ended its run (rather than died)."""
        self.stopped.set()
        self.join()
        if finished:
            with contextlib.suppress(dist.DistError):  # the store's host may have finished first
                self.store.set(f"done/{self.rank}", "1")
