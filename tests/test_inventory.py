"""`fiona inventory` (issue 13, the research-PACS inventory): a real Orthanc with a small
`LimitFindResults` holds de-identified studies of two projects, more than the limit, so the
PatientID splitting runs (digits and letters, two levels deep; a study with more series than
the limit falls back to the study-level counts); every study is found exactly once, a study
Orthanc loses leaves the inventory, Orthanc down keeps the stored inventory and exits 1. The
storage part runs on both control-plane backends (SQLite and the REDCap emulator)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest

from dicomgen import make_study
from fiona.bootstrap import init
from fiona.cli import main
from fiona.clock import FakeClock
from fiona.control.base import ControlPlane, ControlPlaneError, InventoryEntry
from fiona.control.local import LocalControlPlane
from fiona.control.redcap import INVENTORY, RedcapControlPlane
from fiona.deid.engine import Deidentifier, Settings, load_profile, with_profile
from fiona.deid.identifiers import Identifiers
from fiona.ops.inventory import ALPHABET, Inventory, InventoryError, Pattern, ResearchPacs
from fiona.send.destinations import DicomDestination
from helpers import Gateway, free_port
from orthanc import Orthanc
from redcap_emulator import RedcapEmulator

KEY = b"k" * 32
LIMIT = 3
TOKENS = {"Incoming": "A" * 32, "Routing": "B" * 32, "CouplingList": "C" * 32,
          "AutoID": "D" * 32, "DataTransferProjects": "E" * 32, INVENTORY: "F" * 32}


@dataclass(frozen=True)
class Made:
    """A de-identified study as the PACS should list it."""

    uid: str
    project: str
    participant: str
    event: str
    date: str
    series: int
    instances: int
    files: tuple[Path, ...]

    def expected(self) -> tuple:
        return (self.uid, self.project, self.participant, self.event, self.date, self.series,
                self.instances, ("MR",))


def _studies() -> list[tuple[str, str, str, int, int]]:
    """(project, participant, event, series, images per series): 16 studies of A, with four
    PatientIDs ending in 0 and one study of 4 series (more than LIMIT), and 6 of B whose
    PatientIDs end in letters, four of them in `a`."""
    out = []
    for i in range(1, 7):
        for event in ("baseline", "followup"):
            series = 4 if (i, event) == (5, "followup") else 1 + i % 2
            out.append(("A", f"A00{i}", event, series, 1 + i % 3))
    out += [("A", f"A0{i}0", "baseline", 1, 2) for i in range(1, 5)]
    out += [("B", pid, "baseline", 1, 1) for pid in ("B01a", "B02a", "B03a", "B04a", "B05b",
                                                     "B06C")]
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> list[Made]:
    """The de-identified studies, written once for the module."""
    tmp = tmp_path_factory.mktemp("inventory-studies")
    out = []
    for seed, (project, participant, event, n_series, images) in enumerate(_studies(), 1):
        src = make_study(tmp / f"src{seed}", n_series=n_series, images_per_series=images,
                         rows=8, cols=8, seed=seed, patient_id=f"PAT{seed}",
                         accession=f"ACC{seed}")
        engine = Deidentifier(with_profile(Settings(project=project, participant=participant,
                                                    event=event, key=KEY),
                                           load_profile("default")))
        files = []
        for f in src["files"]:
            ds = pydicom.dcmread(f)
            engine.apply(ds, Identifiers.from_dataset(ds))
            files.append(tmp / f"deid{seed}-{f.name}")
            ds.save_as(files[-1], enforce_file_format=True)
        ds = pydicom.dcmread(files[0])
        date = f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}"
        out.append(Made(str(ds.StudyInstanceUID), project, participant, event, date, n_series,
                        n_series * images, tuple(files)))
    return out


def filled_pacs(tmp_path: Path, made: list[Made]) -> Orthanc:
    pacs = Orthanc(tmp_path, extra={"LimitFindResults": LIMIT}).start()
    files = [f for m in made for f in m.files]
    result = DicomDestination("research", {"aetitle": pacs.aet, "host": "127.0.0.1",
                                           "port": pacs.dicom_port}).send(files)
    assert result.complete and result.sent == len(files), result.failed
    return pacs


@pytest.fixture
def pacs(tmp_path: Path, made: list[Made]):
    pacs = filled_pacs(tmp_path, made)
    yield pacs
    pacs.stop(kill=True)


@pytest.fixture
def emu():
    emulator = RedcapEmulator()
    emulator.add_from_manifest(TOKENS)
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture(params=["local", "redcap"])
def control(request, tmp_path: Path) -> ControlPlane:
    if request.param == "local":
        return LocalControlPlane(tmp_path / "fiona.db")
    emulator = request.getfixturevalue("emu")
    return RedcapControlPlane(emulator.url, dict(TOKENS), timeout=10)


def research(pacs: Orthanc, limit: int | None = None) -> ResearchPacs:
    return ResearchPacs("research", {"type": "dicom", "aetitle": pacs.aet, "host": "127.0.0.1",
                                     "port": pacs.dicom_port}, limit)


def stored(control: ControlPlane, project: str | None = None) -> set[tuple]:
    return {(e.study_uid, e.project, e.participant, e.event, e.study_date, e.series,
             e.instances, tuple(e.modalities)) for e in control.inventory(project)}


def delete_study(pacs: Orthanc, uid: str) -> None:
    found = pacs.post("/tools/lookup", uid.encode())
    study = next(f["ID"] for f in found if f["Type"] == "Study")
    req = urllib.request.Request(f"{pacs.http}/studies/{study}", method="DELETE")
    with urllib.request.urlopen(req, timeout=30):
        pass


# --- the splitting rule, without a PACS -------------------------------------------------------
def test_a_split_covers_every_id_with_the_suffix_once() -> None:
    ids = ["A001", "A010", "x0", "0", "B-1a", "b:Z", "P 10", "Ké0", "00", "~0"]
    for suffix in ("", "0", "10"):
        pattern = Pattern(suffix)
        parts = pattern.split({pattern.next_char(i) or "" for i in ids} - {""})
        for pid in ids:
            if not pid.endswith(suffix):
                continue
            matching = [p for p in parts if (pid == p.suffix if p.exact
                                             else pid.endswith(p.suffix))]
            assert len(matching) == 1, (suffix, pid, matching)
    assert Pattern("0").split(set())[-1] == Pattern("0", exact=True)
    assert not set("*?\\%_") & set(ALPHABET) and set("0aZ-:~") <= set(ALPHABET)
    with pytest.raises(InventoryError, match="PatientIDs with '_'"):
        Pattern("01").split({"_", "A"})  # SITE_01 in a cut-off answer: cannot ask for it
    with pytest.raises(InventoryError, match="one PatientID has more studies"):
        Pattern("A001", exact=True).split(set())


def test_without_a_dicom_destination_it_is_a_configuration_error(tmp_path, capsys) -> None:
    config = init(tmp_path / "data", port=free_port(), ip="127.0.0.1")  # a folder destination
    assert main(["--config", str(config), "inventory"]) == 2
    err = capsys.readouterr().err
    assert "DESTINATIONS has no dicom destination to take an inventory of (dicom ones: none)" \
        in err
    assert main(["--config", str(config), "inventory", "--destination", "research"]) == 2
    assert "no dicom destination 'research'" in capsys.readouterr().err


# --- storage on both backends -------------------------------------------------------------------
def entry(uid: str, project: str, participant: str = "P1") -> InventoryEntry:
    return InventoryEntry(study_uid=uid, project=project, participant=participant,
                          event="baseline", study_date="2020-01-02", series=2, instances=7,
                          modalities=["CT", "MR"], first_seen="2026-01-01 12:00:00",
                          last_seen="2026-01-02 12:00:00")


def test_storage_round_trip_and_scoped_replacement(control: ControlPlane) -> None:
    a1, a2, b1 = entry("1.2.1", "A"), entry("1.2.2", "A", "P2"), entry("1.2.3", "B")
    control.replace_inventory(None, [a1, a2, b1])
    assert control.inventory() == [a1, a2, b1]
    assert control.inventory("A") == [a1, a2]
    changed = replace(a2, series=3, instances=9, modalities=["MR"], event="")
    control.replace_inventory("A", [changed])  # a1 gone from A; B untouched
    assert control.inventory() == [changed, b1]
    with pytest.raises(ControlPlaneError, match="cannot hold studies of 'B'"):
        control.replace_inventory("A", [b1])
    with pytest.raises(ControlPlaneError, match="each study once"):
        control.replace_inventory(None, [b1, b1])
    assert control.inventory() == [changed, b1]
    control.replace_inventory(None, [])
    assert control.inventory() == []


def test_redcap_without_the_inventory_token_says_which(emu) -> None:
    cp = RedcapControlPlane(emu.url, {k: v for k, v in TOKENS.items() if k != INVENTORY})
    with pytest.raises(ControlPlaneError, match=f"{INVENTORY}.*tokens.json"):
        cp.inventory()


# --- against Orthanc ----------------------------------------------------------------------------
@pytest.mark.e2e
def test_splits_cut_off_answers_until_every_study_is_found_once(control, pacs, made) -> None:
    clock = FakeClock()
    report = Inventory(research(pacs), control, clock).run()
    assert stored(control) == {m.expected() for m in made}
    assert report.studies == len(made) == 22 and report.new == 22 and report.gone == 0
    # the whole query, `*0` (A010...A040), `*a` (B01a...B04a) and, as Orthanc preselects
    # case-insensitively, `*A`: each cut off and split again
    assert report.splits >= 3
    assert next(e for e in control.inventory("A") if e.series == 4).instances == 4 * 3
    for e in control.inventory():
        assert e.first_seen == e.last_seen == "2026-01-01 12:00:00"

    # one project at a time: the other's entries stay
    for project in ("A", "B"):
        clock.advance(60)
        report = Inventory(research(pacs), control, clock).run(project)
        assert report.splits >= 2 and report.new == report.gone == 0
        assert stored(control, project) == {m.expected() for m in made if m.project == project}
    assert stored(control) == {m.expected() for m in made}


@pytest.mark.e2e
def test_a_lost_study_leaves_the_inventory(control, pacs, made) -> None:
    clock = FakeClock()
    Inventory(research(pacs), control, clock).run()
    first = {e.study_uid: e.first_seen for e in control.inventory()}
    lost = next(m for m in made if m.participant == "A020")
    delete_study(pacs, lost.uid)
    clock.advance(3600)
    report = Inventory(research(pacs), control, clock).run()
    assert (report.studies, report.new, report.gone) == (21, 0, 1)
    assert stored(control) == {m.expected() for m in made if m is not lost}
    for e in control.inventory():
        assert e.first_seen == first[e.study_uid] and e.last_seen == "2026-01-01 13:00:00"


@pytest.mark.e2e
def test_a_pacs_that_cannot_be_split_keeps_the_stored_inventory(pacs, made, tmp_path) -> None:
    """`--limit 2`: A001's two studies are a cut-off answer even for the exact PatientID."""
    control = LocalControlPlane(tmp_path / "fiona.db")
    Inventory(research(pacs), control).run()
    before = control.inventory()
    with pytest.raises(InventoryError, match="one PatientID has more studies"):
        Inventory(research(pacs, limit=2), control).run("A")
    assert control.inventory() == before


@pytest.mark.e2e
def test_the_command_logs_counts_and_keeps_the_inventory_while_the_pacs_is_down(
        tmp_path, made) -> None:
    pacs = filled_pacs(tmp_path, made)
    try:
        gw = Gateway(tmp_path / "data", free_port(), {"DESTINATIONS": {
            "research": {"type": "dicom", "aetitle": pacs.aet, "host": "127.0.0.1",
                         "port": pacs.dicom_port}}})
        ok = gw.run("-v", "inventory")  # debug logging, pynetdicom's too
        assert "22 studies (22 new, 0 gone)" in ok.stdout
        control = LocalControlPlane(tmp_path / "data" / "site" / "fiona.db")
        before = control.inventory()
        assert len(before) == 22
        assert gw.run("inventory", "--project", "NOPE", check=False).returncode == 1
    finally:
        pacs.stop(kill=True)
    down = gw.run("inventory", check=False)
    assert down.returncode == 1, down.stdout + down.stderr
    assert "cannot be reached" in down.stderr and "stored inventory is kept" in down.stderr
    assert control.inventory() == before

    log = (tmp_path / "data" / "logs" / "inventory.log").read_text()
    lines = [x for x in log.splitlines() if "[fiona.inventory]" in x]
    assert len([x for x in lines if "INFO" in x and "22 studies" in x]) == 1
    assert len([x for x in lines if "ERROR" in x and "cannot be reached" in x]) == 1
    assert "DEBUG" in log
    for m in made:  # no pseudonym (PatientID) in the log, not even at debug level
        assert m.participant not in log
