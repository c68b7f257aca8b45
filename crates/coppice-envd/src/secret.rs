//! Comparing secrets (access tokens, URL signatures) without leaking where they differ.
//!
//! Shared by every surface that checks a caller's secret: the hop's token gate, `/files`,
//! envd's `/init` and the code interpreter's `/execute`.

/// Whether `a` and `b` are equal, without an early exit on the first differing byte (the
/// length is not secret).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_every_byte_and_the_length_match() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
