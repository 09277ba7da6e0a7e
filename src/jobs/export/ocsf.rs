//! The `ocsf` export format: each audit row as an Open Cybersecurity Schema
//! Framework (OCSF 1.1.0) event, for security tooling (Amazon Security Lake,
//! Datadog Cloud SIEM, ...) that ingests OCSF.
//!
//! Pure code: a row in, a JSON event out. Which OCSF class an action becomes
//! is decided by a configurable, ordered table of action patterns
//! ([`ClassMap`], `export.ocsf.class_map`); the activity within the class is
//! read from the action's words ([`activity`]). Every column that has no
//! OCSF attribute goes into `unmapped` under its export column name, so
//! nothing of the row is lost.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use super::format::{Cell, ExportRow, COLUMNS};
use crate::config::OcsfConfig;

/// The OCSF schema version the events declare (`metadata.version`).
pub const OCSF_VERSION: &str = "1.1.0";

/// The OCSF classes an audit action can become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Account Change (3001), Identity & Access Management: a user or
    /// role was created, changed, granted or revoked something.
    AccountChange,
    /// Authentication (3002), Identity & Access Management: logon, logoff.
    Authentication,
    /// API Activity (6003), Application Activity: any other create, read,
    /// update or delete done through the audited application.
    ApiActivity,
}

impl Class {
    /// The class for an OCSF `class_uid`; the error lists the supported ones.
    pub fn from_uid(uid: u32) -> Result<Self, String> {
        match uid {
            3001 => Ok(Self::AccountChange),
            3002 => Ok(Self::Authentication),
            6003 => Ok(Self::ApiActivity),
            other => Err(format!(
                "OCSF class_uid {other} is not supported: use 3001 (Account Change), 3002 (Authentication) or 6003 (API Activity)"
            )),
        }
    }

    /// `class_uid`.
    pub fn uid(self) -> u32 {
        match self {
            Self::AccountChange => 3001,
            Self::Authentication => 3002,
            Self::ApiActivity => 6003,
        }
    }

    /// `class_name`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AccountChange => "Account Change",
            Self::Authentication => "Authentication",
            Self::ApiActivity => "API Activity",
        }
    }

    /// `category_uid` and `category_name`.
    pub fn category(self) -> (u32, &'static str) {
        match self {
            Self::AccountChange | Self::Authentication => (3, "Identity & Access Management"),
            Self::ApiActivity => (6, "Application Activity"),
        }
    }
}

/// `activity_id` 99: the action's words match none of the class's activities.
pub const ACTIVITY_OTHER: u32 = 99;

/// The activity (`activity_id`, `activity_name`) of `action` within
/// `class`, from the words of the action (split at `.`, `_`, `-`, `:`, `/`
/// and spaces, compared without case). The last word that names an activity
/// wins (`user.role.grant` is Attach Policy); none: 99 Other.
pub fn activity(class: Class, action: &str) -> (u32, &'static str) {
    let lower = action.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(['.', '_', '-', ':', '/', ' '])
        .filter(|w| !w.is_empty())
        .collect();
    let of = |word: &str| -> Option<(u32, &'static str)> {
        match class {
            Class::ApiActivity => match word {
                "create" | "created" | "add" | "insert" | "post" | "new" => Some((1, "Create")),
                "read" | "view" | "get" | "list" | "search" | "query" | "export" | "download"
                | "access" => Some((2, "Read")),
                "update" | "updated" | "edit" | "modify" | "patch" | "put" | "change" | "set" => {
                    Some((3, "Update"))
                }
                "delete" | "deleted" | "remove" | "purge" | "destroy" => Some((4, "Delete")),
                _ => None,
            },
            Class::Authentication => match word {
                "login" | "logon" | "signin" | "authenticate" => Some((1, "Logon")),
                "logout" | "logoff" | "signout" => Some((2, "Logoff")),
                _ => None,
            },
            Class::AccountChange => match word {
                "create" | "created" | "add" | "register" | "invite" => Some((1, "Create")),
                "enable" | "enabled" | "unlock" | "activate" => Some((2, "Enable")),
                "password" => Some((3, "Password Change")),
                "reset" => Some((4, "Password Reset")),
                "disable" | "disabled" | "deactivate" | "suspend" => Some((5, "Disable")),
                "delete" | "deleted" | "remove" => Some((6, "Delete")),
                "grant" | "granted" | "assign" | "attach" => Some((7, "Attach Policy")),
                "revoke" | "revoked" | "unassign" | "detach" => Some((8, "Detach Policy")),
                "lock" | "locked" => Some((9, "Lock")),
                _ => None,
            },
        }
    };
    let mut found = None;
    for (i, w) in words.iter().enumerate() {
        if let Some(a) = of(w) {
            // "password reset" is a reset, "password change" a change.
            if a.0 == 3 && words.get(i + 1).is_some_and(|n| *n == "reset") {
                continue;
            }
            found = Some(a);
        }
    }
    found.unwrap_or((ACTIVITY_OTHER, "Other"))
}

/// Whether `text` matches the glob `pattern`: `*` stands for any run of
/// characters (dots included, possibly none), everything else for itself;
/// ASCII case is ignored. `*` alone matches every action.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let t: Vec<char> = text.to_ascii_lowercase().chars().collect();
    // Iterative wildcard matching with backtracking to the last star.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The action → class table: ordered (pattern, class) rules, first match
/// wins, then the default class.
#[derive(Debug, Clone)]
pub struct ClassMap {
    rules: Vec<(String, Class)>,
    default: Class,
}

impl ClassMap {
    /// Builds the table from `[export.ocsf]`; the error names the bad rule.
    pub fn from_config(c: &OcsfConfig) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(c.class_map.len());
        for (i, r) in c.class_map.iter().enumerate() {
            if r.pattern.is_empty() {
                return Err(format!(
                    "export.ocsf.class_map[{i}].pattern is empty: use e.g. \"auth.*\" or \"*\""
                ));
            }
            let class = Class::from_uid(r.class_uid)
                .map_err(|e| format!("export.ocsf.class_map[{i}] ({:?}): {e}", r.pattern))?;
            rules.push((r.pattern.clone(), class));
        }
        let default = Class::from_uid(c.default_class_uid)
            .map_err(|e| format!("export.ocsf.default_class_uid: {e}"))?;
        Ok(Self { rules, default })
    }

    /// The class of `action`.
    pub fn class_of(&self, action: &str) -> Class {
        self.rules
            .iter()
            .find(|(p, _)| glob_match(p, action))
            .map(|(_, c)| *c)
            .unwrap_or(self.default)
    }
}

/// Everything the mapping needs besides the row: the class table and the
/// product the events name as their source.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub classes: ClassMap,
    pub product_name: String,
    pub vendor_name: String,
}

impl Mapping {
    /// From `[export.ocsf]`.
    pub fn from_config(c: &OcsfConfig) -> Result<Self, String> {
        Ok(Self {
            classes: ClassMap::from_config(c)?,
            product_name: c.product_name.clone(),
            vendor_name: c.vendor_name.clone(),
        })
    }
}

/// The column index of `name` in [`COLUMNS`] (for constants: a name
/// that is not a column fails the build).
const fn col(name: &str) -> usize {
    let mut i = 0;
    while i < COLUMNS.len() {
        if const_eq(COLUMNS[i], name) {
            return i;
        }
        i += 1;
    }
    panic!("no such export column")
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Column indexes, checked at compile time (a wrong name does not build).
const ACTION: usize = col("action");
const STATUS: usize = col("status");
const PRINCIPAL_ID: usize = col("principal_id");
const SESSION_CONTEXT: usize = col("session_context");
const EVENT_ID: usize = col("event_id");
const CORRELATION_ID: usize = col("correlation_id");
const TIMESTAMP: usize = col("timestamp");
const OUTCOME_DESCRIPTION: usize = col("outcome_description");
const TARGET_RESOURCE_TYPE: usize = col("target_resource_type");
const TARGET_RESOURCE_ID: usize = col("target_resource_id");
const EVENT_TIME: usize = col("event_time");
const INGESTED_AT: usize = col("ingested_at");

/// The columns that become OCSF attributes; all others go to `unmapped`.
const MAPPED: [usize; 7] = [
    EVENT_TIME,
    TIMESTAMP,
    EVENT_ID,
    STATUS,
    PRINCIPAL_ID,
    OUTCOME_DESCRIPTION,
    CORRELATION_ID,
];

/// The text of a text or JSON cell.
fn text<'a>(row: &ExportRow<'a>, i: usize) -> Option<&'a str> {
    match row.cells[i] {
        Cell::Text(v) | Cell::Json(v) => v,
        _ => None,
    }
}

fn millis(t: &DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The JSON value of one export cell, as the `json`/`ndjson` formats write it.
fn cell_value(cell: &Cell<'_>) -> Value {
    match cell {
        Cell::Int(v) => json!(v),
        Cell::Time(t) => json!(t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        Cell::Text(Some(s)) => json!(s),
        // jsonb text is valid JSON; keep it as a nested value.
        Cell::Json(Some(s)) => serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
        Cell::Text(None) | Cell::Json(None) => Value::Null,
    }
}

/// One row as an OCSF event (attribute names and values per OCSF 1.1.0).
///
/// - `time`: event_time in ms; `metadata.original_time`: the producer's
///   timestamp text; `metadata.logged_time`: ingested_at in ms.
/// - `metadata.uid`: event_id; `metadata.correlation_uid`: correlation_id.
/// - `actor.user.uid`: principal_id (no principal: a user of type Unknown).
/// - `src_endpoint.ip`: sessionContext.ipAddress (none: name "unknown").
/// - `status_id`: success 1, failure 2, attempt 99 (Other, with `status`
///   "attempt"); `message`: outcome_description; `severity_id` 1
///   (Informational): the audit log records, detection rules rate.
/// - API Activity adds `api.operation` (the action) and `resources`
///   (target type and id); Authentication adds `user` (the principal) and
///   `service.name` (the product); Account Change adds `user` (the target
///   resource id, else the principal).
/// - `unmapped`: every other export column under its name (`id`,
///   `organization_id`, `details`, `session_context`, `hash`, ...).
pub fn event(mapping: &Mapping, row: &ExportRow<'_>) -> Value {
    let action = text(row, ACTION).unwrap_or("");
    let class = mapping.classes.class_of(action);
    let (activity_id, activity_name) = activity(class, action);
    let (category_uid, category_name) = class.category();
    let type_uid = u64::from(class.uid()) * 100 + u64::from(activity_id);
    let time = match row.cells[EVENT_TIME] {
        Cell::Time(t) => millis(&t),
        _ => 0,
    };
    let logged_time = match row.cells[INGESTED_AT] {
        Cell::Time(t) => Some(millis(&t)),
        _ => None,
    };
    let status = text(row, STATUS).unwrap_or("");
    let (status_id, status_name) = match status {
        "success" => (1, "Success".to_owned()),
        "failure" => (2, "Failure".to_owned()),
        other => (99, other.to_owned()),
    };
    let principal = text(row, PRINCIPAL_ID);
    let actor_user = match principal {
        Some(p) => json!({"uid": p}),
        None => json!({"name": "unknown", "type_id": 0, "type": "Unknown"}),
    };
    let session: Option<Value> =
        text(row, SESSION_CONTEXT).and_then(|s| serde_json::from_str(s).ok());
    let ip = session
        .as_ref()
        .and_then(|s| s.get("ipAddress"))
        .and_then(Value::as_str);
    let src_endpoint = match ip {
        Some(ip) => json!({"ip": ip}),
        None => json!({"name": "unknown"}),
    };
    let mut metadata = Map::new();
    metadata.insert("version".into(), json!(OCSF_VERSION));
    metadata.insert(
        "product".into(),
        json!({"name": mapping.product_name, "vendor_name": mapping.vendor_name}),
    );
    if let Some(uid) = text(row, EVENT_ID) {
        metadata.insert("uid".into(), json!(uid));
    }
    if let Some(c) = text(row, CORRELATION_ID) {
        metadata.insert("correlation_uid".into(), json!(c));
    }
    if let Some(t) = text(row, TIMESTAMP) {
        metadata.insert("original_time".into(), json!(t));
    }
    if let Some(t) = logged_time {
        metadata.insert("logged_time".into(), json!(t));
    }
    let mut unmapped = Map::new();
    for (i, (name, cell)) in COLUMNS.iter().zip(row.cells.iter()).enumerate() {
        if !MAPPED.contains(&i) {
            unmapped.insert((*name).to_owned(), cell_value(cell));
        }
    }
    let mut e = Map::new();
    e.insert("activity_id".into(), json!(activity_id));
    e.insert("activity_name".into(), json!(activity_name));
    e.insert("category_uid".into(), json!(category_uid));
    e.insert("category_name".into(), json!(category_name));
    e.insert("class_uid".into(), json!(class.uid()));
    e.insert("class_name".into(), json!(class.name()));
    e.insert("type_uid".into(), json!(type_uid));
    e.insert(
        "type_name".into(),
        json!(format!("{}: {}", class.name(), activity_name)),
    );
    e.insert("severity_id".into(), json!(1));
    e.insert("severity".into(), json!("Informational"));
    e.insert("time".into(), json!(time));
    e.insert("status_id".into(), json!(status_id));
    e.insert("status".into(), json!(status_name));
    if let Some(m) = text(row, OUTCOME_DESCRIPTION) {
        e.insert("message".into(), json!(m));
    }
    e.insert("metadata".into(), Value::Object(metadata));
    e.insert("actor".into(), json!({"user": actor_user}));
    e.insert("src_endpoint".into(), src_endpoint);
    match class {
        Class::ApiActivity => {
            e.insert("api".into(), json!({"operation": action}));
            let (rt, rid) = (
                text(row, TARGET_RESOURCE_TYPE),
                text(row, TARGET_RESOURCE_ID),
            );
            if rt.is_some() || rid.is_some() {
                let mut r = Map::new();
                if let Some(t) = rt {
                    r.insert("type".into(), json!(t));
                }
                if let Some(id) = rid {
                    r.insert("uid".into(), json!(id));
                }
                e.insert("resources".into(), json!([Value::Object(r)]));
            }
        }
        Class::Authentication => {
            e.insert("user".into(), actor_user_value(principal));
            e.insert("service".into(), json!({"name": mapping.product_name}));
        }
        Class::AccountChange => {
            let target = match text(row, TARGET_RESOURCE_ID) {
                Some(t) => json!({"uid": t}),
                None => actor_user_value(principal),
            };
            e.insert("user".into(), target);
        }
    }
    e.insert("unmapped".into(), Value::Object(unmapped));
    Value::Object(e)
}

fn actor_user_value(principal: Option<&str>) -> Value {
    match principal {
        Some(p) => json!({"uid": p}),
        None => json!({"name": "unknown", "type_id": 0, "type": "Unknown"}),
    }
}

/// Appends `rows` as NDJSON OCSF events (one object per line) to `out`.
pub fn write_rows(
    mapping: &Mapping,
    rows: &[ExportRow<'_>],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    for row in rows {
        serde_json::to_writer(&mut *out, &event(mapping, row))?;
        out.push(b'\n');
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OcsfClassRule, OcsfConfig};

    /// The default table, read from the built-in configuration.
    fn default_map() -> Mapping {
        let config = crate::config::Config::load_from(
            None,
            figment::providers::Env::prefixed("AUDIT_WORKER_UNIT_UNSET__"),
        )
        .unwrap();
        Mapping::from_config(&config.export.ocsf).unwrap()
    }

    #[test]
    fn globs_match_whole_actions_with_stars_spanning_dots() {
        assert!(glob_match("auth.login*", "auth.login"));
        assert!(glob_match("auth.login*", "auth.login.mfa"));
        assert!(!glob_match("auth.login*", "xauth.login"));
        assert!(glob_match("*.login", "portal.sso.login"));
        assert!(!glob_match("*.login", "login"));
        assert!(glob_match("*role*", "user.role.grant"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("ACCOUNT.*", "account.create"));
        assert!(glob_match("login", "LOGIN"));
        assert!(!glob_match("login", "logins"));
    }

    #[test]
    fn the_default_table_maps_logins_accounts_and_everything_else() {
        let m = default_map();
        let cases = [
            ("auth.login", 3002),
            ("auth.login.failed", 3002),
            ("auth.logout", 3002),
            ("portal.login", 3002),
            ("login", 3002),
            ("sso.logoff", 3002),
            ("user.create", 3001),
            ("account.disable", 3001),
            ("admin.permission.grant", 3001),
            ("org.role.revoke", 3001),
            ("user.password.reset", 3001),
            ("record.read.1", 6003),
            ("patient.update", 6003),
            ("invoice.delete", 6003),
            ("audit.export.completed", 6003),
        ];
        for (action, uid) in cases {
            assert_eq!(m.classes.class_of(action).uid(), uid, "{action}");
        }
    }

    #[test]
    fn activities_come_from_the_action_words() {
        use Class::*;
        assert_eq!(activity(ApiActivity, "patient.create"), (1, "Create"));
        assert_eq!(activity(ApiActivity, "record.read.1"), (2, "Read"));
        assert_eq!(activity(ApiActivity, "record_update"), (3, "Update"));
        assert_eq!(activity(ApiActivity, "record.delete"), (4, "Delete"));
        assert_eq!(activity(ApiActivity, "record.frobnicate"), (99, "Other"));
        assert_eq!(activity(Authentication, "auth.login"), (1, "Logon"));
        assert_eq!(activity(Authentication, "auth.logout"), (2, "Logoff"));
        assert_eq!(
            activity(Authentication, "auth.token.refresh"),
            (99, "Other")
        );
        assert_eq!(activity(AccountChange, "user.create"), (1, "Create"));
        assert_eq!(
            activity(AccountChange, "user.password.change"),
            (3, "Password Change")
        );
        assert_eq!(
            activity(AccountChange, "user.password.reset"),
            (4, "Password Reset")
        );
        assert_eq!(
            activity(AccountChange, "user.role.grant"),
            (7, "Attach Policy")
        );
        assert_eq!(
            activity(AccountChange, "PERMISSION-REVOKE"),
            (8, "Detach Policy")
        );
        assert_eq!(activity(AccountChange, "account.lock"), (9, "Lock"));
    }

    #[test]
    fn a_custom_table_is_ordered_and_bad_rules_are_named() {
        let mut c = OcsfConfig {
            product_name: "p".into(),
            vendor_name: "v".into(),
            default_class_uid: 3001,
            class_map: vec![
                OcsfClassRule {
                    pattern: "billing.*".into(),
                    class_uid: 6003,
                },
                OcsfClassRule {
                    pattern: "*".into(),
                    class_uid: 3002,
                },
            ],
        };
        let m = ClassMap::from_config(&c).unwrap();
        assert_eq!(m.class_of("billing.login"), Class::ApiActivity);
        assert_eq!(m.class_of("x"), Class::Authentication);
        c.class_map.pop();
        assert_eq!(
            ClassMap::from_config(&c).unwrap().class_of("x"),
            Class::AccountChange
        );
        c.class_map[0].class_uid = 4001;
        let e = ClassMap::from_config(&c).unwrap_err();
        assert!(
            e.contains("class_map[0]") && e.contains("4001") && e.contains("6003"),
            "{e}"
        );
        c.class_map[0].class_uid = 6003;
        c.class_map[0].pattern.clear();
        assert!(ClassMap::from_config(&c)
            .unwrap_err()
            .contains("pattern is empty"));
        c.class_map.clear();
        c.default_class_uid = 7;
        assert!(ClassMap::from_config(&c)
            .unwrap_err()
            .contains("default_class_uid"));
    }

    fn row<'a>(
        action: &'a str,
        principal: Option<&'a str>,
        session: Option<&'a str>,
    ) -> ExportRow<'a> {
        let t = DateTime::from_timestamp(1_709_251_200, 123_456_000).unwrap();
        let mut cells = [Cell::Text(None); COLUMNS.len()];
        cells[col("id")] = Cell::Int(42);
        cells[col("event_time")] = Cell::Time(t);
        cells[col("timestamp")] = Cell::Text(Some("2024-03-01T00:00:00.123Z"));
        cells[col("event_id")] = Cell::Text(Some("e-1"));
        cells[col("action")] = Cell::Text(Some(action));
        cells[col("status")] = Cell::Text(Some("attempt"));
        cells[col("principal_id")] = Cell::Text(principal);
        cells[col("organization_id")] = Cell::Text(Some("org-1"));
        cells[col("target_resource_type")] = Cell::Text(Some("Patient"));
        cells[col("target_resource_id")] = Cell::Text(Some("p-9"));
        cells[col("outcome_description")] = Cell::Text(Some("ok"));
        cells[col("session_context")] = Cell::Json(session);
        cells[col("details")] = Cell::Json(Some(r#"{"n": 1}"#));
        cells[col("ingested_at")] = Cell::Time(t + chrono::Duration::seconds(2));
        ExportRow { cells }
    }

    #[test]
    fn an_event_has_the_required_attributes_and_keeps_the_rest_unmapped() {
        let m = default_map();
        let e = event(
            &m,
            &row(
                "patient.read",
                Some("user-7"),
                Some(r#"{"ipAddress": "10.1.2.3", "sessionId": "s"}"#),
            ),
        );
        assert_eq!(e["class_uid"], 6003);
        assert_eq!(e["category_uid"], 6);
        assert_eq!(e["activity_id"], 2);
        assert_eq!(e["type_uid"], 600302);
        assert_eq!(e["severity_id"], 1);
        assert_eq!(e["time"], 1_709_251_200_123i64);
        assert_eq!(e["metadata"]["version"], OCSF_VERSION);
        assert_eq!(e["metadata"]["uid"], "e-1");
        assert_eq!(e["metadata"]["product"]["name"], "audit-worker");
        assert_eq!(e["metadata"]["logged_time"], 1_709_251_202_123i64);
        assert_eq!(e["actor"]["user"]["uid"], "user-7");
        assert_eq!(e["src_endpoint"]["ip"], "10.1.2.3");
        assert_eq!(e["api"]["operation"], "patient.read");
        assert_eq!(e["resources"][0], json!({"type": "Patient", "uid": "p-9"}));
        assert_eq!(e["status_id"], 99);
        assert_eq!(e["status"], "attempt");
        assert_eq!(e["message"], "ok");
        assert_eq!(e["unmapped"]["id"], 42);
        assert_eq!(e["unmapped"]["organization_id"], "org-1");
        assert_eq!(e["unmapped"]["details"], json!({"n": 1}));
        assert_eq!(e["unmapped"]["session_context"]["sessionId"], "s");
        assert!(e["unmapped"].get("event_id").is_none());
        assert_eq!(
            e["unmapped"].as_object().unwrap().len(),
            COLUMNS.len() - MAPPED.len()
        );

        let login = event(&m, &row("auth.login", None, None));
        assert_eq!(login["class_uid"], 3002);
        assert_eq!(login["category_uid"], 3);
        assert_eq!(login["type_uid"], 300201);
        assert_eq!(login["user"]["type_id"], 0);
        assert_eq!(login["actor"]["user"]["type"], "Unknown");
        assert_eq!(login["src_endpoint"]["name"], "unknown");
        assert_eq!(login["service"]["name"], "audit-worker");
        assert!(login.get("api").is_none());

        let grant = event(&m, &row("user.role.grant", Some("admin"), None));
        assert_eq!(grant["class_uid"], 3001);
        assert_eq!(grant["type_uid"], 300107);
        assert_eq!(grant["user"]["uid"], "p-9");
        assert_eq!(grant["actor"]["user"]["uid"], "admin");
    }
}
