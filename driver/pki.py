"""Certificates for a local Kubernetes control plane: one CA and the leaf certificates it signs.

Keys are ECDSA P-256, which every Kubernetes component accepts and which are fast to make. The
work is done by the `openssl` command (never through a shell); nothing here is used by the node
daemon, only by `driver.localcluster`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from driver.errors import FatalError

DAYS = "30"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


class Authority:
    """A self-signed CA in `directory` that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "unidra-local-ca") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = KeyPair(directory / "ca.crt", directory / "ca.key")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.ca.key))
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            str(self.ca.key),
            "-subj",
            f"/CN={name}",
            "-days",
            DAYS,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-out",
            str(self.ca.cert),
        )

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: Sequence[str] = (),
        *,
        server_names: Sequence[str] = (),
        client: bool = True,
    ) -> KeyPair:
        """A leaf certificate: a client one, and a server one too when it has `server_names`."""
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        request = self.directory / f"{name}.csr"
        subject = f"/CN={common_name}" + "".join(f"/O={o}" for o in organizations)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pair.key))
        _openssl("req", "-new", "-key", str(pair.key), "-subj", subject, "-out", str(request))
        usages = (["serverAuth"] if server_names else []) + (["clientAuth"] if client else [])
        extensions = self.directory / f"{name}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={','.join(usages)}",
        ]
        if server_names:
            lines.append("subjectAltName=" + ",".join(_san(n) for n in server_names))
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(request),
            "-CA",
            str(self.ca.cert),
            "-CAkey",
            str(self.ca.key),
            "-CAcreateserial",
            "-days",
            DAYS,
            "-extfile",
            str(extensions),
            "-out",
            str(pair.cert),
        )
        request.unlink()
        extensions.unlink()
        return pair


def signing_key(path: Path) -> Path:
    """A private key for signing service-account tokens (ES256); its public half is derived by the server."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
    return path


def _san(name: str) -> str:
    return f"IP:{name}" if name.replace(".", "").isdigit() else f"DNS:{name}"


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise FatalError("openssl is not installed; it makes the local cluster's certificates")
    done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FatalError(f"openssl {args[0]} failed: {done.stderr.strip()}")
