"""The report page: client- and admin-chosen strings never become markup."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bastion.gateway.incidents.report import write


def test_chosen_strings_cannot_end_the_data_block_nor_reach_the_title_as_markup(
    tmp_path: Path,
) -> None:
    evil = "<!--<script></script><img src=x onerror=alert(1)>&"
    report = {
        "incident": {"id": 7, "title": f"review /*REPORT_JSON*/ {evil}"},
        "linked_served": [{"client": "c", "request_id": evil}],
    }
    _, page_path = write(report, tmp_path)
    page = page_path.read_text()
    block = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S
    )
    assert block is not None and json.loads(block.group(1)) == report  # intact, parseable
    assert "<img" not in block.group(1) and "<!--" not in block.group(1)
    title = page.split("<h1>", 1)[1].split("</h1>", 1)[0]
    assert "/*REPORT_JSON*/" in title and "<img" not in title  # substituted once, escaped
    assert "&lt;img" in title
