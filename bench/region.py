#!/usr/bin/env python3
"""A region on one machine: three FIONA nodes sharing one REDCap and one research PACS.

    python bench/region.py [--per-node 3] [--nodes 3] [--keep] [--json FILE]

Each node is `fiona up` with its own data tree, DICOM and web port and `NODE`
(hospital-1, hospital-2, …); all share one REDCap API emulator (tests/redcap_emulator.py, the
deployed data dictionaries) as control plane, one Orthanc as research PACS and one
pseudonymization key (node 1's `secret.key`, copied to the others with mode 0600, as README
"Running a region" says). What happens, all on loopback:

1. Projects are made at node 1: PROJ (coupling lists, assignment) and AUTO (auto-ID for
   studies sent to the AE title AUTOAE).
2. Wave 1: a coupling list for `--per-node` studies per node is uploaded at node 1, then
   every node receives its studies (DCMTK storescu); the same patient is sent to node 2 and
   node 3 under AUTOAE; node 3 also receives one study nobody has assigned yet. Every node
   delivers its own studies.
3. The last node is killed (SIGKILL, its whole process group). Node 1 assigns the last node's
   waiting study (`fiona assign`, the web pages' action) and uploads the coupling list of
   wave 2, which the other nodes receive and deliver while the last node is down: its request
   waits, no other node fails it.
4. The last node starts again and delivers its request.
5. Two forwarders on one PostgreSQL index (two machines of one site; a real PostgreSQL on
   loopback, `bench/region_forwarders.py`) send `--requests` requests: none may go twice.

Checks: every study delivered exactly once by the node that holds it (each node's forwarder
log says "sent and verified" once per study, and never names a study of another node), no
request failed, the two auto-ID studies of one patient at two nodes got the same participant
ID, and the research PACS holds exactly the delivered studies. The last line gives the
figures, e.g. `region: nodes 3, studies 17, lost 0, duplicates 0, foreign failures 0` (the
line before it those of the PostgreSQL phase); the exit status is 1 when one check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # orthanc.py, redcap_emulator.py, dicomgen.py

from bench.common import (  # noqa: E402 (repo root)
    free_port,
    log_tail,
    port_open,
    progress,
    run_in_scratch,
    stop_process,
    wait_until,
)
from bench.region_forwarders import two_forwarders  # noqa: E402
from dicomgen import make_study  # noqa: E402
from fiona.bootstrap import init  # noqa: E402
from fiona.control.base import TransferRequest  # noqa: E402
from fiona.control.redcap import RedcapControlPlane  # noqa: E402
from orthanc import Orthanc  # noqa: E402
from postgres import Postgres  # noqa: E402
from redcap_emulator import RedcapEmulator  # noqa: E402

STORESCU = "/usr/bin/storescu"
TOKENS = {"Incoming": "1" * 32, "Routing": "2" * 32, "CouplingList": "3" * 32,
          "AutoID": "4" * 32, "DataTransferProjects": "5" * 32, "PROJ": "6" * 32,
          "AUTO": "7" * 32}
AUTO_AE = "AUTOAE"
QUIET = 2
DELIVER_TIMEOUT = 300.0
SENT = re.compile(r"study (\S+) -> .*sent and verified")


class Node:
    """One FIONA node: `fiona up` on its own data tree, port and NODE."""

    def __init__(self, root: Path, number: int, redcap_url: str, tokens: Path, pacs: Orthanc):
        self.name = f"hospital-{number}"
        self.root = root / self.name
        self.port = free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "TCP_NODELAY": "1"}
        self.env.pop("FIONA_CONFIG", None)
        self.config = init(self.root / "data", port=self.port, ip="127.0.0.1", extra={
            "NODE": self.name, "STUDY_QUIET_SECONDS": QUIET,
            "CONTROL_PLANE": {"type": "redcap", "url": redcap_url, "tokens": str(tokens)},
            "DESTINATIONS": {"research": {"type": "dicom", "aetitle": pacs.aet,
                                          "host": "127.0.0.1", "port": pacs.dicom_port}},
            "WEB": {"host": "127.0.0.1", "port": free_port()}})
        self.logs = self.root / "data" / "logs"
        self.up: subprocess.Popen | None = None

    def fiona(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "fiona", "--config", str(self.config),
                              *args], capture_output=True, text=True, env=self.env, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{self.name}: fiona {' '.join(args)}: {res.stdout}{res.stderr}")
        return res.stdout

    def spawn(self) -> None:
        with open(self.root / "up.log", "ab") as log:
            self.up = subprocess.Popen(
                [sys.executable, "-m", "fiona", "--config", str(self.config), "up"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                env=self.env, start_new_session=True)

    def ready(self) -> None:
        wait_until(lambda: port_open(self.port), 120, f"{self.name}: fiona up", self.up, 0.2)

    def start(self) -> None:
        self.spawn()
        self.ready()

    def kill(self) -> None:
        """As a power cut would: SIGKILL to `fiona up` and every daemon it started."""
        assert self.up is not None
        os.killpg(self.up.pid, signal.SIGKILL)
        self.up.wait()
        self.up = None

    def stop(self) -> None:
        if self.up is not None:
            stop_process(self.up, 60)
            self.up = None

    def send(self, folder: Path, called: str = "FIONA") -> None:
        res = subprocess.run([STORESCU, "+sd", "-aec", called, "127.0.0.1", str(self.port),
                              str(folder)], capture_output=True, text=True, env=self.env,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{self.name}: storescu failed ({res.returncode}): "
                               f"{res.stderr[-1000:]}")

    def log_lines(self) -> list[str]:
        return [line for path in sorted(self.logs.glob("*.log"))
                for line in path.read_text(errors="replace").splitlines()]


class Region:
    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.root = root
        self.nodes: list[Node] = []
        self.held: dict[str, str] = {}     # study UID -> the node it was sent to
        self.serial = 0

    def set_up(self) -> None:
        self.redcap = RedcapEmulator()
        self.redcap.add_from_manifest(TOKENS, research_events=("baseline",))
        url = self.redcap.start()
        tokens = self.root / "tokens.json"
        tokens.write_text(json.dumps(TOKENS))
        tokens.chmod(0o600)
        self.control = RedcapControlPlane(url, dict(TOKENS))
        self.pacs = Orthanc(self.root).start()
        self.nodes = [Node(self.root, n, url, tokens, self.pacs)
                      for n in range(1, self.args.nodes + 1)]
        key = self.nodes[0].root / "data" / "config" / "secret.key"
        for node in self.nodes[1:]:  # one key for the region (README: "Running a region")
            shutil.copyfile(key, node.root / "data" / "config" / "secret.key")
        first = self.nodes[0]
        first.fiona("project", "add", "PROJ", "--naming", "^P[0-9]{4}$", "--events",
                    "baseline")
        first.fiona("project", "add", "AUTO", "--naming", "^AU[0-9]{5}$", "--events",
                    "baseline", "--autoid-aetitle", AUTO_AE)
        for node in self.nodes:  # all at once: they start in parallel
            node.spawn()
        for node in self.nodes:
            node.ready()
        progress(f"{len(self.nodes)} nodes up on ports "
                 f"{', '.join(str(n.port) for n in self.nodes)}")

    def study(self, node: Node, patient: str) -> tuple[str, Path, str]:
        """A new small study for `node`: (UID, folder, accession)."""
        self.serial += 1
        accession = f"ACC{self.serial:04d}"
        folder = self.root / "studies" / f"s{self.serial}"
        made = make_study(folder, n_series=1, images_per_series=2, patient_id=patient,
                          accession=accession, seed=self.serial)
        self.held[made["study"]] = node.name
        return made["study"], folder, accession

    def couple(self, rows: list[tuple[str, str]]) -> None:
        """Upload a coupling list (accession, participant) at node 1."""
        path = self.root / f"coupling{self.serial}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["AccessionNumber", "ProjectName", "subjectid", "eventname"])
            writer.writerows([acc, "PROJ", participant, "baseline"] for acc, participant in rows)
        self.nodes[0].fiona("coupling", "upload", str(path))

    def wave(self, nodes: list[Node]) -> list[str]:
        """`--per-node` coupled studies for each of `nodes`, coupling list first."""
        planned = [(node, *self.study(node, f"PAT{self.serial + 1:04d}"))
                   for node in nodes for _ in range(self.args.per_node)]
        self.couple([(acc, f"P{int(acc[3:]):04d}") for _node, _uid, _folder, acc in planned])
        for node, _uid, folder, _acc in planned:
            node.send(folder)
        return [uid for _node, uid, _folder, _acc in planned]

    def delivered(self, uids: list[str], timeout: float = DELIVER_TIMEOUT) -> None:
        """Wait until every study has a complete request (fail at once on a failed one)."""
        def done() -> bool:
            reqs = [r for r in self.control.requests() if r.study_uid in set(uids)]
            failed = [r for r in reqs if not r.pending and not r.complete]
            if failed:
                raise RuntimeError(f"request failed: {failed[0].study_uid} "
                                   f"{failed[0].error_message}")
            return {r.study_uid for r in reqs if r.complete and not r.pending} >= set(uids)
        wait_until(done, timeout, f"{len(uids)} studies delivered", interval=1.0)

    def run(self) -> dict:
        self.set_up()
        last = self.nodes[-1]
        progress("wave 1: a study per node and patient, coupled at node 1; one patient at two "
                 "nodes under auto-ID; one study left unassigned at the last node")
        first_wave = self.wave(self.nodes)
        shared = [self.study(node, "SHAREDPATIENT") for node in self.nodes[1:3]]
        for (_uid, folder, _acc), node in zip(shared, self.nodes[1:3], strict=True):
            node.send(folder, AUTO_AE)
        late_uid, late_folder, _ = self.study(last, "LATEPATIENT")
        last.send(late_folder)
        self.delivered(first_wave + [uid for uid, _f, _a in shared])
        wait_until(lambda: self.control.study(late_uid) is not None, 60,
                   "the unassigned study registered")
        progress(f"wave 1 delivered; killing {last.name}")
        last.kill()
        self.nodes[0].fiona("assign", late_uid, "--project", "PROJ", "--participant", "P9999",
                            "--event", "baseline")
        second_wave = self.wave(self.nodes[:-1])
        self.delivered(second_wave)
        waiting = [r for r in self.control.requests(late_uid)]
        if not (waiting and waiting[0].pending and not waiting[0].error_message):
            raise RuntimeError(f"{last.name}'s request did not wait for it: {waiting}")
        progress(f"wave 2 delivered by the others while {last.name} was down; starting it")
        last.start()
        self.delivered([late_uid])
        return self.figures([*first_wave, *(u for u, _f, _a in shared), *second_wave,
                             late_uid], [u for u, _f, _a in shared])

    def figures(self, expected: list[str], shared: list[str]) -> dict:
        requests = self.control.requests()
        done = {r.study_uid for r in requests if r.complete and not r.pending}
        sends: Counter[str] = Counter()
        foreign = 0
        for node in self.nodes:
            for line in node.log_lines():
                m = SENT.search(line)
                if m:
                    sends[m.group(1)] += 1
                named = [u for u, holder in self.held.items() if holder != node.name
                         and u in line]
                if named and ("sent and verified" in line or "fail" in line
                              or "gone from disk" in line):
                    foreign += 1
        foreign += sum(1 for r in requests if r.error_flags and not r.complete)
        auto: list[TransferRequest] = [r for r in requests if r.study_uid in shared]
        same_id = len(auto) == 2 and auto[0].participant == auto[1].participant
        pacs_studies = len(self.pacs.studies())
        return {"nodes": len(self.nodes), "studies": len(expected),
                "lost": len(set(expected) - done),
                "duplicates": sum(n - 1 for n in sends.values() if n > 1)
                + max(0, pacs_studies - len(expected)),
                "foreign_failures": foreign, "autoid_same_participant": same_id,
                "in_pacs": pacs_studies, "split": [s.uid for s in self.control.studies()
                                                   if s.split]}

    def tear_down(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # the others are stopped all the same
                print(f"{node.name}: {exc}", file=sys.stderr)
        if hasattr(self, "pacs"):
            self.pacs.stop(kill=True)
        if hasattr(self, "redcap"):
            self.redcap.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="FIONA nodes (at least 3)")
    p.add_argument("--per-node", type=int, default=3, help="coupled studies per node and wave")
    p.add_argument("--requests", type=int, default=200,
                   help="requests for the two forwarders on one PostgreSQL index (0: skip "
                        "that phase; tests/test_region_forwarders.py runs it on its own)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.nodes < 3 or args.per_node < 1:
        p.error("--nodes must be at least 3 and --per-node at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict = {}

    def body(root: Path) -> dict:
        region = Region(args, root)
        try:
            figures.update(region.run())
        except BaseException:
            for node in region.nodes:
                print(f"--- {node.name}, last log lines:\n{log_tail(node.root / 'up.log')}\n"
                      + "\n".join(node.log_lines()[-15:]), file=sys.stderr)
            raise
        finally:
            region.tear_down()
        if not args.requests:
            return figures
        progress(f"two forwarders on one PostgreSQL index, {args.requests} requests ...")
        server = Postgres()
        try:
            outcome = two_forwarders(root / "postgres", server.database(), args.requests)
        finally:
            server.stop()
        figures["postgres"] = {"requests": outcome.requests, "sent": sum(outcome.sends.values()),
                               "sent_twice": outcome.sent_twice, "by": dict(outcome.by),
                               "incomplete": len(outcome.incomplete), "ok": outcome.ok}
        return figures

    try:
        status = run_in_scratch(args, "fiona-region-", body)
    except RuntimeError as exc:
        print(f"region: {exc}", file=sys.stderr)
        status = 1
    ok = bool(figures) and figures["lost"] == figures["duplicates"] == 0 and \
        figures["foreign_failures"] == 0 and figures["autoid_same_participant"] and \
        figures.get("postgres", {}).get("ok", not args.requests)
    if figures:
        progress(f"auto-ID: the same patient at two nodes got "
                 f"{'the same' if figures['autoid_same_participant'] else 'DIFFERENT'} "
                 f"participant ID; research PACS holds {figures['in_pacs']} studies; "
                 f"split studies: {len(figures['split'])}")
        pg = figures.get("postgres")
        if pg:
            print(f"postgres: forwarders 2, requests {pg['requests']}, sent {pg['sent']}, sent "
                  f"twice {pg['sent_twice']}, not delivered {pg['incomplete']}", flush=True)
        print(f"region: nodes {figures['nodes']}, studies {figures['studies']}, lost "
              f"{figures['lost']}, duplicates {figures['duplicates']}, foreign failures "
              f"{figures['foreign_failures']}", flush=True)
    return 0 if status == 0 and ok else 1


if __name__ == "__main__":
    sys.exit(main())
