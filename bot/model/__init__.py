"""The backbone: loading, devices, model families and what `bot info` reports."""
