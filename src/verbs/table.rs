//! The list verbs' tables, as fleetctl printed them: a header of upper-cased
//! field names, then rows whose cells are separated by tab characters and
//! padded with tabs to a common column width (Go's tabwriter with minwidth
//! 0, tabwidth 8, padding 1 and padchar '\t'), so `cut`/`awk` scripts written
//! against fleetctl keep working; `-` stands for an empty cell.

use std::fmt::Write as _;

use super::Usage;

/// The tab stops the terminal is assumed to have.
const TAB_WIDTH: usize = 8;

/// Parses `--fields` against the fields a verb offers, keeping the order
/// given; `default` when the flag is absent.
pub fn fields<'a>(
    verb: &str,
    given: Option<&str>,
    offered: &[&'a str],
    default: &[&'a str],
) -> Result<Vec<&'a str>, Usage> {
    let Some(given) = given else {
        return Ok(default.to_vec());
    };
    let mut chosen = Vec::new();
    for field in given.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let known = offered
            .iter()
            .find(|o| o.eq_ignore_ascii_case(field))
            .ok_or_else(|| {
                Usage(format!(
                    "{verb} has no field {field:?}; choose from: {}",
                    offered.join(",")
                ))
            })?;
        chosen.push(*known);
    }
    if chosen.is_empty() {
        return Err(Usage(format!(
            "--fields names no field; choose from: {}",
            offered.join(",")
        )));
    }
    Ok(chosen)
}

/// Renders rows (one cell per field) under a header, fleetctl's way.
pub fn render(fields: &[&str], rows: &[Vec<String>], legend: bool) -> String {
    let mut lines: Vec<Vec<String>> = Vec::new();
    if legend {
        lines.push(fields.iter().map(|f| f.to_uppercase()).collect());
    }
    lines.extend(rows.iter().map(|row| {
        row.iter()
            .map(|cell| {
                if cell.is_empty() {
                    "-".to_string()
                } else {
                    cell.clone()
                }
            })
            .collect()
    }));
    let columns = fields.len();
    // Every column but the last is padded; the last ends the line.
    let widths: Vec<usize> = (0..columns.saturating_sub(1))
        .map(|c| {
            let widest = lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0);
            (widest + 1).div_ceil(TAB_WIDTH) * TAB_WIDTH
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        for (c, cell) in line.iter().enumerate() {
            out.push_str(cell);
            if let Some(width) = widths.get(c) {
                let gap = width - cell.chars().count();
                let tabs = gap.div_ceil(TAB_WIDTH);
                out.extend(std::iter::repeat_n('\t', tabs));
            }
        }
        writeln!(out).expect("writing to a String cannot fail");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_tab_aligned_like_gos_tabwriter() {
        let rows = vec![
            vec![
                "hello.service".to_string(),
                "1a2b3c4d.../10.0.0.1".to_string(),
                "active".to_string(),
            ],
            vec!["a.service".to_string(), String::new(), "x".to_string()],
        ];
        let text = render(&["unit", "machine", "active"], &rows, true);
        assert_eq!(
            text,
            "UNIT\t\tMACHINE\t\t\tACTIVE\n\
             hello.service\t1a2b3c4d.../10.0.0.1\tactive\n\
             a.service\t-\t\t\tx\n"
        );
        let bare = render(&["unit"], &[vec!["a".to_string()]], false);
        assert_eq!(bare, "a\n");
    }

    #[test]
    fn fields_are_checked_and_keep_their_order() {
        let offered = ["unit", "hash", "dstate"];
        assert_eq!(
            fields(
                "list-unit-files",
                Some("dstate,UNIT"),
                &offered,
                &offered[..1]
            )
            .unwrap(),
            ["dstate", "unit"]
        );
        assert_eq!(
            fields("x", None, &offered, &offered[..2]).unwrap(),
            ["unit", "hash"]
        );
        let err = fields("list-unit-files", Some("unit,bogus"), &offered, &offered).unwrap_err();
        assert!(
            err.0
                .contains("no field \"bogus\"; choose from: unit,hash,dstate"),
            "{}",
            err.0
        );
        assert!(fields("x", Some(","), &offered, &offered).is_err());
    }
}
