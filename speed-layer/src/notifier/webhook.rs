//! One delivery to the partner's push webhook: the FCM-style body, the POST, and which
//! answers are worth another attempt.

use serde_json::json;

use crate::triggers::TriggerMessage;

/// A failed POST, and whether another attempt may succeed.
#[derive(Debug)]
pub(super) struct DeliveryError {
    pub message: String,
    pub retryable: bool,
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Worth another attempt: a timeout, rate limiting or a server-side error. Any other 4xx
/// will not change with retries.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// An FCM-style body (`message.notification` + string-valued `data`).
pub fn push_body(t: &TriggerMessage) -> serde_json::Value {
    let mut data = json!({
        "idempotency_key": t.idempotency_key,
        "rule_id": t.rule_id,
        "partner_id": t.partner_id,
        "user_id": t.user_id,
        "event": t.event,
        "message_id": t.message_id,
        "event_timestamp": t.event_timestamp.to_string(),
        "fired_at": t.fired_at.to_string(),
    });
    // When ingest received the event (epoch ms): what a partner (and bench/triggers) measures
    // a push's delay from.
    if t.received_at > 0 {
        data["received_at"] = json!(t.received_at.to_string());
    }
    if let Some(a) = &t.cart_amount {
        data["cart_amount"] = json!(a);
    }
    if let Some(p) = &t.product_id {
        data["product_id"] = json!(p);
    }
    json!({
        "message": {
            "topic": format!("{}.{}", t.partner_id, t.user_id),
            "notification": {"title": t.template, "body": format!("{} {}", t.event, t.cart_amount.clone().unwrap_or_default()).trim().to_string()},
            "data": data,
        }
    })
}

/// One POST of `body` to `url`, with the trigger's idempotency key as a header.
pub(super) async fn post(
    http: &reqwest::Client,
    url: &str,
    trigger: &TriggerMessage,
    body: &serde_json::Value,
) -> Result<(), DeliveryError> {
    let result = http
        .post(url)
        .header("Idempotency-Key", &trigger.idempotency_key)
        .json(body)
        .send()
        .await;
    match result {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(DeliveryError {
            message: format!("webhook answered {}", resp.status()),
            retryable: retryable_status(resp.status().as_u16()),
        }),
        Err(e) => Err(DeliveryError {
            message: format!("webhook unreachable: {e}"),
            retryable: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which webhook answers are retried: the push provider's transient failures, never a
    /// request it refused for good (a retry would only be refused again, then dead-lettered
    /// later than need be).
    #[test]
    fn transient_answers_are_retried_and_refusals_are_not() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(status), "{status}");
        }
        for status in [400, 401, 403, 404, 410, 413, 422] {
            assert!(!retryable_status(status), "{status}");
        }
    }
}
