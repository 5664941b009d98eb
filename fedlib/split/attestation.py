"""Where each slice would run inside a trusted execution environment, and the check a client
makes before it sends anything.

No TEE runs on the machines this project is built and tested on, so the only implementation
here is `NoTEE`, which says so: its evidence names no enclave, and `verify` accepts it only
when the configuration does not require one (`split.require_tee: false`, the default). A real
deployment plugs in an `Attestor` for its platform (e.g. a confidential-VM quote checked
against the expected measurement of the server image) without touching the protocol.
"""

from __future__ import annotations

from typing import Protocol


class AttestationFailed(RuntimeError):
    """The server could not show it runs where the client requires."""


class Attestor(Protocol):
    def evidence(self, nonce: str) -> dict[str, str]: ...

    def verify(self, evidence: dict[str, str], nonce: str, require_tee: bool) -> None: ...


class NoTEE:
    """The documented default: no enclave, no pretending."""

    def evidence(self, nonce: str) -> dict[str, str]:
        return {"tee": "none", "nonce": nonce}

    def verify(self, evidence: dict[str, str], nonce: str, require_tee: bool) -> None:
        if evidence.get("nonce") != nonce:
            raise AttestationFailed("attestation evidence is not for this session's nonce")
        if evidence.get("tee") == "none" and require_tee:
            raise AttestationFailed("split.require_tee is set, and the server runs in no TEE")
