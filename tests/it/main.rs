//! Integration tests against real Redis and PostgreSQL.

mod bullmq;
mod common;
mod export;
mod faults;
mod hostile;
mod log_v2;
mod ops;
mod pg_tls;
mod process;
mod roles;
mod scale;
mod secrets;
mod snapshot;
mod stream_ingest;
mod tls;
