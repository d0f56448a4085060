"""The `sluis` command."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from billing.prometheus import BillingError
from gateway.admin_client import AdminClient, AdminError
from gateway.serve import run_async
from gateway.settings import ConfigError, load_settings
from gateway.tables import render_table
from loadtests.capacity_command import add_command as add_capacity_command

TENANT_COLUMNS = ("name", "id", "status", "models", "created_at")
KEY_COLUMNS = ("id", "name", "prefix", "created_at", "expires_at", "revoked_at")
USAGE_COLUMNS = (
    "tenant",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
INVOICE_COLUMNS = (
    "tenant",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "requests",
    "amount_eur",
)
QUOTA_COLUMNS = ("scope", "limit", "max", "used", "reserved", "remaining", "reset_s")
AUDIT_COLUMNS = ("id", "at", "actor", "action", "target_type", "target_id")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    if args.run in SERVERS:
        _configure_logging()
    try:
        result: int = args.run(args)
        return result
    except ConfigError as exc:
        print(f"sluis: configuration error: {exc}", file=sys.stderr)
        return 2
    except (AdminError, BillingError) as exc:
        print(f"sluis: {exc}", file=sys.stderr)
        return exc.exit_code


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- servers ---------------------------------------------------------------------------------


def _run_gateway(args: argparse.Namespace) -> int:
    from gateway.serve import serve_gateway

    settings = load_settings(
        args.config,
        host=args.host,
        port=args.port,
        upstream_url=args.upstream,
        metrics_port=args.metrics_port,
    )
    run_async(serve_gateway(settings))
    return 0


def _run_up(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config, host=args.host, port=args.port, metrics_port=args.metrics_port
    )
    if settings.upstream().kind == "ray":
        from deployments.stack import StackNotReady, StackOptions, run_stack

        options = StackOptions(
            address=args.address,
            ray_metrics_port=args.ray_metrics_port,
            ready_timeout_s=args.ready_timeout,
        )
        try:
            return run_stack(settings, options)
        except StackNotReady as exc:
            print(f"sluis up: not ready: {exc}", file=sys.stderr, flush=True)
            return 1
    if args.address:
        raise ConfigError("--address: the config's upstream is not `kind: ray`")
    from gateway.serve import serve_up

    run_async(serve_up(settings))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from deployments.tiny_models import build_tiny_models

    for name, folder in build_tiny_models(args.dir, seed=args.seed).items():
        print(f"{name}: {folder}")
    return 0


def _run_fake_engine(args: argparse.Namespace) -> int:
    from gateway.serve import serve_fake_engine

    run_async(
        serve_fake_engine(args.host, args.port, ttft_s=args.ttft, token_delay_s=args.token_delay)
    )
    return 0


def _run_db_upgrade(args: argparse.Namespace) -> int:
    from gateway.tenancy.database import Database

    settings = load_settings(args.config)

    async def upgrade() -> None:
        database = Database.from_url(settings.database_url)
        try:
            await database.migrate()
        finally:
            await database.dispose()

    asyncio.run(upgrade())
    print("database is at the latest schema")
    return 0


SERVERS = (_run_gateway, _run_up, _run_fake_engine, _run_db_upgrade)


# -- admin API ------------------------------------------------------------------------------


def _admin(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    client = AdminClient.from_env(args.url, _admin_token(args))
    try:
        return client.call(method, path, **kwargs)
    finally:
        client.close()


def _admin_token(args: argparse.Namespace) -> str | None:
    """`--admin-token-file`, or `--admin-token` (which `ps` shows everyone: kept, with a warning),
    or None: the client then takes $SLUIS_ADMIN_TOKEN or the state folder's file."""
    if args.admin_token_file is not None:
        try:
            return args.admin_token_file.read_text().strip() or None
        except OSError as exc:
            raise AdminError(
                f"cannot read the admin token file {args.admin_token_file}: {exc.strerror}",
                exit_code=2,
            ) from exc
    if args.admin_token is not None:
        print(
            "sluis: warning: --admin-token shows the token to anyone who can list processes; "
            "use --admin-token-file or $SLUIS_ADMIN_TOKEN",
            file=sys.stderr,
        )
    token: str | None = args.admin_token
    return token


def _show(args: argparse.Namespace, payload: Any, columns: Sequence[str]) -> int:
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    rows = payload["data"] if isinstance(payload, dict) and "data" in payload else [payload]
    print(render_table(rows, columns))
    return 0


def _tenants_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "models": _split(args.models), "metadata": _metadata(args.meta)}
    return _show(args, _admin(args, "POST", "/tenants", json=body), TENANT_COLUMNS)


def _tenants_list(args: argparse.Namespace) -> int:
    return _show(args, _admin(args, "GET", "/tenants"), TENANT_COLUMNS)


def _tenants_get(args: argparse.Namespace) -> int:
    return _show(args, _admin(args, "GET", f"/tenants/{args.tenant}"), TENANT_COLUMNS)


def _tenants_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.models is not None:
        body["models"] = _split(args.models)
    if args.meta:
        body["metadata"] = _metadata(args.meta)
    if args.status:
        body["status"] = args.status
    if args.quota:
        body["quotas"] = _quota_patch(args.quota)
    headers = None if args.if_match is None else {"if-match": f'"{args.if_match}"'}
    payload = _admin(args, "PATCH", f"/tenants/{args.tenant}", json=body, headers=headers)
    return _show(args, payload, TENANT_COLUMNS)


def _tenants_status(status: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        payload = _admin(args, "PATCH", f"/tenants/{args.tenant}", json={"status": status})
        return _show(args, payload, TENANT_COLUMNS)

    return run


def _tenants_quota(args: argparse.Namespace) -> int:
    payload = _admin(args, "GET", f"/tenants/{args.tenant}/quota")
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(render_table(payload["limits"], QUOTA_COLUMNS))
    return 0


def _quota_patch(settings: list[str]) -> dict[str, Any]:
    """`[MODEL/]FIELD=VALUE` settings as a merge patch: the gateway merges it, so fields not
    named here are kept, whatever another operator changed meanwhile."""
    patch: dict[str, Any] = {}
    for setting in settings:
        name, sep, raw = setting.partition("=")
        if not sep:
            raise AdminError(f"--quota takes [MODEL/]FIELD=VALUE, got {setting!r}", exit_code=2)
        model, _, field = name.rpartition("/")
        target = patch.setdefault("models", {}).setdefault(model, {}) if model else patch
        if raw.lower() in ("none", "null", "unlimited"):
            target[field] = "unlimited"
        elif raw.lower() == "default":
            target[field] = None  # null in a merge patch: removed, back to the default
        else:
            try:
                target[field] = float(raw) if "." in raw else int(raw)
            except ValueError as exc:
                raise AdminError(f"--quota {setting!r}: not a number", exit_code=2) from exc
    return patch


def _keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.expires_in_days:
        body["expires_in_s"] = int(args.expires_in_days * 86400)
    payload = _admin(args, "POST", f"/tenants/{args.tenant}/keys", json=body)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(render_table([payload], KEY_COLUMNS))
        print(f"\nkey (shown only now): {payload['key']}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    return _show(args, _admin(args, "GET", f"/tenants/{args.tenant}/keys"), KEY_COLUMNS)


def _keys_revoke(args: argparse.Namespace) -> int:
    return _show(args, _admin(args, "DELETE", f"/keys/{args.key_id}"), KEY_COLUMNS)


def _keys_rotate(args: argparse.Namespace) -> int:
    payload = _admin(
        args, "POST", f"/keys/{args.key_id}/rotate", json={"grace_s": int(args.grace_hours * 3600)}
    )
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(render_table([payload, payload["previous"]], KEY_COLUMNS))
        print(f"\nnew key (shown only now): {payload['key']}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    params = {
        name: value
        for name, value in (
            ("tenant", args.tenant),
            ("model", args.model),
            ("from", args.start),
            ("to", args.end),
        )
        if value
    }
    return _show(args, _admin(args, "GET", "/usage", params=params), USAGE_COLUMNS)


def _audit(args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.tenant:
        params["tenant"] = args.tenant
    return _show(args, _admin(args, "GET", "/audit", params=params), AUDIT_COLUMNS)


def _invoice(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from billing.invoice import Period, build_invoice
    from billing.prometheus import PrometheusReader

    now = datetime.now(UTC)
    period = Period.parse(args.period, now=now)
    if args.tenant:
        _admin(args, "GET", f"/tenants/{args.tenant}")  # an unknown tenant is an error, not 0
    url = args.prometheus or os.environ.get("SLUIS_PROMETHEUS_URL", "http://127.0.0.1:9090")
    reader = PrometheusReader(url)
    try:
        invoice = build_invoice(reader, period, now=now, tenant=args.tenant)
        report = None
        if args.reconcile:
            from billing.reconcile import reconcile

            params = {"from": invoice.start.isoformat(), "to": invoice.end.isoformat()}
            if args.tenant:
                params["tenant"] = args.tenant
            ledger = _admin(args, "GET", "/usage", params=params)["data"]
            report = reconcile(invoice, ledger, reader, gap_step_s=args.gap_step_seconds)
    finally:
        reader.close()
    payload = invoice.to_json()
    if report is not None:
        payload["reconciliation"] = report.to_json()
    if args.format == "json" or args.json:
        print(json.dumps(payload, indent=2))
    elif args.format == "html":
        from billing.html import render_html

        print(render_html(invoice, issuer=args.issuer), end="")
    elif args.format == "csv":
        out = csv.writer(sys.stdout)
        out.writerow(INVOICE_COLUMNS)
        for line in payload["lines"]:
            out.writerow([line[column] for column in INVOICE_COLUMNS])
    else:
        state = "final" if invoice.final else f"open, to {invoice.end:%Y-%m-%d %H:%M} UTC"
        print(f"Invoice {invoice.period} ({state})")
        print(render_table(payload["lines"], INVOICE_COLUMNS))
        print(f"total EUR {payload['total_eur']:.6f}")
        if report is not None:
            _print_reconciliation(report.to_json())
    if report is not None and not report.clean:
        return 4  # differences or gaps: billing must not go out silently short
    return 0


def _print_reconciliation(report: dict[str, Any]) -> None:
    if report["clean"]:
        print("reconciliation: Prometheus and the ledger agree; no scrape gaps")
        return
    if report["differences"]:
        print("reconciliation: DIFFERENCES (Prometheus vs ledger)")
        print(
            render_table(
                report["differences"], ("tenant", "model", "field", "prometheus", "ledger")
            )
        )
    for lost in report["lost_series"]:
        print(
            f"reconciliation: LOST SERIES {lost['tenant']} / {lost['model']}: usage in the "
            "ledger, no series in Prometheus (is every gateway scraped?)"
        )
    for gap in report["gaps"]:
        print(f"reconciliation: SCRAPE GAP at {gap['target']} from {gap['start']} to {gap['end']}")


def _split(models: str | None) -> list[str]:
    return [m.strip() for m in (models or "").split(",") if m.strip()]


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    metadata = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            raise AdminError(f"--meta takes KEY=VALUE, got {pair!r}", exit_code=2)
        metadata[name] = value
    return metadata


# -- parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluis", description="Multi-tenant inference gateway.")
    commands = parser.add_subparsers(metavar="COMMAND")

    gateway = commands.add_parser("gateway", help="serve the gateway in front of an upstream")
    gateway.add_argument("--config", type=Path)
    gateway.add_argument("--upstream", help="URL of an OpenAI-compatible server")
    gateway.add_argument("--host")
    gateway.add_argument("--port", type=int)
    gateway.add_argument("--metrics-port", type=int, help="the /metrics listener; 0 = off")
    gateway.set_defaults(run=_run_gateway)

    up = commands.add_parser("up", help="the whole stack on this machine, with a demo tenant")
    up.add_argument("--config", type=Path)
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--metrics-port", type=int, help="the /metrics listener; 0 = off")
    up.add_argument(
        "--address", help="deploy onto this Ray cluster (default: $RAY_ADDRESS, else local Ray)"
    )
    up.add_argument("--ray-metrics-port", type=int, help="Ray's metrics endpoint (local Ray)")
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up (exit 1, saying which deployment is not ready) after this long",
    )
    up.set_defaults(run=_run_up)

    models = commands.add_parser("models", help="model checkpoints").add_subparsers(
        metavar="ACTION"
    )
    tiny = models.add_parser("build-tiny", help="build the tiny models, no downloads")
    tiny.add_argument("dir", type=Path, help="folder to build them in")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_build_tiny)

    fake = commands.add_parser("fake-engine", help="a deterministic fake OpenAI server")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8100)
    fake.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    fake.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    fake.set_defaults(run=_run_fake_engine)

    db = commands.add_parser("db", help="database schema").add_subparsers(metavar="ACTION")
    upgrade = db.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("--config", type=Path)
    upgrade.set_defaults(run=_run_db_upgrade)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--url", help="gateway URL (default $SLUIS_URL or http://127.0.0.1:8000)")
    token = admin.add_mutually_exclusive_group()
    token.add_argument(
        "--admin-token-file",
        type=Path,
        help="a file holding the admin token (default $SLUIS_ADMIN_TOKEN, else "
        "$SLUIS_STATE_DIR/admin_token)",
    )
    token.add_argument("--admin-token", help="deprecated: visible in `ps`; use --admin-token-file")
    admin.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(metavar="ACTION")
    create = tenants.add_parser("create", parents=[admin])
    create.add_argument("name")
    create.add_argument("--models", default="", help="comma-separated model ids, or *")
    create.add_argument("--meta", action="append", metavar="KEY=VALUE")
    create.set_defaults(run=_tenants_create)
    tenants.add_parser("list", parents=[admin]).set_defaults(run=_tenants_list)
    get = tenants.add_parser("get", parents=[admin])
    get.add_argument("tenant")
    get.set_defaults(run=_tenants_get)
    update = tenants.add_parser("update", parents=[admin])
    update.add_argument("tenant")
    update.add_argument("--models")
    update.add_argument("--meta", action="append", metavar="KEY=VALUE")
    update.add_argument("--status", choices=["active", "suspended"])
    update.add_argument(
        "--quota",
        action="append",
        metavar="[MODEL/]FIELD=VALUE",
        help="e.g. requests_per_minute=60, eur_per_month=250, tiny-chat/max_concurrent=4; "
        "VALUE unlimited (or none) = no limit whatever the default, default = back to the "
        "sluis.yaml default; fields not named are left as they are",
    )
    update.add_argument(
        "--if-match",
        type=int,
        metavar="VERSION",
        help="apply only if the tenant is still at this version (`tenants get --json`)",
    )
    update.set_defaults(run=_tenants_update)
    quota = tenants.add_parser("quota", parents=[admin], help="limits and their current use")
    quota.add_argument("tenant")
    quota.set_defaults(run=_tenants_quota)
    for action, status in (("suspend", "suspended"), ("activate", "active")):
        sub = tenants.add_parser(action, parents=[admin])
        sub.add_argument("tenant")
        sub.set_defaults(run=_tenants_status(status))

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(metavar="ACTION")
    key_create = keys.add_parser("create", parents=[admin])
    key_create.add_argument("tenant")
    key_create.add_argument("--name", default="default")
    key_create.add_argument("--expires-in-days", type=float)
    key_create.set_defaults(run=_keys_create)
    key_list = keys.add_parser("list", parents=[admin])
    key_list.add_argument("tenant")
    key_list.set_defaults(run=_keys_list)
    revoke = keys.add_parser("revoke", parents=[admin])
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_keys_revoke)
    rotate = keys.add_parser("rotate", parents=[admin])
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-hours", type=float, default=24.0)
    rotate.set_defaults(run=_keys_rotate)

    usage = commands.add_parser("usage", parents=[admin], help="metered usage per tenant, model")
    usage.add_argument("--tenant")
    usage.add_argument("--model")
    usage.add_argument("--from", dest="start", help="ISO date or datetime (inclusive)")
    usage.add_argument("--to", dest="end", help="ISO date or datetime (exclusive)")
    usage.set_defaults(run=_usage)

    invoice = commands.add_parser(
        "invoice", parents=[admin], help="usage and amounts per tenant and model, from Prometheus"
    )
    invoice.add_argument("--period", required=True, help="YYYY-MM")
    invoice.add_argument("--tenant")
    invoice.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    invoice.add_argument("--prometheus", help="default $SLUIS_PROMETHEUS_URL or :9090")
    invoice.add_argument(
        "--issuer", default="Sluis AI factory", help="who issues the invoice (HTML format)"
    )
    invoice.add_argument(
        "--reconcile",
        action="store_true",
        help="compare with the ledger and report scrape gaps (exit 4 if any)",
    )
    invoice.add_argument(
        "--gap-step-seconds",
        type=float,
        default=60.0,
        help="the shortest scrape gap reported (default 60)",
    )
    invoice.set_defaults(run=_invoice)

    add_capacity_command(commands)

    audit = commands.add_parser("audit", parents=[admin], help="the admin audit log")
    audit.add_argument("--tenant")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(run=_audit)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
