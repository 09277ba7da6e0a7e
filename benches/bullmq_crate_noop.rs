//! The floor that bullmq-official sets: a Worker of the crate (the one the
//! BullMQ source is built on) whose processor does nothing, on a queue of
//! pre-added jobs. Run by `benches/bullmq_throughput.sh` beside the Node
//! no-op worker and audit-worker, so the three rates come from one run on
//! one Redis: what Node's worker costs, what the crate costs before any of
//! our code runs, and what storing every event costs on top.
//!
//! Environment: `QUEUE` (required), `STOP_AFTER` (jobs to wait for,
//! default 100,000), `CONCURRENCY` (default 100, as the Node worker),
//! `REDIS_URL` (redis://127.0.0.1:6379), `PREFIX` (bull). Prints one JSON
//! line: `{"completed":N,"seconds":S,"jobsPerSecond":R}`, timed from the
//! first job made active to the last completion, as the Node script does.

use std::time::Instant;

use bullmq::worker::WorkerEvent;
use bullmq::{Job, Worker, WorkerOptions};

/// The same allocator as audit-worker (src/main.rs), so the floor is
/// measured on the same terms.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let queue = std::env::var("QUEUE").map_err(|_| "set QUEUE to the queue to consume")?;
    let stop_after: u64 = env("STOP_AFTER", "100000").parse()?;
    let mut opts = WorkerOptions {
        prefix: env("PREFIX", "bull"),
        concurrency: env("CONCURRENCY", "100").parse()?,
        ..WorkerOptions::default()
    };
    opts.connection.url = env("REDIS_URL", "redis://127.0.0.1:6379");
    let worker = Worker::with_options(
        &queue,
        |_job: Job, _cancel| async move { Ok(serde_json::Value::Null) },
        opts,
    )
    .await?;
    let mut first = None;
    let mut completed = 0u64;
    while let Some(event) = worker.next_event().await {
        match event {
            WorkerEvent::Active { .. } => {
                first.get_or_insert_with(Instant::now);
            }
            WorkerEvent::Completed { .. } => {
                completed += 1;
                if completed == stop_after {
                    break;
                }
            }
            WorkerEvent::Failed { job_id, error } => {
                return Err(format!("job {job_id} failed: {error}").into());
            }
            _ => {}
        }
    }
    let seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!(
        "{{\"completed\":{completed},\"seconds\":{seconds:.3},\"jobsPerSecond\":{:.1}}}",
        completed as f64 / seconds
    );
    worker.close(5_000).await?;
    Ok(())
}
