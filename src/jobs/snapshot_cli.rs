//! The snapshot subcommands (`keygen`, `snapshot`, `verify`, `prove`,
//! `verify-proof`), kept here so `main.rs` only parses arguments.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::db;
use crate::integrity::checkpoint::{Ed25519NoteSigner, NoteVerifier};
use crate::jobs::snapshot::{self, Snapshotter};
use crate::jobs::verify::{self, InclusionProof};

/// `keygen`: writes a new signing key (mode 0600, never overwriting unless
/// `force`) and prints the verifier key to publish.
pub fn keygen(name: &str, out: &Path, force: bool) -> anyhow::Result<String> {
    let signer = Ed25519NoteSigner::generate(name)
        .map_err(|e| anyhow::anyhow!("cannot make a key named {name:?}: {e}"))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(out).with_context(|| {
        format!(
            "cannot create {} (it must not exist yet; pass --force to replace it)",
            out.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    writeln!(file, "{}", signer.to_private_key_string())?;
    file.sync_all()?;
    Ok(signer.verifier().to_string())
}

/// One database connection for `verify` and `prove`, with the configured
/// TLS settings (see [`db::connect`]).
async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, _connection) = db::connect(config).await?;
    Ok(client)
}

/// `snapshot`: seals `[from, to)` now (defaults: from the beginning, to now
/// minus the settling delay) and prints the manifest.
pub async fn snapshot(
    config: &Config,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<String> {
    let Some(signer) = snapshot::load_signer(&config.snapshot)? else {
        bail!("no signing key: set AUDIT_WORKER__SNAPSHOT__SIGNING_KEY or snapshot.signing_key_file (`audit-worker keygen` makes one)");
    };
    if config.database.migrate_on_start {
        db::migrate(config).await?;
    }
    let now = Utc::now();
    let to = to.unwrap_or_else(|| {
        now - chrono::Duration::seconds(config.snapshot.settling_delay_secs as i64)
    });
    if to > now {
        bail!("--to lies in the future: only the past can be sealed");
    }
    if from.is_some_and(|f| f >= to) {
        bail!("--from must be earlier than --to");
    }
    let pool = db::connect_pool(config).await?;
    let storage = crate::storage::open(&config.storage)?;
    // Redis is only needed for the audit.snapshot.created event; without it
    // the snapshot stays `sealed` and a running worker publishes it.
    let redis = crate::source::RedisTarget::connect(&config.redis)
        .await
        .ok()
        .map(|(_, conn)| conn);
    let snapshotter = Snapshotter::new(config, pool, signer, storage, redis);
    let source = format!(
        "cli:{}:{}",
        config.consumer_name(),
        now.timestamp_nanos_opt().unwrap_or_default()
    );
    let summary = snapshotter.snapshot_now(&source, from, to).await?;
    Ok(serde_json::to_string_pretty(&summary)?)
}

/// `verify`: prints each finding and a summary; Ok(false) when anything
/// was found.
/// The log must also extend a trusted checkpoint: the one in `trusted`
/// (a file), else the last one this deployment published to the object
/// store.
pub async fn verify(
    config: &Config,
    scope: verify::Scope,
    json: bool,
    trusted: Option<&Path>,
) -> anyhow::Result<bool> {
    let verifier = snapshot::load_verifier(&config.snapshot)?;
    let mut client = connect(config).await?;
    // A second connection reads half the leaves, a third looks for unsealed
    // rows meanwhile (see `verify_scope`).
    let mut helpers = [connect(config).await?, connect(config).await?];
    let mut report = verify::verify_scope(
        &mut client,
        &verifier,
        &config.snapshot.origin,
        scope,
        config.snapshot.page_size,
        &mut helpers,
    )
    .await?;
    let note = match trusted {
        Some(file) => {
            Some(std::fs::read_to_string(file).with_context(|| {
                format!("cannot read the trusted checkpoint {}", file.display())
            })?)
        }
        None => {
            let storage = crate::storage::open(&config.storage)?;
            let folder = crate::jobs::published::folder(
                &config.snapshot.manifest_prefix,
                &config.snapshot.origin,
            );
            crate::jobs::published::latest(&storage, &folder)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot read the published checkpoints ({e}): check storage.url, or give --trusted-checkpoint FILE")
                })?
        }
    };
    match note {
        Some(note) => report.findings.extend(
            crate::jobs::published::check_extends(
                &mut client,
                &verifier,
                &config.snapshot.origin,
                &note,
                config.snapshot.page_size,
            )
            .await?,
        ),
        None if !json => {
            println!("note: no checkpoint was published yet, so none is required to be extended")
        }
        None => {}
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for late in &report.late {
            println!("{late}");
        }
        for pruned in &report.pruned {
            println!("{pruned}");
        }
        for erased in &report.erased {
            println!("{erased}");
        }
        for f in &report.findings {
            println!("{f}");
        }
        println!(
            "{}: {} snapshots, {} leaves checked ({} late, {} pruned by retention, {} erased), {} problems",
            if report.ok() { "OK" } else { "FAILED" },
            report.snapshots_checked,
            report.leaves_checked,
            report.late.len(),
            report.pruned.iter().map(|p| p.leaves_checked).sum::<u64>(),
            report.erased.len(),
            report.findings.len()
        );
    }
    Ok(report.ok())
}

/// `prove`: the inclusion proof of an event as JSON (checked before
/// printing, with the configured verifier key when there is one).
pub async fn prove(config: &Config, event: &str) -> anyhow::Result<String> {
    let mut client = connect(config).await?;
    let proof = verify::prove(&mut client, event, config.snapshot.page_size).await?;
    if let Ok(v) = snapshot::load_verifier(&config.snapshot) {
        verify::verify_proof(&proof, &v, &config.snapshot.origin).map_err(|e| {
            anyhow::anyhow!("the proof just built does not verify ({e}): run `audit-worker verify`")
        })?;
    }
    Ok(serde_json::to_string_pretty(&proof)?)
}

/// `prove-consistency`: the consistency proof between two checkpoints,
/// from tiles, checked against the verifier key before it is printed.
pub async fn prove_consistency(
    config: &Config,
    old_size: u64,
    new_size: Option<u64>,
) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let proof = crate::jobs::tile_store::consistency(&client, old_size, new_size).await?;
    if let Ok(v) = snapshot::load_verifier(&config.snapshot) {
        let open = |note: &str| crate::integrity::checkpoint::open_note(note, &v);
        let (old, new) = (
            open(&proof.old_checkpoint).map_err(|e| anyhow::anyhow!("{e}"))?,
            open(&proof.new_checkpoint).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let nodes: Vec<[u8; 32]> = proof
            .proof
            .iter()
            .map(|h| crate::integrity::record::hex32(h))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("a proof node is not 32 bytes"))?;
        crate::integrity::merkle::verify_consistency(
            old.size(),
            new.size(),
            old.root(),
            new.root(),
            &nodes,
        )
        .map_err(|e| {
            anyhow::anyhow!("the proof just built does not verify ({e}): run `audit-worker verify`")
        })?;
    }
    Ok(serde_json::to_string_pretty(&proof)?)
}

/// `verify-proof`: checks a `prove` output offline with a verifier key.
pub fn verify_proof(proof_file: &Path, key: &str, origin: &str) -> anyhow::Result<String> {
    let verifier = NoteVerifier::parse(key.trim())
        .map_err(|e| anyhow::anyhow!("--key is not a verifier key ({e})"))?;
    let text = std::fs::read_to_string(proof_file)
        .with_context(|| format!("cannot read {}", proof_file.display()))?;
    let proof: InclusionProof = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a proof printed by `audit-worker prove`",
            proof_file.display()
        )
    })?;
    let cp = verify::verify_proof(&proof, &verifier, origin).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!(
        "OK: event {} (hash {}, leaf v{}) is leaf {} of log {:?} at size {}, signed by {}",
        proof.event,
        proof.event_hash,
        proof.leaf_version,
        proof.leaf_index,
        cp.origin(),
        cp.size(),
        verifier.name()
    ))
}
