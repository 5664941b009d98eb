"""AWS Nitro Enclaves: the attestation document the Nitro Secure Module signs.

The document is a COSE_Sign1 structure (ES384) whose payload is a CBOR map: the enclave's
PCRs, a timestamp, the signing certificate and the bundle of certificates up to AWS's Nitro
root, and up to three fields the enclave chose (`user_data`, `nonce`, `public_key`). A document
passes when, in this order:

1. it decodes, every field of the expected type and size (no CBOR tags, no duplicate keys);
2. the bundle starts at the pinned AWS root, every certificate is valid at the time of the
   check, and the chain verifies (cryptography's X.509 path validation);
3. the COSE signature verifies under the leaf certificate's key;
4. the timestamp is at most `max_age_s` before the check (and not in the future);
5. debug mode is off (its PCR0 is all zeros) and every configured PCR is the expected one;
6. `user_data` or `nonce` is this session's binding.

See AWS's nsm-api "Attestation document specification and verification process".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from fedlib.tee.chain import certificate, check_validity, fingerprint, pinned
from fedlib.tee.evidence import AttestationFailed, Refusal, decode_cbor, expect_type, field_bytes

MAX_DOCUMENT_BYTES = 16384
MAX_CHOSEN_BYTES = 1024  # user_data, nonce, public_key: the NSM takes up to 1 KiB each
MAX_BUNDLE = 8
ES384 = -35
FUTURE_SKEW_S = 60.0


@dataclass(frozen=True)
class NitroDocument:
    """The payload of a document, typed; `signed` and `signature` are what the leaf signed."""

    module_id: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    leaf: x509.Certificate
    bundle: tuple[x509.Certificate, ...]
    user_data: bytes | None
    nonce: bytes | None
    signed: bytes
    signature: bytes

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)


def parse_document(raw: bytes) -> NitroDocument:
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise AttestationFailed(Refusal.TOO_LARGE, f"Nitro document is over {MAX_DOCUMENT_BYTES} bytes")
    sign1 = expect_type(decode_cbor(raw, "Nitro document"), list, "Nitro document (COSE_Sign1)")
    if len(sign1) != 4:
        raise AttestationFailed(Refusal.MALFORMED, "Nitro document is not a 4-part COSE_Sign1")
    protected = expect_type(sign1[0], bytes, "COSE protected header")
    expect_type(sign1[1], dict, "COSE unprotected header")
    payload = expect_type(sign1[2], bytes, "COSE payload")
    signature = expect_type(sign1[3], bytes, "COSE signature")
    if decode_cbor(protected, "COSE protected header") != {1: ES384}:
        raise AttestationFailed(Refusal.UNSUPPORTED, "Nitro document is not signed with ES384")
    if len(signature) != 96:
        raise AttestationFailed(Refusal.MALFORMED, "an ES384 signature is 96 bytes")
    body = expect_type(decode_cbor(payload, "Nitro payload"), dict, "Nitro payload")
    if expect_type(body.get("digest"), str, "digest") != "SHA384":
        raise AttestationFailed(Refusal.UNSUPPORTED, "Nitro document digest is not SHA384")
    timestamp = expect_type(body.get("timestamp"), int, "timestamp")
    if not 0 < timestamp < 2**53:
        raise AttestationFailed(Refusal.MALFORMED, "timestamp is out of range")
    pcrs = expect_type(body.get("pcrs"), dict, "pcrs")
    if not 0 < len(pcrs) <= 32:
        raise AttestationFailed(Refusal.MALFORMED, "pcrs: 1 to 32 entries")
    for index, value in pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 32:
            raise AttestationFailed(Refusal.MALFORMED, "a PCR index is not 0..31")
        if not isinstance(value, bytes) or len(value) not in (32, 48, 64):
            raise AttestationFailed(Refusal.MALFORMED, f"PCR{index} is not a 32, 48 or 64-byte digest")
    bundle = expect_type(body.get("cabundle"), list, "cabundle")
    if not 0 < len(bundle) <= MAX_BUNDLE:
        raise AttestationFailed(Refusal.MALFORMED, f"cabundle: 1 to {MAX_BUNDLE} certificates")
    return NitroDocument(
        module_id=expect_type(body.get("module_id"), str, "module_id"),
        timestamp_ms=timestamp,
        pcrs=dict(pcrs),
        leaf=certificate(expect_type(body.get("certificate"), bytes, "certificate"), "the signing certificate"),
        bundle=tuple(certificate(expect_type(der, bytes, "a cabundle entry"), f"cabundle[{i}]") for i, der in enumerate(bundle)),
        user_data=_chosen(body, "user_data"),
        nonce=_chosen(body, "nonce"),
        signed=cbor2.dumps(["Signature1", protected, b"", payload]),
        signature=signature,
    )


def _chosen(body: dict, name: str) -> bytes | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) > MAX_CHOSEN_BYTES:
        raise AttestationFailed(Refusal.MALFORMED, f"{name} is not a byte string of at most {MAX_CHOSEN_BYTES} bytes")
    return value


@dataclass
class NitroVerifier:
    """`pcrs`: index → the expected digest (PCR0 image, PCR1 kernel, PCR2 application; PCR8 if
    the image is signed). `root` is AWS's pinned root unless a test passes its own."""

    pcrs: Mapping[int, bytes]
    max_age_s: float = 300.0
    allow_debug: bool = False
    clock: Callable[[], float] = time.time
    root: x509.Certificate = field(default_factory=lambda: pinned("aws-nitro-enclaves-root-g1"))

    def verify(self, evidence: Mapping[str, Any], binding: bytes) -> None:
        if evidence.get("tee") != "aws-nitro":
            raise AttestationFailed(Refusal.WRONG_PLATFORM, f"the aws-nitro verifier got evidence of {str(evidence.get('tee'))[:40]!r}")
        document = parse_document(field_bytes(evidence, "document", MAX_DOCUMENT_BYTES))
        at = datetime.fromtimestamp(self.clock(), UTC)
        self._check_chain(document, at)
        self._check_signature(document)
        age = (at - document.time).total_seconds()
        if age > self.max_age_s or age < -FUTURE_SKEW_S:
            raise AttestationFailed(
                Refusal.STALE, f"the document was made {age:.0f} s before the check; at most {self.max_age_s:.0f} s is allowed"
            )
        self._check_pcrs(document)
        if binding not in (document.user_data, document.nonce):
            raise AttestationFailed(Refusal.BINDING, "neither user_data nor nonce is this session's binding")

    def _check_chain(self, document: NitroDocument, at: datetime) -> None:
        if fingerprint(document.bundle[0]) != fingerprint(self.root):
            raise AttestationFailed(Refusal.UNTRUSTED_ROOT, "the certificate bundle does not start at the pinned AWS Nitro root")
        for index, cert in enumerate((*document.bundle, document.leaf)):
            check_validity(cert, at, f"cabundle[{index}]" if index < len(document.bundle) else "the signing certificate")
        verifier = (
            PolicyBuilder()
            .store(Store([self.root]))
            .time(at)
            .max_chain_depth(MAX_BUNDLE)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
            .build_client_verifier()
        )
        try:
            verifier.verify(document.leaf, list(document.bundle[1:]))
        except VerificationError as err:
            raise AttestationFailed(Refusal.CHAIN, f"the signing certificate does not chain to the AWS root ({str(err)[:200]})") from None

    def _check_signature(self, document: NitroDocument) -> None:
        key = document.leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise AttestationFailed(Refusal.UNSUPPORTED, "the signing certificate's key is not P-384")
        r, s = int.from_bytes(document.signature[:48], "big"), int.from_bytes(document.signature[48:], "big")
        try:
            key.verify(encode_dss_signature(r, s), document.signed, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise AttestationFailed(Refusal.SIGNATURE, "the document's signature does not verify under its certificate") from None

    def _check_pcrs(self, document: NitroDocument) -> None:
        if not self.allow_debug and not any(document.pcrs.get(0, b"")):
            raise AttestationFailed(Refusal.POLICY, "the enclave runs in debug mode (PCR0 is all zeros)")
        for index, expected in sorted(self.pcrs.items()):
            if document.pcrs.get(index) != expected:
                raise AttestationFailed(Refusal.MEASUREMENT, f"PCR{index} is not the expected image's")
