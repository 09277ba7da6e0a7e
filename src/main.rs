//! The `audit-worker` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use audit_worker::config::Config;
use audit_worker::{app, db, telemetry};

/// Stores audit events from Redis in PostgreSQL, exactly once, verifiably.
#[derive(Parser)]
#[command(name = "audit-worker", version, about)]
struct Cli {
    /// Configuration file overriding the built-in defaults
    /// (environment variables AUDIT_WORKER__SECTION__KEY override both).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
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
    /// Inspect, replay or purge the dead-letter stream.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
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

/// The `dlq` subcommands.
async fn run_dlq(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    use audit_worker::dlq::{self, DeadLetterFilter};
    let client = audit_worker::source::redis_client(&config.redis)?;
    let mut conn = audit_worker::source::command_connection(&client, &config.redis).await?;
    let key = &config.dlq.key;
    match command {
        DlqCommand::List { reason, limit } => {
            let filter = DeadLetterFilter { reason, id: None };
            let letters = dlq::list(&mut conn, key, &filter, limit).await?;
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
        DlqCommand::Replay { reason, id, all } => {
            if reason.is_none() && id.is_none() && !all {
                anyhow::bail!("say what to replay: --reason R, --id ID, or --all");
            }
            let filter = DeadLetterFilter { reason, id };
            let replayed = dlq::replay(&mut conn, key, &config.stream.key, &filter).await?;
            for (letter, new_id) in &replayed {
                println!(
                    "{} ({}) -> {} {}",
                    letter.id, letter.reason, config.stream.key, new_id
                );
            }
            println!(
                "{} dead letter(s) replayed onto {}",
                replayed.len(),
                config.stream.key
            );
        }
        DlqCommand::Purge { older_than } => {
            let removed = dlq::purge_older_than(&mut conn, key, older_than).await?;
            println!(
                "{removed} dead letter(s) older than {} removed from {key}",
                humantime::format_duration(older_than)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("audit-worker: {e}");
            return ExitCode::from(2);
        }
    };
    // Declared before the runtime so it is dropped after it: the last
    // spans are flushed once everything has stopped.
    let _telemetry = match telemetry::init_tracing(&config.log, &config.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("audit-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
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
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    app::shutdown_signal().await;
                    trigger.cancel();
                });
                app::run(config, shutdown).await
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
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("audit-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
