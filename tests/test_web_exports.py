"""The Exports page and its endpoints (issue 14, web part), in process: a real data tree with a
study delivered to a folder destination (as the forwarder leaves it), Starlette's TestClient on
`create_app`, and the export worker's own `process` making the queued job ready.

Who may ask (the project's export role; a refusal is audited), the job from the form to a
download whose bytes equal the zip and its `.sha256`, HTTP Range (206, a resumed download, 416),
and who may download (the project's export role, held now; others 403, audited)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicomgen import make_study
from fiona.clock import FakeClock
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import Series, Study, now_iso
from fiona.export.jobs import QUEUED, READY, JobStore
from fiona.export.worker import Worker
from fiona.web.app import create_app
from fiona.web.users import UserStore
from test_export_worker import deliver, gateway
from webapp import PASSWORD, csrf_of, login

USERS = {"admin": ["admin"], "carol": ["project:PROJ:export"],
         "dave": ["project:PROJ:assign"], "erin": ["project:OTHER:export"],
         "fred": ["project:PROJ:export"]}


class Site:
    def __init__(self, tmp: Path):
        self.gw, research = gateway(tmp)
        self.mapped = deliver(tmp, self.gw, research)
        self.gw.run("project", "add", "OTHER", "--naming", "^O[0-9]{4}$", "--events",
                    "baseline")
        users = UserStore(self.gw.datadir)
        for name, roles in USERS.items():
            users.add(name, PASSWORD, roles)
        self.config = load(str(self.gw.config))
        self.app = create_app(self.config, clock=FakeClock())
        self.store = JobStore(self.gw.datadir)
        self.worker = Worker(self.config, self.config.site())

    def client(self, user: str) -> TestClient:
        c = TestClient(self.app, follow_redirects=False)
        assert login(c, user).status_code == 303
        return c

    def audit(self, action: str) -> list[dict]:
        lines = (self.gw.datadir / "logs" / "audit.log").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["action"] == action]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return Site(tmp_path_factory.mktemp("webexports"))


def post_form(client: TestClient, **fields) -> object:
    token = csrf_of(client.get("/exports").text)
    return client.post("/exports", data={"csrf_token": token, **fields})


def test_without_the_export_role_nothing_is_queued_and_the_refusal_is_audited(site: Site):
    dave = site.client("dave")
    page = dave.get("/exports")
    assert page.status_code == 200 and 'id="no-export-role"' in page.text
    assert 'id="nav-exports"' not in page.text
    # the study list of a project the user may not export is not shown, even when asked for
    assert site.mapped not in dave.get("/exports?project=PROJ").text
    before = len(site.store.all())
    refused = post_form(dave, project="PROJ", type="dicom")
    assert refused.status_code == 403
    token = dave.get("/api/session").json()["csrf_token"]
    api = dave.post("/api/exports", json={"project": "PROJ", "type": "dicom"},
                    headers={"X-CSRF-Token": token})
    assert api.status_code == 403
    # without the CSRF token nothing is even checked
    assert dave.post("/api/exports", json={"project": "PROJ", "type": "dicom"}).status_code == 403
    assert len(site.store.all()) == before
    refusals = site.audit("export-refused")
    assert len(refusals) == 2 and {e["user"] for e in refusals} == {"dave"}
    assert all(e["details"]["project"] == "PROJ" for e in refusals)


def test_bad_requests_name_what_is_wrong_and_queue_nothing(site: Site):
    carol = site.client("carol")
    before = len(site.store.all())
    differ = post_form(carol, project="PROJ", type="dicom", password="one secret",
                       password2="another")
    assert differ.status_code == 400 and "the two passwords differ" in differ.text
    assert "one secret" not in differ.text
    unknown = post_form(carol, project="PROJ", type="nonsense")
    assert unknown.status_code == 400 and "no export type" in unknown.text
    stranger = post_form(carol, project="PROJ", type="dicom", study="1.2.3.4")
    assert stranger.status_code == 400 and "not among the delivered studies" in stranger.text
    assert len(site.store.all()) == before


def test_request_progress_ready_and_download_with_ranges(site: Site):
    carol = site.client("carol")
    page = carol.get("/exports")
    assert site.mapped in page.text and 'id="nav-exports"' in page.text
    # PRG: the form posts, the answer is a redirect to the page with a message code
    made = post_form(carol, project="PROJ", type="dicom", study=site.mapped,
                     password="", password2="")
    assert made.status_code == 303 and made.headers["location"].startswith("/exports?done=")
    assert "Export requested" in carol.get(made.headers["location"]).text
    rows = carol.get("/api/exports").json()
    assert len(rows) == 1 and rows[0]["state"] == QUEUED and rows[0]["download"] is None
    job_id = rows[0]["id"]
    assert site.audit("export-requested")[-1]["details"]["job"] == job_id
    assert carol.get(f"/exports/{job_id}/download").status_code == 404  # not ready yet

    site.worker.process(site.store.load(job_id))
    job = site.store.load(job_id)
    assert job.state == READY
    row = carol.get("/api/exports").json()[0]
    assert row["state"] == READY and row["done"] == row["total"] == 6
    assert row["expires"] == job.expires and row["download"]["zip"] == \
        f"/exports/{job_id}/download"
    assert f'id="job-{job_id}"' in carol.get("/exports").text

    zip_path = site.gw.tree.exports / job.zip
    data = zip_path.read_bytes()
    whole = carol.get(f"/exports/{job_id}/download")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    assert job.zip in whole.headers["content-disposition"]
    digest = carol.get(f"/exports/{job_id}/sha256").text
    assert digest.split() == [hashlib.sha256(data).hexdigest(), job.zip]
    assert digest == (site.gw.tree.exports / f"{job.zip}.sha256").read_text()
    assert "README.txt," in carol.get(f"/exports/{job_id}/manifest").text

    part = carol.get(f"/exports/{job_id}/download", headers={"Range": "bytes=10-109"})
    assert part.status_code == 206 and part.content == data[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{len(data)}"
    # a broken download resumed from where it stopped
    cut = len(data) // 3
    first = carol.get(f"/exports/{job_id}/download", headers={"Range": f"bytes=0-{cut - 1}"})
    rest = carol.get(f"/exports/{job_id}/download", headers={"Range": f"bytes={cut}-"})
    assert (first.status_code, rest.status_code) == (206, 206)
    assert first.content + rest.content == data
    beyond = carol.get(f"/exports/{job_id}/download",
                       headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    downloads = [e for e in site.audit("export-download") if e["details"]["job"] == job_id]
    assert len(downloads) >= 7 and {e["user"] for e in downloads} == {"carol"}

    # the project's export role may download another's export; others may not (audited)
    assert site.client("fred").get(f"/exports/{job_id}/download").content == data
    assert site.client("admin").get(f"/exports/{job_id}/download").status_code == 200
    for name in ("erin", "dave"):
        other = site.client(name)
        assert other.get(f"/exports/{job_id}/download").status_code == 403
        assert other.get(f"/exports/{job_id}/manifest").status_code == 403
        assert job_id not in json.dumps(other.get("/api/exports").json())
    refused = [e for e in site.audit("export-download-refused")
               if e["details"]["job"] == job_id]
    assert {e["user"] for e in refused} == {"erin", "dave"}
    # the list: one's own jobs, admins all
    assert site.client("fred").get("/api/exports").json() == []
    assert [r["id"] for r in site.client("admin").get("/api/exports").json()] == [job_id]
    # the mail's link leads to the job on the page
    assert carol.get(f"/exports/{job_id}").headers["location"].endswith(f"#job-{job_id}")


def test_a_failed_job_shows_its_reason_and_offers_nothing(site: Site):
    open_control_plane(site.config).add_participant("PROJ", "P0002")
    carol = site.client("carol")
    assert post_form(carol, project="PROJ", type="pure", participant="P0002").status_code == 303
    row = carol.get("/api/exports").json()[0]
    assert row["state"] == QUEUED and row["participant"] == "P0002"
    assert row["estimate"] is not None  # from the project's export that is ready
    site.worker.process(site.store.load(row["id"]))
    row = carol.get("/api/exports").json()[0]
    assert row["state"] == "failed" and "no delivered study" in row["reason"]
    assert row["download"] is None and row["estimate"] is None
    assert carol.get(f"/exports/{row['id']}/download").status_code == 404
    assert "no delivered study" in carol.get("/exports").text


def test_noassign_from_the_study_page_exports_a_waiting_study(site: Site, tmp_path):
    """A study in quarantine, as the receiver leaves it (raw/<Study>/<series>/<file>)."""
    made = make_study(tmp_path / "w", n_series=1, images_per_series=2, rows=8, cols=8,
                      patient_name="Hansen^Ingrid", patient_id="NID0404", accession="NOA1")
    uid, series = made["study"], made["series"][0]
    control = open_control_plane(site.config)
    control.register_study(Study(uid, description="MR Head", date="20260314", time="101500",
                                 accession="NOA1", arrival=now_iso(),
                                 series=[Series(uid=series, num_files=2, modality="MR")]))
    raw = site.gw.tree.study_raw(uid) / series
    raw.mkdir(parents=True)
    for f in made["files"]:
        shutil.copy(f, raw / f.name)
    admin = site.client("admin")
    page = admin.get(f"/assign/{uid}").text
    assert 'id="noassign-button"' in page and f'formaction="/exports/noassign/{uid}"' in page
    assert 'id="noassign-button"' not in site.client("dave").get(f"/assign/{uid}").text
    fields = {"csrf_token": csrf_of(page), "project": "PROJ", "participant": "P0003",
              "event": "baseline"}
    bad = admin.post(f"/exports/noassign/{uid}", data={**fields, "participant": "X1"})
    assert bad.status_code == 400 and "does not match" in bad.text and "X1" in bad.text
    assert not [j for j in site.store.all() if j.noassign]
    made_job = admin.post(f"/exports/noassign/{uid}", data=fields)
    assert made_job.status_code == 303
    [job] = [j for j in site.store.all() if j.noassign]
    assert (job.study, job.participant, job.requester) == (uid, "P0003", "admin")
    assert not control.requests(uid)  # no transfer request
    site.worker.process(site.store.load(job.id))
    done = site.store.load(job.id)
    assert done.state == READY, done.reason
    got = admin.get(f"/exports/{job.id}/download").content
    with zipfile.ZipFile(io.BytesIO(got)) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dcm")]
        assert len(names) == 2 and b"Hansen" not in zf.read(names[0])


def test_job_ids_are_checked(site: Site):
    carol = site.client("carol")
    assert carol.get("/exports/not-a-job/download").status_code == 400
    assert carol.get("/exports/..%2F..%2Fconfig/download").status_code in (400, 404)
    assert carol.get("/exports/0123456789ab/download").status_code == 404
    assert carol.get("/exports/0123456789ab/sha256").status_code == 404
    assert carol.get("/exports/0123456789ab/nothing").status_code == 404
    assert TestClient(site.app, follow_redirects=False).get(
        "/api/exports").status_code == 401


def test_a_job_with_a_password_is_never_written_without_it(site: Site, monkeypatch):
    """The worker polls the job folder: a job file written before its sealed password would
    be made into a zip without encryption."""
    written = []
    save = JobStore.save
    monkeypatch.setattr(JobStore, "save",
                        lambda self, job: (written.append(job.sealed_password), save(self, job)))
    made = post_form(site.client("carol"), project="PROJ", type="dicom", study=site.mapped,
                     password="s3cret pw", password2="s3cret pw")
    assert made.status_code == 303
    assert written and all(written), written
    assert not any(b"s3cret pw" in p.read_bytes() for p in site.store.tree.export_jobs.iterdir())


def test_an_export_is_only_for_who_holds_the_export_role_now(site: Site):
    """A requester whose export role was withdrawn neither downloads nor sees the job, and the
    mail's link does not tell a stranger the job's project."""
    UserStore(site.gw.datadir).add("ivy", PASSWORD, ["project:OTHER:export"])  # PROJ withdrawn
    (site.gw.tree.exports / "ivy.zip").write_bytes(b"zip")
    job = site.store.new(project="PROJ", type="dicom", requester="ivy")
    job.state, job.zip = READY, "ivy.zip"
    site.store.save(job)
    ivy = site.client("ivy")
    assert ivy.get(f"/exports/{job.id}/download").status_code == 403
    assert job.id not in json.dumps(ivy.get("/api/exports").json())
    dave = site.client("dave")
    link = dave.get(f"/exports/{job.id}")
    assert link.status_code == 403 and "PROJ" not in link.headers.get("location", "")
    assert site.client("carol").get(f"/exports/{job.id}").status_code == 303
