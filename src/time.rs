//! Time as conveyor writes it: Unix milliseconds in Redis, RFC 3339 (UTC,
//! milliseconds, so it sorts as text) in SQLite and JSON.

/// Current time as RFC 3339 UTC with milliseconds (sorts as text).
pub fn now_rfc3339() -> String {
    rfc3339_of(std::time::SystemTime::now())
}

/// Now, in Unix milliseconds (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 (UTC, milliseconds) of a time.
pub fn rfc3339_of(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The time of a Unix time in milliseconds (as Redis keeps due times).
pub fn time_of_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_of_ms(ms: u64) -> String {
    rfc3339_of(time_of_ms(ms))
}

/// Parses an RFC 3339 time, `Z` or a `+HH:MM` / `-HH:MM` offset, with or
/// without fractional seconds, to Unix ms. A time with no offset at all
/// (`2026-11-23T18:00:00`) is UTC, as it always was. Surrounding
/// whitespace is ignored; a time before 1970 is refused. Any input gets an
/// error naming it, never a panic (chrono's parser does the work).
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("`{s}` is not an RFC 3339 time like 2026-11-23T18:00:00Z: {why}");
    let t = s.trim();
    let ms = match chrono::DateTime::parse_from_rfc3339(t) {
        Ok(dt) => dt.timestamp_millis(),
        Err(e) => {
            let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok());
            match naive {
                Some(n) => n.and_utc().timestamp_millis(),
                None => return Err(bad(&e.to_string())),
            }
        }
    };
    u64::try_from(ms).map_err(|_| bad("before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc3339_accepts_z_offsets_fractions_and_no_offset() {
        let z = 1_795_456_800_000; // 2026-11-23T18:00:00Z
        assert_eq!(parse_rfc3339_ms("2026-11-23T18:00:00Z"), Ok(z));
        assert_eq!(parse_rfc3339_ms(" 2026-11-23T18:00:00z\n"), Ok(z));
        assert_eq!(parse_rfc3339_ms("2026-11-23T19:00:00+01:00"), Ok(z));
        assert_eq!(parse_rfc3339_ms("2026-11-23T12:30:00-05:30"), Ok(z));
        assert_eq!(parse_rfc3339_ms("2026-11-23T18:00:00.250Z"), Ok(z + 250));
        assert_eq!(parse_rfc3339_ms("2026-11-23T18:00:00.5+00:00"), Ok(z + 500));
        assert_eq!(parse_rfc3339_ms("2026-11-23T18:00:00"), Ok(z));
        assert_eq!(parse_rfc3339_ms("2026-11-23 18:00:00.1"), Ok(z + 100));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339_ms(&rfc3339_of_ms(z + 7)), Ok(z + 7));
    }

    #[test]
    fn rfc3339_refuses_bad_input_naming_it() {
        for bad in [
            "",
            "€a€",
            "2026-11-23T18:00:00€€€€€€",
            "€€€€€€€",
            "2026-11-23T18:00:00+1:00",
            "2026-11-23T18:00:00+01:0€",
            "2026-13-23T18:00:00Z",
            "2026-11-23T25:00:00Z",
            "2026-11-23",
            "tomorrow",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
        ] {
            let err = parse_rfc3339_ms(bad).expect_err(bad);
            assert!(err.starts_with(&format!("`{bad}`")), "{err}");
            assert!(err.contains("RFC 3339"), "{err}");
        }
        assert!(
            parse_rfc3339_ms("1969-12-31T23:59:59Z")
                .unwrap_err()
                .contains("before 1970")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any text: a time or an error naming the text, never a panic.
        #[test]
        fn rfc3339_never_panics_on_any_text(s in "\\PC{0,40}") {
            if let Err(e) = parse_rfc3339_ms(&s) {
                prop_assert!(e.starts_with(&format!("`{s}`")), "{}", e);
            }
        }

        /// Near-valid text (a time with characters swapped for others,
        /// multi-byte ones included): never a panic.
        #[test]
        fn rfc3339_never_panics_on_mutated_times(
            ms in 0u64..4_102_444_800_000,
            edits in prop::collection::vec((0usize..40, prop::char::any()), 0..4),
            cut in 0usize..40,
        ) {
            let mut chars: Vec<char> = rfc3339_of_ms(ms).chars().collect();
            for (i, c) in edits {
                let i = i % chars.len();
                chars[i] = c;
            }
            chars.truncate(cut.max(1));
            let s: String = chars.into_iter().collect();
            if let Err(e) = parse_rfc3339_ms(&s) {
                prop_assert!(e.starts_with(&format!("`{s}`")), "{}", e);
            }
        }

        /// What conveyor writes parses back to the same millisecond.
        #[test]
        fn rfc3339_round_trips(ms in 0u64..253_402_300_799_000) {
            prop_assert_eq!(parse_rfc3339_ms(&rfc3339_of_ms(ms)), Ok(ms));
        }
    }
}
