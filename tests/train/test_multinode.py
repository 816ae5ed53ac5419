"""A rank that dies or hangs stops the whole run promptly, with an error naming it (tailored.train.watchdog).

Two CPU ranks (DDP over gloo, launched by Lightning as on one node); a callback kills or stops one of them a few
steps in. Measured before the watchdog: a killed rank 1 made rank 0 fail on gloo's "Connection reset by peer
[127.0.0.1]:<port>", a killed rank 0 made rank 1 fail on "Connection closed by peer"; neither named a rank, and
with NCCL both would have hung until the process group's timeout (30 minutes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, write_config

LIMIT = 120
"""Seconds a failing run may take, start-up included."""


def fit_two_ranks(tmp_path: Path, model_dir: Path, text: Path, **signal_args) -> tuple[int, float, str]:
    """``tailored fit`` on two CPU ranks with one rank signalled at step 3 (:class:`SignalRankAfterStep`); return
    the exit status, the seconds it took and every rank's output. A stopped rank is killed afterwards."""
    pid_file = tmp_path / "signalled.pid"
    callback = {"class_path": "subprocess_callbacks.SignalRankAfterStep", "init_args": signal_args | {"step": 3}}
    callback["init_args"]["pid_file"] = str(pid_file)
    trainer = {
        "accelerator": "cpu",
        "strategy": "ddp",
        "devices": 2,
        "max_steps": 20,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path / "run"),
        "enable_progress_bar": False,
        "callbacks": [callback],
    }
    model = {
        "model": str(model_dir),
        "pruning": {"target": 0.6, "round_to": 1, "prune_at_recovery": False, "importance": None},
    }
    config = write_config(
        tmp_path / "ranks.yaml",
        model_dir,
        text,
        trainer=trainer,
        model=model,
        export={"enabled": False},
        watchdog={"timeout": 5, "interval": 0.2},
    )
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    output = tmp_path / "output.txt"
    start = time.monotonic()
    with output.open("w") as sink:  # not a pipe: a stopped rank would hold it open
        process = subprocess.Popen(
            [sys.executable, "-m", "tailored.cli", "fit", "-c", str(config)], env=env, stdout=sink, stderr=sink
        )
        try:
            returncode = process.wait(timeout=LIMIT)
            wait_for_other_ranks(str(config), deadline=start + LIMIT)  # rank 0 killed: rank 1 reports after it
        finally:
            process.kill()
            kill_if_ours(pid_file, str(config))
    return returncode, time.monotonic() - start, output.read_text()


def wait_for_other_ranks(marker: str, deadline: float) -> None:
    """Wait until no process runs a command line containing ``marker`` (the other rank, which outlives a killed
    rank 0 by the watchdog's timeout), or until ``deadline``; a stopped (SIGSTOP) rank never ends and is killed."""
    while time.monotonic() < deadline:
        running = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                command = cmdline.read_bytes().decode(errors="replace")
                state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in command and state not in ("T", "Z"):  # stopped and zombie ranks do not report
                running.append(cmdline)
        if not running:
            return
        time.sleep(0.2)


def kill_if_ours(pid_file: Path, marker: str) -> None:
    """SIGKILL the process whose PID ``pid_file`` holds if it still runs a command line containing ``marker`` (a
    stopped rank; orphaned, it may also have been ended by the SIGHUP the kernel sends to stopped orphans)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone
        return
    if marker in command:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_stops_the_run_with_an_error_naming_it(tmp_path, tiny_model_dir, tiny_text, rank):
    """Rank 1 killed: rank 0's collective fails and the watchdog names rank 1 (or Lightning's launcher, which
    watches its children every 5 s, gets there first and names it). Rank 0 killed: the store it hosts is gone,
    which rank 1's watchdog reports."""
    returncode, seconds, output = fit_two_ranks(tmp_path, tiny_model_dir, tiny_text, rank=rank)
    assert returncode != 0 and seconds < LIMIT
    if rank == 1:
        named = re.search(r"tailored: error: rank 1 stopped sending heartbeats|\[rank: 1\] Child process .* -9", output)
    else:
        named = re.search(r"tailored: error: the rendezvous store at .* cannot be reached: rank 0", output)
    assert named, output[-3000:]


def test_a_hanging_rank_is_named_after_the_watchdog_timeout(tmp_path, tiny_model_dir, tiny_text):
    """Rank 1 stopped (SIGSTOP): its process lives but neither trains nor beats, and rank 0 waits in a collective
    that would time out after 30 minutes; the watchdog stops rank 0 after its 5 s timeout."""
    returncode, seconds, output = fit_two_ranks(tmp_path, tiny_model_dir, tiny_text, rank=1, signal_name="SIGSTOP")
    assert returncode == 1 and seconds < LIMIT
    assert "tailored: error: rank 1 sent no heartbeat for 5 s: it died or its node was lost; stopping rank 0" in output
