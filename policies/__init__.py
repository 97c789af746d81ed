"""Shipped policy files (TOML), loaded by failcore.presets."""
