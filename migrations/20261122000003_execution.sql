-- Task execution (issue 4): one row per attempt, and dead letters that name their task.
-- Expand only: new table, new nullable column.

-- One row per execution attempt. `running` rows are in flight; the worker running one holds the
-- task's execution lock (a transaction-scoped advisory lock, see workers/src/exec/run.rs) for
-- as long as it runs, so a `running` row whose lock is free belongs to a dead worker.
CREATE TABLE task_runs (
    task_id      uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt      integer NOT NULL CHECK (attempt >= 1),
    worker_id    text NOT NULL,
    action       text NOT NULL,
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'succeeded', 'failed', 'timed_out', 'cancelled',
                                  'gate_failed', 'abandoned', 'interrupted')),
    worktree     text,
    exit_code    integer,
    signal       integer,
    duration_ms  bigint,
    stdout_tail  text,
    stderr_tail  text,
    stdout_bytes bigint,
    stderr_bytes bigint,
    error_code   text CHECK (error_code ~ '^MHV-[0-9]{3}$'),
    error        text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (task_id, attempt)
);
-- Two workers never run the same task at once: at most one attempt per task is in flight.
CREATE UNIQUE INDEX task_runs_one_running_idx ON task_runs (task_id) WHERE state = 'running';

ALTER TABLE dead_letters ADD COLUMN task_id uuid;
CREATE INDEX dead_letters_task_idx ON dead_letters (task_id) WHERE task_id IS NOT NULL;
