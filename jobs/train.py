"""Training job: BERT4Rec with Ray Train on the data ``bert4rec prepare`` wrote.

On the cluster (from the repository root; ``ray dashboard cluster.yaml`` forwards 8265):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --config configs/train.yaml

(``configs/train-cluster.yaml`` for the S3/GPU set-up.) Locally (joining the cluster a
`ray start` left on this machine, if any, else starting Ray in this process):

    python jobs/train.py --config configs/train.yaml [--epochs 5]

The flags are ``bert4rec train``'s (``--data``, ``--out``, ``--epochs``, ``--workers``,
``--gpu``, ``--init-from``, ...) and override the file. A rerun with the same ``out``
resumes from its latest checkpoint. Exit codes: 0 trained, 1 a failed run, 2 bad input or
config.

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
    sys.exit(run_job("train", sys.argv[1:]))
