"""Evidence constructed under a test root, in the formats the real platforms use.

Real fixtures (tests/fixtures/attestation/) cannot carry this project's session binding, so
the binding is tested with documents and reports built here: the same COSE_Sign1 and report
layouts, signed by P-384 keys certified by a root the test passes to the verifier in place of
the vendor's.
"""

from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

FIXTURES = Path(__file__).parent / "fixtures" / "attestation"
AMD = "1.3.6.1.4.1.3704.1."


def fixture_text(name: str) -> str:
    """A fixture's data: its `#` header lines (the source it was taken from) left out."""
    return "".join(line for line in (FIXTURES / name).read_text().splitlines(keepends=True) if not line.startswith("#")).strip()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlib test root"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca: bool,
    days: float = 3650,
    extensions: tuple[x509.ExtensionType, ...] = (),
    start: datetime | None = None,
) -> x509.Certificate:
    now = start or datetime.now(UTC) - timedelta(hours=1)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only", "decipher_only"), False
    )
    builder = builder.add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
    if issuer_cert is not None:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass
class StandInVendor:
    """A root, an intermediate and keys to certify leaves with: a stand-in vendor."""

    name: str = "test"
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    inter_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))

    def __post_init__(self) -> None:
        start = datetime(2020, 1, 1, tzinfo=UTC)  # valid when the real fixtures were made, too
        self.root = _certificate(f"{self.name} root", self.root_key, None, ca=True, days=20 * 365, start=start)
        self.intermediate = _certificate(
            f"{self.name} intermediate", self.inter_key, (self.root, self.root_key), ca=True, days=20 * 365, start=start
        )

    def leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        days: float = 1,
        extensions: tuple[x509.ExtensionType, ...] = (),
        start: datetime | None = None,
    ) -> x509.Certificate:
        return _certificate(
            f"{self.name} leaf", key, (self.intermediate, self.inter_key), ca=False, days=days, extensions=extensions, start=start
        )


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes, size: int, order: str) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(size, order) + s.to_bytes(size, order)  # type: ignore[arg-type]


NITRO_PCRS = {index: bytes([index + 1]) * 48 for index in (0, 1, 2)} | {index: bytes(48) for index in range(3, 16)}


@dataclass
class NitroAttestor:
    """Documents laid out as the Nitro Secure Module's, signed by a leaf of `chain`.
    `bind_to`, when set, replaces the session's binding (a server replaying another session)."""

    chain: StandInVendor
    pcrs: dict[int, bytes] = field(default_factory=lambda: dict(NITRO_PCRS))
    bind_to: bytes | None = None
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))

    def document(self, user_data: bytes | None, at: float | None = None, payload: dict | None = None) -> bytes:
        leaf = self.chain.leaf(self.key)
        body = payload or {
            "module_id": "i-0fedlib-enc0",
            "digest": "SHA384",
            "timestamp": int((time.time() if at is None else at) * 1000),
            "pcrs": self.pcrs,
            "certificate": leaf.public_bytes(Encoding.DER),
            "cabundle": [c.public_bytes(Encoding.DER) for c in (self.chain.root, self.chain.intermediate)],
            "public_key": None,
            "user_data": user_data,
            "nonce": None,
        }
        protected, encoded = cbor2.dumps({1: -35}), cbor2.dumps(body)
        signature = _raw_signature(self.key, cbor2.dumps(["Signature1", protected, b"", encoded]), 48, "big")
        return cbor2.dumps([protected, {}, encoded, signature])

    def evidence(self, binding: bytes) -> dict:
        document = self.document(self.bind_to if self.bind_to is not None else binding)
        return {"tee": "aws-nitro", "document": base64.b64encode(document).decode()}


def _der_integer(value: int) -> bytes:
    content = value.to_bytes(1 if value < 0x80 else 2, "big")
    return bytes([0x02, len(content)]) + content


@dataclass
class SnpAttestor:
    """Reports laid out as the AMD secure processor's (version 2), signed by a VCEK of `chain`
    carrying AMD's extensions (product, TCB, hwID)."""

    chain: StandInVendor
    measurement: bytes = bytes(range(48))
    tcb: tuple[int, int, int, int] = (3, 0, 8, 115)  # boot loader, TEE, SNP, microcode
    chip_id: bytes = bytes(range(64))
    policy: int = 0x30000
    vmpl: int = 0
    abi: tuple[int, int] = (1, 55)  # the firmware's ABI version (major, minor)
    bind_to: bytes | None = None
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))

    def vcek(
        self, tcb: tuple[int, int, int, int] | None = None, chip_id: bytes | None = None, product: str = "Milan-B0"
    ) -> x509.Certificate:
        bootloader, tee, snp, microcode = tcb or self.tcb
        values = {"3.1": bootloader, "3.2": tee, "3.3": snp, "3.8": microcode}
        extensions = [x509.UnrecognizedExtension(x509.ObjectIdentifier(AMD + oid), _der_integer(v)) for oid, v in values.items()]
        extensions.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(AMD + "2"), bytes([0x16, len(product)]) + product.encode()))
        extensions.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(AMD + "4"), chip_id or self.chip_id))
        return self.chain.leaf(self.key, days=10 * 365, extensions=tuple(extensions), start=datetime(2024, 1, 1, tzinfo=UTC))

    def report(self, report_data: bytes, signing_key: int = 0, version: int = 2) -> bytes:
        raw = bytearray(0x4A0)
        struct.pack_into("<IIQ", raw, 0x00, version, 0, self.policy)
        struct.pack_into("<II", raw, 0x30, self.vmpl, 1)
        struct.pack_into("<I", raw, 0x48, signing_key << 2)
        raw[0x50:0x90] = report_data.ljust(64, b"\0")
        raw[0x90:0xC0] = self.measurement
        bootloader, tee, snp, microcode = self.tcb
        tcb = bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
        for offset in (0x38, 0x180, 0x1E0, 0x1F0):  # current, reported, committed, launch
            raw[offset : offset + 8] = tcb
        raw[0x1A0:0x1E0] = self.chip_id
        raw[0x1E9], raw[0x1EA] = self.abi[1], self.abi[0]  # CURRENT_MINOR, CURRENT_MAJOR
        signature = _raw_signature(self.key, bytes(raw[:0x2A0]), 72, "little")
        raw[0x2A0:0x330] = signature
        return bytes(raw)

    def evidence(self, binding: bytes) -> dict:
        report = self.report(self.bind_to if self.bind_to is not None else binding)
        vcek = self.vcek().public_bytes(Encoding.DER)
        return {"tee": "amd-sev-snp", "report": base64.b64encode(report).decode(), "vcek": base64.b64encode(vcek).decode()}


# Certificates that cryptography parses lazily and refuses with its own exceptions: a version
# outside v1..v3 (`x509.InvalidVersion`, at load) and an extension listed twice
# (`x509.DuplicateExtension`, when the extensions are read). Both are DER edits of a real VCEK.
_VERSION_V3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2: the first field of TBSCertificate
_AMD_BOOTLOADER_OID = bytes.fromhex("060a2b060104019c7801030" + "1")  # 1.3.6.1.4.1.3704.1.3.1
_AMD_TEE_OID = bytes.fromhex("060a2b060104019c7801030" + "2")  # 1.3.6.1.4.1.3704.1.3.2, the same length


def with_version(der: bytes, version: int) -> bytes:
    """The certificate with its version field set to `version` (0..255; v3 is 2)."""
    at = der.index(_VERSION_V3)
    return der[:at] + _VERSION_V3[:-1] + bytes([version]) + der[at + len(_VERSION_V3) :]


def with_duplicate_extension(der: bytes) -> bytes:
    """A VCEK whose TEE SPL extension is renamed to the boot loader's: one OID listed twice."""
    assert _AMD_TEE_OID in der and _AMD_BOOTLOADER_OID in der
    return der.replace(_AMD_TEE_OID, _AMD_BOOTLOADER_OID, 1)
