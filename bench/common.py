"""What the benchmarks share: progress lines, the corpus, counting results, and a scratch
folder that is removed (or kept with --keep) however the run ends."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from tests.dicomgen import make_study


def progress(text: str) -> None:
    print(text, flush=True)


def count_files(root: Path) -> int:
    """Finished files under `root`; temporary '.tmp.*' names of writers in flight excluded."""
    return sum(1 for _dir, _subs, names in os.walk(root)
               for name in names if not name.startswith("."))


def make_corpus(root: Path, images: int, n_series: int) -> list[Path]:
    """One study of `images` 256x256 MR images in `n_series` series under root/corpus,
    written once and reused by every run."""
    per_series = -(-images // n_series)
    study = make_study(root / "corpus", n_series, per_series, rows=256, cols=256)
    for extra in study["files"][images:]:  # images not divisible by the series count
        extra.unlink()
    return sorted(study["files"][:images])


def run_in_scratch(args: argparse.Namespace, prefix: str,
                   body: Callable[[Path], dict]) -> int:
    """Run `body(scratch folder)`, write its summary to --json, clean up (unless --keep)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        summary = body(root)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
            progress(f"results written to {args.json}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
