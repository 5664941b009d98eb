"""AMD SEV-SNP: the attestation report the AMD secure processor signs for a confidential VM.

The report is 1184 bytes (SEV-SNP ABI specification, "ATTESTATION_REPORT structure"),
signed with ECDSA P-384 by the chip's VCEK; the VCEK is certified by AMD's signing key (ASK),
and the ASK by AMD's root (ARK), one pair per product. Evidence carries the report and the
VCEK (the guest gets both from the kernel, or the VCEK from AMD's KDS). A report passes when,
in this order:

1. it is exactly 1184 bytes, version 2 to 5, signed with ECDSA P-384 by a VCEK (a report
   signed by a VLEK, as on AWS, is refused as unsupported: its ASVK chain is not pinned here);
2. the VCEK names Milan or Genoa, and VCEK → ASK → ARK verifies with AMD's pinned
   certificates for that product, each valid at the time of the check;
3. the report's signature verifies under the VCEK, which is this chip's (its hwID is the
   report's CHIP_ID) at this TCB (its TCB extensions are the report's REPORTED_TCB);
4. the guest policy allows neither debugging nor a migration agent (MIGRATE_MA: another VM
   that can export the guest's memory), the report was requested at VMPL `max_vmpl` or more
   privileged (0 by default: a report from a less privileged level, under an SVSM or
   paravisor, says what that level chose to ask, not what the guest's firmware ran), the
   firmware's ABI version is at least `min_abi`, and REPORTED_TCB is at least `min_tcb`;
5. MEASUREMENT is the expected launch digest of the server's image;
6. REPORT_DATA is this session's binding (32 bytes, then 32 zero bytes);
7. where the verifier is given AMD's CRL for the product (`crl`, fetched from AMD's KDS by
   the client's operator), it is the ARK's, current, and names neither the ASK nor the VCEK.
   Without one, revocation is not checked.

AMD's certificates are signed with RSA-PSS, which cryptography's WebPKI path validation does
not accept, so each link is checked here (`fedlib.tee.chain.check_issued`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fedlib.tee.chain import (
    MAX_CERTIFICATE_BYTES,
    certificate,
    check_issued,
    check_not_revoked,
    check_validity,
    pinned,
    revocation_list,
)
from fedlib.tee.evidence import AttestationFailed, Refusal, field_bytes

REPORT_BYTES = 0x4A0
SIGNED_BYTES = 0x2A0  # the signature covers everything before it
PRODUCTS = ("Milan", "Genoa")
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
FIRST_SNP_ABI = (1, 51)  # the first SNP firmware AMD released (Milan)
_AMD = "1.3.6.1.4.1.3704.1."
_TCB_OIDS = {"bootloader": _AMD + "3.1", "tee": _AMD + "3.2", "snp": _AMD + "3.3", "microcode": _AMD + "3.8"}


@dataclass(frozen=True)
class Tcb:
    """A TCB version as Milan and Genoa lay it out: SPLs of the boot loader, the PSP OS (tee),
    the SNP firmware and the microcode."""

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0

    @classmethod
    def from_bytes(cls, raw: bytes) -> Tcb:
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def at_least(self, minimum: Tcb) -> bool:
        return all(getattr(self, name) >= getattr(minimum, name) for name in ("bootloader", "tee", "snp", "microcode"))


@dataclass(frozen=True)
class SnpReport:
    version: int
    policy: int
    vmpl: int
    signing_key: int  # 0: VCEK, 1: VLEK, 7: none
    report_data: bytes
    measurement: bytes
    host_data: bytes
    reported_tcb: Tcb
    chip_id: bytes
    current_abi: tuple[int, int]  # the firmware's ABI version (major, minor) when the report was made
    signed: bytes
    r: int
    s: int


def parse_report(raw: bytes) -> SnpReport:
    if len(raw) < REPORT_BYTES:
        raise AttestationFailed(Refusal.TRUNCATED, f"an SEV-SNP report is {REPORT_BYTES} bytes, not {len(raw)}")
    if len(raw) > REPORT_BYTES:
        raise AttestationFailed(Refusal.TOO_LARGE, f"an SEV-SNP report is {REPORT_BYTES} bytes, not {len(raw)}")
    version, _guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    vmpl, signature_algo = struct.unpack_from("<II", raw, 0x30)
    (flags,) = struct.unpack_from("<I", raw, 0x48)
    if not 2 <= version <= 5:
        raise AttestationFailed(Refusal.UNSUPPORTED, f"SEV-SNP report version {version}; versions 2 to 5 are verified")
    if signature_algo != 1:
        raise AttestationFailed(Refusal.UNSUPPORTED, f"signature algorithm {signature_algo} is not ECDSA P-384 with SHA-384")
    if vmpl > 3:
        raise AttestationFailed(Refusal.MALFORMED, f"VMPL {vmpl} is not 0..3")
    return SnpReport(
        version=version,
        policy=policy,
        vmpl=vmpl,
        signing_key=(flags >> 2) & 0b111,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        reported_tcb=Tcb.from_bytes(raw[0x180:0x188]),
        chip_id=raw[0x1A0:0x1E0],
        current_abi=(raw[0x1EA], raw[0x1E9]),
        signed=raw[:SIGNED_BYTES],
        r=int.from_bytes(raw[0x2A0:0x2E8], "little"),
        s=int.from_bytes(raw[0x2E8:0x330], "little"),
    )


def _extension(cert: x509.Certificate, oid: str) -> bytes:
    try:
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except (x509.ExtensionNotFound, ValueError):
        raise AttestationFailed(Refusal.MALFORMED, f"the VCEK has no extension {oid}") from None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise AttestationFailed(Refusal.MALFORMED, f"the VCEK's extension {oid} is not AMD's")
    return value.value


def _spl(raw: bytes, name: str) -> int:
    """A TCB component of the VCEK: a DER INTEGER of one or two bytes (0..255)."""
    if len(raw) not in (3, 4) or raw[0] != 0x02 or raw[1] != len(raw) - 2 or int.from_bytes(raw[2:], "big") > 255:
        raise AttestationFailed(Refusal.MALFORMED, f"the VCEK's {name} SPL is not a small DER INTEGER")
    return int.from_bytes(raw[2:], "big")


def _product(vcek: x509.Certificate) -> str:
    raw = _extension(vcek, _AMD + "2")  # productName, a DER IA5String such as "Milan-B0"
    if len(raw) < 2 or raw[0] != 0x16 or raw[1] != len(raw) - 2:
        raise AttestationFailed(Refusal.MALFORMED, "the VCEK's product name is not a DER IA5String")
    name = raw[2:].decode("ascii", "replace").split("-")[0]
    if name not in PRODUCTS:
        raise AttestationFailed(
            Refusal.UNTRUSTED_ROOT, f"the VCEK is for product {name[:20]!r}; AMD roots are pinned for {', '.join(PRODUCTS)}"
        )
    return name


@dataclass
class SnpVerifier:
    """`measurement`: the expected launch digest (48 bytes) of the server's image;
    `min_tcb` and `min_abi`: the oldest firmware accepted; `max_vmpl`: the least privileged
    level a report may be requested at; `crl`: AMD's CRL for the product (DER), if supplied.
    `roots` maps a product to its (ARK, ASK), AMD's pinned ones unless a test passes its own."""

    measurement: bytes
    min_tcb: Tcb = Tcb()
    allow_debug: bool = False
    clock: Callable[[], float] = time.time
    roots: Mapping[str, tuple[x509.Certificate, x509.Certificate]] | None = None
    max_vmpl: int = 0
    min_abi: tuple[int, int] = FIRST_SNP_ABI
    crl: bytes | None = None

    def verify(self, evidence: Mapping[str, Any], binding: bytes) -> None:
        if evidence.get("tee") != "amd-sev-snp":
            raise AttestationFailed(Refusal.WRONG_PLATFORM, f"the amd-sev-snp verifier got evidence of {str(evidence.get('tee'))[:40]!r}")
        report = parse_report(field_bytes(evidence, "report", REPORT_BYTES + 3))
        if report.signing_key != 0:
            raise AttestationFailed(Refusal.UNSUPPORTED, "the report is not signed by a VCEK (a VLEK chain is not verified here)")
        vcek = certificate(field_bytes(evidence, "vcek", MAX_CERTIFICATE_BYTES), "the VCEK")
        self._check_chain(vcek, datetime.fromtimestamp(self.clock(), UTC))
        self._check_signature(report, vcek)
        if _extension(vcek, _AMD + "4") != report.chip_id:
            raise AttestationFailed(Refusal.CHAIN, "the VCEK is another chip's (its hwID is not the report's CHIP_ID)")
        certified = Tcb(**{name: _spl(_extension(vcek, oid), name) for name, oid in _TCB_OIDS.items()})
        if certified != report.reported_tcb:
            raise AttestationFailed(Refusal.TCB, f"the VCEK certifies TCB {certified}, the report claims {report.reported_tcb}")
        if report.policy & POLICY_DEBUG and not self.allow_debug:
            raise AttestationFailed(Refusal.POLICY, "the guest policy allows debugging")
        if report.policy & POLICY_MIGRATE_MA:
            raise AttestationFailed(Refusal.POLICY, "the guest policy allows a migration agent, which can export the guest's memory")
        if report.vmpl > self.max_vmpl:
            raise AttestationFailed(Refusal.POLICY, f"the report was requested at VMPL {report.vmpl}; at most {self.max_vmpl} is accepted")
        if report.current_abi < self.min_abi:
            abi, minimum = ".".join(map(str, report.current_abi)), ".".join(map(str, self.min_abi))
            raise AttestationFailed(Refusal.TCB, f"firmware ABI {abi} is below the minimum {minimum}")
        if not report.reported_tcb.at_least(self.min_tcb):
            raise AttestationFailed(Refusal.TCB, f"TCB {report.reported_tcb} is below the minimum {self.min_tcb}")
        if report.measurement != self.measurement:
            raise AttestationFailed(Refusal.MEASUREMENT, "MEASUREMENT is not the expected image's")
        if report.report_data != binding.ljust(64, b"\0"):
            raise AttestationFailed(Refusal.BINDING, "REPORT_DATA is not this session's binding")

    def _check_chain(self, vcek: x509.Certificate, at: datetime) -> None:
        product = _product(vcek)
        ark, ask = self.roots[product] if self.roots else (pinned(f"amd-{product.lower()}-ark"), pinned(f"amd-{product.lower()}-ask"))
        for cert, what in ((ark, f"ARK-{product}"), (ask, f"ASK-{product}"), (vcek, "the VCEK")):
            check_validity(cert, at, what)
        check_issued(ask, ark, f"ASK-{product}")
        check_issued(vcek, ask, "the VCEK")
        if self.crl is not None:
            crl = revocation_list(self.crl, ark, at, f"AMD's CRL for {product}")
            check_not_revoked(ask, crl, f"ASK-{product}")
            check_not_revoked(vcek, crl, "the VCEK")

    @staticmethod
    def _check_signature(report: SnpReport, vcek: x509.Certificate) -> None:
        key = vcek.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise AttestationFailed(Refusal.UNSUPPORTED, "the VCEK's key is not P-384")
        try:
            key.verify(encode_dss_signature(report.r, report.s), report.signed, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise AttestationFailed(Refusal.SIGNATURE, "the report's signature does not verify under the VCEK") from None
