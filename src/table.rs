//! A small CSV reader for the project's tables (manifests, score files, LIDC ratings):
//! a header row plus rows of text fields, RFC 4180 quoting (`"a,b"`, `""` for a quote),
//! `\n` or `\r\n` line ends. Written in-house to avoid a dependency for this one format;
//! everything is read into memory, so callers bound the file size first
//! ([`Table::read`] refuses files over [`MAX_TABLE_BYTES`]).

use std::path::{Path, PathBuf};

/// Largest table file read (256 MiB): far above any manifest, below memory trouble.
pub const MAX_TABLE_BYTES: u64 = 256 << 20;

/// Errors reading a table. Every message starts with the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_TABLE_BYTES`].
    #[error("{path}: {size} bytes is over the {MAX_TABLE_BYTES}-byte limit for a table")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The file is not UTF-8, is empty, or is malformed.
    #[error("{path}: line {line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A required column is absent from the header.
    #[error("{path}: missing column `{column}` (header: {header})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column looked for.
        column: String,
        /// The header as read, comma-joined.
        header: String,
    },
    /// A field could not be parsed.
    #[error("{path}: line {line}, column `{column}`: {message}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The column.
        column: String,
        /// What is wrong, quoting the value.
        message: String,
    },
}

/// A parsed table: header plus rows, each as long as the header.
#[derive(Debug, Clone)]
pub struct Table {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// Column names, trimmed.
    pub header: Vec<String>,
    /// Rows of fields; `lines[i]` is the 1-based file line of `rows[i]`.
    pub rows: Vec<Vec<String>>,
    /// File line of each row.
    pub lines: Vec<usize>,
}

impl Table {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Table, TableError> {
        let io = |source| TableError::Io {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_TABLE_BYTES {
            return Err(TableError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let text = String::from_utf8(bytes).map_err(|e| TableError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            message: format!("not UTF-8 text ({e})"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses CSV `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Table, TableError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let records = split_records(path, text)?;
        let mut records = records
            .into_iter()
            .filter(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()));
        let (_, header) = records.next().ok_or_else(|| TableError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            message: "empty file (expected a header row)".into(),
        })?;
        let header: Vec<String> = header.into_iter().map(|h| h.trim().to_string()).collect();
        let mut rows = Vec::new();
        let mut lines = Vec::new();
        for (line, record) in records {
            if record.len() != header.len() {
                return Err(TableError::Malformed {
                    path: path.to_path_buf(),
                    line,
                    message: format!("{} fields, header has {}", record.len(), header.len()),
                });
            }
            rows.push(record);
            lines.push(line);
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            rows,
            lines,
        })
    }

    /// Index of column `name`, if present.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// Index of column `name`, or a [`TableError::MissingColumn`].
    pub fn column(&self, name: &str) -> Result<usize, TableError> {
        self.find(name).ok_or_else(|| TableError::MissingColumn {
            path: self.path.clone(),
            column: name.to_string(),
            header: self.header.join(","),
        })
    }

    /// A [`TableError::BadField`] for row `row`, column index `col`.
    pub fn bad(&self, row: usize, col: usize, message: impl Into<String>) -> TableError {
        TableError::BadField {
            path: self.path.clone(),
            line: self.lines[row],
            column: self.header[col].clone(),
            message: message.into(),
        }
    }

    /// The trimmed field at (`row`, `col`).
    pub fn get(&self, row: usize, col: usize) -> &str {
        self.rows[row][col].trim()
    }

    /// The field at (`row`, `col`) as a finite f64.
    pub fn f64(&self, row: usize, col: usize) -> Result<f64, TableError> {
        let v = self.get(row, col);
        match v.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(self.bad(row, col, format!("`{v}` is not a finite number"))),
        }
    }

    /// The field as a finite f64, or None when empty / `nan` / `NA`.
    pub fn opt_f64(&self, row: usize, col: usize) -> Result<Option<f64>, TableError> {
        if is_missing(self.get(row, col)) {
            Ok(None)
        } else {
            self.f64(row, col).map(Some)
        }
    }
}

/// True for the spellings of a missing value: empty, `nan`, `NA`, `None`, `null` (any case).
pub fn is_missing(v: &str) -> bool {
    let v = v.trim();
    v.is_empty()
        || ["nan", "na", "none", "null"]
            .iter()
            .any(|m| v.eq_ignore_ascii_case(m))
}

/// Splits text into records (with their 1-based starting line), honouring quotes.
fn split_records(path: &Path, text: &str) -> Result<Vec<(usize, Vec<String>)>, TableError> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut line = 1;
    let mut start_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.trim().is_empty() => {
                field.clear();
                in_quotes = true;
            }
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut record)));
                line += 1;
                start_line = line;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(TableError::Malformed {
            path: path.to_path_buf(),
            line: start_line,
            message: "unterminated quoted field".into(),
        });
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((start_line, record));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quotes_crlf_and_reports_ragged_rows() {
        let p = Path::new("t.csv");
        let t = Table::parse(p, "a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\r\n1,2\n").unwrap();
        assert_eq!(t.header, ["a", "b"]);
        assert_eq!(t.rows[0], ["x, y", "say \"hi\""]);
        assert_eq!(t.lines, [2, 3]);
        let err = Table::parse(p, "a,b\n1\n").unwrap_err().to_string();
        assert_eq!(err, "t.csv: line 2: 1 fields, header has 2");
        assert!(Table::parse(p, "").is_err());
        assert!(Table::parse(p, "a\n\"open\n").is_err());
    }
}
