//! Integration tests against real Redis and PostgreSQL.

mod common;
mod faults;
mod ops;
mod process;
mod scale;
mod stream_ingest;
