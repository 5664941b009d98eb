"""One federated round: the client's and the aggregator's parts, the broadcast, the signed manifest and checkpoints, and planning."""
