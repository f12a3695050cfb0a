"""The incident log: RFC 6962's tree, signed checkpoints, and verify naming what was tampered."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.gateway.incidents.log import Entry, IncidentLog, TamperedLog, _StoredTree, leaf_hash
from bastion.gateway.incidents.signing import Checkpoint, Signer, read_witness, witness
from bastion.gateway.incidents.verify import Verdict, verify
from bastion.gateway.incidents.writer import LogWriter

# RFC 6962's test leaves and the roots of their first 1..8 (certificate-transparency's
# merkle tree test vectors, also in RFC 9162's reference code)
LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
          "606162636465666768696a6b6c6d6e6f"]  # fmt: skip
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_the_stored_tree_reproduces_rfc6962_roots() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE log_entries (seq INTEGER PRIMARY KEY, leaf BLOB)")
    for seq, leaf in enumerate(LEAVES, 1):
        conn.execute("INSERT INTO log_entries VALUES (?, ?)", (seq, leaf_hash(bytes.fromhex(leaf))))
    tree = _StoredTree(conn)
    assert [tree.get_root(n).hex() for n in range(1, 9)] == ROOTS


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {
        "db": tmp_path / "incidents.db",
        "key": tmp_path / "keys" / "signing.key",
        "witness": tmp_path / "keys" / "checkpoint.json",
    }


def written(paths: dict[str, Path], n: int = 12) -> IncidentLog:
    signer = Signer.from_file(paths["key"])
    log = IncidentLog(paths["db"], signer, paths["witness"], clock=iter(range(1000)).__next__)
    for i in range(n):
        log.append("containment", f"client-{i}", {"rung": "refuse", "probes": i})
    return log


def check(paths: dict[str, Path]) -> Verdict:
    key = Signer.from_file(paths["key"], create=False).public_key
    return verify(paths["db"], key, paths["witness"])


def tamper(paths: dict[str, Path], *statements: str) -> None:
    conn = sqlite3.connect(paths["db"])
    with conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


def test_an_untouched_log_verifies_and_the_key_file_is_private(paths: dict[str, Path]) -> None:
    log = written(paths)
    verdict = check(paths)
    assert verdict.ok, verdict.problems
    assert (verdict.entries, verdict.checkpoints, verdict.witnessed) == (12, 12, 12)
    assert paths["key"].stat().st_mode & 0o077 == 0
    assert log.head().size == 12 and log.entries(after=10)[0].subject == "client-10"


def test_an_edited_entry_is_named(paths: dict[str, Path]) -> None:
    written(paths).close()
    tamper(paths, """UPDATE log_entries SET body = '{"probes":0,"rung":"observe"}' WHERE seq = 5""")
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 5, verdict.problems


def test_an_edit_that_rewrites_the_leaf_too_is_named_by_the_checkpoints(
    paths: dict[str, Path],
) -> None:
    log = written(paths)
    log.close()
    edited = '{"probes":0,"rung":"observe"}'
    tamper(paths, f"UPDATE log_entries SET body = '{edited}' WHERE seq = 7")
    conn = sqlite3.connect(paths["db"])
    row = conn.execute(
        "SELECT seq, time, kind, actor, subject, body FROM log_entries WHERE seq = 7"
    )
    seq, time_, kind, actor, subject, body = row.fetchone()
    leaf = leaf_hash(Entry(seq, time_, kind, actor, subject, json.loads(body)).content())
    with conn:
        conn.execute("UPDATE log_entries SET leaf = ? WHERE seq = 7", (leaf,))
    conn.close()
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 7, verdict.problems


def test_a_deleted_entry_is_named(paths: dict[str, Path]) -> None:
    written(paths).close()
    tamper(paths, "DELETE FROM log_entries WHERE seq = 4")
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 4, verdict.problems


def test_reordered_entries_are_named(paths: dict[str, Path]) -> None:
    written(paths).close()
    conn = sqlite3.connect(paths["db"])
    rows = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT seq, subject, body, leaf FROM log_entries WHERE seq IN (3, 9)"
        )
    }
    with conn:
        for seq, other in ((3, 9), (9, 3)):
            conn.execute(
                "UPDATE log_entries SET subject = ?, body = ?, leaf = ? WHERE seq = ?",
                (*rows[other], seq),
            )
    conn.close()
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 3, verdict.problems


def test_a_log_cut_short_with_its_checkpoints_is_caught_by_the_witness(
    paths: dict[str, Path],
) -> None:
    written(paths).close()
    tamper(
        paths, "DELETE FROM log_entries WHERE seq > 9", "DELETE FROM log_checkpoints WHERE size > 9"
    )
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 10, verdict.problems
    assert any("truncated" in p for p in verdict.problems)


def test_a_forged_checkpoint_is_refused(paths: dict[str, Path]) -> None:
    """An attacker without the key signs a head for an edited log with a key of its own: the
    signature does not verify, and the edit is still named."""
    written(paths).close()
    forger = Signer(Ed25519PrivateKey.generate())
    tamper(paths, "UPDATE log_entries SET subject = 'nobody' WHERE seq = 12")
    forged = forger.sign(Checkpoint(12, bytes(32), 99.0))
    tamper(
        paths,
        f"UPDATE log_checkpoints SET signature = x'{forged.signature.hex()}', "
        f"root = x'{forged.root.hex()}', time = 99.0 WHERE size = 12",
    )
    paths["witness"].unlink()
    witness(paths["witness"], forged)
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 12
    assert "checkpoint at size 12: bad signature (forged)" in verdict.problems
    assert "witness: bad signature (forged)" in verdict.problems


def test_an_entry_appended_without_the_key_carries_no_checkpoint(paths: dict[str, Path]) -> None:
    written(paths).close()
    conn = sqlite3.connect(paths["db"])
    with conn:
        conn.execute(
            "INSERT INTO log_entries SELECT 13, time, kind, actor, 'extra', body, leaf "
            "FROM log_entries WHERE seq = 12"
        )
    conn.close()
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 13, verdict.problems


def test_bad_entries_are_refused_before_they_are_written(paths: dict[str, Path]) -> None:
    log = written(paths, 0)
    with pytest.raises(ValueError, match="unknown"):
        log.append("coffee", "x", {})
    with pytest.raises(ValueError, match="at most"):
        log.append("containment", "x" * 300, {})
    with pytest.raises(ValueError, match="at most"):
        log.append("containment", "x", {"blob": "y" * 70_000})
    with pytest.raises(ValueError):
        log.append("containment", "x", {"nan": float("nan")})
    assert log.head() is None and check(paths).ok


def test_the_witness_keeps_the_largest_checkpoint(paths: dict[str, Path]) -> None:
    signer = Signer.from_file(paths["key"])
    witness(paths["witness"], signer.sign(Checkpoint(5, bytes(32), 1.0)))
    witness(paths["witness"], signer.sign(Checkpoint(3, bytes(32), 2.0)))  # an older writer
    assert read_witness(paths["witness"]).size == 5


def test_the_writer_appends_in_order_and_drops_past_its_backlog(paths: dict[str, Path]) -> None:
    log = written(paths, 0)
    dropped: list[int] = []
    writer = LogWriter(log, backlog=1_000, on_drop=lambda: dropped.append(1))
    for i in range(50):
        assert writer.submit("campaign", f"c{i}", {"members": i})
    writer.close()
    assert [e.subject for e in log.entries(limit=100)] == [f"c{i}" for i in range(50)]
    assert check(paths).ok and not dropped


def rewrite_entry(paths: dict[str, Path], seq: int) -> None:
    """An insider without the key: edits an entry and recomputes its leaf to match."""
    conn = sqlite3.connect(paths["db"])
    with conn:
        conn.execute(f"UPDATE log_entries SET subject = 'nobody' WHERE seq = {seq}")
        row = conn.execute(
            f"SELECT seq, time, kind, actor, subject, body FROM log_entries WHERE seq = {seq}"
        ).fetchone()
        entry = Entry(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))
        conn.execute(
            f"UPDATE log_entries SET leaf = ? WHERE seq = {seq}", (leaf_hash(entry.content()),)
        )
    conn.close()


def test_the_next_append_refuses_to_sign_over_an_edit_made_without_the_key(
    paths: dict[str, Path],
) -> None:
    """The edit and its leaf rewritten, the checkpoints from it on deleted: an honest append
    would have signed the forged tree; it refuses, and verify still names the entry."""
    written(paths).close()
    rewrite_entry(paths, 3)
    tamper(paths, "DELETE FROM log_checkpoints WHERE size >= 3")
    log = IncidentLog(paths["db"], Signer.from_file(paths["key"]), paths["witness"])
    with pytest.raises(TamperedLog, match="no signed checkpoint"):
        log.append("release", "someone", {})
    log.close()
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 3, verdict.problems


def test_a_cut_log_with_its_witness_replaced_or_deleted_is_not_signed_over_nor_passed(
    paths: dict[str, Path],
) -> None:
    written(paths).close()
    tamper(
        paths, "DELETE FROM log_entries WHERE seq > 4", "DELETE FROM log_checkpoints WHERE size > 4"
    )
    paths["witness"].write_text("junk")
    log = IncidentLog(paths["db"], Signer.from_file(paths["key"]), paths["witness"])
    with pytest.raises(TamperedLog, match="witness is unreadable"):
        log.append("release", "someone", {})
    paths["witness"].unlink()
    with pytest.raises(TamperedLog, match=r"witness .* is gone"):
        log.append("release", "someone", {})
    log.close()
    assert paths["witness"].exists() is False
    verdict = check(paths)
    assert not verdict.ok and any("witness" in p for p in verdict.problems)


def test_verify_reports_an_unreadable_log_instead_of_crashing(paths: dict[str, Path]) -> None:
    written(paths).close()
    tamper(paths, "UPDATE log_entries SET leaf = 'abc' WHERE seq = 2")
    tamper(paths, "UPDATE log_entries SET body = '" + "[" * 100_000 + "' WHERE seq = 5")
    tamper(
        paths,
        """UPDATE log_entries SET body = '{"probes":9,"probes":1,"rung":"refuse"}' WHERE seq = 8""",
    )
    verdict = check(paths)
    assert not verdict.ok and verdict.first_bad == 2
    assert any(p.startswith("entry 5:") for p in verdict.problems)
    assert any("entry 8: its body is not in the canonical form" in p for p in verdict.problems)
    tamper(paths, "DROP TABLE log_checkpoints")
    assert any("cannot be read" in p for p in check(paths).problems)


def test_processes_racing_to_create_the_key_all_get_the_same_whole_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    for trial in range(20):
        path = tmp_path / f"race-{trial}" / "key.pem"
        with ThreadPoolExecutor(4) as pool:
            keys = list(pool.map(lambda p: Signer.from_file(p).public_pem(), [path] * 4))
        assert len(set(keys)) == 1
        assert path.stat().st_mode & 0o077 == 0 and len(list(path.parent.iterdir())) == 1


def test_the_writer_keeps_half_its_backlog_for_decisions_other_than_campaign_links(
    paths: dict[str, Path],
) -> None:
    import threading

    log = written(paths, 0)
    gate = threading.Event()
    log.listeners.append(lambda entry: gate.wait(10))  # hold the writer on its first entry
    writer = LogWriter(log, backlog=10)
    writer.submit("containment", "first", {})
    links = [writer.submit("campaign", f"c{i}", {}) for i in range(10)]
    others = [writer.submit("containment", f"x{i}", {}) for i in range(5)]
    gate.set()
    writer.close()
    assert links.count(True) <= 5 and all(others)
