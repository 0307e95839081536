//! What an operator asks to erase: one person from the command line, or thousands from a file
//! of JSON lines, each checked as an event's ids are (a request that names no profile is
//! refused with the line and the reason, before anything is done).

use std::path::Path;

use pulse_core::erasure::IdKind;
use pulse_core::validate::{check_partner_id, check_person_id};
use serde::Deserialize;

/// One person to erase, as asked: a partner and one of their ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub partner_id: String,
    pub id: String,
    pub kind: IdKind,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("nothing to erase: give --partner with --user or --anonymous-id, or --file")]
    Empty,
}

/// A line of a requests file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    partner_id: String,
    user_id: Option<String>,
    anonymous_id: Option<String>,
}

impl Request {
    /// A request from its parts: exactly one of `user` and `anonymous`, valid ids.
    pub fn new(partner: &str, user: Option<&str>, anonymous: Option<&str>) -> Result<Self, String> {
        check_partner_id(partner).map_err(|e| e.to_string())?;
        let (id, kind, field) = match (user, anonymous) {
            (Some(u), None) => (u, IdKind::User, "user_id"),
            (None, Some(a)) => (a, IdKind::Anonymous, "anonymous_id"),
            (Some(_), Some(_)) => {
                return Err(
                    "give user_id or anonymous_id, not both (erasing a person erases \
                            the devices merged into them)"
                        .into(),
                )
            }
            (None, None) => return Err("user_id or anonymous_id is required".into()),
        };
        check_person_id(field, partner, id).map_err(|e| e.to_string())?;
        Ok(Self {
            partner_id: partner.to_string(),
            id: id.to_string(),
            kind,
        })
    }
}

/// The requests of a file of JSON lines (`{"partner_id": …, "user_id": …}` or with
/// `anonymous_id`); blank lines and lines starting with `#` are skipped. The first bad line
/// fails the whole file: half a batch erased is harder to account for than none.
pub fn from_file(path: &Path) -> Result<Vec<Request>, RequestError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| RequestError::Read {
        path: name.clone(),
        error,
    })?;
    parse_lines(&name, &text)
}

fn parse_lines(name: &str, text: &str) -> Result<Vec<Request>, RequestError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let failed = |message: String| RequestError::Line {
            path: name.to_string(),
            line: i + 1,
            message,
        };
        let parsed: Line = serde_json::from_str(trimmed).map_err(|e| failed(e.to_string()))?;
        let request = Request::new(
            &parsed.partner_id,
            parsed.user_id.as_deref(),
            parsed.anonymous_id.as_deref(),
        )
        .map_err(failed)?;
        out.push(request);
    }
    if out.is_empty() {
        return Err(RequestError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_requests_and_every_way_a_line_is_refused() {
        let ok = parse_lines(
            "f",
            "# batch 7\n{\"partner_id\":\"p1\",\"user_id\":\"u1\"}\n\n{\"partner_id\":\"p2\",\"anonymous_id\":\"a:1\"}\n",
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![
                Request {
                    partner_id: "p1".into(),
                    id: "u1".into(),
                    kind: IdKind::User
                },
                Request {
                    partner_id: "p2".into(),
                    id: "a:1".into(),
                    kind: IdKind::Anonymous
                },
            ]
        );
        let long = "x".repeat(600);
        for (line, says) in [
            ("not json", "expected"),
            (r#"{"partner_id":"p1"}"#, "required"),
            (
                r#"{"partner_id":"p1","user_id":"u","anonymous_id":"a"}"#,
                "not both",
            ),
            (r#"{"partner_id":"p:1","user_id":"u"}"#, "':'"),
            (r#"{"partner_id":"","user_id":"u"}"#, "partner_id"),
            (r#"{"partner_id":"p1","user_id":"  "}"#, "missing"),
            (r#"{"partner_id":"p1","user_id":7}"#, "invalid type"),
            (
                r#"{"partner_id":"p1","user_id":"u","email":"x"}"#,
                "unknown field",
            ),
            (
                &format!(r#"{{"partner_id":"p1","user_id":"{long}"}}"#),
                "longer",
            ),
        ] {
            let text = format!("{{\"partner_id\":\"p1\",\"user_id\":\"fine\"}}\n{line}\n");
            let e = parse_lines("batch.jsonl", &text).unwrap_err().to_string();
            assert!(e.starts_with("batch.jsonl line 2: "), "{e}");
            assert!(e.contains(says), "{line}: {e}");
        }
        assert!(matches!(
            parse_lines("f", "# only\n\n"),
            Err(RequestError::Empty)
        ));
    }
}
