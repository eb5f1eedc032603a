"""Federated partitions (data/partition.py): iid, dirichlet, mop_skew (MoP appendix A) and the CLI table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mixroute.data import format_table, partition

TASKS = [i % 4 for i in range(4 * 170)]  # 4 categories x 170 examples


def _covers_once(p, n):
    flat = sorted(i for c in p.clients for i in c)
    assert flat == sorted(set(flat)) and all(0 <= i < n for i in flat)
    return flat


def test_mop_skew_one_share_15x_the_others_and_every_client_gets_every_category():
    p = partition(TASKS, 5, "mop_skew", seed=3, total=None)
    assert len(_covers_once(p, len(TASKS))) == len(TASKS)
    counts = p.counts()
    for c in range(4):
        col = sorted(row[c] for row in counts)
        assert sum(col) == 170
        small, big = col[:-1], col[-1]
        assert all(s >= 1 for s in small)  # every client holds one partition of every category
        assert max(small) - min(small) <= 1
        assert big == pytest.approx(15 * min(small), abs=15)  # 170 = 10 + 4 * 10 ... within rounding
    # 170 / (15 + 4) = 8.9: one share of ~134, four of ~9
    assert max(row[0] for row in counts) >= 130


def test_mop_skew_exact_when_divisible_and_big_shares_land_at_random():
    tasks = [c for c in range(6) for _ in range(18 * 7)]  # 126 per category = 18 * (15 + 3 - 1 + ...)
    p = partition(tasks, 4, "mop_skew", seed=0, total=None)  # shares 15:1:1:1 of 126 = 105, 7, 7, 7
    counts = p.counts()
    for c in range(6):
        assert sorted(row[c] for row in counts) == [7, 7, 7, 105]
    owners = [max(range(4), key=lambda k: counts[k][c]) for c in range(6)]
    assert len(set(owners)) > 1  # the large share is not always the same client's


def test_mop_skew_draws_total_samples_first():
    p = partition(TASKS, 3, "mop_skew", seed=0, total=200)
    assert len(_covers_once(p, len(TASKS))) == 200


def test_partitions_are_deterministic_from_the_seed():
    for scheme in ("iid", "dirichlet", "mop_skew"):
        a = partition(TASKS, 4, scheme, seed=7, total=300)
        b = partition(TASKS, 4, scheme, seed=7, total=300)
        c = partition(TASKS, 4, scheme, seed=8, total=300)
        assert a.clients == b.clients
        assert a.clients != c.clients


def test_iid_equal_shares_and_dirichlet_covers_everything():
    p = partition(TASKS, 4, "iid", seed=0)
    assert [len(c) for c in p.clients] == [170] * 4
    d = partition(TASKS, 4, "dirichlet", seed=0, alpha=0.1)
    assert len(_covers_once(d, len(TASKS))) == len(TASKS)
    # alpha 0.1 is very skewed: some client holds (almost) none of some category
    assert min(min(row) for row in d.counts()) <= 2


def test_bad_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of iid, dirichlet, mop_skew"):
        partition(TASKS, 2, "zipf")


def test_table_text_has_totals():
    text = format_table(partition(TASKS, 2, "iid", seed=0).table(["a", "b", "c", "d"]))
    assert text.splitlines()[-1].split()[-1] == str(len(TASKS))


@pytest.mark.slow
def test_cli_prints_the_counts_table(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: tiny}\ndata: {path: null, synthetic_per_task: 40, max_length: 64, template: plain}\n"
                   "federated: {clients: 3, partition: mop_skew, partition_total: null}\n")
    res = subprocess.run([sys.executable, "-m", "mixroute.cli", "data", "partition", str(cfg),
                          "federated.partition_seed=1", "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "client 2" in res.stdout and "total" in res.stdout
    assert (tmp_path / "p.json").is_file()
