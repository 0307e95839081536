//! Which webhook a partner's pushes go to.
//!
//! Many partners share a deployment, each with its own push provider: one partner's carts
//! must never reach another partner's endpoint. `--webhooks-file` maps each partner to its
//! URL; `--webhook-url`, when given, serves the partners the file does not name (a
//! deployment of one partner, or a gateway of the operator's that routes by the body's
//! `partner_id`). A trigger of a partner with neither is dead-lettered with the reason, not
//! sent anywhere.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("reading webhooks file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("webhooks file {0} must be a JSON object {{\"partner_id\": \"https://…\"}}: {1}")]
    Parse(String, serde_json::Error),
    #[error("webhook of partner {partner}: {url:?} is not an http(s) URL ({reason})")]
    Url {
        partner: String,
        url: String,
        reason: String,
    },
    #[error(
        "no webhook configured: pass --webhooks-file FILE (partner → URL) or --webhook-url URL"
    )]
    None,
}

/// Partner → webhook URL, and the URL for partners not listed.
#[derive(Debug, Clone, Default)]
pub struct WebhookRoutes {
    by_partner: HashMap<String, String>,
    fallback: Option<String>,
}

impl WebhookRoutes {
    /// From an optional JSON file `{"partner_id": "https://…"}` and an optional URL for every
    /// other partner; at least one is required, and every URL must be http(s).
    pub fn load(file: Option<&Path>, fallback: Option<&str>) -> Result<Self, RoutesError> {
        let by_partner: HashMap<String, String> = match file {
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| RoutesError::Read(name.clone(), e))?;
                serde_json::from_str(&text).map_err(|e| RoutesError::Parse(name, e))?
            }
            None => HashMap::new(),
        };
        Self::new(by_partner, fallback.map(str::to_string))
    }

    pub fn new(
        by_partner: HashMap<String, String>,
        fallback: Option<String>,
    ) -> Result<Self, RoutesError> {
        if by_partner.is_empty() && fallback.is_none() {
            return Err(RoutesError::None);
        }
        let urls = by_partner
            .iter()
            .map(|(p, u)| (p.as_str(), u.as_str()))
            .chain(fallback.as_deref().map(|u| ("(--webhook-url)", u)));
        for (partner, url) in urls {
            check_url(url).map_err(|reason| RoutesError::Url {
                partner: partner.to_string(),
                url: url.to_string(),
                reason,
            })?;
        }
        Ok(Self {
            by_partner,
            fallback,
        })
    }

    /// Where `partner`'s pushes go, if anywhere.
    pub fn url_for(&self, partner: &str) -> Option<&str> {
        self.by_partner
            .get(partner)
            .or(self.fallback.as_ref())
            .map(String::as_str)
    }

    /// For the start-up log line: how many partners have their own URL, and whether others
    /// have one.
    pub fn describe(&self) -> String {
        format!(
            "{} partner webhook(s){}",
            self.by_partner.len(),
            if self.fallback.is_some() {
                ", --webhook-url for the others"
            } else {
                "; other partners' triggers are dead-lettered"
            }
        )
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    match parsed.scheme() {
        "http" | "https" => Ok(()),
        other => Err(format!("scheme {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(
        pairs: &[(&str, &str)],
        fallback: Option<&str>,
    ) -> Result<WebhookRoutes, RoutesError> {
        let map = pairs
            .iter()
            .map(|(p, u)| (p.to_string(), u.to_string()))
            .collect();
        WebhookRoutes::new(map, fallback.map(str::to_string))
    }

    #[test]
    fn each_partner_has_its_own_url_and_others_the_fallback_or_none() {
        let r = routes(
            &[("a", "https://a.example/push"), ("b", "http://b:9/p")],
            None,
        )
        .unwrap();
        assert_eq!(r.url_for("a"), Some("https://a.example/push"));
        assert_eq!(r.url_for("b"), Some("http://b:9/p"));
        assert_eq!(r.url_for("c"), None);
        let r = routes(
            &[("a", "https://a.example/push")],
            Some("https://gw.example"),
        )
        .unwrap();
        assert_eq!(r.url_for("c"), Some("https://gw.example"));
        assert_eq!(r.url_for("a"), Some("https://a.example/push"));
    }

    #[test]
    fn bad_configurations_are_named() {
        assert!(matches!(routes(&[], None), Err(RoutesError::None)));
        let e = routes(&[("a", "ftp://a.example")], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("webhook of partner a: \"ftp://a.example\""),
            "{e}"
        );
        let e = routes(&[("a", "not a url")], None).unwrap_err().to_string();
        assert!(e.contains("partner a"), "{e}");
    }
}
