//! Integration tests against real Redis and PostgreSQL.

mod common;
mod process;
mod stream_ingest;
