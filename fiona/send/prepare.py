"""De-identification ahead of a study's arrival, in its quiet period (issue 10).

A study counts as arrived only after STUDY_QUIET_SECONDS without a new image; until then the
forwarder would sit idle. When the arrival of a study now being received is going to make a
request (a coupling-list row or a routing rule names it, or it is a late series of a study
already requested: `Assigner.expected`, the arrival's own rules, run without writing), the
forwarder de-identifies the study's files in that time, through the same pool and pipeline a
request uses (the gate included), into a folder of its own. When the request comes, each file
whose source, settings and series rules are still what they were is taken from there and
only the others are de-identified then (`outputs`, in the request's order): what is sent is
byte for byte what the request alone would have made, and the request decides everything.
A prediction that does not come true costs CPU time, nothing else.

What is prepared is de-identified output that passed the gate, never an unredacted copy. It
is removed once a request for the study in its project has been tried (sent, failed, put off
while the destination is down, or held while the project is closed), when the study's touch
files are gone and no request is pending for it, and when the forwarder starts (a forwarder
killed mid-way leaves its folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..arrive.detector import study_from_series, touch_files
from ..clock import Clock
from ..control.assign import Arrival, Assigner
from ..control.base import ControlPlane, ControlPlaneError, Project, TransferRequest
from ..control.keyed import Keyed
from ..deid.engine import Settings
from ..deid.pipeline import ProjectRules, settings_for
from ..index.indexer import caught_up as index_caught_up
from ..suite import FORWARDER
from ..tree import Tree, ensure_dir, instance_links
from .pool import DeidPool, Done, Job, Outcome, Stopped

log = logging.getLogger(FORWARDER.logger)

#: a study is prepared once it has been quiet this long (and is indexed): the burst of a
#: sender is over, so preparing does not take the cores from the receiver and the indexer
PREPARE_AFTER_SECONDS = 1.0

#: what a study's arrival is expected to request is asked of the control plane again, when
#: the study has changed, after this long at the most: a sender trickling images in changes the
#: study every few seconds, and each question is several calls (to REDCap, say)
ASK_EVERY_SECONDS = 30.0
#: questions to the control plane per look: a backlog in `.arrived/` (the arrival daemon down)
#: is asked about a few studies at a time, and the forwarder stays quick to take a request
ASKS_PER_STEP = 4

#: what a prepared output depends on besides its request's settings: the source file
#: (inode, size, modification time) and its series' rules (features, exclusions, labels)
FileKey = tuple[tuple[int, int, int], tuple]


def _file_key(source: Path, rules: ProjectRules) -> FileKey:
    st = os.stat(source)
    series = source.parent.name  # raw/<Study>/<Series>/<SOP>: the original SeriesInstanceUID
    return ((st.st_ino, st.st_size, st.st_mtime_ns),
            (rules.features, rules.pixel_exclusions, tuple(rules.labels.get(series, ()))))


@dataclass(frozen=True)
class Expectation:
    """The request a study's arrival is expected to make (`project` None: none), as asked at
    `asked` (the clock's monotonic time) when the study's newest touch time was `stamp`."""

    asked: float
    stamp: float
    project: Project | None = None
    settings: Settings | None = None


@dataclass
class Prepared:
    """One study de-identified ahead for one (project, participant, event)."""

    study: str
    project: str
    settings: Settings
    work: Path
    #: the project's rules with the study's series labels as last read
    rules: ProjectRules = field(default_factory=ProjectRules)
    #: source -> (what the output depends on, the outcome); never a Stopped one
    done: dict[Path, tuple[FileKey, Done]] = field(default_factory=dict)
    #: the study's newest touch time when it was last prepared (or stopped by the gate)
    stamp: float = 0.0


class Preparer:
    """The forwarder's work for studies in their quiet period; runs in its thread, between
    requests, on its pool."""

    def __init__(self, tree: Tree, control: ControlPlane, key: bytes, pool: DeidPool,
                 clock: Clock, quiet_seconds: float):
        self.tree = tree
        self.quiet = quiet_seconds
        self.control = control
        self.key = key
        self.pool = pool
        self.clock = clock
        self.assigner = Assigner(control, Keyed(key), clock)
        self._prepared: dict[tuple[str, str], Prepared] = {}
        #: study -> what its arrival is expected to request, as last asked
        self._expected: dict[str, Expectation] = {}

    def clear(self) -> None:
        """Remove what a forwarder before this one left (its requests are done again)."""
        if self.tree.work.is_dir():
            for leftover in self.tree.work.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)

    def in_progress(self) -> dict[str, float]:
        """Studies in `.arrived/` with their newest touch time. Taken before the forwarder
        reads its requests: a study gone from here by then has made its request already."""
        try:
            by_study = touch_files(self.tree)
        except OSError:  # the arrival detector reports an unreadable .arrived/
            return {}
        return {study: max(t.mtime for t in files) for study, files in by_study.items()}

    # --- for a request ---------------------------------------------------------------------------
    def ready(self, req: TransferRequest, settings: Settings, rules: ProjectRules,
              sources: list[Path]) -> dict[Path, Done]:
        """The prepared outcomes of `sources` that are valid for this request."""
        prepared = self._prepared.get((req.study_uid, req.project))
        if prepared is None or prepared.settings != settings:
            return {}
        valid = {}
        for source in sources:
            entry = prepared.done.get(source)
            try:
                if entry is not None and entry[0] == _file_key(source, rules):
                    valid[source] = entry[1]
            except OSError:
                continue
        return valid

    def discard(self, study: str, project: str) -> None:
        """A request of `study` in `project` has been tried: its prepared files go."""
        prepared = self._prepared.pop((study, project), None)
        if prepared is not None:
            shutil.rmtree(prepared.work, ignore_errors=True)

    def forget(self, in_progress: Mapping[str, float], pending: set[str]) -> None:
        """Drop what no request will take: studies no longer in `.arrived/` (seen before the
        requests were read) without a pending request."""
        for study, project in list(self._prepared):
            if study not in in_progress and study not in pending:
                self.discard(study, project)
        for study in list(self._expected):
            if study not in in_progress:
                del self._expected[study]

    # --- in the quiet period ---------------------------------------------------------------------
    def step(self, in_progress: Mapping[str, float], interrupt: Callable[[], bool]) -> bool:
        """Prepare the files of one quiet study not prepared yet, until done or `interrupt()`
        (a request is waiting, or the daemon stops); False when there was nothing to do.
        Studies whose arrival is still to come go first, the one that arrives first first;
        then those past their quiet period (the arrival daemon is behind, or down)."""
        now = self.clock.time()
        asks, indexed = 0, False
        for study, stamp in sorted(in_progress.items(), key=lambda item: (
                item[1] + self.quiet <= now, item[1])):
            if now - stamp < PREPARE_AFTER_SECONDS:
                continue
            if any(p.study == study and p.stamp == stamp for p in self._prepared.values()):
                continue
            known = self._expected.get(study)
            ask = known is None or (known.stamp != stamp and self._stale(known))
            if not ask and (known is None or known.project is None):
                continue
            if ask and asks == ASKS_PER_STEP:
                return False
            if not indexed and not index_caught_up(self.tree):
                return False
            indexed = True
            arrival = study_from_series(self.tree, study)
            if ask:
                asks += 1
                known = self._expected[study] = self._expect(study, stamp, arrival)
            if arrival is None or known is None or known.project is None \
                    or known.settings is None:
                continue
            self._prepare(self._prepared_for(study, known.project, known.settings, arrival),
                          stamp, interrupt)
            return True
        return False

    def _stale(self, expectation: Expectation) -> bool:
        return self.clock.monotonic() - expectation.asked >= ASK_EVERY_SECONDS

    def _prepared_for(self, study: str, project: Project, settings: Settings,
                      arrival: Arrival) -> Prepared:
        """The study's entry for `settings` (a new one when the assignment changed), with its
        series rules as the indexer has them now (`arrival`)."""
        prepared = self._prepared.get((study, project.name))
        if prepared is not None and prepared.settings != settings:
            self.discard(study, project.name)
            prepared = None
        if prepared is None:
            work = ensure_dir(self.tree.work / f"prepared-{uuid.uuid4().hex[:12]}")
            prepared = Prepared(study, project.name, settings, work)
            self._prepared[(study, project.name)] = prepared
        prepared.rules = ProjectRules.of(project, {s.uid: s.classify_types
                                                   for s in arrival.study.series})
        return prepared

    def _expect(self, study: str, stamp: float, arrival: Arrival | None) -> Expectation:
        """Ask the control plane what the arrival will request (the first of them); nothing
        when the study has no series indexed."""
        asked = self.clock.monotonic()
        if arrival is None:
            return Expectation(asked, stamp)
        try:
            expected = self.assigner.expected(arrival)
            if not expected:
                return Expectation(asked, stamp)
            project_name, participant, event = expected[0]
            project = self.control.project(project_name)
            settings = settings_for(project, participant, event, self.key, self.tree.datadir)
        except (ControlPlaneError, ValueError) as exc:
            log.info("study %s not prepared ahead of its arrival: %s", study, exc)
            return Expectation(asked, stamp)
        return Expectation(asked, stamp, project, settings)

    def _prepare(self, prepared: Prepared, stamp: float, interrupt: Callable[[], bool]) -> None:
        rules = prepared.rules
        todo = []
        for source in instance_links(self.tree.raw / prepared.study):
            entry = prepared.done.get(source)
            if entry is None or entry[0] != _file_key(source, rules):
                todo.append(source)
        if not todo:  # done before an interruption came
            prepared.stamp = stamp
            return
        outputs = self.pool.outputs(Job.of(prepared.settings, rules, prepared.work), todo)
        try:
            for done in outputs:
                if isinstance(done, Stopped):
                    break  # the request will meet it again, and stop there
                prepared.done[done.source] = (_file_key(done.source, rules), done)
                if interrupt():
                    return
        except Exception as exc:  # the request meets it again and reports it; its type only
            log.warning("study %s: de-identifying ahead of its arrival stopped (%s); its "
                        "request will de-identify the rest", prepared.study,
                        type(exc).__name__)
        finally:
            outputs.close()
        prepared.stamp = stamp
        log.info("study %s: %d files de-identified ahead of its arrival for %s",
                 prepared.study, len(prepared.done), prepared.project)


def outputs(pool: DeidPool, job: Job, sources: list[Path],
            ready: Mapping[Path, Done]) -> Generator[Outcome, None, None]:
    """Each of `sources` de-identified, in order: from `ready` where it holds the file, else
    from the pool (which works ahead on those only); the stream ends after a Stopped, as the
    pool's does."""
    rest = pool.outputs(job, [s for s in sources if s not in ready])
    try:
        for source in sources:
            done = ready.get(source)
            outcome = done if done is not None else next(rest)
            yield outcome
            if isinstance(outcome, Stopped):
                return
    finally:
        rest.close()
