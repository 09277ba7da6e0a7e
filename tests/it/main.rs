//! Integration tests against real Redis and PostgreSQL.

mod bullmq;
mod common;
mod faults;
mod process;
mod stream_ingest;
