//! The Azure ML v1 compatible export (opt-in): model inputs and predictions as CSV parts under
//! `modeldata/<subscription>/<resourcegroup>/<workspace>/<webservice>/<model>/<version>/<inputs|predictions>/<yyyy>/<mm>/<dd>/`.
//!
//! Blob storage cannot append to a block blob, and several instances write the same day, so each
//! instance writes numbered parts beside where `data.csv` would be:
//! `data-<instance>-<seq>.csv`, each a complete CSV file with its own header row
//! (`$timestamp,$correlationid,<names>`). Readers glob
//! `modeldata/<...>/<version>/inputs/<yyyy>/<mm>/<dd>/data*.csv` (which also matches a `data.csv`
//! written by the old collector). A part is sealed by size, by age, at a new hour, and when the
//! columns change.

use std::sync::Arc;

use http::StatusCode;

use super::batch::{BatchSettings, RotatingFile};
use super::key::{KeyField, KeyTemplate, KeyValues};
use super::staging::{SequenceFile, Staging, StagingError};
use crate::modeldata::{input_rows, prediction_rows, CsvRows, ModeldataColumns};
use crate::record::BodyCapture;

/// What the export writes and where.
#[derive(Debug, Clone)]
pub struct ModeldataSettings {
    /// `<subscription>/<resourcegroup>/<workspace>/<webservice>/<model>/<version>`.
    pub path: String,
    pub columns: ModeldataColumns,
}

impl ModeldataSettings {
    /// Checks the six path segments (letters, digits, `-`, `_`, `.`).
    pub fn parse_path(text: &str) -> Result<String, String> {
        let segments: Vec<&str> = text.trim_matches('/').split('/').collect();
        let valid = segments.len() == 6
            && segments.iter().all(|segment| {
                !segment.is_empty()
                    && *segment != "."
                    && *segment != ".."
                    && segment
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
            });
        if valid {
            Ok(segments.join("/"))
        } else {
            Err(format!(
                "expected SUBSCRIPTION/RESOURCEGROUP/WORKSPACE/WEBSERVICE/MODEL/VERSION (six segments of letters, digits, '-', '_', '.'); got '{text}'"
            ))
        }
    }
}

/// Counters of the export.
#[derive(Debug, Default, Clone, Copy)]
pub struct ModeldataCounts {
    pub input_rows: u64,
    pub prediction_rows: u64,
    /// Bodies not exported: not JSON of a known shape, larger than a record, or incomplete.
    pub bodies_skipped: u64,
    /// Rows refused by a full spool.
    pub rows_dropped: u64,
}

/// Writes CSV parts of inputs and predictions.
#[derive(Debug)]
pub struct ModeldataSink {
    inputs: RotatingFile,
    predictions: RotatingFile,
    sequence: SequenceFile,
    instance: String,
    columns: ModeldataColumns,
    counts: ModeldataCounts,
}

impl ModeldataSink {
    pub fn new(
        staging: Arc<Staging>,
        settings: &ModeldataSettings,
        batches: BatchSettings,
        instance: &str,
    ) -> Result<Self, String> {
        let template = KeyTemplate::parse(
            &format!(
                "modeldata/{}/{{kind}}/{{yyyy}}/{{mm}}/{{dd}}/data-{{instance}}-{{seq}}.csv",
                settings.path
            ),
            &[KeyField::Kind, KeyField::Sequence, KeyField::Instance],
        )?;
        let sequence = SequenceFile::open(staging.root(), &format!("{instance}.modeldata"))
            .map_err(|error| format!("opening the modeldata sequence: {error}"))?;
        let file = |staging: Arc<Staging>| {
            RotatingFile::new(
                staging,
                template.clone(),
                "text/csv",
                batches.clone(),
                false,
            )
        };
        Ok(Self {
            inputs: file(staging.clone()),
            predictions: file(staging),
            sequence,
            instance: instance.to_owned(),
            columns: settings.columns.clone(),
            counts: ModeldataCounts::default(),
        })
    }

    pub fn counts(&self) -> ModeldataCounts {
        self.counts
    }

    /// Exports one exchange: its input rows, and its prediction rows when the response was a
    /// success. Only bodies the record holds whole are read.
    pub fn write_exchange(
        &mut self,
        timestamp: &str,
        correlation_id: &str,
        request: &BodyCapture,
        response: Option<(StatusCode, &BodyCapture)>,
    ) {
        match whole(request)
            .and_then(|body| input_rows(body, &self.columns, timestamp, correlation_id))
        {
            Some(rows) => {
                let written = self.append(Kind::Inputs, &rows);
                self.counts.input_rows += written;
            }
            None => self.counts.bodies_skipped += 1,
        }
        let Some((status, body)) = response else {
            return;
        };
        if !status.is_success() {
            return;
        }
        match whole(body)
            .and_then(|body| prediction_rows(body, &self.columns, timestamp, correlation_id))
        {
            Some(rows) => {
                let written = self.append(Kind::Predictions, &rows);
                self.counts.prediction_rows += written;
            }
            None => self.counts.bodies_skipped += 1,
        }
    }

    fn append(&mut self, kind: Kind, rows: &CsvRows) -> u64 {
        let values = KeyValues {
            instance: &self.instance,
            kind: kind.as_str(),
            ..KeyValues::default()
        };
        let file = match kind {
            Kind::Inputs => &mut self.inputs,
            Kind::Predictions => &mut self.predictions,
        };
        let mut written = 0;
        for row in &rows.rows {
            match file.append(
                row.as_bytes(),
                Some(&rows.header),
                &values,
                &mut self.sequence,
            ) {
                Ok(()) => written += 1,
                Err(StagingError::SpoolFull { .. }) => self.counts.rows_dropped += 1,
                Err(error) => {
                    self.counts.rows_dropped += 1;
                    tracing::debug!("modeldata row not written: {error}");
                }
            }
        }
        written
    }

    pub fn flush(&mut self) -> Result<(), StagingError> {
        self.inputs.flush()?;
        self.predictions.flush()
    }

    pub fn maintain(&mut self) -> Result<(), StagingError> {
        self.inputs.maintain()?;
        self.predictions.maintain()
    }

    pub fn close(&mut self) -> Result<(), StagingError> {
        self.inputs.seal()?;
        self.predictions.seal()
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Inputs,
    Predictions,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Inputs => "inputs",
            Kind::Predictions => "predictions",
        }
    }
}

/// The body's bytes when capture holds all of them.
fn whole(body: &BodyCapture) -> Option<&[u8]> {
    (body.complete && body.excluded.is_none() && body.prefix.len() as u64 == body.size)
        .then_some(body.prefix.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_need_six_safe_segments() {
        assert_eq!(
            ModeldataSettings::parse_path("sub/rg/ws/svc/model/1").as_deref(),
            Ok("sub/rg/ws/svc/model/1")
        );
        assert!(ModeldataSettings::parse_path("sub/rg/ws/svc/model").is_err());
        assert!(ModeldataSettings::parse_path("sub/rg/ws/svc/{seq}/1").is_err());
        assert!(ModeldataSettings::parse_path("sub/rg/../svc/model/1").is_err());
    }
}
