"""The console's pure pieces: the failure line, stage naming and timing, the progress line."""

import pytest

from bert4rec.console import failure_line, format_seconds, progress_line, stage, stage_of


def test_failure_line_names_stage_and_path_that_the_message_lacks():
    timings = {}
    with pytest.raises(FileNotFoundError) as info:
        with stage("score", timings):
            e = FileNotFoundError(2, "No such file or directory")
            e.filename = "s3://bucket/x/part-0.parquet"
            # as pyarrow and fsspec raise it: the message does not name the file
            raise e
    assert set(timings) == {"score_s"}
    assert stage_of(info.value) == "score"
    assert failure_line("nightly", info.value) == (
        "bert4rec nightly: failed in stage score: FileNotFoundError: [Errno 2] No such file or directory: "
        "'s3://bucket/x/part-0.parquet'"
    )
    assert failure_line("nightly", info.value, "/tmp/l.log").endswith("part-0.parquet' (traceback: /tmp/l.log)")


def test_failure_line_finds_the_os_error_behind_a_wrapper():
    try:
        try:
            open("/nonexistent-dir/for-this-test")
        except OSError as inner:
            raise RuntimeError("training failed: worker died") from inner
    except RuntimeError as e:
        wrapped = e
    assert failure_line("train", wrapped) == "bert4rec train: failed: RuntimeError: training failed: worker died (path: /nonexistent-dir/for-this-test)"


def test_inner_stage_wins():
    timings = {}
    with pytest.raises(ValueError) as info:
        with stage("outer", timings):
            with stage("inner", timings):
                raise ValueError("x\nlast line")
    assert stage_of(info.value) == "inner"
    assert failure_line("nightly", info.value) == "bert4rec nightly: failed in stage inner: ValueError: last line"
    assert sorted(timings) == ["inner_s", "outer_s"]


def test_progress_line_and_seconds():
    assert progress_line("scoring", 1200, 5000, 3.0) == "scoring: 1,200/5,000 users (24%)  400 users/s  ETA 10s  3s elapsed"
    assert progress_line("scoring", 5000, 5000, 10.0) == "scoring: 5,000/5,000 users (100%)  500 users/s  10s elapsed"
    assert progress_line("scoring", 0, 5000, 0.0) == "scoring: 0/5,000 users (0%)  0 users/s  0s elapsed"
    assert [format_seconds(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]
