//! Zero-shot descriptor prompts: for each semantic feature, its class words and one prompt
//! per class ("This nodule margin is smooth.", "There is necrosis." / "No findings.").
//! Read from a model folder's `prompts.json` when present, else the set built into the crate
//! (`prompts.json` beside this file, the paper's templates). Feature order is kept as written.

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// The built-in prompt set.
pub const BUILTIN_PROMPTS: &str = include_str!("prompts.json");

/// One semantic feature.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    /// Class words, as written in the prompts ("smooth", "ill-defined", "present", ...).
    pub classes: Vec<String>,
    /// One prompt per class, same order.
    pub prompts: Vec<String>,
}

/// Every feature, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroShotSpec {
    /// (feature name, feature).
    pub features: Vec<(String, Feature)>,
}

impl ZeroShotSpec {
    /// Parses `{feature: {"classes": [...], "prompts": [...]}, ...}`, checking that each
    /// feature has as many prompts as classes, and at least one.
    pub fn parse(json: &str) -> Result<Self, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        let features = de
            .deserialize_map(OrderedFeatures)
            .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        if features.is_empty() {
            return Err("no features".into());
        }
        for (name, f) in &features {
            if f.classes.is_empty() || f.classes.len() != f.prompts.len() {
                return Err(format!(
                    "feature `{name}`: {} classes but {} prompts",
                    f.classes.len(),
                    f.prompts.len()
                ));
            }
            if let Some(c) = f
                .classes
                .iter()
                .enumerate()
                .find(|(i, c)| f.classes[..*i].contains(c))
                .map(|(_, c)| c)
            {
                return Err(format!("feature `{name}`: class `{c}` appears twice"));
            }
        }
        Ok(Self { features })
    }

    /// The built-in set.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_PROMPTS).expect("built-in prompts.json is valid")
    }

    /// Every prompt, features in order.
    pub fn prompts(&self) -> Vec<&str> {
        self.features
            .iter()
            .flat_map(|(_, f)| f.prompts.iter().map(String::as_str))
            .collect()
    }
}

struct OrderedFeatures;

impl<'de> Visitor<'de> for OrderedFeatures {
    type Value = Vec<(String, Feature)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object of features")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(String, Feature)> = Vec::new();
        while let Some((name, feature)) = map.next_entry::<String, Feature>()? {
            if out.iter().any(|(n, _)| *n == name) {
                return Err(serde::de::Error::custom(format!(
                    "feature `{name}` appears twice"
                )));
            }
            out.push((name, feature));
        }
        Ok(out)
    }
}
