"""Firmware profiles shipped with edgefleet, as TOML data files (schema: agent.profiles)."""
