"""One de-identification pipeline (issue 14): the web preview shows exactly what the forwarder
sends (same drop rules, engine, profile and gate), `fiona anonymize` writes the same bytes, and
the shipped profiles and classification rules are package data that config/ only mirrors."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomgen import make_study
from fiona.bootstrap import init
from fiona.clock import FakeClock
from fiona.config import load, read_secret
from fiona.control import open_control_plane
from fiona.control.base import Project, TransferRequest, now_iso
from fiona.deid.anonymize import anonymize_folder
from fiona.deid.engine import SHIPPED_PROFILES, profile_names
from fiona.deid.pipeline import Pipeline, ProjectRules, settings_for
from fiona.index.classify import SHIPPED_RULES
from fiona.send.forward import Forwarder
from fiona.web.preview import _show, preview

REPO = Path(__file__).resolve().parents[1]
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


class Site:
    """A data tree with a study on disk (two images and a presentation state), a project that
    drops presentation states, and a forwarder delivering to a folder."""

    def __init__(self, tmp_path: Path):
        self.research = tmp_path / "research"
        self.config = load(str(init(tmp_path / "data", port=11112, ip="127.0.0.1", extra={
            "DESTINATIONS": {"research": {"type": "folder", "path": str(self.research)}}})))
        site = self.config.site(None)
        self.datadir = site.datadir
        self.control = open_control_plane(self.config, site)
        self.project = Project("PROJ", naming="^P[0-9]{4}$", events=["baseline"], features={0})
        self.control.save_project(self.project)
        self.clock = FakeClock(start=datetime(2026, 3, 2, 9, 30))
        self.forwarder = Forwarder(self.config, site, self.control, self.clock)
        made = make_study(tmp_path / "src", n_series=1, images_per_series=2, seed=5)
        self.study = made["study"]
        study_dir = self.forwarder.tree.raw / self.study
        self.images = []
        for f in made["files"]:
            target = study_dir / made["series"][0] / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
            self.images.append(target)
        ps = pydicom.dcmread(made["files"][0])
        ps.Modality, ps.SOPClassUID = "PR", GSPS
        ps.SeriesInstanceUID, ps.SOPInstanceUID = generate_uid(), generate_uid()
        ps.file_meta.MediaStorageSOPClassUID = GSPS
        ps.file_meta.MediaStorageSOPInstanceUID = ps.SOPInstanceUID
        self.state = study_dir / ps.SeriesInstanceUID / "ps.dcm"
        self.state.parent.mkdir()
        ps.save_as(self.state, enforce_file_format=True)
        self.key = read_secret(self.datadir / "config" / "secret.key")

    def send(self) -> TransferRequest:
        req = self.control.add_request(TransferRequest(
            self.study, "PROJ", "P0001", "baseline", requested=now_iso(self.clock)))
        self.forwarder.process(req)
        return next(r for r in self.control.requests(self.study) if r.instance == req.instance)

    def preview(self, image: Path) -> list[dict]:
        return preview(self.datadir, self.key, self.project, "P0001", "baseline", image)


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(tmp_path)


def test_preview_shows_the_header_that_is_sent(site: Site):
    done = site.send()
    assert done.complete, done.error_message
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
            for p in site.research.rglob("*.dcm")}
    assert len(sent) == 2                                   # the presentation state is dropped
    for image in site.images:
        rows = site.preview(image)
        after = {r["tag"]: r["after"] for r in rows if r["after"] != "(removed)"}
        uid_row = "(0008,0018)"
        ds = sent[after[uid_row]]
        expected = {f"({e.tag.group:04X},{e.tag.element:04X})": _show(e) for e in ds
                    if e.tag != 0x7FE00010}
        assert after == expected
        assert any(r["changed"] for r in rows if r["name"] == "Patient's Name")


def test_preview_refuses_an_object_the_project_drops(site: Site):
    with pytest.raises(ValueError, match="presentation state"):
        site.preview(site.state)


def test_anonymize_writes_the_bytes_the_forwarder_sends(site: Site, tmp_path: Path):
    """The offline tool and the forwarder run one pipeline: same settings, same bytes."""
    site.send()
    sent = {p.name: p.read_bytes() for p in site.research.rglob("*.dcm")}
    settings = settings_for(site.project, "P0001", "baseline", site.key, site.datadir)
    report = anonymize_folder(site.images[0].parent, tmp_path / "out", settings)
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*.dcm")}
    assert report.written == 2 and written == sent


def test_pipeline_drop_rules_follow_the_project_features(site: Site):
    ps = pydicom.dcmread(site.state)
    settings = settings_for(site.project, "P0001", "baseline", site.key, site.datadir)
    assert "presentation state" in Pipeline(settings, ProjectRules(frozenset({0}))).process(
        ps).dropped
    kept = Pipeline(settings, ProjectRules()).process(pydicom.dcmread(site.state))
    assert not kept.dropped and kept.encoded and kept.sop_uid != ps.SOPInstanceUID


def test_shipped_data_is_package_data_and_config_mirrors_it():
    """One source of truth: config/ holds examples identical to the package data."""
    assert SHIPPED_PROFILES.is_dir() and "fiona" in SHIPPED_PROFILES.parts
    assert profile_names() == sorted(p.stem for p in (REPO / "config" / "profiles").glob("*.json"))
    for name in profile_names():
        assert (REPO / "config" / "profiles" / f"{name}.json").read_bytes() == \
            (SHIPPED_PROFILES / f"{name}.json").read_bytes()
    assert (REPO / "config" / "classifyRules.json").read_bytes() == SHIPPED_RULES.read_bytes()
