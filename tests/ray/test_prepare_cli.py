"""``bert4rec prepare`` through the command line (it runs on Ray): bad input exits 2 with
one line naming the problem and writes nothing; MovieLens files are read."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec.cli import main
from tests.conftest import cli_result, write_table

pytestmark = pytest.mark.usefixtures("ray_session")


GOOD = pa.table({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [5, 6, 7, 5, 7, 8], "timestamp": [1, 2, 3, 1, 2, 3]})


@pytest.mark.parametrize(
    "table, expected",
    [
        (GOOD.drop_columns(["timestamp"]), "missing column(s) ['timestamp']"),
        (GOOD.set_column(1, "item_id", pa.array(["a"] * 6)), "column 'item_id' must be integer, found string"),
        (GOOD.set_column(0, "user_id", pa.array([1, None, 1, 2, 2, 2], pa.int64())), "column 'user_id' has 1 null value(s), first at row 1"),
        (GOOD.slice(0, 0), "the interactions table is empty"),
    ],
)
def test_prepare_rejects_bad_tables_and_writes_nothing(tmp_path, capsys, table, expected):
    src = write_table(str(tmp_path / "in" / "x.parquet"), table)
    out = tmp_path / "prepared"
    code, err = cli_result(capsys, ["prepare", "--interactions", src, "--out", str(out), "--min-user-interactions", "3"])
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_prepare_missing_path(tmp_path, capsys):
    code, err = cli_result(capsys, ["prepare", "--interactions", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert err == f"bert4rec prepare: error: --interactions {tmp_path / 'nope'}: no such file or directory"
    assert not (tmp_path / "o").exists()


def test_prepare_reads_movielens_dat_and_csv(tmp_path, capsys):
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::10::5::978300760\n1::20::3::978300761\n1::30::4::978300759\n")
    csv = tmp_path / "ratings.csv"
    csv.write_text("userId,movieId,rating,timestamp\n1,10,5.0,978300760\n1,20,3.0,978300761\n1,30,4.0,978300759\n")
    for src in (dat, csv):
        out = tmp_path / f"out-{src.suffix[1:]}"
        assert main(["prepare", "--interactions", str(src), "--out", str(out), "--min-user-interactions", "3"]) == 0
        hist = pq.read_table(out / "histories").to_pydict()
        assert hist["item_ids"] == [[30, 10, 20]]
        assert hist["ratings"] == [[4.0, 5.0, 3.0]]
        assert json.loads((out / "stats.json").read_text())["users"] == 1
    capsys.readouterr()
