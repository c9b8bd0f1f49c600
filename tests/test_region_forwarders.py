"""Two forwarders on one PostgreSQL index (two machines of one site on shared storage): real
`Forwarder`s, 200 requests, a folder destination (bench/region_forwarders.py). Each request is
claimed by one of them (`FOR UPDATE SKIP LOCKED` and a lease) and so sent exactly once;
without the claims every request went out twice."""

from __future__ import annotations

import pytest

from bench.region_forwarders import two_forwarders
from postgres import postgres_server

pg_server = pytest.fixture(scope="session")(postgres_server)


def test_two_forwarders_on_one_postgres_index_send_each_request_once(pg_server, tmp_path):
    outcome = two_forwarders(tmp_path, pg_server.database(), requests=200)
    assert not outcome.incomplete, outcome.incomplete[:3]
    assert len(outcome.sends) == 200 and outcome.sent_twice == 0
    assert outcome.delivered == 200 and outcome.ok
    assert len(outcome.by) == 2, outcome.by          # both worked, side by side
