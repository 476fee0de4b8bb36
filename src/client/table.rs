//! The one table style of every command that prints a table (`dlq list`, `nodes`,
//! `inspect queues|active|stats`, …), drawn by comfy-table: headers in upper case (the JSON
//! field names of the `--json` output: `IN_FLIGHT`, `DEAD_LETTERED`), no borders, columns two
//! spaces apart, a column of numbers aligned to the right, no trailing spaces.
//!
//! The style lives here and nowhere else: a command gives its column names as its JSON
//! names and its cells as text.

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ContentArrangement, Table};

/// Spaces between two columns.
const GAP: u16 = 2;

/// The table of `rows` under `columns` (JSON field names, shown in upper case), ending with
/// a newline. A row shorter than the header is padded with empty cells.
pub fn render<S: AsRef<str>>(columns: &[&str], rows: &[Vec<S>]) -> String {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(columns.iter().map(|name| name.to_uppercase()));
    for row in rows {
        table.add_row(row.iter().map(|cell| cell.as_ref().to_string()));
    }
    for (index, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, GAP));
        let numeric = !rows.is_empty()
            && rows.iter().all(|row| {
                row.get(index)
                    .is_some_and(|cell| cell.as_ref().parse::<f64>().is_ok())
            });
        if numeric {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    for line in table.lines() {
        // The preset draws its borders as spaces: the left one goes, and trailing padding.
        let line = line.strip_prefix(' ').unwrap_or(&line);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn headers_are_upper_case_numbers_right_aligned_and_no_borders() {
        let table = render(
            &["queue", "in_flight", "task"],
            &[
                vec!["chat", "12", "process_chat_message"],
                vec!["background", "3", "x"],
            ],
        );
        assert_eq!(
            table,
            "QUEUE       IN_FLIGHT  TASK\n\
             chat               12  process_chat_message\n\
             background          3  x\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let rows: &[Vec<String>] = &[];
        assert_eq!(render(&["node", "queues"], rows), "NODE  QUEUES\n");
    }
}
