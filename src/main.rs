//! The `audit-worker` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use audit_worker::config::Config;
use audit_worker::jobs::export;
use audit_worker::jobs::snapshot_cli;
use audit_worker::live::reloader::Reloader;
use audit_worker::live::source::StartConfig;
use audit_worker::live::{Applied, LiveConfig};
use audit_worker::{app, db, telemetry};

/// Stores audit events from Redis in PostgreSQL, exactly once, verifiably.
#[derive(Parser)]
#[command(name = "audit-worker", version, about)]
struct Cli {
    /// Configuration document overriding the built-in defaults: a file, or
    /// an object-store URL (s3://bucket/key, file:///dir/key). Environment
    /// variables AUDIT_WORKER__SECTION__KEY override both. `run` re-reads
    /// it on SIGHUP (README "Live configuration").
    #[arg(long, global = true, value_name = "FILE|URL")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume, validate, store, serve health and metrics.
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Load and validate the configuration, print it (secrets redacted), exit.
    CheckConfig,
    /// Export matching audit events now, into a file in --out DIR.
    Export {
        #[command(flatten)]
        request: export::cli::RequestArgs,
        /// Directory the export and its manifest are written to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Run a compliance report now (HIPAA audit trail, GDPR processing
    /// record, integrity) and write its JSON, CSV and HTML files.
    Report {
        #[command(flatten)]
        request: audit_worker::jobs::report::cli::ReportArgs,
        /// Directory the files and manifest are written to (default: the
        /// configured object storage, under report.prefix).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Print a signed download link for a completed export.
    ExportLink {
        /// The export job id.
        id: String,
        /// How long the link stays valid (e.g. 15m, 1h, 2d; default
        /// export.link_ttl_secs).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Queue work for the workers and print its id.
    Enqueue {
        #[command(subcommand)]
        what: EnqueueCommand,
    },
    /// Inspect, replay or purge the dead-letter stream.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Write a new Ed25519 checkpoint signing key (mode 0600) and print the
    /// verifier key to publish.
    Keygen {
        /// Key name written in signatures (default: snapshot.origin).
        #[arg(long)]
        name: Option<String>,
        /// File to create (default: snapshot.signing_key_file).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Seal the unsealed events of a range into the signed log now and print
    /// the snapshot manifest.
    Snapshot {
        /// Start of the range (ISO-8601; default: the beginning).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// End of the range, exclusive (default: now minus snapshot.settling_delay_secs).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Check every checkpoint, consistency proof and sealed row; list each
    /// altered, deleted or inserted event; exit 1 if anything is wrong.
    Verify {
        /// Check only this snapshot (its checkpoint chain is still checked).
        #[arg(long, value_name = "ID")]
        snapshot: Option<i64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A checkpoint (signed note file) the log must extend, instead of
        /// the last one published to the object store.
        #[arg(long, value_name = "FILE")]
        trusted_checkpoint: Option<PathBuf>,
        /// Check only the leaves appended after the checkpoint of this
        /// size (incremental), plus the whole checkpoint chain.
        #[arg(long, value_name = "SIZE", conflicts_with = "snapshot")]
        since: Option<u64>,
    },
    /// Print the consistency proof between two checkpoints (by tree size;
    /// the newer defaults to the latest), computed from the stored tiles.
    ProveConsistency {
        /// Tree size of the older checkpoint.
        old_size: u64,
        /// Tree size of the newer checkpoint (default: the latest).
        new_size: Option<u64>,
    },
    /// GDPR subject rights: access, erasure and restriction of processing.
    Gdpr {
        #[command(subcommand)]
        command: GdprCommand,
    },
    /// Legal holds: place, list, release.
    Hold {
        #[command(subcommand)]
        command: audit_worker::jobs::gdpr::cli::HoldCommand,
    },
    /// Print an event's inclusion proof and signed checkpoint as JSON.
    Prove {
        /// The event's eventId (its idempotency key).
        event: String,
    },
    /// Manage the keys of the HTTP API (create prints the token once).
    ApiKey {
        #[command(subcommand)]
        command: audit_worker::api::cli::ApiKeyCommand,
    },
    /// Drop the monthly partitions whose every row is past its retention,
    /// sealed and under no legal hold (one pass, now); with --dry-run, list
    /// every partition's verdict and why it stays.
    Retention {
        /// Only list what would be dropped and why the rest stays.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a `prove` output offline with only the verifier key.
    VerifyProof {
        /// The JSON printed by `prove`.
        proof: PathBuf,
        /// The verifier key (`<name>+<id>+<key>`, printed by keygen).
        #[arg(long)]
        key: String,
        /// The log's origin, as published by its operator: a proof from
        /// any other log is refused.
        #[arg(long)]
        origin: String,
    },
}

/// The `gdpr` subcommands: subject access (an export, run here) and the
/// library's erasure and restriction commands.
#[derive(Subcommand)]
enum GdprCommand {
    /// Subject access: export every stored event about a principal or
    /// resource, with each event's inclusion proof, into --out DIR.
    Access {
        #[command(flatten)]
        request: audit_worker::jobs::gdpr::access::AccessArgs,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    #[command(flatten)]
    Rights(audit_worker::jobs::gdpr::cli::GdprCommand),
}

/// What `enqueue` can queue.
#[derive(Subcommand)]
enum EnqueueCommand {
    /// An export job (run by the workers; prints the job id).
    Export {
        #[command(flatten)]
        request: export::cli::RequestArgs,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters: id, time, reason, source and an excerpt.
    List {
        /// Only this reason code (e.g. hash_mismatch).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Put dead letters back on the event stream (removed from the DLQ only
    /// together with the re-add).
    Replay {
        #[arg(long)]
        reason: Option<String>,
        /// One dead letter by its DLQ entry id.
        #[arg(long)]
        id: Option<String>,
        /// Replay everything when neither --reason nor --id is given.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters older than a duration (e.g. 30d, 12h).
    Purge {
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
    },
}

/// The `dlq` subcommands, on every shard's dead letters in turn (a shard's
/// dead letters replay onto that shard's stream).
async fn run_dlq(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    use audit_worker::dlq::{self, DeadLetterFilter};
    let (_, mut conn) = audit_worker::source::RedisTarget::connect(&config.redis).await?;
    if let DlqCommand::Replay { reason, id, all } = &command {
        if reason.is_none() && id.is_none() && !all {
            anyhow::bail!("say what to replay: --reason R, --id ID, or --all");
        }
    }
    for shard in audit_worker::shards::shard_keys(config) {
        let key = &shard.dlq;
        match &command {
            DlqCommand::List { reason, limit } => {
                let filter = DeadLetterFilter {
                    reason: reason.clone(),
                    id: None,
                };
                let letters = dlq::list(&mut conn, key, &filter, *limit).await?;
                for l in &letters {
                    println!(
                        "{}  {}  {:<22} {}\n    {}\n    {}",
                        l.id,
                        l.failed_at,
                        l.reason,
                        l.source,
                        l.error
                            .chars()
                            .flat_map(char::escape_default)
                            .collect::<String>(),
                        l.excerpt(120)
                    );
                }
                println!("{} dead letter(s) shown from {key}", letters.len());
            }
            DlqCommand::Replay { reason, id, .. } => {
                let filter = DeadLetterFilter {
                    reason: reason.clone(),
                    id: id.clone(),
                };
                let replayed = dlq::replay(&mut conn, key, &shard.stream, &filter).await?;
                for (letter, new_id) in &replayed {
                    println!(
                        "{} ({}) -> {} {}",
                        letter.id, letter.reason, shard.stream, new_id
                    );
                }
                println!(
                    "{} dead letter(s) replayed onto {}",
                    replayed.len(),
                    shard.stream
                );
            }
            DlqCommand::Purge { older_than } => {
                let removed = dlq::purge_older_than(&mut conn, key, *older_than).await?;
                println!(
                    "{removed} dead letter(s) older than {} removed from {key}",
                    humantime::format_duration(*older_than)
                );
            }
        }
    }
    Ok(())
}

/// The allocator. With glibc's malloc, allocation took about 40% of the
/// worker's CPU on the BullMQ path: bullmq-official builds and drops a
/// parsed job, and clones the source of its Lua scripts, for every job,
/// on tokio threads that free what other threads allocated. jemalloc
/// cut the worker's CPU per job by about 40% and kept the export's peak RSS under
/// its 64 MiB budget (mimalloc did not); figures in benches/README.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts (the prefixed build that
/// tikv-jemallocator links reads this symbol, then the `_RJEM_MALLOC_CONF`
/// environment variable, which can override any of them):
/// - `narenas:1`: one arena instead of four per CPU. Each arena keeps
///   free pages of its own, and the worker's handful of threads, which
///   often free what another allocated, do not need eight of them.
/// - `dirty_decay_ms:1000`: freed pages go back to the system after about
///   a second instead of ten (`muzzy_decay_ms:0`, jemalloc's default, is
///   stated so the whole policy reads here).
///
/// Measured against jemalloc's defaults on the same build, runs
/// alternated: the same throughput on ingest, BullMQ, export, sealing and
/// verify, and a lower peak RSS on each (ingest 40 MiB instead of 47,
/// export 33 instead of 43, verify 56 instead of 83); benches/README.md.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_OPTIONS: Option<&'static std::ffi::c_char> =
    // SAFETY: a nul-terminated 'static string; jemalloc reads the symbol as
    // a `const char *` (an `Option<&T>` has a plain pointer's layout).
    Some(unsafe { &*c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

fn main() -> ExitCode {
    let cli = Cli::parse();
    let StartConfig {
        source,
        config,
        settings,
        version,
        fell_back,
    } = match StartConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("audit-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = config;
    // Declared before the runtime so it is dropped after it: the last
    // spans are flushed once everything has stopped.
    let _telemetry = match telemetry::init_tracing(&config.log, &config.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("audit-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(why) = &fell_back {
        tracing::warn!("{why}");
    }
    let log_filter = _telemetry.log_filter();
    if matches!(cli.command, Command::Run | Command::Snapshot { .. }) {
        if let Err(e) = audit_worker::jobs::dev_key::apply(&mut config, cli.config.is_some()) {
            eprintln!("audit-worker: {e:#}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("audit-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => {
                let applied = Applied::prepare(config, settings, version)
                    .map_err(|e| app::ConfigurationError(e.to_string()))?;
                let (tx, live) = LiveConfig::new(applied);
                let reloader = Reloader::new(source, tx, log_filter);
                app::run_live(live, Some(reloader), audit_worker::shutdown::on_signal()).await
            }
            Command::Migrate => {
                let applied = db::migrate(&config).await?;
                if applied.is_empty() {
                    println!("database is up to date");
                } else {
                    for m in applied {
                        println!("applied {m}");
                    }
                }
                Ok(())
            }
            Command::CheckConfig => {
                println!("{config:#?}");
                Ok(())
            }
            Command::Dlq { command } => run_dlq(&config, command).await,
            Command::Gdpr {
                command: GdprCommand::Rights(command),
            } => audit_worker::jobs::gdpr::cli::run_gdpr(&config, command).await,
            Command::Hold { command } => {
                audit_worker::jobs::gdpr::cli::run_hold(&config, command).await
            }
            Command::ApiKey { command } => audit_worker::api::cli::run(&config, command).await,
            Command::Export { request, out } => {
                export::cli::run_export(&config, &request, &out).await
            }
            Command::Report { request, out } => {
                audit_worker::jobs::report::cli::run_report(&config, &request, out.as_ref()).await
            }
            Command::ExportLink { id, ttl } => {
                export::cli::export_link(&config, &id, ttl.as_deref()).await
            }
            Command::Enqueue {
                what: EnqueueCommand::Export { request },
            } => export::cli::enqueue_export(&config, &request).await,
            Command::Keygen { name, out, force } => {
                let name = name.unwrap_or_else(|| config.snapshot.origin.clone());
                let out = out
                    .or_else(|| {
                        (!config.snapshot.signing_key_file.is_empty())
                            .then(|| PathBuf::from(&config.snapshot.signing_key_file))
                    })
                    .ok_or_else(|| {
                        anyhow::anyhow!("give --out FILE (or set snapshot.signing_key_file)")
                    })?;
                let verifier = snapshot_cli::keygen(&name, &out, force)?;
                eprintln!("signing key written to {} (keep it secret)", out.display());
                println!("{verifier}");
                Ok(())
            }
            Command::Snapshot { from, to } => {
                println!("{}", snapshot_cli::snapshot(&config, from, to).await?);
                Ok(())
            }
            Command::Verify {
                snapshot,
                json,
                trusted_checkpoint,
                since,
            } => {
                let scope = match (snapshot, since) {
                    (Some(id), _) => audit_worker::jobs::verify::Scope::Snapshot(id),
                    (None, Some(n)) => audit_worker::jobs::verify::Scope::Since(n),
                    (None, None) => audit_worker::jobs::verify::Scope::All,
                };
                if snapshot_cli::verify(&config, scope, json, trusted_checkpoint.as_deref()).await?
                {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "verification failed: see the problems listed above"
                    ))
                }
            }
            Command::ProveConsistency { old_size, new_size } => {
                println!(
                    "{}",
                    snapshot_cli::prove_consistency(&config, old_size, new_size).await?
                );
                Ok(())
            }
            Command::Gdpr {
                command: GdprCommand::Access { request, out },
            } => audit_worker::jobs::gdpr::access::run_cli(&config, &request, &out).await,
            Command::Retention { dry_run, json } => {
                audit_worker::jobs::retention::cli(&config, dry_run, json).await
            }
            Command::Prove { event } => {
                println!("{}", snapshot_cli::prove(&config, &event).await?);
                Ok(())
            }
            Command::VerifyProof { proof, key, origin } => {
                println!("{}", snapshot_cli::verify_proof(&proof, &key, &origin)?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("audit-worker: {e:#}");
            if e.downcast_ref::<app::ConfigurationError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
