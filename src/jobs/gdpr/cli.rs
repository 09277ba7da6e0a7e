//! `audit-worker gdpr erase | restrict | unrestrict | restrictions` and
//! `audit-worker hold place | list | release`: subject rights and legal
//! holds from the command line (whoever runs it has the database
//! credentials, so it acts for every organisation unless `--org` is given).

use clap::Subcommand;

use super::erase::{EraseError, EraseRequest, Eraser};
use super::hold::{self, Hold, NewHold};
use super::restriction;
use crate::config::Config;
use crate::jobs::internal_event::EventRecorder;

/// The `gdpr` subcommands.
#[derive(Debug, Subcommand)]
pub enum GdprCommand {
    /// Erase a subject's personal values: replace them by pseudonyms in
    /// every stored event, destroy their salts, purge dead letters and
    /// alerts about the subject, withdraw artifacts that may hold them.
    /// Refused (exit 1) while a legal hold covers any of the events.
    Erase {
        /// The subject: a principal id or target resource id.
        subject: String,
        /// Only this organisation's events (default: every organisation).
        #[arg(long)]
        org: Option<String>,
        /// Request id to resume (the same id finds the same erasure).
        #[arg(long)]
        request_id: Option<String>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restrict processing of a subject's events (exports leave them out).
    Restrict {
        subject: String,
        #[arg(long)]
        org: Option<String>,
        /// Why (the request or decision it follows).
        #[arg(long)]
        reason: String,
    },
    /// Lift a subject's restriction.
    Unrestrict {
        subject: String,
        #[arg(long)]
        org: Option<String>,
    },
    /// List the restricted subjects.
    Restrictions,
}

/// The `hold` subcommands.
#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Place a legal hold; prints its id.
    Place {
        /// Organisation covered (default: every organisation).
        #[arg(long)]
        org: Option<String>,
        /// Subject covered, a principal or target resource id (default: all).
        #[arg(long)]
        subject: Option<String>,
        /// Start of the covered event times (ISO-8601; default: unbounded).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// End of the covered event times, exclusive (default: unbounded).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Why the data must be kept.
        #[arg(long)]
        reason: String,
        /// Who answers for the hold.
        #[arg(long)]
        owner: String,
    },
    /// List the active holds (with --all, released ones too).
    List {
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release a hold (it stays listed with --all as the record that it stood).
    Release {
        /// The hold id (`hold_...`).
        id: String,
    },
}

fn cli_user() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    if config.database.migrate_on_start {
        crate::db::migrate(config).await?;
    }
    let (client, _connection) = crate::db::connect(config).await?;
    Ok(client)
}

async fn connect_redis(config: &Config) -> anyhow::Result<crate::source::RedisConn> {
    let client = crate::source::redis_client(&config.redis)?;
    Ok(crate::source::command_connection(&client, &config.redis).await?)
}

/// Runs a `gdpr` subcommand; output goes to stdout.
pub async fn run_gdpr(config: &Config, command: GdprCommand) -> anyhow::Result<()> {
    let mut client = connect(config).await?;
    match command {
        GdprCommand::Erase {
            subject,
            org,
            request_id,
            json,
        } => {
            let redis = connect_redis(config).await?;
            let storage = crate::storage::open(&config.storage)?;
            let eraser = Eraser::from_config(config, redis, storage)?;
            let source = match request_id {
                Some(id) => client
                    .query_opt("SELECT source FROM gdpr_erasures WHERE id = $1", &[&id])
                    .await?
                    .map(|r| r.get::<_, String>(0))
                    .ok_or_else(|| anyhow::anyhow!("no erasure has id {id}"))?,
                None => format!("cli:{}", uuid::Uuid::new_v4()),
            };
            let req = EraseRequest {
                subject_id: subject,
                organization_id: org,
            };
            match eraser.erase(&mut client, &req, &cli_user(), &source).await {
                Ok(done) if json => println!("{}", serde_json::to_string_pretty(&done)?),
                Ok(done) => println!(
                    "erasure {}: {} events erased (subject now {}), {} values committed in clear \
                     left, {} dead letters and {} alerts purged, {} artifacts withdrawn",
                    done.id,
                    done.rows_erased,
                    done.subject_pseudonym,
                    done.values_not_erasable,
                    done.dead_letters_purged,
                    done.alerts_purged,
                    done.artifacts_withdrawn.len()
                ),
                Err(e @ EraseError::Held(_)) => anyhow::bail!("erasure refused: {e}"),
                Err(e) => return Err(e.into()),
            }
        }
        GdprCommand::Restrict {
            subject,
            org,
            reason,
        } => {
            let r = restriction::restrict(&client, org.as_deref(), &subject, &reason, &cli_user())
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "restricted {} in {} since {}",
                r.subject_id,
                r.organization_id.as_deref().unwrap_or("every organisation"),
                r.created_at.to_rfc3339()
            );
        }
        GdprCommand::Unrestrict { subject, org } => {
            if restriction::lift(&client, org.as_deref(), &subject)
                .await
                .map_err(anyhow::Error::msg)?
            {
                println!("restriction lifted");
            } else {
                anyhow::bail!("{subject} is not restricted in that scope: see `audit-worker gdpr restrictions`");
            }
        }
        GdprCommand::Restrictions => {
            for r in restriction::list(&client, None)
                .await
                .map_err(anyhow::Error::msg)?
            {
                println!(
                    "{}  {}  {}  by {}: {}",
                    r.created_at.to_rfc3339(),
                    r.organization_id.as_deref().unwrap_or("*"),
                    r.subject_id,
                    r.created_by,
                    r.reason
                );
            }
        }
    }
    Ok(())
}

fn print_hold(h: &Hold) {
    println!(
        "{}  org {}  subject {}  from {}  to {}  owner {}  {}{}: {}",
        h.id,
        h.organization_id.as_deref().unwrap_or("*"),
        h.subject_id.as_deref().unwrap_or("*"),
        h.from.map_or("-".into(), |t| t.to_rfc3339()),
        h.to.map_or("-".into(), |t| t.to_rfc3339()),
        h.owner,
        if h.active() { "ACTIVE" } else { "released" },
        h.released_at
            .map(|t| format!(" {}", t.to_rfc3339()))
            .unwrap_or_default(),
        h.reason
    );
}

/// Runs a `hold` subcommand; each change is recorded as an audit event.
pub async fn run_hold(config: &Config, command: HoldCommand) -> anyhow::Result<()> {
    let client = connect(config).await?;
    let by = cli_user();
    let changed = match command {
        HoldCommand::Place {
            org,
            subject,
            from,
            to,
            reason,
            owner,
        } => {
            let new = NewHold {
                organization_id: org,
                subject_id: subject,
                from,
                to,
                reason,
                owner,
            };
            let h = hold::place(&client, &new, &by).await?;
            println!("{}", h.id);
            h
        }
        HoldCommand::List { all, json } => {
            let holds = hold::list(&client, None, all).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&holds)?);
            } else {
                for h in &holds {
                    print_hold(h);
                }
            }
            return Ok(());
        }
        HoldCommand::Release { id } => {
            let pseudonyms = config
                .gdpr
                .pseudonym_key()
                .ok()
                .map(super::pseudonym::Pseudonymizer::new);
            let h = hold::release(&client, &id, &by, pseudonyms.as_ref())
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("no hold has id {id}: see `audit-worker hold list --all`")
                })?;
            print_hold(&h);
            h
        }
    };
    let recorder = EventRecorder::new(config, connect_redis(config).await?);
    recorder
        .record(&hold::hold_event(&changed, &by))
        .await
        .map_err(anyhow::Error::msg)
}
