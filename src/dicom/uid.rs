//! DICOM UIDs (PS3.5 9.1): checked before one becomes a path part, and derived
//! deterministically for what noduled creates.
//!
//! A valid UID is 1 to 64 characters of digit components separated by single dots, each
//! component without a leading zero (except "0" itself). Such a string has no `/`, no `..`
//! and no leading dot, so it is safe as a file or folder name. Derived UIDs are
//! `2.25.<UUIDv5 as a decimal integer>` (PS3.5 B.2), at most 44 characters.

/// Namespace of derived UIDs (a fixed random UUID).
const UID_NAMESPACE: uuid::Uuid = uuid::uuid!("3b0f7a52-9e1d-4c8b-a6f2-5d7e0c4b9a21");

/// Why a string is not a UID.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{shown}` is not a DICOM UID ({why})")]
pub struct UidError {
    /// The value, at most 80 characters of it, control characters escaped.
    pub shown: String,
    /// What is wrong.
    pub why: &'static str,
}

/// Checks `s` (trailing NUL or space padding already removed by the caller, or here).
pub fn check(s: &str) -> Result<&str, UidError> {
    let t = s.trim_end_matches(['\0', ' ']);
    let bad = |why| UidError {
        shown: t.chars().take(80).flat_map(char::escape_default).collect(),
        why,
    };
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if t.len() > 64 {
        return Err(bad("longer than 64 characters"));
    }
    for part in t.split('.') {
        if part.is_empty() {
            return Err(bad("empty component"));
        }
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("only digits and dots are allowed"));
        }
        if part.len() > 1 && part.starts_with('0') {
            return Err(bad("component with a leading zero"));
        }
    }
    Ok(t)
}

/// A UID derived from `parts` (joined with newlines): the same parts give the same UID.
pub fn derive(parts: &[&str]) -> String {
    let id = uuid::Uuid::new_v5(&UID_NAMESPACE, parts.join("\n").as_bytes());
    format!("2.25.{}", id.as_u128())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_uids_pass_and_path_tricks_fail() {
        assert_eq!(
            check("1.2.840.10008.5.1.4.1.1.2\0").unwrap(),
            "1.2.840.10008.5.1.4.1.1.2"
        );
        assert!(check("1.2.0.3").is_ok());
        for bad in [
            "",
            "..",
            "1..2",
            ".1.2",
            "1.2.",
            "1.02",
            "1/2",
            "../../etc",
            "1.2.a",
            "1 2",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        assert!(check(&"1.".repeat(32)).is_err());
    }

    #[test]
    fn derived_uids_are_stable_valid_and_distinct() {
        let a = derive(&["model", "3"]);
        assert_eq!(a, derive(&["model", "3"]));
        assert_ne!(a, derive(&["model", "4"]));
        assert!(check(&a).is_ok(), "{a}");
        assert!(a.len() <= 64);
    }
}
