//! API keys: tokens, their hashes, permissions and organisation scopes, and
//! where keys are kept (the api_keys table, and bootstrap entries from
//! `api.keys_file`).
//!
//! A token is `awk_` followed by 32 random bytes in unpadded base64url. Only
//! its SHA-256 is stored. A fast hash is enough here (unlike passwords,
//! which need a slow KDF against guessing): 256 random bits cannot be
//! guessed or brute-forced from the hash, and the hash lets the database
//! find a key by an index lookup. The lookup is by hash, and the found
//! hash is compared again in constant time (`subtle`), so no timing of a
//! string comparison leaks how much of a guess was right.

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_postgres::GenericClient;

/// Prefix of every token, so a leaked one is recognisable (secret scanners).
pub const TOKEN_PREFIX: &str = "awk_";

/// What a key may do. `admin` implies every other permission.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Create, read, cancel and download exports.
    Export,
    /// Create, read and download compliance reports.
    Report,
    /// Inclusion proofs and checkpoints of the verifiable log.
    Proof,
    /// Erasure requests (GDPR).
    Gdpr,
    /// Everything above.
    Admin,
}

impl Permission {
    /// Every permission, in a fixed order.
    pub const ALL: [Permission; 5] = [
        Self::Export,
        Self::Report,
        Self::Proof,
        Self::Gdpr,
        Self::Admin,
    ];

    /// The permission's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::Report => "report",
            Self::Proof => "proof",
            Self::Gdpr => "gdpr",
            Self::Admin => "admin",
        }
    }

    /// Parses a permission name, naming the valid ones on error.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown permission {s:?}: use export, report, proof, gdpr or admin")
            })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The organisations a key (or a job) covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrgScope {
    /// Every organisation, present and future.
    All,
    /// Only these (never empty).
    Only(BTreeSet<String>),
}

impl OrgScope {
    /// Builds a scope from a list where `*` alone means all; refuses an
    /// empty list or empty ids.
    pub fn from_list(list: &[String]) -> Result<Self, String> {
        if list.len() == 1 && list[0] == "*" {
            return Ok(Self::All);
        }
        if list.is_empty() {
            return Err(
                "an organisation scope needs at least one organisation (or \"*\" for all)".into(),
            );
        }
        let mut set = BTreeSet::new();
        for o in list {
            let o = o.trim();
            if o.is_empty() || o == "*" {
                return Err(format!(
                    "organisation id {o:?} is not valid here: give ids, or \"*\" alone for all"
                ));
            }
            set.insert(o.to_owned());
        }
        Ok(Self::Only(set))
    }

    /// Whether the scope covers `org` (rows without an organisation are
    /// covered only by `All`).
    pub fn covers(&self, org: Option<&str>) -> bool {
        match (self, org) {
            (Self::All, _) => true,
            (Self::Only(set), Some(o)) => set.contains(o),
            (Self::Only(_), None) => false,
        }
    }

    /// Whether every organisation of `inner` is covered by this scope.
    pub fn contains(&self, inner: &OrgScope) -> bool {
        match (self, inner) {
            (Self::All, _) => true,
            (Self::Only(_), Self::All) => false,
            (Self::Only(a), Self::Only(b)) => b.is_subset(a),
        }
    }

    /// The database form: NULL for all, else the sorted list.
    pub fn to_db(&self) -> Option<Vec<String>> {
        match self {
            Self::All => None,
            Self::Only(set) => Some(set.iter().cloned().collect()),
        }
    }

    /// From the database form.
    pub fn from_db(v: Option<Vec<String>>) -> Self {
        match v {
            None => Self::All,
            Some(v) => Self::Only(v.into_iter().collect()),
        }
    }

    /// The list shown to users: `["*"]` for all.
    pub fn to_list(&self) -> Vec<String> {
        self.to_db().unwrap_or_else(|| vec!["*".into()])
    }
}

/// A new token: `awk_` + 32 random bytes, base64url without padding.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// SHA-256 of a token (see the module doc for why a fast hash suffices).
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `token` has the shape of one of ours (cheap check before any
/// lookup: anything else is refused without touching the database).
pub fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_PREFIX.len() + 43
        && token.starts_with(TOKEN_PREFIX)
        && token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new key id (short, random, not secret).
pub fn new_key_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("key_{}", hex::encode(bytes))
}

/// A known key (never its token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub organizations: OrgScope,
    pub permissions: BTreeSet<Permission>,
    pub created_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether the key came from `api.keys_file` rather than the table.
    pub bootstrap: bool,
}

impl ApiKey {
    /// Whether the key grants `p` (`admin` grants everything).
    pub fn allows(&self, p: Permission) -> bool {
        self.permissions.contains(&p) || self.permissions.contains(&Permission::Admin)
    }

    /// The requester identity recorded with the jobs this key creates.
    pub fn requester_id(&self) -> String {
        format!("api-key:{}:{}", self.id, self.name)
    }
}

/// Parses permission names into a set (at least one).
pub fn parse_permissions(list: &[String]) -> Result<BTreeSet<Permission>, String> {
    let set = list
        .iter()
        .map(|p| Permission::parse(p))
        .collect::<Result<BTreeSet<_>, _>>()?;
    if set.is_empty() {
        return Err(
            "a key needs at least one permission (export, report, proof, gdpr, admin)".into(),
        );
    }
    Ok(set)
}

/// Checks a key name: 1-100 printable characters.
pub fn check_name(name: &str) -> Result<(), String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 100 || n.chars().any(char::is_control) {
        return Err("a key name must be 1-100 printable characters".into());
    }
    Ok(())
}

/// One entry of the bootstrap keys file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    pub organizations: Vec<String>,
    pub permissions: Vec<String>,
}

/// The bootstrap keys file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<FileEntry>,
}

/// A bootstrap key with its hash.
#[derive(Debug, Clone)]
pub struct FileKey {
    pub hash: [u8; 32],
    pub key: ApiKey,
}

/// Parses the bootstrap keys file's text; errors name the entry and the fix.
pub fn parse_keys_file(text: &str) -> Result<Vec<FileKey>, String> {
    use figment::providers::{Format, Toml};
    let file: KeysFile = figment::Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| format!("not a keys file ({e}): see config/default.toml [api] keys_file"))?;
    let mut out: Vec<FileKey> = Vec::new();
    for (i, e) in file.keys.into_iter().enumerate() {
        let at = format!("keys[{i}] ({:?})", e.id);
        let hash = hex::decode(e.token_sha256.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("{at}: token_sha256 must be 64 hex digits (the SHA-256 of the token, never the token)"))?;
        if e.id.trim().is_empty() {
            return Err(format!("{at}: id must not be empty"));
        }
        check_name(&e.name).map_err(|m| format!("{at}: {m}"))?;
        let organizations =
            OrgScope::from_list(&e.organizations).map_err(|m| format!("{at}: {m}"))?;
        let permissions = parse_permissions(&e.permissions).map_err(|m| format!("{at}: {m}"))?;
        if out.iter().any(|k| k.key.id == e.id || k.hash == hash) {
            return Err(format!("{at}: the id or token appears twice"));
        }
        out.push(FileKey {
            hash,
            key: ApiKey {
                id: e.id,
                name: e.name.trim().to_owned(),
                organizations,
                permissions,
                created_at: None,
                revoked_at: None,
                bootstrap: true,
            },
        });
    }
    Ok(out)
}

/// Finds the bootstrap key whose hash equals `hash`, comparing against
/// every entry in constant time.
pub fn find_file_key<'a>(keys: &'a [FileKey], hash: &[u8; 32]) -> Option<&'a ApiKey> {
    let mut found = None;
    for k in keys {
        if bool::from(k.hash.ct_eq(hash)) {
            found = Some(&k.key);
        }
    }
    found
}

const KEY_COLUMNS: &str =
    "id, name, token_sha256, organizations, permissions, created_at, revoked_at";

fn key_from_row(row: &tokio_postgres::Row) -> Result<(Vec<u8>, ApiKey), String> {
    let permissions: Vec<String> = row.get(4);
    Ok((
        row.get(2),
        ApiKey {
            id: row.get(0),
            name: row.get(1),
            organizations: OrgScope::from_db(row.get(3)),
            permissions: parse_permissions(&permissions)?,
            created_at: row.get(5),
            revoked_at: row.get(6),
            bootstrap: false,
        },
    ))
}

/// Looks a key up by its token's hash; `None` when unknown. A revoked key
/// is returned with `revoked_at` set (the caller refuses it).
pub async fn find_by_hash(
    client: &impl GenericClient,
    hash: &[u8; 32],
) -> Result<Option<ApiKey>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE token_sha256 = $1"),
            &[&&hash[..]],
        )
        .await?;
    Ok(row.and_then(|row| match key_from_row(&row) {
        Ok((stored, key)) if bool::from(stored.as_slice().ct_eq(&hash[..])) => Some(key),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(key = %row.get::<_, String>(0), error = %e, "API key row unreadable; refused");
            None
        }
    }))
}

/// Stores a new key; returns it and its token (shown once, never stored).
pub async fn create(
    client: &impl GenericClient,
    name: &str,
    organizations: OrgScope,
    permissions: BTreeSet<Permission>,
) -> Result<(ApiKey, String), tokio_postgres::Error> {
    let token = new_token();
    let id = new_key_id();
    let perms: Vec<String> = permissions.iter().map(|p| p.as_str().to_owned()).collect();
    let row = client
        .query_one(
            "INSERT INTO api_keys (id, name, token_sha256, organizations, permissions) \
             VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
            &[
                &id,
                &name.trim(),
                &&token_hash(&token)[..],
                &organizations.to_db(),
                &perms,
            ],
        )
        .await?;
    Ok((
        ApiKey {
            id,
            name: name.trim().to_owned(),
            organizations,
            permissions,
            created_at: row.get(0),
            revoked_at: None,
            bootstrap: false,
        },
        token,
    ))
}

/// Every stored key, oldest first (no tokens: only hashes are stored).
pub async fn list(client: &impl GenericClient) -> Result<Vec<ApiKey>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| key_from_row(r).ok().map(|(_, k)| k))
        .collect())
}

/// Revokes a key; `false` when no unrevoked key has that id.
pub async fn revoke(client: &impl GenericClient, id: &str) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            &[&id],
        )
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_well_formed_distinct_and_hash_to_32_bytes() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(well_formed(&a), "{a}");
        assert_eq!(a.len(), 47);
        assert!(!well_formed("awk_short"));
        assert!(!well_formed(&a.replace("awk_", "xyz_")));
        assert!(!well_formed(&format!("{}!", &a[..46])));
        assert_eq!(
            hex::encode(token_hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn scopes_cover_and_contain() {
        let all = OrgScope::from_list(&["*".into()]).unwrap();
        let ab = OrgScope::from_list(&["b".into(), "a".into(), "a".into()]).unwrap();
        let a = OrgScope::from_list(&["a".into()]).unwrap();
        assert!(all.covers(Some("x")) && all.covers(None));
        assert!(ab.covers(Some("a")) && !ab.covers(Some("c")) && !ab.covers(None));
        assert!(all.contains(&ab) && ab.contains(&a) && !a.contains(&ab) && !ab.contains(&all));
        assert_eq!(ab.to_db(), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(all.to_list(), vec!["*"]);
        assert!(OrgScope::from_list(&[]).is_err());
        assert!(OrgScope::from_list(&["*".into(), "a".into()]).is_err());
        assert!(OrgScope::from_list(&[" ".into()]).is_err());
    }

    #[test]
    fn permissions_parse_and_admin_implies_all() {
        assert!(parse_permissions(&["export".into(), "flying".into()])
            .unwrap_err()
            .contains("unknown permission \"flying\""));
        assert!(parse_permissions(&[]).is_err());
        let key = ApiKey {
            id: "k".into(),
            name: "n".into(),
            organizations: OrgScope::All,
            permissions: parse_permissions(&["admin".into()]).unwrap(),
            created_at: None,
            revoked_at: None,
            bootstrap: false,
        };
        assert!(Permission::ALL.iter().all(|p| key.allows(*p)));
        let export_only = ApiKey {
            permissions: parse_permissions(&["export".into()]).unwrap(),
            ..key
        };
        assert!(export_only.allows(Permission::Export) && !export_only.allows(Permission::Proof));
        assert_eq!(export_only.requester_id(), "api-key:k:n");
    }

    #[test]
    fn keys_files_parse_and_bad_entries_name_the_fix() {
        let token = new_token();
        let text = format!(
            "[[keys]]\nid = \"boot\"\nname = \"first admin\"\ntoken_sha256 = \"{}\"\norganizations = [\"*\"]\npermissions = [\"admin\"]\n",
            hex::encode(token_hash(&token))
        );
        let keys = parse_keys_file(&text).unwrap();
        assert_eq!(keys.len(), 1);
        let found = find_file_key(&keys, &token_hash(&token)).unwrap();
        assert_eq!(found.id, "boot");
        assert!(found.bootstrap);
        assert!(find_file_key(&keys, &token_hash(&new_token())).is_none());
        let bad = text.replace(&hex::encode(token_hash(&token)), &token);
        assert!(parse_keys_file(&bad)
            .unwrap_err()
            .contains("token_sha256 must be 64 hex"));
        let bad = text.replace("\"admin\"", "\"root\"");
        assert!(parse_keys_file(&bad)
            .unwrap_err()
            .contains("unknown permission"));
        assert!(parse_keys_file(&format!("{text}{text}"))
            .unwrap_err()
            .contains("twice"));
        assert!(parse_keys_file("").unwrap().is_empty());
    }
}
