"""The split client's check of the server's TEE, before it sends a single activation.

A claim is worth nothing by itself (`{"tee": "sev-snp"}` is twelve bytes anyone can send), so
with `split.require_tee` the client refuses unless the verifier `split.attestation.verifier`
names accepts evidence bound to *this* session: its binding (`fedlib.split.channel.
attestation_binding`) is a digest of the session id, the client's ephemeral key, the server's
nonce and the ephemeral key the server drew for the session inside its TEE, so evidence from
another session or server is refused, and the key the client exchanges with is the TEE's.

Two verifiers ship (`fedlib.tee`): `aws-nitro` and `amd-sev-snp`; a plugin adds another with
`VERIFIERS.register(name)` and a factory taking the `split.attestation` section.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fedlib.config import AttestationConfig, SplitConfig
from fedlib.registry import Registry
from fedlib.tee.chain import MAX_CRL_BYTES
from fedlib.tee.evidence import AttestationFailed, Refusal, Verifier
from fedlib.tee.nitro import NitroVerifier
from fedlib.tee.sev_snp import SnpVerifier, Tcb

VERIFIERS: Registry[Callable[[AttestationConfig], Verifier]] = Registry("attestation verifier")


@VERIFIERS.register("aws-nitro")
def nitro(expected: AttestationConfig) -> Verifier:
    pcrs = {index: bytes.fromhex(digest) for index, digest in expected.pcrs.items()}
    return NitroVerifier(pcrs=pcrs, max_age_s=expected.max_age_s, allow_debug=expected.allow_debug)


@VERIFIERS.register("amd-sev-snp")
def sev_snp(expected: AttestationConfig) -> Verifier:
    assert expected.measurement is not None  # the config refuses amd-sev-snp without one
    minimum = Tcb(**expected.min_tcb.model_dump())
    return SnpVerifier(
        measurement=bytes.fromhex(expected.measurement),
        min_tcb=minimum,
        allow_debug=expected.allow_debug,
        max_vmpl=expected.max_vmpl,
        min_abi=expected.min_abi,
        crl=_crl_file(expected.crl) if expected.crl else None,
    )


def _crl_file(path: str) -> bytes:
    """The CRL the client's operator fetched, as DER (a PEM file is converted)."""
    try:
        with open(Path(path).expanduser(), "rb") as file:
            raw = file.read(MAX_CRL_BYTES + 1)
        if raw.lstrip().startswith(b"-----BEGIN"):
            raw = x509.load_pem_x509_crl(raw).public_bytes(Encoding.DER)
    except (OSError, ValueError) as err:
        raise AttestationFailed(Refusal.NOT_CONFIGURED, f"split.attestation.crl: cannot read {path} ({type(err).__name__})") from None
    return raw


def check_attestation(evidence: Any, binding: bytes, split: SplitConfig) -> None:
    """With `split.require_tee`, the configured verifier must accept evidence bound to this
    session; without it, nothing is claimed and nothing is checked."""
    if not split.require_tee:
        return
    name = split.attestation.verifier
    if name is None:
        raise AttestationFailed(
            Refusal.NOT_CONFIGURED,
            "split.require_tee is set but split.attestation.verifier is not: a server's claim of a TEE is not evidence of one",
        )
    if not isinstance(evidence, dict):
        raise AttestationFailed(Refusal.MALFORMED, "the server sent no attestation evidence")
    if evidence.get("tee") in (None, "none"):
        raise AttestationFailed(Refusal.NO_TEE, "split.require_tee is set, and the server runs in no TEE")
    try:
        verifier = VERIFIERS.get(name)(split.attestation)
    except KeyError as err:
        raise AttestationFailed(Refusal.NOT_CONFIGURED, f"split.attestation.verifier: {err.args[0]}") from None
    try:
        verifier.verify(evidence, binding)
    except AttestationFailed:
        raise
    except Exception as err:  # noqa: BLE001 - a plugin verifier that breaks on hostile evidence has not verified it
        raise AttestationFailed(Refusal.MALFORMED, f"{name}: evidence did not verify ({type(err).__name__})") from None
