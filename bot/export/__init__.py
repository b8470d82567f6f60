"""Artefacts built from trained adapters: the vLLM folder (`bot export`) and merged adapters (`bot merge`)."""
