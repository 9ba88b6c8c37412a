"""Plant integrations: the `sinks` role delivers stored alerts to MQTT, webhooks and PLCs.

Alerts are read from the alert store by id (never from the PUB socket) with one durable
cursor per sink, so delivery is at-least-once and ordered per sink across receiver outages
and daemon restarts. Modules: `config` (the `sinks:` section), `outbox` (alert reader,
cursors, dead letters), `runner` (retries, backoff, circuit breaker, state), `inspection`
(is the line being inspected right now), `mqtt`, `webhook`, `modbus`, `role` (the process),
`commands` (`iseg sinks status|resend|test`).
"""
