//! Rendering a finished report: the JSON document and one self-contained
//! HTML page (tables, and SVG charts drawn here with `plotters`). Pure:
//! values in, bytes out. The HTML has no scripts and no external assets,
//! and every value in it is escaped (principal ids, actions and resource
//! ids are whatever producers sent).

use std::fmt::Write as _;

use chrono::SecondsFormat;
use plotters::prelude::*;
use serde::Serialize;

use super::compute::{GdprReport, HipaaReport};
use super::counter::Breakdown;
use super::integrity::IntegrityReport;
use super::request::ReportRequest;

/// A report's sections, by kind.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ReportBody {
    Hipaa(Box<HipaaReport>),
    Gdpr(Box<GdprReport>),
    Integrity(IntegrityReport),
}

/// The whole report as the JSON file holds it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportDocument {
    pub job_id: String,
    pub kind: String,
    pub title: String,
    pub organization_id: Option<String>,
    pub allowed_organizations: Option<Vec<String>>,
    pub from: String,
    pub to: String,
    pub requester_id: String,
    pub generated_at: String,
    /// Rows read from audit_log to compute the report.
    pub rows_scanned: u64,
    pub report: ReportBody,
}

impl ReportDocument {
    /// The document for `request`'s job `job_id`.
    pub fn new(
        job_id: &str,
        request: &ReportRequest,
        generated_at: chrono::DateTime<chrono::Utc>,
        rows_scanned: u64,
        report: ReportBody,
    ) -> Self {
        Self {
            job_id: job_id.to_owned(),
            kind: request.kind.as_str().to_owned(),
            title: request.kind.title().to_owned(),
            organization_id: request.organization_id.clone(),
            allowed_organizations: request
                .allowed_orgs
                .as_ref()
                .map(|s| s.iter().cloned().collect()),
            from: request.from.to_rfc3339_opts(SecondsFormat::Micros, true),
            to: request.to.to_rfc3339_opts(SecondsFormat::Micros, true),
            requester_id: request.requester_id.clone(),
            generated_at: generated_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            rows_scanned,
            report,
        }
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Chart labels are cut to this many characters (the table has the rest).
const LABEL_CHARS: usize = 14;

fn short(s: &str) -> String {
    if s.chars().count() <= LABEL_CHARS {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(LABEL_CHARS - 1).collect();
        t.push('…');
        t
    }
}

/// A vertical bar chart as an SVG element (empty data draws an empty
/// axis). plotters escapes the text it writes; labels are also cut short.
pub fn bar_chart(title: &str, bars: &[(String, u64)]) -> String {
    let mut svg = String::new();
    let drawn = draw_bars(&mut svg, title, bars);
    match drawn {
        Ok(()) => svg,
        Err(e) => format!("<p>chart unavailable: {}</p>", escape(&e)),
    }
}

fn draw_bars(svg: &mut String, title: &str, bars: &[(String, u64)]) -> Result<(), String> {
    let labels: Vec<String> = bars.iter().map(|(l, _)| short(l)).collect();
    let n = bars.len().max(1) as u32;
    let max = bars.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let root = SVGBackend::with_string(svg, (760, 340)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0u64..(max + max / 10 + 1))
        .map_err(|e| e.to_string())?;
    let formatter = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&formatter)
        .x_label_style(
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .y_desc("events")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(RGBColor(0x2b, 0x6c, 0xb0).filled())
                .margin(4)
                .data(bars.iter().enumerate().map(|(i, (_, v))| (i as u32, *v))),
        )
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    drop(chart);
    drop(root);
    Ok(())
}

fn bars_of(b: &Breakdown, n: usize) -> Vec<(String, u64)> {
    b.entries
        .iter()
        .take(n)
        .map(|e| (e.key.clone(), e.count))
        .collect()
}

/// Builds the page bit by bit.
struct Page {
    html: String,
}

impl Page {
    fn h2(&mut self, text: &str) {
        let _ = writeln!(self.html, "<h2>{}</h2>", escape(text));
    }

    fn p(&mut self, text: &str) {
        let _ = writeln!(self.html, "<p>{}</p>", escape(text));
    }

    fn table(&mut self, caption: &str, head: &[&str], rows: &[Vec<String>]) {
        let _ = write!(
            self.html,
            "<table><caption>{}</caption><thead><tr>",
            escape(caption)
        );
        for h in head {
            let _ = write!(self.html, "<th scope=\"col\">{}</th>", escape(h));
        }
        self.html.push_str("</tr></thead><tbody>");
        if rows.is_empty() {
            let _ = write!(
                self.html,
                "<tr><td colspan=\"{}\">none</td></tr>",
                head.len()
            );
        }
        for r in rows {
            self.html.push_str("<tr>");
            for c in r {
                let _ = write!(self.html, "<td>{}</td>", escape(c));
            }
            self.html.push_str("</tr>");
        }
        self.html.push_str("</tbody></table>\n");
    }

    fn breakdown(&mut self, caption: &str, what: &str, b: &Breakdown) {
        let rows: Vec<Vec<String>> = b
            .entries
            .iter()
            .map(|e| {
                vec![
                    e.key.clone(),
                    e.count.to_string(),
                    if e.overcount > 0 {
                        format!("≤ {} too high", e.overcount)
                    } else {
                        "exact".into()
                    },
                ]
            })
            .collect();
        self.table(caption, &[what, "Events", "Accuracy"], &rows);
        if !b.exact {
            self.p("More distinct values than report.counter_capacity: counts are space-saving estimates, each at most its stated overcount too high.");
        }
    }

    fn chart(&mut self, title: &str, bars: &[(String, u64)]) {
        let _ = writeln!(
            self.html,
            "<figure>{}<figcaption>{}</figcaption></figure>",
            bar_chart(title, bars),
            escape(title)
        );
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#1a202c}\
table{border-collapse:collapse;margin:1em 0}caption{text-align:left;font-weight:bold;padding:.3em 0}\
th,td{border:1px solid #cbd5e0;padding:.25em .6em;text-align:left}th{background:#edf2f7}\
figure{margin:1em 0}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}";

/// The self-contained HTML page of a report.
pub fn html(doc: &ReportDocument) -> String {
    let mut page = Page {
        html: String::with_capacity(64 * 1024),
    };
    let _ = write!(
        page.html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n",
        title = escape(&doc.title)
    );
    let scope = match (&doc.organization_id, &doc.allowed_organizations) {
        (Some(o), _) => o.clone(),
        (None, Some(a)) => format!("all allowed: {}", a.join(", ")),
        (None, None) => "all organisations".into(),
    };
    let _ = writeln!(
        page.html,
        "<dl id=\"summary\"><dt>Report</dt><dd>{}</dd><dt>Job</dt><dd>{}</dd><dt>Organisation</dt><dd>{}</dd>\
         <dt>Period</dt><dd>{} to {} (end exclusive)</dd><dt>Requested by</dt><dd>{}</dd>\
         <dt>Generated</dt><dd>{}</dd><dt>Rows read</dt><dd>{}</dd></dl>",
        escape(&doc.kind),
        escape(&doc.job_id),
        escape(&scope),
        escape(&doc.from),
        escape(&doc.to),
        escape(&doc.requester_id),
        escape(&doc.generated_at),
        doc.rows_scanned
    );
    match &doc.report {
        ReportBody::Hipaa(r) => hipaa(&mut page, r),
        ReportBody::Gdpr(r) => gdpr(&mut page, r),
        ReportBody::Integrity(r) => integrity(&mut page, r),
    }
    page.html.push_str("</body></html>\n");
    page.html
}

fn hipaa(page: &mut Page, r: &HipaaReport) {
    let t = &r.totals;
    page.h2("Totals");
    page.table(
        "Totals",
        &["Measure", "Events"],
        &[
            vec![
                "Events covered (PHI accesses and break-glass actions)".into(),
                t.events.to_string(),
            ],
            vec!["PHI accesses".into(), t.phi_accesses.to_string()],
            vec![
                "Failed access attempts".into(),
                t.failed_attempts.to_string(),
            ],
            vec![
                format!("Outside working hours ({})", r.working_hours),
                t.after_hours.to_string(),
            ],
            vec!["Break-glass actions".into(), t.break_glass.to_string()],
        ],
    );
    page.chart(
        "Events by category",
        &[
            ("PHI".into(), t.phi_accesses),
            ("failed".into(), t.failed_attempts),
            ("after hours".into(), t.after_hours),
            ("break-glass".into(), t.break_glass),
        ],
    );
    page.h2("Top principals");
    page.chart("Top principals by volume", &bars_of(&r.top_principals, 10));
    page.breakdown("Top principals", "Principal", &r.top_principals);
    page.h2("Activity by day");
    let days: Vec<(String, u64)> = r.by_day.iter().map(|d| (d.day.clone(), d.count)).collect();
    page.chart("Events per day (UTC)", &days);
    page.h2("Accesses by principal");
    page.breakdown("Accesses by principal", "Principal", &r.by_principal);
    page.h2("Accesses by patient or resource");
    page.breakdown(
        "PHI accesses by resource",
        "Resource (type/id)",
        &r.by_resource,
    );
    page.h2("Failed access attempts");
    page.breakdown(
        "Failed attempts by principal",
        "Principal",
        &r.failed_by_principal,
    );
    page.h2("Accesses outside working hours");
    page.p(&format!("Working hours: {}", r.working_hours));
    page.breakdown(
        "After-hours accesses by principal",
        "Principal",
        &r.after_hours_by_principal,
    );
    page.h2("Break-glass actions");
    page.p(&format!(
        "Break-glass actions: {}",
        r.break_glass_actions.join(", ")
    ));
    page.breakdown(
        "Break-glass actions by principal",
        "Principal",
        &r.break_glass_by_principal,
    );
    page.p("Every covered event is listed in the report's CSV file.");
}

fn gdpr(page: &mut Page, r: &GdprReport) {
    page.h2("Totals");
    page.table(
        "Totals",
        &["Measure", "Value"],
        &[vec!["Events processed".into(), r.events.to_string()]],
    );
    page.h2("Processing activities");
    page.chart(
        "Processing activities by action",
        &bars_of(&r.processing_activities, 15),
    );
    page.breakdown("Processing activities", "Action", &r.processing_activities);
    page.h2("Data categories");
    page.chart(
        "Events by data classification",
        &bars_of(&r.data_categories, 10),
    );
    page.breakdown("Data categories", "Classification", &r.data_categories);
    page.h2("Recipients");
    let rows: Vec<Vec<String>> = r
        .recipients
        .iter()
        .map(|x| {
            vec![
                x.channel.clone(),
                x.requester_id.clone(),
                x.what.clone(),
                x.rows.map(|n| n.to_string()).unwrap_or_default(),
                x.at.clone(),
                x.job_id.clone(),
            ]
        })
        .collect();
    page.table(
        "Exports and reports made",
        &["Channel", "Recipient", "What", "Rows", "When", "Job"],
        &rows,
    );
    if r.recipients_truncated {
        page.p("More recipients exist than are listed here.");
    }
    page.h2("Retention policies");
    page.breakdown(
        "Retention policies in force",
        "Retention policy",
        &r.retention_policies,
    );
    page.h2("Erasures");
    page.table(
        "Erasures",
        &["Count", "Note"],
        &[vec![r.erasures.count.to_string(), r.erasures.note.clone()]],
    );
}

fn integrity(page: &mut Page, r: &IntegrityReport) {
    page.h2("Result");
    page.table(
        "Verification",
        &["Measure", "Value"],
        &[
            vec![
                "Result".into(),
                if r.ok {
                    "OK".into()
                } else {
                    "PROBLEMS FOUND".into()
                },
            ],
            vec![
                "Checkpoints covering the period".into(),
                r.checkpoints.len().to_string(),
            ],
            vec!["Events checked".into(), r.events_checked.to_string()],
            vec![
                "Events in the period".into(),
                r.events_in_period.to_string(),
            ],
            vec![
                "Events in the period not yet sealed".into(),
                r.unsealed_in_period.to_string(),
            ],
            vec!["Problems".into(), r.problems.len().to_string()],
            vec![
                "Problems outside this report's organisations".into(),
                r.problems_outside_scope.to_string(),
            ],
        ],
    );
    let bars: Vec<(String, u64)> = r
        .checkpoints
        .iter()
        .map(|c| (format!("#{}", c.snapshot_id), c.leaves.max(0) as u64))
        .collect();
    page.chart("Events sealed per checkpoint", &bars);
    page.h2("Checkpoints");
    let rows: Vec<Vec<String>> = r
        .checkpoints
        .iter()
        .map(|c| {
            vec![
                c.snapshot_id.to_string(),
                c.range_from.clone().unwrap_or_default(),
                c.range_to.clone(),
                c.tree_size.to_string(),
                c.leaves.to_string(),
            ]
        })
        .collect();
    page.table(
        "Checkpoints covering the period",
        &["Snapshot", "From", "To", "Tree size", "Events sealed"],
        &rows,
    );
    page.h2("Problems");
    let rows: Vec<Vec<String>> = r
        .problems
        .iter()
        .map(|f| {
            vec![
                format!("{:?}", f.kind).to_lowercase(),
                f.event.clone().unwrap_or_default(),
                f.snapshot_id.map(|s| s.to_string()).unwrap_or_default(),
                f.detail.clone(),
            ]
        })
        .collect();
    page.table(
        "Problems found",
        &["Kind", "Event", "Snapshot", "Detail"],
        &rows,
    );
    page.h2("Signed checkpoint");
    match &r.checked_against {
        Some(note) => {
            let _ = writeln!(page.html, "<pre id=\"checkpoint\">{}</pre>", escape(note));
        }
        None => page.p("No signed checkpoint covers the period yet."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_quotes_and_control_characters() {
        assert_eq!(
            escape("<script>alert('x')</script>&\"\u{1}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;\u{FFFD}"
        );
    }

    #[test]
    fn a_gdpr_page_has_its_sections_escapes_recipients_and_loads_nothing() {
        use super::super::compute::{GdprAggregator, Recipient, ReportRow};
        let mut g = GdprAggregator::new(10, 10);
        g.add(&ReportRow {
            id: 1,
            event_time: chrono::Utc::now(),
            event_id: None,
            action: "<script>x</script>".into(),
            status: "success".into(),
            principal_id: None,
            organization_id: None,
            target_resource_type: None,
            target_resource_id: None,
            data_classification: Some("PHI".into()),
            retention_policy: None,
        });
        let report = g.finish(
            vec![Recipient {
                channel: "export".into(),
                job_id: "j".into(),
                requester_id: "\"><iframe>".into(),
                what: "csv".into(),
                rows: Some(3),
                at: "t".into(),
            }],
            false,
        );
        let request = ReportRequest::parse(
            br#"{"kind":"gdpr-processing","from":"2024-03-01","to":"2024-04-01","requesterId":"r<1>"}"#,
        )
        .unwrap();
        let doc = ReportDocument::new(
            "job-1",
            &request,
            chrono::Utc::now(),
            1,
            ReportBody::Gdpr(Box::new(report)),
        );
        let page = html(&doc);
        for h in [
            "<h1>GDPR record of processing activities</h1>",
            "<h2>Processing activities</h2>",
            "<h2>Data categories</h2>",
            "<h2>Recipients</h2>",
            "<h2>Retention policies</h2>",
            "<h2>Erasures</h2>",
        ] {
            assert!(page.contains(h), "{h}");
        }
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(page.contains("&quot;&gt;&lt;iframe&gt;"));
        assert!(page.contains("r&lt;1&gt;"));
        assert!(!page.contains("<script") && !page.contains("<iframe"));
        // The only URL is the SVG namespace, which loads nothing.
        let rest = page.replace("http://www.w3.org/2000/svg", "");
        assert!(!rest.contains("http:") && !rest.contains("https:") && !rest.contains("url("));
        assert!(!page.contains("src=") && !page.contains("href="));
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["report"]["erasures"]["count"], 0);
        assert_eq!(json["requesterId"], "r<1>");
    }

    #[test]
    fn a_bar_chart_is_svg_with_escaped_labels() {
        let svg = bar_chart("t<1>", &[("<b>x".into(), 3), ("y".into(), 5)]);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("&lt;b&gt;x"), "{svg}");
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("<rect"));
        let empty = bar_chart("none", &[]);
        assert!(empty.starts_with("<svg"));
    }
}
