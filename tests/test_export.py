"""Exports (issue 14), the core: retrieve de-identified studies from a folder destination and
from the research PACS (Orthanc, C-GET), profiles, the dicom and pure layouts, packing (7-Zip
opens the AES zip, unzip the plain one, manifest and .sha256 match), hostile descriptions stay
inside, NoAssign exports with no identifier, and `fiona export` end to end."""

from __future__ import annotations

import csv
import hashlib
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona.config import load, read_secret
from fiona.control import open_control_plane
from fiona.control.base import InventoryEntry, TransferRequest, now_iso
from fiona.deid.gate import check
from fiona.deid.identifiers import Identifiers
from fiona.deid.pipeline import Pipeline, read, settings_for
from fiona.export import job
from fiona.export.dicom import DicomExport
from fiona.export.names import clean
from fiona.export.pack import MANIFEST, README, About, pack
from fiona.export.profile import Characteristics, ProfileError, parse
from fiona.export.profile import load as load_profile
from fiona.export.pure import PureExport
from fiona.export.retrieve import ExportUnavailable, retrieve
from fiona.export.spectroscopy import SIEMENS_SPECTROSCOPY, SpectroscopyExport
from fiona.export.types import ExportReport, SeriesInput, StudyInput
from fiona.send.destinations import DicomDestination
from helpers import Gateway, free_port, wait_for
from orthanc import Orthanc

HOSTILE = ["../../../etc/passwd", "/abs/path", "a\x00b", "..", ".", "x" * 5000, "\\..\\win",
           "T1 MPRAGE (sag) æøå", "", "\u202e\u0000/..%2f", "C:\\temp"]
IDENTIFIERS = ("Hansen", "Ingrid", "NID0101", "E2E1", "Haukeland", "Smith", "Nordmann",
               "19800101", "MRC12345")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifest(zip_path: Path, extracted: Path) -> None:
    """The .sha256 matches the zip, the manifest (inside and beside) every extracted file."""
    line = Path(f"{zip_path}.sha256").read_text()
    assert line == f"{sha(zip_path)}  {zip_path.name}\n"
    inside = (extracted / MANIFEST).read_text()
    assert Path(f"{zip_path}.manifest.csv").read_text() == inside
    rows = list(csv.reader(inside.splitlines()))
    names = {p.relative_to(extracted).as_posix() for p in extracted.rglob("*") if p.is_file()}
    assert {r[0] for r in rows} == names - {MANIFEST}
    for name, digest in rows:
        assert sha(extracted / name) == digest, name


def unzip(zip_path: Path, into: Path) -> Path:
    res = subprocess.run(["unzip", "-q", str(zip_path), "-d", str(into)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return into


# --- names, layouts, profiles --------------------------------------------------------------------
def test_one_sanitiser_keeps_letters_digits_underscore_and_norwegian_letters():
    assert clean("T1 MPRAGE (sag) æøå") == "T1_MPRAGE_sag_æøå"
    assert clean("") == "unknown" and clean(None) == "unknown" and clean("../..") == "unknown"
    for value in HOSTILE:
        name = clean(value)
        assert name and len(name) <= 64 and "/" not in name and "\\" not in name
        assert "\x00" not in name and "." not in name


def _study(tmp: Path, descriptions: list[str]) -> StudyInput:
    made = make_study(tmp / "src", n_series=1, images_per_series=len(descriptions), rows=4,
                      cols=4)
    series = []
    for i, (path, desc) in enumerate(zip(made["files"], descriptions, strict=True)):
        ds = pydicom.dcmread(path)
        named = tmp / f"{ds.SOPInstanceUID}.dcm"
        shutil.copy(path, named)
        series.append(SeriesInput(f"1.2.3.{i}", i if i % 2 else None, desc, [named]))
    return StudyInput("../PROJ", "../../P0001", "/etc", "1.2.3", "../2026", "", series)


@pytest.mark.parametrize("kind", [DicomExport, PureExport])
def test_hostile_series_descriptions_stay_inside_the_export(tmp_path, kind):
    study = _study(tmp_path, HOSTILE)
    out = tmp_path / "out" / "layout"
    out.mkdir(parents=True)
    report = ExportReport()
    kind().build([study], out, report)
    assert report.done == len(HOSTILE) and len(report.files) == len(HOSTILE)
    everything = [p for p in (tmp_path / "out").rglob("*")]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in everything)
    assert len(set(report.files)) == len(HOSTILE) and all(p.is_file() for p in report.files)
    for path in report.files:
        rel = path.relative_to(out)
        assert all(part not in ("..", ".", "") and len(part) <= 80 for part in rel.parts), rel
    if kind is PureExport:
        assert {p.relative_to(out).parts[:3] for p in report.files} == \
            {("PROJ", "P0001", "2026_unknown_etc")}
        assert {p.parent.name for p in report.files} >= {"0007_T1_MPRAGE_sag_æøå",
                                                         "unknown_etc_passwd", "0001_abs_path"}


def test_spectroscopy_takes_only_siemens_spectroscopy_objects_in_the_pure_layout(tmp_path):
    study = _study(tmp_path, ["svs_se_30", "t1_mprage"])
    study.series[0].sop_classes = {SIEMENS_SPECTROSCOPY}
    study.series[1].sop_classes = {"1.2.840.10008.5.1.4.1.1.4"}
    out = tmp_path / "out"
    out.mkdir()
    report = ExportReport()
    SpectroscopyExport().build([study], out, report)
    assert [p.relative_to(out).parts[:4] for p in report.files] == \
        [("PROJ", "P0001", "2026_unknown_etc", "unknown_svs_se_30")]


def test_profiles_are_data_with_site_overrides(tmp_path):
    default = load_profile("default", tmp_path)
    assert default.drop == {"SR", "PR"} and not default.patient
    own = tmp_path / "config" / "profiles" / "export"
    own.mkdir(parents=True)
    (own / "default.json").write_text('{"set": {"PatientIdentityRemoved": "YES"}, '
                                      '"clear": ["StudyDescription"], "drop": [], '
                                      '"patient": ["sex", "age"]}')
    profile = load_profile("default", tmp_path)
    made = make_study(tmp_path / "s", n_series=1, images_per_series=1, rows=4, cols=4)
    ds = pydicom.dcmread(made["files"][0])
    person = Characteristics.of(ds)
    assert person == Characteristics("F", "1980", "046Y")
    profile.apply(ds, person)
    assert (ds.PatientSex, ds.PatientAge, ds.StudyDescription) == ("F", "046Y", None)
    assert "PatientBirthDate" not in ds and profile.dropped(ds) == ""
    with pytest.raises(ProfileError, match="known: default"):
        load_profile("nope", tmp_path)
    with pytest.raises(ProfileError, match="unknown DICOM keyword 'NoSuchTag'"):
        parse("x", {"clear": ["NoSuchTag"]}, "x.json")
    with pytest.raises(ProfileError, match="may list sex, birth_year, age"):
        parse("x", {"patient": ["name"]}, "x.json")


# --- packing ------------------------------------------------------------------------------------
def _layout(tmp: Path) -> Path:
    layout = tmp / "layout"
    (layout / "P0001" / "baseline").mkdir(parents=True)
    (layout / "P0001" / "baseline" / "a.dcm").write_bytes(b"DICM" * 1000)
    (layout / "P0001" / "b.dcm").write_bytes(bytes(range(256)) * 40)
    return layout


ABOUT = About("dicom export of project PROJ", "tester", "2026-11-29T12:00:00+00:00", "dicom",
              "default", "PROJ", ("P0001",), ("baseline",))


def test_plain_zip_opens_with_unzip_and_checks_out(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    target = pack(_layout(tmp_path), ABOUT, work, tmp_path / "out" / "e.zip")
    assert target.exists() and not list(work.iterdir())
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]
    extracted = unzip(target, tmp_path / "x")
    readme = (extracted / README).read_text()
    for text in ("For: tester", "Type: dicom", "Profile: default", "Participants: P0001",
                 "Events: baseline", "Review page"):
        assert text in readme
    check_manifest(target, extracted)


def test_aes_zip_opens_with_7zip_and_the_password_only(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    steps: list[tuple[int, int]] = []
    target = pack(_layout(tmp_path), ABOUT, work, tmp_path / "e.zip", b"s3cret pass",
                  lambda d, t: steps.append((d, t)))
    assert steps[-1] == (2, 2)
    with zipfile.ZipFile(target) as zf:  # every member is encrypted (AES: method 99)
        assert all(i.flag_bits & 1 and i.compress_type == 99 for i in zf.infolist())
    bad = subprocess.run(["7z", "x", "-pwrong", f"-o{tmp_path / 'bad'}", str(target)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    good = subprocess.run(["7z", "x", "-ps3cret pass", f"-o{tmp_path / 'good'}", str(target)],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    check_manifest(target, tmp_path / "good")
    assert b"s3cret" not in target.read_bytes()


# --- the research PACS (C-GET) ------------------------------------------------------------------
PROJECT_ARGS = ("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events",
                "baseline,followup")


@pytest.mark.e2e
def test_export_from_the_research_pacs_by_c_get(tmp_path):
    extra = {"DicomModalities": {"fiona": ["FIONA", "127.0.0.1", free_port()]}}
    with Orthanc(tmp_path, extra=extra) as pacs:
        gw = Gateway(tmp_path / "data", free_port(), {"DESTINATIONS": {"research": {
            "type": "dicom", "aetitle": pacs.aet, "host": "127.0.0.1",
            "port": pacs.dicom_port}}})
        gw.run(*PROJECT_ARGS)
        config = load(str(gw.config))
        site = config.site()
        control = open_control_plane(config, site)
        made = make_study(tmp_path / "s", n_series=2, images_per_series=3, rows=8, cols=8)
        project = control.project("PROJ")
        pipeline = Pipeline(settings_for(project, "P0001", "followup",
                                         read_secret(gw.datadir / "config" / "secret.key"),
                                         gw.datadir))
        out = tmp_path / "deid"
        out.mkdir()
        for f in made["files"]:
            result = pipeline.process(read(f))
            (out / f"{result.sop_uid}.dcm").write_bytes(result.encoded)
        sent = DicomDestination("research", {"aetitle": pacs.aet, "host": "127.0.0.1",
                                             "port": pacs.dicom_port}).send(
            sorted(out.iterdir()))
        assert sent.complete
        # the original series' labels, as the indexer records them under raw/
        raw = gw.tree.study_raw(made["study"])
        raw.mkdir(parents=True)
        for uid, label in zip(made["series"], (["T1", "3D"], ["DWI"]), strict=True):
            (raw / f"{uid}.json").write_text(f'{{"ClassifyType": {label!r}}}'.replace("'", '"'))
        control.add_participant("PROJ", "P0001")
        req = control.add_request(TransferRequest(made["study"], "PROJ", "P0001", "followup",
                                                  now_iso()))
        req.mapped_uid, req.complete = pipeline.mapped_uid(made["study"]), True
        req.done_revision = req.revision
        control.update_request(req)

        studies, _ = retrieve(config, control, gw.tree, read_secret(gw.datadir / "config" /
                                                                    "secret.key"),
                              "PROJ", "P0001", None, None, load_profile("default", gw.datadir),
                              tmp_path / "objs")
        assert [s.labels for s in studies[0].series] == [["T1", "3D"], ["DWI"]]
        assert studies[0].uid == req.mapped_uid and studies[0].event == "followup"

        steps: list[tuple[str, int, int]] = []
        result = job.run(config, site, control, job.ExportRequest("PROJ", "dicom", "tester"),
                         lambda *step: steps.append(step))
        assert ("retrieving", 6, 0) in steps and steps[-1] == ("packing", 6, 6)
        assert stat.S_IMODE(result.zip.stat().st_mode) == 0o640
        extracted = unzip(result.zip, tmp_path / "x")
        check_manifest(result.zip, extracted)
        got = sorted(p.relative_to(extracted).as_posix()
                     for p in extracted.rglob("*.dcm"))
        want = sorted(f"P0001/followup/{pydicom.dcmread(f).SeriesNumber}_"
                      f"{clean(pydicom.dcmread(f).get('SeriesDescription', ''))}/{f.name}"
                      for f in out.iterdir())
        assert got == want
        for path in extracted.rglob("*.dcm"):
            assert pydicom.dcmread(path).PixelData == pydicom.dcmread(out / path.name).PixelData
        assert not list((gw.datadir / "site" / "exports" / "tmp").iterdir())

        # a study only the inventory knows (delivered by another FIONA): exported too
        other = make_study(tmp_path / "o", n_series=1, images_per_series=2, rows=8, cols=8)
        elsewhere = Pipeline(settings_for(project, "P0002", "baseline", b"x" * 32, gw.datadir))
        files = []
        for f in other["files"]:
            result = elsewhere.process(read(f))
            files.append(tmp_path / "deid" / f"{result.sop_uid}.dcm")
            files[-1].write_bytes(result.encoded)
        assert DicomDestination("research", {"aetitle": pacs.aet, "host": "127.0.0.1",
                                             "port": pacs.dicom_port}).send(files).complete
        control.add_participant("PROJ", "P0002")
        control.replace_inventory("PROJ", [InventoryEntry(
            elsewhere.mapped_uid(other["study"]), "PROJ", "P0002", "baseline")])
        result = job.run(config, site, control, job.ExportRequest("PROJ", "pure", "tester",
                                                                  participant="P0002"))
        with zipfile.ZipFile(result.zip) as zf:
            names = [n for n in zf.namelist() if n.endswith(".dcm")]
        assert sorted(Path(n).name for n in names) == sorted(f.name for f in files)
        assert all(n.startswith("PROJ/P0002/") and "_baseline/" in n for n in names)
    # the PACS is down: a clear "unavailable" error, no zip
    before = sorted((gw.datadir / "site" / "exports").glob("*.zip"))
    with pytest.raises(ExportUnavailable, match="unavailable"):
        job.run(config, site, control, job.ExportRequest("PROJ", "dicom", "tester"))
    assert sorted((gw.datadir / "site" / "exports").glob("*.zip")) == before


# --- a folder destination, end to end, through `fiona export` -----------------------------------
DAEMONS = ("storescp", "process-single-file", "detect-study-arrival", "anonymize-and-send")
KEPT_OUT = {"PatientSex", "PatientBirthDate", "PatientAge"}  # the default profile removes them


def _elements(ds: pydicom.Dataset) -> dict:
    return {e.tag: e.value for e in ds if e.keyword not in KEPT_OUT}


@pytest.mark.e2e
def test_folder_destination_assign_forward_export_and_noassign(tmp_path):
    research = tmp_path / "research"
    research.mkdir()
    gw = Gateway(tmp_path / "data", free_port(), {
        "STUDY_QUIET_SECONDS": 2,
        "DESTINATIONS": {"research": {"type": "folder", "path": str(research)}}})
    gw.run(*PROJECT_ARGS)
    for daemon in DAEMONS:
        gw.start(daemon)
    sent = make_study(tmp_path / "s", n_series=2, images_per_series=3, rows=8, cols=8,
                      patient_id="NID0101", patient_name="Hansen^Ingrid", accession="E2E1")
    waiting = make_study(tmp_path / "w", n_series=1, images_per_series=2, rows=8, cols=8,
                         patient_id="NID0101", patient_name="Hansen^Ingrid", accession="E2E2")
    (tmp_path / "c.csv").write_text("E2E1,PROJ,P0001,followup\n")
    gw.run("coupling", "upload", str(tmp_path / "c.csv"))
    assert gw.storescu(tmp_path / "s").returncode == 0
    assert gw.storescu(tmp_path / "w").returncode == 0
    control = open_control_plane(load(str(gw.config)))

    def done():
        reqs = control.requests(sent["study"])
        return reqs[0] if reqs and reqs[0].complete else None
    req = wait_for(done, 180, "the request to complete")
    wait_for(lambda: control.study(waiting["study"]), 120, "the unassigned study")
    delivered = sorted((research / req.mapped_uid).glob("*/*.dcm"))
    assert len(delivered) == 6

    # an inventory of some research PACS does not concern a folder destination
    control.replace_inventory("PROJ", [InventoryEntry("1.2.3.4", "PROJ", "P0001", "followup")])

    # dicom layout, plain zip, file by file
    out = tmp_path / "exports"
    zip_path = Path(gw.run("export", "--project", "PROJ", "--type", "dicom", "--out",
                           str(out)).stdout.strip())
    assert zip_path.parent == out and zip_path.suffix == ".zip"
    extracted = unzip(zip_path, tmp_path / "x-dicom")
    check_manifest(zip_path, extracted)
    want = {}
    for f in delivered:
        ds = pydicom.dcmread(f)
        desc = clean(ds.get("SeriesDescription", ""))
        want[f"P0001/followup/{ds.SeriesNumber}_{desc}/{f.name}"] = ds
    got = {p.relative_to(extracted).as_posix(): p for p in extracted.rglob("*.dcm")}
    assert sorted(got) == sorted(want)
    for name, path in got.items():
        exported = pydicom.dcmread(path)
        assert _elements(exported) == _elements(want[name])
        assert not KEPT_OUT & {e.keyword for e in exported}

    # pure layout, AES zip with the password from standard input
    res = subprocess.run(gw.command("export", "--project", "PROJ", "--participant", "P0001",
                                    "--event", "followup", "--type", "pure",
                                    "--password-file", "-", "--out", str(out)),
                         input="pure secret\n", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    pure_zip = Path(res.stdout.strip())
    opened = subprocess.run(["7z", "x", "-ppure secret", f"-o{tmp_path / 'x-pure'}",
                             str(pure_zip)], capture_output=True, text=True, timeout=300)
    assert opened.returncode == 0, opened.stdout
    check_manifest(pure_zip, tmp_path / "x-pure")
    pure = {p.relative_to(tmp_path / "x-pure").as_posix()
            for p in (tmp_path / "x-pure").rglob("*.dcm")}
    assert pure == {f"PROJ/P0001/{clean(ds.StudyDate)}_{clean(ds.StudyTime)}_followup/"
                    f"{ds.SeriesNumber:04d}_{clean(ds.get('SeriesDescription', ''))}/"
                    f"{ds.SOPInstanceUID}.dcm"
                    for ds in want.values()}

    # the original series' labels (from the indexer, through the keyed UID mapping) reach
    # the types that need them: BIDS names the T1 and T2 series by their classification
    bids = Path(gw.run("export", "--project", "PROJ", "--type", "bids", "--out",
                       str(out)).stdout.strip())
    with zipfile.ZipFile(bids) as zf:
        images = sorted(n.rsplit("/", 1)[-1] for n in zf.namelist() if n.endswith(".nii.gz"))
    assert images == ["sub-P0001_ses-followup_T1w.nii.gz", "sub-P0001_ses-followup_T2w.nii.gz"]

    # unknown names: a clear error naming what exists
    bad = gw.run("export", "--project", "PROJ", "--participant", "P9999", "--type", "dicom",
                 check=False)
    assert bad.returncode == 1 and "P9999" in bad.stderr and "P0001" in bad.stderr
    bad = gw.run("export", "--project", "NOPE", "--type", "dicom", check=False)
    assert bad.returncode == 1 and "known: PROJ" in bad.stderr
    bad = gw.run("export", "--project", "PROJ", "--event", "week9", "--type", "dicom",
                 check=False)
    assert bad.returncode == 1 and "baseline, followup" in bad.stderr
    bad = gw.run("export", "--project", "PROJ", "--type", "tiff", check=False)
    assert bad.returncode == 1 and "dicom" in bad.stderr and "pure" in bad.stderr

    # NoAssign: the waiting study, de-identified at export, without any identifier
    zip_path = Path(gw.run("export", "--project", "PROJ", "--noassign", "--study",
                           waiting["study"], "--participant", "P0002", "--event", "baseline",
                           "--type", "dicom", "--out", str(out)).stdout.strip())
    extracted = unzip(zip_path, tmp_path / "x-noassign")
    files = sorted(extracted.rglob("*.dcm"))
    assert len(files) == 2
    originals = {str(pydicom.dcmread(f).SOPInstanceUID) for f in waiting["files"]}
    ids = Identifiers.from_dataset(pydicom.dcmread(waiting["files"][0]))
    allowed = Pipeline(settings_for(control.project("PROJ"), "P0002", "baseline",
                                    read_secret(gw.datadir / "config" / "secret.key"),
                                    gw.datadir)).allowed
    for path in files:
        data = path.read_bytes()
        check(pydicom.dcmread(path), data, ids, allowed)  # the verification gate's checks
        for text in (*IDENTIFIERS, waiting["study"], *waiting["series"], *originals):
            assert text.encode() not in data, text
        ds = pydicom.dcmread(path)
        assert (ds.PatientID, ds.PatientIdentityRemoved) == ("P0002", "YES")
        assert ds.StudyInstanceUID != waiting["study"]
        assert path.relative_to(extracted).parts[:2] == ("P0002", "baseline")
    assert not control.requests(waiting["study"])  # no transfer request was made
    bids = Path(gw.run("export", "--project", "PROJ", "--noassign", "--study",
                       waiting["study"], "--participant", "P0002", "--event", "baseline",
                       "--type", "bids", "--out", str(out)).stdout.strip())
    with zipfile.ZipFile(bids) as zf:  # the labels of the original series, as for the others
        assert "sub-P0002/ses-baseline/anat/sub-P0002_ses-baseline_T1w.nii.gz" in zf.namelist()

    # audited, the password nowhere
    audit = (gw.datadir / "logs" / "audit.log").read_text()
    assert audit.count('"action":"export"') == 3 and audit.count('"export-noassign"') == 2
    assert all('"user":"os:' in line for line in audit.splitlines() if '"export' in line)
    assert gw.run("audit", "verify").returncode == 0
    for path in gw.datadir.rglob("*"):
        if path.is_file():
            assert b"pure secret" not in path.read_bytes(), path
    assert not list((gw.datadir / "site" / "exports" / "tmp").iterdir())
