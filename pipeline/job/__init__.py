"""One run of a job, in three steps: send, commit, report.

    prepare.py   every check the user could fail, made before anything is sent (`prepare_job`)
    run.py       `Job.execute()`: opens what the run holds (checkpoint, output, cache), then the steps
    send.py      1. send: the online engine (or the Ray engine) over the plan, every answer into the checkpoint
    batch.py        ...or batch mode's step: submit, poll, collect (and `pipeline batch status|cancel`)
    commit.py    2. commit: the output made whole and the run judged: an ending (outcome, exit code, message)
    record.py    3. report: the metrics file and the HTML report, uploaded beside an s3:// output

What the user is told goes through `job.say`; how the event loop is run, signals,
exceptions shown to a person and exit codes belong to the callers: cli.py for
`pipeline run`, api.py for the Python API.
"""

from pipeline.job.batch import batch_command
from pipeline.job.prepare import prepare_job
from pipeline.job.run import INTERRUPT_GRACE_S, Job
from pipeline.job.send import build_engine

__all__ = ["INTERRUPT_GRACE_S", "Job", "batch_command", "build_engine", "prepare_job"]
