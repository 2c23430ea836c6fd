"""The nightly job with a scoring actor that dies once: what tests/jobs/test_nightly_job.py
submits for the run it stops while scoring, in place of jobs/nightly.py.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python tests/jobs/faulty_nightly.py --config nightly.yaml --date 2026-11-02 --fail-marker /tmp/scorer-died

The first scoring actor exits hard on its first batch and Ray Data starts another, which
keeps the scoring stage open a few seconds longer than ``ray job stop`` needs to land in it.
Once per run: ``--fail-marker`` is created before the exit. The failure reaches the product
through its own extension point (``nightly(cfg, scorer_cls=...)``); the configs carry no
switch for it. This file runs as ``__main__``, so Ray pickles its class by value for the
actors.
"""

import argparse
import logging
import os
import sys

# the package next to tests/: importable from the copy `ray job submit --working-dir .` unpacks
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pyarrow as pa  # noqa: E402

from bert4rec import console  # noqa: E402
from bert4rec.cli import load_config  # noqa: E402
from bert4rec.config import NightlyConfig  # noqa: E402
from bert4rec.nightly import nightly  # noqa: E402
from bert4rec.score import Scorer  # noqa: E402


def dies_once(marker: str) -> type[Scorer]:
    class DiesOnce(Scorer):
        def __call__(self, batch: pa.Table) -> pa.Table:
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # a hard crash of the actor process, as a lost node would look
            return super().__call__(batch)

    return DiesOnce


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--fail-marker", required=True)
    args = parser.parse_args()
    # as jobs/nightly.py: the flow's stage messages ("scoring N users") in the job's log
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bert4rec").setLevel(logging.INFO)
    cfg = load_config(NightlyConfig, args.config, {"date": args.date})
    console.ensure_ray()
    nightly(cfg, scorer_cls=dies_once(args.fail_marker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
