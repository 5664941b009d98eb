"""The aggregator's side of a secure round: sum the masked updates it cannot read, then, with
the survivors' reveals, take the masks out of the sum and apply it as one averaged update."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedlib.secagg.fixedpoint import Tensors, decode, from_wire
from fedlib.secagg.masking import add_masked
from fedlib.secagg.quantised import Codes
from fedlib.secagg.weights import WeightRule
from fedlib.strategies import ClientUpdate, Strategy
from fedlib.update.chain import Expected
from fedlib.update.intake import AggregationReport, RoundIntake, check_quorum, read_updates
from fedlib.update.validation import check_update
from fedlib.wire.decode import bounded_int, load_tensors
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed


@dataclass(frozen=True)
class MaskedSum:
    residues: Tensors  # Σ masked weight/scale·update mod 2^32, as int64
    weight: int  # Σ the survivors' weights (examples, or 1 each under DP)
    weighted_steps: int  # Σ weight × local steps, for step normalisation
    weight_scale: float  # the scale every client divided its weight by
    codes: Codes | None = None  # how the clients coded their updates, with `secure_aggregation.bits`

    def mean_factor(self, rule: WeightRule) -> float:
        return rule.mean_factor(self.weight_scale, self.weight, self.weighted_steps)


def wire_template(global_adapter: Tensors) -> Tensors:
    """What a masked update must look like: the adapter's names and shapes, as int32."""
    return {name: torch.empty(value.shape, dtype=torch.int32) for name, value in global_adapter.items()}


def open_masked_update(
    blob: bytes, key: UpdateKey, ctx: EnvelopeContext, template: Tensors, expected: Expected, rule: WeightRule, codes: Codes | None = None
) -> tuple[tuple[Tensors, int, int], dict[str, str]]:
    """(residues, weight, local steps) of one masked update, and its authenticated metadata: the
    mask filter's receiving side (`fedlib.update.chain`). `ctx` names the session: an upload left
    from another attempt of the round was masked against other masks, and would turn the
    unmasked sum into noise. The weight is held to `rule`, since it scales the mean."""
    payload = open_sealed(blob, key, ctx)
    wire = wire_template(template) if codes is None else codes.wire_template(template)

    def allowed(name: str, spec) -> str | None:
        ref = wire.get(name)
        return None if ref is not None and spec.shape == tuple(ref.shape) and spec.dtype == ref.dtype else "not in the adapter's layout"

    tensors, meta = load_tensors(payload, "masked update", allowed)
    check_update(tensors, wire)
    num_examples, local_steps = expected.counts(meta)
    weight = bounded_int(meta, "weight", 1, expected.max_examples, "masked update")
    rule.check(weight, num_examples)
    residues = from_wire(tensors) if codes is None else codes.unpack(tensors, template)
    return (residues, weight, local_steps), meta


def sum_masked_updates(
    intake: RoundIntake, template: Tensors, rule: WeightRule, weight_scale: float, needed: int, codes: Codes | None = None
) -> tuple[MaskedSum, AggregationReport]:
    """Streamed like plain aggregation, through the same intake: one update in memory at a
    time. Needs at least `needed` updates (`secagg_min_survivors`), or the masks could not be
    removed. Every update must be of the intake's session and trained from its parent."""
    report = AggregationReport()

    def opener(blob: bytes, key: UpdateKey, ctx: EnvelopeContext) -> tuple[tuple[Tensors, int, int], dict[str, str]]:
        return open_masked_update(blob, key, ctx, template, intake.expected[ctx.client], rule, codes)

    total: Tensors = {name: torch.zeros(value.shape, dtype=torch.int64) for name, value in template.items()}
    weight = weighted_steps = 0
    for residues, client_weight, steps in read_updates(intake, report, opener):
        started = time.perf_counter()
        add_masked(total, residues)
        weight += client_weight
        weighted_steps += client_weight * steps
        report.aggregate_s += time.perf_counter() - started
    why = f"secure aggregation needs {needed} (aggregation.min_clients, secure_aggregation.threshold)"
    check_quorum(intake, report, needed, why)
    return MaskedSum(total, weight, weighted_steps, weight_scale, codes), report


def finish_secure_round(
    masked: MaskedSum,
    unmasked: Tensors,
    global_adapter: Tensors,
    template: Tensors,
    rule: WeightRule,
    frac_bits: int,
    strategy: Strategy,
    round_number: int,
) -> Tensors:
    """The next global adapter from the sum with its masks taken out (`unmasked`, by
    `fedlib.secagg.protocol.unmask_sum`), by a strategy built with `secure_sum`: the clients
    already normalised, clipped and noised what they masked."""
    factor = masked.mean_factor(rule)
    summed = decode(unmasked, frac_bits) if masked.codes is None else masked.codes.decode_sum(unmasked)
    mean = {name: (value * factor).to(global_adapter[name].dtype) for name, value in summed.items()}
    return {**global_adapter, **strategy.aggregate(round_number, template, [ClientUpdate("secure-sum", masked.weight, mean)])}
