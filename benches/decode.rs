//! Decoding benchmark: the worker's CPU per event for `decode_event`
//! (parse, validate, canonical hash v1) against the floor of parsing the
//! same bytes into a `serde_json::Value` and nothing else, in the same run.
//!
//! `cargo bench --bench decode` (`BENCH_EVENTS`, default 20,000 distinct
//! events, each decoded `BENCH_ROUNDS` times, default 25). Prints the
//! nanoseconds per event of each and their ratio; rounds alternate between
//! the two and the best round of each counts, so that another process
//! taking the core for a moment does not.

use std::hint::black_box;
use std::time::Instant;

use audit_worker::event::{decode_event, ValidationPolicy};
use chrono::Utc;

#[path = "support/sample_event.rs"]
mod sample_event;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds per event of one pass of `f` over `events`.
fn pass_ns(events: &[Vec<u8>], f: &mut impl FnMut(&[u8])) -> f64 {
    let t = Instant::now();
    for e in events {
        f(e);
    }
    t.elapsed().as_nanos() as f64 / events.len() as f64
}

fn main() {
    let n = env_usize("BENCH_EVENTS", 20_000);
    let rounds = env_usize("BENCH_ROUNDS", 25);
    let events: Vec<Vec<u8>> = (0..n)
        .map(|i| sample_event::event(i).into_bytes())
        .collect();
    let policy = ValidationPolicy::default();
    let now = Utc::now();
    for e in &events {
        decode_event(e, &policy, now).expect("the sample events are valid");
    }
    let mut parse = |e: &[u8]| {
        black_box(serde_json::from_slice::<serde_json::Value>(e).expect("valid JSON"));
    };
    let mut decode = |e: &[u8]| {
        black_box(decode_event(e, &policy, now).expect("valid event"));
    };
    // Rounds alternate between the two, so that both see the same machine.
    let (mut parse_ns, mut decode_ns) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..rounds {
        parse_ns = parse_ns.min(pass_ns(&events, &mut parse));
        decode_ns = decode_ns.min(pass_ns(&events, &mut decode));
    }
    let bytes = events.iter().map(Vec::len).sum::<usize>() / n;
    println!("events: {n} of {bytes} bytes on average, best of {rounds} rounds");
    println!("serde_json::Value parse (floor): {parse_ns:.0} ns/event");
    println!("decode_event:                    {decode_ns:.0} ns/event");
    println!(
        "ratio decode / parse:            {:.2}",
        decode_ns / parse_ns
    );
}
