//! Request bodies: gzip, size limits, and splitting into one JSON text per event.

use std::io::Read;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Why a body could not be read. Each maps to one HTTP status in the server.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("batch has {count} events; the limit is {limit}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("unsupported Content-Encoding \"{0}\" (use gzip or none)")]
    Encoding(String),
    #[error("request body is not valid gzip: {0}")]
    Gzip(String),
    #[error("request body is not valid UTF-8")]
    Utf8,
    #[error("request body is empty")]
    Empty,
    #[error("{0}")]
    Json(String),
}

/// Decompresses a gzip body (by its Content-Encoding), refusing to inflate past `limit`: a small
/// compressed body may not expand into gigabytes.
pub fn decode(encoding: Option<&str>, body: &[u8], limit: usize) -> Result<Vec<u8>, BodyError> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => Ok(body.to_vec()),
        Some(e) if e.is_empty() || e == "identity" => Ok(body.to_vec()),
        Some(e) if e == "gzip" || e == "x-gzip" => {
            let mut out = Vec::with_capacity(body.len() * 4);
            flate2::read::MultiGzDecoder::new(body)
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| BodyError::Gzip(e.to_string()))?;
            if out.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            Ok(out)
        }
        Some(other) => Err(BodyError::Encoding(other)),
    }
}

pub fn as_text(body: &[u8]) -> Result<&str, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::Utf8)?;
    if text.trim().is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(text)
}

/// Whether the content type says newline-delimited JSON.
pub fn is_ndjson(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let ct = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        ct == "application/x-ndjson"
            || ct == "application/ndjson"
            || ct == "application/jsonl"
            || ct == "application/x-jsonlines"
    })
}

/// Splits a native body into event texts: one object, an array of objects, or NDJSON lines.
/// Elements are returned as written; each is parsed (and its errors reported) on its own.
pub fn split_events(text: &str, ndjson: bool, max_events: usize) -> Result<Vec<&str>, BodyError> {
    let events: Vec<&str> = if ndjson {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    } else if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text)
            .map_err(|e| BodyError::Json(format!("malformed JSON array: {e}")))?;
        items.into_iter().map(RawValue::get).collect()
    } else {
        vec![text.trim()]
    };
    if events.is_empty() {
        return Err(BodyError::Empty);
    }
    if events.len() > max_events {
        return Err(BodyError::TooManyEvents {
            count: events.len(),
            limit: max_events,
        });
    }
    Ok(events)
}

/// A Segment `/v1/batch` body.
#[derive(Debug, Deserialize)]
pub struct SegmentBatch<'a> {
    #[serde(borrow)]
    pub batch: Vec<&'a RawValue>,
    /// analytics.js sends the key in the body to avoid a CORS preflight.
    #[serde(default, rename = "writeKey")]
    pub write_key: Option<String>,
}

pub fn split_segment_batch(text: &str, max_events: usize) -> Result<SegmentBatch<'_>, BodyError> {
    let batch: SegmentBatch<'_> = serde_json::from_str(text)
        .map_err(|e| BodyError::Json(format!("expected {{\"batch\": [messages…]}}: {e}")))?;
    if batch.batch.is_empty() {
        return Err(BodyError::Empty);
    }
    if batch.batch.len() > max_events {
        return Err(BodyError::TooManyEvents {
            count: batch.batch.len(),
            limit: max_events,
        });
    }
    Ok(batch)
}

/// The `writeKey` of a single Segment message, if it carries one.
pub fn segment_write_key(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Key {
        #[serde(rename = "writeKey")]
        write_key: Option<String>,
    }
    serde_json::from_str::<Key>(text).ok()?.write_key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn gzip_round_trip_and_bomb() {
        assert_eq!(decode(Some("gzip"), &gzip(b"{}"), 10).unwrap(), b"{}");
        let bomb = gzip(&vec![b' '; 1_000_000]);
        assert!(bomb.len() < 10_000);
        assert_eq!(
            decode(Some("gzip"), &bomb, 1000),
            Err(BodyError::TooLarge { limit: 1000 })
        );
        assert!(matches!(
            decode(Some("gzip"), b"nope", 10),
            Err(BodyError::Gzip(_))
        ));
        assert!(matches!(
            decode(Some("br"), b"x", 10),
            Err(BodyError::Encoding(_))
        ));
    }

    #[test]
    fn splits_forms() {
        assert_eq!(
            split_events(r#" {"a":1} "#, false, 10).unwrap(),
            vec![r#"{"a":1}"#]
        );
        assert_eq!(
            split_events(r#"[{"a":1}, {"b":2}]"#, false, 10).unwrap(),
            vec![r#"{"a":1}"#, r#"{"b":2}"#]
        );
        assert_eq!(
            split_events("{\"a\":1}\n\n{\"b\":2}\n", true, 10).unwrap(),
            vec![r#"{"a":1}"#, r#"{"b":2}"#]
        );
        assert_eq!(
            split_events("[1,2,3]", false, 2),
            Err(BodyError::TooManyEvents { count: 3, limit: 2 })
        );
        assert!(matches!(
            split_events("[1,", false, 2),
            Err(BodyError::Json(_))
        ));
        assert_eq!(split_events("[]", false, 2), Err(BodyError::Empty));
    }

    #[test]
    fn segment_batch() {
        let b = split_segment_batch(r#"{"batch":[{"type":"track"}],"writeKey":"k"}"#, 10).unwrap();
        assert_eq!(b.batch.len(), 1);
        assert_eq!(b.write_key.as_deref(), Some("k"));
        assert!(matches!(
            split_segment_batch(r#"{"nope":1}"#, 10),
            Err(BodyError::Json(_))
        ));
    }
}
