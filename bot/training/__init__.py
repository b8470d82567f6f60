"""Training adapters: the `bot train` path, data-parallel runs, self-distillation data."""
