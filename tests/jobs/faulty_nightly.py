"""The nightly job with a scoring actor that dies once, or whose batches take a set time: what
tests/jobs/test_nightly_job.py submits for the run it stops while scoring, and
tests/cluster/test_multinode.py for a night whose scoring must use both actors, in place of
jobs/nightly.py.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python tests/jobs/faulty_nightly.py --config nightly.yaml --date 2026-11-02 --fail-marker /tmp/scorer-died
    ... -- python tests/jobs/faulty_nightly.py --config nightly.yaml --date 2026-11-01 --min-batch-s 0.25

The first scoring actor exits hard on its first batch and Ray Data starts another, which
keeps the scoring stage open a few seconds longer than ``ray job stop`` needs to land in it.
Once per run: ``--fail-marker`` is created before the exit. ``--min-batch-s``: every batch
takes at least that long, as a real one does (4,096 users: ~1.5 s on a one-thread CPU actor); a test's batch of
16 users of a tiny model takes ~12 ms, less than a round of Ray Data's dispatch loop, so the
first actor ready would score every batch while the other idles. The failure reaches the product
through its own extension point (``nightly(cfg, scorer_cls=...)``); the configs carry no
switch for it. This file runs as ``__main__``, so Ray pickles its class by value for the
actors.
"""

import argparse
import logging
import os
import sys
import time

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


def paced(min_batch_s: float) -> type[Scorer]:
    class PacedScorer(Scorer):
        def __call__(self, batch: pa.Table) -> pa.Table:
            start = time.monotonic()
            rows = super().__call__(batch)
            time.sleep(max(0.0, min_batch_s - (time.monotonic() - start)))
            return rows

    return PacedScorer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--fail-marker")
    parser.add_argument("--min-batch-s", type=float)
    args = parser.parse_args()
    # as jobs/nightly.py: the flow's stage messages ("scoring N users") in the job's log
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bert4rec").setLevel(logging.INFO)
    cfg = load_config(NightlyConfig, args.config, {"date": args.date})
    console.ensure_ray()
    nightly(cfg, scorer_cls=dies_once(args.fail_marker) if args.fail_marker else paced(args.min_batch_s or 0.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
