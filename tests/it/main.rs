//! Integration tests against real Redis and PostgreSQL.

mod common;
mod process;
mod snapshot;
mod stream_ingest;
