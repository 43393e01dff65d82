//! Periodic jobs: when each `[[schedules]]` entry ticks.
//!
//! A schedule is a cron expression (UTC) or a fixed interval. Interval ticks
//! are aligned on the Unix epoch (`every = "5m"` ticks at :00, :05, ...), so
//! every daemon computes the same tick instants whatever time it started:
//! a tick is identified by its instant, and `lua/enqueue.lua` enqueues each
//! instant at most once across all daemons (see `worker::periodic`).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// When a schedule ticks.
#[derive(Debug, Clone)]
pub enum Timing {
    Cron(Box<croner::Cron>),
    Every(Duration),
}

impl Timing {
    /// From the config's `cron` or `every` (exactly one of them).
    pub fn parse(cron: Option<&str>, every: Option<&str>) -> Result<Self, (&'static str, String)> {
        match (cron, every) {
            (Some(_), Some(_)) => Err(("cron", "give `cron` or `every`, not both".into())),
            (None, None) => Err((
                "cron",
                "a schedule needs `cron = \"m h dom mon dow\"` or `every = \"5m\"`".into(),
            )),
            (Some(expr), None) => croner::Cron::from_str(expr)
                .map(|c| Timing::Cron(Box::new(c)))
                .map_err(|e| ("cron", format!("`{expr}` is not a cron expression: {e}"))),
            (None, Some(text)) => {
                let d = humantime::parse_duration(text)
                    .map_err(|e| ("every", format!("`{text}` is not a duration like 5m: {e}")))?;
                if d < Duration::from_secs(1) {
                    return Err(("every", format!("`{text}` is shorter than 1s")));
                }
                Ok(Timing::Every(d))
            }
        }
    }

    /// The first tick strictly after `ms` (Unix milliseconds).
    pub fn next_after(&self, ms: u64) -> Option<u64> {
        match self {
            Timing::Every(d) => {
                // Past u64 milliseconds there is no next tick (never a
                // panic on overflow).
                let step = u64::try_from(d.as_millis()).ok()?;
                (ms / step).checked_add(1)?.checked_mul(step)
            }
            Timing::Cron(cron) => {
                let at = DateTime::<Utc>::from_timestamp_millis(i64::try_from(ms).ok()?)?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The ticks in `(after, up_to]`, the latest `limit` of them, oldest
    /// first: the missed ticks a `catch_up` schedule enqueues.
    pub fn ticks_between(&self, after: u64, up_to: u64, limit: usize) -> Vec<u64> {
        let mut ticks = std::collections::VecDeque::with_capacity(limit);
        if limit == 0 {
            return Vec::new();
        }
        let mut t = after;
        while let Some(next) = self.next_after(t) {
            if next > up_to {
                break;
            }
            if ticks.len() == limit {
                ticks.pop_front();
            }
            ticks.push_back(next);
            t = next;
        }
        ticks.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn every_ticks_on_multiples_of_the_interval() {
        let t = Timing::parse(None, Some("5m")).unwrap();
        assert_eq!(t.next_after(0), Some(5 * MIN));
        assert_eq!(t.next_after(5 * MIN - 1), Some(5 * MIN));
        assert_eq!(t.next_after(5 * MIN), Some(10 * MIN), "strictly after");
    }

    #[test]
    fn cron_ticks_in_utc() {
        // 2026-11-23T00:00:00Z
        let midnight = 1_795_392_000_000;
        let t = Timing::parse(Some("30 3 * * *"), None).unwrap();
        assert_eq!(
            t.next_after(midnight),
            Some(midnight + 3 * 60 * MIN + 30 * MIN)
        );
        let t = Timing::parse(Some("*/15 * * * *"), None).unwrap();
        assert_eq!(t.next_after(midnight), Some(midnight + 15 * MIN));
        assert_eq!(t.next_after(midnight + 1), Some(midnight + 15 * MIN));
    }

    #[test]
    fn missed_ticks_are_the_latest_ones_oldest_first() {
        let t = Timing::parse(None, Some("1m")).unwrap();
        assert_eq!(
            t.ticks_between(0, 10 * MIN, 3),
            [8 * MIN, 9 * MIN, 10 * MIN]
        );
        assert_eq!(t.ticks_between(0, 2 * MIN + 5, 10), [MIN, 2 * MIN]);
        assert!(t.ticks_between(0, 10 * MIN, 0).is_empty());
        assert!(t.ticks_between(5 * MIN, 5 * MIN + 10, 3).is_empty());
    }

    #[test]
    fn bad_timings_say_which_key() {
        assert_eq!(Timing::parse(None, None).unwrap_err().0, "cron");
        assert_eq!(
            Timing::parse(Some("* * * * *"), Some("1m")).unwrap_err().0,
            "cron"
        );
        let (key, msg) = Timing::parse(Some("61 * * * *"), None).unwrap_err();
        assert_eq!(key, "cron");
        assert!(msg.contains("61 * * * *"), "{msg}");
        assert_eq!(Timing::parse(None, Some("soon")).unwrap_err().0, "every");
        assert_eq!(Timing::parse(None, Some("10ms")).unwrap_err().0, "every");
    }
}

#[cfg(test)]
mod fuzz {
    use super::Timing;
    use proptest::prelude::*;

    fn cron_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,30}",
            prop::collection::vec("[0-9*/,LW#?-]{1,6}|[A-Za-z]{3}", 5..=7)
                .prop_map(|f| f.join(" ")),
        ]
    }

    fn every_text() -> impl Strategy<Value = String> {
        prop_oneof!["\\PC{0,20}", "[0-9]{1,25} ?(ns|ms|s|m|h|d|w|y|µs|€)"]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Any cron or every text: a timing or an error naming the field
        /// and the text; and a timing answers for any time, never panics.
        #[test]
        fn any_cron_or_every(
            cron in prop::option::of(cron_text()),
            every in prop::option::of(every_text()),
            at in any::<u64>(),
            span in any::<u64>(),
        ) {
            match Timing::parse(cron.as_deref(), every.as_deref()) {
                Ok(t) => {
                    if let Some(next) = t.next_after(at) {
                        prop_assert!(next > at);
                    }
                    let ticks = t.ticks_between(at, at.saturating_add(span % 3_600_000), 5);
                    prop_assert!(ticks.len() <= 5);
                }
                Err((field, message)) => {
                    prop_assert!(field == "cron" || field == "every", "{}", field);
                    // One of them given: the message quotes it.
                    if let (Some(given), None) | (None, Some(given)) = (&cron, &every) {
                        prop_assert!(message.contains(&format!("`{given}`")), "{}: {}", field, message);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod edges {
    use super::Timing;

    #[test]
    fn no_tick_past_the_end_of_time_rather_than_an_overflow() {
        let every = Timing::parse(None, Some("1s")).unwrap();
        assert_eq!(every.next_after(u64::MAX), None);
        assert_eq!(
            every.next_after(u64::MAX - 1000),
            Some(u64::MAX / 1000 * 1000)
        );
        let huge = Timing::parse(None, Some("500000000000y")).unwrap();
        assert_eq!(huge.next_after(0), None);
        let cron = Timing::parse(Some("* * * * *"), None).unwrap();
        assert_eq!(cron.next_after(u64::MAX), None);
    }
}
