"""Keyed hashes of patient identifiers (HMAC-SHA256 with `secret.key`).

The system FIONA replaces stored unkeyed SHA-256 of patient IDs; an 11-digit national ID is
brute-forced from that in minutes. A keyed hash cannot be reversed without the key, which stays
on the gateway (mode 0600). A `purpose` (and for auto-ID the project) is mixed in, so a value
from one table cannot be matched against another table or project.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from ..config import read_secret


class Keyed:
    """Keyed hashing with one site's secret."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the secret key is too short (at least 16 bytes)")
        self._key = key

    @classmethod
    def from_datadir(cls, datadir: Path) -> Keyed:
        return cls(read_secret(datadir / "config" / "secret.key"))

    def hash(self, value: str, purpose: str) -> str:
        """Hex HMAC-SHA256 of `value` (surrounding spaces ignored) for one purpose; "" stays
        "" so that a missing identifier does not look like a real one."""
        text = (value or "").strip()
        if not text:
            return ""
        message = f"{purpose}\x00{text}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def patient_name(self, name: str) -> str:
        return self.hash(name, "PatientName")

    def patient_id(self, patient_id: str) -> str:
        return self.hash(patient_id, "PatientID")

    def autoid(self, project: str, patient_id: str) -> str:
        return self.hash(patient_id, f"AutoID:{project}")

    def fingerprint(self) -> str:
        """Names the key without revealing it: the HMAC of a fixed text, so nodes can check
        that they share one key (auto-ID and patient hashes are comparable only then)."""
        return "hmac-sha256:" + self.hash("FIONA region key", "KeyFingerprint")[:32]

    def ref(self, value: str) -> str:
        """A short reference to an identifier for log lines: the same value always gives the
        same reference, so lines can be followed, but the value cannot be read back and the
        reference matches no stored hash (it has its own purpose)."""
        return "ref:" + self.hash(value, "LogReference")[:12]

    def redact(self, text: str, *identifiers: str) -> str:
        """`text` with each identifier replaced by its reference wherever it occurs, and each
        part of a person name (`Doe^Jane`) wherever it stands as a word, whatever the case:
        for log lines that quote an error or a tool's output that may name the patient."""
        whole: set[str] = set()
        words: set[str] = set()
        for value in identifiers:
            value = (value or "").strip()
            if value:
                whole.add(value)
                words.update(p for p in re.split(r"[\^\s,]+", value) if len(p) > 1)
        if not whole:
            return text
        refs = {p.lower(): self.ref(p) for p in whole | words}
        letter_around = r"(?<![^\W\d_]){}(?![^\W\d_])"
        pattern = "|".join(
            [re.escape(v) for v in sorted(whole, key=len, reverse=True)] +
            [letter_around.format(re.escape(w)) for w in sorted(words, key=len, reverse=True)])
        return re.sub(pattern, lambda m: refs[m.group(0).lower()], text, flags=re.IGNORECASE)
