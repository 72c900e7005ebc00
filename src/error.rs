//! Rendering errors at the edges (CLI lines, log fields, HTTP problem details).
//!
//! Layers keep their cause as `#[source]` instead of flattening it into their own message
//! (STYLE.md, "Errors keep their cause"); the edge prints the whole chain on one line, so an
//! operator reads `cannot open the store /var/lib/warden/warden.redb: Database already open.
//! Cannot acquire lock.` instead of a message that lost its reason.

use std::error::Error;

/// `error` and each of its `source()`s, joined by `": "`, on one line.
///
/// Some error types (redb's, or a `thiserror` message with `{0}`) already print their cause
/// in their own message and also return it as `source()`; a source whose text the line
/// already ends with is skipped, so the cause is not printed twice.
pub fn chain(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = source.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("commit failed")]
    struct Middle(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn chain_joins_every_source() {
        let error = Outer(Middle(std::io::Error::from_raw_os_error(28)));
        assert_eq!(
            chain(&error),
            "cannot open the store: commit failed: No space left on device (os error 28)"
        );
    }

    #[test]
    fn chain_does_not_repeat_a_cause_the_message_already_holds() {
        let error = Repeats(std::io::Error::other("locked"));
        assert_eq!(chain(&error), "wrapper: locked");
    }
}
