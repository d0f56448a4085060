"""The invoice as a self-contained HTML document a public agency can file (one section per
tenant, every value escaped, no scripts, no external resources)."""

from __future__ import annotations

from collections import defaultdict
from html import escape

from billing.invoice import Invoice, InvoiceLine

_STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#111}table{border-collapse:collapse;"
    "width:100%;margin:1em 0}th,td{border:1px solid #999;padding:.3em .6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}section{page-break-after:always}"
)


def render_html(invoice: Invoice, *, issuer: str) -> str:
    by_tenant: dict[str, list[InvoiceLine]] = defaultdict(list)
    for line in invoice.lines:
        by_tenant[line.tenant].append(line)
    status = "final" if invoice.final else "provisional (the period is still open)"
    sections = [
        _section(invoice, tenant, lines, issuer, status)
        for tenant, lines in sorted(by_tenant.items())
    ]
    if not sections:
        sections = ["<p>No metered usage in this period.</p>"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Invoice {escape(invoice.period)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _section(
    invoice: Invoice, tenant: str, lines: list[InvoiceLine], issuer: str, status: str
) -> str:
    rows = "".join(
        f"<tr><td>{escape(line.model)}</td><td>{line.prompt_tokens:,}</td>"
        f"<td>{line.completion_tokens:,}</td><td>{line.requests:,}</td>"
        f"<td>{line.amount_eur:,.6f}</td></tr>"
        for line in lines
    )
    total = sum(line.amount_eur for line in lines)
    return (
        f"<section><h1>Invoice {escape(invoice.period)}-{escape(tenant)}</h1>"
        f"<p><strong>Issued by:</strong> {escape(issuer)}<br>"
        f"<strong>Customer:</strong> {escape(tenant)}<br>"
        f"<strong>Period:</strong> {invoice.start:%Y-%m-%d %H:%M} to "
        f"{invoice.end:%Y-%m-%d %H:%M} UTC<br><strong>Status:</strong> {escape(status)}</p>"
        "<table><thead><tr><th>Model</th><th>Prompt tokens</th><th>Completion tokens</th>"
        f"<th>Requests</th><th>Amount (EUR)</th></tr></thead><tbody>{rows}</tbody>"
        f"<tfoot><tr><th>Total</th><td></td><td></td><td></td><td>{total:,.6f}</td></tr>"
        "</tfoot></table><p>Amounts are the prices in force when each request was metered, "
        "excluding VAT. Usage is metered per request and kept in the operator's ledger; no "
        "prompt or completion text is retained.</p></section>"
    )
