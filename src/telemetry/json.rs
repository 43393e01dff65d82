//! The JSON log line: one flat object per event, as structlog users expect.
//!
//! `timestamp` (RFC 3339, UTC, microseconds), `level` (lowercase), `event`
//! (the event's message: its snake_case name, such as `job_completed`),
//! `target` (the module), then the fields of every span the event is in
//! (the job's `job_id`, `type`, `queue`, `worker_id`), outermost first, and
//! the event's own fields, all at the top level. An inner span's field wins
//! over an outer one's of the same name, and the event's own field over
//! both. A field named like one of the four fixed keys is written as
//! `field.<name>` so it never overwrites them.
//!
//! tracing-subscriber's own JSON formatter nests span fields under `span` /
//! `spans`; [`SpanFields`] keeps each span's fields as JSON in the span's
//! extensions, and [`FlatJson`] merges them into the event's object.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The keys every line starts with, in this order.
const FIXED: [&str; 4] = ["timestamp", "level", "event", "target"];

/// A span's fields, kept in its extensions by [`SpanFields`].
struct Fields(Map<String, Value>);

/// Records each span's fields as JSON when it is created or recorded to.
pub struct SpanFields;

impl<S> Layer<S> for SpanFields
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = JsonVisitor::default();
        attrs.record(&mut visitor);
        span.extensions_mut().insert(Fields(visitor.0));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = JsonVisitor::default();
        values.record(&mut visitor);
        let mut ext = span.extensions_mut();
        match ext.get_mut::<Fields>() {
            Some(fields) => fields.0.extend(visitor.0),
            None => ext.insert(Fields(visitor.0)),
        }
    }
}

/// Writes each event as one flat JSON object (module docs).
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<Fields>() {
                    fields.extend(f.0.clone());
                }
            }
        }
        let mut own = JsonVisitor::default();
        event.record(&mut own);
        let message = own.0.remove("message");
        fields.extend(own.0);
        let meta = event.metadata();
        let line = line(
            humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            meta.level().as_str().to_ascii_lowercase(),
            message.unwrap_or(Value::String(String::new())),
            meta.target(),
            fields,
        );
        writeln!(writer, "{line}")
    }
}

/// The object of one line: the fixed keys first, then `fields` (sorted).
fn line(
    timestamp: String,
    level: String,
    event: Value,
    target: &str,
    fields: Map<String, Value>,
) -> String {
    let mut out = String::with_capacity(256);
    out.push('{');
    let fixed = [
        Value::String(timestamp),
        Value::String(level),
        event,
        Value::String(target.to_owned()),
    ];
    let renamed = fields.into_iter().map(|(k, v)| {
        if FIXED.contains(&k.as_str()) {
            (format!("field.{k}"), v)
        } else {
            (k, v)
        }
    });
    let all = FIXED
        .iter()
        .map(|k| (*k).to_owned())
        .zip(fixed)
        .chain(renamed);
    for (i, (k, v)) in all.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(k).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// Field values as JSON: numbers and booleans as such, the rest as text
/// (`%x` by `Display`, `?x` by `Debug`).
#[derive(Default)]
struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(log: impl FnOnce()) -> Vec<Value> {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(SpanFields).with(
            tracing_subscriber::fmt::layer()
                .event_format(FlatJson)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn span_fields_are_at_the_top_level_and_the_event_wins() {
        let lines = lines_of(|| {
            let outer = tracing::info_span!("job", job_id = "j1", queue = "q", attempt = 1);
            let _o = outer.enter();
            let inner = tracing::info_span!("stage", stage = "s", queue = "inner");
            let _i = inner.enter();
            inner.record("stage", "s2");
            tracing::warn!(attempt = 2, ok = true, level = "x", "job_retrying");
        });
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!(l["event"], "job_retrying", "{l}");
        assert_eq!(l["level"], "warn", "{l}");
        assert!(l["target"].as_str().unwrap().contains("json"), "{l}");
        assert!(l["timestamp"].as_str().unwrap().ends_with('Z'), "{l}");
        assert_eq!(l["job_id"], "j1", "{l}");
        assert_eq!(l["queue"], "inner", "inner span over outer: {l}");
        assert_eq!(l["stage"], "s2", "recorded later: {l}");
        assert_eq!(l["attempt"], 2, "the event over its spans: {l}");
        assert_eq!(l["ok"], true, "{l}");
        assert_eq!(l["field.level"], "x", "{l}");
        assert!(l.get("span").is_none() && l.get("spans").is_none(), "{l}");
        assert!(
            l.get("message").is_none() && l.get("fields").is_none(),
            "{l}"
        );
    }

    #[test]
    fn an_event_outside_spans_has_its_fields_only() {
        let lines = lines_of(|| tracing::error!(error = %"boom", "fetch_failed"));
        let l = &lines[0];
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys.len(), 5, "{l}");
        assert_eq!(l["event"], "fetch_failed");
        assert_eq!(l["level"], "error");
        assert_eq!(l["error"], "boom");
    }
}
