//! audit-worker: consumes audit events from Redis (Streams, BullMQ),
//! validates them, verifies their integrity and stores them in PostgreSQL
//! exactly once. README.md describes the wire contracts, reason codes,
//! metrics and operations.

pub mod alerts;
pub mod api;
pub mod app;
pub mod config;
pub mod db;
pub mod dlq;
pub mod event;
pub mod health_probe;
pub mod http;
pub mod integrity;
pub mod jobs;
pub mod lease;
pub mod live;
pub mod message;
pub mod outage;
pub mod partitions;
pub mod pgtls;
pub mod policy;
pub mod processor;
#[cfg(test)]
mod properties;
pub mod retry;
pub mod shards;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tracing_ctx;
