-- Webhook deliveries: the replay ledger (one row per source and delivery id, with the body's
-- hash and the body itself, verbatim, as bytea: any bytes, including NUL) and its audit log.
-- See docs/webhooks.md.

CREATE TABLE webhook_deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source        text NOT NULL CHECK (source ~ '^[A-Za-z0-9_-]{1,64}$'),
    delivery_id   text NOT NULL CHECK (length(delivery_id) BETWEEN 1 AND 300),
    scheme        text NOT NULL CHECK (scheme IN ('github', 'gitlab', 'standard')),
    event         text NOT NULL CHECK (length(event) <= 100),
    body_sha256   bytea NOT NULL CHECK (length(body_sha256) = 32),
    -- GitHub signs only the body: the same signed body under a new delivery id is a replay.
    dedup_by_body boolean NOT NULL,
    secret_id     text NOT NULL,
    content_type  text NOT NULL DEFAULT '',
    body          bytea NOT NULL,
    verdict       text NOT NULL CHECK (verdict IN ('task_created', 'no_match', 'invalid')),
    rule          text,
    reason        text,
    task_id       uuid REFERENCES tasks (id) ON DELETE SET NULL,
    received_at   timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, delivery_id)
);
CREATE UNIQUE INDEX webhook_deliveries_body_key ON webhook_deliveries (source, body_sha256) WHERE dedup_by_body;
CREATE INDEX webhook_deliveries_received_idx ON webhook_deliveries (received_at);

-- Append-only: every delivery attempt the fleet saw, including refused and repeated ones.
-- event_key is the attempt's identity, so a redelivered message is audited once.
CREATE TABLE webhook_audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_key   text NOT NULL UNIQUE,
    source      text NOT NULL,
    delivery_id text NOT NULL,
    event       text NOT NULL CHECK (event ~ '^[a-z_]{1,64}$'),
    actor       text NOT NULL,
    body_sha256 bytea,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_audit_log_delivery_idx ON webhook_audit_log (source, delivery_id, id);
