"""The TEE verifiers against real evidence from real hardware (tests/fixtures/attestation/, each
file's header names its source), against evidence built under a test root (the session binding,
which no real fixture can carry), fuzzed, and end to end in a split fine-tuning run."""

from __future__ import annotations

import base64
import random
import threading
from datetime import UTC, datetime

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from fedlib.tee.chain import pinned
from fedlib.tee.evidence import AttestationFailed, Refusal
from fedlib.tee.nitro import NitroVerifier
from fedlib.tee.sev_snp import SnpVerifier, Tcb
from tests.tee_evidence import NITRO_PCRS, NitroAttestor, SnpAttestor, StandInVendor, fixture_text, with_duplicate_extension, with_version

SESSION = bytes(range(32))  # a binding of some session none of the real fixtures was made for

# What the fixtures' enclave and guest measured (read from the fixtures once, written here as an
# operator would write them into split.attestation).
NITRO_TIME = datetime(2024, 9, 7, 14, 37, 39, 545000, UTC).timestamp()
NITRO_DEBUG_TIME = datetime(2024, 9, 7, 14, 38, 6, 508000, UTC).timestamp()
NITRO_PCRS_REAL = {
    0: "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
    1: "0343b056cd8485ca7890ddd833476d78460aed2aa161548e4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa",
    2: "d5dcbdea0aa39c802f9d55ced2ea6e4d74ecec5f08fe40c508882639c9090642669106a062a3e24ee2805a3024b9b75c",
}
NITRO_CHOSEN = b"\x01" * 1024  # the fixture's nonce and user_data
SNP_MEASUREMENT = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
SNP_TIME = datetime(2025, 1, 1, tzinfo=UTC).timestamp()  # within the VCEK's validity (2023-04-03 .. 2030-04-03)


def _nitro_raw(name: str = "aws-nitro-document.b64") -> bytes:
    return base64.b64decode(fixture_text(name))


def _nitro(raw: bytes) -> dict:
    return {"tee": "aws-nitro", "document": base64.b64encode(raw).decode()}


def _nitro_verifier(at: float = NITRO_TIME + 1, **kwargs) -> NitroVerifier:
    pcrs = {index: bytes.fromhex(digest) for index, digest in NITRO_PCRS_REAL.items()}
    return NitroVerifier(**{"pcrs": pcrs, "clock": lambda: at, **kwargs})


def _snp_raw() -> tuple[bytes, bytes]:
    pem = fixture_text("amd-sev-snp-milan-vcek.pem").splitlines()
    return bytes.fromhex(fixture_text("amd-sev-snp-milan-report.hex")), base64.b64decode("".join(pem[1:-1]))


def _snp(report: bytes, vcek: bytes) -> dict:
    return {"tee": "amd-sev-snp", "report": base64.b64encode(report).decode(), "vcek": base64.b64encode(vcek).decode()}


def _snp_verifier(at: float = SNP_TIME, **kwargs) -> SnpVerifier:
    return SnpVerifier(**{"measurement": bytes.fromhex(SNP_MEASUREMENT), "clock": lambda: at, **kwargs})


def _refused(verifier, evidence: dict, binding: bytes) -> Refusal:
    with pytest.raises(AttestationFailed) as info:
        verifier.verify(evidence, binding)
    return info.value.reason


def _reencode(raw: bytes, **fields) -> bytes:
    """The document with payload fields replaced (its signature no longer covers them)."""
    protected, unprotected, payload, signature = cbor2.loads(raw)
    body = cbor2.loads(payload) | fields
    return cbor2.dumps([protected, unprotected, cbor2.dumps(body), signature])


# --- AWS Nitro Enclaves, real evidence ---------------------------------------------------------


def test_nitro_accepts_its_real_fixture_at_its_timestamp():
    _nitro_verifier().verify(_nitro(_nitro_raw()), NITRO_CHOSEN)


def test_the_shipped_nitro_root_is_the_one_aws_publishes():
    root = pinned("aws-nitro-enclaves-root-g1")
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert cbor2.loads(cbor2.loads(_nitro_raw())[2])["cabundle"][0] == root.public_bytes(Encoding.DER)


def test_nitro_refuses_a_flipped_signature_byte():
    raw = bytearray(_nitro_raw())
    raw[-1] ^= 0x01  # the last byte of the COSE signature
    assert _refused(_nitro_verifier(), _nitro(bytes(raw)), NITRO_CHOSEN) is Refusal.SIGNATURE


def test_nitro_refuses_a_changed_signed_field():
    raw = _reencode(_nitro_raw(), user_data=SESSION)  # a replayer writing this session's binding in
    assert _refused(_nitro_verifier(), _nitro(raw), SESSION) is Refusal.SIGNATURE


def test_nitro_refuses_certificates_from_another_chain():
    other = StandInVendor("other")
    raw = _nitro_raw()
    bundle = cbor2.loads(cbor2.loads(raw)[2])["cabundle"]
    foreign_root = _reencode(raw, cabundle=[other.root.public_bytes(Encoding.DER), *bundle[1:]])
    assert _refused(_nitro_verifier(), _nitro(foreign_root), NITRO_CHOSEN) is Refusal.UNTRUSTED_ROOT
    made = datetime.fromtimestamp(NITRO_TIME - 60, UTC)  # a foreign leaf valid when the document was made
    foreign_leaf = other.leaf(ec.generate_private_key(ec.SECP384R1()), start=made)
    assert (
        _refused(_nitro_verifier(), _nitro(_reencode(raw, certificate=foreign_leaf.public_bytes(Encoding.DER))), NITRO_CHOSEN)
        is Refusal.CHAIN
    )
    gap = _reencode(raw, cabundle=[bundle[0], bundle[1], bundle[3]])  # AWS's own certificates, the zonal one left out
    assert _refused(_nitro_verifier(), _nitro(gap), NITRO_CHOSEN) is Refusal.CHAIN


def test_nitro_refuses_a_wrong_pcr():
    pcrs = {index: bytes.fromhex(digest) for index, digest in NITRO_PCRS_REAL.items()} | {2: bytes(47) + b"\x01"}
    assert _refused(_nitro_verifier(pcrs=pcrs), _nitro(_nitro_raw()), NITRO_CHOSEN) is Refusal.MEASUREMENT


def test_nitro_refuses_a_debug_enclave():
    raw = _nitro_raw("aws-nitro-document-debug.b64")
    verifier = _nitro_verifier(at=NITRO_DEBUG_TIME + 1, pcrs={})
    assert _refused(verifier, _nitro(raw), NITRO_CHOSEN) is Refusal.POLICY
    assert _refused(_nitro_verifier(at=NITRO_DEBUG_TIME + 1), _nitro(raw), NITRO_CHOSEN) is Refusal.POLICY


def test_nitro_refuses_expired_certificates_and_old_documents():
    hours = 3600.0
    assert _refused(_nitro_verifier(at=NITRO_TIME + 4 * hours), _nitro(_nitro_raw()), NITRO_CHOSEN) is Refusal.EXPIRED
    assert _refused(_nitro_verifier(at=NITRO_TIME + 600), _nitro(_nitro_raw()), NITRO_CHOSEN) is Refusal.STALE
    assert _refused(_nitro_verifier(at=datetime.now(UTC).timestamp()), _nitro(_nitro_raw()), NITRO_CHOSEN) is Refusal.EXPIRED


def test_nitro_refuses_a_real_document_for_another_session():
    assert _refused(_nitro_verifier(), _nitro(_nitro_raw()), SESSION) is Refusal.BINDING
    no_binding = _reencode(_nitro_raw(), user_data=None, nonce=None)
    assert _refused(_nitro_verifier(), _nitro(no_binding), NITRO_CHOSEN) is Refusal.SIGNATURE  # unsigned edits never get that far


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: raw[:-40], Refusal.TRUNCATED),
        (lambda raw: raw[:3], Refusal.TRUNCATED),
        (lambda raw: raw + bytes(20000), Refusal.TOO_LARGE),
        (lambda raw: b"\xff" + raw, Refusal.MALFORMED),
        (lambda raw: raw + b"\x00", Refusal.MALFORMED),  # trailing bytes
        (lambda raw: cbor2.dumps(cbor2.loads(raw)[:3]), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, timestamp="yesterday"), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, timestamp=True), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, pcrs={0: b"short"}), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, pcrs={99: bytes(48)}), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, cabundle=[]), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, cabundle=[7]), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, certificate=b"\x30\x03\x02\x01\x00"), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, user_data=bytes(1025)), Refusal.MALFORMED),
        (lambda raw: _reencode(raw, digest="SHA256"), Refusal.UNSUPPORTED),
        (lambda raw: cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(raw))), Refusal.MALFORMED),  # no CBOR tags at all
        (lambda raw: b"\x81" * 200, Refusal.MALFORMED),  # nesting
    ],
)
def test_nitro_refuses_malformed_documents_by_name(mutate, reason):
    assert _refused(_nitro_verifier(), _nitro(mutate(_nitro_raw())), NITRO_CHOSEN) is reason


@pytest.mark.parametrize(
    ("evidence", "reason"),
    [
        ({"tee": "aws-nitro"}, Refusal.MALFORMED),
        ({"tee": "aws-nitro", "document": "not base64!"}, Refusal.MALFORMED),
        ({"tee": "aws-nitro", "document": 12}, Refusal.MALFORMED),
        ({"tee": "aws-nitro", "document": "A" * 40000}, Refusal.TOO_LARGE),
        ({"tee": "amd-sev-snp", "document": "AAAA"}, Refusal.WRONG_PLATFORM),
    ],
)
def test_nitro_refuses_malformed_evidence_by_name(evidence, reason):
    assert _refused(_nitro_verifier(), evidence, NITRO_CHOSEN) is reason


# --- AMD SEV-SNP, real evidence ----------------------------------------------------------------


def test_sev_snp_accepts_its_real_fixture():
    report, vcek = _snp_raw()
    _snp_verifier().verify(_snp(report, vcek), report[0x50:0x90])  # its own REPORT_DATA, all 64 bytes


def test_the_shipped_amd_roots_certify_their_signing_keys():
    for product in ("milan", "genoa"):
        ark, ask = pinned(f"amd-{product}-ark"), pinned(f"amd-{product}-ask")
        ark.verify_directly_issued_by(ark)
        ask.verify_directly_issued_by(ark)
        assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{product.title()},O=Advanced Micro Devices")


def test_sev_snp_refuses_flipped_bytes():
    report, vcek = _snp_raw()
    for offset, reason in ((0x2A0, Refusal.SIGNATURE), (0x2E8, Refusal.SIGNATURE), (0x90, Refusal.SIGNATURE), (0x50, Refusal.SIGNATURE)):
        flipped = bytearray(report)
        flipped[offset] ^= 0x01
        assert _refused(_snp_verifier(), _snp(bytes(flipped), vcek), report[0x50:0x90]) is reason
    der = bytearray(vcek)
    der[-1] ^= 0x01  # the VCEK's own signature, by the ASK
    assert _refused(_snp_verifier(), _snp(report, bytes(der)), report[0x50:0x90]) is Refusal.CHAIN


def test_sev_snp_refuses_a_vcek_from_another_chain():
    report, _ = _snp_raw()
    other = SnpAttestor(StandInVendor("other"))
    stand_in = other.vcek(chip_id=report[0x1A0:0x1E0]).public_bytes(Encoding.DER)  # claims Milan, this chip, this TCB
    assert _refused(_snp_verifier(), _snp(report, stand_in), report[0x50:0x90]) is Refusal.CHAIN
    unknown_product = other.vcek(product="Zen9-A0").public_bytes(Encoding.DER)
    assert _refused(_snp_verifier(), _snp(report, unknown_product), report[0x50:0x90]) is Refusal.UNTRUSTED_ROOT


def test_sev_snp_refuses_a_wrong_measurement_and_old_firmware():
    report, vcek = _snp_raw()
    assert _refused(_snp_verifier(measurement=bytes(48)), _snp(report, vcek), report[0x50:0x90]) is Refusal.MEASUREMENT
    assert _refused(_snp_verifier(min_tcb=Tcb(snp=9)), _snp(report, vcek), report[0x50:0x90]) is Refusal.TCB
    _snp_verifier(min_tcb=Tcb(bootloader=3, snp=8, microcode=115)).verify(_snp(report, vcek), report[0x50:0x90])


def test_sev_snp_refuses_an_expired_vcek_at_a_later_time():
    report, vcek = _snp_raw()
    later = datetime(2031, 1, 1, tzinfo=UTC).timestamp()
    assert _refused(_snp_verifier(at=later), _snp(report, vcek), report[0x50:0x90]) is Refusal.EXPIRED


def test_sev_snp_refuses_a_real_report_for_another_session():
    report, vcek = _snp_raw()
    assert _refused(_snp_verifier(), _snp(report, vcek), SESSION) is Refusal.BINDING
    assert _refused(_snp_verifier(), _snp(report, vcek), b"") is Refusal.BINDING


def _with(report: bytes, offset: int, value: bytes) -> bytes:
    return report[:offset] + value + report[offset + len(value) :]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r, v: (r[:-1], v), Refusal.TRUNCATED),
        (lambda r, v: (r[:0x2A0], v), Refusal.TRUNCATED),
        (lambda r, v: (r + b"\0", v), Refusal.TOO_LARGE),
        (lambda r, v: (r + bytes(5000), v), Refusal.TOO_LARGE),
        (lambda r, v: (_with(r, 0x00, b"\x09"), v), Refusal.UNSUPPORTED),  # version 9
        (lambda r, v: (_with(r, 0x34, b"\x02"), v), Refusal.UNSUPPORTED),  # signature algorithm
        (lambda r, v: (_with(r, 0x30, b"\x07"), v), Refusal.MALFORMED),  # VMPL 7
        (lambda r, v: (_with(r, 0x48, b"\x04"), v), Refusal.UNSUPPORTED),  # signed by a VLEK
        (lambda r, v: (r, v[:-30]), Refusal.MALFORMED),
        (lambda r, v: (r, b"\x30" + v), Refusal.MALFORMED),
        (lambda r, v: (r, v + bytes(9000)), Refusal.TOO_LARGE),
    ],
)
def test_sev_snp_refuses_malformed_reports_by_name(mutate, reason):
    report, vcek = _snp_raw()
    assert _refused(_snp_verifier(), _snp(*mutate(report, vcek)), report[0x50:0x90]) is reason


# --- evidence built under a test root: the session binding -------------------------------------


def test_nitro_binding_under_a_test_root():
    vendor = StandInVendor()
    attestor = NitroAttestor(vendor)
    verifier = NitroVerifier(pcrs={0: NITRO_PCRS[0], 1: NITRO_PCRS[1]}, root=vendor.root)
    verifier.verify(attestor.evidence(SESSION), SESSION)
    assert _refused(verifier, attestor.evidence(bytes(32)), SESSION) is Refusal.BINDING
    assert _refused(verifier, NitroAttestor(vendor, bind_to=b"").evidence(SESSION), SESSION) is Refusal.BINDING
    unbound = base64.b64encode(attestor.document(None)).decode()  # neither user_data nor nonce
    assert _refused(verifier, {"tee": "aws-nitro", "document": unbound}, SESSION) is Refusal.BINDING
    assert _refused(NitroVerifier(pcrs={0: NITRO_PCRS[1]}, root=vendor.root), attestor.evidence(SESSION), SESSION) is Refusal.MEASUREMENT
    assert _refused(_nitro_verifier(at=datetime.now(UTC).timestamp()), attestor.evidence(SESSION), SESSION) is Refusal.UNTRUSTED_ROOT


def test_sev_snp_binding_and_chip_under_a_test_root():
    vendor = StandInVendor()
    attestor = SnpAttestor(vendor)
    verifier = SnpVerifier(measurement=attestor.measurement, roots={"Milan": (vendor.root, vendor.intermediate)})
    verifier.verify(attestor.evidence(SESSION), SESSION)
    assert _refused(verifier, attestor.evidence(bytes(32)), SESSION) is Refusal.BINDING
    report = base64.b64encode(attestor.report(SESSION)).decode()
    other_chip = base64.b64encode(attestor.vcek(chip_id=bytes(64)).public_bytes(Encoding.DER)).decode()
    assert _refused(verifier, {"tee": "amd-sev-snp", "report": report, "vcek": other_chip}, SESSION) is Refusal.CHAIN
    other_tcb = base64.b64encode(attestor.vcek(tcb=(3, 0, 9, 115)).public_bytes(Encoding.DER)).decode()
    assert _refused(verifier, {"tee": "amd-sev-snp", "report": report, "vcek": other_tcb}, SESSION) is Refusal.TCB
    debug = SnpAttestor(vendor, policy=0x30000 | 1 << 19, key=attestor.key)
    assert _refused(verifier, debug.evidence(SESSION), SESSION) is Refusal.POLICY
    assert _refused(_snp_verifier(), attestor.evidence(SESSION), SESSION) is Refusal.CHAIN  # AMD's pinned roots


# --- fuzzed: every case refused by name, none escaping -----------------------------------------


def _mutated(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 4))):
        move = rng.randrange(5)
        at = rng.randrange(len(data) + 1) if data else 0
        if move == 0 and data:  # flip a bit
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif move == 1:  # cut
            del data[at:]
        elif move == 2:  # insert random bytes
            data[at:at] = rng.randbytes(rng.choice((1, 2, 8, 300)))
        elif move == 3 and data:  # overwrite a run with one byte value (a length, a type, 0xff)
            data[at : at + rng.randrange(1, 9)] = bytes(
                [rng.choice((0x00, 0x18, 0x1B, 0x5A, 0x7F, 0x9F, 0xBF, 0xD8, 0xFF))]
            ) * rng.randrange(1, 9)
        else:  # repeat a slice
            data[at:at] = data[max(0, at - 64) : at]
    return bytes(data)


def _random_cbor(rng: random.Random, depth: int = 0):
    pick = rng.randrange(10 if depth < 4 else 6)
    if pick == 0:
        return rng.choice((0, -1, 2**64 - 1, -(2**64), 2**70, True, None, 1.5, float("nan")))
    if pick == 1:
        return rng.randbytes(rng.choice((0, 1, 48, 1025, 3000)))
    if pick == 2:
        return rng.choice(("", "SHA384", "\u202e", "x" * 500))
    if pick == 3:
        return rng.randrange(2**31)
    if pick == 4:
        return cbor2.CBORTag(rng.choice((0, 1, 2, 18, 24, 28, 29, 258, 55799)), rng.randbytes(4))
    if pick == 5:
        return bytes(48)
    if pick < 8:
        return [_random_cbor(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice((0, 1, 31, 32, -1, "pcrs", "x")): _random_cbor(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_fuzzed_evidence_is_refused_by_name():
    rng = random.Random(20261207)
    nitro_raw, (report, vcek) = _nitro_raw(), _snp_raw()
    protected, _, payload, signature = cbor2.loads(nitro_raw)
    fields = list(cbor2.loads(payload))
    nitro, snp = _nitro_verifier(), _snp_verifier()
    reasons: dict[Refusal, int] = {}
    escapes: list[str] = []
    cases = 6400
    for case in range(cases):
        kind = case % 8
        if kind == 0:
            verifier, evidence = nitro, _nitro(_mutated(rng, nitro_raw))
        elif kind == 1:  # a payload field of another type or size (re-encoded, so the CBOR itself is sound)
            verifier, evidence = nitro, _nitro(_reencode(nitro_raw, **{rng.choice(fields): _random_cbor(rng)}))
        elif kind == 2:  # any CBOR where the document, the payload or the protected header goes
            shape = rng.randrange(3)
            value = cbor2.dumps(_random_cbor(rng), value_sharing=False)
            document = (
                value if shape == 0 else cbor2.dumps([protected, {}, value, signature] if shape == 1 else [value, {}, payload, signature])
            )
            verifier, evidence = nitro, _nitro(document)
        elif kind == 3:
            verifier, evidence = snp, _snp(_mutated(rng, report), vcek)
        elif kind == 4:
            verifier, evidence = snp, _snp(report, _mutated(rng, vcek))
        elif kind == 6:  # a VCEK of any version number (cryptography: `x509.InvalidVersion` at load)
            verifier, evidence = snp, _snp(report, with_version(vcek, rng.randrange(256)))
        elif kind == 7:  # a VCEK listing an extension twice (`x509.DuplicateExtension`), then mutated further
            duplicated = with_duplicate_extension(vcek)
            verifier, evidence = snp, _snp(report, duplicated if rng.random() < 0.5 else _mutated(rng, duplicated))
        else:  # report fields of any value, at the offsets the verifier reads
            offset = rng.choice((0x00, 0x08, 0x30, 0x34, 0x48, 0x50, 0x90, 0x180, 0x1A0, 0x2A0, 0x2E8))
            verifier, evidence = snp, _snp(_with(report, offset, rng.randbytes(rng.choice((1, 4, 8)))), vcek)
        try:
            verifier.verify(evidence, SESSION)
        except AttestationFailed as refused:
            reasons[refused.reason] = reasons.get(refused.reason, 0) + 1
        except Exception as err:  # noqa: BLE001 - the point: count what escapes
            escapes.append(f"case {case}: {type(err).__name__}: {err}"[:300])
        else:
            escapes.append(f"case {case}: accepted")
    assert escapes == [], escapes[:5]
    assert sum(reasons.values()) == cases >= 6000
    assert {Refusal.MALFORMED, Refusal.TRUNCATED, Refusal.SIGNATURE, Refusal.UNSUPPORTED} <= set(reasons), reasons


# --- end to end: a split fine-tuning run that requires a TEE -----------------------------------

_TEST_VENDOR = StandInVendor("split-run")


def _nitro_under_test_root(expected):
    """The aws-nitro verifier as the config builds it, with the stand-in vendor's root pinned."""
    return NitroVerifier(pcrs={i: bytes.fromhex(d) for i, d in expected.pcrs.items()}, max_age_s=expected.max_age_s, root=_TEST_VENDOR.root)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from fedlib.split.attestation import VERIFIERS

    if "aws-nitro-test-root" not in VERIFIERS.items:
        VERIFIERS.register("aws-nitro-test-root")(_nitro_under_test_root)


@pytest.fixture
def tee_server(tmp_path, corpus_dir, tiny_model_dir):
    """The real split server (HTTP on 127.0.0.1, in a thread of this process so the test can
    set its attestor), and a function writing a config that trains against it with require_tee."""
    from fedlib.config import load_config
    from fedlib.split.server import http_server
    from tasks.from_config import keyring
    from tasks.split_server import split_server
    from tests.conftest import tiny_config_dict, write_config

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws",))
    raw["split"] = {"cut": 1, "steps": 3, "rounds": 1, "learning_rate": 0.01, "spf_fraction": 0.01}
    config = load_config(write_config(tmp_path, raw))
    keyring(config, create=True)
    state = split_server(config)
    httpd = http_server(state)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    pcrs = {index: NITRO_PCRS[index].hex() for index in (0, 1, 2)}
    attestation = {"verifier": "aws-nitro-test-root", "pcrs": pcrs}
    raw["split"] |= {"require_tee": True, "attestation": attestation, "server_url": f"http://127.0.0.1:{httpd.server_address[1]}"}
    yield state, str(write_config(tmp_path, raw))
    httpd.shutdown()
    httpd.server_close()


def test_a_split_run_requiring_a_tee_completes_with_bound_evidence_and_is_refused_with_another_sessions(tee_server):
    from flows.split_finetune import split_finetune

    state, config_path = tee_server
    state.attestor = NitroAttestor(_TEST_VENDOR)
    out = split_finetune(config_path)
    assert out["rounds"][-1]["perplexity"] < out["perplexity_before"]
    state.attestor = NitroAttestor(_TEST_VENDOR, bind_to=bytes(32))  # evidence made for another session
    with pytest.raises(AttestationFailed) as info:
        split_finetune(config_path)
    assert info.value.reason is Refusal.BINDING


def test_the_vcek_is_found_in_the_hosts_certificate_table():
    import struct
    import uuid

    from fedlib.tee.attestors import VCEK_GUID, vcek_from_certificate_table

    ask, vcek = b"A" * 30, b"V" * 50
    ask_guid = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
    header = 3 * 24  # two entries and the all-zero end
    table = (
        ask_guid.bytes_le
        + struct.pack("<II", header, len(ask))
        + VCEK_GUID.bytes_le
        + struct.pack("<II", header + len(ask), len(vcek))
        + bytes(24)
    )
    assert vcek_from_certificate_table(table + ask + vcek) == vcek
    assert vcek_from_certificate_table(table[:24] + bytes(24) + ask) is None
    assert vcek_from_certificate_table(b"") is None
    with pytest.raises(AttestationFailed) as info:
        vcek_from_certificate_table(table + ask)  # the VCEK's entry points past the end
    assert info.value.reason is Refusal.MALFORMED


def test_a_shipped_root_that_is_not_the_pinned_one_is_refused_at_load(monkeypatch):
    from fedlib.tee import chain

    chain.pinned.cache_clear()
    monkeypatch.setitem(chain.PINNED_ROOTS, "aws-nitro-enclaves-root-g1", "00" * 32)  # as if the file had been replaced
    try:
        with pytest.raises(RuntimeError, match="is not the pinned certificate"):
            chain.pinned("aws-nitro-enclaves-root-g1")
    finally:
        chain.pinned.cache_clear()
