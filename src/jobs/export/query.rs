//! The keyset-paginated query over audit_log for one export.
//!
//! Pages follow the primary key order (event_time, id): each page starts
//! strictly after the last key of the previous one, so the database walks
//! the index once over the whole export (OFFSET would rescan every skipped
//! row, and shift under concurrent inserts). Only the filters a request
//! uses appear in the SQL, so the planner sees exactly what it must answer
//! (organisation or principal index within the time range); every value is
//! a bind parameter.

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::format::SELECT_LIST;
use super::request::Filters;

/// A position in the export: the (event_time, id) of the last row written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub event_time: DateTime<Utc>,
    pub id: i64,
}

/// The page query of one export: SQL text and the filter parameters.
pub struct PageQuery {
    pub sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    start: Key,
}

impl PageQuery {
    /// Builds the query for `filters`, limited to the rows committed before
    /// the job was recorded, so the row set is fixed: an export resumed
    /// after a crash contains exactly the rows an uninterrupted one would,
    /// and a batch committing while the export runs is either wholly in
    /// (committed before) or wholly out.
    ///
    /// "Committed before" is decided by the database snapshot the job
    /// recorded (`cutoff_snapshot`, a `pg_snapshot`) against the
    /// transaction that inserted each row (`ingest_xid`), not by time:
    /// `ingested_at` is when the inserting transaction *started*, so a
    /// time cutoff let a batch that started before it but committed after
    /// the export had read past its rows go missing, while the manifest
    /// claimed completeness. A snapshot needs no transaction held open for
    /// the whole export (which a resume after a crash could not rejoin), and
    /// it is stored with the job, so every attempt reads the same rows.
    /// Rows older than the `ingest_xid` column (NULL) were committed before
    /// any snapshot kept. Jobs recorded before snapshots were kept
    /// (`snapshot` None) keep the `ingested_at <= cutoff` rule they began
    /// with.
    ///
    /// `allowed` is the job's organisation scope (`None`: all): rows of
    /// any other organisation (or of none) are never selected, whatever
    /// the filters say.
    ///
    /// Parameters: `$1, $2` the key to start after, `$3` the page size,
    /// then the filters.
    pub fn new(
        filters: &Filters,
        cutoff: DateTime<Utc>,
        snapshot: Option<&str>,
        allowed: Option<&[String]>,
        include_restricted: bool,
    ) -> Self {
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut clauses = Vec::new();
        let mut push = |clause: &str, p: Box<dyn ToSql + Sync + Send>| {
            params.push(p);
            clauses.push(clause.replace('?', &format!("${}", params.len() + 3)));
        };
        push("event_time >= ?", Box::new(filters.from));
        push("event_time < ?", Box::new(filters.to));
        match snapshot {
            Some(snapshot) => push(
                "(ingest_xid IS NULL OR pg_visible_in_snapshot(ingest_xid, ?::text::pg_snapshot))",
                Box::new(snapshot.to_owned()),
            ),
            None => push("ingested_at <= ?", Box::new(cutoff)),
        }
        let list = |s: &std::collections::BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        if !filters.actions.is_empty() {
            push("action = ANY(?)", Box::new(list(&filters.actions)));
        }
        if !filters.principal_ids.is_empty() {
            push(
                "principal_id = ANY(?)",
                Box::new(list(&filters.principal_ids)),
            );
        }
        if let Some(org) = &filters.organization_id {
            push("organization_id = ?", Box::new(org.clone()));
        }
        if let Some(allowed) = allowed {
            push("organization_id = ANY(?)", Box::new(allowed.to_vec()));
        }
        if !filters.status.is_empty() {
            push("status = ANY(?)", Box::new(list(&filters.status)));
        }
        if let Some(t) = &filters.target_resource_type {
            push("target_resource_type = ?", Box::new(t.clone()));
        }
        if let Some(t) = &filters.target_resource_id {
            push("target_resource_id = ?", Box::new(t.clone()));
        }
        if !filters.data_classification.is_empty() {
            push(
                "data_classification = ANY(?)",
                Box::new(list(&filters.data_classification)),
            );
        }
        if let Some(subject) = &filters.subject {
            // One parameter for the id; each path is a literal key array
            // of the stored request, also bound.
            params.push(Box::new(subject.id.clone()));
            let id = format!("${}", params.len() + 3);
            let mut any = vec![
                format!("principal_id = {id}"),
                format!("target_resource_id = {id}"),
            ];
            for path in &subject.paths {
                if let Ok((column, keys)) = crate::config::subject_path_parts(path) {
                    params.push(Box::new(keys));
                    any.push(format!("{column} #>> ${}::text[] = {id}", params.len() + 3));
                }
            }
            clauses.push(format!("({})", any.join(" OR ")));
        }
        // A subject access export holds the subject's events whether or not
        // their processing is restricted (access is not processing).
        if !include_restricted && filters.subject.is_none() {
            clauses.push(crate::jobs::gdpr::restriction::NOT_RESTRICTED.to_owned());
        }
        let sql = format!(
            "SELECT {SELECT_LIST} FROM audit_log \
             WHERE (event_time, id) > ($1, $2) AND {} \
             ORDER BY event_time, id LIMIT $3",
            clauses.join(" AND ")
        );
        Self {
            sql,
            params,
            start: Self::start_key(filters),
        }
    }

    /// The key before the first row: rows at exactly `from` have ids above
    /// `i64::MIN`, so starting "after" this key includes them.
    pub fn start_key(filters: &Filters) -> Key {
        Key {
            event_time: filters.from,
            id: i64::MIN,
        }
    }

    /// Fetches up to `limit` rows after `after`.
    pub async fn page(
        &self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        after: Key,
        limit: i64,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let mut args: Vec<&(dyn ToSql + Sync)> = vec![&after.event_time, &after.id, &limit];
        args.extend(
            self.params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync)),
        );
        client.query(statement, &args).await
    }

    /// Counts the matching rows (for the CLI's progress bar).
    pub async fn count(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<i64, tokio_postgres::Error> {
        // The select list holds subqueries of its own: cut at the outer FROM.
        let from = self.sql.find(" FROM audit_log ").unwrap_or(0);
        let to = self.sql.find(" ORDER BY ").unwrap_or(self.sql.len());
        let sql = format!("SELECT count(*){}", &self.sql[from..to]);
        let start = self.start;
        let mut args: Vec<&(dyn ToSql + Sync)> = vec![&start.event_time, &start.id];
        // $3 (the limit) does not occur in the count; bind a typed dummy
        // by rewriting it away.
        let sql = sql.replacen("($1, $2)", "($1, $2) AND $3::bigint IS NOT NULL", 1);
        let limit = 0i64;
        args.push(&limit);
        args.extend(
            self.params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync)),
        );
        Ok(client.query_one(&sql, &args).await?.get(0))
    }
}
