"""Grafana dashboards (generated JSON), Prometheus scrape config, recording and alerting rules."""
