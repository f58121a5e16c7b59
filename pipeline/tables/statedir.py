"""Where a user's job state lives on this machine when the job itself names no place for it.

One folder per user, found from the environment, never from the folder a run
starts in, so cron in `$HOME`, a scheduler in a temporary folder and a notebook
kernel started anywhere find the same state:

    $PIPELINE_STATE_DIR                      when set (a volume that outlives a pod, say)
    $XDG_STATE_HOME/pipeline                 when set (XDG: data kept between sessions)
    ~/.local/state/pipeline                  Linux and other Unixes
    ~/Library/Application Support/pipeline   macOS
    %LOCALAPPDATA%\\pipeline                  Windows

Paid answers are state, not cache: a cache folder may be wiped by the system
or a cleaning tool, and what it held would be paid again. Inside it:

    answers/answers.sqlite    the default answer store of `pipeline.complete()`
    batches/<job>/            the checkpoint of a `complete(mode="batch", wait=True)` call given no
                              checkpoint_dir, while its batches are open (the ledger of what was
                              submitted: a call interrupted and made again collects them)
    s3/<bucket>/<folder>/     the local side of jobs whose state lives in object storage:
                              the working copy of the checkpoint while a run goes on,
                              the output's local copy, the metrics file and the report
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "pipeline"


def state_dir() -> Path:
    """The user's state folder for pipeline (not created here)."""
    env = os.environ
    if given := env.get("PIPELINE_STATE_DIR", "").strip():
        return Path(given).expanduser()
    xdg = env.get("XDG_STATE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / APP
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP
    if sys.platform == "win32" and (local := env.get("LOCALAPPDATA")):
        return Path(local) / APP
    return Path.home() / ".local" / "state" / APP


def answers_dir() -> Path:
    """The folder of `complete()`'s default answer store."""
    return state_dir() / "answers"


def objects_dir() -> Path:
    """The local side of jobs whose output or state is in object storage."""
    return state_dir() / "s3"


def batches_dir() -> Path:
    """The checkpoints of `complete()` calls in batch mode given no checkpoint_dir, one per job."""
    return state_dir() / "batches"
