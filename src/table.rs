//! The project's one CSV reader and writer, on the `csv` crate: manifests, score files and
//! LIDC ratings are read into a [`Table`]; `result.csv`, eval's `scores.csv` and synth's
//! `manifest.csv` are written by [`write`].
//!
//! Reading: RFC 4180 (quoted commas, quoted line breaks, `""` for a quote), `\n` or `\r\n`
//! line ends, a leading UTF-8 BOM dropped, blank lines skipped, every row as long as the
//! header (else an error naming the line), fields kept as written (callers trim with
//! [`Table::get`]). The `csv` crate reads an unclosed quote as a field running to the end
//! of the file; that would swallow every later row silently, so a last record with an odd
//! number of `"` is refused as an unterminated quoted field. Errors name the file, the
//! 1-based line a record starts on and, for a field, its column. The file is read into
//! memory, so [`Table::read`] refuses files over [`MAX_TABLE_BYTES`].
//!
//! Writing: fields quoted only where needed (a comma, quote or line break), `\n` line ends,
//! to a temporary name renamed into place, so a reader never sees half a file.

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
        Self::parse_bytes(path, &bytes)
    }

    /// Parses CSV `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Table, TableError> {
        Self::parse_bytes(path, text.as_bytes())
    }

    /// Parses CSV `bytes` (UTF-8), naming `path` in errors.
    pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Table, TableError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let malformed = |line: u64, message: String| TableError::Malformed {
            path: path.to_path_buf(),
            line: line as usize,
            message,
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(bytes);
        let mut records = Vec::new();
        let (mut last_start, mut counted, mut lines_before) = (0, 0, 0);
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(1, |p| p.line());
                match e.into_kind() {
                    csv::ErrorKind::Utf8 { err, .. } => {
                        malformed(line, format!("not UTF-8 text ({err})"))
                    }
                    other => malformed(line, format!("{other:?}")),
                }
            })?;
            let pos = record
                .position()
                .expect("records read from bytes have positions");
            // The record's line, counted here: after a `\r\n` the crate's own line count
            // (and byte offset) can still point at the `\n` that ended the previous record.
            let mut start = (pos.byte() as usize).min(bytes.len());
            while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
                start += 1;
            }
            lines_before += bytes[counted..start]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            counted = start;
            last_start = start;
            if record.len() == 1 && record[0].trim().is_empty() {
                continue;
            }
            records.push((1 + lines_before, record));
        }
        let tail = &bytes[last_start.min(bytes.len())..];
        if tail.iter().filter(|&&b| b == b'"').count() % 2 == 1 {
            let line = 1 + bytes[..last_start].iter().filter(|&&b| b == b'\n').count();
            return Err(malformed(line as u64, "unterminated quoted field".into()));
        }
        let mut records = records.into_iter();
        let (_, header) = records
            .next()
            .ok_or_else(|| malformed(1, "empty file (expected a header row)".into()))?;
        let header: Vec<String> = header.iter().map(|h| h.trim().to_string()).collect();
        let mut rows = Vec::new();
        let mut lines = Vec::new();
        for (line, record) in records {
            if record.len() != header.len() {
                return Err(malformed(
                    line as u64,
                    format!("{} fields, header has {}", record.len(), header.len()),
                ));
            }
            rows.push(record.iter().map(str::to_string).collect());
            lines.push(line);
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            rows,
            lines,
        })
    }

    /// Index of column `name` compared without case (`coordX` = `coordx`), if present.
    pub fn find_ignore_case(&self, name: &str) -> Option<usize> {
        self.header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
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

/// Errors writing a table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The file could not be written or renamed into place.
    #[error("{path}: cannot write: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A row is not as long as the header.
    #[error("{path}: row {row} has {len} fields, header has {header}")]
    Ragged {
        /// The file.
        path: PathBuf,
        /// 1-based row (after the header).
        row: usize,
        /// Its fields.
        len: usize,
        /// Header fields.
        header: usize,
    },
}

/// Writes `header` and `rows` to `path` as CSV (see the module doc: quoted where needed,
/// `\n`, atomic through `<path>.tmp`).
pub fn write<S: AsRef<str>>(
    path: &Path,
    header: &[S],
    rows: &[Vec<String>],
) -> Result<(), WriteError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| WriteError::Io { path: p, source }
    };
    let mut w = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Necessary)
        .from_writer(Vec::new());
    let as_io = |e: csv::Error| std::io::Error::other(e.to_string());
    w.write_record(header.iter().map(AsRef::as_ref))
        .map_err(as_io)
        .map_err(io(path))?;
    for (i, row) in rows.iter().enumerate() {
        if row.len() != header.len() {
            return Err(WriteError::Ragged {
                path: path.to_path_buf(),
                row: i + 1,
                len: row.len(),
                header: header.len(),
            });
        }
        w.write_record(row).map_err(as_io).map_err(io(path))?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))
        .map_err(io(path))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
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

    /// The edge cases: quoted commas, a quoted line break, a BOM, CRLF, a blank
    /// line give the same rows; a short row, an unclosed quote, invalid UTF-8 one error
    /// naming file and line.
    #[test]
    fn edge_cases_give_the_same_rows_or_one_error() {
        let p = Path::new("m.csv");
        let plain = Table::parse(p, "pid,note\nP1,a b\nP2,c\n").unwrap();
        for text in [
            "\u{feff}pid,note\r\nP1,a b\r\nP2,c\r\n",
            "pid,note\n\nP1,\"a b\"\nP2,c",
            "\"pid\",\"note\"\nP1,a b\n\nP2,\"c\"\n",
        ] {
            let t = Table::parse(p, text).unwrap();
            assert_eq!(
                (&t.header, &t.rows),
                (&plain.header, &plain.rows),
                "{text:?}"
            );
        }
        let t = Table::parse(p, "pid,note\nP1,\"x, \"\"y\"\"\r\nz\"\nP2,c\n").unwrap();
        assert_eq!(t.rows, [["P1", "x, \"y\"\r\nz"], ["P2", "c"]]);
        assert_eq!(t.lines, [2, 4]);
        let err = |text: &[u8]| Table::parse_bytes(p, text).unwrap_err().to_string();
        assert_eq!(
            err(b"pid,note\nP1,a\nP2\n"),
            "m.csv: line 3: 1 fields, header has 2"
        );
        assert_eq!(
            err(b"pid,note\nP1,a\nP2,\"c\nP3,d\n"),
            "m.csv: line 3: unterminated quoted field"
        );
        assert!(err(b"pid,note\nP1,\xff\n").starts_with("m.csv: line 2: not UTF-8"));
    }

    /// Written tables read back as written; quoting only where needed.
    #[test]
    fn written_tables_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let rows = vec![
            vec!["P1".to_string(), "a, \"b\"\nc".to_string()],
            vec!["P2".to_string(), "0.5".to_string()],
        ];
        write(&path, &["pid", "note"], &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "pid,note\nP1,\"a, \"\"b\"\"\nc\"\nP2,0.5\n");
        assert_eq!(Table::read(&path).unwrap().rows, rows);
        assert!(!dir.path().join("t.csv.tmp").exists());
    }
}
