//! Integration tests against real Redis and PostgreSQL.

mod api;
mod bullmq;
mod common;
mod dev_key;
mod dlq_replay;
mod event_path;
mod export;
mod export_formats;
mod faults;
mod gdpr_erase;
mod hostile;
mod log_v2;
mod ops;
mod outage;
mod pg_tls;
mod process;
mod report;
mod roles;
mod scale;
mod secrets;
mod sink;
mod snapshot;
mod startup;
mod stream_ingest;
mod tls;
