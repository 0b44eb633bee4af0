"""Fault points: a server process that kills itself at a chosen instant of a completion.

The tests set `CHUNKSERVER_FAULT_POINT=<name>` in a server's environment to have it SIGKILL
itself when it reaches that point, a real death at the instant that matters (between a
rename and the record that says it happened, between S3's CompleteMultipartUpload and the
row that says so), which no timing from outside can hit. Unset, as it always is outside the
tests, a point costs one lookup in the environment, once per completion.

The points: `local-before-rename`, `local-after-rename` (the data file renamed, no completion
record yet), `s3-after-complete` (the object whole in the bucket, the row still uploading).
"""

from __future__ import annotations

import os
import signal

FAULT_POINT_ENV = "CHUNKSERVER_FAULT_POINT"


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
