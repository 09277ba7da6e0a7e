//! Integration tests against real Redis and PostgreSQL.

mod common;
mod export;
mod process;
mod stream_ingest;
