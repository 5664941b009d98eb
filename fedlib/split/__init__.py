"""Split fine-tuning: the model sliced between a client and a server (see `slicing`)."""
