"""Classification rules (`classifyRules.json`, SPEC §4): label each image of a series.

A rule file is a JSON array of rules `{type, id?, description?, check?, rules: [clause...]}`.
All clauses of a rule must hold; rules with the same `type` are alternatives. Rules run in file
order for each image and every rule that holds adds its `type` to the image's labels, so a later
rule can test the labels of earlier ones through the tag `["ClassifyType"]`.

Everything that can be checked without an image is checked at load (unknown operator or key, bad
tag form, bad regular expression, non-numeric literal for `<`/`>`/`approx`, unknown rule id,
reference cycle), because the indexer runs unattended: a broken rule file must stop it at start
with a message naming the rule, not mislabel thousands of series. The old engine crashed on
`exist`/`notexist` and counted number-parse errors as matches; here both are plain failures.

Choices the spec leaves open:
- *Missing*: an absent element or record key, or one whose value is None, "" or [], is missing.
  A missing tag (or a missing `value` reference) fails every operator except `notexist`, `!=`
  included: "not equal to X" is not claimed about a value nobody sent. Use `negate` on `==` to
  mean "absent or not X".
- *Multi-valued elements* are tested as the DICOM encoding would show them: `regexp` searches the
  values joined with a backslash (`^ORIGINAL` tests the first value of ImageType, `MOSAIC` any).
  `==`/`!=` compare value by value when both sides have the same number of values (each pair as
  numbers when both parse, else as text) and otherwise compare the backslash-joined texts, so
  `"ORIGINAL\\PRIMARY"` equals a two-valued ImageType. `contains` is membership for multi-valued
  elements and record lists (ClassifyType) and substring search for single values. `<` and `>`
  need exactly one number on each side (index a multi-valued element with a third tag part).
  `approx` needs the same number of values on both sides.
- A `value` that is a list of strings is a tag reference (compare two elements). A literal list
  (for `==`, `!=` or `approx`) therefore needs at least one JSON number, e.g. `[1, 0, 0]`; to
  compare a multi-valued text element, write its DICOM form `"ORIGINAL\\PRIMARY"`.
- `["ClassifyType"]` is the labels set so far for *this* image, not the series record's list,
  so an image's labels do not depend on the images that came before it.
- `["Keyword"]` looks in the record first and falls back to the DICOM element when the record
  has no (or an empty) value; `["0xGGGG","0xEEEE"]` always reads the DICOM element.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, MutableSequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag, Tag

#: the default rule set, package data (so a plain `pip install .` has it); `fiona init` copies it
#: to DATADIR/config/classifyRules.json for a site to edit
SHIPPED_RULES = resources.files("fiona.index") / "classifyRules.json"

SERIES_LEVEL = "SeriesLevel"
DEFAULT_APPROX_LEVEL = 1e-4
OPERATORS = ("regexp", "==", "!=", "<", ">", "contains", "approx", "exist", "notexist")

_RULE_KEYS = {"type", "id", "description", "check", "rules"}
_CLAUSE_KEYS = {"tag", "value", "operator", "negate", "approxLevel"}
_HEX = re.compile(r"^0x[0-9A-Fa-f]{1,4}$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_INDEX = re.compile(r"^[0-9]+$")


class RuleError(Exception):
    """A rule file that cannot be used; the message names the rule and the fault."""


@dataclass(frozen=True)
class ClauseResult:
    """One clause as evaluated on one image: what it tested, what it found, whether it held."""

    test: str
    found: str
    held: bool


@dataclass(frozen=True)
class Explanation:
    """One rule as evaluated on one image, for `fiona classify --test`."""

    type: str
    rule_id: str | None
    held: bool
    clauses: list[ClauseResult]


# --- values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Values:
    """A non-empty value in one shape for every operator: its items, and whether it was a list
    (multi-valued element or record list) or a single value."""

    items: tuple[object, ...]
    multi: bool

    def text(self) -> str:
        """The value as DICOM encodes it: items joined with a backslash."""
        return "\\".join(str(item) for item in self.items)

    def show(self) -> str:
        """The value for a person reading an explanation."""
        return repr([str(i) for i in self.items]) if self.multi else repr(str(self.items[0]))

    @cached_property
    def numbers(self) -> tuple[float | None, ...]:
        """Each item as a number (None where it does not parse), worked out once: a value is
        compared with many literals, and a failed parse costs an exception."""
        return tuple(map(_number, self.items))

    def equal_at(self, i: int, other: _Values, j: int) -> bool:
        """Item i equals the other's item j: as numbers when both parse ("1.0" == 1), else
        as text."""
        x, y = self.numbers[i], other.numbers[j]
        if x is not None and y is not None:
            return x == y
        return str(self.items[i]) == str(other.items[j])


def _values(raw: object) -> _Values | None:
    """`raw` (a record value, pydicom value or DataElement) as _Values, None when missing/empty."""
    if isinstance(raw, DataElement):
        raw = raw.value
    if isinstance(raw, (list, tuple, MutableSequence)):
        items = tuple(_item(value) for value in raw)
        return _Values(items, multi=True) if items else None
    item = _item(raw)
    return None if item is None or item == "" else _Values((item,), multi=False)


def _item(value: object) -> object:
    """One value made comparable: undecoded bytes (UN, private tags) become text, person names
    become their string; numbers stay numbers so that `==` can compare them numerically."""
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


def _number(value: object) -> float | None:
    """`value` as a finite float, or None: a value that does not parse never matches `<`, `>`
    or `approx` (the old engine treated parse errors as matches)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value) if isinstance(value, (int, float)) else float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _numbers(values: _Values) -> list[float] | None:
    """Every item as a number, or None when any item does not parse."""
    numbers = [n for n in values.numbers if n is not None]
    return numbers if len(numbers) == len(values.items) else None


# --- tags ---------------------------------------------------------------------------------


@dataclass
class _Image:
    """What a clause can look at: the series record, the image's dataset, the labels so far,
    and the values already resolved. The shipped rules test ~48 clauses per image on a dozen
    tags (Modality alone 14 times), so each tag is resolved once per image."""

    record: Mapping[str, object]
    ds: Dataset
    labels: list[str]
    resolved: dict[_TagRef, _Values | None] = field(default_factory=dict)


@dataclass(frozen=True)
class _TagRef:
    """A parsed tag form: `["Keyword"]`, `["0xGGGG","0xEEEE"]` or `["0xGGGG","0xEEEE","i"]`."""

    keyword: str | None
    tag: BaseTag | None
    index: int | None

    def show(self) -> str:
        if self.keyword is not None:
            return self.keyword
        assert self.tag is not None          # `_parse_tag` sets the keyword or the tag
        text = f"({self.tag.group:04X},{self.tag.element:04X})"
        return text if self.index is None else f"{text}[{self.index}]"

    def resolve(self, image: _Image) -> _Values | None:
        if self.keyword == "ClassifyType":  # changes as rules hold: never kept
            return _values(image.labels)
        try:
            return image.resolved[self]
        except KeyError:
            found = image.resolved[self] = self._lookup(image)
            return found

    def _lookup(self, image: _Image) -> _Values | None:
        if self.keyword is not None:
            return self._by_keyword(image, self.keyword)
        assert self.tag is not None          # `_parse_tag` sets the keyword or the tag
        found = _values(image.ds.get(self.tag))
        if found is None or self.index is None:
            return found
        if self.index < len(found.items):
            return _values(found.items[self.index])
        return None

    def _by_keyword(self, image: _Image, keyword: str) -> _Values | None:
        found = _values(image.record.get(keyword))
        if found is not None:
            return found
        tag = tag_for_keyword(keyword)  # not ds.get(keyword): that also finds methods
        return None if tag is None else _values(image.ds.get(tag))


def _parse_tag(form: object, where: str) -> _TagRef:
    """A tag form from the rule file, or RuleError saying what is wrong with it."""
    if not isinstance(form, list) or not all(isinstance(p, str) for p in form):
        raise RuleError(f"{where}: a tag must be a list of strings, got {form!r}")
    if len(form) == 1 and _KEYWORD.match(form[0]):
        return _TagRef(keyword=form[0], tag=None, index=None)
    if len(form) in (2, 3) and _HEX.match(form[0]) and _HEX.match(form[1]):
        if len(form) == 3 and not _INDEX.match(form[2]):
            raise RuleError(f"{where}: tag index {form[2]!r} is not a non-negative integer")
        index = int(form[2]) if len(form) == 3 else None
        return _TagRef(keyword=None, tag=Tag(int(form[0], 16), int(form[1], 16)), index=index)
    raise RuleError(f"{where}: bad tag {form!r}; use [\"Keyword\"], [\"0x0008\",\"0x0070\"] "
                    f"or [\"0x0020\",\"0x0037\",\"2\"]")


# --- operators ----------------------------------------------------------------------------


def _single_numbers(found: _Values, expected: _Values) -> tuple[float, float] | None:
    """Both sides as one number each, or None: `<` and `>` compare exactly one number."""
    if len(found.items) != 1 or len(expected.items) != 1:
        return None
    a, b = found.numbers[0], expected.numbers[0]
    return None if a is None or b is None else (a, b)


def _equal(found: _Values, expected: _Values, _clause: _TagClause) -> bool:
    if len(found.items) == len(expected.items):
        return all(found.equal_at(i, expected, i) for i in range(len(found.items)))
    return found.text() == expected.text()


def _not_equal(found: _Values, expected: _Values, clause: _TagClause) -> bool:
    return not _equal(found, expected, clause)


def _less(found: _Values, expected: _Values, _clause: _TagClause) -> bool:
    pair = _single_numbers(found, expected)
    return pair is not None and pair[0] < pair[1]


def _greater(found: _Values, expected: _Values, _clause: _TagClause) -> bool:
    pair = _single_numbers(found, expected)
    return pair is not None and pair[0] > pair[1]


def _regexp(found: _Values, _expected: _Values, clause: _TagClause) -> bool:
    assert clause.pattern is not None    # `_parse_clause` compiles it for every regexp
    return clause.pattern.search(found.text()) is not None


def _contains(found: _Values, expected: _Values, _clause: _TagClause) -> bool:
    """A multi-valued value holds an item equal to the reference, a single one holds its text
    (a multi-valued reference stands for its DICOM text)."""
    single = len(expected.items) == 1
    if not found.multi:
        return (str(expected.items[0]) if single else expected.text()) in found.text()
    if single:
        return any(found.equal_at(i, expected, 0) for i in range(len(found.items)))
    return any(str(item) == expected.text() for item in found.items)


def _approx(found: _Values, expected: _Values, clause: _TagClause) -> bool:
    a, b = _numbers(found), _numbers(expected)
    if a is None or b is None or len(a) != len(b):
        return False
    return all(abs(x - y) <= clause.approx_level for x, y in zip(a, b, strict=True))


_COMPARE: dict[str, Callable[[_Values, _Values, _TagClause], bool]] = {
    "regexp": _regexp, "==": _equal, "!=": _not_equal, "<": _less, ">": _greater,
    "contains": _contains, "approx": _approx,
}


# --- clauses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TagClause:
    """`{tag, value, operator?, negate?, approxLevel?}`."""

    tag: _TagRef
    operator: str
    value: _Values | _TagRef | None
    negate: bool
    approx_level: float
    pattern: re.Pattern[str] | None

    def holds(self, image: _Image) -> bool:
        """The outcome alone: classify() runs per image, so it skips building the text."""
        return self._outcome(*self._resolve(image)) != self.negate

    def check(self, image: _Image) -> ClauseResult:
        """The outcome with what was tested and found, for explain()."""
        found, expected = self._resolve(image)
        held = self._outcome(found, expected) != self.negate
        shown = "<missing>" if found is None else found.show()
        if isinstance(self.value, _TagRef):
            shown += " vs " + ("<missing>" if expected is None else expected.show())
        return ClauseResult(test=self._describe(), found=shown, held=held)

    def _resolve(self, image: _Image) -> tuple[_Values | None, _Values | None]:
        found = self.tag.resolve(image)
        expected = self.value.resolve(image) if isinstance(self.value, _TagRef) else self.value
        return found, expected

    def _outcome(self, found: _Values | None, expected: _Values | None) -> bool:
        if self.operator == "exist":
            return found is not None
        if self.operator == "notexist":
            return found is None
        if found is None or expected is None:
            return False
        return _COMPARE[self.operator](found, expected, self)

    def _describe(self) -> str:
        text = f"{self.tag.show()} {self.operator}"
        if self.value is not None:
            text += f" {self.value.show()}"
        if self.operator == "approx":
            text += f" ±{self.approx_level:g}"
        return f"not ({text})" if self.negate else text


@dataclass(frozen=True)
class _RefClause:
    """`{rule: ID}` or, with `negate`, `{notrule: ID}`: the referenced rule as a whole."""

    rule_id: str
    negate: bool


_Clause = _TagClause | _RefClause


def _parse_negate(raw: object, where: str) -> bool:
    if raw in (True, "yes"):
        return True
    if raw in (False, "no"):
        return False
    raise RuleError(f"{where}: negate must be \"yes\", \"no\", true or false, got {raw!r}")


def _parse_literal(raw: object, operator: str, where: str) -> _Values:
    """A literal `value` checked against what its operator can use."""
    scalar = (str, int, float)
    if isinstance(raw, bool) or raw is None:
        raise RuleError(f"{where}: value {raw!r} is not a string or number")
    if isinstance(raw, list):
        if operator not in ("==", "!=", "approx") or not raw:
            raise RuleError(f"{where}: operator {operator} takes a single value, got {raw!r}")
        if not all(isinstance(v, scalar) and not isinstance(v, bool) for v in raw):
            raise RuleError(f"{where}: value {raw!r} must hold strings or numbers")
        values = _Values(tuple(raw), multi=True)
    elif isinstance(raw, scalar):
        values = _Values((raw,), multi=False)
    else:
        raise RuleError(f"{where}: value {raw!r} is not a string, number or tag")
    if operator in ("<", ">", "approx") and _numbers(values) is None:
        raise RuleError(f"{where}: operator {operator} needs a number, got {raw!r}")
    return values


def _parse_value(clause: dict, operator: str, where: str) -> _Values | _TagRef | None:
    """The clause's `value`: a literal, a tag reference (a list of strings), or None for
    `exist`/`notexist`, which test presence only."""
    if operator in ("exist", "notexist"):
        return None
    if "value" not in clause:
        raise RuleError(f"{where}: operator {operator} needs a value")
    raw = clause["value"]
    if isinstance(raw, list) and raw and all(isinstance(v, str) for v in raw):
        if operator == "regexp":
            raise RuleError(f"{where}: regexp needs a pattern string, not the tag {raw!r}")
        return _parse_tag(raw, f"{where} (value)")
    return _parse_literal(raw, operator, where)


def _parse_approx_level(clause: dict, operator: str, where: str) -> float:
    if "approxLevel" not in clause:
        return DEFAULT_APPROX_LEVEL
    if operator != "approx":
        raise RuleError(f"{where}: approxLevel only applies to operator approx")
    level = _number(clause["approxLevel"])
    if level is None or level < 0:
        raise RuleError(f"{where}: approxLevel must be a non-negative number, "
                        f"got {clause['approxLevel']!r}")
    return level


def _parse_clause(clause: object, where: str) -> _Clause:
    if not isinstance(clause, dict):
        raise RuleError(f"{where}: a clause must be an object, got {clause!r}")
    for key in ("rule", "notrule"):
        if key in clause:
            if len(clause) != 1 or not isinstance(clause[key], str) or not clause[key]:
                raise RuleError(f"{where}: a {key} clause is {{\"{key}\": \"<rule id>\"}} only")
            return _RefClause(rule_id=clause[key], negate=key == "notrule")
    unknown = sorted(set(clause) - _CLAUSE_KEYS)
    if unknown:
        raise RuleError(f"{where}: unknown clause key(s) {', '.join(unknown)}")
    if "tag" not in clause:
        raise RuleError(f"{where}: clause has no tag (nor rule/notrule)")
    operator = clause.get("operator", "regexp")
    if operator not in OPERATORS:
        raise RuleError(f"{where}: unknown operator {operator!r}; "
                        f"use one of {', '.join(OPERATORS)}")
    value = _parse_value(clause, operator, where)
    pattern = None
    if operator == "regexp":
        try:
            # `_parse_value` gives a literal for regexp: never None, never a tag reference
            assert isinstance(value, _Values)
            pattern = re.compile(str(value.items[0]))
        except re.error as err:
            raise RuleError(f"{where}: bad regular expression {clause['value']!r}: {err}") from err
    return _TagClause(tag=_parse_tag(clause["tag"], where), operator=operator, value=value,
                      negate=_parse_negate(clause.get("negate", False), where),
                      approx_level=_parse_approx_level(clause, operator, where), pattern=pattern)


# --- rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    name: str  # how messages name the rule: its id, or its index and type
    type: str
    id: str | None
    series_level: bool
    clauses: tuple[_Clause, ...]


def _rule_name(raw: object, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"]:
        return f"rule {raw['id']!r}"
    kind = raw.get("type") if isinstance(raw, dict) else None
    return f"rule at index {index}" + (f" (type {kind!r})" if isinstance(kind, str) else "")


def _parse_rule(raw: object, index: int, source: str) -> _Rule:
    name = _rule_name(raw, index)
    where = f"{source}: {name}"
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: a rule must be an object, got {raw!r}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for key in ("type", "id", "description"):
        if key in raw and (not isinstance(raw[key], str)
                           or (key != "description" and not raw[key])):
            raise RuleError(f"{where}: {key} must be a non-empty string, got {raw[key]!r}")
    if "type" not in raw:
        raise RuleError(f"{where}: missing type")
    if raw.get("check", SERIES_LEVEL) != SERIES_LEVEL:
        raise RuleError(f"{where}: check must be {SERIES_LEVEL!r}, got {raw['check']!r}")
    clauses = raw.get("rules")
    if not isinstance(clauses, list) or not clauses:
        raise RuleError(f"{where}: rules must be a non-empty list of clauses")
    parsed = tuple(_parse_clause(c, f"{where}, clause {i}") for i, c in enumerate(clauses))
    return _Rule(name=name, type=raw["type"], id=raw.get("id"),
                 series_level="check" in raw, clauses=parsed)


def _index_by_id(rules: list[_Rule], source: str) -> dict[str, _Rule]:
    by_id: dict[str, _Rule] = {}
    for rule in rules:
        if rule.id is None:
            continue
        if rule.id in by_id:
            raise RuleError(f"{source}: {rule.name}: the id is used by two rules")
        by_id[rule.id] = rule
    for rule in rules:
        for clause in rule.clauses:
            if isinstance(clause, _RefClause) and clause.rule_id not in by_id:
                raise RuleError(f"{source}: {rule.name}: refers to unknown rule id "
                                f"{clause.rule_id!r}")
    return by_id


def _check_cycles(by_id: dict[str, _Rule], source: str) -> None:
    """RuleError naming the rules of the first reference cycle: evaluating one would recurse
    forever."""
    done: set[str] = set()

    def visit(rule_id: str, path: list[str]) -> None:
        if rule_id in path:
            cycle = " -> ".join(path[path.index(rule_id):] + [rule_id])
            raise RuleError(f"{source}: {by_id[rule_id].name}: reference cycle {cycle}")
        if rule_id in done:
            return
        for clause in by_id[rule_id].clauses:
            if isinstance(clause, _RefClause):
                visit(clause.rule_id, path + [rule_id])
        done.add(rule_id)

    for rule_id in by_id:
        visit(rule_id, [])


@dataclass(frozen=True)
class RuleInputs:
    """Everything the rules can read of an image apart from its labels so far: the record
    names of `["Keyword"]` tags and the DICOM tags of `["0xGGGG","0xEEEE"]` ones. Two images
    that agree on all of them get the same labels."""

    keywords: tuple[str, ...]
    tags: tuple[BaseTag, ...]


def _inputs(rules: tuple[_Rule, ...]) -> RuleInputs:
    refs = [ref for rule in rules for clause in rule.clauses if isinstance(clause, _TagClause)
            for ref in (clause.tag, clause.value) if isinstance(ref, _TagRef)]
    keywords = {ref.keyword for ref in refs
                if ref.keyword is not None and ref.keyword != "ClassifyType"}
    tags = {ref.tag for ref in refs if ref.tag is not None}
    return RuleInputs(keywords=tuple(sorted(keywords)), tags=tuple(sorted(tags)))


class RuleSet:
    """A validated rule file, ready to label images."""

    def __init__(self, rules: tuple[_Rule, ...], by_id: dict[str, _Rule]) -> None:
        self._rules = rules
        self._by_id = by_id
        self.series_level: frozenset[str] = frozenset(r.type for r in rules if r.series_level)
        self.inputs = _inputs(rules)

    @classmethod
    def load(cls, path: Path | Traversable) -> RuleSet:
        """The rules in the JSON file at `path`; RuleError if the file is unreadable or wrong."""
        try:
            source = Path(path) if isinstance(path, str) else path
            rules = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RuleError(f"{path}: cannot read rules: {err}") from err
        if not isinstance(rules, list):
            raise RuleError(f"{path}: the rule file must be a JSON array of rules")
        return cls.from_rules(rules, source=str(path))

    @classmethod
    def shipped(cls) -> RuleSet:
        """The default rules shipped with FIONA (package data, see SHIPPED_RULES)."""
        return cls.load(SHIPPED_RULES)

    @classmethod
    def from_rules(cls, rules: list[dict], source: str = "<rules>") -> RuleSet:
        """Rules already read from JSON; `source` names them in error messages."""
        parsed = [_parse_rule(raw, index, source) for index, raw in enumerate(rules)]
        by_id = _index_by_id(parsed, source)
        _check_cycles(by_id, source)
        return cls(tuple(parsed), by_id)

    def classify(self, record: Mapping[str, object], ds: Dataset) -> list[str]:
        """The labels of one image, in rule order, each once."""
        image = _Image(record=record, ds=ds, labels=[])
        for rule in self._rules:
            if rule.type not in image.labels and self._holds(rule, image):
                image.labels.append(rule.type)
        return image.labels

    def explain(self, record: Mapping[str, object], ds: Dataset) -> list[Explanation]:
        """Every rule with the outcome of each of its clauses on one image, in rule order."""
        image = _Image(record=record, ds=ds, labels=[])
        explanations = []
        for rule in self._rules:
            results = self._results(rule, image)
            held = all(result.held for result in results)
            if held and rule.type not in image.labels:
                image.labels.append(rule.type)
            explanations.append(Explanation(type=rule.type, rule_id=rule.id, held=held,
                                            clauses=results))
        return explanations

    def _holds(self, rule: _Rule, image: _Image) -> bool:
        """Whether every clause holds, stopping at the first that does not."""
        return all(self._clause_holds(clause, image) for clause in rule.clauses)

    def _clause_holds(self, clause: _Clause, image: _Image) -> bool:
        if isinstance(clause, _TagClause):
            return clause.holds(image)
        return self._holds(self._by_id[clause.rule_id], image) != clause.negate

    def _results(self, rule: _Rule, image: _Image) -> list[ClauseResult]:
        """Every clause's outcome with what it tested and found."""
        results = []
        for clause in rule.clauses:
            if isinstance(clause, _TagClause):
                results.append(clause.check(image))
                continue
            referenced = self._holds(self._by_id[clause.rule_id], image)
            test = f"{'notrule' if clause.negate else 'rule'} {clause.rule_id!r}"
            results.append(ClauseResult(test=test,
                                        found="held" if referenced else "did not hold",
                                        held=referenced != clause.negate))
        return results


def _rule_label(explanation: Explanation, index: int) -> str:
    return (f"rule {explanation.rule_id!r}" if explanation.rule_id
            else f"rule at index {index}")


def format_explanation(explanations: list[Explanation]) -> str:
    """Text for `fiona classify --test`: the labels, the clauses of every rule that set one,
    and for every rule that did not hold the first clause that failed."""
    labels = list(dict.fromkeys(e.type for e in explanations if e.held))
    lines = [f"labels: {', '.join(labels) if labels else '(none)'}"]
    for label in labels:
        lines.append(f"{label}:")
        for index, explanation in enumerate(explanations):
            if explanation.held and explanation.type == label:
                lines.append(f"  set by {_rule_label(explanation, index)}")
                lines.extend(f"    {c.test}  (found {c.found})" for c in explanation.clauses)
    failed = [(i, e) for i, e in enumerate(explanations) if not e.held]
    if failed:
        lines.append("rules that did not hold:")
    for index, explanation in failed:
        first = next(c for c in explanation.clauses if not c.held)
        lines.append(f"  {explanation.type} ({_rule_label(explanation, index)}): "
                     f"{first.test}  (found {first.found})")
    return "\n".join(lines)
