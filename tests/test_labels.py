"""The indexer's label memo: an image gets exactly the labels the rules give it, although the
rules run only once per distinct set of values they read (fiona/index/labels.py)."""

from __future__ import annotations

import copy

from pydicom import Dataset
from pydicom.sequence import Sequence

from dicomgen import part10, roundtrip
from fiona.index.classify import RuleSet
from fiona.index.header import ImageRecord
from fiona.index.labels import LabelMemo
from test_classify import SHIPPED_CASES, SHIPPED_RULES, mr

RULES = RuleSet.from_rules([
    {"type": "echo298", "rules": [{"tag": ["EchoTime"], "value": r"^2\.98$"}]},
    {"type": "echo-text", "rules": [{"tag": ["0x0018", "0x0081"], "value": r"^2\.98$"}]},
    {"type": "accent", "rules": [{"tag": ["SeriesDescription"], "value": "é"}]},
    {"type": "scanner1", "rules": [{"tag": ["IncomingConnection"], "value": "SCANNER1"}]},
    {"type": "original", "rules": [{"tag": ["0x0008", "0x0008", "0"], "value": "ORIGINAL"}]},
    {"type": "flip", "rules": [{"tag": ["FlipAngle"], "operator": ">", "value": 10}]},
    {"type": "referenced", "rules": [{"tag": ["ReferencedImageSequence"], "operator": "exist"}]},
])


def image(charset: str | None = None, description: bytes = b"t1", **fields: object) -> Dataset:
    """An MR header as the indexer reads it from a file: every element still raw."""
    ds = part10(mr()["SOPClassUID"].value)
    for element in mr(**fields):
        ds.add(element)
    if charset:
        ds.SpecificCharacterSet = charset
    ds.add_new("SeriesDescription", "LO", description)
    return roundtrip(ds)


class Counting(RuleSet):
    """The rules, counting how often they run."""

    runs = 0

    def classify(self, record, ds):  # type: ignore[no-untyped-def]
        Counting.runs += 1
        return super().classify(record, ds)


def test_each_image_gets_the_labels_the_rules_give_it() -> None:
    """Images that differ only in what the rules test, in every way a value can differ: its
    text ("2.980" is not "2.98" to a regexp), the character set that decodes the same bytes,
    the sender, an element read by tag, an element outside the record, a sequence."""
    seq = Dataset()
    seq.ReferencedSOPInstanceUID = "1.2.3"
    cases = [
        (image(), "SCANNER1"),
        (image(), "SCANNER1"),
        (image(EchoTime="2.980"), "SCANNER1"),
        (image(charset="ISO_IR 100", description=b"t1 \xe9"), "SCANNER1"),
        (image(charset="ISO_IR 144", description=b"t1 \xe9"), "SCANNER1"),  # Cyrillic
        (image(), "OTHER"),
        (image(ImageType=["DERIVED", "PRIMARY"]), "SCANNER1"),
        (image(FlipAngle="9"), "SCANNER1"),
        (image(FlipAngle="12"), "SCANNER1"),
        (image(ReferencedImageSequence=Sequence([seq])), "SCANNER1"),
    ]
    memo = LabelMemo(RULES)
    got = [memo.labels(ImageRecord(ds, caller), ds) for ds, caller in cases]
    want = [RULES.classify(ImageRecord(ds, caller), ds) for ds, caller in cases]
    assert got == want
    assert want[0] == ["echo298", "echo-text", "scanner1", "original"]
    assert "echo298" in want[2] and "echo-text" not in want[2]  # the record holds 2.98
    assert "accent" in want[3] and "accent" not in want[4]
    assert "scanner1" not in want[5]
    assert "original" not in want[6]
    assert "flip" in want[8] and "flip" not in want[7]
    assert "referenced" in want[9]


def test_a_value_read_before_the_memo_still_counts() -> None:
    """The indexer reads UIDs and the patient's folder name before it classifies; an element
    pydicom has already converted keys the memo by its value."""
    memo = LabelMemo(RULES)
    first = image()
    assert "echo298" in memo.labels(ImageRecord(first), first)
    other = image(EchoTime="3.5")
    assert str(other.EchoTime) == "3.5"  # converted now
    assert "echo298" not in memo.labels(ImageRecord(other), other)


def test_the_rules_run_once_per_distinct_signature() -> None:
    """A series of images differing only in what no rule reads runs the rules once."""
    Counting.runs = 0
    memo = LabelMemo(Counting.load(SHIPPED_RULES))
    series = [image(InstanceNumber=str(n), SliceLocation=str(n * 1.5)) for n in range(20)]
    labels = [memo.labels(ImageRecord(ds), ds) for ds in series]
    assert Counting.runs == 1
    assert labels == [labels[0]] * 20 and "T1" in labels[0]
    memo.labels(ImageRecord(image(EchoTime="90", RepetitionTime="5000")), series[0])
    assert Counting.runs == 2


def test_the_shipped_rules_label_every_shipped_case_the_same_with_the_memo() -> None:
    shipped = RuleSet.load(SHIPPED_RULES)
    memo = LabelMemo(shipped)
    for case in SHIPPED_CASES:
        ds = copy.deepcopy(case[1])  # the cases are shared with test_classify
        ds.file_meta = part10(ds.get("SOPClassUID", "1.2.3")).file_meta
        raw = roundtrip(ds)
        assert memo.labels(ImageRecord(raw), raw) == shipped.classify(ImageRecord(raw), raw)


def test_a_record_the_rules_have_already_read_keeps_its_signature() -> None:
    """A field outside the record (FlipAngle) that the rules looked up stays keyed by the
    element behind it, not by the record's empty answer."""
    memo = LabelMemo(RULES)
    low, high = image(FlipAngle="9"), image(FlipAngle="12")
    records = [ImageRecord(low), ImageRecord(high)]
    for record, ds in zip(records, (low, high), strict=True):
        RULES.classify(record, ds)
    assert "flip" not in memo.labels(records[0], low)
    assert "flip" in memo.labels(records[1], high)
