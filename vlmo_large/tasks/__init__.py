"""Training tasks: each says what data it reads, which encoder passes it runs, how it scores them
and which parameters it trains (base.Task); registry.py registers them and finds them by name
(the pretraining stages "mim", "text_mlm" and "vl" are built in: one file each). Shared losses:
losses.py; the loss weights: loss_weights.py. Import from the submodules (this package file stays
empty so that the run config can read loss_weights.py without torch)."""
