"""Each customer's decision facts, kept on their own row by the database.

A decision needs a person's consent states (with the event that set each one), their active
suppressions and their contact rules. Read from three tables and the events, that is four
index probes per person and a join: most of a 10,000-item batch's time. So ``customers``
carries a copy, ``decision_facts``: one JSON array with one element per state, active
suppression and contact rule, and a decision reads it with the person, in one index probe.

The tables stay the record; the copy is derived. Triggers on ``consent_states``,
``suppressions`` and ``contact_rules`` rewrite a customer's copy in the same transaction as
every insert, update or delete, whichever code (or SQL) made it: the application never
writes the column, and no write path can forget it. :func:`rebuild_statement` recomputes
every copy from the tables (migrations, bulk loads with the triggers off, and the
``decision-facts verify`` check). ``docs/architecture.md`` describes the layout.

Each element is what :func:`portal.services.decisions.index_facts` reads, eleven values:
``[kind, topic, channel, event id, occurred at, source, wording version, state,
max per week, quiet start, quiet end]``, where kind is ``s`` (a consent state and its event),
``x`` (an active suppression, its reason in "source") or ``r`` (a contact rule), in that
order, suppressions oldest first (the reason a decision shows is the oldest's, as in the
audience export). Times are written in UTC (``YYYY-MM-DD HH:MM:SS.ffffff+00:00``) on both
databases. NULL when the person has none of the three.

On PostgreSQL the trigger locks the customer's row before it reads the tables, so two
transactions writing facts of the same person at once cannot each write a copy that misses
the other's row: the second waits for the first to commit, then reads afresh (READ COMMITTED
takes a new snapshot per statement of a PL/pgSQL function).
"""

from __future__ import annotations

from sqlalchemy import DDL, event

from portal.core.db import Base

SOURCES = ("consent_states", "suppressions", "contact_rules")

# The facts of the customer whose id is {cid}, as JSON text, NULL if none.
_POSTGRESQL_FACTS = """
SELECT json_agg(r ORDER BY k, n)::text FROM (
  SELECT 0 AS k, e.id AS n, json_build_array('s', s.topic_key, s.channel, e.id,
           to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US"+00:00"'),
           e.source, e.wording_version, s.state, NULL, NULL, NULL) AS r
    FROM consent_states s JOIN consent_events e ON e.id = s.event_id
   WHERE s.customer_id = {cid}
  UNION ALL
  SELECT 1, x.id, json_build_array('x', NULL, x.channel, NULL, NULL, x.reason, NULL, NULL,
           NULL, NULL, NULL)
    FROM suppressions x WHERE x.customer_id = {cid} AND x.lifted_at IS NULL
  UNION ALL
  SELECT 2, 0, json_build_array('r', NULL, c.channel, NULL, NULL, NULL, NULL, NULL,
           c.max_per_week, c.quiet_start, c.quiet_end)
    FROM contact_rules c WHERE c.customer_id = {cid}
) AS facts"""

_SQLITE_FACTS = """
SELECT CASE WHEN count(*) > 0 THEN json_group_array(json(r)) END FROM (
  SELECT 0 AS k, e.id AS n, json_array('s', s.topic_key, s.channel, e.id,
           e.occurred_at || '+00:00', e.source, e.wording_version, s.state, NULL, NULL,
           NULL) AS r
    FROM consent_states s JOIN consent_events e ON e.id = s.event_id
   WHERE s.customer_id = {cid}
  UNION ALL
  SELECT 1, x.id, json_array('x', NULL, x.channel, NULL, NULL, x.reason, NULL, NULL, NULL,
           NULL, NULL)
    FROM suppressions x WHERE x.customer_id = {cid} AND x.lifted_at IS NULL
  UNION ALL
  SELECT 2, 0, json_array('r', NULL, c.channel, NULL, NULL, NULL, NULL, NULL,
           c.max_per_week, c.quiet_start, c.quiet_end)
    FROM contact_rules c WHERE c.customer_id = {cid}
  ORDER BY k, n
)"""

_POSTGRESQL = [
    "CREATE OR REPLACE FUNCTION carnet_decision_facts(cid bigint) RETURNS text "
    "LANGUAGE sql STABLE AS $$" + _POSTGRESQL_FACTS.format(cid="cid") + "$$",
    """CREATE OR REPLACE FUNCTION carnet_refresh_decision_facts() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE ids bigint[];
    BEGIN
      IF TG_OP = 'INSERT' THEN ids := ARRAY[NEW.customer_id];
      ELSIF TG_OP = 'DELETE' THEN ids := ARRAY[OLD.customer_id];
      ELSE ids := ARRAY[OLD.customer_id, NEW.customer_id];
      END IF;
      -- Lock first, then read the tables in a statement of its own (a fresh snapshot):
      -- a concurrent writer of this person's facts has committed by then, and is seen.
      PERFORM 1 FROM customers WHERE id = ANY(ids) ORDER BY id FOR NO KEY UPDATE;
      UPDATE customers SET decision_facts = carnet_decision_facts(id) WHERE id = ANY(ids);
      RETURN NULL;
    END $$""",
]


def _postgresql_trigger(table: str) -> str:
    return (f"CREATE OR REPLACE TRIGGER {table}_decision_facts AFTER INSERT OR UPDATE OR "
            f"DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION carnet_refresh_decision_facts()")


def _sqlite_triggers(table: str) -> list[str]:
    facts = _SQLITE_FACTS.format(cid="customers.id")
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_facts_{when.lower()} AFTER {when} ON {table} "
        "BEGIN "
        f"UPDATE customers SET decision_facts = ({facts}) WHERE id IN ({', '.join(ids)}); END"
        for when, ids in (("INSERT", ["NEW.customer_id"]), ("DELETE", ["OLD.customer_id"]),
                          ("UPDATE", ["OLD.customer_id", "NEW.customer_id"]))]


def function_statements(dialect: str) -> list[str]:
    """What the triggers call (PostgreSQL only), created with the customers table."""
    return list(_POSTGRESQL) if dialect == "postgresql" else []


def trigger_statements(dialect: str, table: str) -> list[str]:
    """The triggers on one of :data:`SOURCES` that keep the copies true."""
    if dialect == "postgresql":
        return [_postgresql_trigger(table)]
    if dialect == "sqlite":
        return _sqlite_triggers(table)
    return []


def statements(dialect: str) -> list[str]:
    """Every statement that installs the copies' upkeep (migrations)."""
    return function_statements(dialect) + [
        sql for table in SOURCES for sql in trigger_statements(dialect, table)]


def trigger_names(dialect: str) -> list[tuple[str, str]]:
    """(table, trigger) of every trigger installed."""
    if dialect == "postgresql":
        return [(table, f"{table}_decision_facts") for table in SOURCES]
    return [(table, f"{table}_facts_{when}") for table in SOURCES
            for when in ("insert", "delete", "update")]


def facts_expression(dialect: str, cid: str) -> str:
    """SQL for the facts of the customer whose id is the SQL expression ``cid``, as the
    triggers compute them."""
    if dialect == "postgresql":
        return f"carnet_decision_facts({cid})"
    return "(" + _SQLITE_FACTS.format(cid=cid) + ")"


def rebuild_statement(dialect: str) -> str:
    """Recompute every customer's copy from the tables."""
    return ("UPDATE customers SET decision_facts = "
            + facts_expression(dialect, "customers.id"))


def drift_statement(dialect: str) -> str:
    """Ids of customers whose copy differs from what the tables say now."""
    fresh = facts_expression(dialect, "customers.id")
    if dialect == "postgresql":
        return (f"SELECT id FROM customers WHERE decision_facts IS DISTINCT FROM {fresh} "
                "ORDER BY id")
    return f"SELECT id FROM customers WHERE decision_facts IS NOT {fresh} ORDER BY id"


# Installed once every table exists (the function reads three of them); every statement can
# run again (create_all on a database that has the tables).
for _dialect in ("postgresql", "sqlite"):
    for _sql in statements(_dialect):
        event.listen(Base.metadata, "after_create", DDL(_sql).execute_if(dialect=_dialect))
