-- Export formats `ocsf` (OCSF events, NDJSON) and `parquet` (`parquet-ocsf`
-- is parquet with the OCSF schema); README "Exports".
ALTER TABLE export_jobs DROP CONSTRAINT export_jobs_format_check;
ALTER TABLE export_jobs ADD CONSTRAINT export_jobs_format_check
    CHECK (format IN ('csv', 'ndjson', 'json', 'ocsf', 'parquet', 'parquet-ocsf'));
