//! Operations: metrics exposition, trace propagation, security alerts,
//! once-across-replicas periodic work, and deploy files naming real metrics.

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use audit_worker::alerts::RuleConfig;
use serde_json::json;

use crate::common::*;

/// GET /metrics.
pub async fn scrape(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Parses a scrape with the `prometheus-parse` text parser.
pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("the /metrics text parses")
}

/// The sum of a counter's or gauge's samples whose labels include `labels`.
pub fn sample_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map(|b| b.count).unwrap_or(0.0)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// The metric names in the README's metrics table.
fn documented_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    readme
        .lines()
        .skip_while(|l| !l.starts_with("## Metrics"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `audit_worker_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|name| format!("audit_worker_{name}"))
        .collect()
}

fn alert_rules() -> Vec<RuleConfig> {
    vec![
        RuleConfig::FailureBurst {
            name: "failure_burst".into(),
            threshold: 20,
            window_secs: 60,
        },
        RuleConfig::ClassifiedAccess {
            name: "phi_outside_allowlist".into(),
            classification: "PHI".into(),
            actions_containing: vec!["read".into()],
            allowed_principals: (0..100).map(|i| format!("user-{i}")).collect(),
            cooldown_secs: 300,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_contain_every_documented_metric_after_a_run() {
    let env = TestEnv::new("metrics").await;
    let mut config = env.config();
    config.telemetry.queue_stats_interval_secs = 1;
    config.alerts.stream = format!("test:{}:alerts", env.name);
    config.alerts.rules = alert_rules();
    let worker = InProcessWorker::start(config);
    let n = 300;
    let mut payloads: Vec<(Option<&str>, Vec<u8>)> = (0..n)
        .map(|i| (None, event(i).to_string().into_bytes()))
        .collect();
    payloads.push((None, b"not json".to_vec()));
    env.add_entries(&payloads).await;
    wait_until(Duration::from_secs(60), "events stored", || async {
        env.row_count().await == n as i64 && env.dlq_len().await == 1
    })
    .await;
    let port = env.http_port;
    // The gauges are refreshed every second: wait for a refresh after the run.
    wait_until(Duration::from_secs(30), "queue gauges at zero", || async {
        let Some(text) = scrape(port).await else {
            return false;
        };
        let s = parse_metrics(&text);
        let stream = [("source", "stream"), ("queue", env.stream.as_str())];
        s.samples
            .iter()
            .any(|x| x.metric == "audit_worker_queue_lag_messages")
            && sample_sum(&s, "audit_worker_queue_pending_messages", &stream) == 0.0
            && sample_sum(&s, "audit_worker_queue_lag_messages", &stream) == 0.0
    })
    .await;
    let text = scrape(port).await.expect("/metrics answers");
    let scrape = parse_metrics(&text);

    let documented = documented_metrics();
    // The parser files histogram buckets under the base name and keeps
    // `_sum` and `_count` as their own samples.
    let present: BTreeSet<&str> = scrape
        .samples
        .iter()
        .map(|s| {
            let name = s.metric.as_str();
            ["_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| documented.contains(*base))
                .unwrap_or(name)
        })
        .collect();
    assert!(documented.len() >= 20, "README table read: {documented:?}");
    let missing: Vec<_> = documented
        .iter()
        .filter(|m| !present.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}\n{text}"
    );
    let undocumented: Vec<_> = present
        .iter()
        .filter(|m| !documented.contains(**m))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not documented: {undocumented:?}"
    );
    for (name, help) in &scrape.docs {
        assert!(!help.is_empty(), "{name} has HELP text");
    }

    // The values reflect the run.
    let inserted = [("source", "stream"), ("outcome", "inserted")];
    assert_eq!(
        sample_sum(&scrape, "audit_worker_events_total", &inserted),
        n as f64
    );
    assert_eq!(
        sample_sum(
            &scrape,
            "audit_worker_dead_letters_total",
            &[("reason", "invalid_json")]
        ),
        1.0
    );
    assert_eq!(
        sample_sum(
            &scrape,
            "audit_worker_end_to_end_latency_seconds",
            &[("source", "stream")]
        ),
        n as f64,
        "one latency observation per committed event"
    );
    assert!(sample_sum(&scrape, "audit_worker_batch_size", &[]) >= 1.0);
    assert!(
        sample_sum(
            &scrape,
            "audit_worker_security_alerts_total",
            &[("rule", "failure_burst")]
        ) == 0.0,
        "normal traffic raises no alerts"
    );

    // promtool, Prometheus' own checker, accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs: apt-get install prometheus (scripts/test.sh does)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_fire_on_a_crafted_burst_and_not_on_normal_traffic() {
    let env = TestEnv::new("alerts").await;
    let alerts_key = format!("test:{}:alerts", env.name);
    let mut config = env.config();
    config.alerts.stream = alerts_key.clone();
    config.alerts.rules = alert_rules();
    let worker = InProcessWorker::start(config);
    let port = env.http_port;
    let evaluated = || async {
        scrape(port)
            .await
            .map(|t| {
                sample_sum(
                    &parse_metrics(&t),
                    "audit_worker_alert_events_evaluated_total",
                    &[],
                )
            })
            .unwrap_or(0.0)
    };
    let alerts = || async {
        let mut conn = env.redis_conn().await;
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(&alerts_key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        audit_worker::source::stream::parse_entries(&v)
            .into_iter()
            .map(|e| {
                e.fields
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
                    .collect::<HashMap<String, String>>()
            })
            .collect::<Vec<_>>()
    };

    // Normal traffic: 3,000 events over 100 allowed principals, a third of
    // them failures (10 per principal, under the threshold of 20), all PHI.
    let normal: Vec<_> = (0..3000).map(event).collect();
    env.add_events(&normal).await;
    wait_until(Duration::from_secs(60), "normal traffic stored", || async {
        env.row_count().await == 3000
    })
    .await;
    // Every stored PHI event was offered; wait until all were evaluated.
    wait_until(
        Duration::from_secs(30),
        "normal traffic evaluated",
        || async { evaluated().await == 3000.0 },
    )
    .await;
    assert!(
        alerts().await.is_empty(),
        "normal traffic raised alerts: {:?}",
        alerts().await
    );

    // The burst: 25 failures by one principal, and one PHI read by a
    // principal outside the allowed list.
    let mut burst: Vec<_> = (0..25)
        .map(|i| {
            json!({
                "eventId": format!("burst-{i}"), "timestamp": ts(0), "action": "auth.login",
                "status": "failure", "principalId": "mallory", "organizationId": "org-1",
            })
        })
        .collect();
    burst.push(json!({
        "eventId": "snoop-1", "timestamp": ts(0), "action": "patient.record.read",
        "status": "success", "principalId": "eve", "dataClassification": "PHI",
    }));
    env.add_events(&burst).await;
    wait_until(Duration::from_secs(30), "burst evaluated", || async {
        evaluated().await == 3026.0
    })
    .await;
    let raised = alerts().await;
    assert_eq!(raised.len(), 2, "{raised:?}");
    let burst_alert = raised
        .iter()
        .find(|a| a["rule"] == "failure_burst")
        .unwrap();
    assert_eq!(burst_alert["principal_id"], "mallory");
    assert_eq!(burst_alert["count"], "21");
    assert_eq!(burst_alert["kind"], "failure_burst");
    let phi = raised
        .iter()
        .find(|a| a["rule"] == "phi_outside_allowlist")
        .unwrap();
    assert_eq!(phi["principal_id"], "eve");
    assert_eq!(phi["event_id"], "snoop-1");
    let s = parse_metrics(&scrape(port).await.unwrap());
    assert_eq!(
        sample_sum(
            &s,
            "audit_worker_security_alerts_total",
            &[("rule", "failure_burst")]
        ),
        1.0
    );
    assert_eq!(
        sample_sum(
            &s,
            "audit_worker_security_alerts_total",
            &[("rule", "phi_outside_allowlist")]
        ),
        1.0
    );
    assert_eq!(
        sample_sum(&s, "audit_worker_alert_events_dropped_total", &[]),
        0.0
    );

    worker.stop().await;
    let mut conn = env.redis_conn().await;
    let _: () = redis::cmd("DEL")
        .arg(&alerts_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    env.cleanup().await;
}

/// A minimal OTLP/HTTP receiver: decodes exported spans as a collector would.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    pub(crate) spans: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

impl Receiver {
    pub(crate) async fn start(&self) -> u16 {
        use axum::routing::post;
        use prost::Message;
        let me = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    use opentelemetry_proto::tonic::collector::trace::v1::*;
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut spans = me.spans.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            spans.extend(ss.spans);
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_sent_with_an_event_is_the_parent_of_the_workers_store_span() {
    let env = TestEnv::new("traceparent").await;
    let receiver = Receiver::default();
    let otlp_port = receiver.start().await;
    let extra = [
        (
            "AUDIT_WORKER__TELEMETRY__OTLP_ENDPOINT",
            format!("http://127.0.0.1:{otlp_port}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
    ];
    let mut child = spawn_worker_with(&env, &extra);
    env.wait_for_schema().await;

    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let parent_span = format!("{:016x}", rand::random::<u64>() | 1);
    let traceparent = format!("00-{trace_id}-{parent_span}-01");
    let mut conn = env.redis_conn().await;
    let _: String = redis::cmd("XADD")
        .arg(&env.stream)
        .arg("*")
        .arg("data")
        .arg(event(1).to_string())
        .arg("traceparent")
        .arg(&traceparent)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Events without, or with a broken, trace context are stored as usual.
    let _: String = redis::cmd("XADD")
        .arg(&env.stream)
        .arg("*")
        .arg("data")
        .arg(event(2).to_string())
        .arg("traceparent")
        .arg("00-not-a-trace-01")
        .query_async(&mut conn)
        .await
        .unwrap();
    env.add_events(&[event(3)]).await;
    wait_until(Duration::from_secs(60), "events stored", || async {
        env.row_count().await == 3
    })
    .await;
    let store_span = || {
        receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| hex::encode(&s.trace_id) == trace_id && s.name == "audit.event.store")
            .cloned()
    };
    wait_until(
        Duration::from_secs(30),
        "the store span exported",
        || async { store_span().is_some() },
    )
    .await;
    terminate(&mut child);
    let span = store_span().unwrap();
    assert_eq!(
        hex::encode(&span.parent_span_id),
        parent_span,
        "parent is the producer's span"
    );
    let attrs: HashMap<String, String> = span
        .attributes
        .iter()
        .map(|kv| {
            let v = kv
                .value
                .as_ref()
                .and_then(|v| v.value.as_ref())
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            (kv.key.clone(), v)
        })
        .collect();
    assert!(attrs["outcome"].contains("inserted"), "{attrs:?}");
    // It links to the batch span that read it, and the sink's batch write
    // is exported as well.
    let spans = receiver.spans.lock().unwrap().clone();
    assert!(
        spans
            .iter()
            .any(|s| s.name == "audit.batch" && span.links.iter().any(|l| l.span_id == s.span_id)),
        "{:?}",
        span.links
    );
    assert!(spans.iter().any(|s| s.name == "audit.sink.write_batch"));
    // Only the event with a valid trace context got a store span.
    let stores: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "audit.event.store")
        .map(|s| (hex::encode(&s.trace_id), hex::encode(&s.span_id)))
        .collect();
    assert_eq!(
        stores.len(),
        1,
        "ours {trace_id}: {stores:?} {:?}",
        spans
            .iter()
            .map(|s| (
                &s.name,
                hex::encode(&s.trace_id),
                hex::encode(&s.parent_span_id)
            ))
            .collect::<Vec<_>>()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advisory_lease_lets_one_replica_run_periodic_work_at_a_time() {
    use audit_worker::lease::{run_exclusive, Exclusive};
    let env = TestEnv::new("lease").await;
    let config = env.config();
    let pool = audit_worker::db::connect_pool(&config).await.unwrap();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let pool = pool.clone();
        let schema = env.schema.clone();
        tokio::spawn(async move {
            run_exclusive(&pool, &schema, "upkeep", |_c| {
                Box::pin(async move {
                    let _ = entered_tx.send(());
                    let _ = release_rx.await;
                    Ok(1)
                })
            })
            .await
        })
    };
    entered_rx.await.unwrap();
    // A second replica (another pooled connection) skips while it is held...
    let second = run_exclusive(&pool, &env.schema, "upkeep", |_c| Box::pin(async { Ok(2) })).await;
    assert_eq!(second, Ok(Exclusive::Skipped));
    // ...another task name or another schema is independent...
    let other = run_exclusive(&pool, &env.schema, "export_sweep", |_c| {
        Box::pin(async { Ok(3) })
    })
    .await;
    assert_eq!(other, Ok(Exclusive::Ran(3)));
    release_tx.send(()).unwrap();
    assert_eq!(holder.await.unwrap(), Ok(Exclusive::Ran(1)));
    // ...and once released, the next one runs.
    let third = run_exclusive(&pool, &env.schema, "upkeep", |_c| Box::pin(async { Ok(4) })).await;
    assert_eq!(third, Ok(Exclusive::Ran(4)));
    drop(pool);
    env.cleanup().await;
}

/// Every metric named in the deploy files (alert rules, dashboard, KEDA)
/// is one the worker exports and the README documents.
#[test]
fn deploy_files_use_only_documented_metric_names() {
    let documented = documented_metrics();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let mut checked = 0;
    for file in [
        "prometheus/alerts.yml",
        "grafana/audit-worker-dashboard.json",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect(file);
        let mut names = BTreeSet::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("audit_worker_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
        assert!(!names.is_empty(), "{file} names metrics");
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| documented.contains(*b))
                .unwrap_or(&name);
            assert!(
                documented.contains(base),
                "{file} uses unknown metric {name}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10);
}

/// The ConfigMap's config file is one the worker accepts.
#[test]
fn the_kubernetes_configmap_holds_a_valid_worker_config() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/k8s/configmap.yaml"
    ))
    .unwrap();
    let body: String = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("config.toml: |"))
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(body.contains("[alerts]"), "{body}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, body).unwrap();
    let config = audit_worker::config::Config::load_from(
        Some(&path),
        figment::providers::Env::prefixed("AUDIT_WORKER_IT_UNSET__"),
    )
    .expect("the ConfigMap's config.toml loads and validates");
    assert_eq!(config.alerts.rules.len(), 2);
}
