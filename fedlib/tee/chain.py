"""X.509 pieces both verifiers share: the pinned vendor roots, certificates parsed at the
boundary, validity at the time of the check, and one link of a chain.

The roots ship as PEM files beside this module (`roots/`) and are pinned by the SHA-256 of
their DER, written here, so a replaced file is refused at load rather than trusted.
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import datetime
from functools import cache
from importlib.resources import files

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from fedlib.tee.evidence import AttestationFailed, Refusal

MAX_CERTIFICATE_BYTES = 8192
MAX_CRL_BYTES = 1 << 20

PINNED_ROOTS: dict[str, str] = {
    # AWS Nitro Enclaves root G1, https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip;
    # AWS documents this fingerprint in "Verifying the root of trust" (Nitro Enclaves user guide).
    "aws-nitro-enclaves-root-g1": "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
    # AMD's roots and SEV signing keys per product, https://kdsintf.amd.com/vcek/v1/{Milan,Genoa}/cert_chain.
    "amd-milan-ark": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "amd-milan-ask": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    "amd-genoa-ark": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "amd-genoa-ask": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
}


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@cache
def pinned(name: str) -> x509.Certificate:
    """A shipped vendor certificate, refused unless its fingerprint is the one pinned above."""
    cert = x509.load_pem_x509_certificate((files("fedlib.tee") / "roots" / f"{name}.pem").read_bytes())
    if fingerprint(cert) != PINNED_ROOTS[name]:
        raise RuntimeError(f"fedlib/tee/roots/{name}.pem is not the pinned certificate; reinstall fedlib")
    return cert


def certificate(der: bytes, what: str) -> x509.Certificate:
    """A DER certificate from the evidence, its size checked first, and every part the verifiers
    read parsed here, at the boundary. cryptography parses some parts only when they are first
    read, and raises its own exceptions for them (`x509.InvalidVersion` at load,
    `x509.DuplicateExtension` on reading the extensions, `UnsupportedAlgorithm` for a key), so
    every exception of that parse is a named refusal here rather than an escape later."""
    if len(der) > MAX_CERTIFICATE_BYTES:
        raise AttestationFailed(Refusal.TOO_LARGE, f"{what} is over {MAX_CERTIFICATE_BYTES} bytes")
    try:
        with warnings.catch_warnings():
            # AMD issues every VCEK with serial number 0, which RFC 5280 disallows and
            # cryptography warns about; the serial plays no part in what is checked here.
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(der)
            for _ in cert.extensions:
                pass
            cert.public_key()
            cert.not_valid_before_utc, cert.not_valid_after_utc, cert.subject, cert.issuer, cert.serial_number  # noqa: B018
    except Exception as err:  # noqa: BLE001 - the boundary: whatever the parser raises, the certificate is not one
        raise AttestationFailed(Refusal.MALFORMED, f"{what} is not a DER certificate ({type(err).__name__})") from None
    return cert


def revocation_list(der: bytes, issuer: x509.Certificate, at: datetime, what: str) -> x509.CertificateRevocationList:
    """A vendor's CRL (DER), issued and signed by `issuer` and current at `at`. A CRL that is
    out of date or not the issuer's is refused rather than read as "nothing revoked"."""
    if len(der) > MAX_CRL_BYTES:
        raise AttestationFailed(Refusal.TOO_LARGE, f"{what} is over {MAX_CRL_BYTES} bytes")
    try:
        crl = x509.load_der_x509_crl(der)
        for _ in crl:  # every entry parsed here, at the boundary
            pass
        valid = crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        next_update = crl.next_update_utc
    except Exception as err:  # noqa: BLE001 - the boundary, as for certificates
        raise AttestationFailed(Refusal.MALFORMED, f"{what} is not a DER CRL ({type(err).__name__})") from None
    if not valid:
        raise AttestationFailed(Refusal.CHAIN, f"{what} was not issued by {issuer.subject.rfc4514_string()}")
    if next_update is None or not crl.last_update_utc <= at <= next_update:
        raise AttestationFailed(Refusal.STALE, f"{what} is not current at {at:%Y-%m-%d %H:%M} UTC; fetch it again")
    return crl


def check_not_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList, what: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise AttestationFailed(Refusal.REVOKED, f"{what} (serial {cert.serial_number:x}) is on the vendor's revocation list")


def check_validity(cert: x509.Certificate, at: datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise AttestationFailed(
            Refusal.EXPIRED,
            f"{what} is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not at {at:%Y-%m-%d %H:%M:%S} UTC",
        )


def check_issued(child: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """`issuer` may sign certificates (CA, key usage keyCertSign) and signed `child`."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        raise AttestationFailed(Refusal.CHAIN, f"the issuer of {what} carries no CA constraints") from None
    if not constraints.ca or not usage.key_cert_sign:
        raise AttestationFailed(Refusal.CHAIN, f"the issuer of {what} is not a CA")
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise AttestationFailed(Refusal.CHAIN, f"{what} was not issued by {issuer.subject.rfc4514_string()}") from None
