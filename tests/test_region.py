"""Several FIONA nodes on one control plane, in process: NODE in config.json, the shared key's
fingerprint (a node with another key is refused at start), a split study reported by Status,
and the node column and filter of the Assign and Status pages."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from dicomgen import make_study
from fiona import control as control_module
from fiona.arrive.detector import ArrivalDetector
from fiona.config import ConfigError, load, parse
from fiona.control import open_control_plane
from fiona.control.assign import Assigner
from fiona.control.base import Project, Series, Study
from fiona.control.keyed import Keyed
from fiona.control.region import KeyMismatch
from helpers import Gateway, free_port
from inprocess import LocalSite
from webapp import WebSite

QUIET = 16.0


def test_node_defaults_to_the_host_name_and_is_validated(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    monkeypatch.setattr("socket.gethostname", lambda: "mri-gw.hospital.example")
    assert parse({}, path).node == "mri-gw"
    assert parse({"NODE": "north"}, path).node == "north"
    with pytest.raises(ConfigError, match=r"NODE 'a/b' must be 1-32 letters.*hospital-a"):
        parse({"NODE": "a/b"}, path)
    monkeypatch.setattr("socket.gethostname", lambda: "bad name")
    with pytest.raises(ConfigError, match="from the host name 'bad name'.*set NODE"):
        parse({}, path)


def test_a_node_with_another_key_is_refused_naming_the_fix(tmp_path, monkeypatch):
    """The control plane records the first key's fingerprint (keyed: the key is not in it);
    a node whose secret.key differs cannot open the control plane."""
    monkeypatch.setattr(control_module, "_KEY_CHECKED", set())
    gw = Gateway(tmp_path / "data", free_port())
    config = load(str(gw.config))
    control = open_control_plane(config)
    key = gw.datadir / "config" / "secret.key"
    recorded = control.claim_key_fingerprint("ignored")
    assert recorded == Keyed(key.read_bytes().strip()).fingerprint()
    assert key.read_bytes().strip().hex() not in recorded
    key.write_bytes(b"another region's key, 32 bytes.")
    key.chmod(0o600)
    monkeypatch.setattr(control_module, "_KEY_CHECKED", set())
    with pytest.raises(KeyMismatch, match=r"not the region's.*Copy the region's secret.key "
                                          r"to .*secret.key \(mode 0600"):
        open_control_plane(config)
    res = gw.run("requests", "list", check=False)
    assert res.returncode != 0 and "Running a region" in res.stderr


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setattr(control_module, "_KEY_CHECKED", set())
    return WebSite(tmp_path)


def a_study(uid: str, node: str, accession: str) -> Study:
    return Study(uid=uid, accession=accession, arrival="2026-03-14 10:00:00", node=node,
                 description="MR Head", date="20260314", calling_ae="MOD",
                 series=[Series(uid=f"{uid}.1", num_files=1, modality="MR")])


def test_assign_and_status_show_each_studys_node_with_a_filter(site):
    site.control.register_study(a_study("1.2.1", "north", "ACCN"))
    site.control.register_study(a_study("1.2.2", "south", "ACCS"))
    site.control.register_study(replace(a_study("1.2.1", "south", "ACCN"),
                                        series=[Series(uid="1.2.1.9", num_files=1)]))
    admin = site.client("admin")
    page = admin.get("/assign").text
    assert 'id="node"' in page and "split: south" in page
    north = admin.get("/assign?node=north").text
    assert "ACCN" in north and "ACCS" not in north
    api = admin.get("/api/studies", params={"node": "south"}).json()
    assert [s["uid"] for s in api["studies"]] == ["1.2.2"]
    assert api["studies"][0]["node"] == "south"
    status = admin.get("/api/status").json()
    nodes = {n["node"]: n for n in status["nodes"]}
    assert nodes["north"]["studies"] == 1 and nodes["south"]["studies"] == 1
    assert nodes["north"]["split_studies"] == [{"uid": "1.2.1", "also_at": ["south"]}]
    only = admin.get("/api/status", params={"node": "south"}).json()["nodes"]
    assert [n["node"] for n in only] == ["south"]
    html = admin.get("/status?node=north").text
    assert 'id="nodes"' in html and "1.2.1 also at south" in html
    assert json.dumps(status).count("ACCN") == 0        # identifiers stay off Status


def test_a_study_split_between_two_nodes_is_reported_not_sent_twice(tmp_path, caplog):
    """Series of one study reach two hospitals: the second node's detector marks the study
    split, logs it and makes no request of its own; the first node's request stays the only
    one, for its own series."""
    north = LocalSite.create(tmp_path / "north", STUDY_QUIET_SECONDS=QUIET, NODE="north")
    south = LocalSite.create(tmp_path / "south", STUDY_QUIET_SECONDS=QUIET, NODE="south")
    try:
        shared = north.control                       # one control plane for the region
        shared.save_project(Project("PROJ", naming=r"^P[0-9]{4}$", events=["baseline"]))
        Assigner(shared, north.keyed).upload_coupling("SPLIT1,PROJ,P0100,baseline\n")
        first = make_study(tmp_path / "a", n_series=1, images_per_series=1,
                           accession="SPLIT1", seed=11)
        late = make_study(tmp_path / "b", n_series=2, images_per_series=1, accession="SPLIT1",
                          study_uid=first["study"], seed=12)
        north.arrive(first["files"])
        north.clock.advance(QUIET + 1)
        ArrivalDetector(north.config, north.site, shared, north.keyed, north.clock).step()
        south.arrive([f for f in late["files"] if f.name.startswith("s02")])
        south.clock.advance(QUIET + 1)
        with caplog.at_level(logging.WARNING, logger="fiona"):
            ArrivalDetector(south.config, south.site, shared, south.keyed, south.clock).step()
        assert f"study {first['study']} is split: node north holds it" in caplog.text
        stored = shared.study(first["study"])
        assert (stored.node, stored.split_nodes, len(stored.series)) == ("north", ["south"], 1)
        [req] = shared.requests(first["study"])
        assert (req.node, req.source, req.revision) == ("north", "coupling", 1)
        assert [r.study_uid for r in shared.pending_requests(node="south")] == []
    finally:
        north.close()
        south.close()
