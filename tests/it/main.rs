//! Integration tests against real Redis and PostgreSQL.

mod bullmq;
mod common;
mod export;
mod faults;
mod hostile;
mod ops;
mod pg_tls;
mod process;
mod roles;
mod scale;
mod secrets;
mod sink;
mod snapshot;
mod stream_ingest;
mod tls;
