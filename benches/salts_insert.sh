#!/usr/bin/env bash
# Cost of writing each event's salts in the same INSERT statement as the row
# (see benches/README.md, "Salts at ingest"). SQL only: 100 statements of
# 1,000 rows each (the sink's batch size) into a table shaped like audit_log
# (primary key, idempotency key, two indexes): without salts, with salts keyed
# by the text idempotency key (the first layout), and with salts keyed by the
# row id (the layout in use).
set -euo pipefail
DB=${AUDIT_WORKER_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/audit_worker_test}
psql -q "$DB" <<'SQL'
DROP SCHEMA IF EXISTS bench_salts CASCADE;
CREATE SCHEMA bench_salts; SET search_path = bench_salts;
CREATE TABLE audit_log (id bigserial, event_time timestamptz NOT NULL, idempotency_key text NOT NULL,
  principal_id text, organization_id text, payload text, PRIMARY KEY (event_time, id),
  UNIQUE (idempotency_key, event_time));
CREATE INDEX ON audit_log (organization_id, event_time);
CREATE INDEX ON audit_log (principal_id, event_time);
CREATE TABLE audit_salts (idempotency_key text NOT NULL, event_time timestamptz NOT NULL,
  salts jsonb NOT NULL, PRIMARY KEY (idempotency_key, event_time));
CREATE TABLE audit_log2 (LIKE audit_log INCLUDING ALL);
CREATE TABLE audit_log3 (LIKE audit_log INCLUDING ALL);
CREATE TABLE salts_by_id (audit_id bigint PRIMARY KEY, salts jsonb NOT NULL);
CREATE TABLE src AS SELECT g, 'evt-' || g AS k, now() - g * interval '1 ms' AS t,
  'user-' || (g % 100) AS p, 'org-' || (g % 5) AS o, repeat('x', 400) AS payload,
  jsonb_build_object('principalId', md5(g::text) || md5((g+1)::text),
    'targetResourceId', md5((g+2)::text) || md5((g+3)::text),
    'sessionContext.ipAddress', md5((g+4)::text) || md5((g+5)::text),
    'sessionContext.userAgent', md5((g+6)::text) || md5((g+7)::text)) AS salts
  FROM generate_series(1, 100000) g;
SQL
for run in 1 2 3 4 5; do
  psql -q "$DB" <<'SQL' | grep Time | tr '\n' ' '
SET search_path = bench_salts;
TRUNCATE audit_log, audit_log2, audit_log3, audit_salts, salts_by_id;
\timing on
DO $$ BEGIN FOR b IN 0..99 LOOP
  INSERT INTO audit_log2 (event_time, idempotency_key, principal_id, organization_id, payload)
  SELECT t, k, p, o, payload FROM src WHERE g > b*1000 AND g <= (b+1)*1000 ON CONFLICT DO NOTHING;
END LOOP; END $$;
DO $$ BEGIN FOR b IN 0..99 LOOP
  WITH input AS (SELECT * FROM src WHERE g > b*1000 AND g <= (b+1)*1000),
  ins AS (INSERT INTO audit_log (event_time, idempotency_key, principal_id, organization_id, payload)
          SELECT t, k, p, o, payload FROM input ORDER BY g ON CONFLICT DO NOTHING
          RETURNING idempotency_key, event_time),
  sl AS (INSERT INTO audit_salts SELECT DISTINCT ON (i.k, i.t) i.k, i.t, i.salts
           FROM ins r JOIN input i ON i.k = r.idempotency_key AND i.t = r.event_time
          ORDER BY i.k, i.t, i.g)
  SELECT count(*) INTO STRICT b FROM ins;
END LOOP; END $$;
DO $$ BEGIN FOR b IN 0..99 LOOP
  WITH input AS (SELECT *, nextval('audit_log_id_seq') AS id FROM src WHERE g > b*1000 AND g <= (b+1)*1000),
  ins AS (INSERT INTO audit_log3 (id, event_time, idempotency_key, principal_id, organization_id, payload)
          SELECT id, t, k, p, o, payload FROM input ORDER BY g ON CONFLICT DO NOTHING
          RETURNING id),
  sl AS (INSERT INTO salts_by_id SELECT i.id, i.salts FROM ins r JOIN input i USING (id))
  SELECT count(*) INTO STRICT b FROM ins;
END LOOP; END $$;
SQL
  echo "(run $run: without salts, salts by text key, salts by row id)"
done
psql -q "$DB" -c "DROP SCHEMA bench_salts CASCADE" 2>/dev/null
