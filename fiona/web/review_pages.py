"""Review: every DICOM tag in a project's de-identified output (the folder destination), with
its distinct values and counts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request

from ..tree import InvalidValue, valid_uid
from .context import Ctx, ctx, current_user, render
from .users import User

router = APIRouter()
MAX_FILES = 5000


def folder_destination(c: Ctx) -> Path | None:
    dests = c.config.destinations or {}
    order = (["research"] if "research" in dests else []) + [n for n in dests if n != "research"]
    for name in order:
        if dests[name].get("type") == "folder":
            return Path(dests[name]["path"])
    return None


def _walk(ds, prefix: str, tags: dict, seen: set) -> None:
    for elem in ds:
        if elem.tag == 0x7FE00010:
            continue
        key = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
        tags.setdefault(key, {"name": elem.name, "vr": elem.VR, "values": Counter()})
        if elem.VR == "SQ":
            tags[key]["values"][f"(sequence, {len(elem.value)} items)"] += 1
            for item in elem.value:
                _walk(item, key + " > ", tags, seen)
        elif elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN"):
            tags[key]["values"][f"({elem.VR}, {len(elem.value or b'')} bytes)"] += 1
        else:
            text = str(elem.value)
            tags[key]["values"][text[:200]] += 1


def review(c: Ctx, project: str) -> dict:
    root = folder_destination(c)
    mapped = sorted({r.mapped_uid for r in c.control.requests()
                     if r.project == project and r.mapped_uid})
    tags: dict = {}
    files = 0
    if root is not None:
        for uid in mapped:
            try:
                study_dir = root / valid_uid(uid)
            except InvalidValue:
                continue
            for path in sorted(study_dir.glob("*/*.dcm")):
                if files >= MAX_FILES:
                    break
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                except Exception:
                    continue
                files += 1
                _walk(ds, "", tags, set())
    rows = [{"tag": k, "name": v["name"], "vr": v["vr"],
             "values": [{"value": val, "count": n} for val, n in v["values"].most_common()]}
            for k, v in sorted(tags.items())]
    return {"project": project, "destination": str(root) if root else None,
            "studies": len(mapped), "files": files, "tags": rows}


def _allowed(c: Ctx, user: User, project: str) -> None:
    if project not in [p.name for p in c.control.projects()]:
        raise HTTPException(404, f"no project {project!r}")
    if not user.can(project):
        raise HTTPException(403, f"you have no role in project {project}")


@router.get("/review", include_in_schema=False)
def review_index(request: Request, user: User = Depends(current_user), c: Ctx = Depends(ctx)):
    projects = [p.name for p in c.control.projects() if user.can(p.name)]
    return render(request, "review_index.html", projects=projects)


@router.get("/review/{project}", include_in_schema=False)
def review_page(request: Request, project: str, user: User = Depends(current_user),
                c: Ctx = Depends(ctx)):
    _allowed(c, user, project)
    return render(request, "review.html", data=review(c, project))


@router.get("/api/review/{project}", tags=["review"])
def api_review(project: str, user: User = Depends(current_user), c: Ctx = Depends(ctx)) -> dict:
    """Tags of a project's de-identified output with distinct values and counts."""
    _allowed(c, user, project)
    return review(c, project)
