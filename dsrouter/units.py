"""Byte units: config sizes are in MiB (`*_mb` keys) and KiB (`*_kb` keys)."""

KiB = 1024
MiB = 1024 * 1024
