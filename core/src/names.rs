//! Event-name normalisation: every producer's naming becomes one snake_case vocabulary.

/// Segment e-commerce spec names (v2) mapped onto Pulse's own event types, so an existing
/// Segment integration lights up the same profile fields and triggers as a native one.
const SEGMENT_ECOMMERCE: &[(&str, &str)] = &[
    ("products searched", "search"),
    ("product list viewed", "product_list_view"),
    ("product viewed", "product_view"),
    ("product clicked", "product_click"),
    ("product added", "add_to_cart"),
    ("product removed", "remove_from_cart"),
    ("cart viewed", "cart_view"),
    ("checkout started", "checkout_started"),
    ("order completed", "purchase"),
    ("order refunded", "refund"),
    ("order cancelled", "order_cancelled"),
    ("product added to wishlist", "wishlist"),
    ("product removed from wishlist", "wishlist_remove"),
    ("page viewed", "page_view"),
];

/// The event types Pulse knows by name: ARCHITECTURE.md's, the Segment e-commerce spec's
/// (as mapped above) and the Segment call types. Stores that give each type a field of its own
/// (the profile mapping's `event_counts.<type>`) index these and no others, so what partners
/// name their events can never grow a schema without bound.
pub const STANDARD_EVENT_TYPES: &[&str] = &[
    "page_view",
    "screen_view",
    "product_list_view",
    "product_view",
    "product_click",
    "add_to_cart",
    "remove_from_cart",
    "cart_view",
    "checkout_started",
    "purchase",
    "refund",
    "order_cancelled",
    "wishlist",
    "wishlist_remove",
    "search",
    "identify",
    "alias",
    "group",
];

/// Longest event type accepted; longer names are almost always a value sent in the wrong field.
pub const MAX_EVENT_NAME: usize = 64;

/// Normalises an event name: Segment spec names map to Pulse types, anything else becomes
/// snake_case (`"Add To Cart"`, `"addToCart"`, `"add-to-cart"` → `add_to_cart`).
/// Returns `None` when nothing usable is left (empty, or no letter to start with).
pub fn normalize_event_name(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    let lower = trimmed.to_lowercase();
    if let Some((_, mapped)) = SEGMENT_ECOMMERCE.iter().find(|(k, _)| *k == lower) {
        return Some((*mapped).to_string());
    }
    let mut out = String::with_capacity(trimmed.len() + 4);
    let mut prev_lower_or_digit = false;
    for c in trimmed.chars() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && prev_lower_or_digit {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            prev_lower_or_digit = c.is_ascii_lowercase() || c.is_ascii_digit();
        } else {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            prev_lower_or_digit = false;
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    let starts_with_letter = out.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    (starts_with_letter && out.len() <= MAX_EVENT_NAME).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::normalize_event_name as n;

    #[test]
    fn snake_case_forms() {
        for raw in [
            "add_to_cart",
            "Add To Cart",
            "addToCart",
            "add-to-cart",
            " ADD_TO_CART ",
        ] {
            assert_eq!(n(raw).as_deref(), Some("add_to_cart"), "{raw}");
        }
    }

    #[test]
    fn segment_spec_names() {
        assert_eq!(n("Product Added").as_deref(), Some("add_to_cart"));
        assert_eq!(n("Order Completed").as_deref(), Some("purchase"));
        assert_eq!(n("product viewed").as_deref(), Some("product_view"));
    }

    #[test]
    fn standard_types_are_normal_forms_and_cover_the_spec() {
        for t in super::STANDARD_EVENT_TYPES {
            assert_eq!(n(t).as_deref(), Some(*t));
        }
        for (_, mapped) in super::SEGMENT_ECOMMERCE {
            assert!(super::STANDARD_EVENT_TYPES.contains(mapped), "{mapped}");
        }
    }

    #[test]
    fn rejects_unusable() {
        assert_eq!(n(""), None);
        assert_eq!(n("  -- "), None);
        assert_eq!(n("123"), None);
        assert_eq!(n(&"a".repeat(65)), None);
    }
}
