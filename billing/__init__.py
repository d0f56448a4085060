"""Billing: the price book, invoices from Prometheus, reconciliation with the ledger."""
