"""Review: every DICOM tag in a project's de-identified output with its distinct values and
counts, read from the project's destination (a folder, or the research PACS) by
`fiona.review.source`, with the number of files the figures are based on."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from ..review import source
from .context import Ctx, ctx, current_user, render
from .users import User

router = APIRouter()


def review(c: Ctx, project: str) -> dict:
    """The figures of an existing project (`_allowed` checked it), as the page and API show."""
    found = next(p for p in c.control.projects() if p.name == project)
    return source.review(c.config, c.control, found, c.datadir).as_dict()


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
