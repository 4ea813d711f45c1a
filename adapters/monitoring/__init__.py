"""Monitoring statistics: reference profiles and drift tests (PSI, MMD)."""
