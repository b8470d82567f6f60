"""Adapter manifests (adapter.yaml), their data, versions, and adding or removing one."""
