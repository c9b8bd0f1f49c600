"""Pathology metadata through de-identification (fiona.deid.specimen): a whole-slide image made
by the real wsidicomizer from a tifffile OME-TIFF, with stain H&E and biopsy id
"BIOPSY-SECRET-1", keeps its stain codes under the pathology profile (Clean Structured Content),
loses every specimen identifier to keyed replacements, keeps one remapped SpecimenUID across
its pyramid levels, and passes the verification gate."""

from __future__ import annotations

import copy
from datetime import datetime
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fiona.attach.wsi import Pathology, convert, stain_substances
from fiona.bootstrap import init
from fiona.clock import FakeClock
from fiona.config import load
from fiona.control import open_control_plane
from fiona.control.base import Project, TransferRequest, now_iso
from fiona.deid.engine import Deidentifier, Settings, with_profile
from fiona.deid.gate import GateError, check
from fiona.deid.identifiers import Identifiers
from fiona.deid.pipeline import Pipeline
from fiona.send.forward import Forwarder
from test_attach_e2e import ome_tiff

KEY = b"k" * 32
SECRET = "BIOPSY-SECRET-1"
HEMATOXYLIN, EOSIN = ("SCT", "12710003"), ("SCT", "36879007")


def settings(profile: str, project: str = "PATH", keep: tuple[str, ...] = ()) -> Settings:
    out = with_profile(Settings(project=project, participant="P0001", key=KEY), profile)
    if keep:
        out.extra["keep"] = list(out.extra.get("keep", [])) + list(keep)
    return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> list[bytes]:
    """The slide's levels as wsidicomizer wrote them (bytes, so each test reads its own)."""
    folder = tmp_path_factory.mktemp("slide")
    out = folder / "dicom"
    out.mkdir()
    files = convert(ome_tiff(folder / "slide.ome.tiff"), out, "P0001",
                    Pathology(specimen="colon biopsy", block="A1", slide="3", stain="H&E",
                              biopsy=SECRET))
    return [f.read_bytes() for f in files]


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))


def items(ds: Dataset) -> list[Dataset]:
    return [item for spec in ds.SpecimenDescriptionSequence
            for step in spec.get("SpecimenPreparationSequence", [])
            for item in step.SpecimenPreparationStepContentItemSequence]


def codes(ds: Dataset) -> set[tuple[str, str]]:
    return {(c.CodingSchemeDesignator, c.CodeValue) for item in items(ds)
            for c in item.get("ConceptCodeSequence", [])}


def test_converting_leaves_pydicom_of_this_process_as_it_was(slide):
    # wsidicomizer switches pydicom to its future behaviour when imported: a hostile UID
    # would then raise instead of being quarantined; the conversion runs in a child process
    assert pydicom.config.settings.writing_validation_mode != pydicom.config.RAISE
    assert pydicom.config.settings.reading_validation_mode != pydicom.config.RAISE
    assert hasattr(Dataset, "convert_pixel_data")
    Dataset().StudyInstanceUID = "../not-a-uid"  # warns, does not raise


def test_source_slide_carries_the_form(slide):
    ds = read(slide[0])
    assert {HEMATOXYLIN, EOSIN} <= codes(ds)
    assert SECRET.encode() in slide[0]
    assert len(slide) == 3


def test_pathology_profile_keeps_stain_codes_and_keys_identifiers(slide):
    pipeline = Pipeline(settings("pathology"))
    outs = [pipeline.process(read(data)) for data in slide]      # the gate runs in process
    sources = [read(data) for data in slide]
    specimen_uids = {r.ds.SpecimenDescriptionSequence[0].SpecimenUID for r in outs}
    source_uids = {s.SpecimenDescriptionSequence[0].SpecimenUID for s in sources}
    assert len(source_uids) == 1 and len(specimen_uids) == 1       # one slide, one specimen
    assert specimen_uids != source_uids
    assert specimen_uids == {pipeline.mapped_uid(source_uids.pop())}
    for result in outs:
        ds = result.ds
        assert SECRET.encode() not in result.encoded and b"colon biopsy" not in result.encoded
        assert {HEMATOXYLIN, EOSIN} <= codes(ds)
        [spec] = ds.SpecimenDescriptionSequence
        assert spec.SpecimenIdentifier.startswith("SPC") and "SpecimenShortDescription" not in spec
        assert ds.ContainerIdentifier.startswith("SPC")
        texts = {(i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in items(ds)
                 if i.ValueType == "TEXT"}
        parents = {t for c, t in texts if c == "111705"}
        # the biopsy's keyed id links the block's sampling to the biopsy
        assert pipeline.engine.specimen_id(SECRET) in parents
        assert all(t.startswith("SPC") for _c, t in texts)
    assert len({r.ds.ContainerIdentifier for r in outs}) == 1


def test_default_profile_empties_the_preparation_but_keys_the_identifiers(slide):
    result = Pipeline(settings("default")).process(read(slide[0]))
    [spec] = result.ds.SpecimenDescriptionSequence
    assert "SpecimenPreparationSequence" in spec and not spec.SpecimenPreparationSequence  # Z
    assert spec.SpecimenIdentifier.startswith("SPC")
    assert SECRET.encode() not in result.encoded


def test_gate_stops_a_specimen_identifier_a_profile_keeps(slide):
    source = read(slide[0])
    ids = Identifiers.from_dataset(source)
    engine = Deidentifier(settings("pathology", keep=("TextValue",)))
    out = engine.apply(copy.deepcopy(source), ids)
    [item] = [i for i in items(out) if i.ConceptNameCodeSequence[0].CodeValue == "111705"
              and i.TextValue == engine.specimen_id(SECRET)]
    item.TextValue = SECRET                     # as if a rule had let it through
    buffer = BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    with pytest.raises(GateError) as err:
        check(out, buffer.getvalue(), ids, engine.authored_values())
    assert "SpecimenPreparationStepContentItemSequence" in err.value.path
    assert SECRET not in str(err.value)


def _text_item(concept: str, scheme: str, text: str) -> Dataset:
    item = Dataset()
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = concept, scheme, "x"
    item.ConceptNameCodeSequence = Sequence([name])
    item.TextValue = text
    return item


def _with_step(*content: Dataset) -> Dataset:
    ds = Dataset()
    ds.PatientID = "NID0101"
    ds.SOPInstanceUID = "1.2.3.4"
    spec = Dataset()
    spec.SpecimenIdentifier = "S-26-4711"
    step = Dataset()
    step.SpecimenPreparationStepContentItemSequence = Sequence(list(content))
    spec.SpecimenPreparationSequence = Sequence([step])
    ds.SpecimenDescriptionSequence = Sequence([spec])
    return ds


def test_free_text_items_go_unless_the_profile_keeps_text_value():
    def step_texts(engine: Deidentifier) -> list[str]:
        out = engine.apply(_with_step(_text_item("121041", "DCM", "S-26-4711"),
                                      _text_item("111703", "DCM", "cut by Dr Who")))
        return [i.TextValue for i in items(out)]

    plain = step_texts(Deidentifier(settings("pathology")))
    assert plain == [Deidentifier(settings("pathology")).specimen_id("S-26-4711")]
    assert "cut by Dr Who" in step_texts(Deidentifier(settings("pathology", keep=("TextValue",))))


def test_keyed_identifiers_are_per_project():
    a, b = Deidentifier(settings("default")), Deidentifier(settings("default", project="OTHER"))
    assert a.specimen_id(SECRET) == Deidentifier(settings("pathology")).specimen_id(SECRET)
    assert a.specimen_id(SECRET) != b.specimen_id(SECRET)


@pytest.mark.parametrize("text,expected", [
    ("H&E", ["hematoxylin stain", "water soluble eosin stain"]),
    ("hematoxylin and eosin", ["hematoxylin stain", "water soluble eosin stain"]),
    ("PAS, Congo red", ["periodic acid Schiff stain", "Congo red stain"]),
    ("house blend", ["house blend"]),
])
def test_stain_text_becomes_codes(text, expected):
    assert [getattr(s, "meaning", s) for s in stain_substances(text)] == expected


def test_each_project_sends_the_same_slide_through_its_own_profile(slide, tmp_path):
    """The forwarder takes the profile from the project: PATH (pathology) keeps the stain codes,
    PLAIN (default) empties the preparation steps, for the same slide on the same site."""
    research = tmp_path / "research"
    config = load(str(init(tmp_path / "data", port=11112, ip="127.0.0.1", extra={
        "DESTINATIONS": {"research": {"type": "folder", "path": str(research)}}})))
    site = config.site(None)
    control = open_control_plane(config, site)
    control.save_project(Project("PATH", deid_profile="pathology"))
    control.save_project(Project("PLAIN"))
    forwarder = Forwarder(config, site, control, FakeClock(start=datetime(2026, 3, 2, 9, 30)))
    first = read(slide[0])
    for data in slide:
        ds = read(data)
        target = forwarder.tree.raw / first.StudyInstanceUID / ds.SeriesInstanceUID
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{ds.SOPInstanceUID}.dcm").write_bytes(data)
    sent: dict[str, list[Dataset]] = {}
    for project in ("PATH", "PLAIN"):
        req = control.add_request(TransferRequest(first.StudyInstanceUID, project, "P0001",
                                                  "baseline", requested=now_iso()))
        forwarder.process(req)
        done = next(r for r in control.requests(first.StudyInstanceUID) if r.project == project)
        assert done.complete, done.error_message
        sent[project] = [d for d in map(pydicom.dcmread, research.rglob("*.dcm"))
                         if d.StudyInstanceUID == done.mapped_uid]
    assert len(sent["PATH"]) == len(sent["PLAIN"]) == len(slide)
    assert all({HEMATOXYLIN, EOSIN} <= codes(ds) for ds in sent["PATH"])
    for ds in sent["PLAIN"]:
        [spec] = ds.SpecimenDescriptionSequence
        assert not spec.SpecimenPreparationSequence
    # a profile gone since the project chose it (a site file removed): nothing is sent, the
    # request names the available ones
    control.save_project(Project("GONE", deid_profile="removed"))
    req = control.add_request(TransferRequest(first.StudyInstanceUID, "GONE", "P0001",
                                              "baseline", requested=now_iso()))
    forwarder.process(req)
    [failed] = [r for r in control.requests(first.StudyInstanceUID) if r.project == "GONE"]
    assert not failed.complete and "no de-identification profile 'removed'; available: " \
        "compat42, default, pathology" in failed.error_message
