//! Logging with `tracing`: text or JSON lines, filtered by the configured level.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

use crate::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG`, when set, overrides `level`. Beside the log,
/// a layer with its own filter turns the database pool's wait times into a metric.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive)?,
        _ => EnvFilter::try_new(level)?,
    };
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // A closed stderr must not panic the task that logs (tracing-subscriber would
        // eprintln! about it, which panics on a broken pipe).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let log = match format {
        LogFormat::Text => log.fmt_fields(EscapedFields::default()).boxed(),
        // JSON escapes control characters itself.
        LogFormat::Json => log.json().flatten_event(true).boxed(),
    };
    let pool_waits = crate::metrics::PoolWaitLayer.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target(crate::metrics::POOL_ACQUIRE_TARGET, tracing::Level::TRACE),
    );
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(pool_waits)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

/// At most one log line per period for a kind of event that clients can cause at will (a
/// refused credential): the first is logged, the rest of the period only counted, and the
/// count goes with the next line.
#[derive(Debug)]
pub struct Throttle {
    period_ms: u64,
    /// Milliseconds since `start` of the last line logged, plus one (0: none yet).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
    start: std::sync::OnceLock<std::time::Instant>,
}

impl Throttle {
    /// At most one line per `period`.
    pub const fn new(period: std::time::Duration) -> Self {
        Self {
            period_ms: period.as_millis() as u64,
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
            start: std::sync::OnceLock::new(),
        }
    }

    /// `Some(events suppressed since the last line)` when this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let start = self.start.get_or_init(std::time::Instant::now);
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now.saturating_sub(last) < self.period_ms {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

/// The text format's fields and message, with control characters escaped: the default
/// formatter writes `%` values and the message verbatim, so a newline in a value (a URL, a
/// path, an error from elsewhere) would start a line that looks like the gateway's own.
/// Field names lose their terminal styling, since escape sequences are escaped too; the level
/// keeps its colour.
#[derive(Debug, Default)]
pub struct EscapedFields {
    inner: DefaultFields,
}

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut plain = String::new();
        self.inner.format_fields(Writer::new(&mut plain), fields)?;
        write_escaped(&mut writer, &plain)
    }
}

/// Writes `text` with `\n`, `\r`, `\t` spelt out and every other control character (C0, DEL,
/// C1), line and paragraph separator and bidirectional override as `\u{..}`.
pub fn write_escaped(out: &mut impl std::fmt::Write, text: &str) -> std::fmt::Result {
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if needs_escape(c) => write!(out, "\\u{{{:x}}}", u32::from(c))?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// Characters that move the cursor, end a line in some viewer, or reorder what follows.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the text format writes for whatever `log` emits.
    fn text_log(ansi: bool, log: impl FnOnce()) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(ansi)
            .fmt_fields(EscapedFields::default())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn values_and_messages_stay_on_one_line() {
        let forged = "grpc://127.0.0.1:9/\n2026-01-01T00:00:00.000000Z  INFO kas_gateway: forged";
        let text = text_log(false, || {
            let span = tracing::info_span!("request", path = %"/a\r\nb");
            let _entered = span.enter();
            tracing::info!(url = %forged, debug = ?"x\ny", "message\twith {}", "a\u{1b}[31mred\n");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(
                r"url=grpc://127.0.0.1:9/\n2026-01-01T00:00:00.000000Z  INFO kas_gateway: forged"
            ),
            "{text}"
        );
        // tracing-subscriber spells ESC in a message `\x1b` itself; it is never raw.
        assert!(text.contains(r"message\twith a\x1b[31mred\n"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains(r#"debug="x\ny""#), "{text}");
        assert!(text.contains(r"request{path=/a\r\nb}"), "{text}");
    }

    #[test]
    fn terminal_colours_do_not_let_escapes_through() {
        let text = text_log(true, || tracing::warn!(value = %"\u{1b}]0;title\u{7}", "m"));
        // The level's own colour codes remain; the value's escape sequence does not.
        assert!(text.contains(r"value=\u{1b}]0;title\u{7}"), "{text}");
        assert!(!text.contains("\u{1b}]0;"), "{text}");
        assert!(!text.contains('\u{7}'), "{text}");
    }

    #[test]
    fn throttled_lines_count_what_they_hide() {
        let throttle = Throttle::new(std::time::Duration::from_millis(200));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(throttle.allow(), Some(2));
        assert_eq!(throttle.allow(), None);
    }

    #[test]
    fn escapes() {
        let mut out = String::new();
        write_escaped(&mut out, "a\u{0}b\u{7f}c\u{85}d\u{2028}e\u{202e}f é ü\\n").unwrap();
        assert_eq!(out, r"a\u{0}b\u{7f}c\u{85}d\u{2028}e\u{202e}f é ü\n");
    }
}
