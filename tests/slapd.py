"""A throwaway OpenLDAP `slapd` on loopback with TLS, users and groups (Debian `slapd`).

The directory `dc=example,dc=org` holds people under `ou=people` and `groupOfNames` groups under
`ou=groups`; the certificate is signed by a test CA and names `localhost` and 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import free_port, listening, wait_for

SLAPD = "/usr/sbin/slapd"
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
ADMIN_DN = f"cn=admin,{SUFFIX}"

#: user -> (password, groups)
USERS = {
    "alice": ("alice-correct-horse", ["fiona-admins"]),
    "bob": ("bob-battery-staple", ["proj-assigners"]),
    "carol": ("carol-no-groups-here", []),
    "svc": ("service-account-pw", []),
}
GROUP_NAMES = ["fiona-admins", "proj-assigners"]


@dataclass
class Directory:
    ldap_url: str
    ldaps_url: str
    ca_file: Path
    proc: subprocess.Popen

    def group_dn(self, name: str) -> str:
        return f"cn={name},{GROUPS}"


def _run(*cmd: str, stdin: str | None = None) -> str:
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({res.returncode}): {res.stderr}")
    return res.stdout


def _certificates(d: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "server.key",
                                                  "server.csr", "server.pem"))
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=FIONA test CA", "-keyout", str(ca_key), "-out", str(ca))
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(csr))
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


def _ldif() -> str:
    parts = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\n"
             f"dc: example\n",
             f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
             f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n"]
    for user, (password, _) in USERS.items():
        hashed = _run("/usr/sbin/slappasswd", "-s", password).strip()
        parts.append(f"dn: uid={user},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {user}\n"
                     f"cn: {user}\nsn: {user}\nuserPassword: {hashed}\n")
    for group in GROUP_NAMES:
        members = [u for u, (_, groups) in USERS.items() if group in groups]
        lines = "".join(f"member: uid={m},{PEOPLE}\n" for m in members)
        parts.append(f"dn: cn={group},{GROUPS}\nobjectClass: groupOfNames\ncn: {group}\n{lines}")
    return "\n".join(parts)


@pytest.fixture
def slapd(tmp_path: Path):
    """A running slapd with TLS on two loopback ports (ldap:// with StartTLS, ldaps://)."""
    d = tmp_path / "slapd"
    (d / "db").mkdir(parents=True)
    ca, cert, key = _certificates(d)
    conf = d / "slapd.conf"
    conf.write_text(textwrap.dedent(f"""\
        include /etc/ldap/schema/core.schema
        include /etc/ldap/schema/cosine.schema
        include /etc/ldap/schema/inetorgperson.schema
        modulepath /usr/lib/ldap
        moduleload back_mdb
        pidfile {d}/slapd.pid
        argsfile {d}/slapd.args
        TLSCACertificateFile {ca}
        TLSCertificateFile {cert}
        TLSCertificateKeyFile {key}
        access to attrs=userPassword by anonymous auth by * none
        access to * by * read
        database mdb
        suffix "{SUFFIX}"
        rootdn "{ADMIN_DN}"
        directory {d}/db
        """))
    ldif = d / "data.ldif"
    ldif.write_text(_ldif())
    _run("/usr/sbin/slapadd", "-f", str(conf), "-l", str(ldif))
    port, tls_port = free_port(), free_port()
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/"
    log = open(d / "slapd.log", "wb")
    proc = subprocess.Popen([SLAPD, "-d", "0", "-f", str(conf), "-h", urls],
                            stdout=log, stderr=log)
    try:
        wait_for(lambda: listening(tls_port), 20, "slapd to listen")
        yield Directory(f"ldap://127.0.0.1:{port}", f"ldaps://127.0.0.1:{tls_port}", ca, proc)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
