//! Key templates: where an object goes inside a store (README, "Storage", gives the defaults).
//!
//! A template is text with `{field}` placeholders: `{service}`, `{yyyy}`, `{mm}`, `{dd}`, `{HH}`
//! (UTC), `{instance}`, `{seq}` (six digits at least), `{trace_id}`, `{direction}`
//! (`request`/`response`), `{kind}` (`inputs`/`predictions`).

use std::time::SystemTime;

/// The default key of trace batches.
pub const DEFAULT_TRACE_TEMPLATE: &str =
    "traces/{service}/{yyyy}/{mm}/{dd}/{HH}/{instance}-{seq}.jsonl";
/// The default key of spilled bodies.
pub const DEFAULT_BODY_TEMPLATE: &str = "bodies/{service}/{yyyy}/{mm}/{dd}/{trace_id}/{direction}";

/// One placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyField {
    Service,
    Year,
    Month,
    Day,
    Hour,
    Instance,
    Sequence,
    TraceId,
    Direction,
    Kind,
}

impl KeyField {
    const ALL: [(&'static str, KeyField); 10] = [
        ("service", KeyField::Service),
        ("yyyy", KeyField::Year),
        ("mm", KeyField::Month),
        ("dd", KeyField::Day),
        ("HH", KeyField::Hour),
        ("instance", KeyField::Instance),
        ("seq", KeyField::Sequence),
        ("trace_id", KeyField::TraceId),
        ("direction", KeyField::Direction),
        ("kind", KeyField::Kind),
    ];

    fn name(self) -> &'static str {
        KeyField::ALL
            .iter()
            .find(|(_, field)| *field == self)
            .map_or("", |(name, _)| name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(KeyField),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    text: String,
    parts: Vec<Part>,
}

/// What a template is rendered with. Fields a template does not use may be left empty.
#[derive(Debug, Clone, Default)]
pub struct KeyValues<'a> {
    pub service: &'a str,
    pub instance: &'a str,
    pub sequence: u64,
    pub trace_id: &'a str,
    pub direction: &'a str,
    pub kind: &'a str,
    /// `yyyy`, `mm`, `dd`, `HH` of the object's time, UTC.
    pub date: DateParts,
}

/// The UTC date parts of one instant: what key templates name `{yyyy}`, `{mm}`, `{dd}`, `{HH}`.
/// Plain numbers, so taking them for every record allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DateParts {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
}

impl DateParts {
    pub fn of(time: SystemTime) -> Self {
        let seconds = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let (year, month, day) = civil_from_days(seconds / 86_400);
        Self {
            year,
            month,
            day,
            hour: (seconds % 86_400 / 3_600) as u32,
        }
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01: the
/// `civil_from_days` algorithm of Howard Hinnant's "chrono-Compatible Low-Level Date
/// Algorithms", for days on or after the epoch.
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let shifted = days + 719_468; // days since 0000-03-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (
        u32::try_from(year).unwrap_or(u32::MAX),
        month as u32,
        day as u32,
    )
}

/// Appends `value` zero-padded to `width` digits.
fn push_padded(key: &mut String, value: u32, width: usize) {
    use std::fmt::Write;
    let _ = write!(key, "{value:0width$}");
}

impl KeyTemplate {
    /// Parses a template; every field in `required` must appear (they keep keys unique).
    pub fn parse(text: &str, required: &[KeyField]) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("unclosed '{{' in key template '{text}'"));
            };
            let name = &rest[open + 1..open + close];
            let Some((_, field)) = KeyField::ALL.iter().find(|(known, _)| *known == name) else {
                let known: Vec<&str> = KeyField::ALL.iter().map(|(known, _)| *known).collect();
                return Err(format!(
                    "unknown field '{{{name}}}' in key template '{text}'; expected one of {}",
                    known.join(", ")
                ));
            };
            parts.push(Part::Field(*field));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        for field in required {
            if !parts.contains(&Part::Field(*field)) {
                return Err(format!(
                    "key template '{text}' must contain {{{}}} (keys must stay unique)",
                    field.name()
                ));
            }
        }
        if text.starts_with('/') || text.split('/').any(|segment| segment == "..") {
            return Err(format!(
                "key template '{text}' must be relative, without '..' segments"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            parts,
        })
    }

    /// The template as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key for these values.
    pub fn render(&self, values: &KeyValues<'_>) -> String {
        let mut key = String::with_capacity(self.text.len() + 48);
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Field(field) => match field {
                    KeyField::Service => key.push_str(values.service),
                    KeyField::Year => push_padded(&mut key, values.date.year, 4),
                    KeyField::Month => push_padded(&mut key, values.date.month, 2),
                    KeyField::Day => push_padded(&mut key, values.date.day, 2),
                    KeyField::Hour => push_padded(&mut key, values.date.hour, 2),
                    KeyField::Instance => key.push_str(values.instance),
                    KeyField::Sequence => {
                        use std::fmt::Write;
                        let _ = write!(key, "{:06}", values.sequence);
                    }
                    KeyField::TraceId => key.push_str(values.trace_id),
                    KeyField::Direction => key.push_str(values.direction),
                    KeyField::Kind => key.push_str(values.kind),
                },
            }
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_templates_render_the_shared_layout() {
        let traces = KeyTemplate::parse(DEFAULT_TRACE_TEMPLATE, &[KeyField::Sequence])
            .expect("default trace template");
        let date =
            DateParts::of(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_454_445));
        let values = KeyValues {
            service: "scoring",
            instance: "pod-a",
            sequence: 7,
            date,
            ..KeyValues::default()
        };
        assert_eq!(
            traces.render(&values),
            "traces/scoring/2026/11/23/17/pod-a-000007.jsonl"
        );
        let bodies = KeyTemplate::parse(DEFAULT_BODY_TEMPLATE, &[KeyField::TraceId])
            .expect("default body template");
        let values = KeyValues {
            trace_id: "0190-x",
            direction: "request",
            ..values
        };
        assert_eq!(
            bodies.render(&values),
            "bodies/scoring/2026/11/23/0190-x/request"
        );
    }

    #[test]
    fn date_parts_agree_with_rfc3339_from_1970_past_2400() {
        // Steps of a little over 11 hours cross every month end, leap day and century rule.
        let mut seconds = 0_u64;
        while seconds < 13_700_000_000 {
            let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            let text = humantime::format_rfc3339_seconds(time).to_string();
            let date = DateParts::of(time);
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}",
                date.year, date.month, date.day, date.hour
            );
            assert_eq!(text.get(..13), Some(expected.as_str()), "{seconds}");
            seconds += 40_009;
        }
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        let error = KeyTemplate::parse("traces/{nope}.jsonl", &[]).expect_err("unknown field");
        assert!(error.contains("unknown field '{nope}'"), "{error}");
        let error = KeyTemplate::parse("traces/{service}.jsonl", &[KeyField::Sequence])
            .expect_err("missing seq");
        assert!(error.contains("{seq}"), "{error}");
        assert!(KeyTemplate::parse("traces/{seq", &[]).is_err());
        assert!(KeyTemplate::parse("../x/{seq}", &[]).is_err());
        assert!(KeyTemplate::parse("/x/{seq}", &[]).is_err());
    }
}
