"""Launching and supervising local worker processes."""
