"""Scoring job: the top-k table of every user with Ray Data, published whole or not at all.

On the cluster (from the repository root; ``ray dashboard cluster.yaml`` forwards 8265):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/score.py --config configs/score.yaml

(``configs/score-cluster.yaml`` for the S3/GPU set-up.) Locally (joining the cluster a
`ray start` left on this machine, if any, else starting Ray in this process):

    python jobs/score.py --config configs/score.yaml

The flags are ``bert4rec score``'s (``--checkpoint``, ``--histories``, ``--out``, ``--k``,
``--actors``, ``--gpu``, ...) and override the file. Exit codes: 0 published, 1 a failed
run (nothing published), 2 bad input or config.

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
    sys.exit(run_job("score", sys.argv[1:]))
