-- Initial schema: users, tasks, audit log, inbox (idempotency ledger), dead letters, saga log.
-- Expand/contract rules: see migrations/README.md.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9_.-]{1,64}$'),
    email         text NOT NULL UNIQUE CHECK (length(email) BETWEEN 3 AND 320),
    display_name  text NOT NULL DEFAULT '' CHECK (length(display_name) <= 200),
    is_active     boolean NOT NULL DEFAULT true,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);

-- The system user owns tasks submitted by API keys and producers that map to no user account.
INSERT INTO users (id, username, email, display_name)
VALUES ('00000000-0000-0000-0000-000000000001', 'system', 'system@mahavishnu.invalid', 'Mahavishnu system');

CREATE TABLE tasks (
    id           uuid PRIMARY KEY,
    title        text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    description  text CHECK (length(description) <= 5000),
    repository   text NOT NULL CHECK (repository ~ '^[A-Za-z0-9_-]{1,100}$'),
    priority     text NOT NULL DEFAULT 'medium' CHECK (priority IN ('low', 'medium', 'high', 'critical')),
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'queued', 'running', 'completed', 'failed', 'cancelled', 'blocked')),
    deadline     timestamptz,
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb,
    tags         text[] NOT NULL DEFAULT '{}' CHECK (cardinality(tags) <= 10),
    created_by   uuid NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    assigned_to  uuid REFERENCES users (id) ON DELETE SET NULL,
    submitted_by text NOT NULL,
    message_key  text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX tasks_status_priority_idx ON tasks (status, priority);
CREATE INDEX tasks_repository_status_idx ON tasks (repository, status);
CREATE INDEX tasks_assigned_status_idx ON tasks (assigned_to, status) WHERE assigned_to IS NOT NULL;
CREATE INDEX tasks_created_by_idx ON tasks (created_by);

-- Append-only. Sensitive fields in `details` are redacted before they get here.
CREATE TABLE task_audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    event      text NOT NULL CHECK (event ~ '^[a-z_]{1,64}$'),
    actor      text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_audit_log_task_idx ON task_audit_log (task_id, id);

-- The idempotency ledger. One row per message key, written in the same transaction as the
-- effect; a message is acked only after that commit. Unlike JetStream's dedup window it does
-- not forget.
CREATE TABLE inbox (
    message_key  text PRIMARY KEY CHECK (length(message_key) BETWEEN 1 AND 600),
    fingerprint  bytea NOT NULL CHECK (length(fingerprint) = 32),
    task_id      uuid NOT NULL,
    stream_seq   bigint,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- What can never succeed. The raw payload is bytea: any bytes, including NUL, are kept verbatim.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_key text NOT NULL,
    subject     text NOT NULL,
    stream_seq  bigint,
    deliveries  bigint,
    error_code  text NOT NULL CHECK (error_code ~ '^MHV-[0-9]{3}$'),
    reason      text NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}'::jsonb,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz,
    UNIQUE (message_key, error_code)
);
CREATE INDEX dead_letters_created_idx ON dead_letters (created_at);

-- Steps of each execution attempt (written by the executor; see issue "task execution").
CREATE TABLE saga_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt    integer NOT NULL CHECK (attempt >= 1),
    step       text NOT NULL,
    state      text NOT NULL CHECK (state IN ('started', 'succeeded', 'failed', 'compensated')),
    worker_id  text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX saga_log_task_idx ON saga_log (task_id, attempt, id);
