"""The REDCap data dictionaries and the REDCap API emulator the redcap backend is tested against.

The emulator is only useful if it answers like REDCap; these tests pin the REDCap behaviour
FIONA relies on (flat rows with repeat instances, `field___code` checkboxes, filterLogic and
dateRangeBegin filtering, error answers, connection refused while down) by driving it over
HTTP exactly as a client would.
"""

from __future__ import annotations

import csv
import json
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from urllib.parse import urlencode

import pytest

from redcap_emulator import DICTIONARIES_DIR, Dictionary, RedcapEmulator

HEADER_LINE = (
    '"Variable / Field Name","Form Name","Section Header","Field Type","Field Label",'
    '"Choices, Calculations, OR Slider Labels","Field Note",'
    '"Text Validation Type OR Show Slider Number","Text Validation Min","Text Validation Max",'
    'Identifier?,"Branching Logic (Show field only if...)","Required Field?","Custom Alignment",'
    '"Question Number (surveys only)","Matrix Group Name","Matrix Ranking?","Field Annotation"'
)

# SPEC §6 (plus the fields FIONA adds): dictionary -> (record id, {form: fields}).
# `<form>_complete` fields are REDCap's own and must not be in the CSV.
SCHEMA: dict[str, tuple[str, dict[str, list[str]]]] = {
    "Incoming": ("study_instance_uid", {
        "incoming_studies": [
            "study_institution_name", "study_aetitle_sender", "study_aetitle_addressed",
            "study_patient_name", "study_patient_id", "study_description", "study_date",
            "study_time", "study_accession_number", "study_arrival_date", "study_removed_date"],
        "series": [
            "series_instance_uid", "series_description", "series_date", "series_time",
            "series_num_files", "series_sequence_name", "series_classify_types",
            "series_modality"],
        "transfers": [
            "transfer_requested_date", "transfer_project_name", "transfer_name",
            "transfer_event_name", "transfer_source", "transfer_date", "transfer_error",
            "transfer_mapped_uid", "transfer_error_message", "transfer_active_proc_time"],
    }),
    "Routing": ("record_id", {"routing": [
        "routing_active", "routing_dest_project", "routing_incoming_aetitle",
        "routing_sending_aetitle", "routing_allowed_patientid", "routing_allowed_patientname",
        "routing_event_name"]}),
    "CouplingList": ("record_id", {"coupling_list": [
        "cl_accessionnumber", "cl_studyinstanceuid", "cl_projectname", "cl_subjectid",
        "cl_eventname", "cl_date"]}),
    "AutoID": ("record_id", {"autoid": [
        "autoid_project_name", "autoid_hash", "autoid_value", "autoid_method"]}),
    "DataTransferProjects": ("record_id", {
        "project": [
            "project_name", "project_type", "project_contact", "project_contact_email",
            "project_patient_naming", "project_events", "project_rec_number",
            "project_rec_start_date", "project_rec_end_date", "project_end_type",
            "project_token", "project_active", "project_use_autoid", "project_autoid_aetitle",
            "project_import_rule_1_tag", "project_import_rule_1_regexp", "project_features",
            "project_deid_profile"],
        "rewritepixelexclusions": ["rewrite_ex_tag", "rewrite_ex_reg"],
    }),
    "WhatIsInIDS7": ("record_id", {"whatisinids7": [
        "inv_project", "inv_participant", "inv_event", "inv_study_date", "inv_series",
        "inv_instances", "inv_modalities", "inv_first_seen", "inv_last_seen"]}),
    "Applications": ("record_id", {"application": [
        "app_kind", "app_applicant", "app_email", "app_created", "app_project", "app_right",
        "app_long_name", "app_pi", "app_pi_email", "app_naming", "app_example", "app_events",
        "app_ethics_number", "app_rec_start", "app_rec_end", "app_end_action", "app_reason",
        "app_state", "app_decided_by", "app_decided", "app_decision_note"]}),
    "ResearchProjectTemplate": ("record_id", {
        "demographics": ["first_name", "last_name", "dob", "sex", "age"],
        "imaging": ["img_study_instance_uid", "img_event_name", "img_study_description"],
    }),
}

TOKENS = {"Incoming": "T" * 32, "Routing": "R" * 32, "CouplingList": "C" * 32,
          "AutoID": "A" * 32, "DataTransferProjects": "D" * 32, "ABCD": "P" * 32}
T0 = datetime(2024, 5, 1, 12, 0, 0)


class Clock:
    """A server clock the test moves by hand, so dateRange tests need no sleeping."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def emulator(clock: Clock):
    emu = RedcapEmulator(clock=clock)
    emu.add_from_manifest(TOKENS)
    emu.start()
    yield emu
    emu.stop()


def call(url: str, token: str, raw: bool = False, **params: object) -> tuple[int, object]:
    """POST one API request as PyCap does (arrays as `name[i]`); returns (status, answer)."""
    fields: list[tuple[str, str]] = [("token", token), ("format", "json"),
                                     ("returnFormat", "json")]
    for key, value in params.items():
        if key == "data":
            fields.append((key, json.dumps(value)))
        elif isinstance(value, (list, tuple)):
            fields += [(f"{key}[{i}]", str(v)) for i, v in enumerate(value)]
        else:
            fields.append((key, str(value)))
    request = urllib.request.Request(url, data=urlencode(fields).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    return status, (body if raw else json.loads(body))


def ok(url: str, token: str, raw: bool = False, **params: object) -> object:
    status, answer = call(url, token, raw=raw, **params)
    assert status == 200, answer
    return answer


def incoming_rows(uid: str, accession: str = "A1", project: str = "ABCD",
                  error_codes: tuple[str, ...] = ()) -> list[dict]:
    """A study with two series and one transfer request, as FIONA writes it."""
    transfer = {"study_instance_uid": uid, "redcap_repeat_instrument": "transfers",
                "redcap_repeat_instance": 1, "transfer_requested_date": "2024-05-01 12:00:00",
                "transfer_project_name": project, "transfer_name": "P001",
                "transfer_event_name": "baseline", "transfer_active_proc_time": "1.5"}
    for code in error_codes:
        transfer[f"transfer_error___{code}"] = "1"
    return [
        {"study_instance_uid": uid, "redcap_repeat_instrument": "", "redcap_repeat_instance": "",
         "study_description": f"Brain {uid}", "study_accession_number": accession,
         "study_patient_id": "9f86d081884c7d65", "study_date": "20240501"},
        {"study_instance_uid": uid, "redcap_repeat_instrument": "series",
         "redcap_repeat_instance": 1, "series_instance_uid": f"{uid}.1",
         "series_description": "T1", "series_num_files": "176"},
        {"study_instance_uid": uid, "redcap_repeat_instrument": "series",
         "redcap_repeat_instance": "2", "series_instance_uid": f"{uid}.2",
         "series_description": "T2", "series_num_files": 40},
        transfer,
    ]


def export_ids(url: str, token: str, **params: object) -> list[str]:
    """Incoming records an export returns, in order."""
    rows = ok(url, token, content="record", action="export", type="flat", **params)
    return list(dict.fromkeys(row["study_instance_uid"] for row in rows))


def export_ids_of(rows: object) -> list[str]:
    """Research-project records in an export answer, in order."""
    assert isinstance(rows, list)
    return list(dict.fromkeys(row["record_id"] for row in rows))


# --- data dictionaries -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMA))
def test_dictionary_follows_schema(name: str) -> None:
    path = DICTIONARIES_DIR / f"{name}.csv"
    assert path.read_text().splitlines()[0] == HEADER_LINE
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    record_id, forms = SCHEMA[name]
    assert rows[0]["Variable / Field Name"] == record_id
    assert rows[0]["Form Name"] == next(iter(forms))
    listed = {row["Variable / Field Name"]: row["Form Name"] for row in rows}
    for form, fields in forms.items():
        for field in fields:
            assert listed.get(field) == form, f"{name}: {field} missing or not on {form}"
    assert not [f for f in listed if f.endswith("_complete")]
    Dictionary(path)  # parses as the emulator (and REDCap) would


def test_dictionary_details() -> None:
    incoming = Dictionary(DICTIONARIES_DIR / "Incoming.csv").by_name
    assert incoming["transfer_error"].type == "checkbox"
    assert incoming["transfer_error"].codes == ("1", "2", "3")
    assert incoming["series_num_files"].validation == "integer"
    assert incoming["transfer_active_proc_time"].validation == "number"
    assert incoming["transfer_error_message"].type == "notes"
    for hashed in ("study_patient_name", "study_patient_id"):
        assert "HMAC-SHA256" in incoming[hashed].metadata["field_note"]
    projects = Dictionary(DICTIONARIES_DIR / "DataTransferProjects.csv").by_name
    assert projects["project_features"].codes == ("0", "1", "2")
    assert projects["project_active"].type == "yesno"
    assert projects["project_rec_start_date"].validation == "date_ymd"
    assert "tokens.json" in projects["project_token"].metadata["field_note"]


def test_manifest_matches_dictionaries() -> None:
    manifest = json.loads((DICTIONARIES_DIR / "projects.json").read_text())
    assert set(manifest) == set(SCHEMA)
    for name, settings in manifest.items():
        assert settings["dictionary"] == f"{name}.csv"
        assert set(settings["repeating"]) <= set(SCHEMA[name][1])
    assert manifest["Incoming"]["repeating"] == ["series", "transfers"]
    assert manifest["ResearchProjectTemplate"]["longitudinal"] is True
    assert manifest["ResearchProjectTemplate"]["events"] == ["baseline"]


# --- authentication and errors ----------------------------------------------------------

def test_unknown_token_and_missing_content(emulator: RedcapEmulator) -> None:
    status, answer = call(emulator.url, "0" * 32, content="record")
    assert status == 403
    assert answer == {"error": "You do not have permissions to use the API"}
    status, answer = call(emulator.url, TOKENS["Incoming"])
    assert status == 400 and "content" in answer["error"]
    assert emulator.requests[0]["project"] is None
    assert emulator.requests[1]["project"] == "Incoming"


# --- records -----------------------------------------------------------------------------

def test_incoming_round_trip(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    answer = ok(url, token, content="record", action="import", type="flat",
                overwriteBehavior="normal", returnContent="count",
                data=incoming_rows("1.2.3", error_codes=("1",)))
    assert answer == {"count": 1}

    rows = ok(url, token, content="record", action="export", type="flat", rawOrLabel="raw")
    assert [(r["redcap_repeat_instrument"], r["redcap_repeat_instance"]) for r in rows] == [
        ("", ""), ("series", 1), ("series", 2), ("transfers", 1)]
    base, series1, series2, transfer = rows
    assert list(base)[:3] == ["study_instance_uid", "redcap_repeat_instrument",
                              "redcap_repeat_instance"]
    assert "redcap_event_name" not in base  # a classic project
    assert all(r["study_instance_uid"] == "1.2.3" for r in rows)
    # base row: study fields, other instruments blank, form status "0" when never set
    assert base["study_description"] == "Brain 1.2.3"
    assert base["study_removed_date"] == ""
    assert base["incoming_studies_complete"] == "0"
    assert base["series_description"] == "" and base["transfer_error___1"] == ""
    assert base["series_complete"] == "" and base["transfers_complete"] == ""
    # repeat rows: their own instrument's fields only
    assert series1["series_description"] == "T1" and series1["series_num_files"] == "176"
    assert series2["series_num_files"] == "40"  # a JSON number is stored as its text
    assert series1["study_description"] == "" and series1["transfer_name"] == ""
    assert series1["series_complete"] == "0"
    assert transfer["transfer_name"] == "P001" and transfer["series_description"] == ""
    assert (transfer["transfer_error___1"], transfer["transfer_error___2"],
            transfer["transfer_error___3"]) == ("1", "0", "0")
    assert "transfer_error" not in transfer
    assert transfer["transfers_complete"] == "0"
    assert emulator.stored(token) == rows


def test_update_instance_new_and_overwrite(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import", data=incoming_rows("1.2.3"))
    ok(url, token, content="record", action="import", data=[
        {"study_instance_uid": "1.2.3", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": 1, "transfer_date": "2024-05-01 12:05:00",
         "transfer_error___2": "1", "transfer_name": "", "transfers_complete": "2"},
        {"study_instance_uid": "1.2.3", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": "new", "transfer_project_name": "EFGH"},
        {"study_instance_uid": "1.2.3", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": "new", "transfer_project_name": "IJKL"}])
    transfers = [r for r in emulator.stored(token) if r["redcap_repeat_instrument"] == "transfers"]
    assert [(r["redcap_repeat_instance"], r["transfer_project_name"]) for r in transfers] == [
        (1, "ABCD"), (2, "EFGH"), (3, "IJKL")]
    first = transfers[0]
    assert first["transfer_name"] == "P001"  # normal: a blank does not erase
    assert first["transfer_date"] == "2024-05-01 12:05:00"
    assert first["transfer_error___2"] == "1" and first["transfers_complete"] == "2"

    ok(url, token, content="record", action="import", overwriteBehavior="overwrite", data=[
        {"study_instance_uid": "1.2.3", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": 1, "transfer_name": "", "transfer_error___2": ""}])
    first = emulator.stored(token)[3]
    assert first["transfer_name"] == "" and first["transfer_error___2"] == "0"
    assert first["transfer_project_name"] == "ABCD"  # columns not sent are kept

    # no `action`: REDCap (and so PyCap's import_records) takes `data` to mean import
    ids = ok(url, token, content="record", returnContent="ids",
             data=incoming_rows("9.9") + incoming_rows("8.8"))
    assert ids == ["9.9", "8.8"]
    assert emulator.requests[-1]["action"] == "import"


def test_concurrent_new_instances(emulator: RedcapEmulator) -> None:
    """Parallel clients appending `new` instances get distinct instance numbers."""
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import", data=incoming_rows("1.1"))

    def append(n: int) -> None:
        ok(url, token, content="record", action="import", data=[
            {"study_instance_uid": "1.1", "redcap_repeat_instrument": "series",
             "redcap_repeat_instance": "new", "series_description": f"S{n}"}])

    threads = [threading.Thread(target=append, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    series = [r for r in emulator.stored(token) if r["redcap_repeat_instrument"] == "series"]
    assert [r["redcap_repeat_instance"] for r in series] == list(range(1, 23))
    assert {r["series_description"] for r in series[2:]} == {f"S{n}" for n in range(20)}


def test_filter_logic(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import",
       data=incoming_rows("1.1", accession="A1", error_codes=("1",))
       + incoming_rows("1.2", accession="A2", project="EFGH")
       + incoming_rows("1.3", accession="A3", error_codes=("2", "3")))
    ok(url, token, content="record", action="import", data=[
        {"study_instance_uid": "1.3", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": 1, "transfer_date": "2024-05-02 08:00:00"}])

    assert export_ids(url, token, filterLogic="[study_accession_number] = 'A2'") == ["1.2"]
    assert export_ids(url, token, filterLogic="[study_instance_uid] = '1.3'") == ["1.3"]
    assert export_ids(url, token, filterLogic='[study_accession_number] <> "A2"') == ["1.1", "1.3"]
    assert export_ids(url, token, filterLogic="[transfer_error(1)] = '1'") == ["1.1"]
    assert export_ids(url, token, filterLogic="[transfer_date] = ''") == ["1.1", "1.2"]
    assert export_ids(url, token, filterLogic="[transfer_date] > '2024-05-01'") == ["1.3"]
    assert export_ids(url, token, filterLogic="[series_num_files] < 100 AND "
                                              "[transfer_project_name] = 'EFGH'") == ["1.2"]
    assert export_ids(url, token, filterLogic="[study_accession_number] = 'A1' or "
                                              "[study_accession_number] = 'A3'") == ["1.1", "1.3"]
    assert export_ids(url, token, filterLogic="([transfer_error(2)] = '1' or "
                                              "[transfer_error(1)] = '1') and "
                                              "[transfer_date] <> ''") == ["1.3"]
    # a matching record is exported whole: base row and every instance
    rows = ok(url, token, content="record", filterLogic="[series_description] = 'T2' and "
                                                        "[study_accession_number] = 'A2'")
    assert len(rows) == 4
    assert emulator.requests[-1]["params"]["filterLogic"].startswith("[series_description]")

    for bad in ("[no_such_field] = '1'", "[transfer_error] = '1'", "[study_date] = ",
                "datediff([study_date], 'today') > 1"):
        status, answer = call(url, token, content="record", filterLogic=bad)
        assert status == 400 and "filterLogic" in answer["error"], bad


def test_date_range(emulator: RedcapEmulator, clock: Clock) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import", data=incoming_rows("1.1"))
    clock.now = T0 + timedelta(seconds=10)
    ok(url, token, content="record", action="import", data=incoming_rows("1.2"))
    clock.now = T0 + timedelta(seconds=20)
    ok(url, token, content="record", action="import", data=incoming_rows("1.1"))  # no change

    def since(moment: datetime) -> list[str]:
        return export_ids(url, token, dateRangeBegin=moment.strftime("%Y-%m-%d %H:%M:%S"))

    assert since(T0 - timedelta(seconds=1)) == ["1.1", "1.2"]
    assert since(T0 + timedelta(seconds=5)) == ["1.2"]
    assert since(T0 + timedelta(seconds=10)) == []  # "after": strictly later
    assert export_ids(url, token, dateRangeEnd="2024-05-01 12:00:05") == ["1.1"]

    clock.now = T0 + timedelta(seconds=30)
    ok(url, token, content="record", action="import", data=[
        {"study_instance_uid": "1.1", "study_arrival_date": "2024-05-01 12:00:30"}])
    assert since(T0 + timedelta(seconds=15)) == ["1.1"]

    status, answer = call(url, token, content="record", dateRangeBegin="yesterday")
    assert status == 400 and "dateRangeBegin" in answer["error"]


def test_records_and_fields_selection(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import",
       data=incoming_rows("1.1") + incoming_rows("1.2") + incoming_rows("1.3"))

    assert export_ids(url, token, records=["1.3", "1.1"]) == ["1.1", "1.3"]
    assert export_ids(url, token, records="1.2,1.3") == ["1.2", "1.3"]  # REDCapR's comma form

    rows = ok(url, token, content="record", records=["1.1"], fields=["study_description"])
    assert rows == [{"study_instance_uid": "1.1", "redcap_repeat_instrument": "",
                     "redcap_repeat_instance": "", "study_description": "Brain 1.1"}]

    rows = ok(url, token, content="record", records=["1.1"],
              fields=["series_description", "transfer_error"])
    assert [r["redcap_repeat_instrument"] for r in rows] == ["", "series", "series", "transfers"]
    assert list(rows[1]) == ["study_instance_uid", "redcap_repeat_instrument",
                             "redcap_repeat_instance", "series_description",
                             "transfer_error___1", "transfer_error___2", "transfer_error___3"]

    rows = ok(url, token, content="record", records=["1.2"], forms=["transfers"])
    assert [r["redcap_repeat_instrument"] for r in rows] == ["", "transfers"]
    assert rows[1]["transfers_complete"] == "0" and "series_description" not in rows[1]

    status, answer = call(url, token, content="record", fields=["nope"])
    assert status == 400 and "nope" in answer["error"]
    assert emulator.requests[-1]["params"]["fields"] == ["nope"]


def test_import_errors_change_nothing(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    good = incoming_rows("1.1")

    def refused(rows: list[dict], **params: object) -> str:
        status, answer = call(url, token, content="record", action="import", data=rows, **params)
        assert status == 400, answer
        return answer["error"]

    assert refused(good + [{"study_instance_uid": "1.1", "study_colour": "red"}]) == (
        "The following fields were not found in the project as real data fields: study_colour")
    assert "transfer_error" in refused([{"study_instance_uid": "1.1", "transfer_error": "1"}])
    assert "Repeating Instrument" in refused(good + [
        {"study_instance_uid": "1.1", "redcap_repeat_instrument": "incoming_studies",
         "redcap_repeat_instance": 1, "study_description": "x"}])
    assert "series_num_files" in refused(good + [
        {"study_instance_uid": "1.1", "redcap_repeat_instrument": "series",
         "redcap_repeat_instance": 3, "series_num_files": "many"}])
    assert "transfer_error___1" in refused([
        {"study_instance_uid": "1.1", "redcap_repeat_instrument": "transfers",
         "redcap_repeat_instance": 1, "transfer_error___1": "yes"}])
    assert "repeating instrument 'series'" in refused([
        {"study_instance_uid": "1.1", "series_description": "on the base row"}])
    assert "record ID" in refused([{"study_description": "no id"}])
    assert "redcap_event_name" in refused(
        [{"study_instance_uid": "1.1", "redcap_event_name": "baseline_arm_1"}])
    assert refused("not json")  # type: ignore[arg-type]
    assert emulator.stored(token) == []


def test_delete(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import",
       data=incoming_rows("1.1") + incoming_rows("1.2"))
    status, answer = call(url, token, content="record", action="delete", records=["1.1", "7"])
    assert status == 400 and "7" in answer["error"]
    assert ok(url, token, content="record", action="delete", records=["1.1"]) == 1
    assert export_ids(url, token) == ["1.2"]


def test_research_project_longitudinal(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["ABCD"]
    assert ok(url, token, content="event") == [{
        "event_name": "baseline", "arm_num": 1, "unique_event_name": "baseline_arm_1",
        "custom_event_label": "", "event_id": 6000, "days_offset": 0, "offset_min": 0,
        "offset_max": 0}]
    status, answer = call(url, TOKENS["Incoming"], content="event")
    assert status == 400 and "classic" in answer["error"]
    assert ok(url, token, content="formEventMapping") == [
        {"arm_num": 1, "unique_event_name": "baseline_arm_1", "form": "demographics"},
        {"arm_num": 1, "unique_event_name": "baseline_arm_1", "form": "imaging"}]
    status, _ = call(url, TOKENS["Incoming"], content="formEventMapping")
    assert status == 400  # how PyCap tells a classic project

    assert ok(url, token, content="event", action="import",
              data=[{"event_name": "followup", "arm_num": "1"}]) == 1
    ok(url, token, content="record", action="import", data=[
        {"record_id": "P001", "redcap_event_name": "followup_arm_1",
         "redcap_repeat_instrument": "", "redcap_repeat_instance": "", "sex": "F"},
        {"record_id": "P001", "redcap_event_name": "followup_arm_1",
         "redcap_repeat_instrument": "imaging", "redcap_repeat_instance": "new",
         "img_study_instance_uid": "2.25.1", "img_event_name": "followup"}])
    rows = ok(url, token, content="record", events=["followup_arm_1"])
    assert [(r["redcap_event_name"], r["redcap_repeat_instrument"], r["redcap_repeat_instance"])
            for r in rows] == [("followup_arm_1", "", ""), ("followup_arm_1", "imaging", 1)]
    assert list(rows[0])[:4] == ["record_id", "redcap_event_name", "redcap_repeat_instrument",
                                 "redcap_repeat_instance"]
    assert ok(url, token, content="record", events=["baseline_arm_1"]) == []
    assert export_ids_of(ok(url, token, content="record",
                            filterLogic="[img_study_instance_uid] = '2.25.1'")) == ["P001"]

    status, answer = call(url, token, content="record", action="import", data=[
        {"record_id": "P002", "redcap_event_name": "visit9_arm_1", "sex": "M"}])
    assert status == 400 and "redcap_event_name" in answer["error"]
    status, answer = call(url, token, content="record", action="import", data=[
        {"record_id": "P002", "redcap_event_name": "baseline_arm_1", "dob": "01.02.1990"}])
    assert status == 400 and "dob" in answer["error"]


# --- project structure and small methods ---------------------------------------------------

def test_metadata(emulator: RedcapEmulator) -> None:
    metadata = ok(emulator.url, TOKENS["Incoming"], content="metadata")
    assert metadata[0]["field_name"] == "study_instance_uid"
    assert metadata[0]["form_name"] == "incoming_studies"
    assert list(metadata[0]) == [
        "field_name", "form_name", "section_header", "field_type", "field_label",
        "select_choices_or_calculations", "field_note",
        "text_validation_type_or_show_slider_number", "text_validation_min",
        "text_validation_max", "identifier", "branching_logic", "required_field",
        "custom_alignment", "question_number", "matrix_group_name", "matrix_ranking",
        "field_annotation"]
    error = next(m for m in metadata if m["field_name"] == "transfer_error")
    assert error["field_type"] == "checkbox"
    assert error["select_choices_or_calculations"].startswith("1, de-identification")
    series = ok(emulator.url, TOKENS["Incoming"], content="metadata", forms=["series"])
    assert {m["form_name"] for m in series} == {"series"}


def test_project_info_and_repeating(emulator: RedcapEmulator) -> None:
    info = ok(emulator.url, TOKENS["Incoming"], content="project")
    assert info["project_title"] == "Incoming"
    assert (info["is_longitudinal"], info["has_repeating_instruments_or_events"]) == (0, 1)
    assert ok(emulator.url, TOKENS["ABCD"], content="project")["is_longitudinal"] == 1
    assert ok(emulator.url, TOKENS["Routing"], content="project")[
        "has_repeating_instruments_or_events"] == 0
    assert ok(emulator.url, TOKENS["Incoming"], content="repeatingFormsEvents") == [
        {"form_name": "series", "custom_form_label": ""},
        {"form_name": "transfers", "custom_form_label": ""}]
    assert ok(emulator.url, TOKENS["ABCD"], content="repeatingFormsEvents") == [
        {"event_name": "baseline_arm_1", "form_name": "imaging", "custom_form_label": ""}]
    assert ok(emulator.url, TOKENS["Routing"], content="version", raw=True) == "13.1.0"


def test_next_record_name_and_auto_numbering(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["CouplingList"]
    assert ok(url, token, content="generateNextRecordName", raw=True) == "1"
    ok(url, token, content="record", action="import", data=[
        {"record_id": "1", "cl_accessionnumber": "A1"},
        {"record_id": "2", "cl_accessionnumber": "A2"}])
    assert ok(url, token, content="generateNextRecordName", raw=True) == "3"
    answer = ok(url, token, content="record", action="import", forceAutoNumber="true",
                returnContent="auto_ids",
                data=[{"record_id": "x", "cl_accessionnumber": "A3"},
                      {"record_id": "y", "cl_accessionnumber": "A4"}])
    assert answer == ["3,x", "4,y"]
    assert [r["cl_accessionnumber"] for r in emulator.stored(token)] == ["A1", "A2", "A3", "A4"]


def test_stop_and_restart_keep_data(emulator: RedcapEmulator) -> None:
    url, token = emulator.url, TOKENS["Incoming"]
    ok(url, token, content="record", action="import", data=incoming_rows("1.1"))
    emulator.stop()
    with pytest.raises(urllib.error.URLError) as refused:
        call(url, token, content="record")
    assert isinstance(refused.value.reason, ConnectionRefusedError)
    emulator.restart()
    assert emulator.url == url
    assert export_ids(url, token) == ["1.1"]


def test_research_project_not_in_manifest() -> None:
    """A research project not named in projects.json gets the template's settings."""
    emu = RedcapEmulator()
    emu.add_from_manifest({"XYZ": "X" * 32})
    url = emu.start()
    try:
        info = ok(url, "X" * 32, content="project")
        assert info["project_title"] == "XYZ" and info["is_longitudinal"] == 1
    finally:
        emu.stop()
