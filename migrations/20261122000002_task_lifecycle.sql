-- The task lifecycle, enforced for every writer: a status change not in this list is refused
-- (SQLSTATE 23514). The list is src/task/lifecycle.rs's ALLOWED; tests/lifecycle.rs checks that
-- the two agree on every pair.

CREATE FUNCTION tasks_status_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND (OLD.status, NEW.status) NOT IN (
        ('pending', 'queued'),
        ('queued', 'running'),
        ('running', 'completed'),
        ('running', 'failed'),
        ('running', 'queued'),
        ('failed', 'queued'),
        ('pending', 'blocked'),
        ('queued', 'blocked'),
        ('blocked', 'queued'),
        ('pending', 'cancelled'),
        ('queued', 'cancelled'),
        ('running', 'cancelled'),
        ('blocked', 'cancelled')
    ) THEN
        RAISE EXCEPTION 'task % cannot go from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_status_transition
    BEFORE UPDATE OF status ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_status_transition();
