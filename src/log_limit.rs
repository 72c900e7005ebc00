//! Rate limit for repeated error log lines.
//!
//! Under a fault every failed request used to write one ERROR line: 98,000 lines (20 MB) in
//! 27 s with the token gone, which floods the journal and hides the first, useful line. Each
//! error site names a kind; per kind and per [`WINDOW`], the first [`BURST`] occurrences are
//! logged, the rest only counted, and when the window is over one summary line says how many
//! more there were ("N more like this in the last 10 s"). Every occurrence, logged or not,
//! is counted in `warden_errors_total{kind}` (see [`crate::metrics`]).
//!
//! Use: `if log_limit::allow("cmf.store") { tracing::error!(error = %e, "store error"); }`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::metrics::{self, KindLabels};

/// The kinds used by the agent's error sites (their counters exist from the start).
pub const KINDS: [&str; 7] = [
    "cmf.key",
    "cmf.key_unavailable",
    "cmf.store",
    "sm.journal",
    "store.group",
    "signer.x509",
    "signer.tls",
];

/// Lines of one kind logged per window before the rest are only counted.
pub const BURST: u64 = 5;
/// The window of the rate limit and of the summaries.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Counts an occurrence of `kind`; true if its line should be logged now.
pub fn allow(kind: &'static str) -> bool {
    metrics::global()
        .errors
        .get_or_create(&KindLabels { kind })
        .inc();
    let allowed = limiter().allow(kind, Instant::now());
    if !allowed {
        metrics::global()
            .log_lines_suppressed
            .get_or_create(&KindLabels { kind })
            .inc();
    }
    allowed
}

/// Writes the summary of every window that is over. Called by [`allow`] for its own kind and
/// periodically (the readiness probe's tick) so that the last burst of a fault is summed up
/// even when no error follows it.
pub fn flush() {
    limiter().flush(Instant::now());
}

fn limiter() -> &'static Limiter {
    static LIMITER: OnceLock<Limiter> = OnceLock::new();
    LIMITER.get_or_init(|| Limiter {
        kinds: Mutex::new(HashMap::new()),
    })
}

struct Limiter {
    kinds: Mutex<HashMap<&'static str, Window>>,
}

struct Window {
    started: Instant,
    logged: u64,
    suppressed: u64,
}

impl Limiter {
    fn allow(&self, kind: &'static str, now: Instant) -> bool {
        // A poisoned lock only means another thread panicked while counting; the counts
        // are still usable.
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let window = kinds.entry(kind).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            summarize(kind, window);
            *window = Window {
                started: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if window.logged < BURST {
            window.logged += 1;
            true
        } else {
            window.suppressed += 1;
            false
        }
    }

    fn flush(&self, now: Instant) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        kinds.retain(|kind, window| {
            if now.duration_since(window.started) < WINDOW {
                return true;
            }
            summarize(kind, window);
            false
        });
    }
}

fn summarize(kind: &str, window: &Window) {
    if window.suppressed > 0 {
        tracing::error!(
            kind,
            suppressed = window.suppressed,
            "{} more like this in the last {} s",
            window.suppressed,
            WINDOW.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_counted_until_the_window_ends() {
        let limiter = Limiter {
            kinds: Mutex::new(HashMap::new()),
        };
        let start = Instant::now();
        let allowed = (0..100)
            .filter(|_| limiter.allow("test.kind", start))
            .count();
        assert_eq!(allowed as u64, BURST);
        // Another kind has its own budget.
        assert!(limiter.allow("test.other", start));
        {
            let kinds = limiter.kinds.lock().unwrap();
            assert_eq!(kinds["test.kind"].suppressed, 100 - BURST);
        }
        // The next window starts afresh.
        assert!(limiter.allow("test.kind", start + WINDOW));
        let kinds = limiter.kinds.lock().unwrap();
        assert_eq!(kinds["test.kind"].suppressed, 0);
        assert_eq!(kinds["test.kind"].logged, 1);
    }

    #[test]
    fn flush_drops_windows_that_are_over() {
        let limiter = Limiter {
            kinds: Mutex::new(HashMap::new()),
        };
        let start = Instant::now();
        limiter.allow("test.a", start);
        limiter.flush(start + WINDOW / 2);
        assert_eq!(limiter.kinds.lock().unwrap().len(), 1);
        limiter.flush(start + WINDOW);
        assert!(limiter.kinds.lock().unwrap().is_empty());
    }
}
