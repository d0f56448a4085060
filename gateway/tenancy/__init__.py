"""Tenants, their keys, the usage ledger and the audit log, in one SQL database."""
