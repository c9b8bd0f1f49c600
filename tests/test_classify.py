"""Classification rules (SPEC §4): operators, references, rule order, load errors, shipped rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import Dataset

from fiona.index.classify import RuleError, RuleSet, format_explanation

SHIPPED_RULES = Path(__file__).resolve().parent.parent / "config" / "classifyRules.json"

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = [1, 0, 0, 0, 1, 0]
SAGITTAL = [0, 1, 0, 0, 0, -1]
CORONAL = [1, 0, 0, 0, 0, -1]
OBLIQUE_30 = [1, 0, 0, 0, 0.866025, -0.5]  # axial tilted 30 degrees about x


def mr(**fields: object) -> Dataset:
    """A Siemens axial T1 MPRAGE image header; `fields` override, None deletes."""
    ds = Dataset()
    base = {
        "SOPClassUID": MR_STORAGE, "Modality": "MR", "Manufacturer": "SIEMENS",
        "SeriesDescription": "t1_mprage_tra", "SequenceName": "*tfl3d1_16ns",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "ImageOrientationPatient": AXIAL,
        "EchoTime": "2.98", "RepetitionTime": "2300.0", "Rows": 256, "Columns": 256,
        "PixelSpacing": [0.9, 0.9], "ScanningSequence": ["GR", "IR"],
    }
    for keyword, value in {**base, **fields}.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def labels_of(clause: dict, ds: Dataset, record: dict | None = None) -> list[str]:
    return RuleSet.from_rules([{"type": "X", "rules": [clause]}]).classify(record or {}, ds)


IOP = ["0x0020", "0x0037"]

# (case id, clause, dataset, record, expected to hold)
CLAUSES = [
    # regexp (default operator); multi-valued elements are searched backslash-joined
    ("regexp-match", {"tag": ["SeriesDescription"], "value": "(?i)MPRAGE"}, mr(), {}, True),
    ("regexp-nomatch", {"tag": ["SeriesDescription"], "value": "flair"}, mr(), {}, False),
    ("regexp-explicit", {"tag": ["Modality"], "operator": "regexp", "value": "^MR$"}, mr(), {},
     True),
    ("regexp-multi-joined", {"tag": ["ImageType"], "value": r"^ORIGINAL\\PRIMARY\\"}, mr(), {},
     True),
    ("regexp-multi-anchor", {"tag": ["ImageType"], "value": "^PRIMARY"}, mr(), {}, False),
    ("regexp-number-value", {"tag": ["EchoTime"], "value": 2.98}, mr(), {}, True),
    ("regexp-missing", {"tag": ["SeriesDescription"], "value": ".*"},
     mr(SeriesDescription=None), {}, False),
    ("regexp-record-first", {"tag": ["SeriesDescription"], "value": "record"}, mr(),
     {"SeriesDescription": "from record"}, True),
    ("regexp-record-shadows-ds", {"tag": ["SeriesDescription"], "value": "mprage"}, mr(),
     {"SeriesDescription": "from record"}, False),
    ("regexp-empty-record-falls-back", {"tag": ["SeriesDescription"], "value": "mprage"}, mr(),
     {"SeriesDescription": ""}, True),
    ("regexp-group-element", {"tag": ["0x0008", "0x0070"], "value": "SIEMENS"}, mr(), {}, True),
    ("regexp-group-element-skips-record", {"tag": ["0x0008", "0x0070"], "value": "GE"}, mr(),
     {"Manufacturer": "GE"}, False),
    # ==
    ("eq-string", {"tag": ["Modality"], "operator": "==", "value": "MR"}, mr(), {}, True),
    ("eq-string-differs", {"tag": ["Modality"], "operator": "==", "value": "CT"}, mr(), {}, False),
    ("eq-numeric", {"tag": ["RepetitionTime"], "operator": "==", "value": 2300}, mr(), {}, True),
    ("eq-numeric-text", {"tag": ["RepetitionTime"], "operator": "==", "value": "2300.00"}, mr(),
     {}, True),
    ("eq-multi-joined", {"tag": ["ImageType"], "operator": "==",
                         "value": "ORIGINAL\\PRIMARY\\M\\ND"}, mr(), {}, True),
    ("eq-multi-list", {"tag": IOP, "operator": "==", "value": [1, 0, 0, 0, 1, 0]}, mr(), {}, True),
    ("eq-multi-list-differs", {"tag": IOP, "operator": "==", "value": [1, 0, 0, 0, 0, -1]}, mr(),
     {}, False),
    ("eq-missing", {"tag": ["Modality"], "operator": "==", "value": "MR"}, mr(Modality=None), {},
     False),
    # !=
    ("ne-string", {"tag": ["Modality"], "operator": "!=", "value": "CT"}, mr(), {}, True),
    ("ne-string-equal", {"tag": ["Modality"], "operator": "!=", "value": "MR"}, mr(), {}, False),
    ("ne-numeric-equal", {"tag": ["RepetitionTime"], "operator": "!=", "value": "2300.00"}, mr(),
     {}, False),
    ("ne-missing-fails", {"tag": ["Modality"], "operator": "!=", "value": "CT"},
     mr(Modality=None), {}, False),
    # < and >: a value that does not parse as a number fails
    ("lt", {"tag": ["EchoTime"], "operator": "<", "value": 30}, mr(), {}, True),
    ("lt-false", {"tag": ["RepetitionTime"], "operator": "<", "value": 800}, mr(), {}, False),
    ("gt", {"tag": ["RepetitionTime"], "operator": ">", "value": "2000"}, mr(), {}, True),
    ("gt-false", {"tag": ["EchoTime"], "operator": ">", "value": 60}, mr(), {}, False),
    ("lt-parse-failure", {"tag": ["EchoTime"], "operator": "<", "value": 30}, mr(),
     {"EchoTime": "n/a"}, False),
    ("gt-parse-failure", {"tag": ["EchoTime"], "operator": ">", "value": 0}, mr(),
     {"EchoTime": "n/a"}, False),
    ("lt-parse-failure-negated", {"tag": ["EchoTime"], "operator": "<", "value": 30,
                                  "negate": "yes"}, mr(), {"EchoTime": "n/a"}, True),
    ("lt-multi-needs-index", {"tag": ["PixelSpacing"], "operator": "<", "value": 5}, mr(), {},
     False),
    ("lt-multi-indexed", {"tag": ["0x0028", "0x0030", "1"], "operator": "<", "value": 5}, mr(),
     {}, True),
    ("gt-missing", {"tag": ["EchoTime"], "operator": ">", "value": 0}, mr(EchoTime=None), {},
     False),
    # contains: membership for multi-valued, substring for single values
    ("contains-member", {"tag": ["ImageType"], "operator": "contains", "value": "ND"}, mr(), {},
     True),
    ("contains-not-member", {"tag": ["ImageType"], "operator": "contains", "value": "MOSAIC"},
     mr(), {}, False),
    ("contains-member-is-exact", {"tag": ["ImageType"], "operator": "contains", "value": "ORIG"},
     mr(), {}, False),
    ("contains-numeric-member", {"tag": IOP, "operator": "contains", "value": 1}, mr(), {}, True),
    ("contains-substring", {"tag": ["SeriesDescription"], "operator": "contains",
                            "value": "mprage"}, mr(), {}, True),
    ("contains-substring-absent", {"tag": ["SeriesDescription"], "operator": "contains",
                                   "value": "flair"}, mr(), {}, False),
    ("contains-record-list", {"tag": ["ImageType"], "operator": "contains", "value": "DERIVED"},
     mr(), {"ImageType": ["DERIVED", "SECONDARY"]}, True),
    ("contains-missing", {"tag": ["ImageType"], "operator": "contains", "value": "M"},
     mr(ImageType=None), {}, False),
    # approx: element-wise with approxLevel (default 1e-4), lengths must match
    ("approx-list", {"tag": IOP, "operator": "approx", "value": AXIAL},
     mr(ImageOrientationPatient=[1, 0.00005, 0, 0, 1, 0]), {}, True),
    ("approx-outside-default", {"tag": IOP, "operator": "approx", "value": AXIAL},
     mr(ImageOrientationPatient=[1, 0.01, 0, 0, 1, 0]), {}, False),
    ("approx-level", {"tag": IOP, "operator": "approx", "value": AXIAL, "approxLevel": 0.05},
     mr(ImageOrientationPatient=[1, 0.01, 0, 0, 1, 0]), {}, True),
    ("approx-length-mismatch", {"tag": IOP, "operator": "approx", "value": [1, 0, 0]}, mr(), {},
     False),
    ("approx-scalar", {"tag": ["EchoTime"], "operator": "approx", "value": 3, "approxLevel": 0.1},
     mr(), {}, True),
    ("approx-parse-failure", {"tag": ["SliceThickness"], "operator": "approx", "value": 1,
                              "approxLevel": 10}, mr(), {"SliceThickness": "thick"}, False),
    ("approx-indexed", {"tag": ["0x0020", "0x0037", "4"], "operator": "approx", "value": 1},
     mr(), {}, True),
    # exist / notexist test presence (the old engine crashed on these)
    ("exist", {"tag": ["EchoTime"], "operator": "exist"}, mr(), {}, True),
    ("exist-missing", {"tag": ["EchoTime"], "operator": "exist"}, mr(EchoTime=None), {}, False),
    ("exist-empty", {"tag": ["SeriesDescription"], "operator": "exist"},
     mr(SeriesDescription=""), {}, False),
    ("exist-record-only-key", {"tag": ["NumFiles"], "operator": "exist"}, mr(), {"NumFiles": 12},
     True),
    ("exist-value-ignored", {"tag": ["EchoTime"], "operator": "exist", "value": "x"}, mr(), {},
     True),
    ("notexist", {"tag": ["InversionTime"], "operator": "notexist"}, mr(), {}, True),
    ("notexist-present", {"tag": ["EchoTime"], "operator": "notexist"}, mr(), {}, False),
    ("notexist-not-a-method", {"tag": ["walk"], "operator": "notexist"}, mr(), {}, True),
    # multi-valued index tags
    ("index-component", {"tag": ["0x0020", "0x0037", "0"], "operator": "==", "value": 1}, mr(),
     {}, True),
    ("index-component-differs", {"tag": ["0x0020", "0x0037", "5"], "operator": "==",
                                 "value": 1}, mr(), {}, False),
    ("index-out-of-range", {"tag": ["0x0008", "0x0008", "9"], "operator": "exist"}, mr(), {},
     False),
    ("index-zero-single-value", {"tag": ["0x0008", "0x0060", "0"], "operator": "==",
                                 "value": "MR"}, mr(), {}, True),
    # value as a tag reference: compare two elements
    ("tag-vs-tag-lt", {"tag": ["EchoTime"], "operator": "<", "value": ["RepetitionTime"]}, mr(),
     {}, True),
    ("tag-vs-tag-gt", {"tag": ["EchoTime"], "operator": ">", "value": ["0x0018", "0x0080"]},
     mr(), {}, False),
    ("tag-vs-tag-eq", {"tag": ["Rows"], "operator": "==", "value": ["Columns"]}, mr(), {}, True),
    ("tag-vs-tag-eq-differs", {"tag": ["Rows"], "operator": "==", "value": ["Columns"]},
     mr(Columns=192), {}, False),
    ("tag-vs-tag-missing", {"tag": ["Rows"], "operator": "==", "value": ["InversionTime"]}, mr(),
     {}, False),
    ("tag-vs-tag-indexed", {"tag": ["0x0020", "0x0037", "0"], "operator": "==",
                            "value": ["0x0020", "0x0037", "4"]}, mr(), {}, True),
    # negate inverts the clause outcome
    ("negate-yes", {"tag": ["Modality"], "operator": "==", "value": "MR", "negate": "yes"}, mr(),
     {}, False),
    ("negate-true", {"tag": ["Modality"], "operator": "==", "value": "CT", "negate": True}, mr(),
     {}, True),
    ("negate-no", {"tag": ["Modality"], "operator": "==", "value": "MR", "negate": "no"}, mr(),
     {}, True),
    ("negate-missing-holds", {"tag": ["Modality"], "value": "CT", "negate": "yes"},
     mr(Modality=None), {}, True),
    ("negate-exist", {"tag": ["InversionTime"], "operator": "exist", "negate": "yes"}, mr(), {},
     True),
]


@pytest.mark.parametrize("clause, ds, record, held",
                         [case[1:] for case in CLAUSES], ids=[case[0] for case in CLAUSES])
def test_clause(clause: dict, ds: Dataset, record: dict, held: bool) -> None:
    assert labels_of(clause, ds, record) == (["X"] if held else [])


def test_every_operator_is_covered() -> None:
    used = {case[1].get("operator", "regexp") for case in CLAUSES}
    assert used == {"regexp", "==", "!=", "<", ">", "contains", "approx", "exist", "notexist"}


# --- rule references ------------------------------------------------------------------------

TWO_CLAUSES_ONE_FAILS = {"type": "A", "id": "a", "rules": [
    {"tag": ["Modality"], "operator": "==", "value": "MR"},
    {"tag": ["Manufacturer"], "operator": "==", "value": "GE"},
]}


@pytest.mark.parametrize("rules, expected", [
    ([{"type": "A", "id": "a", "rules": [{"tag": ["Modality"], "value": "MR"}]},
      {"type": "B", "rules": [{"rule": "a"}]}], ["A", "B"]),
    ([{"type": "A", "id": "a", "rules": [{"tag": ["Modality"], "value": "MR"}]},
      {"type": "B", "rules": [{"notrule": "a"}]}], ["A"]),
    # notrule negates the rule as a whole: one failing clause is enough for it to hold
    ([TWO_CLAUSES_ONE_FAILS, {"type": "B", "rules": [{"notrule": "a"}]}], ["B"]),
    ([TWO_CLAUSES_ONE_FAILS, {"type": "B", "rules": [{"rule": "a"}]}], []),
    # a reference may point forward: it evaluates the rule, it does not read its label
    ([{"type": "B", "rules": [{"rule": "a"}]},
      {"type": "A", "id": "a", "rules": [{"tag": ["Modality"], "value": "MR"}]}], ["B", "A"]),
    # chains of references
    ([{"type": "A", "id": "a", "rules": [{"tag": ["Modality"], "value": "MR"}]},
      {"type": "B", "id": "b", "rules": [{"notrule": "a"}]},
      {"type": "C", "rules": [{"notrule": "b"}, {"rule": "a"}]}], ["A", "C"]),
], ids=["rule", "notrule", "notrule-whole-rule", "rule-whole-rule", "forward", "chain"])
def test_rule_references(rules: list[dict], expected: list[str]) -> None:
    assert RuleSet.from_rules(rules).classify({}, mr()) == expected


# --- order, OR, SeriesLevel -----------------------------------------------------------------

SIEMENS_RULE = {"type": "SIEMENS", "rules": [{"tag": ["Manufacturer"], "value": "(?i)siemens"}]}
SIEMENS_MR_RULE = {"type": "siemens-mr", "rules": [
    {"tag": ["ClassifyType"], "operator": "contains", "value": "SIEMENS"},
    {"tag": ["Modality"], "operator": "==", "value": "MR"},
]}


@pytest.mark.parametrize("rules, record, expected", [
    ([SIEMENS_RULE, SIEMENS_MR_RULE], {}, ["SIEMENS", "siemens-mr"]),
    # a rule only sees labels of rules before it
    ([SIEMENS_MR_RULE, SIEMENS_RULE], {}, ["SIEMENS"]),
    # the record's own ClassifyType (earlier images) is not this image's labels
    ([SIEMENS_MR_RULE], {"ClassifyType": ["SIEMENS"]}, []),
], ids=["later-rule-sees-label", "earlier-rule-does-not", "record-labels-shadowed"])
def test_rule_order(rules: list[dict], record: dict, expected: list[str]) -> None:
    assert RuleSet.from_rules(rules).classify(record, mr()) == expected


@pytest.mark.parametrize("descriptions, expected", [
    ("t1_mprage", ["T1"]),
    ("MPRAGE", ["T1"]),
    ("t1 mprage", ["T1"]),  # both alternatives hold: one label
    ("t2_space", []),
])
def test_same_type_rules_are_alternatives(descriptions: str, expected: list[str]) -> None:
    rules = RuleSet.from_rules([
        {"type": "T1", "rules": [{"tag": ["SeriesDescription"], "value": "t1"}]},
        {"type": "T1", "rules": [{"tag": ["SeriesDescription"], "value": "(?i)mprage"}]},
    ])
    assert rules.classify({}, mr(SeriesDescription=descriptions)) == expected


def test_series_level_marks_type_but_classify_is_per_image() -> None:
    rules = RuleSet.from_rules([
        {"type": "axial", "check": "SeriesLevel",
         "rules": [{"tag": IOP, "operator": "approx", "value": AXIAL}]},
        {"type": "MR", "rules": [{"tag": ["Modality"], "value": "MR"}]},
    ])
    assert rules.series_level == frozenset({"axial"})
    assert rules.classify({}, mr()) == ["axial", "MR"]
    assert rules.classify({}, mr(ImageOrientationPatient=SAGITTAL)) == ["MR"]


def test_explain_and_format() -> None:
    rules = RuleSet.from_rules([
        {"type": "SIEMENS", "id": "siemens", "rules": [{"tag": ["Manufacturer"],
                                                        "value": "(?i)siemens"}]},
        {"type": "T2", "rules": [{"tag": ["Modality"], "value": "MR"},
                                 {"tag": ["EchoTime"], "operator": ">", "value": 60}]},
    ])
    explanations = rules.explain({}, mr())
    assert [(e.type, e.rule_id, e.held) for e in explanations] == [
        ("SIEMENS", "siemens", True), ("T2", None, False)]
    assert [c.held for c in explanations[1].clauses] == [True, False]
    assert explanations[1].clauses[1].found == "'2.98'"
    text = format_explanation(explanations)
    assert "labels: SIEMENS" in text
    assert "set by rule 'siemens'" in text
    assert "Manufacturer regexp '(?i)siemens'  (found 'SIEMENS')" in text
    assert "T2 (rule at index 1): EchoTime > '60'  (found '2.98')" in text


# --- load errors ----------------------------------------------------------------------------

def rule(type_: str = "X", id_: str | None = None, **extra: object) -> dict:
    base: dict = {"type": type_, "rules": [{"tag": ["Modality"], "value": "MR"}]}
    if id_:
        base["id"] = id_
    return {**base, **extra}


@pytest.mark.parametrize("rules, message", [
    ([rule(id_="a", rules=[{"rule": "a"}])], "rule 'a': reference cycle a -> a"),
    ([rule(id_="a", rules=[{"rule": "b"}]), rule(id_="b", rules=[{"notrule": "c"}]),
      rule(id_="c", rules=[{"rule": "a"}])], "reference cycle a -> b -> c -> a"),
    ([rule(id_="a", rules=[{"notrule": "nope"}])], "rule 'a': refers to unknown rule id 'nope'"),
    ([rule(), rule("T1", rules=[{"tag": ["Modality"], "operator": "~=", "value": "MR"}])],
     "rule at index 1 (type 'T1'), clause 0: unknown operator '~='"),
    ([rule(rules=[{"value": "MR"}])], "clause has no tag"),
    ([{"type": "X", "id": "x"}], "rule 'x': rules must be a non-empty list"),
    ([{"type": "X", "rules": []}], "rules must be a non-empty list"),
    ([{"rules": [{"tag": ["Modality"], "value": "MR"}]}], "missing type"),
    ([rule(rules=[{"tag": ["0x0020"], "value": "1"}])], "bad tag ['0x0020']"),
    ([rule(rules=[{"tag": "Modality", "value": "MR"}])], "a tag must be a list of strings"),
    ([rule(rules=[{"tag": ["0x0020", "0x0037", "x"], "value": "1"}])], "tag index 'x'"),
    ([rule(rules=[{"tag": ["Modality"], "operator": "==", "value": ["0x0008"]}])],
     "(value): bad tag"),
    ([rule(rules=[{"tag": ["Modality"], "value": ["Manufacturer"]}])],
     "regexp needs a pattern string"),
    ([rule(rules=[{"tag": ["Modality"], "value": "(unclosed"}])], "bad regular expression"),
    ([rule(rules=[{"tag": ["EchoTime"], "operator": "<", "value": "short"}])],
     "operator < needs a number"),
    ([rule(rules=[{"tag": IOP, "operator": "approx", "value": [1, "x"]}])],
     "operator approx needs a number"),
    ([rule(rules=[{"tag": IOP, "operator": "approx", "value": AXIAL, "approxLevel": -1}])],
     "approxLevel must be a non-negative number"),
    ([rule(rules=[{"tag": IOP, "operator": "==", "value": AXIAL, "approxLevel": 1}])],
     "approxLevel only applies to operator approx"),
    ([rule(rules=[{"tag": ["Modality"], "operator": "=="}])], "operator == needs a value"),
    ([rule(rules=[{"tag": ["Modality"], "value": "MR", "negate": "maybe"}])], "negate must be"),
    ([rule(rules=[{"tag": ["Modality"], "value": "MR", "opertor": "=="}])],
     "unknown clause key(s) opertor"),
    ([rule(rules=[{"rule": "a", "negate": "yes"}])], "a rule clause is"),
    ([rule(id_="a"), rule(id_="a")], "rule 'a': the id is used by two rules"),
    ([rule(check="ImageLevel")], "check must be 'SeriesLevel'"),
    ([rule(Type="X")], "unknown key(s) Type"),
    (["not a rule"], "rule at index 0: a rule must be an object"),
], ids=["direct-cycle", "indirect-cycle", "unknown-id", "unknown-operator", "missing-tag",
        "missing-rules", "empty-rules", "missing-type", "short-tag", "string-tag",
        "bad-index", "bad-value-tag", "regexp-value-tag", "bad-regexp", "lt-literal-not-number",
        "approx-literal-not-number", "negative-approx-level", "approx-level-elsewhere",
        "missing-value", "bad-negate", "unknown-clause-key", "ref-with-extra-key",
        "duplicate-id", "bad-check", "unknown-rule-key", "rule-not-object"])
def test_load_errors(rules: list, message: str) -> None:
    with pytest.raises(RuleError) as raised:
        RuleSet.from_rules(rules, source="rules.json")
    assert message in str(raised.value)
    assert str(raised.value).startswith("rules.json: ")


@pytest.mark.parametrize("text, message", [
    ("[{", "cannot read rules"),
    ('{"type": "X"}', "must be a JSON array"),
])
def test_load_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "classifyRules.json"
    path.write_text(text)
    with pytest.raises(RuleError, match=message):
        RuleSet.load(path)


def test_load_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "classifyRules.json"
    path.write_text(json.dumps([rule("MR", check="SeriesLevel")]))
    rules = RuleSet.load(path)
    assert rules.classify({}, mr()) == ["MR"]
    assert rules.series_level == frozenset({"MR"})


# --- the shipped rule set -------------------------------------------------------------------

def non_image(sop_class: str, modality: str, **fields: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    return ds


SHIPPED_CASES = [
    ("siemens-axial-t1", mr(), {},
     {"SIEMENS", "axial", "original", "T1"},
     {"GE", "sagittal", "coronal", "oblique", "T2", "FLAIR", "DWI", "CHECKBURNEDINFO"}),
    ("sagittal", mr(ImageOrientationPatient=SAGITTAL, SeriesDescription="t1_mprage_sag"), {},
     {"sagittal", "T1"}, {"axial", "coronal", "oblique"}),
    ("coronal", mr(ImageOrientationPatient=CORONAL), {}, {"coronal"},
     {"axial", "sagittal", "oblique"}),
    ("oblique", mr(ImageOrientationPatient=OBLIQUE_30), {}, {"oblique"},
     {"axial", "coronal", "sagittal"}),
    ("no-orientation-not-oblique", mr(ImageOrientationPatient=None), {}, {"T1"},
     {"axial", "coronal", "sagittal", "oblique"}),
    ("secondary-capture", non_image("1.2.840.10008.5.1.4.1.1.7", "OT",
                                    ImageType=["DERIVED", "SECONDARY"]), {},
     {"CHECKBURNEDINFO", "derived"}, {"original", "SR"}),
    ("multiframe-secondary-capture", non_image("1.2.840.10008.5.1.4.1.1.7.4", "OT"), {},
     {"CHECKBURNEDINFO"}, set()),
    ("burned-in-annotation", mr(BurnedInAnnotation="YES"), {}, {"CHECKBURNEDINFO"}, set()),
    ("ultrasound", non_image("1.2.840.10008.5.1.4.1.1.6.1", "US"), {}, {"CHECKBURNEDINFO"},
     set()),
    ("structured-report", non_image("1.2.840.10008.5.1.4.1.1.88.22", "SR"), {}, {"SR"},
     {"CHECKBURNEDINFO", "PR"}),
    ("presentation-state", non_image("1.2.840.10008.5.1.4.1.1.11.1", "PR"), {}, {"PR"}, {"SR"}),
    ("physio", non_image("1.3.12.2.1107.5.9.1", "MR", Manufacturer="SIEMENS"), {},
     {"Physio", "SIEMENS"}, {"T1", "T2"}),
    ("siemens-dwi", mr(SeriesDescription="ep2d_diff_mddw_20", SequenceName="*ep_b1000#1",
                       RepetitionTime="5000", EchoTime="89", ScanningSequence="EP",
                       ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"]),
     {}, {"DWI", "mosaic"}, {"T2", "T1", "fMRI"}),
    ("siemens-bold", mr(SeriesDescription="rest_bold", SequenceName="*epfid2d1_64",
                        RepetitionTime="2000", EchoTime="30", ScanningSequence="EP",
                        ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]),
     {}, {"fMRI", "mosaic"}, {"DWI", "T1", "T2"}),
    ("ge-t2-by-timing", mr(Manufacturer="GE MEDICAL SYSTEMS", SeriesDescription="Ax FSE",
                           SequenceName=None, RepetitionTime="4000", EchoTime="100",
                           ScanningSequence="SE"),
     {}, {"GE", "T2", "axial"}, {"SIEMENS", "T1", "FLAIR"}),
    ("philips-flair", mr(Manufacturer="Philips Medical Systems", SeriesDescription="3D_FLAIR",
                         SequenceName=None, RepetitionTime="4800", EchoTime="300",
                         InversionTime="1650", ScanningSequence=["SE", "IR"]),
     {}, {"PHILIPS", "FLAIR"}, {"T1"}),
    ("localizer", mr(SeriesDescription="AAHead_Scout", SequenceName="*fl2d1",
                     RepetitionTime="8.6", EchoTime="4"), {},
     {"localizer"}, {"T1"}),
    ("record-values-first", mr(SeriesDescription="unnamed", SequenceName=None,
                               RepetitionTime="500", EchoTime="10"),
     {"ClassifyType": [], "NumFiles": 3}, {"T1"}, {"T2"}),
]


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    return RuleSet.load(SHIPPED_RULES)


def test_shipped_rules_have_required_types_ids_descriptions() -> None:
    raw = json.loads(SHIPPED_RULES.read_text())
    required = {"SIEMENS", "GE", "PHILIPS", "mosaic", "localizer", "axial", "coronal",
                "sagittal", "oblique", "original", "derived", "CHECKBURNEDINFO", "Physio",
                "DWI", "T1", "T2", "FLAIR", "fMRI", "SR", "PR"}
    assert required <= {r["type"] for r in raw}
    assert all(r.get("id") and r.get("description") for r in raw)


@pytest.mark.parametrize("ds, record, present, absent",
                         [case[1:] for case in SHIPPED_CASES],
                         ids=[case[0] for case in SHIPPED_CASES])
def test_shipped_rules(shipped: RuleSet, ds: Dataset, record: dict, present: set[str],
                       absent: set[str]) -> None:
    labels = shipped.classify(record, ds)
    assert len(labels) == len(set(labels))
    assert present <= set(labels), format_explanation(shipped.explain(record, ds))
    assert not absent & set(labels), format_explanation(shipped.explain(record, ds))
