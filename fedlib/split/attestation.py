"""Where each slice would run inside a trusted execution environment, and the check a client
makes before it sends anything.

The server's `Attestor` produces evidence; the client's `Verifier` decides. A claim is worth
nothing by itself (`{"tee": "sev-snp"}` is twelve bytes anyone can send), so with
`split.require_tee` the client refuses unless a verifier is configured
(`split.attestation_verifier`, a name in `VERIFIERS`) and that verifier accepts evidence bound
to *this* session: its `binding` (see `fedlib.split.channel.attestation_binding`) is a digest of
the session id, the client's ephemeral key, the server's nonce and the server's channel key.

No TEE runs where this project is built and tested, so no verifier ships and the default
refuses. A real one (a plugin registering itself in `VERIFIERS`) must check, for its platform:
- SEV-SNP: the attestation report's signature chain (VCEK → ASK → ARK, AMD's root pinned), the
  guest policy (debug off, SMT as required), the launch MEASUREMENT against the expected digest
  of the server image, a TCB version not below the minimum, and REPORT_DATA == binding;
- Intel TDX: the quote's signature through the PCK chain to Intel's root, TCB status from the
  collateral, MRTD and RTMR values of the expected image, and REPORTDATA == binding;
- AWS Nitro Enclaves: the COSE_Sign1 document's signature to the Nitro root, PCR0–2 (and PCR8
  if signed images are used) of the expected image, and `user_data` or `nonce` == binding;
and in every case freshness (the binding holds the server nonce of this session) before the
client sends a single activation.
"""

from __future__ import annotations

from typing import Any, Protocol

from fedlib.registry import Registry


class AttestationFailed(RuntimeError):
    """The server could not show it runs where the client requires."""


class Attestor(Protocol):
    """The server's side: evidence that it runs in its TEE, carrying `binding`."""

    def evidence(self, binding: str) -> dict[str, Any]: ...


class Verifier(Protocol):
    """The client's side: raise `AttestationFailed` unless `evidence` proves a TEE of the
    expected measurement and carries `binding`."""

    def verify(self, evidence: dict[str, Any], binding: str) -> None: ...


VERIFIERS: Registry[type[Verifier]] = Registry("attestation verifier")


class NoTEE:
    """The documented default server: no enclave, no pretending."""

    def evidence(self, binding: str) -> dict[str, Any]:
        return {"tee": "none", "binding": binding}


def check_attestation(evidence: Any, binding: str, require_tee: bool, verifier: str | None) -> None:
    """Before anything is sent: with `require_tee`, a configured verifier must accept evidence
    bound to this session; without it, nothing is claimed and nothing is checked."""
    if not require_tee:
        return
    if verifier is None:
        raise AttestationFailed(
            "split.require_tee is set but no split.attestation_verifier is configured: a server's claim of a TEE is not evidence of one"
        )
    if not isinstance(evidence, dict):
        raise AttestationFailed("the server sent no attestation evidence")
    if evidence.get("tee") in (None, "none"):
        raise AttestationFailed("split.require_tee is set, and the server runs in no TEE")
    try:
        VERIFIERS.get(verifier)().verify(evidence, binding)
    except AttestationFailed:
        raise
    except Exception as err:  # noqa: BLE001 - a verifier that breaks on hostile evidence has not verified it
        raise AttestationFailed(f"{verifier}: evidence did not verify ({type(err).__name__}: {err})") from None
