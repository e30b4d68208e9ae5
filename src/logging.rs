//! Where flotilla's `tracing` output goes and how it looks.
//!
//! Every log line goes to stderr. Who reads stderr decides the format:
//!
//! * **journald** (flotilla.service under systemd): systemd tells a service
//!   that its stderr is a journal stream with `JOURNAL_STREAM=DEV:INODE`, the
//!   device and inode of that stream. When stderr is exactly that stream, each
//!   line starts with the syslog priority journald understands (`<3>` error,
//!   `<4>` warning, `<6>` info, `<7>` debug and trace) and carries neither a
//!   timestamp (the journal stamps every entry itself) nor a level word nor
//!   colours. A multi-line message gets the prefix on every line, since
//!   journald makes one entry per line.
//! * **anything else** (a terminal, a file, a test harness): the usual human
//!   format with timestamps and levels, coloured only on a terminal.
//!
//! The filter (`RUST_LOG` syntax) sits behind a reload handle so the daemon
//! can change it on SIGHUP without a restart ([`apply_config_filter`]).
//! `RUST_LOG`, when set, wins over the configuration, at start and on reload.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// For journald: `<priority>target: message fields`, no timestamp.
    Journal,
    /// For people: timestamp, level, target, message; colours on a terminal.
    Human {
        /// Whether to colour the output.
        ansi: bool,
    },
}

impl Style {
    /// The style that fits this process's stderr.
    pub fn for_stderr() -> Style {
        Style::choose(
            std::env::var("JOURNAL_STREAM").ok().as_deref(),
            stderr_identity(),
            std::io::stderr().is_terminal(),
        )
    }

    /// The style for a stderr with this identity (device, inode), given
    /// `JOURNAL_STREAM` and whether stderr is a terminal.
    fn choose(journal_stream: Option<&str>, stderr: Option<(u64, u64)>, terminal: bool) -> Style {
        match (journal_stream, stderr) {
            (Some(stream), Some((dev, ino))) if is_journal_stream(stream, dev, ino) => {
                Style::Journal
            }
            _ => Style::Human { ansi: terminal },
        }
    }
}

/// The device and inode of stderr (what systemd puts in `JOURNAL_STREAM`).
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether `JOURNAL_STREAM`'s `DEV:INODE` names the file with this device and
/// inode. A redirected stderr (`2>file` inside a unit) keeps the variable but
/// is another file, and gets the human format.
fn is_journal_stream(variable: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = variable.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The syslog priority journald files a line of this level under.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// tracing-subscriber's format without time, level or colours.
type PlainFormat =
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>;

/// Formats an event with `inner`, then prefixes every line with the event's
/// syslog priority.
pub struct JournalFormat<F> {
    inner: F,
}

impl JournalFormat<PlainFormat> {
    /// The journal format: target, message and fields; the journal adds the
    /// time and files the priority.
    pub fn new() -> Self {
        JournalFormat {
            inner: tracing_subscriber::fmt::format()
                .without_time()
                .with_level(false)
                .with_ansi(false),
        }
    }
}

impl Default for JournalFormat<PlainFormat> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let priority = priority(event.metadata().level());
        for part in line.lines() {
            writeln!(writer, "<{priority}>{part}")?;
        }
        Ok(())
    }
}

/// The handle that changes the filter of the installed subscriber.
struct Filter {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    /// `RUST_LOG` chose the filter: the configuration does not change it.
    from_env: bool,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Installs the process's subscriber, writing to stderr in the style that
/// fits it. The filter is `RUST_LOG` when set, else `default` (the daemon's
/// `log` setting, or `warn` for the CLI). Call once, first thing.
pub fn init(default: &str) {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, true),
        Err(_) => (EnvFilter::new(default), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match Style::for_stderr() {
        Style::Journal => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JournalFormat::new())
                    .with_ansi(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        Style::Human { ansi } => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(Filter { handle, from_env });
    }
}

/// Applies the configuration's `log` filter to the running process (SIGHUP).
/// Does nothing when `RUST_LOG` set the filter, and says so.
pub fn apply_config_filter(filter: &str) {
    let Some(current) = FILTER.get() else {
        return;
    };
    if current.from_env {
        tracing::info!("log filter unchanged: RUST_LOG is set and wins over the log setting");
        return;
    }
    // The loader validated the filter already; a failure here is a bug.
    match EnvFilter::try_new(filter)
        .map_err(|e| e.to_string())
        .and_then(|f| current.handle.reload(f).map_err(|e| e.to_string()))
    {
        Ok(()) => tracing::info!("log filter is now {filter:?}"),
        Err(e) => tracing::error!("log filter {filter:?} not applied: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what the subscriber writes.
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

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn journal_lines(emit: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .event_format(JournalFormat::new())
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn each_level_becomes_its_syslog_priority_without_a_timestamp() {
        let lines = journal_lines(|| {
            tracing::error!("disk on fire");
            tracing::warn!(member = "n2", "peer slow");
            tracing::info!("serving");
            tracing::debug!("detail");
            tracing::trace!("more detail");
        });
        let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"], "{lines:?}");
        let target = module_path!();
        assert_eq!(lines[0], format!("<3>{target}: disk on fire"));
        assert_eq!(lines[1], format!("<4>{target}: peer slow member=\"n2\""));
        for line in &lines {
            assert!(!line.contains("ERROR") && !line.contains("INFO"), "{line}");
            assert!(!line.contains('\u{1b}'), "no colours: {line:?}");
        }
    }

    #[test]
    fn every_line_of_a_multi_line_message_keeps_the_priority() {
        let lines = journal_lines(|| tracing::warn!("first\nsecond\nthird"));
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines.iter().all(|l| l.starts_with("<4>")), "{lines:?}");
        assert_eq!(lines[2], "<4>third");
    }

    #[test]
    fn journal_stream_must_name_this_very_file() {
        assert!(is_journal_stream("8:12345", 8, 12345));
        assert!(is_journal_stream("8:12345\n", 8, 12345));
        assert!(!is_journal_stream("8:12345", 8, 12346));
        assert!(!is_journal_stream("9:12345", 8, 12345));
        assert!(!is_journal_stream("", 8, 12345));
        assert!(!is_journal_stream("8", 8, 12345));
        assert!(!is_journal_stream("x:y", 8, 12345));
    }

    #[test]
    fn the_journal_style_needs_stderr_to_be_the_named_stream() {
        let journal = Some("8:12345");
        assert_eq!(
            Style::choose(journal, Some((8, 12345)), false),
            Style::Journal
        );
        assert_eq!(
            Style::choose(journal, Some((8, 999)), true),
            Style::Human { ansi: true }
        );
        assert_eq!(
            Style::choose(None, Some((8, 12345)), false),
            Style::Human { ansi: false }
        );
        assert_eq!(
            Style::choose(journal, None, false),
            Style::Human { ansi: false }
        );
        // This process's own stderr, named in the variable, is recognised.
        let me = stderr_identity().expect("fstat answers for stderr");
        let named = format!("{}:{}", me.0, me.1);
        assert_eq!(Style::choose(Some(&named), Some(me), false), Style::Journal);
    }
}
