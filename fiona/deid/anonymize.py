"""De-identify a folder of DICOM files into another folder (`fiona anonymize`).

`anonymize_folder(in_dir, out_dir, settings, profile)` walks `in_dir` (sorted, recursively),
de-identifies every DICOM file through one `Pipeline` (the forwarder's), which gates the exact
bytes of each result, and writes `<out>/<mapped SeriesInstanceUID>/<mapped SOPInstanceUID>.dcm`
(atomically: a temporary name, then a rename). Files that are not DICOM, DICOMDIRs and objects
without SOP/Series Instance UID are skipped with a note; a file that fails to de-identify is
listed as failed (with the exception's type only: messages can quote values). Two inputs with the
same SOP Instance UID map to the same output name: the second is reported as a duplicate and
not written (a file left by an earlier run is overwritten: the output is deterministic). A
GateError stops everything: every file this run wrote is removed (and the folders it created),
then the error is raised.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .engine import Settings, site_profile, with_profile
from .gate import GateError
from .pipeline import Pipeline, Unreadable, read


@dataclass
class Report:
    out_dir: Path
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (path, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)      # (path, exception type)
    duplicates: list[str] = field(default_factory=list)
    series: dict[str, int] = field(default_factory=dict)             # mapped series -> files
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return {"written": self.written, "skipped": len(self.skipped),
                "failed": len(self.failed), "duplicates": len(self.duplicates),
                "series": len(self.series)}

    def summary(self) -> str:
        c = self.counts
        return (f"{c['written']} files in {c['series']} series written to {self.out_dir}; "
                f"{c['skipped']} skipped, {c['duplicates']} duplicates, {c['failed']} failed "
                f"({self.seconds:.1f} s)")


def _files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def anonymize_folder(in_dir: str | Path, out_dir: str | Path, settings: Settings,
                     profile: dict | str | None = None) -> Report:
    """De-identify every DICOM file under `in_dir` into `out_dir` (see the module doc)."""
    started = time.monotonic()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input folder {in_dir} does not exist")
    pipeline = Pipeline(with_profile(settings, profile))
    report = Report(out_dir)
    created_dirs: list[Path] = []
    written: list[Path] = []
    seen: set[Path] = set()
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        created_dirs.append(out_dir)
    try:
        for path in _files(in_dir):
            rel = str(path.relative_to(in_dir))
            try:
                result = pipeline.process(read(path))
                series, sop = result.series_uid, result.sop_uid
            except Unreadable as exc:
                report.skipped.append((rel, str(exc)))
                continue
            except GateError:
                raise
            except Exception as exc:  # one bad object must not stop the folder
                report.failed.append((rel, type(exc).__name__))
                continue
            encoded = result.encoded
            target_dir = out_dir / series
            target = target_dir / f"{sop}.dcm"
            if target in seen:
                report.duplicates.append(rel)
                continue
            if not target_dir.exists():
                target_dir.mkdir()
                created_dirs.append(target_dir)
            tmp = target_dir / f".{sop}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(encoded)
            os.replace(tmp, target)
            written.append(target)
            seen.add(target)
            report.written += 1
            report.series[series] = report.series.get(series, 0) + 1
    except GateError:
        for p in written:
            p.unlink(missing_ok=True)
        for d in reversed(created_dirs):
            for leftover in d.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    report.seconds = time.monotonic() - started
    return report


def cli_anonymize(config, args) -> int:
    """`fiona anonymize --project P --participant ID [--event E] [--profile NAME] IN OUT`.
    Exit 0 done, 1 stopped by the gate or some files failed, 2 bad arguments or profile."""
    from ..config import read_secret

    key = read_secret(Path(config.datadir) / "config" / "secret.key")
    try:
        profile = site_profile(args.profile or "default", config.datadir)
        settings = Settings(project=args.project, participant=args.participant, key=key,
                            event=args.event or "")
        report = anonymize_folder(args.in_dir, args.out_dir, settings, profile)
    except GateError as exc:
        print(f"fiona anonymize: stopped by the verification gate: {exc}; nothing was written",
              file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"fiona anonymize: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    for rel, reason in report.skipped:
        print(f"  skipped {rel}: {reason}")
    for rel, reason in report.failed:
        print(f"  failed {rel}: {reason}")
    for rel in report.duplicates:
        print(f"  duplicate {rel}: same SOP Instance UID as an earlier file")
    return 1 if report.failed else 0
