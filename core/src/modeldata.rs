//! Model inputs and predictions as CSV rows, in the layout of Azure ML v1's model data collector:
//! a header `$timestamp,$correlationid,<names...>` and one line per row of the scoring request
//! (inputs) or of its response (predictions). This module is pure: it reads one whole JSON body
//! and formats lines; files, parts and uploads are the job of [`crate::storage::modeldata`].
//!
//! # Request shapes ([`input_rows`])
//!
//! 1. `{"data": [[1,2,3],[4,5,6]]}`, a list of rows (the Azure ML v1 `score.py` convention):
//!    columns are positional, named by [`ModeldataColumns::features`] when configured, else
//!    `feature_0..feature_{n-1}`;
//! 2. `{"data": [{"age": 30, "income": 5}, ...]}`, a list of records: columns by name, the
//!    configured names when given (a missing key gives an empty cell, a key not configured is not
//!    written), else the keys of the first record in document order, then the keys of later
//!    records not yet seen, in the order they first appear;
//! 3. `{"data": [1,2,3]}`, a single flat row (also any list mixing rows, records and scalars:
//!    each element is one cell);
//! 4. `{"input_data": {"columns": ["a","b"], "index": [...], "data": [[..],[..]]}}`, the Azure ML
//!    v2 / MLflow "split" orientation: names from `columns` (the `index` is not written); any
//!    wrapper below may hold such an object instead of a list;
//! 5. `{"instances": [...]}` (TF Serving, KServe v1) and `{"inputs": [...]}`: as 1, 2 and 3;
//! 6. `{"dataframe_split": {"columns": [...], "data": [[...]]}}` and
//!    `{"dataframe_records": [{...}]}` (MLflow serving);
//! 7. a bare top-level list, `[[..],[..]]` or `[{..}]` (or a flat row `[1,2,3]`).
//!
//! When an object has several of these keys, the first in the order `input_data`,
//! `dataframe_split`, `dataframe_records`, `data`, `instances`, `inputs` whose value is a list
//! or a split object is used; other keys (`params`, `signature_name`, ...) are not written. Any
//! other request body (a top-level scalar, an object with none of these keys, invalid JSON) is
//! not understood: [`input_rows`] returns `None`.
//!
//! # Response shapes ([`prediction_rows`])
//!
//! 1. a list of scalars `[0, 1, 1]`: one row per element, column `prediction`;
//! 2. a list of lists `[[0.1,0.9],[0.8,0.2]]`: one row per inner list, columns
//!    `prediction_0..`;
//! 3. a list of objects: columns from their keys, as request shape 2;
//! 4. an object wrapping a list under `predictions`, `result`, `outputs`, `output` or `scores`
//!    (the first of these, in that order, whose value is a list): that list, as above; the other
//!    keys are not written;
//! 5. anything else: one row, a scalar in column `prediction`, an object with its keys as
//!    columns.
//!
//! A list mixing scalars, lists and objects gives one row per element in column `prediction`.
//! A response that is a JSON string holding a JSON list or object (what an Azure ML v1
//! `score.py` returning `json.dumps(...)` sends) is read as that list or object.
//!
//! # Column names
//!
//! Positional columns (lists of lists, flat rows, list of scalars) take the configured names
//! first and default names for the rest: a row longer than the configured list gets
//! `feature_<i>` / `prediction_<i>` (0-based column index) for its extra cells, so no value is
//! dropped; a configured list longer than the rows keeps all its columns, their cells empty. The
//! header thus stays the same from body to body as long as rows are not longer than the
//! configuration. Rows of different lengths in one body share the header of the longest row,
//! the missing cells empty. A split object with configured names is matched by name, like
//! records. An empty configured list counts as none.
//!
//! # Cells
//!
//! A JSON number is written as its JSON text, exactly as sent (`1.50` stays `1.50`); a string
//! as the string itself; `true` / `false`; `null` as an empty cell (so `null` and `""` read back
//! the same); a nested list or object as its compact JSON text. Every field, header names
//! included, is quoted per RFC 4180 by [`csv_field`] when it needs to be. Values are kept exact:
//! nothing guards against spreadsheet formula injection (a cell starting with `=`), since the
//! files are data for ML tooling, not for spreadsheets.
//!
//! # Limits
//!
//! At most [`MAX_ROWS_PER_BODY`] rows are written per body; the rest are counted in
//! [`CsvRows::rows_dropped`]. JSON nested deeper than [`MAX_JSON_DEPTH`] is not understood.

use std::borrow::Cow;
use std::collections::HashMap;

/// The most rows taken from one body; further rows are counted in [`CsvRows::rows_dropped`].
pub const MAX_ROWS_PER_BODY: usize = 10_000;

/// The deepest nesting of JSON lists and objects read; a deeper body is not understood.
pub const MAX_JSON_DEPTH: usize = 128;

/// The first two columns of every header.
const HEADER_PREFIX: &str = "$timestamp,$correlationid";

/// Keys wrapping the rows of a request, in the order they are looked for.
const INPUT_KEYS: [&str; 6] = [
    "input_data",
    "dataframe_split",
    "dataframe_records",
    "data",
    "instances",
    "inputs",
];

/// Keys wrapping the rows of a response, in the order they are looked for.
const PREDICTION_KEYS: [&str; 5] = ["predictions", "result", "outputs", "output", "scores"];

/// Which columns to write (from configuration); `None` (or an empty list) = derive from the JSON.
#[derive(Debug, Clone, Default)]
pub struct ModeldataColumns {
    /// Names of the input columns: positional for lists of rows, looked up by name for records.
    pub features: Option<Vec<String>>,
    /// Names of the prediction columns: positional for lists, looked up by name for objects.
    pub predictions: Option<Vec<String>>,
}

/// Rows of one CSV kind from one body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvRows {
    /// The header line, without newline: `$timestamp,$correlationid,<names...>`.
    pub header: String,
    /// The data lines, each without newline, each with as many fields as the header. A line may
    /// still contain CR or LF inside a quoted field.
    pub rows: Vec<String>,
    /// Rows of the body beyond [`MAX_ROWS_PER_BODY`], not in [`CsvRows::rows`].
    pub rows_dropped: usize,
}

/// Rows from a scoring request body (see the module documentation for the shapes understood).
///
/// `None` when the body is not JSON, or not a shape understood; the caller counts it. Each row
/// starts with `timestamp` and `correlation_id`, CSV-quoted as needed.
pub fn input_rows(
    body: &[u8],
    columns: &ModeldataColumns,
    timestamp: &str,
    correlation_id: &str,
) -> Option<CsvRows> {
    let root = parse_json(body)?;
    let naming = Naming {
        configured: configured(&columns.features),
        prefix: "feature",
        single: None,
    };
    let table = input_table(&root, &naming)?;
    Some(table.render(timestamp, correlation_id))
}

/// Rows from a scoring response body (see the module documentation for the shapes understood).
///
/// `None` when the body is not JSON; every JSON response gives at least one row, except an
/// empty list, which gives none. Each row starts with `timestamp` and `correlation_id`,
/// CSV-quoted as needed.
pub fn prediction_rows(
    body: &[u8],
    columns: &ModeldataColumns,
    timestamp: &str,
    correlation_id: &str,
) -> Option<CsvRows> {
    let root = parse_json(body)?;
    let naming = Naming {
        configured: configured(&columns.predictions),
        prefix: "prediction",
        single: Some("prediction"),
    };
    if let Json::String(text) = &root {
        if let Some(inner @ (Json::Array(_) | Json::Object(_))) = parse_json(text.as_bytes()) {
            return Some(prediction_table(&inner, &naming).render(timestamp, correlation_id));
        }
    }
    Some(prediction_table(&root, &naming).render(timestamp, correlation_id))
}

/// One CSV field, quoted per RFC 4180 when it contains a comma, a double quote, CR or LF (inner
/// quotes doubled); otherwise the text unchanged.
///
/// The value is kept exact: no guard against CSV formula injection (`=`, `+`, `-`, `@` first) is
/// applied, since the output is data for ML tooling and must read back as sent.
pub fn csv_field(text: &str) -> Cow<'_, str> {
    if !text.contains([',', '"', '\r', '\n']) {
        return Cow::Borrowed(text);
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        if character == '"' {
            quoted.push('"');
        }
        quoted.push(character);
    }
    quoted.push('"');
    Cow::Owned(quoted)
}

/// A configured column list, `None` when absent or empty.
fn configured(names: &Option<Vec<String>>) -> Option<&[String]> {
    names.as_deref().filter(|names| !names.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Tables: from JSON values to named columns.
// ---------------------------------------------------------------------------------------------

/// How the columns of one kind are named.
#[derive(Debug, Clone, Copy)]
struct Naming<'c> {
    /// The configured names, if any (never empty).
    configured: Option<&'c [String]>,
    /// The prefix of default names: `<prefix>_<index>`.
    prefix: &'static str,
    /// The default name of the only column of a list of scalars, when it has one
    /// (`prediction`); `None` names it `<prefix>_0`.
    single: Option<&'static str>,
}

impl Naming<'_> {
    /// The default name of the positional column `index`.
    fn default_name(&self, index: usize) -> String {
        format!("{}_{index}", self.prefix)
    }
}

/// Named columns and rows of cells (`None` = empty cell), before CSV formatting.
#[derive(Debug)]
struct Table<'v> {
    names: Vec<String>,
    rows: Vec<Vec<Option<&'v Json<'v>>>>,
    rows_dropped: usize,
}

impl Table<'_> {
    /// The CSV lines of the table, each row starting with the timestamp and correlation id.
    fn render(&self, timestamp: &str, correlation_id: &str) -> CsvRows {
        let mut header = String::from(HEADER_PREFIX);
        for name in &self.names {
            header.push(',');
            header.push_str(&csv_field(name));
        }
        let prefix = format!("{},{}", csv_field(timestamp), csv_field(correlation_id));
        let rows = self
            .rows
            .iter()
            .map(|cells| {
                let mut line = prefix.clone();
                for index in 0..self.names.len() {
                    line.push(',');
                    if let Some(Some(value)) = cells.get(index) {
                        line.push_str(&csv_field(&cell_text(value)));
                    }
                }
                line
            })
            .collect();
        CsvRows {
            header,
            rows,
            rows_dropped: self.rows_dropped,
        }
    }
}

/// The table of a request body, `None` when its shape is not understood.
fn input_table<'v>(root: &'v Json<'v>, naming: &Naming<'_>) -> Option<Table<'v>> {
    match root {
        Json::Array(items) => Some(list_table(items, naming)),
        Json::Object(members) => INPUT_KEYS
            .iter()
            .find_map(|key| match member(members, key)? {
                Json::Array(items) => Some(list_table(items, naming)),
                Json::Object(split) => split_table(split, naming),
                _ => None,
            }),
        _ => None,
    }
}

/// The table of a response body: every JSON value gives one.
fn prediction_table<'v>(root: &'v Json<'v>, naming: &Naming<'_>) -> Table<'v> {
    match root {
        Json::Array(items) => list_table(items, naming),
        Json::Object(members) => {
            let wrapped = PREDICTION_KEYS
                .iter()
                .find_map(|key| match member(members, key)? {
                    Json::Array(items) => Some(items),
                    _ => None,
                });
            match wrapped {
                Some(items) => list_table(items, naming),
                None => records_table(std::iter::once(members.as_slice()), 0, naming),
            }
        }
        scalar => positional_table(std::iter::once(vec![scalar]), 0, None, naming, true),
    }
}

/// The value of the last member named `key` (the one a JSON reader keeps).
fn member<'v>(members: &'v [(Cow<'v, str>, Json<'v>)], key: &str) -> Option<&'v Json<'v>> {
    members
        .iter()
        .rev()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value)
}

/// The table of a list: rows when every element is a list, records when every element is an
/// object, else one row per element for predictions (`naming.single` set) or a single flat row
/// for inputs.
fn list_table<'v>(items: &'v [Json<'v>], naming: &Naming<'_>) -> Table<'v> {
    if items.is_empty() {
        return positional_table(std::iter::empty(), 0, None, naming, naming.single.is_some());
    }
    let kept = &items[..items.len().min(MAX_ROWS_PER_BODY)];
    let dropped = items.len() - kept.len();
    if items.iter().all(|item| matches!(item, Json::Array(_))) {
        let rows = kept.iter().map(|item| match item {
            Json::Array(cells) => cells.iter().collect(),
            _ => Vec::new(),
        });
        return positional_table(rows, dropped, None, naming, false);
    }
    if items.iter().all(|item| matches!(item, Json::Object(_))) {
        let records = kept.iter().map(|item| match item {
            Json::Object(members) => members.as_slice(),
            _ => &[],
        });
        return records_table(records, dropped, naming);
    }
    if naming.single.is_some() {
        let rows = kept.iter().map(|item| vec![item]);
        positional_table(rows, dropped, None, naming, true)
    } else {
        // One flat row: its cells are the elements, and there is no row limit to apply.
        positional_table(
            std::iter::once(items.iter().collect()),
            0,
            None,
            naming,
            false,
        )
    }
}

/// The table of a split object (`{"columns": [...], "index": [...], "data": [...]}`), `None`
/// when it has no `data` list.
fn split_table<'v>(
    split: &'v [(Cow<'v, str>, Json<'v>)],
    naming: &Naming<'_>,
) -> Option<Table<'v>> {
    let Json::Array(data) = member(split, "data")? else {
        return None;
    };
    let known: Option<Vec<String>> = match member(split, "columns") {
        Some(Json::Array(names)) => Some(
            names
                .iter()
                .map(|name| cell_text(name).into_owned())
                .collect(),
        ),
        _ => None,
    };
    let Some(known) = known else {
        return Some(list_table(data, naming));
    };
    let kept = &data[..data.len().min(MAX_ROWS_PER_BODY)];
    let dropped = data.len() - kept.len();
    if !data.iter().all(|row| matches!(row, Json::Array(_))) {
        // Not a list of rows: the data is one flat row under the given names.
        let row = std::iter::once(data.iter().collect());
        return Some(positional_table(row, 0, Some(&known), naming, false));
    }
    let rows = kept.iter().map(|row| match row {
        Json::Array(cells) => cells.iter().collect(),
        _ => Vec::new(),
    });
    Some(positional_table(rows, dropped, Some(&known), naming, false))
}

/// A table of positional rows. Column `i` is named by `known` (names the body gives) or else the
/// configured names, and by default names beyond them. With both `known` and configured names,
/// cells are matched to the configured names by their known name, like records.
/// `scalars` marks rows that are single values (named `naming.single` by default).
fn positional_table<'v>(
    rows: impl Iterator<Item = Vec<&'v Json<'v>>>,
    rows_dropped: usize,
    known: Option<&[String]>,
    naming: &Naming<'_>,
    scalars: bool,
) -> Table<'v> {
    let rows: Vec<Vec<&'v Json<'v>>> = rows.collect();
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    if let (Some(known), Some(_)) = (known, naming.configured) {
        let records = rows.iter().map(|cells| {
            cells.iter().enumerate().map(|(index, value)| {
                let name = match known.get(index) {
                    Some(name) => Cow::Borrowed(name.as_str()),
                    None => Cow::Owned(naming.default_name(index)),
                };
                (name, *value)
            })
        });
        return named_table(records, rows_dropped, naming);
    }
    let given = known.or(naming.configured).unwrap_or(&[]);
    let width = longest.max(given.len());
    let names = (0..width)
        .map(|index| match (given.get(index), naming.single) {
            (Some(name), _) => name.clone(),
            (None, Some(single)) if scalars && index == 0 => single.to_owned(),
            (None, _) => naming.default_name(index),
        })
        .collect();
    let rows = rows
        .into_iter()
        .map(|cells| cells.into_iter().map(Some).collect())
        .collect();
    Table {
        names,
        rows,
        rows_dropped,
    }
}

/// A table of records (JSON objects), columns by name (see [`named_table`]).
fn records_table<'v>(
    records: impl Iterator<Item = &'v [(Cow<'v, str>, Json<'v>)]>,
    rows_dropped: usize,
    naming: &Naming<'_>,
) -> Table<'v> {
    let records = records.map(|members| {
        members
            .iter()
            .map(|(name, value)| (Cow::Borrowed(name.as_ref()), value))
    });
    named_table(records, rows_dropped, naming)
}

/// A table of rows of named cells: columns are the configured names (cells looked up by name;
/// names not configured are not written), else every name in order of first appearance. When a
/// name appears twice in one row, the last cell wins; a name configured twice fills only its
/// first column.
fn named_table<'v, 'n, R, C>(records: R, rows_dropped: usize, naming: &Naming<'_>) -> Table<'v>
where
    R: Iterator<Item = C>,
    C: Iterator<Item = (Cow<'n, str>, &'v Json<'v>)>,
{
    let mut names: Vec<String> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let fixed = naming.configured.is_some();
    for name in naming.configured.unwrap_or(&[]) {
        if !index_of.contains_key(name) {
            index_of.insert(name.clone(), names.len());
        }
        names.push(name.clone());
    }
    let mut rows = Vec::new();
    for cells in records {
        let mut row: Vec<Option<&'v Json<'v>>> = vec![None; names.len()];
        for (name, value) in cells {
            let index = match index_of.get(name.as_ref()) {
                Some(&index) => index,
                None if fixed => continue,
                None => {
                    let index = names.len();
                    index_of.insert(name.clone().into_owned(), index);
                    names.push(name.into_owned());
                    index
                }
            };
            if row.len() <= index {
                row.resize(index + 1, None);
            }
            row[index] = Some(value);
        }
        rows.push(row);
    }
    Table {
        names,
        rows,
        rows_dropped,
    }
}

/// The text of one cell, before CSV quoting: numbers as sent, strings unquoted, `true` /
/// `false`, `null` empty, lists and objects as compact JSON.
fn cell_text<'t>(value: &'t Json<'_>) -> Cow<'t, str> {
    match value {
        Json::Null => Cow::Borrowed(""),
        Json::Bool(true) => Cow::Borrowed("true"),
        Json::Bool(false) => Cow::Borrowed("false"),
        Json::Number(text) => Cow::Borrowed(text),
        Json::String(text) => Cow::Borrowed(text.as_ref()),
        nested => {
            let mut text = String::new();
            write_compact(nested, &mut text);
            Cow::Owned(text)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON: a small strict reader keeping numbers' text and object members' order.
// ---------------------------------------------------------------------------------------------

/// A parsed JSON value. Unlike `serde_json::Value` (without its `preserve_order` and
/// `arbitrary_precision` features, which this workspace does not enable), it keeps members in
/// document order and numbers as their exact text.
#[derive(Debug, Clone, PartialEq)]
enum Json<'a> {
    Null,
    Bool(bool),
    /// The number's text, as in the document (already checked against the JSON grammar).
    Number(&'a str),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members in document order, duplicates kept.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

/// Parses one JSON document (RFC 8259, strict: UTF-8, no trailing commas, no comments, nothing
/// after the value but whitespace, no lone surrogate escapes), `None` when it is not one.
fn parse_json(body: &[u8]) -> Option<Json<'_>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut reader = JsonReader { text, position: 0 };
    let value = reader.value(0)?;
    reader.skip_whitespace();
    (reader.position == text.len()).then_some(value)
}

/// The reading position in a JSON document.
#[derive(Debug)]
struct JsonReader<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> JsonReader<'a> {
    /// The byte at the position, if any.
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.position).copied()
    }

    /// The byte at the position, moving past it.
    fn next_byte(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.position += 1;
        Some(byte)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    /// Moves past `literal` when the text continues with it.
    fn literal(&mut self, literal: &str) -> Option<()> {
        let rest = self.text.as_bytes().get(self.position..)?;
        if rest.starts_with(literal.as_bytes()) {
            self.position += literal.len();
            Some(())
        } else {
            None
        }
    }

    /// One value, after optional whitespace; `depth` lists and objects enclose it.
    fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        self.skip_whitespace();
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(Json::String),
            b't' => self.literal("true").map(|()| Json::Bool(true)),
            b'f' => self.literal("false").map(|()| Json::Bool(false)),
            b'n' => self.literal("null").map(|()| Json::Null),
            b'-' | b'0'..=b'9' => self.number().map(Json::Number),
            _ => None,
        }
    }

    fn array(&mut self, depth: usize) -> Option<Json<'a>> {
        if depth > MAX_JSON_DEPTH {
            return None;
        }
        self.position += 1; // '['
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.position += 1;
            return Some(Json::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_whitespace();
            match self.next_byte()? {
                b',' => {}
                b']' => return Some(Json::Array(items)),
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<Json<'a>> {
        if depth > MAX_JSON_DEPTH {
            return None;
        }
        self.position += 1; // '{'
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.position += 1;
            return Some(Json::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return None;
            }
            let name = self.string()?;
            self.skip_whitespace();
            if self.next_byte()? != b':' {
                return None;
            }
            members.push((name, self.value(depth)?));
            self.skip_whitespace();
            match self.next_byte()? {
                b',' => {}
                b'}' => return Some(Json::Object(members)),
                _ => return None,
            }
        }
    }

    /// A number per the JSON grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.position;
        if self.peek() == Some(b'-') {
            self.position += 1;
        }
        match self.next_byte()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.position += 1;
            self.at_least_one_digit()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.position += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.position += 1;
            }
            self.at_least_one_digit()?;
        }
        self.text.get(start..self.position)
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.position += 1;
        }
    }

    fn at_least_one_digit(&mut self) -> Option<()> {
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return None;
        }
        self.digits();
        Some(())
    }

    /// A string, the position at its opening quote; borrowed when it has no escapes.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.position += 1; // '"'
        let start = self.position;
        loop {
            match self.next_byte()? {
                b'"' => return self.text.get(start..self.position - 1).map(Cow::Borrowed),
                b'\\' => break,
                0x00..=0x1f => return None,
                _ => {}
            }
        }
        // An escape: decode into an owned string from here on.
        let mut decoded = String::from(self.text.get(start..self.position - 1)?);
        self.escape(&mut decoded)?;
        loop {
            let run_start = self.position;
            while !matches!(self.peek()?, b'"' | b'\\' | 0x00..=0x1f) {
                self.position += 1;
            }
            decoded.push_str(self.text.get(run_start..self.position)?);
            match self.next_byte()? {
                b'"' => return Some(Cow::Owned(decoded)),
                b'\\' => self.escape(&mut decoded)?,
                _ => return None,
            }
        }
    }

    /// One escape, the position just after its backslash.
    fn escape(&mut self, decoded: &mut String) -> Option<()> {
        let character = match self.next_byte()? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        self.literal("\\u")?;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return None;
                        }
                        let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                        char::from_u32(code)?
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => char::from_u32(unit)?,
                }
            }
            _ => return None,
        };
        decoded.push(character);
        Some(())
    }

    /// Four hex digits.
    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.get(self.position..self.position + 4)?;
        if !digits.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        self.position += 4;
        u32::from_str_radix(digits, 16).ok()
    }
}

/// Appends `value` as compact JSON (numbers as sent, strings escaped minimally).
fn write_compact(value: &Json<'_>, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(true) => out.push_str("true"),
        Json::Bool(false) => out.push_str("false"),
        Json::Number(text) => out.push_str(text),
        Json::String(text) => write_json_string(text, out),
        Json::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_compact(item, out);
            }
            out.push(']');
        }
        Json::Object(members) => {
            out.push('{');
            for (index, (name, item)) in members.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_json_string(name, out);
                out.push(':');
                write_compact(item, out);
            }
            out.push('}');
        }
    }
}

/// Appends `text` as a JSON string literal.
fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            control if u32::from(control) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(control)));
            }
            other => out.push(other),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2024-05-06T07:08:09.123Z";
    const CID: &str = "c0ffee";

    fn names(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(|name| (*name).to_owned()).collect())
    }

    fn features(list: &[&str]) -> ModeldataColumns {
        ModeldataColumns {
            features: names(list),
            predictions: None,
        }
    }

    fn prediction_names(list: &[&str]) -> ModeldataColumns {
        ModeldataColumns {
            features: None,
            predictions: names(list),
        }
    }

    fn inputs_with(body: &str, columns: &ModeldataColumns) -> CsvRows {
        input_rows(body.as_bytes(), columns, TS, CID).expect("a request shape understood")
    }

    fn inputs(body: &str) -> CsvRows {
        inputs_with(body, &ModeldataColumns::default())
    }

    fn predictions_with(body: &str, columns: &ModeldataColumns) -> CsvRows {
        prediction_rows(body.as_bytes(), columns, TS, CID).expect("a response shape understood")
    }

    fn predictions(body: &str) -> CsvRows {
        predictions_with(body, &ModeldataColumns::default())
    }

    /// The expected rows: the header's names and each line's cells after the timestamp and
    /// correlation id (`header` empty: no columns beyond those two).
    fn expected(header: &str, rows: &[&str]) -> CsvRows {
        let with_prefix = |prefix: &str, tail: &str| {
            if header.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix},{tail}")
            }
        };
        CsvRows {
            header: with_prefix("$timestamp,$correlationid", header),
            rows: rows
                .iter()
                .map(|row| with_prefix(&format!("{TS},{CID}"), row))
                .collect(),
            rows_dropped: 0,
        }
    }

    /// A tiny RFC 4180 reader of one record (a line without its final newline).
    fn parse_record(line: &str) -> Result<Vec<String>, String> {
        let mut fields = Vec::new();
        let mut characters = line.chars().peekable();
        loop {
            let mut field = String::new();
            if characters.peek() == Some(&'"') {
                characters.next();
                loop {
                    match characters.next() {
                        None => return Err(format!("unterminated quoted field in {line:?}")),
                        Some('"') if characters.peek() == Some(&'"') => {
                            characters.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(character) => field.push(character),
                    }
                }
                fields.push(field);
                match characters.next() {
                    None => return Ok(fields),
                    Some(',') => {}
                    Some(other) => {
                        return Err(format!("{other:?} after a closing quote in {line:?}"))
                    }
                }
            } else {
                loop {
                    match characters.next() {
                        None => {
                            fields.push(field);
                            return Ok(fields);
                        }
                        Some(',') => {
                            fields.push(field);
                            break;
                        }
                        Some(bad @ ('"' | '\r' | '\n')) => {
                            return Err(format!("unquoted {bad:?} in {line:?}"))
                        }
                        Some(character) => field.push(character),
                    }
                }
            }
        }
    }

    // --- Request shapes --------------------------------------------------------------------

    #[test]
    fn shape_1_list_of_rows_gets_default_names() {
        assert_eq!(
            inputs(r#"{"data": [[1,2,3],[4,5,6]]}"#),
            expected("feature_0,feature_1,feature_2", &["1,2,3", "4,5,6"])
        );
    }

    #[test]
    fn shape_1_configured_names_shorter_than_rows_keep_every_value() {
        assert_eq!(
            inputs_with(r#"{"data": [[1,2,3],[4,5,6]]}"#, &features(&["age"])),
            expected("age,feature_1,feature_2", &["1,2,3", "4,5,6"])
        );
    }

    #[test]
    fn shape_1_configured_names_longer_than_rows_keep_every_column() {
        assert_eq!(
            inputs_with(
                r#"{"data": [[1,2],[4,5]]}"#,
                &features(&["a", "b", "c", "d"])
            ),
            expected("a,b,c,d", &["1,2,,", "4,5,,"])
        );
    }

    #[test]
    fn shape_1_rows_of_different_lengths_share_the_longest_header() {
        assert_eq!(
            inputs(r#"{"data": [[1],[2,3,4],[],[5,6]]}"#),
            expected(
                "feature_0,feature_1,feature_2",
                &["1,,", "2,3,4", ",,", "5,6,"]
            )
        );
    }

    #[test]
    fn shape_2_records_keep_document_order_and_append_new_keys() {
        assert_eq!(
            inputs(r#"{"data": [{"zeta": 1, "alpha": "x"}, {"alpha": 2, "mid": 3}, {}]}"#),
            expected("zeta,alpha,mid", &["1,x,", ",2,3", ",,"])
        );
    }

    #[test]
    fn shape_2_records_with_configured_names_are_looked_up_by_name() {
        assert_eq!(
            inputs_with(
                r#"{"data": [{"age": 30, "income": 5, "extra": 1}, {"income": 7}]}"#,
                &features(&["income", "age", "missing"])
            ),
            expected("income,age,missing", &["5,30,", "7,,"])
        );
    }

    #[test]
    fn shape_2_duplicate_keys_keep_the_last_value() {
        assert_eq!(
            inputs(r#"{"data": [{"a": 1, "a": 2}]}"#),
            expected("a", &["2"])
        );
    }

    #[test]
    fn shape_3_flat_list_is_one_row() {
        assert_eq!(
            inputs(r#"{"data": [1,2,3]}"#),
            expected("feature_0,feature_1,feature_2", &["1,2,3"])
        );
        assert_eq!(
            inputs_with(r#"{"data": [1,2,3]}"#, &features(&["a", "b"])),
            expected("a,b,feature_2", &["1,2,3"])
        );
        // A mixed list is one flat row too, nested values as JSON text.
        assert_eq!(
            inputs(r#"{"data": [1,[2,3],{"k":4}]}"#),
            expected(
                "feature_0,feature_1,feature_2",
                &[r#"1,"[2,3]","{""k"":4}""#]
            )
        );
    }

    #[test]
    fn shape_4_input_data_split_orientation_names_from_columns() {
        let body =
            r#"{"input_data": {"columns": ["a","b"], "index": [0,1], "data": [[1,2],[3,4]]}}"#;
        assert_eq!(inputs(body), expected("a,b", &["1,2", "3,4"]));
        // Cells beyond the columns get default names; columns beyond the cells stay empty.
        let body = r#"{"input_data": {"columns": ["a","b"], "data": [[1,2,3],[4]]}}"#;
        assert_eq!(inputs(body), expected("a,b,feature_2", &["1,2,3", "4,,"]));
        let body = r#"{"input_data": {"columns": ["a","b","c"], "data": [[1]]}}"#;
        assert_eq!(inputs(body), expected("a,b,c", &["1,,"]));
    }

    #[test]
    fn shape_4_split_with_configured_names_matches_by_name() {
        let body = r#"{"input_data": {"columns": ["a","b"], "data": [[1,2],[3,4]]}}"#;
        assert_eq!(
            inputs_with(body, &features(&["b", "z", "a"])),
            expected("b,z,a", &["2,,1", "4,,3"])
        );
    }

    #[test]
    fn shape_4_input_data_may_also_be_a_list() {
        assert_eq!(
            inputs(r#"{"input_data": [[1,2]]}"#),
            expected("feature_0,feature_1", &["1,2"])
        );
    }

    #[test]
    fn shape_5_instances_and_inputs_wrap_rows_records_or_a_flat_row() {
        assert_eq!(
            inputs(r#"{"instances": [[1,2],[3,4]], "signature_name": "serving_default"}"#),
            expected("feature_0,feature_1", &["1,2", "3,4"])
        );
        assert_eq!(
            inputs(r#"{"instances": [{"x": 1}, {"x": 2}]}"#),
            expected("x", &["1", "2"])
        );
        assert_eq!(
            inputs(r#"{"inputs": [5, 6]}"#),
            expected("feature_0,feature_1", &["5,6"])
        );
        assert_eq!(
            inputs(r#"{"inputs": [{"y": true}]}"#),
            expected("y", &["true"])
        );
    }

    #[test]
    fn shape_6_mlflow_dataframe_split_and_records() {
        assert_eq!(
            inputs(r#"{"dataframe_split": {"columns": ["c1","c2"], "data": [[1,"x"]]}}"#),
            expected("c1,c2", &["1,x"])
        );
        assert_eq!(
            inputs(r#"{"dataframe_records": [{"c1": 1, "c2": "x"}, {"c2": "y"}]}"#),
            expected("c1,c2", &["1,x", ",y"])
        );
    }

    #[test]
    fn shape_7_bare_top_level_lists() {
        assert_eq!(
            inputs("[[1,2],[3,4]]"),
            expected("feature_0,feature_1", &["1,2", "3,4"])
        );
        assert_eq!(inputs(r#"[{"a": 1}]"#), expected("a", &["1"]));
        assert_eq!(inputs("[]"), expected("", &[]));
    }

    #[test]
    fn wrapper_keys_are_tried_in_order() {
        // `input_data` comes before `data`; a wrapper whose value is not a list is skipped.
        assert_eq!(
            inputs(r#"{"data": [[9]], "input_data": [[1]]}"#),
            expected("feature_0", &["1"])
        );
        assert_eq!(
            inputs(r#"{"data": "not rows", "inputs": [[1]]}"#),
            expected("feature_0", &["1"])
        );
    }

    #[test]
    fn request_bodies_not_understood_give_none() {
        let columns = ModeldataColumns::default();
        for body in [
            "",
            "   ",
            "5",
            "\"text\"",
            "null",
            r#"{"age": 30}"#,
            r#"{"data": 5}"#,
            r#"{"input_data": {"columns": ["a"]}}"#,
            r#"{"data": [1,2,]}"#,
            r#"{"data": [1,2]"#,
            r#"{"data": [1,2]} x"#,
            r#"{'data': [1]}"#,
            r#"{"data": [01]}"#,
            r#"{"data": [NaN]}"#,
            r#"{"data": ["\ud800"]}"#,
            "// comment\n[1]",
        ] {
            assert_eq!(
                input_rows(body.as_bytes(), &columns, TS, CID),
                None,
                "body {body:?}"
            );
        }
        assert_eq!(input_rows(b"[\"\xff\"]", &columns, TS, CID), None);
    }

    // --- Cells and quoting -----------------------------------------------------------------

    #[test]
    fn cells_keep_json_text_of_numbers_and_strings_unquoted() {
        let body = r#"[[1.50, -0, 1E5, 2e-3, 123456789012345678901234567890, "plain", true, false, null, [1, "a"], {"k": "v\n"}]]"#;
        let rows = inputs(body);
        assert_eq!(
            rows.rows,
            vec![format!(
                r#"{TS},{CID},1.50,-0,1E5,2e-3,123456789012345678901234567890,plain,true,false,,"[1,""a""]","{{""k"":""v\n""}}""#
            )]
        );
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), Cow::Borrowed("plain"));
        assert!(matches!(csv_field("plain"), Cow::Borrowed(_)));
        assert_eq!(csv_field(""), "");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(csv_field("é日本😀"), "é日本😀");
        assert_eq!(
            csv_field("=1+1"),
            "=1+1",
            "no formula guard: values kept exact"
        );
        assert_eq!(csv_field(" padded "), " padded ");
    }

    #[test]
    fn strings_header_names_timestamp_and_correlation_id_are_quoted() {
        let body = r#"[{"a,b": "x,y", "say \"q\"": "line1\nline2", "ключ": "😀 é"}]"#;
        let rows = input_rows(body.as_bytes(), &ModeldataColumns::default(), "t,1", "c\"2")
            .expect("records understood");
        assert_eq!(
            rows.header,
            "$timestamp,$correlationid,\"a,b\",\"say \"\"q\"\"\",ключ"
        );
        assert_eq!(
            rows.rows,
            vec!["\"t,1\",\"c\"\"2\",\"x,y\",\"line1\nline2\",😀 é".to_owned()]
        );
        assert_eq!(
            parse_record(&rows.rows[0]).expect("valid CSV"),
            vec!["t,1", "c\"2", "x,y", "line1\nline2", "😀 é"]
        );
    }

    #[test]
    fn escaped_json_strings_are_decoded() {
        let body = r#"[["tab\there", "\u00e9\ud83d\ude00", "slash\/", "quote\"back\\"]]"#;
        assert_eq!(
            inputs(body).rows,
            vec![format!(
                "{TS},{CID},tab\there,é😀,slash/,\"quote\"\"back\\\""
            )]
        );
    }

    // --- Response shapes -------------------------------------------------------------------

    #[test]
    fn prediction_shape_1_list_of_scalars_is_one_row_each() {
        assert_eq!(
            predictions("[0, 1, 1]"),
            expected("prediction", &["0", "1", "1"])
        );
        assert_eq!(
            predictions_with(r#"["cat", null]"#, &prediction_names(&["label"])),
            expected("label", &["cat", ""])
        );
        // Configured names beyond the single value stay as (empty) columns.
        assert_eq!(
            predictions_with("[0.5]", &prediction_names(&["score", "label"])),
            expected("score,label", &["0.5,"])
        );
    }

    #[test]
    fn prediction_shape_2_list_of_lists_is_positional() {
        assert_eq!(
            predictions("[[0.1,0.9],[0.8,0.2]]"),
            expected("prediction_0,prediction_1", &["0.1,0.9", "0.8,0.2"])
        );
        assert_eq!(
            predictions_with("[[0.1,0.9,0],[0.8]]", &prediction_names(&["no", "yes"])),
            expected("no,yes,prediction_2", &["0.1,0.9,0", "0.8,,"])
        );
    }

    #[test]
    fn prediction_shape_3_list_of_objects_uses_keys() {
        assert_eq!(
            predictions(r#"[{"label": "a", "score": 0.9}, {"score": 0.1, "other": 2}]"#),
            expected("label,score,other", &["a,0.9,", ",0.1,2"])
        );
        assert_eq!(
            predictions_with(
                r#"[{"label": "a", "score": 0.9}]"#,
                &prediction_names(&["score"])
            ),
            expected("score", &["0.9"])
        );
    }

    #[test]
    fn prediction_shape_4_wrapped_lists() {
        for key in ["predictions", "result", "outputs", "output", "scores"] {
            let body = format!(r#"{{"model_version": "3", "{key}": [1, 0]}}"#);
            assert_eq!(
                predictions(&body),
                expected("prediction", &["1", "0"]),
                "key {key}"
            );
        }
        assert_eq!(
            predictions(r#"{"predictions": [[0.1,0.9]]}"#),
            expected("prediction_0,prediction_1", &["0.1,0.9"])
        );
        assert_eq!(
            predictions(r#"{"result": [{"y": 1}]}"#),
            expected("y", &["1"])
        );
        // The first key, in the documented order, that holds a list.
        assert_eq!(
            predictions(r#"{"scores": [9], "result": "x", "predictions": [1]}"#),
            expected("prediction", &["1"])
        );
        assert_eq!(
            predictions(r#"{"scores": [9], "result": "x"}"#),
            expected("prediction", &["9"])
        );
    }

    #[test]
    fn prediction_shape_5_scalars_and_other_objects_are_one_row() {
        assert_eq!(predictions("0.75"), expected("prediction", &["0.75"]));
        assert_eq!(predictions("\"cat\""), expected("prediction", &["cat"]));
        assert_eq!(predictions("null"), expected("prediction", &[""]));
        assert_eq!(
            predictions_with("true", &prediction_names(&["flag"])),
            expected("flag", &["true"])
        );
        assert_eq!(
            predictions(r#"{"result": 0.5, "label": "b"}"#),
            expected("result,label", &["0.5,b"])
        );
        assert_eq!(predictions("{}"), expected("", &[""]));
    }

    #[test]
    fn prediction_mixed_list_is_one_row_per_element() {
        assert_eq!(
            predictions(r#"[1, [2, 3], {"a": 4}]"#),
            expected("prediction", &["1", "\"[2,3]\"", "\"{\"\"a\"\":4}\""])
        );
    }

    #[test]
    fn prediction_double_encoded_json_string_is_read_inside() {
        assert_eq!(
            predictions(r#""{\"result\": [1, 0]}""#),
            expected("prediction", &["1", "0"])
        );
        assert_eq!(
            predictions(r#""[[0.1, 0.9]]""#),
            expected("prediction_0,prediction_1", &["0.1,0.9"])
        );
        // A string that is not a JSON list or object stays a string.
        assert_eq!(
            predictions(r#""[1,""#),
            expected("prediction", &["\"[1,\""])
        );
    }

    #[test]
    fn prediction_empty_list_gives_no_rows() {
        assert_eq!(predictions("[]"), expected("", &[]));
        assert_eq!(predictions(r#"{"predictions": []}"#), expected("", &[]));
        assert_eq!(
            predictions_with("[]", &prediction_names(&["label"])),
            expected("label", &[])
        );
    }

    #[test]
    fn invalid_json_responses_give_none() {
        let columns = ModeldataColumns::default();
        for body in [
            "",
            "{",
            "[1,2",
            "nul",
            "<html>error</html>",
            "1 2",
            "\"\\x\"",
        ] {
            assert_eq!(
                prediction_rows(body.as_bytes(), &columns, TS, CID),
                None,
                "body {body:?}"
            );
        }
    }

    // --- Limits ----------------------------------------------------------------------------

    #[test]
    fn rows_beyond_the_limit_are_counted_not_written() {
        let total = MAX_ROWS_PER_BODY + 5;
        let rows: Vec<String> = (0..total).map(|index| format!("[{index}]")).collect();
        let body = format!(r#"{{"data": [{}]}}"#, rows.join(","));
        let csv = inputs(&body);
        assert_eq!(csv.rows.len(), MAX_ROWS_PER_BODY);
        assert_eq!(csv.rows_dropped, 5);
        assert_eq!(
            csv.rows.last().map(String::as_str),
            Some(format!("{TS},{CID},{}", MAX_ROWS_PER_BODY - 1).as_str())
        );

        let records: Vec<String> = (0..total)
            .map(|index| format!(r#"{{"k":{index}}}"#))
            .collect();
        let csv = inputs(&format!("[{}]", records.join(",")));
        assert_eq!((csv.rows.len(), csv.rows_dropped), (MAX_ROWS_PER_BODY, 5));

        let scalars: Vec<String> = (0..total).map(|index| index.to_string()).collect();
        let csv = predictions(&format!("[{}]", scalars.join(",")));
        assert_eq!((csv.rows.len(), csv.rows_dropped), (MAX_ROWS_PER_BODY, 5));

        // A flat request row is a single row, however long.
        let csv = inputs(&format!(r#"{{"data": [{}]}}"#, scalars.join(",")));
        assert_eq!((csv.rows.len(), csv.rows_dropped), (1, 0));
    }

    #[test]
    fn nesting_beyond_the_depth_limit_is_not_understood() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_json(nested(MAX_JSON_DEPTH).as_bytes()).is_some());
        assert!(parse_json(nested(MAX_JSON_DEPTH + 1).as_bytes()).is_none());
        assert!(parse_json(nested(100_000).as_bytes()).is_none());
    }

    // --- The JSON reader against serde_json ------------------------------------------------

    /// The reader accepts exactly what serde_json accepts, and reads the same values.
    fn assert_reads_like_serde_json(body: &[u8]) {
        let ours = parse_json(body);
        let theirs = serde_json::from_slice::<serde_json::Value>(body);
        if let Err(error) = &theirs {
            // serde_json refuses numbers beyond f64; the text is kept as is here.
            if error.to_string().contains("number out of range") {
                return;
            }
        }
        match (&ours, &theirs) {
            (Some(value), Ok(expected)) => {
                let mut compact = String::new();
                write_compact(value, &mut compact);
                let reread: serde_json::Value =
                    serde_json::from_str(&compact).expect("compact output is JSON");
                assert_eq!(
                    &reread,
                    expected,
                    "body {:?}",
                    String::from_utf8_lossy(body)
                );
            }
            (None, Err(_)) => {}
            _ => panic!(
                "reader {} but serde_json {} for {:?}",
                if ours.is_some() { "accepts" } else { "refuses" },
                if theirs.is_ok() { "accepts" } else { "refuses" },
                String::from_utf8_lossy(body)
            ),
        }
    }

    #[test]
    fn reader_agrees_with_serde_json_on_tricky_documents() {
        for body in [
            "0",
            "-0",
            "-",
            "01",
            "1.",
            ".5",
            "1e",
            "1e+",
            "1E-2",
            "-1.5e+10",
            "tru",
            "true ",
            " null",
            "[1,]",
            "[,1]",
            "{}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:2}",
            "[\"\\u0041\"]",
            "[\"\\u00\"]",
            "[\"\\ud83d\\ude00\"]",
            "[\"\\ude00\"]",
            "[\"\\ud83d x\"]",
            "[\"a\tb\"]",
            "[\"\\/\"]",
            "[\"\\a\"]",
            "{\"a\":{\"b\":[{}]}}",
            "\u{feff}[]",
            "[1 2]",
            "[\"\u{7f}\"]",
            "\"\\u0000\"",
        ] {
            assert_reads_like_serde_json(body.as_bytes());
        }
    }

    // --- Property test ---------------------------------------------------------------------

    /// A linear congruential generator (Knuth's MMIX constants).
    #[derive(Debug)]
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }

        fn pick<'p, T>(&mut self, items: &'p [T]) -> &'p T {
            &items[self.below(items.len())]
        }
    }

    const NUMBERS: [&str; 12] = [
        "0",
        "-0",
        "1",
        "-12",
        "1.50",
        "3.14159",
        "1e5",
        "2E-3",
        "-0.0e+0",
        "7",
        "0.1",
        "123456789012345678901234567890",
    ];

    const PIECES: [&str; 14] = [
        "a", "bc", ",", "\"", "\n", "\r", " ", "é", "😀", "\\", "\t", "\u{1}", "=", "日本",
    ];

    fn random_text(rng: &mut Lcg) -> String {
        (0..rng.below(5)).map(|_| *rng.pick(&PIECES)).collect()
    }

    /// `text` as a JSON string literal, some characters randomly written as `\u` escapes.
    fn json_string(rng: &mut Lcg, text: &str) -> String {
        let mut out = String::from("\"");
        for character in text.chars() {
            if rng.below(4) == 0 || u32::from(character) < 0x20 {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            } else if character == '"' || character == '\\' {
                out.push('\\');
                out.push(character);
            } else {
                out.push(character);
            }
        }
        out.push('"');
        out
    }

    fn random_scalar(rng: &mut Lcg) -> String {
        match rng.below(5) {
            0 => (*rng.pick(&NUMBERS)).to_owned(),
            1 => {
                let text = random_text(rng);
                json_string(rng, &text)
            }
            2 => (*rng.pick(&["true", "false"])).to_owned(),
            3 => "null".to_owned(),
            _ => (*rng.pick(&NUMBERS)).to_owned(),
        }
    }

    fn random_value(rng: &mut Lcg, depth: usize) -> String {
        if depth == 0 || rng.below(4) != 0 {
            return random_scalar(rng);
        }
        if rng.below(2) == 0 {
            random_row(rng, depth - 1)
        } else {
            random_record(rng, depth - 1)
        }
    }

    fn random_row(rng: &mut Lcg, depth: usize) -> String {
        let cells: Vec<String> = (0..rng.below(6))
            .map(|_| random_value(rng, depth))
            .collect();
        format!("[{}]", cells.join(","))
    }

    fn random_record(rng: &mut Lcg, depth: usize) -> String {
        let keys = ["a", "b", "k,1", "q\"", "line\nbreak", "ключ", "c"];
        let members: Vec<String> = (0..rng.below(5))
            .map(|_| {
                let key = *rng.pick(&keys);
                let key = json_string(rng, key);
                let value = random_value(rng, depth);
                format!("{key}: {value}")
            })
            .collect();
        format!("{{{}}}", members.join(", "))
    }

    fn random_list(rng: &mut Lcg) -> String {
        let items: Vec<String> = (0..rng.below(7))
            .map(|_| match rng.below(10) {
                0 => random_scalar(rng),
                _ => random_value(rng, 2),
            })
            .collect();
        let uniform: Vec<String> = (0..rng.below(7))
            .map(|_| {
                if rng.below(2) == 0 {
                    random_row(rng, 1)
                } else {
                    random_record(rng, 1)
                }
            })
            .collect();
        let rows: Vec<String> = (0..rng.below(7)).map(|_| random_row(rng, 1)).collect();
        let records: Vec<String> = (0..rng.below(7)).map(|_| random_record(rng, 1)).collect();
        let scalars: Vec<String> = (0..rng.below(7)).map(|_| random_scalar(rng)).collect();
        let chosen = match rng.below(5) {
            0 => items,
            1 => uniform,
            2 => rows,
            3 => records,
            _ => scalars,
        };
        format!("[{}]", chosen.join(", "))
    }

    fn random_body(rng: &mut Lcg) -> String {
        let list = random_list(rng);
        match rng.below(12) {
            0 => list,
            1 => format!(r#"{{"data": {list}}}"#),
            2 => format!(r#"{{"instances": {list}, "signature_name": "x"}}"#),
            3 => format!(r#"{{"inputs": {list}}}"#),
            4 => format!(r#"{{"dataframe_records": {list}}}"#),
            5 | 6 => {
                let columns: Vec<String> = (0..rng.below(5)).map(|_| random_scalar(rng)).collect();
                let key = *rng.pick(&["input_data", "dataframe_split", "data"]);
                format!(
                    r#"{{"{key}": {{"columns": [{}], "index": [0], "data": {list}}}}}"#,
                    columns.join(",")
                )
            }
            7 => {
                let key = *rng.pick(&PREDICTION_KEYS);
                format!(r#"{{"{key}": {list}, "other": 1}}"#)
            }
            8 => random_value(rng, 3),
            9 => {
                let inner = list.replace('\\', "\\\\").replace('"', "\\\"");
                format!("\"{inner}\"")
            }
            _ => random_record(rng, 2),
        }
    }

    fn random_columns(rng: &mut Lcg) -> Option<Vec<String>> {
        match rng.below(3) {
            0 => None,
            _ => Some((0..rng.below(5)).map(|_| random_text(rng)).collect()),
        }
    }

    /// Every line of `rows` reads back with as many fields as its header, starting with the
    /// timestamp and correlation id.
    fn assert_well_formed(rows: &CsvRows, timestamp: &str, correlation_id: &str, body: &str) {
        let header = parse_record(&rows.header).expect("header is CSV");
        assert_eq!(
            header[..2],
            ["$timestamp", "$correlationid"],
            "body {body:?}"
        );
        for row in &rows.rows {
            let fields = parse_record(row).unwrap_or_else(|error| panic!("{error}; body {body:?}"));
            assert_eq!(
                fields.len(),
                header.len(),
                "row {row:?} against header {:?}; body {body:?}",
                rows.header
            );
            assert_eq!(fields[0], timestamp);
            assert_eq!(fields[1], correlation_id);
        }
    }

    #[test]
    fn generated_bodies_give_rows_as_wide_as_their_header() {
        let mut rng = Lcg(0x5c0e_7a90);
        let mut understood = (0, 0);
        for _ in 0..600 {
            let body = random_body(&mut rng);
            let columns = ModeldataColumns {
                features: random_columns(&mut rng),
                predictions: random_columns(&mut rng),
            };
            let timestamp = random_text(&mut rng);
            let correlation_id = random_text(&mut rng);
            assert_reads_like_serde_json(body.as_bytes());
            if let Some(rows) = input_rows(body.as_bytes(), &columns, &timestamp, &correlation_id) {
                assert_well_formed(&rows, &timestamp, &correlation_id, &body);
                understood.0 += 1;
            }
            let rows = prediction_rows(body.as_bytes(), &columns, &timestamp, &correlation_id)
                .unwrap_or_else(|| panic!("every JSON response gives rows; body {body:?}"));
            assert_well_formed(&rows, &timestamp, &correlation_id, &body);
            understood.1 += 1;

            // Damaged copies: read like serde_json, and never give malformed rows.
            for _ in 0..3 {
                let mut damaged = body.clone().into_bytes();
                let at = rng.below(damaged.len() + 1);
                match rng.below(3) {
                    0 if at < damaged.len() => {
                        damaged.remove(at);
                    }
                    1 => damaged.insert(at, *rng.pick(b",[]{}\":\\ x")),
                    _ => damaged.truncate(at),
                }
                assert_reads_like_serde_json(&damaged);
                let text = String::from_utf8_lossy(&damaged);
                if let Some(rows) = input_rows(&damaged, &columns, &timestamp, &correlation_id) {
                    assert_well_formed(&rows, &timestamp, &correlation_id, &text);
                }
                if let Some(rows) = prediction_rows(&damaged, &columns, &timestamp, &correlation_id)
                {
                    assert_well_formed(&rows, &timestamp, &correlation_id, &text);
                }
            }
        }
        // The generator reaches the shapes: most bodies are understood as requests.
        assert!(
            understood.0 > 300,
            "only {} request bodies understood",
            understood.0
        );
    }
}
