//! Output for people (aligned tables) and for scripts (`--json`: an array of objects whose keys are
//! the column names in snake case).

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// Prints `rows` as a JSON array.
pub fn print_json<T: Serialize>(rows: &[T]) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(rows)?);
    Ok(())
}

/// Renders an aligned table: upper-case headers, two spaces between columns, no trailing blanks.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = String>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            text.push_str(&cell);
            text.extend(std::iter::repeat_n(' ', pad));
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &mut headers.iter().map(|h| h.to_uppercase()));
    for row in rows {
        line(&mut out, &mut row.iter().cloned());
    }
    out
}

/// Prints a table, or `empty` when there are no rows.
pub fn print_table(headers: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        println!("{empty}");
    } else {
        print!("{}", render_table(headers, rows));
    }
}

/// Prints `rows` for `--json` as a JSON array, otherwise as a table of each row's `cells` (or
/// `empty` when there are none), so every listing picks between its two forms the same way.
pub fn print_rows<T: Serialize>(
    rows: &[T],
    json: bool,
    headers: &[&str],
    empty: &str,
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if json {
        return print_json(rows);
    }
    let table: Vec<Vec<String>> = rows.iter().map(cells).collect();
    print_table(headers, &table, empty);
    Ok(())
}

/// A timestamp for tables: RFC 3339, UTC, whole seconds.
pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An optional timestamp for tables (`-` when absent).
pub fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "-".to_owned())
}

/// An optional text for tables (`-` when absent or empty).
pub fn opt_text(t: Option<&str>) -> String {
    match t {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".to_owned(),
    }
}

pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let table = render_table(
            &["name", "count"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "22".into()],
            ],
        );
        assert_eq!(table, "NAME    COUNT\na       1\nlonger  22\n");
    }
}
