"""What only the local SQLite backend has: its schema migration. (The interface itself is
tested on both backends in test_control_contract.py.)"""

from __future__ import annotations

import sqlite3
import threading

from fiona.control.base import Study, TransferRequest
from fiona.control.local import LocalControlPlane

OLD_REQUESTS = """
CREATE TABLE requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL, project TEXT NOT NULL, participant TEXT NOT NULL,
    event TEXT NOT NULL, requested TEXT NOT NULL, transferred TEXT NOT NULL DEFAULT '',
    mapped_uid TEXT NOT NULL DEFAULT '', error_flags TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '', active_proc_time REAL NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '',
    UNIQUE (study_uid, project, participant, event));
"""


def test_a_database_from_before_revisions_keeps_what_was_pending(tmp_path):
    path = tmp_path / "fiona.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_REQUESTS)
        db.executemany("INSERT INTO requests (study_uid, project, participant, event, requested, "
                       "transferred) VALUES (?, 'PROJ', 'P0001', 'baseline', ?, ?)", [
                           ("1.1", "2024-05-01 11:00:00", "2024-05-01 11:05:00"),  # done
                           ("1.2", "2024-05-01 11:00:00", "2024-05-01 11:00:00"),  # done
                           ("1.3", "2024-05-01 11:06:00", "2024-05-01 11:05:00"),  # resent
                           ("1.4", "2024-05-01 11:00:00", "")])                    # new
    db.close()
    opened = [None, None]

    def open_it(i: int) -> None:  # two processes starting at once migrate once
        opened[i] = LocalControlPlane(path)

    threads = [threading.Thread(target=open_it, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cp = opened[0]
    assert cp is not None and opened[1] is not None
    state = {r.study_uid: (r.revision, r.done_revision, r.pending) for r in cp.requests()}
    assert state == {"1.1": (1, 1, False), "1.2": (1, 1, False), "1.3": (1, 0, True),
                     "1.4": (1, 0, True)}
    done = cp.requests("1.1")[0]
    assert cp.request_again(done, requested=done.transferred).pending
    assert cp.add_request(TransferRequest("1.1", "PROJ", "P0002", "followup", "x")) == \
        cp.requests("1.1")[0]


def test_a_database_from_before_nodes_gets_the_node_columns(tmp_path):
    """Studies and inventory lines of a database from before regions have no node: they are
    every node's (`takes`), and the database takes nodes from then on."""
    path = tmp_path / "fiona.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_REQUESTS + """
            CREATE TABLE studies (uid TEXT PRIMARY KEY, arrival TEXT NOT NULL,
                hidden INTEGER NOT NULL DEFAULT 0, data TEXT NOT NULL);
            INSERT INTO studies VALUES ('1.1', '2024-05-01 10:00:00', 0, '{"uid": "1.1"}');
            INSERT INTO requests (study_uid, project, participant, event, requested)
                VALUES ('1.1', 'PROJ', 'P0001', 'baseline', '2024-05-01 11:00:00');""")
    db.close()
    cp = LocalControlPlane(path)
    assert cp.study("1.1").node == ""
    assert [r.study_uid for r in cp.pending_requests(node="north")] == ["1.1"]
    cp.register_study(Study(uid="1.2", arrival="2024-05-02 10:00:00", node="north"))
    assert cp.study("1.2").node == "north"
