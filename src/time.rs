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

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_of_ms(ms: u64) -> String {
    rfc3339_of(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Parses an RFC 3339 time, `Z` or a `+HH:MM` / `-HH:MM` offset, to Unix ms.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("`{s}` is not an RFC 3339 time like 2026-11-23T18:00:00Z: {why}");
    let s = s.trim();
    let (base, offset_secs) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((base, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let hours: i64 = off[1..3].parse().map_err(|_| bad("bad offset hours"))?;
            let minutes: i64 = off[4..6].parse().map_err(|_| bad("bad offset minutes"))?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{base}Z"), sign * (hours * 3600 + minutes * 60))
        }
        _ => (s.to_owned(), 0),
    };
    let t = humantime::parse_rfc3339_weak(&base).map_err(|e| bad(&e.to_string()))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("before 1970"))?
        .as_millis() as i64;
    u64::try_from(ms - offset_secs * 1000).map_err(|_| bad("before 1970"))
}
