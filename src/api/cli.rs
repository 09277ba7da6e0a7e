//! `audit-worker api-key create | list | revoke`: managing API keys from
//! the command line (whoever runs it has the database credentials).

use clap::Subcommand;

use super::keys::{self, OrgScope};
use crate::config::Config;

/// The `api-key` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print its token once (only its hash is stored).
    Create {
        /// A name saying whose key it is (shown in job requesters and lists).
        #[arg(long)]
        name: String,
        /// An organisation the key covers (repeat for several).
        #[arg(long = "org", value_name = "ORG", required_unless_present = "all_orgs")]
        orgs: Vec<String>,
        /// The key covers every organisation.
        #[arg(long, conflicts_with = "orgs")]
        all_orgs: bool,
        /// A permission: export, report, proof, gdpr or admin (repeat for several).
        #[arg(long = "permission", value_name = "PERMISSION", required = true)]
        permissions: Vec<String>,
        /// Do not store the key: print the token and an entry for
        /// api.keys_file instead (bootstrap keys).
        #[arg(long)]
        file_entry: bool,
    },
    /// List the stored keys (never their tokens).
    List,
    /// Revoke a key by id; every replica refuses it from its next request.
    Revoke {
        /// The key id (`key_...`, from `api-key list`).
        id: String,
    },
}

async fn connect(config: &Config) -> anyhow::Result<deadpool_postgres::Pool> {
    if config.database.migrate_on_start {
        crate::db::migrate(config).await?;
    }
    Ok(crate::db::connect_pool(config).await?)
}

/// Runs an `api-key` subcommand; output goes to stdout.
pub async fn run(config: &Config, command: ApiKeyCommand) -> anyhow::Result<()> {
    match command {
        ApiKeyCommand::Create {
            name,
            orgs,
            all_orgs,
            permissions,
            file_entry,
        } => {
            keys::check_name(&name).map_err(anyhow::Error::msg)?;
            let scope = if all_orgs {
                OrgScope::All
            } else {
                OrgScope::from_list(&orgs).map_err(anyhow::Error::msg)?
            };
            let permissions = keys::parse_permissions(&permissions).map_err(anyhow::Error::msg)?;
            if file_entry {
                let token = keys::new_token();
                let entry = keys::FileEntry {
                    id: keys::new_key_id(),
                    name: name.trim().to_owned(),
                    token_sha256: hex::encode(keys::token_hash(&token)),
                    organizations: scope.to_list(),
                    permissions: permissions.iter().map(|p| p.to_string()).collect(),
                };
                println!("{token}");
                println!();
                println!("# Add to the api.keys_file (the token above is shown only now):");
                println!("[[keys]]");
                println!(
                    "{}",
                    serde_json_to_toml(&entry).map_err(anyhow::Error::msg)?
                );
                return Ok(());
            }
            let pool = connect(config).await?;
            let client = pool.get().await?;
            let (key, token) = keys::create(&**client, &name, scope, permissions).await?;
            eprintln!(
                "created API key {} ({}) for organisations {} with permissions {}; the token below is shown only now",
                key.id,
                key.name,
                key.organizations.to_list().join(","),
                key.permissions
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            println!("{token}");
        }
        ApiKeyCommand::List => {
            let pool = connect(config).await?;
            let client = pool.get().await?;
            let list = keys::list(&**client).await?;
            println!(
                "{:<22} {:<24} {:<24} {:<28} {:<20} REVOKED",
                "ID", "NAME", "ORGANISATIONS", "PERMISSIONS", "CREATED"
            );
            for k in &list {
                println!(
                    "{:<22} {:<24} {:<24} {:<28} {:<20} {}",
                    k.id,
                    k.name,
                    k.organizations.to_list().join(","),
                    k.permissions
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    k.created_at
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_default(),
                    k.revoked_at
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
            let file_keys = super::load_file_keys(config)?;
            if !file_keys.is_empty() {
                println!(
                    "plus {} bootstrap key(s) from api.keys_file: {}",
                    file_keys.len(),
                    file_keys
                        .iter()
                        .map(|k| k.key.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        ApiKeyCommand::Revoke { id } => {
            let pool = connect(config).await?;
            let client = pool.get().await?;
            if !keys::revoke(&**client, &id).await? {
                anyhow::bail!(
                    "no unrevoked stored key has id {id:?}: see `audit-worker api-key list` (bootstrap keys are revoked by removing them from api.keys_file)"
                );
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// The entry as TOML lines (strings quoted as JSON strings, which TOML
/// basic strings accept for these values).
fn serde_json_to_toml(e: &keys::FileEntry) -> Result<String, String> {
    let q = |s: &str| serde_json::to_string(s).map_err(|e| e.to_string());
    let list = |v: &[String]| -> Result<String, String> {
        Ok(format!(
            "[{}]",
            v.iter()
                .map(|s| q(s))
                .collect::<Result<Vec<_>, _>>()?
                .join(", ")
        ))
    };
    Ok(format!(
        "id = {}\nname = {}\ntoken_sha256 = {}\norganizations = {}\npermissions = {}",
        q(&e.id)?,
        q(&e.name)?,
        q(&e.token_sha256)?,
        list(&e.organizations)?,
        list(&e.permissions)?
    ))
}
