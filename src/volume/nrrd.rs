//! NRRD reader (`.nrrd` with attached data, `.nhdr` with a detached `data file`) into a
//! [`Volume`]. Written in-house: there is no maintained NRRD crate, and the format is a short
//! text header followed by raw or gzip-compressed samples.
//!
//! Supported: 3-D scalar volumes; types (u)int8/16/32/64, float, double; `endian`; encodings
//! `raw` and `gzip`/`gz`; `byte skip` >= 0 and `line skip`; `space` `left-posterior-superior`
//! (LPS) or `right-anterior-superior` (RAS, turned into LPS by negating x and y) with
//! `space directions` and `space origin`; or, without a space, `spacings` (axes taken as the
//! LPS axes, origin 0). The first axis in `sizes` is the fastest, as in [`Volume`].
//! Sizes are checked before any voxel buffer is allocated.

use super::{
    check_dims, decompose_affine, read_at_most, Format, Sample, Volume, VolumeError, VolumeIds,
};
use crate::confine::Opener;
use flate2::read::GzDecoder;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Longest header accepted, in bytes.
const MAX_HEADER: usize = 1 << 20;

/// Errors reading an NRRD file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NrrdError {
    /// The file does not start with the NRRD magic.
    #[error("{path}: not an NRRD file (no NRRD000x magic line)")]
    Magic {
        /// The file.
        path: String,
    },
    /// A header field is missing or unusable.
    #[error("{path}: header field `{field}`: {msg}")]
    Field {
        /// The file.
        path: String,
        /// The field name.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// The data is shorter than the header announces.
    #[error("{path}: truncated data: {got} of {expected} bytes")]
    Truncated {
        /// The file.
        path: String,
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        expected: usize,
    },
    /// Reading or decompression failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
}

/// Reads an NRRD file (`.nrrd` or `.nhdr`), from anywhere (the command line).
pub fn read(path: &Path) -> Result<Volume, VolumeError> {
    let opener = Opener::unconfined();
    let file = opener.open_file(path).map_err(|err| NrrdError::Io {
        path: path.display().to_string(),
        err,
    })?;
    read_file(&opener, path, file)
}

/// Reads an NRRD file from its opened descriptor; a detached `data file:` is opened through
/// `opener` (relative names against the header's folder), so it too must lie in the roots.
pub fn read_file(opener: &Opener, path: &Path, file: std::fs::File) -> Result<Volume, VolumeError> {
    let p = path.display().to_string();
    let io = |err: std::io::Error| NrrdError::Io {
        path: p.clone(),
        err,
    };
    let field = |name: &str, msg: String| NrrdError::Field {
        path: p.clone(),
        field: name.to_string(),
        msg,
    };
    let mut reader = BufReader::new(file);

    // Header: magic line, then "key: value" / "key:=value" / "# comment" lines up to a blank
    // line or the end of the file.
    let mut header_bytes = 0usize;
    let mut line = Vec::new();
    let mut next_line =
        |reader: &mut BufReader<std::fs::File>| -> Result<Option<String>, NrrdError> {
            line.clear();
            let n = reader
                .by_ref()
                .take((MAX_HEADER - header_bytes.min(MAX_HEADER)) as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(io)?;
            header_bytes += n;
            if header_bytes > MAX_HEADER {
                return Err(field("header", format!("longer than {MAX_HEADER} bytes")));
            }
            if n == 0 {
                return Ok(None);
            }
            let s = String::from_utf8_lossy(&line);
            Ok(Some(s.trim_end_matches(['\n', '\r']).to_string()))
        };
    match next_line(&mut reader)? {
        Some(m) if m.starts_with("NRRD000") && m.len() == 8 => {}
        _ => return Err(NrrdError::Magic { path: p.clone() }.into()),
    }
    let mut fields: Vec<(String, String)> = Vec::new();
    while let Some(l) = next_line(&mut reader)? {
        if l.is_empty() {
            break;
        }
        if l.starts_with('#') || l.contains(":=") {
            continue;
        }
        let Some((k, v)) = l.split_once(": ") else {
            return Err(field(
                "header",
                format!("line `{}` is not `field: value`", truncate(&l)),
            )
            .into());
        };
        fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let require = |name: &str| get(name).ok_or_else(|| field(name, "missing".into()));

    let dimension: usize = require("dimension")?.parse().map_err(|_| {
        field(
            "dimension",
            format!("`{}` is not a number", get("dimension").unwrap_or("")),
        )
    })?;
    if dimension != 3 {
        return Err(field(
            "dimension",
            format!("{dimension}: only 3-D scalar volumes are supported"),
        )
        .into());
    }
    let sizes = parse_numbers::<usize>(require("sizes")?).map_err(|m| field("sizes", m))?;
    if sizes.len() != 3 {
        return Err(field("sizes", format!("{sizes:?}: expected 3 sizes")).into());
    }
    let dims = [sizes[0], sizes[1], sizes[2]];
    let count = check_dims(path, "sizes", &dims)?;
    let sample = match require("type")?.to_ascii_lowercase().as_str() {
        "signed char" | "int8" | "int8_t" => Sample::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => Sample::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => {
            Sample::I16
        }
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => Sample::U16,
        "int" | "signed int" | "int32" | "int32_t" => Sample::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => Sample::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => Sample::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => {
            Sample::U64
        }
        "float" => Sample::F32,
        "double" => Sample::F64,
        other => {
            return Err(field("type", format!("`{other}` is not a supported scalar type")).into())
        }
    };
    let big_endian = match get("endian") {
        None if sample.size() == 1 => false,
        None => return Err(field("endian", "missing (needed for multi-byte types)".into()).into()),
        Some("little") => false,
        Some("big") => true,
        Some(other) => {
            return Err(field("endian", format!("`{other}` is neither little nor big")).into())
        }
    };
    let gzip = match require("encoding")?.to_ascii_lowercase().as_str() {
        "raw" => false,
        "gzip" | "gz" => true,
        other => {
            return Err(field(
                "encoding",
                format!("`{other}` is not supported (raw or gzip)"),
            )
            .into())
        }
    };

    // Geometry.
    let (lin, off) = if let Some(space) = get("space") {
        let flip = match space.to_ascii_lowercase().as_str() {
            "left-posterior-superior" | "lps" => false,
            "right-anterior-superior" | "ras" => true,
            other => {
                return Err(field("space", format!("`{other}` is not supported (left-posterior-superior or right-anterior-superior)")).into())
            }
        };
        let dirs = parse_vectors(require("space directions")?)
            .map_err(|m| field("space directions", m))?;
        if dirs.len() != 3 || dirs.iter().any(|d| d.len() != 3) {
            return Err(field("space directions", "expected three 3-vectors".into()).into());
        }
        let origin = match get("space origin") {
            Some(o) => {
                let v = parse_vectors(o).map_err(|m| field("space origin", m))?;
                if v.len() != 1 || v[0].len() != 3 {
                    return Err(field("space origin", "expected one 3-vector".into()).into());
                }
                [v[0][0], v[0][1], v[0][2]]
            }
            None => [0.0; 3],
        };
        let sign = |r: usize| if flip && r < 2 { -1.0 } else { 1.0 };
        let mut lin = [[0.0; 3]; 3];
        for (c, d) in dirs.iter().enumerate() {
            for r in 0..3 {
                lin[r][c] = d[r] * sign(r);
            }
        }
        (lin, [origin[0] * sign(0), origin[1] * sign(1), origin[2]])
    } else if let Some(s) = get("spacings") {
        let s = parse_numbers::<f64>(s).map_err(|m| field("spacings", m))?;
        if s.len() != 3 {
            return Err(field("spacings", format!("{s:?}: expected 3 spacings")).into());
        }
        if let Some(bad) = s.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(field(
                "spacings",
                format!("{bad}: spacing must be finite and > 0 mm"),
            )
            .into());
        }
        (
            [[s[0], 0.0, 0.0], [0.0, s[1], 0.0], [0.0, 0.0, s[2]]],
            [0.0; 3],
        )
    } else {
        return Err(field(
            "space",
            "missing: need `space` + `space directions`, or `spacings`".into(),
        )
        .into());
    };
    if lin
        .iter()
        .flatten()
        .chain(off.iter())
        .any(|v| !v.is_finite())
    {
        return Err(field("space directions", "not finite".into()).into());
    }
    let (spacing, direction, origin) = decompose_affine(path, "space directions", lin, off)?;

    // Data: attached (after the blank line) or in a detached file.
    let line_skip: usize = match get("line skip").or(get("lineskip")) {
        Some(v) => v
            .parse()
            .map_err(|_| field("line skip", format!("`{v}` is not a number >= 0")))?,
        None => 0,
    };
    let byte_skip: u64 = match get("byte skip").or(get("byteskip")) {
        Some(v) => v.parse().map_err(|_| {
            field(
                "byte skip",
                format!("`{v}` is not supported (a number >= 0)"),
            )
        })?,
        None => 0,
    };
    let nbytes = count * sample.size();
    let mut data: Box<dyn BufRead> = match get("data file").or(get("datafile")) {
        None => Box::new(reader),
        Some(name) if name.starts_with("LIST") || name.contains('%') => {
            return Err(field("data file", "lists of data files are not supported".into()).into())
        }
        Some(name) => {
            let dp = path.parent().unwrap_or(Path::new(".")).join(name);
            let f = opener.open_file(&dp).map_err(|err| NrrdError::Io {
                path: format!("{} (data file of {p})", dp.display()),
                err,
            })?;
            Box::new(BufReader::new(f))
        }
    };
    for _ in 0..line_skip {
        let mut skipped = Vec::new();
        data.by_ref()
            .take(MAX_HEADER as u64)
            .read_until(b'\n', &mut skipped)
            .map_err(io)?;
    }
    let raw = if gzip {
        let mut dec = GzDecoder::new(data);
        let mut skip_sink = std::io::sink();
        std::io::copy(&mut dec.by_ref().take(byte_skip), &mut skip_sink).map_err(io)?;
        read_at_most(&mut dec, nbytes).map_err(io)?
    } else {
        std::io::copy(&mut data.by_ref().take(byte_skip), &mut std::io::sink()).map_err(io)?;
        read_at_most(&mut data, nbytes).map_err(io)?
    };
    if raw.len() != nbytes {
        return Err(NrrdError::Truncated {
            path: p.clone(),
            got: raw.len(),
            expected: nbytes,
        }
        .into());
    }
    let voxels = sample.decode(&raw, big_endian, 1.0, 0.0);
    drop(raw);
    Volume::new(
        dims,
        voxels,
        spacing,
        origin,
        direction,
        VolumeIds::file(path, Format::Nrrd),
    )
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

fn parse_numbers<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, String> {
    s.split_whitespace()
        .map(|t| {
            t.parse::<T>()
                .map_err(|_| format!("`{}` is not a valid number", truncate(t)))
        })
        .collect()
}

/// Parses "(a,b,c) (d,e,f)" into vectors (spaces inside the brackets allowed); `none`
/// entries are refused.
fn parse_vectors(s: &str) -> Result<Vec<Vec<f64>>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        if rest.starts_with("none") {
            return Err("`none` axes are not supported (expected a 3-D spatial volume)".into());
        }
        let inner = rest
            .strip_prefix('(')
            .and_then(|t| t.split_once(')'))
            .ok_or_else(|| format!("`{}` is not a vector like (1,0,0)", truncate(rest)))?;
        let v = inner
            .0
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("`{}` is not a valid number", truncate(x)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(v);
        rest = inner.1.trim_start();
    }
    Ok(out)
}
