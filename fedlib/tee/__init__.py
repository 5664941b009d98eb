"""Trusted execution: the evidence a split server gives that it runs a known image in a TEE,
and the client's verifiers of it (`aws-nitro`: `nitro.py`, `amd-sev-snp`: `sev_snp.py`) up to the
vendors' roots pinned in `chain.py` and shipped in `roots/`. `evidence.py` holds what both
share: the protocols, the named refusals, the decoding of untrusted fields. `attestors.py` is
the server's side on real hardware. See docs/tee.md."""
