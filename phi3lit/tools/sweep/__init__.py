"""Sweeps: what a sweep file is (`grid`), running it (`ablate`), and summarising its points (`summary`, `stats`)."""
