"""Review from the research PACS (issue 8): a real Orthanc holds de-identified studies of two
projects; `fiona.review` lists a project's studies by C-FIND on InstitutionName, reads a sample
of each series' headers by C-GET, caches them under DATADIR/site/cache/review and says how many
files its figures are based on. Also the folder source's "N of M" and the config keys."""

from __future__ import annotations

import json
import re
import stat
import urllib.request
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona.clock import FakeClock
from fiona.config import ConfigError, parse
from fiona.deid.engine import Deidentifier, Settings, load_profile, with_profile
from fiona.deid.identifiers import Identifiers
from fiona.review.cache import ReviewCache
from fiona.review.pacs import ReviewPacs
from fiona.review.source import FolderSource, PacsSource
from fiona.send.destinations import DicomDestination
from helpers import Gateway, free_port
from orthanc import Orthanc

pytestmark = pytest.mark.e2e  # starts Orthanc

KEY = b"k" * 32
MAX_AGE = 3600.0


def deidentified(tmp: Path, project: str, participant: str, n_series: int, images: int,
                 seed: int) -> list[Path]:
    """A synthetic study de-identified for (project, participant) by FIONA's engine."""
    made = make_study(tmp / f"src-{project}-{participant}-{seed}", n_series=n_series,
                      images_per_series=images, rows=8, cols=8, seed=seed,
                      patient_name="Doe^Jane", patient_id=f"PAT{seed}")
    engine = Deidentifier(with_profile(Settings(project=project, participant=participant,
                                                key=KEY), load_profile("default")))
    out = tmp / f"deid-{project}-{participant}-{seed}"
    out.mkdir()
    files = []
    for f in made["files"]:
        ds = pydicom.dcmread(f)
        engine.apply(ds, Identifiers.from_dataset(ds))
        files.append(out / f.name)
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def store(pacs: Orthanc, files: list[Path]) -> None:
    result = DicomDestination("research", {"aetitle": pacs.aet, "host": "127.0.0.1",
                                           "port": pacs.dicom_port}).send(files)
    assert result.complete and result.sent == len(files), result.failed


@pytest.fixture
def pacs(tmp_path: Path):
    """Orthanc that knows FIONA's query AE (C-GET is refused to unknown AEs)."""
    extra = {"DicomModalities": {"fiona": ["FIONA", "127.0.0.1", free_port()]}}
    with Orthanc(tmp_path, extra=extra) as orthanc:
        yield orthanc


class Setup:
    def __init__(self, tmp: Path, pacs: Orthanc, sample: int = 5):
        self.clock = FakeClock()
        self.datadir = tmp / "data"
        self.cache = ReviewCache.for_datadir(self.datadir, MAX_AGE, self.clock)
        self.pacs = ReviewPacs("research", {"aetitle": pacs.aet, "host": "127.0.0.1",
                                            "port": pacs.dicom_port})
        self.source = PacsSource(self.pacs, self.cache, sample)


@pytest.fixture
def filled(tmp_path: Path, pacs: Orthanc) -> dict:
    """Project A: A001 with 2 series of 7 images (the 8th image of the first series held
    back), A002 with 1 series of 3; project B: B001 with 1 series of 2."""
    a1 = deidentified(tmp_path, "A", "A001", 2, 8, seed=1)
    late = a1.pop(7)
    a2 = deidentified(tmp_path, "A", "A002", 1, 3, seed=2)
    b1 = deidentified(tmp_path, "B", "B001", 1, 2, seed=3)
    store(pacs, a1 + a2 + b1)
    return {"late": late, "b_series": pydicom.dcmread(b1[0]).SeriesInstanceUID}


def values(review, name: str) -> dict[str, int]:
    row = next(t for t in review.tags if t["name"] == name)
    return {v["value"]: v["count"] for v in row["values"]}


def test_review_lists_the_projects_studies_and_samples_each_series(tmp_path, pacs, filled):
    s = Setup(tmp_path, pacs)
    review = s.source.review("A")
    assert review.error == ""
    assert (review.kind, review.destination) == ("dicom", f"ORTHANC@127.0.0.1:{pacs.dicom_port}")
    assert (review.studies, review.files, review.files_total) == (2, 13, 18)
    assert review.based_on == "based on 13 of 18 files"
    assert review.fetched == 13
    assert values(review, "Patient ID") == {"A001": 10, "A002": 3}
    assert values(review, "Institution Name") == {"A": 13}
    assert values(review, "Patient Identity Removed") == {"YES": 13}
    text = json.dumps(review.as_dict())
    assert "B001" not in text and "Doe^Jane" not in text and "PAT1" not in text
    assert not any(t["tag"].startswith("(7FE0,0010)") for t in review.tags)

    # the cache: one entry per series, in the data tree, 0750/0640
    root = s.datadir / "site" / "cache" / "review"
    entries = sorted((root / "A").glob("*/*.json"))
    assert len(entries) == 3
    for path in [root, root / "A", *{e.parent for e in entries}]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, path
    for path in entries:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path

    again = s.source.review("A")
    assert again.fetched == 0 and again.as_dict() == review.as_dict()

    b = s.source.review("B")
    assert (b.studies, b.files, b.files_total, b.based_on) == (1, 2, 2, "based on 2 files")
    assert values(b, "Patient ID") == {"B001": 2}


def test_cache_is_read_again_when_a_series_changes_or_ages(tmp_path, pacs, filled):
    s = Setup(tmp_path, pacs)
    assert s.source.review("A").fetched == 13
    store(pacs, [filled["late"]])  # the first series now has 8 instances: only it is read again
    review = s.source.review("A")
    assert (review.fetched, review.files, review.files_total) == (5, 13, 19)
    assert s.source.review("A").fetched == 0
    s.clock.advance(MAX_AGE - 1)
    assert s.source.review("A").fetched == 0
    s.clock.advance(2)
    assert s.source.review("A").fetched == 13


def test_series_gone_from_the_pacs_leave_the_cache(tmp_path, pacs, filled):
    s = Setup(tmp_path, pacs)
    s.source.review("B")
    study_dirs = list((s.datadir / "site" / "cache" / "review" / "B").iterdir())
    assert len(study_dirs) == 1
    for study in pacs.studies():
        if study["MainDicomTags"].get("InstitutionName") == "B":
            delete(pacs, f"/studies/{study['ID']}")
    review = s.source.review("B")
    assert (review.studies, review.files, review.based_on) == (0, 0, "based on 0 files")
    assert not study_dirs[0].exists()


def delete(pacs: Orthanc, path: str) -> None:
    req = urllib.request.Request(pacs.http + path, method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as rsp:
        rsp.read()


def test_sample_size_comes_from_the_source(tmp_path, pacs, filled):
    review = Setup(tmp_path, pacs, sample=1).source.review("A")
    assert (review.files, review.files_total, review.sample) == (3, 18, 1)


def test_each_view_fetches_a_bounded_number_of_headers(tmp_path, pacs, filled):
    s = Setup(tmp_path, pacs)
    s.source.max_fetch = 5
    seen = []
    for _ in range(4):
        r = s.source.review("A")
        seen.append((r.fetched, r.files, r.unread_series))
    # one series per view (in study UID order, which is random here), until all are read
    assert [u for _f, _n, u in seen] == [2, 1, 0, 0]
    assert all(f <= 5 for f, _n, _u in seen) and sum(f for f, _n, _u in seen) == 13
    assert [n for _f, n, _u in seen][2:] == [13, 13]
    assert r.based_on == "based on 13 of 18 files"


def test_an_unreachable_pacs_is_reported_not_raised(tmp_path, pacs, filled):
    s = Setup(tmp_path, pacs)
    s.source.review("A")
    pacs.stop(kill=True)
    review = s.source.review("A")
    assert "unreachable" in review.error
    assert (review.files, review.tags) == (0, [])


def test_project_names_that_c_find_would_read_as_wildcards_are_refused(tmp_path, pacs, filled):
    s = Setup(tmp_path, pacs)
    for name in ("A*", "?", "A\\B", " A"):
        review = s.source.review(name)
        assert "cannot be looked up" in review.error and review.files == 0


def test_folder_source_says_how_many_files_it_read(tmp_path):
    from fiona.config import load
    from fiona.control import open_control_plane
    from fiona.control.base import Project, TransferRequest, now_iso

    gw = Gateway(tmp_path / "data", free_port())
    config = load(str(gw.config))
    control = open_control_plane(config)
    control.save_project(Project("A", naming=r"^A[0-9]{3}$"))
    made = make_study(tmp_path / "src", n_series=1, images_per_series=3, rows=8, cols=8)
    req = control.add_request(TransferRequest(made["study"], "A", "A001", "baseline",
                                              requested=now_iso()))
    req.mapped_uid = "2.25.1"
    control.update_request(req)
    root = tmp_path / "research"
    (root / "2.25.1" / "2.25.2").mkdir(parents=True)
    for i, f in enumerate(made["files"]):
        (root / "2.25.1" / "2.25.2" / f"2.25.{i + 3}.dcm").write_bytes(f.read_bytes())
    full = FolderSource(root, control).review("A")
    assert (full.studies, full.files, full.files_total, full.based_on) == (1, 3, 3,
                                                                          "based on 3 files")
    capped = FolderSource(root, control, cap=2).review("A")
    assert capped.based_on == "based on 2 of 3 files"
    assert values(capped, "Patient ID") == {"PAT0001": 2}


@pytest.mark.parametrize("key, value", [("review_sample", 0), ("review_sample", "5"),
                                        ("review_max_age_hours", -1)])
def test_review_settings_of_a_dicom_destination_are_checked(tmp_path, key, value):
    raw = {"DATADIR": str(tmp_path), "DESTINATIONS": {"research": {
        "type": "dicom", "aetitle": "PACS", "host": "127.0.0.1", "port": 4242, key: value}}}
    with pytest.raises(ConfigError, match=f"DESTINATIONS.research.{key}"):
        parse(raw, tmp_path / "config.json")
    del raw["DESTINATIONS"]["research"][key]
    settings = parse(raw, tmp_path / "config.json").destinations["research"]
    assert (settings["review_sample"], settings["review_max_age_hours"]) == (5, 24)


# --- the Review page with a dicom destination -------------------------------------------------
PASSWORD = "correct horse battery"


def logged_in(config, user: str):
    from fastapi.testclient import TestClient

    from fiona.web.app import create_app

    client = TestClient(create_app(config), follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"username": user, "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 303, r.text
    return client


def test_review_page_reads_the_research_pacs(tmp_path, pacs, filled):
    from fiona.config import load
    from fiona.control import open_control_plane
    from fiona.control.base import Project
    from fiona.web.users import UserStore

    gw = Gateway(tmp_path / "site", free_port(), {"DESTINATIONS": {"research": {
        "type": "dicom", "aetitle": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}}})
    config = load(str(gw.config))
    control = open_control_plane(config)
    for name in ("A", "B"):
        control.save_project(Project(name, naming=rf"^{name}[0-9]{{3}}$"))
    UserStore(gw.datadir).add("alice", PASSWORD, ["project:A:review", "project:B:review"])
    alice = logged_in(config, "alice")

    page = alice.get("/review/A")
    assert page.status_code == 200
    assert "based on 13 of 18 files" in page.text and "A001" in page.text
    assert "B001" not in page.text and "Doe^Jane" not in page.text
    assert "based on 2 files" in alice.get("/review/B").text
    data = alice.get("/api/review/A").json()
    assert (data["kind"], data["files"], data["files_total"]) == ("dicom", 13, 18)
    assert list((gw.datadir / "site" / "cache" / "review" / "A").glob("*/*.json"))

    pacs.stop(kill=True)
    down = alice.get("/review/A")
    assert down.status_code == 200 and "unreachable" in down.text
