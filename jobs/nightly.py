"""The nightly job: prepare -> train -> gate -> evaluate -> score -> publish -> report.

On the cluster (from the repository root; ``ray dashboard cluster.yaml`` forwards 8265):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/nightly.py --config configs/nightly.yaml

(``configs/nightly-cluster.yaml`` for the S3/GPU set-up.) Locally (joining the cluster a
`ray start` left on this machine, if any, else starting Ray in this process):

    python jobs/nightly.py --config configs/nightly.yaml [--date 2026-11-24]

The flags are ``bert4rec nightly``'s, one per config field (``--date``, ``--interactions``,
``--out``, ``--train.epochs`` or ``--epochs``, ``--train.gpu``, ``--score.gpu``,
``--gate.min-ndcg``, ``--s3-endpoint-url``, ...; ``--help`` lists them) and override the
file; ``--verbose`` shows Ray's own output. A failed run prints one line naming its stage,
then its traceback.
Exit codes: 0 published, 1 a failed run (e.g. the quality gate; nothing published), 2 bad
input or config. ``ray job stop`` sends SIGTERM: the run releases its lock and leaves every
published table and ``latest`` as they were.

Relative paths in the config resolve against the job's working directory: under
``ray job submit --working-dir .`` that is a temporary copy of the repository on the head
node, so cluster configs use ``s3://`` (or absolute) paths.
"""

import os
import sys

# The package lives next to jobs/: importable from a fresh clone and from the copy that
# `ray job submit --working-dir .` unpacks (the driver's cwd), installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bert4rec.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("nightly", sys.argv[1:]))
