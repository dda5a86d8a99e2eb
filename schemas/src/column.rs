//! Text columns parsed into typed values at the row boundary: `row.get::<_, Parsed<Transition>>`
//! instead of a `String` compared with `"start"` somewhere deeper. A value the type does not
//! know (a schema newer than this code, or a CHECK constraint this code forgot) is a conversion
//! error of the read — `try_get` returns it, `get` panics with it — never a silent default.

use std::{error::Error, fmt::Display, str::FromStr};

use tokio_postgres::types::{FromSql, Type};

/// A text column parsed with `T`'s [`FromStr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<T>(pub T);

impl<T> Parsed<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<'a, T> FromSql<'a> for Parsed<T>
where
    T: FromStr,
    T::Err: Display,
{
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let text = <&str as FromSql>::from_sql(ty, raw)?;
        text.parse()
            .map(Parsed)
            .map_err(|e: T::Err| format!("column value {text:?}: {e}").into())
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}
