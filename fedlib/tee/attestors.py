"""The split server's side: evidence from the platform it runs on, carrying the session binding.

- `NitroNsmAttestor`, inside an AWS Nitro Enclave: asks the Nitro Secure Module (`/dev/nsm`,
  the kernel's `linux/nsm.h` raw ioctl) for an attestation document whose `user_data` is the
  binding.
- `TsmReportAttestor`, inside an SEV-SNP guest (Linux 6.7 or later): asks for a report through
  the kernel's configfs-tsm interface (`/sys/kernel/config/tsm/report`) with the binding in
  REPORT_DATA, and sends the VCEK from the certificates the host attached (`auxblob`) or, where
  the host attaches none, from a file the operator fetched from AMD's KDS.

Neither platform exists where fedlib's CI runs, so these two are exercised only on real hardware
(docs/tee.md says how); the parsing of the certificate table is tested here.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from fedlib.tee.evidence import AttestationFailed, Refusal

NSM_IOCTL_RAW = 0xC0200A00  # _IOWR(0x0A, 0, struct nsm_raw), struct nsm_raw = two {u64 addr, u64 len}
NSM_RESPONSE_MAX = 0x3000
VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")  # GHCB specification, certificate table


class _NsmRaw(ctypes.Structure):
    _fields_ = [
        ("request_addr", ctypes.c_uint64),
        ("request_len", ctypes.c_uint64),
        ("response_addr", ctypes.c_uint64),
        ("response_len", ctypes.c_uint64),
    ]


@dataclass
class NitroNsmAttestor:
    device: str = "/dev/nsm"

    def evidence(self, binding: bytes) -> dict[str, Any]:
        request = cbor2.dumps({"Attestation": {"user_data": binding, "nonce": None, "public_key": None}})
        request_buffer = ctypes.create_string_buffer(request, len(request))
        response_buffer = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
        raw = _NsmRaw(ctypes.addressof(request_buffer), len(request), ctypes.addressof(response_buffer), NSM_RESPONSE_MAX)
        descriptor = os.open(self.device, os.O_RDWR)
        try:
            fcntl.ioctl(descriptor, NSM_IOCTL_RAW, raw)
        finally:
            os.close(descriptor)
        answer = cbor2.loads(response_buffer.raw[: raw.response_len])
        if not isinstance(answer, dict) or not isinstance(answer.get("Attestation"), dict):
            raise RuntimeError(f"the Nitro Secure Module refused the attestation request: {str(answer)[:200]}")
        return {"tee": "aws-nitro", "document": base64.b64encode(answer["Attestation"]["document"]).decode()}


def vcek_from_certificate_table(table: bytes) -> bytes | None:
    """The VCEK (DER) in the certificate table an SEV-SNP host attaches to an extended report:
    entries of a GUID, an offset and a length, ended by an all-zero entry."""
    for start in range(0, len(table) - 23, 24):
        guid, offset, length = table[start : start + 16], *struct.unpack_from("<II", table, start + 16)
        if not any(table[start : start + 24]):
            return None
        if VCEK_GUID in (uuid.UUID(bytes=guid), uuid.UUID(bytes_le=guid)):
            if offset + length > len(table):
                raise AttestationFailed(Refusal.MALFORMED, "the host's certificate table points past its end")
            return table[offset : offset + length]
    return None


@dataclass
class TsmReportAttestor:
    root: Path = Path("/sys/kernel/config/tsm/report")
    vcek_file: Path | None = None

    def evidence(self, binding: bytes) -> dict[str, Any]:
        entry = Path(tempfile.mkdtemp(prefix="fedlib-", dir=self.root))  # configfs fills the new folder in
        try:
            if (entry / "provider").read_text().strip() != "sev_guest":
                raise RuntimeError(f"{entry}: the TSM provider is not sev_guest; only SEV-SNP reports are produced here")
            (entry / "inblob").write_bytes(binding.ljust(64, b"\0"))
            report = (entry / "outblob").read_bytes()
            table = (entry / "auxblob").read_bytes() if (entry / "auxblob").exists() else b""
        finally:
            entry.rmdir()
        vcek = vcek_from_certificate_table(table) or (self.vcek_file.read_bytes() if self.vcek_file else None)
        if vcek is None:
            raise RuntimeError("the host attached no VCEK to the report: fetch it from AMD's KDS and pass --vcek-file")
        return {"tee": "amd-sev-snp", "report": base64.b64encode(report).decode(), "vcek": base64.b64encode(vcek).decode()}
