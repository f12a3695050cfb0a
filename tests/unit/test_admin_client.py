"""What ``bastion quarantine stats`` prints for the admin API's stats."""

from __future__ import annotations

from bastion.gateway.admin_client import describe_stats

QUOTA = {"max_records": 100, "max_records_per_client": 10, "max_bytes": 1000}
DROPPED = {"records_quota": 0, "bytes_quota": 0, "client_quota": 4}


def test_stats_lines_show_usage_against_quota_clients_and_drops() -> None:
    stats = {
        "records": 25, "bytes": 500, "by_status": {"quarantined": 20, "released": 5},
        "by_model": {"digits": 25}, "oldest": 0.0, "newest": 3600.0,
        "top_clients": [{"client_id": "mallory", "records": 10},
                        {"client_id": None, "records": 3}],
        "quota": QUOTA, "over_quota": False, "dropped": DROPPED,
    }
    text = "\n".join(describe_stats(stats, now=7200.0))
    assert "records      25 of 100 (25.0%)" in text
    assert "bytes        500 of 1000 (50.0%)" in text
    assert "over quota   no" in text
    assert "mallory=10 (none)=3" in text
    assert "client_quota=4" in text
    assert "1970-01-01T00:00:00+00:00 (2.0 h ago)" in text


def test_stats_lines_of_an_empty_store_that_is_over_quota() -> None:
    stats = {
        "records": 0, "bytes": 0, "by_status": {"quarantined": 0, "released": 0},
        "by_model": {}, "oldest": None, "newest": None, "top_clients": [],
        "quota": QUOTA, "over_quota": True, "dropped": DROPPED,
    }
    lines = describe_stats(stats, now=0.0)
    assert "over quota   YES: new records are dropped" in lines
    assert "oldest       -" in lines and "top clients  -" in lines and "by model     -" in lines
