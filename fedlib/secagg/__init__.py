"""Secure aggregation (Bonawitz et al., CCS 2017): the aggregator learns only the sum.

Each client encodes its update in fixed point modulo 2^32 and adds a pairwise mask for every
other client: +PRG(s_ij) towards a peer that sorts after it, −PRG(s_ij) towards one before it, so
that the masks cancel in the sum. s_ij comes from an X25519 exchange of per-round mask keys. Each
client also Shamir-shares its per-round mask key among the others, so that if it drops out after
masking, any `threshold` survivors let the aggregator rebuild its masks and remove them.
"""
