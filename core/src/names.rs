//! Workspace names: generated prebuild names and the validation every workspace name (a claim's
//! requested name included) must pass.

use data_encoding::BASE32_NOPAD;

/// Maximum length of a workspace name.
pub const MAX_WORKSPACE_NAME_LEN: usize = 32;

/// The name of a new prebuild: `prebuild-` + the 9 random bytes as 15 lowercase, unpadded base32
/// characters (72 bits, so collisions within one owner are not a practical concern; the unique
/// index still has the last word). The result always passes [`validate_workspace_name`].
pub fn prebuild_name(random: [u8; 9]) -> String {
    let mut name = String::with_capacity(24);
    name.push_str("prebuild-");
    name.push_str(&BASE32_NOPAD.encode(&random).to_ascii_lowercase());
    name
}

/// Why a workspace name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("workspace name must not be empty")]
    Empty,
    #[error(
        "workspace name is {len} characters long; at most {MAX_WORKSPACE_NAME_LEN} are allowed"
    )]
    TooLong { len: usize },
    #[error(
        "workspace name contains {ch:?} at position {position}; \
         only letters a-z, A-Z, digits and single inner hyphens are allowed"
    )]
    InvalidChar { ch: char, position: usize },
    #[error("workspace name must start and end with a letter or digit, not a hyphen")]
    EdgeHyphen,
    #[error("workspace name must not contain consecutive hyphens (at position {position})")]
    DoubleHyphen { position: usize },
}

/// Checks `^[a-zA-Z0-9](-?[a-zA-Z0-9])*$` with 1..=32 characters (Coder's name rule).
///
/// 1. Not empty, at most 32 characters.
/// 2. Only ASCII letters, digits and `-`.
/// 3. No hyphen at either end, no two hyphens in a row.
///
/// Positions in errors are 1-based character positions.
pub fn validate_workspace_name(name: &str) -> Result<(), NameError> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameError::Empty);
    }
    if len > MAX_WORKSPACE_NAME_LEN {
        return Err(NameError::TooLong { len });
    }
    let mut previous_hyphen = false;
    for (i, ch) in name.chars().enumerate() {
        let position = i + 1;
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' => previous_hyphen = false,
            '-' if position == 1 || position == len => return Err(NameError::EdgeHyphen),
            '-' if previous_hyphen => return Err(NameError::DoubleHyphen { position }),
            '-' => previous_hyphen = true,
            _ => return Err(NameError::InvalidChar { ch, position }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prebuild_names_have_the_documented_shape() {
        assert_eq!(prebuild_name([0; 9]), "prebuild-aaaaaaaaaaaaaaa");
        assert_eq!(prebuild_name([0xff; 9]), "prebuild-77777777777777y");
        let name = prebuild_name([1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(name, "prebuild-aebagbafaydqqci");
        let suffix = name.strip_prefix("prebuild-").unwrap();
        assert_eq!(suffix.len(), 15);
        assert!(suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)));
        assert_eq!(validate_workspace_name(&name), Ok(()));
    }

    #[test]
    fn workspace_names() {
        for ok in [
            "a",
            "A1",
            "my-workspace",
            "a-b-c",
            "x".repeat(32).as_str(),
            "prebuild-abc",
        ] {
            assert_eq!(validate_workspace_name(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("", NameError::Empty),
            (&*"x".repeat(33), NameError::TooLong { len: 33 }),
            ("-a", NameError::EdgeHyphen),
            ("a-", NameError::EdgeHyphen),
            ("-", NameError::EdgeHyphen),
            ("a--b", NameError::DoubleHyphen { position: 3 }),
            (
                "a_b",
                NameError::InvalidChar {
                    ch: '_',
                    position: 2,
                },
            ),
            (
                "a b",
                NameError::InvalidChar {
                    ch: ' ',
                    position: 2,
                },
            ),
            (
                "café",
                NameError::InvalidChar {
                    ch: 'é',
                    position: 4,
                },
            ),
        ];
        for (name, want) in cases {
            assert_eq!(validate_workspace_name(name), Err(want), "{name:?}");
        }
        assert_eq!(
            NameError::InvalidChar { ch: '_', position: 2 }.to_string(),
            "workspace name contains '_' at position 2; only letters a-z, A-Z, digits and single inner hyphens are allowed"
        );
    }
}
